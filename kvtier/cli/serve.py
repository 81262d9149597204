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
from ..remote.namespaces import load_public_key, parse_tenant
from ..remote.server import LOOPBACK, Server, require_zmq, tune_malloc

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
    p.add_argument("--max-request-bytes", default="256MiB",
                   help="largest request accepted, and largest get reply sent (default 256MiB)")
    p.add_argument("--max-frame-bytes", default=None,
                   help="largest frame (so largest block); a peer sending a larger one is disconnected "
                        "before it is buffered (default 64MiB, or less to fit --max-request-bytes)")
    p.add_argument("--max-requests-per-connection", default=2, type=int, metavar="N",
                   help="requests queued per connection; more wait in the peer's TCP stream (default 2)")
    p.add_argument("--max-inflight-bytes", default="512MiB",
                   help="bytes held for all peers together: past half, put and get are answered busy; "
                        "past all of it, the peers holding most are disconnected (default 512MiB)")
    p.add_argument("--idle-release", default=600.0, type=float, metavar="SECONDS",
                   help="release a namespace (its blocks and memory) unused this long; 0: never (default 600)")
    p.add_argument("--admin-key", action="append", default=[], metavar="PUBKEY_FILE",
                   help="a CURVE public key that may list and drop every namespace (repeatable)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default=LOOPBACK,
                   help="address /metrics listens on (default loopback; 0.0.0.0 in a pod, for Prometheus)")


def bounds(args: argparse.Namespace) -> dict:
    """The memory bounds and namespace lifecycle flags, checked; ConfigError names the flag."""
    request = parse_size("--max-request-bytes", args.max_request_bytes)
    if request < P.MAX_HEADER_BYTES + 1:
        raise ConfigError("--max-request-bytes", args.max_request_bytes, f"more than {P.MAX_HEADER_BYTES} bytes")
    frame = min(P.Limits().max_block_bytes, request - P.MAX_HEADER_BYTES) if args.max_frame_bytes is None \
        else parse_size("--max-frame-bytes", args.max_frame_bytes)
    if not 1 <= frame <= request - P.MAX_HEADER_BYTES:
        raise ConfigError("--max-frame-bytes", args.max_frame_bytes,
                          f"1 byte up to --max-request-bytes less a header ({request - P.MAX_HEADER_BYTES}): "
                          "a block must fit in a request")
    if not 1 <= args.max_requests_per_connection <= 1024:
        raise ConfigError("--max-requests-per-connection", args.max_requests_per_connection, "an int in [1, 1024]")
    inflight = parse_size("--max-inflight-bytes", args.max_inflight_bytes)
    if inflight < 2 * request:
        raise ConfigError("--max-inflight-bytes", args.max_inflight_bytes,
                          f"at least 2 x --max-request-bytes ({2 * request}): two requests must fit")
    if not 0 <= args.idle_release < float("inf"):
        raise ConfigError("--idle-release", args.idle_release, "seconds >= 0 (0: never)")
    if args.admin_key and not args.curve_secret:
        raise ConfigError("--admin-key", args.admin_key[0], "only with --curve-secret (keys need CURVE)")
    admins = frozenset(load_public_key(path, "--admin-key") for path in args.admin_key)
    return dict(limits=P.Limits(max_request_bytes=request, max_block_bytes=frame),
                max_inflight_bytes=inflight, max_requests_per_connection=args.max_requests_per_connection,
                idle_release_s=args.idle_release, admin_keys=admins)


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
    server = Server(args.bind, capacity_bytes=parse_size("--capacity", args.capacity), default_quota=quota,
                    tenants=tenants, curve_secret=args.curve_secret, disk_dir=args.disk,
                    disk_bytes=parse_size("--disk-capacity", args.disk_capacity), **bounds(args))
    if args.block_bytes is not None:
        bb = parse_size("--block-bytes", args.block_bytes)
        for name in tenants:
            try:
                server.open_namespace(name, bb)
            except P.ProtocolError as e:
                server.close()
                raise ConfigError("--tenant", name, e.message) from None
    httpd = serve_http(server.metrics, args.metrics_host, args.metrics_port) if args.metrics_port is not None else None
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
