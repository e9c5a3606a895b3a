"""Python side of ``libfastnorm.so``'s runtime (runs in the embedded interpreter).

The cffi init code (see :mod:`fastnorm.capi.build`) calls :func:`fill_table`
once per process, when the runtime starts: it starts the threading layer and
writes its slots.  Each cfunc is loaded on the first call that needs it:
the C side then calls :func:`load_slot` (under its lock, once per slot and
process) and keeps the address.  After that, C calls the kernel through the
address and no Python code runs for that operation again.  Loading one cfunc
instead of all of them keeps a fresh process's first call short
(docs/c-api.md, "Cold start").
"""

from __future__ import annotations

import contextlib
import sys

from .._threading import fork_unsafe
from ._cfuncs import SPLIT_DTYPES, build_cfunc, threading_addresses

__all__ = ["AFTER_FORK_PARALLEL", "AFTER_FORK_SERIAL", "TABLE_ORDER", "fill_table", "load_slot"]

#: cfunc order of the table slots (must match the SLOT_* enum of fastnorm_capi.c).
TABLE_ORDER = [
    *(
        (op, dtype)
        for dtype in ("float32", "float64", "float16", "bfloat16")
        for op in ("forward_training", "forward_inference", "backward", "skip_forward", "update_running")
    ),
    *((op, dtype) for dtype in SPLIT_DTYPES for op in ("batch_stats", "backward_reduce", "backward_apply")),
    ("merge_stats", "float64"),
]

#: Values of the table's after-fork slot: a forked child keeps running the parallel
#: builds (a fork-safe threading layer, e.g. TBB), or runs the serial builds of
#: every kernel (GNU OpenMP, whose parallel regions kill a forked child).
AFTER_FORK_PARALLEL = 1
AFTER_FORK_SERIAL = 2

#: Slots :func:`fill_table` writes after the cfuncs of :data:`TABLE_ORDER`, in order (the
#: threading layer's ``set_num_threads``, ``get_num_threads``, the pool size, what a forked
#: child runs); ``fastnorm_generated.h`` names them ``SLOT_<name>``.
THREADING_SLOTS = ("SET_THREADS", "GET_THREADS", "MAX_THREADS", "AFTER_FORK")

#: Keeps the loaded cfuncs (and their machine code) alive for the process lifetime.
_KEEP_ALIVE = []

#: Whether libfastnorm started this interpreter (set by :func:`fill_table`).
_owns_interpreter = False


@contextlib.contextmanager
def _scipy_hidden(hide):
    """Make ``import scipy...`` raise ImportError inside the block when ``hide`` (and SciPy is not loaded).

    Numba imports ``scipy.linalg`` only to probe for BLAS (about 0.4 s of the
    cold start), and no fastnorm kernel uses BLAS.
    """
    hide = hide and "scipy" not in sys.modules
    if hide:
        sys.modules["scipy"] = None
    try:
        yield
    finally:
        if hide and sys.modules.get("scipy", 0) is None:
            del sys.modules["scipy"]


def fill_table(table, table_len, owns_interpreter=False):
    """Start the threading layer and write its slots into the C table.

    Parameters
    ----------
    table : cffi ``int64_t *``
        Slots: the cfuncs of :data:`TABLE_ORDER` (left 0 here, written by
        the C side with what :func:`load_slot` returns), then the threading
        layer's ``set_num_threads`` and ``get_num_threads``, the thread-pool
        size, and what a forked child runs (:data:`AFTER_FORK_PARALLEL`, or
        :data:`AFTER_FORK_SERIAL` when :func:`fastnorm._threading.fork_unsafe`).
    table_len : int
        Number of slots the C side expects.
    owns_interpreter : bool, optional
        Whether libfastnorm started this interpreter (no host Python code
        runs in it).  Then SciPy is hidden while Numba starts and loads the
        cfuncs (:func:`_scipy_hidden`); a host interpreter is left untouched.

    Returns
    -------
    str
        The threading layer name (``"tbb"``, ``"omp"``...).

    Raises
    ------
    RuntimeError
        If the C and Python sides disagree on the table layout.
    """
    global _owns_interpreter
    expected = len(TABLE_ORDER) + len(THREADING_SLOTS)
    if table_len != expected:
        raise RuntimeError(f"libfastnorm expects {table_len} table slots, the runtime provides {expected}")
    _owns_interpreter = bool(owns_interpreter)
    with _scipy_hidden(_owns_interpreter):
        setter, getter, max_threads, layer = threading_addresses()
    after_fork = AFTER_FORK_SERIAL if fork_unsafe() else AFTER_FORK_PARALLEL
    for index, value in enumerate((setter, getter, max_threads, after_fork), start=len(TABLE_ORDER)):
        table[index] = value
    return layer


def load_slot(slot):
    """Load (from Numba's cache; compile on a miss) the cfunc of table slot ``slot``.

    Parameters
    ----------
    slot : int
        Index into :data:`TABLE_ORDER`.

    Returns
    -------
    int
        The cfunc's address, kept valid for the life of the process.

    Raises
    ------
    IndexError
        If ``slot`` is not a cfunc slot.
    """
    if not 0 <= slot < len(TABLE_ORDER):
        raise IndexError(f"table slot {slot} is not a cfunc slot (0..{len(TABLE_ORDER) - 1})")
    op, dtype = TABLE_ORDER[slot]
    with _scipy_hidden(_owns_interpreter):
        compiled = build_cfunc(op, dtype)
    _KEEP_ALIVE.append(compiled)
    return compiled.address
