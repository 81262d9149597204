"""``kvtier serve``: run a kvtier cache server, the remote tier's peer.

Parses the command line into a :class:`~kvtier.remote.server.Server` (capacity,
quotas, tenants, CURVE, disk), serves until SIGTERM or SIGINT, and closes it.
``--gen-keys DIR`` writes CURVE key pairs instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal

from ..config import parse_size
from ..errors import ConfigError
from ..metrics import serve_http
from ..remote import protocol as P
from ..remote.server import LOOPBACK, Server, parse_tenant, require_zmq, tune_malloc

log = logging.getLogger("kvtier.remote.server")


def gen_keys(directory: str, clients: list[str]) -> list[str]:
    """CURVE key pairs: ``server`` and one per client name; returns the files made."""
    require_zmq()
    from zmq.auth import create_certificates
    os.makedirs(directory, exist_ok=True)
    out = []
    for name in ["server"] + clients:
        out += list(create_certificates(directory, name))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", default=f"tcp://{LOOPBACK}:5555",
                   help=f"ZeroMQ endpoint (default tcp://{LOOPBACK}:5555; other hosts need --curve-secret)")
    p.add_argument("--capacity", default="1GiB", help="host memory for all namespaces together")
    p.add_argument("--quota", default="256MiB", help="host memory of a namespace not named by --tenant")
    p.add_argument("--tenant", action="append", default=[], metavar="NAME[:QUOTA[:PUBKEY_FILE,...]]",
                   help="a namespace, its byte quota and the CURVE public keys that may use it (repeatable)")
    p.add_argument("--curve-secret", metavar="FILE", help="the server's CURVE secret key file (turns CURVE on)")
    p.add_argument("--gen-keys", metavar="DIR", help="write CURVE key pairs for the server and --client names, then exit")
    p.add_argument("--client", action="append", default=[], help="client name for --gen-keys (repeatable)")
    p.add_argument("--block-bytes", default=None,
                   help="create every --tenant namespace at start for blocks of this size (else on first put)")
    p.add_argument("--disk", metavar="DIR", help="also keep each namespace's blocks on disk under DIR")
    p.add_argument("--disk-capacity", default="16GiB", help="disk bytes per namespace")
    p.add_argument("--max-request-bytes", default="256MiB", help="largest request accepted")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")


def main(args: argparse.Namespace) -> int:
    if args.gen_keys:
        for path in gen_keys(args.gen_keys, args.client):
            print(path)
        return 0
    tune_malloc()
    quota = parse_size("--quota", args.quota)
    tenants = {}
    for spec in args.tenant:
        t = parse_tenant(spec, quota)
        tenants[t.name] = t
    limits = P.Limits(max_request_bytes=parse_size("--max-request-bytes", args.max_request_bytes))
    server = Server(args.bind, capacity_bytes=parse_size("--capacity", args.capacity), default_quota=quota,
                    tenants=tenants, curve_secret=args.curve_secret, disk_dir=args.disk,
                    disk_bytes=parse_size("--disk-capacity", args.disk_capacity), limits=limits)
    if args.block_bytes is not None:
        bb = parse_size("--block-bytes", args.block_bytes)
        for name in tenants:
            try:
                server.open_namespace(name, bb)
            except P.ProtocolError as e:
                server.close()
                raise ConfigError("--tenant", name, e.message) from None
    httpd = serve_http(server.metrics, LOOPBACK, args.metrics_port) if args.metrics_port is not None else None
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    print(f"kvtier serve: listening on {server.endpoint}" + (" (CURVE)" if server.curve else ""), flush=True)
    try:
        server.run()
    finally:
        if httpd is not None:
            httpd.shutdown()
        server.close()
        log.info("stopped")
    return 0
