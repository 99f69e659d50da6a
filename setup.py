"""Builds the compiled modules.  Metadata lives in pyproject.toml.

The compiled modules are required: without Cython and a C compiler the
install fails with a clear message instead of falling back to slow code.

    FASTSIP_DEBUG_BUILD=1       -O0 -g, bounds checks, line tracing
    FASTSIP_CYTHON_ANNOTATE=1   write fastsip/*.html (cython -a)
"""
import os
import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - only on a broken build environment
    sys.exit("fastsip: building needs Cython >= 3.0 (pip install cython) and a C compiler")

MODULES = ("parser", "store", "auth", "registrar", "io")
DEBUG = bool(os.environ.get("FASTSIP_DEBUG_BUILD"))
directives = {
    "language_level": 3,
    "embedsignature": True,
    "cdivision": True,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "linetrace": DEBUG,
}
exts = [
    Extension(
        f"fastsip._{m}_c",
        [f"fastsip/_{m}_c.pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        define_macros=[("CYTHON_TRACE_NOGIL", 1)] if DEBUG else [],
    )
    for m in MODULES
]
# the load tool (top-level package load/): the engine (batched send/receive/match)
# and the C-speed echo responder
LOAD_MODULES = ("stats", "scan", "window", "tcp", "send", "loadio", "echo")
exts += [
    Extension(f"load._{m}_c", [f"load/_{m}_c.pyx"],
              extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"])
    for m in LOAD_MODULES
]
setup(
    ext_modules=cythonize(
        exts,
        compiler_directives=directives,
        annotate=bool(os.environ.get("FASTSIP_CYTHON_ANNOTATE")),
    )
)
