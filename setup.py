"""Build kvtier's native core (csrc/*.c) as the extension kvtier._kvtier_native.

Package metadata lives in pyproject.toml; this file only describes the C
extension. It is built with the system C compiler and no torch or CUDA headers.
No instruction-set flag is global: CRC32C picks SSE4.2 or ARMv8 CRC at run time,
so one binary runs on any CPU of its architecture. When no compiler is found the
build is skipped with a warning and kvtier runs on its Python reference ops
(kvtier/_reference.py).
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE_SOURCES = sorted(glob.glob(os.path.join("csrc", "*.c")))
NATIVE_HEADERS = sorted(glob.glob(os.path.join("csrc", "*.h")))


class OptionalBuildExt(build_ext):
    """Build the extension if possible; otherwise warn and install without it."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing or broken: distutils raises many kinds
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        sys.stderr.write(
            "WARNING: kvtier's native extension was not built "
            f"({type(exc).__name__}: {exc}).\n"
            "kvtier will use its slower pure-Python reference ops. Install a C "
            "compiler (gcc) and the Python headers, then run `pip install -e .` "
            "again to build it.\n"
        )


native = Extension(
    "kvtier._kvtier_native",
    sources=NATIVE_SOURCES,
    depends=NATIVE_HEADERS,
    include_dirs=["csrc"],
    extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fvisibility=hidden", "-Wall"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[native], cmdclass={"build_ext": OptionalBuildExt})
