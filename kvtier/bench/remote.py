"""``kvtier bench remote``: the remote tier over loopback vs a raw TCP stream and Redis.

Four peers run as separate processes, each measured in the same run with the
same block sizes:

* ``tcp``: a plain Python socket peer; the client streams a batch of blocks to
  it (put) or from it (get) with ``sendall``/``recv_into`` and waits for a
  one-byte acknowledgement.  The peer sends (receives) each block of a batch
  from (into) its own place in a 64 MiB buffer, as a server holds distinct
  blocks, so neither side gets to reuse one cache-hot block.  This is the machine's peak for the path, the
  ``peak_gbps`` of every row.
* ``kvtier``: ``kvtier serve`` and a RemoteTier (checksums on, one batched
  request per call).
* ``zmq``: the bare transport kvtier rides on, with no kvtier logic: a pyzmq
  ROUTER peer that sends a batch's blocks as one zero-copy multipart message
  (get) or receives them and copies each into its place in a buffer while
  checksumming it (put), against a DEALER client that does the same copy and
  checksum (get) or checksums before sending zero-copy (put).  What ZeroMQ
  plus end-to-end checksums cost on this machine: the ceiling of the kvtier
  rows, which also carry ``vs_zmq``.
* ``redis``: a ``redis-server`` started here (no persistence), the same blocks
  stored through redis-py pipelines.  Skipped when redis-server is missing.

Throughput rows move ``--batch-bytes`` per call and report the median over
``--repeat`` runs; latency (p50/p99) is one block per call, ``--samples`` calls.
The peers take turns call by call, so a busy machine slows them alike (and
each call finds the other peer's threads asleep, as sporadic requests do);
``p50_alone_ms`` / ``p99_alone_ms`` are the same calls made back to back, one
peer at a time.  Puts
store fresh keys every time (a server skips blocks it already holds).  Each
kvtier row also carries ``vs_redis`` (its throughput over Redis's), and every
row ``cpu_s_per_gb``: CPU seconds spent by client and server together per GB
moved, a figure that a busy machine disturbs far less than throughput.

Like ``kvtier serve``, this process raises glibc's mmap threshold
(:func:`kvtier.remote.server.tune_malloc`) so received frames reuse heap buffers
instead of faulting in fresh pages; the kvtier and redis-py clients both gain
from it, the raw TCP stream (which receives into buffers it allocated once)
does not.  ``--no-malloc-tuning`` measures without it.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from .common import row

SIZES = [256 << 10, 1 << 20, 4 << 20, 8 << 20]
_REQ = struct.Struct("<cQQ")           # op, block bytes, blocks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                   help="block sizes in bytes, comma-separated (default 256KiB..8MiB)")
    p.add_argument("--batch-bytes", type=int, default=32 << 20, help="bytes per throughput call (default 32 MiB)")
    p.add_argument("--repeat", type=int, default=7, help="throughput repetitions; the median is reported")
    p.add_argument("--samples", type=int, default=300, help="single-block calls per latency figure")
    p.add_argument("--no-redis", action="store_true", help="skip the redis-server comparison")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave this process's malloc as it is (kvtier serve tunes its own either way)")
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
    buf = memoryview(bytearray(os.urandom(64 << 20)))
    hdr = bytearray(_REQ.size)
    while _recv_exact(conn, memoryview(hdr)):
        op, bb, n = _REQ.unpack(hdr)
        room = max(1, len(buf) // bb)
        for i in range(n):
            view = buf[i % room * bb:(i % room + 1) * bb]   # distinct blocks, as a server holds them
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


# ---- bare ZeroMQ peer -------------------------------------------------------------------
def _zmq_peer(endpoint: str) -> None:
    import zmq
    from ..remote import protocol as P
    from ..remote.server import tune_malloc
    tune_malloc()
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    buf = memoryview(bytearray(os.urandom(64 << 20)))
    while True:
        frames = sock.recv_multipart(copy=False)
        op, bb, n = _REQ.unpack(frames[1].bytes)
        room = max(1, len(buf) // bb)
        blocks = [buf[i % room * bb:(i % room + 1) * bb] for i in range(n)]   # distinct places
        if op == b"q":
            return
        if op == b"p":
            P.copy_payloads(blocks, [f.buffer for f in frames[2:]])
            sock.send_multipart([frames[0], b"k"])
        else:
            sock.send_multipart([frames[0], b"h", *blocks], copy=False)


class ZmqClient:
    def __init__(self):
        import zmq
        endpoint = f"tcp://127.0.0.1:{_free_port()}"
        self.proc = mp.get_context("spawn").Process(target=_zmq_peer, args=(endpoint,), daemon=True)
        self.proc.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint)

    def put(self, blocks) -> None:
        from ..remote import protocol as P
        P.payload_crcs(blocks)
        self.sock.send_multipart([_REQ.pack(b"p", len(blocks[0]), len(blocks)), *blocks], copy=False)
        self.sock.recv()

    def get(self, dsts) -> None:
        from ..remote import protocol as P
        self.sock.send(_REQ.pack(b"g", len(dsts[0]), len(dsts)))
        frames = self.sock.recv_multipart(copy=False)
        P.copy_payloads(dsts, [f.buffer for f in frames[1:]])

    def close(self) -> None:
        import zmq
        try:
            self.sock.send(_REQ.pack(b"q", 1, 0), zmq.NOBLOCK)   # a peer that is gone: no wait
        except zmq.Again:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        self.sock.close(0)
        self.ctx.term()


# ---- peers we start ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_kvtier(quota: int, namespaces: int) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kvtier", "serve", "--bind", endpoint,
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


def _cpu_s(pid: int) -> float:
    """CPU seconds used so far by every thread of a process (schedstat: ns resolution)."""
    total = 0
    for task in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(task) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):      # a thread that just ended
            pass
    return total / 1e9


def _interleaved(fns: dict, rounds: int, pids: dict) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run each peer's fn once per round, in turn, so all of them see the same machine load.

    Returns wall times per call and CPU seconds per peer (this process plus the peer's server).
    """
    for fn in fns.values():
        fn()                                   # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu = dict.fromkeys(fns, 0.0)
    me = os.getpid()
    for _ in range(rounds):
        for name, fn in fns.items():
            c0 = _cpu_s(me) + _cpu_s(pids[name])
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name] += _cpu_s(me) + _cpu_s(pids[name]) - c0
    return times, cpu


