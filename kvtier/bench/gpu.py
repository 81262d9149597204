"""`kvtier bench gpu`: device <-> host KV copies against the pinned cudaMemcpyAsync peak.

Measured in one run, on one device:

1. peak: one contiguous 64 MiB cudaMemcpyAsync between pinned host memory and
   the device, H2D and D2H, and both at once on two streams (device events);
2. store (device -> host) and load (host -> device) of a batch of blocks of 16,
   32 and 256 tokens with Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim
   128, bf16; MLA: one 576-wide latent page per layer) in every layout of
   bench/kv_layouts.py, for every mechanism (dma, kernel, auto), as GB/s and
   ratio to the peak of the same direction.  Block ids are a random, gapped,
   unsorted subset of the engine's blocks; one slot of every case is checked
   against the torch reference so a fast wrong copy cannot pass;
3. store and load at once, against the bidirectional peak;
4. interference: the slowdown of a stream of large bf16 matmuls while each
   mechanism copies continuously next to it;
5. the vLLM-shaped cases of :mod:`kvtier.bench.gpu_vllm` (step hold-up by
   stores, layer-wise loads against resident KV), run right after the peak.

``seconds`` is the median wall time of submit + completion, what a caller
waits; ``device_gbps`` is the same copy timed with device events.  Rows carry
the batch path's record (``batch``: cudaMemcpyBatchAsync calls that worked,
``batch_failures``).  The host arena is an mmap registered with
cudaHostRegister (exactly its size; torch's pinned allocator would round it
up to a power of two).

A case that fails becomes a row with an ``error`` field and the suite goes
on; rows are appended to ``--json`` as each case finishes, so a failure or a
time limit never loses the rows before it (the peak first of all).
Without CUDA the suite refuses with one line.
"""
from __future__ import annotations

import json
import logging
import statistics
import threading
import time

import numpy as np

from .common import row
from .kv_layouts import LAYOUTS, LLAMA_3_1_8B, make_kv

log = logging.getLogger(__name__)

SUITE = "gpu"
PEAK_BYTES = 64 << 20


