"""The vLLM-shaped cases of `kvtier bench gpu`: what the connector's copies cost a serving step.

Engine KV in vLLM's FlashAttention layout, one tensor per layer of shape
``[2, num_blocks, block_size, kv_heads, head_dim]`` (Llama-3.1-8B: 32 layers,
8 KV heads, head_dim 128, bf16), a pinned host arena of block slots, and the
calls the connector's worker makes through :class:`~kvtier.gpu.copier.KVCopier`:

- decode with stores: each step runs the model's layers on the compute
  stream, then submits the stores of ``new_blocks`` full blocks (never
  waited for inside the step); the next step first orders the compute
  stream after them (``wait_on_stream``), as the worker does before pages
  can be reused.  Against the same steps with no connector: ``hold_up`` is
  the relative increase of the step time (target < 5%).
- prefill after a hit: a prefix of ``prefix_tokens`` is loaded from host
  slots with ``load_layers`` and each layer's compute waits only for its own
  layer (``wait_for_layer``); against the same step with the KV already
  resident, and against the time the prefix's bytes take at the pinned peak
  (target: no more than resident + 1.1 x that).  ``whole`` loads everything
  first and then computes, for the overlap that layer-wise waits buy.

A layer's compute is a stand-in of the same cost class: one matmul of the
step's tokens by a weight matrix with a Llama-3.1-8B layer's parameter count
(4096 x 53248, bf16).  The same code runs on CPU tensors with tiny shapes
(host transfer threads instead of streams): that is how CI exercises it.
"""
from __future__ import annotations

import mmap
import statistics
import time
from dataclasses import dataclass

import numpy as np

from .common import row
from .kv_layouts import LLAMA_3_1_8B, ModelShape, make_kv

SUITE = "gpu"


@dataclass(frozen=True)
class StepShape:
    """One serving step: the model's KV shape and how much work a layer does."""
    model: ModelShape = LLAMA_3_1_8B
    block_size: int = 16
    num_blocks: int = 1024
    hidden: int = 4096
    layer_width: int = 53248          # a Llama-3.1-8B layer's 218M parameters as one matrix
    decode_batch: int = 64
    prefill_tokens: int = 512
    new_blocks: int = 64
    prefix_tokens: int = 3000


TINY = StepShape(ModelShape(num_layers=4, num_kv_heads=2, head_dim=16), block_size=4, num_blocks=64,
                 hidden=64, layer_width=128, decode_batch=4, prefill_tokens=8, new_blocks=6,
                 prefix_tokens=40)


def pinned_arena(torch, nbytes: int):
    """A host buffer of exactly ``nbytes`` (mmap: no power-of-two rounding), registered with
    CUDA where there is a device and with kvtier's native range check.  Returns (uint8 tensor,
    keep-alive, PinnedRange or None)."""
    from ..gpu.pinning import pin_host_range
    from ..native import ranges
    m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=np.uint8)[:nbytes]
    a.fill(0)                                     # populate before pinning
    pin = pin_host_range(a.ctypes.data, nbytes) if nbytes else None
    reg = ranges.register(a, owner="benchmark host arena") if nbytes else None
    return torch.from_numpy(a), (m, a, reg), pin