def _back_to_back(fns: dict, calls: int) -> dict[str, list[float]]:
    """Wall time of each of ``calls`` calls made one right after another, peer by peer."""
    times: dict[str, list[float]] = {}
    for name, fn in fns.items():
        fn()
        ts = times[name] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


class _Peers:
    """put/get callables of one block size, for each peer, over a batch or one block."""

    def __init__(self, bb: int, n: int, tcp: TcpClient, zc: ZmqClient, endpoint: str, rc):
        from ..keys import KEY_BYTES
        from ..remote.client import RemoteTier
        self.bb, self.n, self.tcp, self.zc, self.rc = bb, n, tcp, zc, rc
        blocks = [os.urandom(bb) for _ in range(min(n, 4))]
        self.src = [memoryview(blocks[i % len(blocks)]) for i in range(n)]
        self.dsts = [memoryview(bytearray(bb)) for _ in range(n)]
        self.keys = [i.to_bytes(KEY_BYTES, "little") for i in range(n)]
        self.fresh = itertools.count(n)        # puts store new keys: a server skips keys it holds
        self.tier = RemoteTier("remote", bb, [endpoint], namespace=f"bench-{bb}", timeout_ms=30_000,
                               max_inflight_bytes=max(256 << 20, n * bb))
        ok = self.tier.write(self.keys, [0] * n, self.src)
        if not all(ok):
            raise RuntimeError(f"kvtier bench: {n - sum(ok)} of {n} blocks not stored ({self.tier.stats()})")
        if rc is not None:
            self._redis_put([b"bench:" + x for x in self.keys], self.src)
        deadline = time.monotonic() + 120      # measure once the server has mapped the namespace's memory
        while (self.tier.ping("stats")[0] or {}).get("populating") and time.monotonic() < deadline:
            time.sleep(0.05)

    def _new_keys(self, m: int) -> list[bytes]:
        return [next(self.fresh).to_bytes(16, "little") for _ in range(m)]

    def _redis_put(self, ks, vs) -> None:
        p = self.rc.pipeline(transaction=False)
        for x, v in zip(ks, vs):
            p.set(x, v)
        p.execute()

    def fns(self, op: str, m: int) -> dict:
        src, dsts, keys, tier = self.src[:m], self.dsts[:m], self.keys[:m], self.tier

        def kv_put():
            if not all(tier.write(self._new_keys(m), [0] * m, src)):
                raise RuntimeError(f"kvtier bench: a put was refused ({tier.stats()})")

        def kv_get():
            if not all(tier.read(keys, [0] * m, dsts)):
                raise RuntimeError(f"kvtier bench: a stored block came back as a miss ({tier.stats()})")

        def r_get():
            p = self.rc.pipeline(transaction=False)
            for x in keys:
                p.get(b"bench:" + x)
            for v, d in zip(p.execute(), dsts):
                d[:] = v

        out = {"tcp": (lambda: self.tcp.put(src)) if op == "put" else (lambda: self.tcp.get(dsts)),
               "zmq": (lambda: self.zc.put(src)) if op == "put" else (lambda: self.zc.get(dsts)),
               "kvtier": kv_put if op == "put" else kv_get}
        if self.rc is not None:
            out["redis"] = (lambda: self._redis_put([b"bench:" + x for x in self._new_keys(m)], src)) \
                if op == "put" else r_get
        return out

    def close(self) -> None:
        self.tier.close()
        if self.rc is not None:
            self.rc.flushall()