def add_arguments(p) -> None:
    p.add_argument("--tokens", default="16,32,256", help="block sizes in tokens (comma-separated)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="layouts (comma-separated)")
    p.add_argument("--mechanisms", default="dma,kernel,auto", help="mechanisms (comma-separated)")
    p.add_argument("--batch-mib", type=int, default=256, help="bytes moved per transfer, in MiB")
    p.add_argument("--repeat", type=int, default=10, help="timed transfers per case (median)")
    p.add_argument("--matmul", type=int, default=8192, help="matmul size for the interference cases (0: skip)")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--vllm-steps", type=int, default=20, help="decode steps per vLLM-shaped timing (0: skip)")


def _require_cuda():
    from ..errors import KVTierError
    try:
        import torch
    except ImportError:
        raise KVTierError("bench gpu needs torch with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        raise KVTierError("bench gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    return torch


def _events_ms(torch, stream, fn, repeat: int, warmup: int = 3) -> float:
    """Median device time of ``fn`` (issued on ``stream``) in seconds."""
    for _ in range(warmup):
        with torch.cuda.stream(stream):
            fn()
    stream.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record()
            fn()
            b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def measure_peak(torch, dev) -> dict:
    host = torch.empty(PEAK_BYTES, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(PEAK_BYTES, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 256)
    d = torch.empty(PEAK_BYTES, dtype=torch.uint8, device=dev)
    d2 = torch.empty(PEAK_BYTES, dtype=torch.uint8, device=dev)
    d2.random_(0, 256)
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    h2d = _events_ms(torch, s1, lambda: d.copy_(host, non_blocking=True), 20)
    d2h = _events_ms(torch, s1, lambda: host2.copy_(d2, non_blocking=True), 20)

    def both():
        s2.wait_stream(s1)
        d.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(d2, non_blocking=True)
        s1.wait_stream(s2)
    bidir = _events_ms(torch, s1, both, 20)
    torch.cuda.synchronize(dev)
    return {"h2d": PEAK_BYTES / h2d / 1e9, "d2h": PEAK_BYTES / d2h / 1e9, "bidir": 2 * PEAK_BYTES / bidir / 1e9}


class Case:
    """One layout and block size: engine KV on the device, a pinned host arena, the block ids."""

    def __init__(self, torch, dev, layout: str, tokens: int, batch_bytes: int, arena, seed: int):
        from ..layout import BlockLayout
        probe, bd = make_kv(layout, 1, tokens, LLAMA_3_1_8B, device="meta", fill="empty")
        block_bytes = _block_bytes(probe, bd)
        self.num = max(1, batch_bytes // block_bytes)
        g = torch.Generator(device=dev).manual_seed(seed)
        self.tensors, self.block_dim = make_kv(layout, 2 * self.num + 1, tokens, LLAMA_3_1_8B,
                                               device=dev, generator=g)
        self.layout = BlockLayout(self.tensors, self.block_dim)
        rng = np.random.default_rng(seed)
        self.ids = rng.permutation(2 * self.num + 1)[:self.num]          # unsorted, gapped
        self.slot_bytes = (self.layout.block_bytes + 4095) // 4096 * 4096
        if self.slot_bytes * self.num > arena.numel():
            raise ValueError("arena too small")
        self.arena = arena
        self.addrs = np.uint64(arena.data_ptr()) + np.arange(self.num, dtype=np.uint64) * np.uint64(self.slot_bytes)
        self.nbytes = self.num * self.layout.block_bytes
        self.name = f"{layout} {tokens}tok"

    def check_slot(self, torch, i: int) -> bool:
        from ..gpu import torch_ref
        want = torch_ref.gather_blocks(self.tensors, self.block_dim, [int(self.ids[i])]).cpu()[0]
        off = i * self.slot_bytes
        return bool(torch.equal(self.arena[off:off + self.layout.block_bytes], want))

    def check_all(self, torch) -> bool:
        """Every slot holds the bytes of its engine block (after a store, and after a load back)."""
        from ..gpu import torch_ref
        want = torch_ref.gather_blocks(self.tensors, self.block_dim, self.ids).cpu()
        got = self.arena[:self.num * self.slot_bytes].view(self.num, self.slot_bytes)[:, :self.layout.block_bytes]
        return bool(torch.equal(got, want))


def _block_bytes(tensors, block_dim) -> int:
    return sum(t.numel() // t.shape[block_dim] * t.element_size() for t in tensors)


class CopyFailed(RuntimeError):
    """A transfer of a benchmark case finished with ok=False."""


def time_transfers(submit, repeat: int, warmup: int):
    """Median wall seconds of submit()+wait, median device seconds, mechanisms used."""
    for _ in range(warmup):
        t = submit()
        t.wait()
        if not t.ok:
            raise CopyFailed(t.error)
    walls, devs, used = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        t = submit()
        t.wait()
        walls.append(time.perf_counter() - t0)
        if not t.ok:
            raise CopyFailed(t.error)
        devs.append(t.seconds or 0.0)
        used.append(t.mechanism)
    return statistics.median(walls), statistics.median(devs), used


def error_row(case: str, e: BaseException) -> dict:
    """The row of a case that failed: the suite goes on without it."""
    log.warning("bench gpu: %s failed: %s: %s", case, type(e).__name__, e)
    return row(SUITE, case, 0, 0.0, None, error=f"{type(e).__name__}: {e}"[:500])


def _batch_stats(copier) -> dict:
    return {k: v for k, v in copier.stats().items() if k.startswith("batch")}


def run_case(torch, case: Case, mechs, peak, repeat) -> list[dict]:
    """Store and load rows per mechanism; a failing mechanism or direction is an error row."""
    from ..gpu.copier import KVCopier
    rows = []
    for mech in mechs:
        try:
            copier = KVCopier(case.layout, mech)       # compiles the kernel before any timing
        except Exception as e:  # e.g. the kernel does not compile: the other mechanisms still run
            rows.append(error_row(f"store/load {case.name} {mech}", e))
            continue
        warm = 6 if mech == "auto" else 2          # auto: let every candidate be probed first
        for direction in ("store", "load"):
            name = f"{direction} {case.name} {mech}"
            try:
                fn = copier.store if direction == "store" else copier.load
                if direction == "store":
                    case.arena.fill_(0xA5)
                wall, dev_s, used = time_transfers(lambda: fn(case.ids, case.addrs), repeat, warm)
                ok = case.check_all(torch)
                p = (peak["d2h"] if direction == "store" else peak["h2d"]) if peak else None
                spans = len(case.layout.spans(case.ids, case.addrs, direction == "load"))
                rows.append(row(SUITE, name, case.nbytes, wall, p,
                                device_gbps=round(case.nbytes / dev_s / 1e9, 3) if dev_s else None,
                                blocks=len(case.ids), spans=spans, used=",".join(sorted(set(used))),
                                verified=ok, **_batch_stats(copier)))
            except Exception as e:
                rows.append(error_row(name, e))
    return rows


def run_both(torch, case: Case, mechs, peak, repeat) -> list[dict]:
    """Store half the blocks while loading the other half."""
    from ..gpu.copier import KVCopier
    rows = []
    half = len(case.ids) // 2
    if half == 0:
        return rows
    for mech in mechs:
        copier = KVCopier(case.layout, mech)
        submit = lambda: _Pair(copier.store(case.ids[:half], case.addrs[:half]),
                               copier.load(case.ids[half:2 * half], case.addrs[half:2 * half]))
        wall, _, used = time_transfers(submit, repeat, 6 if mech == "auto" else 2)
        nbytes = 2 * half * case.layout.block_bytes
        rows.append(row(SUITE, f"store+load {case.name} {mech}", nbytes, wall, peak and peak["bidir"],
                        blocks=2 * half, used=",".join(sorted(set(used))), **_batch_stats(copier)))
    return rows


class _Pair:
    """A store and a load in flight at once, waited on as one transfer."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.mechanism = f"{a.mechanism}+{b.mechanism}"
        self.seconds = None

    def wait(self, timeout=None) -> bool:
        return self.a.wait(timeout) and self.b.wait(timeout)

    @property
    def ok(self):
        return self.a.ok and self.b.ok

    @property
    def error(self):
        return self.a.error or self.b.error


def run_interference(torch, dev, case: Case, mechs, peak, n: int, rounds: int = 5) -> list[dict]:
    """Slowdown of bf16 matmuls on the compute stream while a mechanism copies next to them."""
    from ..gpu.copier import KVCopier
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    k = 20
    compute = torch.cuda.current_stream(dev)

    def matmuls():
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(compute)
        for _ in range(k):
            torch.mm(a, b)
        e1.record(compute)
        return e0, e1

    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize(dev)
    alone = []
    for _ in range(rounds):
        e0, e1 = matmuls()
        e1.synchronize()
        alone.append(e0.elapsed_time(e1) / 1e3)
    t_alone = statistics.median(alone)
    flops = 2 * n ** 3 * k
    rows = []
    idle = torch.cuda.Stream(dev)          # copies are not ordered after the matmuls here
    half = max(1, len(case.ids) // 2)
    for mech in mechs:
        copier = KVCopier(case.layout, mech, compute_stream=idle)
        for _ in range(4):
            copier.store(case.ids[:half], case.addrs[:half]).wait()
            copier.load(case.ids[half:], case.addrs[half:]).wait()
        withs, moved = [], 0
        for _ in range(rounds):
            stop = threading.Event()
            count = [0]

            def pump():
                while not stop.is_set():
                    s = copier.store(case.ids[:half], case.addrs[:half])
                    l = copier.load(case.ids[half:], case.addrs[half:])
                    s.wait(), l.wait()
                    count[0] += s.nbytes + l.nbytes
            th = threading.Thread(target=pump)
            th.start()
            time.sleep(0.02)                # copies in flight before the matmuls start
            e0, e1 = matmuls()
            e1.synchronize()
            stop.set()
            th.join()
            withs.append(e0.elapsed_time(e1) / 1e3)
            moved += count[0]
        t_with = statistics.median(withs)
        rows.append(row(SUITE, f"interference {case.name} {mech}", moved // rounds, t_with, peak["bidir"],
                        matmul_slowdown=round(t_with / t_alone, 3),
                        matmul_tflops_alone=round(flops / t_alone / 1e12, 1),
                        matmul_tflops_with=round(flops / t_with / 1e12, 1)))
    return rows


class Emitter:
    """Rows as they come: appended to the JSON file at once, kept for the table at the end."""

    def __init__(self, path: str | None):
        self.path = path
        self.rows: list[dict] = []

    def __call__(self, rows) -> None:
        rows = list(rows)
        self.rows += rows
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        for r in rows:
            print(f"{r['case']}: " + (f"error {r['error']}" if "error" in r else
                                      f"{r['gbps']} GB/s ratio {r['ratio']}"), flush=True)

    def case(self, name: str, fn) -> None:
        try:
            self(fn())
        except Exception as e:  # one failed case is a row, never the end of the suite
            self([error_row(name, e)])


def run(args) -> list[dict]:
    torch = _require_cuda()
    from ..gpu import cuda_copy
    from .gpu_vllm import pinned_arena, run_vllm_cases
    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    # the rows go to --json as each case ends; the command then only prints the table
    out, args.json = Emitter(args.json), None
    mechs = [m for m in args.mechanisms.split(",") if m]
    if not cuda_copy.available():
        mechs = ["torch"]                   # CuPy missing: only the reference can run
    tokens = [int(x) for x in args.tokens.split(",") if x]
    layouts = [x for x in args.layouts.split(",") if x]
    batch = args.batch_mib << 20
    gpu = {"gpu": torch.cuda.get_device_properties(dev).name}
    peak = None
    try:
        peak = measure_peak(torch, dev)
        out([dict(row(SUITE, "peak h2d 64MiB", PEAK_BYTES, PEAK_BYTES / peak["h2d"] / 1e9, peak["h2d"]), **gpu),
             dict(row(SUITE, "peak d2h 64MiB", PEAK_BYTES, PEAK_BYTES / peak["d2h"] / 1e9, peak["d2h"]), **gpu),
             dict(row(SUITE, "peak both 2x64MiB", 2 * PEAK_BYTES, 2 * PEAK_BYTES / peak["bidir"] / 1e9,
                      peak["bidir"]), **gpu)])
    except Exception as e:
        out([error_row("peak", e)])
    if args.vllm_steps:
        for mech in [m for m in mechs if m in ("auto", "torch")] or mechs[:1]:
            out.case(f"vllm {mech}", lambda: [dict(r, **gpu) for r in
                                               run_vllm_cases(torch, dev, peak, steps=args.vllm_steps,
                                                              mechanism=mech)])
    arena, keep, pin = pinned_arena(torch, batch + (64 << 20))
    try:
        for layout in layouts:
            for tok in tokens:
                name = f"{layout} {tok}tok"
                try:
                    case = Case(torch, dev, layout, tok, batch, arena, seed=tok)
                except Exception as e:
                    out([error_row(name, e)])
                    continue
                tag = lambda rows: [dict(r, **gpu) for r in rows]
                out.case(name, lambda c=case: tag(run_case(torch, c, mechs, peak, args.repeat)))
                if tok == max(tokens):
                    out.case(f"store+load {name}",
                             lambda c=case: tag(run_both(torch, c, mechs, peak, args.repeat)))
                if args.matmul and layout == layouts[0] and tok == max(tokens) and peak:
                    out.case(f"interference {name}",
                             lambda c=case: tag(run_interference(torch, dev, c, mechs, peak, args.matmul)))
                case = None                 # frees its engine tensors before the next case
                torch.cuda.empty_cache()
    finally:
        if pin is not None:
            pin.close()
    return out.rows
