"""The README's embedding example runs as written (with a temporary disk path)."""
from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"


def test_embedding_example_runs(tmp_path):
    pytest.importorskip("lmdb")
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "PagedKVCache.create" in b)
    code = example.replace("/var/tmp/kvtier", str(tmp_path / "kv"))
    code = code.replace("torch.zeros(", "torch.randn(")      # real data, so the check below can fail
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["n"] == 20
    kv = scope["kv"]
    for t in kv:
        assert t[40:60].equal(t[0:20]) and not t[40:60].equal(t[20:40])
