"""A wheel built from this tree installs into a fresh virtualenv and imports every module, kernel source included."""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT

IMPORT_ALL = r"""
import importlib, importlib.resources, pkgutil, sys
import kvtier
assert kvtier.__file__.startswith(sys.prefix), (kvtier.__file__, sys.prefix)
skip = ("kvtier.__main__",) + (() if importlib.util.find_spec("vllm") else ("kvtier.integrations.vllm",))
names = [m.name for m in pkgutil.walk_packages(kvtier.__path__, "kvtier.") if not m.name.startswith(skip)]
for name in names:
    importlib.import_module(name)
from kvtier.gpu import cuda_copy
kernel = importlib.resources.files("kvtier.gpu").joinpath("kv_copy.cu")
assert kernel.is_file() and cuda_copy.SOURCE.is_file(), cuda_copy.SOURCE
assert "kvtier_copy_chunks" in kernel.read_text()
# the kernel the copier compiles is the installed one, not a source tree's
assert str(cuda_copy.SOURCE).startswith(sys.prefix), (cuda_copy.SOURCE, sys.prefix)
assert cuda_copy.SOURCE.read_text() == kernel.read_text()
from kvtier import native
print("imported", len(names), "modules; native", native.NATIVE)
"""


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_with_its_kernel(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("kvtier-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the new venv sees this one's dependencies (torch, numpy, ...) after its own site-packages;
    # a path in a .pth file is not itself scanned for .pth files, so this tree's editable
    # install stays invisible and kvtier can only come from the wheel
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site) / "deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                              "--target", site, str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    run = subprocess.run([str(py), "-c", IMPORT_ALL], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "imported" in run.stdout and "native True" in run.stdout, run.stdout
