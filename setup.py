"""Build kvtier's native core (csrc/*.c) as the extension kvtier.native._kvtier_native.

Package metadata lives in pyproject.toml; this file only describes the C
extension. It is built with the system C compiler and no torch or CUDA headers.
No instruction-set flag is global: CRC32C picks SSE4.2 or ARMv8 CRC at run time,
so one binary runs on any CPU of its architecture. When no compiler is found the
build is skipped with a warning and kvtier runs on its Python reference ops
(kvtier/native/numpy_ref.py).
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

    def initialize_options(self):
        super().initialize_options()
        self.failed = set()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing or broken: distutils raises many kinds
            self.failed.add(ext.name)
            sys.stderr.write(
                f"WARNING: kvtier's native extension {ext.name} was not built "
                f"({type(exc).__name__}: {exc}).\n"
                "kvtier will run on its slower pure-Python reference ops. Install a C "
                "compiler (gcc) and the Python headers, then run `pip install -e .` "
                "again to build it.\n"
            )

    def _built(self):
        return [ext for ext in self.extensions if ext.name not in self.failed]

    # Leave extensions that failed out of what gets copied and packaged.
    def copy_extensions_to_source(self):
        self.extensions = self._built()
        super().copy_extensions_to_source()

    def get_outputs(self):
        return [self.get_ext_fullpath(ext.name) for ext in self._built()]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        missing = {os.path.abspath(self.get_ext_fullpath(name)) for name in self.failed}
        return {dst: src for dst, src in mapping.items()
                if os.path.abspath(src) not in missing}


native = Extension(
    "kvtier.native._kvtier_native",
    sources=NATIVE_SOURCES,
    depends=NATIVE_HEADERS,
    include_dirs=["csrc"],
    extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fvisibility=hidden", "-Wall"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[native], cmdclass={"build_ext": OptionalBuildExt})
