"""C ABI of fastnorm: ``libfastnorm.so`` + ``capi/include/fastnorm.h`` (see ``docs/c-api.md``).

The shared library embeds CPython through cffi's embedding mode and calls the
kernels of :mod:`fastnorm._kernels` compiled as Numba cfuncs (module
:mod:`fastnorm.capi._cfuncs`), so C and Python run the same machine code.

Command line (``python -m fastnorm.capi --help``)::

    python -m fastnorm.capi build [--out DIR]   # libfastnorm.so, include/fastnorm.h, fastnorm.pc
    python -m fastnorm.capi --warm              # compile the cfuncs into Numba's cache
    python -m fastnorm.capi --cflags            # -I... for a C compiler
    python -m fastnorm.capi --libs              # -L... -lfastnorm for the linker

Importing this package is cheap: it neither imports cffi nor compiles anything.
"""

from __future__ import annotations

from .build import LIBRARY_NAME, build, cflags, default_build_dir, libs, source_dir

__all__ = ["LIBRARY_NAME", "build", "cflags", "default_build_dir", "libs", "source_dir", "warm"]


def warm():
    """Compile every cfunc of the C ABI into Numba's cache (or check that it is there).

    Run it once after installing or after changing the kernels, so that the
    first C call of every later process only loads machine code.

    Returns
    -------
    dict
        ``{"seconds": float, "cached": int, "compiled": int, "layer": str, "max_threads": int}``.
    """
    import time

    start = time.perf_counter()
    from ._cfuncs import build_cfuncs, threading_addresses

    cfuncs = build_cfuncs()
    _, _, max_threads, layer = threading_addresses()
    cached = sum(1 for f in cfuncs.values() if f.cache_hits)
    return {
        "seconds": time.perf_counter() - start,
        "cached": cached,
        "compiled": len(cfuncs) - cached,
        "layer": layer,
        "max_threads": max_threads,
    }
