"""Run engine_run.py in a subprocess and read its results (shared by tests and bench)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def engine_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / f"kvtier-vllm-cache-{os.getuid()}"))
    # The CPU backend reserves one more core when a connector is configured; fix
    # the count so runs with and without kvtier get the same cores.
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.update(extra or {})
    return env


def run_engine(spec: dict, workdir: Path, name: str, timeout: float = 420, env: dict | None = None) -> dict:
    """Run one engine scenario; returns engine_run.py's JSON. Raises with the log tail on failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=engine_env(env), timeout=timeout)
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"engine run {name!r} exited {proc.returncode}:\n{tail}")
    return json.loads(out_path.read_text())


def start_failure(spec: dict, workdir: Path, name: str, timeout: float = 300) -> str:
    """Run a scenario that must fail at start-up; returns its log."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=engine_env(), timeout=timeout)
    text = log_path.read_text()
    if proc.returncode == 0:
        raise AssertionError(f"engine run {name!r} started although it should not have:\n{text[-2000:]}")
    return text
