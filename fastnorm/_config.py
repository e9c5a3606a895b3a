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
    """Compile a serial helper (inlined into the kernels that call it)."""
    return numba.njit(**JIT_OPTIONS)(func)


def glue(func):
    """Compile a small serial helper inlined into its callers at Numba IR level.

    For the per-block glue (index arithmetic, coefficient set-up, dispatch to
    a loop helper): as a separate function every call passes each array as a
    7-field struct, which measured 29 ns per 4-element LayerNorm row against
    16 ns inlined.  Helpers holding the vectorized loops stay plain
    :func:`helper` functions, so compile time barely grows.
    """
    return numba.njit(inline="always", **JIT_OPTIONS)(func)


def kernel(func):
    """Compile a parallel top-level kernel (``prange`` loops run multithreaded)."""
    return numba.njit(parallel=True, **JIT_OPTIONS)(func)
