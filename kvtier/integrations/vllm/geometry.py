"""What a block is for one vLLM engine: its bytes, its namespace, its checks.

The scheduler and the workers run in different processes and both need the
same answer before any KV exists, so everything here is derived from the
``VllmConfig`` and the ``KVCacheConfig`` alone.  The worker later checks the
real KV tensors against it (:meth:`EngineGeometry.check_layout`) and refuses to
start when they disagree, so bytes are never copied under a wrong layout.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...keys import Namespace
from .options import PREFIX, ConnectorOptions


@dataclass(frozen=True)
class EngineGeometry:
    namespace: Namespace
    block_tokens: int
    num_layers: int
    page_bytes: int
    layer_names: tuple[str, ...]

    @property
    def block_bytes(self) -> int:
        return self.page_bytes * self.num_layers

    def check_layout(self, layout) -> None:
        """Raise ConfigError unless the worker's real tensors match this geometry."""
        if layout.num_layers != self.num_layers:
            raise ConfigError("kv_caches", f"{layout.num_layers} layers",
                              f"{self.num_layers} layers, as the KV cache config says")
        for i, pb in enumerate(layout.page_bytes):
            if pb != self.page_bytes:
                raise ConfigError(f"kv_caches[{i}].page_bytes", pb,
                                  f"{self.page_bytes} bytes, the page the namespace was built for")
        for i, t in enumerate(layout.tensors):
            shape = tuple(int(d) for j, d in enumerate(t.shape) if j != layout.block_dim)
            if _prod(shape) != _prod(self.namespace.page_shape):
                raise ConfigError(f"kv_caches[{i}].shape", tuple(t.shape),
                                  f"pages of shape {self.namespace.page_shape} (the namespace's page shape)")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != self.namespace.dtype:
                raise ConfigError(f"kv_caches[{i}].dtype", dtype, f"{self.namespace.dtype}, the namespace's dtype")


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def engine_geometry(vllm_config, kv_cache_config, opts: ConnectorOptions) -> EngineGeometry:
    """The block geometry and namespace of this engine; ConfigError if kvtier cannot serve it."""
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import AttentionSpec

    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise ConfigError("pipeline_parallel_size", parallel.pipeline_parallel_size,
                          "1: the kvtier connector does not support pipeline parallelism")
    if parallel.tensor_parallel_size != 1:
        raise ConfigError("tensor_parallel_size", parallel.tensor_parallel_size,
                          "1: the kvtier connector keeps one rank's KV per engine")
    cache_config = vllm_config.cache_config
    if not cache_config.enable_prefix_caching:
        raise ConfigError("enable_prefix_caching", False,
                          "True: kvtier keys blocks by vLLM's prefix-cache block hashes")
    policy = vllm_config.kv_transfer_config.kv_load_failure_policy
    if policy != "recompute":
        raise ConfigError("kv_transfer_config.kv_load_failure_policy", policy,
                          "'recompute', so a block that fails to load (corrupt, lost, timed out) "
                          "is recomputed instead of failing the request")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError("kv_cache_groups", len(groups),
                          "1: models with several KV cache groups (hybrid, sliding window) are not supported")
    spec = groups[0].kv_cache_spec
    if not isinstance(spec, AttentionSpec):
        raise ConfigError("kv_cache_spec", type(spec).__name__, "an attention KV cache spec")
    hash_block = kv_cache_config.hash_block_size or spec.block_size
    if hash_block != spec.block_size:
        raise ConfigError("hash_block_size", hash_block, f"{spec.block_size}, the KV block size")
    dtype = str(spec.dtype).removeprefix("torch.")
    head_v = spec.head_size_v if spec.head_size_v is not None else spec.head_size
    page_shape = (spec.num_kv_heads, spec.block_size, spec.head_size + head_v)
    kv_layout = kv_cache_config.kv_cache_layout or cache_config.kv_cache_layout or "default"
    backend = getattr(vllm_config.attention_config, "backend", None)
    backend_name = getattr(backend, "name", None) or (str(backend) if backend else "auto")
    layout = "/".join(["vllm", current_platform.device_type, backend_name, str(kv_layout),
                       str(cache_config.prefix_caching_hash_algo), str(cache_config.cache_dtype),
                       str(getattr(spec, "kv_quant_mode", "none"))])
    model = vllm_config.model_config
    ns = Namespace(
        model=str(model.model),
        revision=opts.revision or str(model.revision or ""),
        block_tokens=int(spec.block_size),
        dtype=dtype,
        layout=layout,
        page_shape=page_shape,
        tp_rank=0,
        tp_size=int(parallel.tensor_parallel_size),
        tenant=opts.tenant,
    )
    return EngineGeometry(namespace=ns, block_tokens=int(spec.block_size),
                          num_layers=len(groups[0].layer_names), page_bytes=int(spec.page_size_bytes),
                          layer_names=tuple(groups[0].layer_names))


__all__ = ["EngineGeometry", "engine_geometry", "PREFIX"]
