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
* The threading layer defaults to ``'threadsafe'`` (TBB when the ``tbb`` package
  is installed, otherwise OpenMP), never ``workqueue``, which aborts on
  concurrent launches from several threads.  An explicit
  ``NUMBA_THREADING_LAYER`` environment variable wins.
"""

from __future__ import annotations

import os

import numba

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


def helper(func):
    """Compile a serial helper called as a function (LLVM may still inline it).

    For code whose call cost is amortized: the rare two-pass moments fallback,
    the channels-last block helpers (a block is at least ``CL_MIN_ROWS`` rows),
    the column tiles of long LayerNorm rows; and for the serial builds of the
    kernels.
    """
    return numba.njit(**JIT_OPTIONS)(func)


def typed_helper(signatures):
    """Return a decorator compiling a serial helper for exactly ``signatures``, eagerly.

    For a helper the public layer calls with arrays that may be read-only:
    with array arguments declared read-only, writable and read-only arrays
    match the same compiled version (Numba would otherwise compile a version
    per combination on first use).
    """

    def decorate(func):
        return numba.njit(signatures, **JIT_OPTIONS)(func)

    return decorate


def glue(func):
    """Compile a serial helper inlined into its callers at Numba IR level.

    For everything a kernel runs once per block or group: index arithmetic,
    coefficient set-up, and the loops over a block themselves.  As a separate
    function every call passes each array as a 7-field struct and takes its
    slices with reference-count updates that only inlining lets Numba remove:
    the LayerNorm forward kernel over 262144 rows of 16 elements took 46 ns of
    thread time per row with the block loops called, 29 ns with them inlined
    (same process, interleaved; 2 threads).  The price is compile time:
    building every kernel for both dtypes took 148 s instead of 99 s.
    """
    return numba.njit(inline="always", **JIT_OPTIONS)(func)


def kernel(func):
    """Compile a parallel top-level kernel (``prange`` loops run multithreaded)."""
    return numba.njit(parallel=True, **JIT_OPTIONS)(func)