class Engine:
    """vLLM-shaped KV tensors, a compute stand-in and a copier to a pinned host arena."""

    def __init__(self, torch, dev, shape: StepShape, mechanism: str = "auto", seed: int = 0):
        from ..gpu.copier import KVCopier
        from ..layout import BlockLayout
        self.torch, self.dev, self.shape = torch, dev, shape
        g = torch.Generator(device=dev).manual_seed(seed)
        self.kv, bd = make_kv("LBNHC", shape.num_blocks, shape.block_size, shape.model, device=dev, generator=g)
        assert bd == 1 and tuple(self.kv[0].shape) == (2, shape.num_blocks, shape.block_size,
                                                        shape.model.num_kv_heads, shape.model.head_dim)
        self.layout = BlockLayout(self.kv, bd)
        self.prefix_blocks = -(-shape.prefix_tokens // shape.block_size)
        self.num_slots = max(self.prefix_blocks, 2 * shape.new_blocks)
        self.arena, self._keep, self.pin = pinned_arena(torch, self.num_slots * self.layout.block_bytes)
        self.slots = np.uint64(self.arena.data_ptr()) + \
            np.arange(self.num_slots, dtype=np.uint64) * np.uint64(self.layout.block_bytes)
        dtype = getattr(torch, shape.model.dtype) if dev.type == "cuda" else torch.float32
        self.weight = torch.randn(shape.hidden, shape.layer_width, device=dev, dtype=dtype, generator=g) * 0.01
        self.x_decode = torch.randn(shape.decode_batch, shape.hidden, device=dev, dtype=dtype, generator=g)
        self.x_prefill = torch.randn(shape.prefill_tokens, shape.hidden, device=dev, dtype=dtype, generator=g)
        self.compute = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        self.copier = KVCopier(self.layout, mechanism, compute_stream=self.compute)
        rng = np.random.default_rng(seed)
        self.block_ids = rng.permutation(shape.num_blocks)

    def layer(self, x) -> None:
        self.torch.mm(x, self.weight)

    def finish(self) -> None:
        """Wait for the compute stream only (the copy streams may still run)."""
        if self.compute is not None:
            self.compute.synchronize()

    def close(self) -> None:
        self.copier.flush()
        if self.pin is not None:
            self.pin.close()


def _median_seconds(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_with_stores(e: Engine, steps: int) -> tuple[float, float, bool]:
    """Seconds per decode step without and with the connector's stores; whether all stores worked."""
    L = e.shape.model.num_layers
    n = e.shape.new_blocks
    state = {"prev": None, "step": 0, "ok": True}

    def plain():
        for _ in range(steps):
            for _ in range(L):
                e.layer(e.x_decode)
        e.finish()

    def with_stores():
        for _ in range(steps):
            prev = state["prev"]
            if prev is not None:
                prev.wait_on_stream(e.compute)     # pages the stores read may be reused now
            for _ in range(L):
                e.layer(e.x_decode)
            k = state["step"] % 2
            ids = e.block_ids[(state["step"] * n) % (e.shape.num_blocks - n):][:n]
            state["prev"] = e.copier.store(ids, e.slots[k * n:(k + 1) * n])
            state["step"] += 1
        e.finish()
        if not e.copier.flush(60):
            state["ok"] = False
        state["ok"] &= bool(state["prev"].ok)

    base = _median_seconds(plain, 5) / steps
    with_ = _median_seconds(with_stores, 5) / steps
    return base, with_, state["ok"]


def prefill_after_hit(e: Engine, repeat: int) -> dict:
    """Seconds of a prefill step that first loads the prefix: resident, layer-wise, whole-then-compute."""
    L = e.shape.model.num_layers
    ids = e.block_ids[:e.prefix_blocks]
    slots = e.slots[:e.prefix_blocks]
    assert e.copier.store(ids, slots).wait(60)
    ok = [True]

    def resident():
        for _ in range(L):
            e.layer(e.x_prefill)
        e.finish()

    def layerwise():
        lw = e.copier.load_layers(ids, slots)
        for i in range(L):
            ok[0] &= lw.wait_for_layer(i, e.compute)
            e.layer(e.x_prefill)
        e.finish()
        ok[0] &= bool(lw.wait(60) and lw.ok)

    def whole():
        t = e.copier.load(ids, slots)
        t.wait_on_stream(e.compute)
        for _ in range(L):
            e.layer(e.x_prefill)
        e.finish()
        ok[0] &= bool(t.wait(60) and t.ok)

    out = {"resident": _median_seconds(resident, repeat), "layerwise": _median_seconds(layerwise, repeat),
           "whole": _median_seconds(whole, repeat)}
    out["ok"] = ok[0]
    out["nbytes"] = int(ids.size) * e.layout.block_bytes
    return out


def _slot_bytes(e: Engine, n: int):
    return e.arena[:n * e.layout.block_bytes].view(n, e.layout.block_bytes)


def verify_store(e: Engine) -> bool:
    """One store of fresh block ids, compared with the torch reference."""
    from ..gpu import torch_ref
    n = e.shape.new_blocks
    ids = e.block_ids[-n:]
    e.arena[:n * e.layout.block_bytes].fill_(0xA5)
    t = e.copier.store(ids, e.slots[:n])
    if not (t.wait(60) and t.ok):
        return False
    want = torch_ref.gather_blocks(e.kv, 1, ids).cpu()
    return bool(e.torch.equal(_slot_bytes(e, n), want))


def verify_layerwise_load(e: Engine) -> bool:
    """Poisoned engine pages, a layer-wise load, every page compared with its slot."""
    from ..gpu import torch_ref
    n = e.prefix_blocks
    ids = e.block_ids[:n]
    idx = e.torch.as_tensor(ids, device=e.dev)
    for t in e.kv:
        t.index_fill_(1, idx, 0)
    lw = e.copier.load_layers(ids, e.slots[:n])
    for i in range(e.shape.model.num_layers):
        lw.wait_for_layer(i, e.compute)
    e.finish()
    if not (lw.wait(60) and lw.ok):
        return False
    return bool(e.torch.equal(torch_ref.gather_blocks(e.kv, 1, ids).cpu(), _slot_bytes(e, n)))


def run_vllm_cases(torch, dev, peak: dict | None, shape: StepShape = StepShape(), steps: int = 20,
                   repeat: int = 5, mechanism: str = "auto") -> list[dict]:
    """The rows of both cases (peak: pinned GB/s per direction, or None).  Their ``gbps`` is bytes
    over step time, not a bandwidth: the figures are ``hold_up`` and ``within_budget``/``hidden``."""
    e = Engine(torch, dev, shape, mechanism)
    try:
        rows = []
        base, with_, ok = decode_with_stores(e, steps)
        nbytes = shape.new_blocks * e.layout.block_bytes
        rows.append(row(SUITE, f"vllm decode +{shape.new_blocks} stores {mechanism}", nbytes, with_,
                        None, step_s=round(with_, 6), no_connector_step_s=round(base, 6),
                        hold_up=round(with_ / base - 1, 4), verified=ok and verify_store(e)))
        p = prefill_after_hit(e, repeat)
        at_peak = p["nbytes"] / (peak["h2d"] * 1e9) if peak else None
        budget = p["resident"] + 1.1 * at_peak if at_peak else None
        rows.append(row(SUITE, f"vllm prefill {shape.prefix_tokens}tok hit layerwise {mechanism}",
                        p["nbytes"], p["layerwise"], None,
                        resident_s=round(p["resident"], 6), whole_then_compute_s=round(p["whole"], 6),
                        copy_at_peak_s=round(at_peak, 6) if at_peak else None,
                        within_budget=(p["layerwise"] <= budget) if budget else None,
                        hidden=round(1 - (p["layerwise"] - p["resident"]) / at_peak, 3) if at_peak else None,
                        verified=p["ok"] and verify_layerwise_load(e)))
        for r in rows:
            r.update({k: v for k, v in e.copier.stats().items() if k.startswith("batch")})
        return rows
    finally:
        e.close()