# ---- the suite ------------------------------------------------------------------------
def run(args) -> list[dict]:
    if not args.no_malloc_tuning:
        from ..remote.server import tune_malloc
        tune_malloc()
    sizes = [int(s) for s in str(args.sizes).split(",") if s]
    repeat, samples, batch_bytes = args.repeat, args.samples, args.batch_bytes
    if args.quick:
        sizes, repeat, samples, batch_bytes = [256 << 10, 1 << 20], 3, 100, 16 << 20
    quota = (repeat + 4) * batch_bytes + 8 * max(sizes) + (64 << 20)   # puts of fresh keys fit
    tcp, zc = TcpClient(), ZmqClient()
    kv_proc, endpoint = _start_kvtier(quota, len(sizes))
    tmp = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
    redis_proc, rc = (None, None) if args.no_redis else _start_redis(tmp)
    pids = {"tcp": tcp.proc.pid, "zmq": zc.proc.pid, "kvtier": kv_proc.pid, "redis": redis_proc.pid if redis_proc else 0}
    rows = []
    try:
        for bb in sizes:
            n = max(1, batch_bytes // bb)
            peers = _Peers(bb, n, tcp, zc, endpoint, rc)
            try:
                for op in ("get", "put"):         # gets first: the puts of fresh keys evict
                    thr, cpu = _interleaved(peers.fns(op, n), repeat, pids)
                    lat, _ = _interleaved(peers.fns(op, 1), samples, pids)
                    alone = _back_to_back(peers.fns(op, 1), samples)
                    secs = {p: statistics.median(ts) for p, ts in thr.items()}
                    peak = n * bb / secs["tcp"] / 1e9
                    for p, s_ in secs.items():
                        extra = dict(block_bytes=bb, blocks=n, p50_ms=round(_pct(lat[p], 0.5) * 1e3, 3),
                                     p99_ms=round(_pct(lat[p], 0.99) * 1e3, 3),
                                     p50_alone_ms=round(_pct(alone[p], 0.5) * 1e3, 3),
                                     p99_alone_ms=round(_pct(alone[p], 0.99) * 1e3, 3),
                                     cpu_s_per_gb=round(cpu[p] / (repeat * n * bb / 1e9), 3))
                        if p == "kvtier":
                            extra["vs_zmq"] = round(secs["zmq"] / s_, 3)
                            if "redis" in secs:
                                extra["vs_redis"] = round(secs["redis"] / s_, 3)
                        rows.append(row("remote", f"{p} {op} {bb >> 10}KiB", n * bb, s_, peak, **extra))
            finally:
                peers.close()
    finally:
        tcp.close()
        zc.close()
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
