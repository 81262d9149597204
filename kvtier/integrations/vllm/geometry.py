"""What a block is for one vLLM engine: its groups, its bytes, its namespace.

The scheduler and the workers run in different processes and both need the
same answer before any KV exists, so everything here is derived from the
``VllmConfig`` and the ``KVCacheConfig`` alone.  The worker later checks the
real KV tensors against it (:meth:`EngineGeometry.check_group`) and refuses to
start when they disagree, so bytes are never copied under a wrong layout.

One kvtier block is one block position of the prompt.  Its slot holds, for
every tensor-parallel rank in turn, the pages of every KV cache group at that
position::

    slot = [ rank 0: group 0 layers | group 1 layers | ... ][ rank 1: ... ] ...

so the scheduler decides once per block for all ranks, and each rank's worker
copies its own slice at ``rank * rank_bytes``.  Full-attention and
sliding-window groups (vLLM's hybrid KV cache manager) share the block
positions; a sliding-window group's page is copied only where vLLM holds one
(inside the window), everywhere else the slot keeps what was stored.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...keys import Namespace
from .options import PREFIX, ConnectorOptions

FULL = "full"
SLIDING = "sliding"


@dataclass(frozen=True)
class GroupGeometry:
    """One KV cache group: its layers and the bytes each contributes to a block."""

    index: int                    # vLLM's group id (position in kv_cache_groups)
    kind: str                     # FULL or SLIDING
    layer_names: tuple[str, ...]
    page_bytes: int               # one layer's page, one rank, without vLLM's padding
    page_shape: tuple[int, ...]
    dtype: str
    window: int = 0               # tokens, SLIDING only
    quant: str = "none"

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def nbytes(self) -> int:
        return self.page_bytes * self.num_layers

    @property
    def label(self) -> str:
        w = f":w{self.window}" if self.kind == SLIDING else ""
        return f"{self.kind}{w}x{self.num_layers}:{'x'.join(map(str, self.page_shape))}:{self.dtype}:{self.quant}"


@dataclass(frozen=True)
class EngineGeometry:
    namespace: Namespace
    block_tokens: int
    groups: tuple[GroupGeometry, ...]
    tp_size: int = 1

    @property
    def rank_bytes(self) -> int:
        """One rank's slice of a block: every group's pages, group after group."""
        return sum(g.nbytes for g in self.groups)

    @property
    def block_bytes(self) -> int:
        return self.rank_bytes * self.tp_size

    @property
    def hybrid(self) -> bool:
        return len(self.groups) > 1

    def group_offset(self, i: int) -> int:
        """Where group ``i``'s pages start inside one rank's slice."""
        return sum(g.nbytes for g in self.groups[:i])

    def check_group(self, i: int, layout) -> None:
        """Raise ConfigError unless a worker's real tensors for group ``i`` match this geometry."""
        g = self.groups[i]
        where = f"kv_caches[group {g.index}]"
        if layout.num_layers != g.num_layers:
            raise ConfigError(where, f"{layout.num_layers} layers",
                              f"{g.num_layers} layers, as the KV cache config says")
        for j, pb in enumerate(layout.page_bytes):
            if pb != g.page_bytes:
                raise ConfigError(f"{where}[{j}].page_bytes", pb,
                                  f"{g.page_bytes} bytes, the page the namespace was built for")
        for j, t in enumerate(layout.tensors):
            shape = tuple(int(d) for k, d in enumerate(t.shape) if k != layout.block_dim)
            if _prod(shape) != _prod(g.page_shape):
                raise ConfigError(f"{where}[{j}].shape", tuple(t.shape),
                                  f"pages of shape {g.page_shape} (the namespace's page shape)")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != g.dtype:
                raise ConfigError(f"{where}[{j}].dtype", dtype, f"{g.dtype}, the namespace's dtype")


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def _group(index: int, group, block_size: int) -> GroupGeometry:
    """A supported group's geometry; ConfigError naming the group's spec otherwise."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    spec = group.kv_cache_spec
    kind_name = type(spec).__name__
    full = {FullAttentionSpec} | {c for c in _subclasses(FullAttentionSpec) if c.__name__ == "MLAAttentionSpec"}
    sliding = {SlidingWindowSpec} | {c for c in _subclasses(SlidingWindowSpec)
                                     if c.__name__ == "SlidingWindowMLASpec"}
    if type(spec) in full:
        kind, window = FULL, 0
    elif type(spec) in sliding:
        kind, window = SLIDING, int(spec.sliding_window) + int(getattr(spec, "extra_retained_tokens", 0) or 0)
    else:
        raise ConfigError(f"kv_cache_groups[{index}].kv_cache_spec", kind_name,
                          "full attention or sliding-window attention: kvtier cannot yet restore "
                          f"{kind_name} state exactly, so it refuses the model rather than risk wrong output")
    if int(spec.block_size) != block_size:
        raise ConfigError(f"kv_cache_groups[{index}].block_size", int(spec.block_size),
                          f"{block_size}, the block size of group 0 (kvtier keys every group by one block hash)")
    head_v = spec.head_size_v if getattr(spec, "head_size_v", None) is not None else spec.head_size
    num_heads = getattr(spec, "num_kv_heads", 1)
    page_shape = (int(num_heads), int(spec.block_size), int(spec.head_size) + int(head_v))
    dtype = str(spec.dtype).removeprefix("torch.")
    quant = str(getattr(spec, "kv_quant_mode", "none"))
    return GroupGeometry(index=index, kind=kind, layer_names=tuple(group.layer_names),
                         page_bytes=int(getattr(spec, "real_page_size_bytes", spec.page_size_bytes)),
                         page_shape=page_shape,
                         dtype=dtype, window=window, quant=quant)


def _subclasses(cls) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def engine_geometry(vllm_config, kv_cache_config, opts: ConnectorOptions) -> EngineGeometry:
    """The block geometry and namespace of this engine; ConfigError if kvtier cannot serve it."""
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise ConfigError("pipeline_parallel_size", parallel.pipeline_parallel_size,
                          "1: the kvtier connector does not support pipeline parallelism yet "
                          "(tensor parallelism is supported)")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        n = int(getattr(parallel, name, 1) or 1)
        if n != 1:
            raise ConfigError(name, n, "1: kvtier stores whole blocks per tensor-parallel rank")
    cache_config = vllm_config.cache_config
    if not cache_config.enable_prefix_caching:
        raise ConfigError("enable_prefix_caching", False,
                          "True: kvtier keys blocks by vLLM's prefix-cache block hashes")
    policy = vllm_config.kv_transfer_config.kv_load_failure_policy
    if policy != "recompute":
        raise ConfigError("kv_transfer_config.kv_load_failure_policy", policy,
                          "'recompute', so a block that fails to load (corrupt, lost, timed out) "
                          "is recomputed instead of failing the request")
    all_groups = kv_cache_config.kv_cache_groups
    if not all_groups:
        raise ConfigError("kv_cache_groups", 0, "at least one KV cache group")
    indices = [i for i, g in enumerate(all_groups) if getattr(g, "enable_kv_transfer", True)]
    block_size = int(getattr(all_groups[indices[0]].kv_cache_spec, "block_size", 0))
    groups = tuple(_group(i, all_groups[i], block_size) for i in indices)
    hash_block = kv_cache_config.hash_block_size or block_size
    if hash_block != block_size:
        raise ConfigError("hash_block_size", hash_block, f"{block_size}, the KV block size")
    if len(groups) > 1 and opts.load_mode == "sync":
        raise ConfigError(f"{PREFIX}.load_mode", opts.load_mode,
                          "'auto' or 'async' for a model with several KV cache groups: vLLM recomputes a failed "
                          "load of such a model only per request, which only asynchronous loads report")
    kv_layout = kv_cache_config.kv_cache_layout or cache_config.kv_cache_layout or "default"
    backend = getattr(vllm_config.attention_config, "backend", None)
    backend_name = getattr(backend, "name", None) or (str(backend) if backend else "auto")
    group_layout = "+".join(g.label for g in groups)
    layout = "/".join(["vllm", current_platform.device_type, backend_name, str(kv_layout),
                       str(cache_config.prefix_caching_hash_algo), str(cache_config.cache_dtype),
                       group_layout])
    model = vllm_config.model_config
    tp = int(parallel.tensor_parallel_size)
    ns = Namespace(
        model=str(model.model),
        revision=opts.revision or str(model.revision or ""),
        block_tokens=block_size,
        dtype=groups[0].dtype,
        layout=layout,
        page_shape=groups[0].page_shape,
        tp_rank=0,                  # one slot holds every rank's slice
        tp_size=tp,
        tenant=opts.tenant,
    )
    return EngineGeometry(namespace=ns, block_tokens=block_size, groups=groups, tp_size=tp)


__all__ = ["EngineGeometry", "GroupGeometry", "engine_geometry", "FULL", "SLIDING", "PREFIX"]
