"""Builds the compiled modules.  Metadata lives in pyproject.toml.

The compiled modules are required: without Cython and a C compiler the
install fails with a clear message instead of falling back to slow code.

    FASTSIP_DEBUG_BUILD=1       -O0 -g, bounds checks, line tracing
    FASTSIP_CYTHON_ANNOTATE=1   write the .html annotation next to each .pyx (cython -a)
"""
import os
import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - only on a broken build environment
    sys.exit("fastsip: building needs Cython >= 3.0 (pip install cython) and a C compiler")

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


def ext(name, libraries=()):
    """The extension module ``name`` (dotted), built from ``name``'s .pyx."""
    return Extension(
        name,
        [name.replace(".", "/") + ".pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        define_macros=[("CYTHON_TRACE_NOGIL", 1)] if DEBUG else [],
        libraries=list(libraries),
    )


exts = [
    # the pure layer: one module assembled from fastsip/core/*.pyx (see _core.pyx);
    # the digest check hashes with OpenSSL's libcrypto (headers: libssl-dev)
    ext("fastsip.core._core", libraries=["crypto"]),
    # the server's batched datagram I/O (cimports fastsip/server/handoff.pxd)
    ext("fastsip.server._io_c"),
    # Redis: key slots and the compare-and-set command of a write (--cluster)
    ext("fastsip.cluster._resp_c"),
]
# the load tool (top-level package load/): the engine (batched send/receive/match),
# its parts, and the C-speed echo responder
LOAD_MODULES = ("stats", "scan", "window", "ws", "tcp", "send", "loadio", "echo")
exts += [ext(f"load._{m}_c") for m in LOAD_MODULES]
setup(
    ext_modules=cythonize(
        exts,
        compiler_directives=directives,
        annotate=bool(os.environ.get("FASTSIP_CYTHON_ANNOTATE")),
    )
)
