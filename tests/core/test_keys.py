"""Keys are deterministic across processes, namespaced, and validated."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kvtier import KEY_BYTES, ConfigError, Namespace, chain_keys, salt_hashes

NS = Namespace(model="m", block_tokens=4, dtype="bfloat16")


def test_chain_one_key_per_full_block_and_prefix_property():
    toks = list(range(10))
    keys = chain_keys(NS, toks)
    assert len(keys) == 2 and all(len(k) == KEY_BYTES for k in keys)
    assert chain_keys(NS, toks[:8]) == keys
    assert chain_keys(NS, toks[:4] + [99, 5, 6, 7])[0] == keys[0]
    assert chain_keys(NS, toks[:4] + [99, 5, 6, 7])[1] != keys[1]
    assert chain_keys(NS, toks[4:8], parent=keys[0]) == keys[1:]


def test_same_tokens_same_key_in_another_process():
    code = ("from kvtier import Namespace, chain_keys;"
            "print(chain_keys(Namespace(model='m', block_tokens=4, dtype='bfloat16'), range(12))[-1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == chain_keys(NS, range(12))[-1].hex()


@pytest.mark.parametrize("field,value", [("model", "other"), ("dtype", "float16"), ("tp_rank", 1),
                                         ("tenant", "t2"), ("page_shape", (2, 16)), ("revision", "r2"),
                                         ("format_version", 2), ("layout", "LBHNC")])
def test_every_namespace_field_changes_keys(field, value):
    kw = dict(model="m", block_tokens=4, dtype="bfloat16", tp_size=2)
    other = Namespace(**{**kw, field: value})
    assert chain_keys(Namespace(**kw), range(4)) != chain_keys(other, range(4))
    assert salt_hashes(Namespace(**kw), [b"h"]) != salt_hashes(other, [b"h"])


def test_numpy_and_list_tokens_agree():
    assert chain_keys(NS, np.arange(8, dtype=np.int64)) == chain_keys(NS, list(range(8)))


@pytest.mark.parametrize("bad", [[1.5, 2.0, 3.0, 4.0], [[1, 2], [3, 4]], [-1, 0, 0, 0], ["a", "b", "c", "d"], [2**33] * 4])
def test_bad_tokens_rejected(bad):
    with pytest.raises(ConfigError, match="token_ids"):
        chain_keys(NS, bad)


def test_bad_namespace_and_hashes_rejected():
    with pytest.raises(ConfigError, match="block_tokens"):
        Namespace(model="m", block_tokens=0)
    with pytest.raises(ConfigError, match="tp_rank"):
        Namespace(model="m", block_tokens=4, tp_rank=2, tp_size=2)
    with pytest.raises(ConfigError, match="model"):
        Namespace(model="", block_tokens=4)
    with pytest.raises(ConfigError, match=r"hashes\[1\]"):
        salt_hashes(NS, [b"ok", 5])
    with pytest.raises(ConfigError, match="parent"):
        chain_keys(NS, range(4), parent=b"short")
