"""Random-weight checkpoints built locally for the vLLM tests and benchmark.

Nothing is downloaded: `build_llama` instantiates a `LlamaForCausalLM` (and
`build_hybrid` a `Gemma3ForCausalLM` whose layers alternate sliding-window and
full attention) from a config with a fixed seed and `save_pretrained`s it. Checkpoints are cached in
`root` under a name derived from their config, so every test process (and every
engine subprocess) reuses one directory. No tokenizer is written: engines run
with `skip_tokenizer_init=True` and token-id prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

#: The test model: small enough to start an engine in seconds on one core.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=4096,
)

#: The benchmark model: prefill of a few thousand tokens costs seconds on a CPU.
BENCH = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=8192,
    max_position_embeddings=8192,
)


def default_root() -> Path:
    """Where checkpoints are cached: $KVTIER_MODEL_CACHE or a per-user tmp dir."""
    env = os.environ.get("KVTIER_MODEL_CACHE")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"kvtier-models-{os.getuid()}"


#: The hybrid test model: layers alternate sliding-window (64 tokens) and full attention.
HYBRID = dict(TINY, num_hidden_layers=4, sliding_window=64,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


def build_llama(root: Path | None = None, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """Return the directory of a random-weight Llama checkpoint, building it once.

    `overrides` replace fields of TINY (pass **BENCH for the benchmark model).
    """
    return _build("llama", TINY, root, dtype, seed, overrides)


def build_hybrid(root: Path | None = None, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """A random-weight Gemma-3-style checkpoint (sliding-window + full attention), built once."""
    return _build("gemma3", HYBRID, root, dtype, seed, overrides)


def _config(arch: str, fields: dict, dtype: str):
    common = dict(rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaConfig(**fields, **common), LlamaForCausalLM
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3TextConfig(**fields, **common, query_pre_attn_scalar=fields["head_dim"]), Gemma3ForCausalLM


def _build(arch: str, base: dict, root, dtype: str, seed: int, overrides: dict) -> Path:
    spec = dict(base)
    spec.update(overrides)
    spec.update(dtype=dtype, seed=seed)
    key = spec if arch == "llama" else dict(spec, arch=arch)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root) if root is not None else default_root()
    path = root / f"{arch}-{digest}"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path

    import torch

    fields = {k: v for k, v in spec.items() if k not in ("dtype", "seed")}
    config, model_cls = _config(arch, fields, dtype)
    torch.manual_seed(seed)
    model = model_cls(config).to(getattr(torch, dtype))
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=root))
    model.save_pretrained(staging, safe_serialization=True)
    try:
        staging.rename(path)
    except OSError:
        # Another process finished the same checkpoint first; theirs is identical.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return path
