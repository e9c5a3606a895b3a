"""Numba configuration shared by every fastnorm kernel.

This is the only module allowed to spell out fastmath flags or Numba options:
``tests/test_style.py`` fails on any ``fastmath=`` written anywhere else.

Notes
-----
* ``FASTMATH`` allows re-association (so reductions vectorize) and FMA
  contraction, but *not* ``nnan``/``ninf``: NaN and inf keep IEEE semantics and
  propagate through every kernel.
* ``error_model='numpy'`` removes Python's division-by-zero checks (a zero
  variance with ``eps=0`` gives ``inf`` like NumPy, never an exception).
* Numba's cache keys a compiled function on its own source file only, not
  on the functions it calls in other modules (numba#1833).  Every function
  compiled here is keyed on :data:`DEPS_KEY` too, a hash of every file of
  ``fastnorm/_kernels/`` and of this file, so that an edit to any kernel file
  recompiles every kernel instead of loading stale machine code; the C ABI's
  cfuncs use the same key.
* The threading layer defaults to ``'threadsafe'`` (TBB when the ``tbb`` package
  is installed, otherwise OpenMP), never ``workqueue``, which aborts on
  concurrent launches from several threads.  An explicit
  ``NUMBA_THREADING_LAYER`` environment variable wins.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba.core.caching import FunctionCache
from numba.core.dispatcher import Dispatcher

#: Fastmath flags of every kernel: reassociation and contraction only.
FASTMATH = frozenset({"reassoc", "contract"})

#: Options common to every compiled function.
JIT_OPTIONS = {
    "cache": True,
    "nogil": True,
    "fastmath": set(FASTMATH),
    "error_model": "numpy",
    "boundscheck": False,
}

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

_PACKAGE = Path(__file__).resolve().parent


def kernel_sources():
    """Return the source files whose code can end up inside a compiled kernel."""
    return [*sorted((_PACKAGE / "_kernels").glob("*.py")), _PACKAGE / "_config.py"]


def deps_key(paths=None):
    """Hash of the kernel sources (names and contents), as a non-negative int.

    Parameters
    ----------
    paths : list of path-like, optional
        The files to hash; :func:`kernel_sources` by default.
    """
    digest = hashlib.sha256()
    for path in paths if paths is not None else kernel_sources():
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return int(digest.hexdigest()[:15], 16)


#: Cache key of every compiled kernel and of the C ABI's cfuncs (see the Notes above).
DEPS_KEY = deps_key()


class _KeyedFunctionCache(FunctionCache):
    """Numba's function cache with :data:`DEPS_KEY` in every index key."""

    def _index_key(self, sig, codegen):
        return (*super()._index_key(sig, codegen), DEPS_KEY)


def _jit(func, signatures=(), **options):
    """``numba.njit(**options)(func)`` whose on-disk cache is keyed on :data:`DEPS_KEY`."""
    dispatcher = numba.njit(**options)(func)
    if isinstance(dispatcher, Dispatcher):  # not under NUMBA_DISABLE_JIT=1
        dispatcher._cache = _KeyedFunctionCache(dispatcher.py_func)
        for signature in signatures:
            dispatcher.compile(signature)
    return dispatcher


def helper(func):
    """Compile a serial helper called as a function (LLVM may still inline it).

    For code whose call cost is amortized: the rare two-pass moments fallback,
    the channels-last block helpers (a block is at least ``CL_MIN_ROWS`` rows),
    the column tiles of long LayerNorm rows; and for the serial builds of the
    kernels.
    """
    return _jit(func, **JIT_OPTIONS)


def exact_helper(func):
    """Compile a serial helper without fastmath: every operation rounds as written.

    For the few lines whose results must equal NumPy's and torch's to the bit
    (the running-statistics update): no re-association, no FMA contraction.
    """
    return _jit(func, **{**JIT_OPTIONS, "fastmath": False})


def typed_helper(signatures):
    """Return a decorator compiling a serial helper for exactly ``signatures``, eagerly.

    For a helper the public layer calls with arrays that may be read-only:
    with array arguments declared read-only, writable and read-only arrays
    match the same compiled version (Numba would otherwise compile a version
    per combination on first use).
    """

    def decorate(func):
        return _jit(func, signatures, **JIT_OPTIONS)

    return decorate


def glue(func):
    """Compile a serial helper inlined into its callers at Numba IR level.

    For everything a kernel runs once per block or group: index arithmetic,
    coefficient set-up, and the loops over a block themselves.  As a separate
    function every call passes each array as a 7-field struct and takes its
    slices with reference-count updates that only inlining lets Numba remove:
    a short LayerNorm row cost about 1.6x the time with its block loops called
    (docs/perf-notes/per-plane-overhead-and-inlining.md).  The price is
    compile time.
    """
    return _jit(func, inline="always", **JIT_OPTIONS)


def kernel(func):
    """Compile a parallel top-level kernel (``prange`` loops run multithreaded)."""
    return _jit(func, parallel=True, **JIT_OPTIONS)
