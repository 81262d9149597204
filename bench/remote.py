"""``kvtier bench remote``: the remote tier over loopback vs a raw TCP stream and Redis.

Three peers run as separate processes, each measured in the same run with the
same block sizes:

* ``tcp``: a plain Python socket peer; the client streams a batch of blocks to
  it (put) or from it (get) with ``sendall``/``recv_into`` and waits for a
  one-byte acknowledgement.  This is the machine's peak for the path, the
  ``peak_gbps`` of every row.
* ``kvtier``: ``kvtier serve`` and a RemoteTier (checksums on, one batched
  request per call).
* ``redis``: a ``redis-server`` started here (no persistence), the same blocks
  stored through redis-py pipelines.  Skipped when redis-server is missing.

Throughput rows move ``--batch-bytes`` per call and report the median over
``--repeat`` runs; latency (p50/p99) is one block per call, ``--samples`` calls.
Each kvtier row also carries ``vs_redis`` (its throughput over Redis's).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

from .common import median_time, row

SIZES = [256 << 10, 1 << 20, 4 << 20, 8 << 20]
_REQ = struct.Struct("<cQQ")           # op, block bytes, blocks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                   help="block sizes in bytes, comma-separated (default 256KiB..8MiB)")
    p.add_argument("--batch-bytes", type=int, default=32 << 20, help="bytes per throughput call (default 32 MiB)")
    p.add_argument("--repeat", type=int, default=7, help="throughput repetitions; the median is reported")
    p.add_argument("--samples", type=int, default=300, help="single-block calls per latency figure")
    p.add_argument("--no-redis", action="store_true", help="skip the redis-server comparison")
    p.add_argument("--quick", action="store_true", help="two sizes, few repetitions")


# ---- raw TCP peer ------------------------------------------------------------------
def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    while view:
        n = conn.recv_into(view)
        if n == 0:
            return False
        view = view[n:]
    return True


def _tcp_peer(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 << 20)
    hdr = bytearray(_REQ.size)
    while _recv_exact(conn, memoryview(hdr)):
        op, bb, n = _REQ.unpack(hdr)
        view = memoryview(buf)[:bb]
        for _ in range(n):
            if op == b"p":
                _recv_exact(conn, view)
            else:
                conn.sendall(view)
        if op == b"p":
            conn.sendall(b"k")


class TcpClient:
    def __init__(self):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.proc = mp.get_context("fork").Process(target=_tcp_peer, args=(listener,), daemon=True)
        self.proc.start()
        self.sock = socket.create_connection(listener.getsockname())
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.close()
        self.ack = bytearray(1)

    def put(self, blocks) -> None:
        self.sock.sendall(_REQ.pack(b"p", len(blocks[0]), len(blocks)))
        for b in blocks:
            self.sock.sendall(b)
        _recv_exact(self.sock, memoryview(self.ack))

    def get(self, dsts) -> None:
        self.sock.sendall(_REQ.pack(b"g", len(dsts[0]), len(dsts)))
        for d in dsts:
            _recv_exact(self.sock, d)

    def close(self) -> None:
        self.sock.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


# ---- peers we start ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_kvtier(quota: int, namespaces: int) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.server", "--bind", endpoint,
                             "--capacity", str(quota * namespaces), "--quota", str(quota)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"kvtier serve did not start: {line}")
    return proc, endpoint


def _start_redis(tmp: str):
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    import redis
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", tmp, "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=30)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


def _latency(fn, samples: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3, times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3


# ---- the suite ------------------------------------------------------------------------
def run(args) -> list[dict]:
    from kvtier.keys import KEY_BYTES
    from kvtier.tiers.remote import RemoteTier

    sizes = [int(s) for s in str(args.sizes).split(",") if s]
    repeat, samples, batch_bytes = args.repeat, args.samples, args.batch_bytes
    if args.quick:
        sizes, repeat, samples, batch_bytes = [256 << 10, 1 << 20], 3, 100, 16 << 20
    capacity = max(batch_bytes * 2, max(sizes) * 8) + (64 << 20)
    tcp = TcpClient()
    kv_proc, endpoint = _start_kvtier(capacity, len(sizes))
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
    redis_proc, rc = (None, None) if args.no_redis else _start_redis(tmp)
    rows = []
    try:
        for bb in sizes:
            n = max(1, batch_bytes // bb)
            nbytes = n * bb
            blocks = [os.urandom(bb) for _ in range(min(n, 4))]
            src = [memoryview(blocks[i % len(blocks)]) for i in range(n)]
            dsts = [memoryview(bytearray(bb)) for _ in range(n)]
            keys = [i.to_bytes(KEY_BYTES, "little") for i in range(n)]
            tier = RemoteTier("remote", bb, [endpoint], namespace=f"bench-{bb}", timeout_ms=30_000,
                              max_inflight_bytes=max(256 << 20, nbytes))
            res: dict[str, dict] = {}

            # tcp: the peak
            res["tcp put"] = dict(s=median_time(lambda: tcp.put(src), repeat),
                                  lat=_latency(lambda: tcp.put(src[:1]), samples))
            res["tcp get"] = dict(s=median_time(lambda: tcp.get(dsts), repeat),
                                  lat=_latency(lambda: tcp.get(dsts[:1]), samples))
            # kvtier
            ok = tier.write(keys, [0] * n, src)
            if not all(ok):
                raise RuntimeError(f"kvtier bench: {n - sum(ok)} of {n} blocks not stored ({tier.stats()})")
            res["kvtier put"] = dict(s=median_time(lambda: tier.write(keys, [0] * n, src), repeat),
                                     lat=_latency(lambda: tier.write(keys[:1], [0], src[:1]), samples))

            def kv_get(k=keys, d=dsts):
                if not all(tier.read(k, [0] * len(k), d)):
                    raise RuntimeError(f"kvtier bench: a stored block came back as a miss ({tier.stats()})")
            res["kvtier get"] = dict(s=median_time(kv_get, repeat),
                                     lat=_latency(lambda: kv_get(keys[:1], dsts[:1]), samples))
            # redis
            if rc is not None:
                rkeys = [b"bench:" + x for x in keys]

                def r_put(ks=rkeys, vs=src):
                    p = rc.pipeline(transaction=False)
                    for x, v in zip(ks, vs):
                        p.set(x, v)
                    p.execute()

                def r_get(ks=rkeys, ds=dsts):
                    p = rc.pipeline(transaction=False)
                    for x in ks:
                        p.get(x)
                    for v, d in zip(p.execute(), ds):
                        d[:] = v
                res["redis put"] = dict(s=median_time(r_put, repeat),
                                        lat=_latency(lambda: r_put(rkeys[:1], src[:1]), samples))
                res["redis get"] = dict(s=median_time(r_get, repeat),
                                        lat=_latency(lambda: r_get(rkeys[:1], dsts[:1]), samples))
                rc.flushall()
            tier.discard(keys, [0] * n)
            tier.close()
            for op in ("put", "get"):
                peak = nbytes / res[f"tcp {op}"]["s"] / 1e9
                redis_gbps = nbytes / res[f"redis {op}"]["s"] / 1e9 if f"redis {op}" in res else None
                for peer in ("tcp", "kvtier", "redis"):
                    r = res.get(f"{peer} {op}")
                    if r is None:
                        continue
                    extra = dict(block_bytes=bb, blocks=n, p50_ms=round(r["lat"][0], 3),
                                 p99_ms=round(r["lat"][1], 3))
                    if peer == "kvtier" and redis_gbps:
                        extra["vs_redis"] = round(nbytes / r["s"] / 1e9 / redis_gbps, 3)
                    rows.append(row("remote", f"{peer} {op} {bb >> 10}KiB", nbytes, r["s"], peak, **extra))
    finally:
        tcp.close()
        kv_proc.terminate()
        try:
            kv_proc.wait(20)
        except subprocess.TimeoutExpired:
            kv_proc.kill()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from .common import emit
    parser = argparse.ArgumentParser(prog="python -m bench.remote")
    add_arguments(parser)
    parser.add_argument("--json", metavar="PATH")
    a = parser.parse_args()
    emit(run(a), a.json)
