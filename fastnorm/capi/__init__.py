"""C ABI of fastnorm: ``libfastnorm.so`` + ``capi/include/fastnorm.h`` (see ``docs/c-api.md``).

The shared library embeds CPython through cffi's embedding mode and calls the
kernels of :mod:`fastnorm._kernels` compiled as Numba cfuncs (module
:mod:`fastnorm.capi._cfuncs`), so C and Python run the same machine code.

Command line (``python -m fastnorm.capi --help``)::

    python -m fastnorm.capi build [--out DIR]   # libfastnorm.so, include/fastnorm.h, fastnorm.pc
    python -m fastnorm.capi --warm [--jobs N]   # compile the cfuncs into Numba's cache
    python -m fastnorm.capi --cflags            # -I... for a C compiler
    python -m fastnorm.capi --libs              # -L... -lfastnorm for the linker

Importing this package is cheap: it neither imports cffi nor compiles anything.
"""

from __future__ import annotations

from .build import LIBRARY_NAME, build, cflags, default_build_dir, libs, source_dir

__all__ = ["LIBRARY_NAME", "build", "cflags", "default_build_dir", "libs", "source_dir", "warm"]


def warm(jobs=1, dtypes=None):
    """Compile every cfunc of the C ABI into Numba's cache (or check that it is there).

    Run it once after installing or after changing the kernels, so that the
    first C call of every later process only loads machine code.

    Parameters
    ----------
    jobs : int, optional
        Processes that compile at once.  Numba compiles on one core; with
        ``jobs > 1`` the data dtypes are shared out among that many
        ``python -m fastnorm.capi --warm --dtypes ...`` processes, each
        writing its cfuncs (and the kernels they call) to the cache, and this
        process then loads them all.
    dtypes : collection of str, optional
        Only the cfuncs of these data dtypes (``"float32"``, ``"float64"``,
        ``"float16"``, ``"bfloat16"``); all by default.

    Returns
    -------
    dict
        ``{"seconds": float, "cached": int, "compiled": int, "layer": str, "max_threads": int}``;
        with ``jobs > 1``, ``compiled`` counts the cfuncs the processes compiled.

    Raises
    ------
    RuntimeError
        A compiling process failed (its output is in the message).
    """
    import contextlib
    import re
    import subprocess
    import sys
    import tempfile
    import time

    start = time.perf_counter()
    from ._cfuncs import DATA_TYPES, build_cfuncs, threading_addresses

    names = list(DATA_TYPES) if dtypes is None else [name for name in DATA_TYPES if name in dtypes]
    compiled_by_children = 0
    if jobs > 1 and len(names) > 1:
        shares = [names[i::jobs] for i in range(min(jobs, len(names)))]
        command = [sys.executable, "-m", "fastnorm.capi", "--warm", "--dtypes"]
        with contextlib.ExitStack() as stack:
            # each child writes to a file: a pipe read after another child's could fill and stall it
            logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in shares]
            processes = [
                subprocess.Popen([*command, ",".join(share)], stdout=log, stderr=subprocess.STDOUT)
                for share, log in zip(shares, logs, strict=True)
            ]
            stack.callback(lambda: [process.kill() for process in processes if process.poll() is None])
            for process, log in zip(processes, logs, strict=True):
                process.wait()
                log.seek(0)
                output = log.read().decode(errors="replace")
                if process.returncode:
                    args = " ".join(process.args)
                    raise RuntimeError(f"{args} failed ({process.returncode}):\n{output}")
                counted = re.search(r"\((\d+) from cache, (\d+) compiled\)", output)
                compiled_by_children += int(counted.group(2)) if counted else 0
    cfuncs = build_cfuncs(dtypes=names)
    _, _, max_threads, layer = threading_addresses()
    compiled = compiled_by_children + sum(1 for f in cfuncs.values() if not f.cache_hits)
    return {
        "seconds": time.perf_counter() - start,
        "cached": len(cfuncs) - compiled,
        "compiled": compiled,
        "layer": layer,
        "max_threads": max_threads,
    }
