"""Python side of ``libfastnorm.so``'s initialization (runs in the embedded interpreter).

Called once per process by the cffi init code (see :mod:`fastnorm.capi.build`);
after it returns, C calls the kernels through the addresses it wrote and no
Python code runs again.
"""

from __future__ import annotations

import sys

from .._threading import fork_unsafe
from ._cfuncs import SPLIT_DTYPES, build_cfuncs, threading_addresses

__all__ = ["AFTER_FORK_PARALLEL", "AFTER_FORK_SERIAL", "TABLE_ORDER", "fill_table"]

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

#: Keeps the compiled cfuncs (and their machine code) alive for the process lifetime.
_KEEP_ALIVE = []


def fill_table(table, table_len, owns_interpreter=False):
    """Load the cfuncs and write their addresses into the C table.

    Parameters
    ----------
    table : cffi ``int64_t *``
        Slots: the cfuncs of :data:`TABLE_ORDER`, the threading layer's
        ``set_num_threads`` and ``get_num_threads``, the thread-pool size,
        and what a forked child runs (:data:`AFTER_FORK_PARALLEL` or
        :data:`AFTER_FORK_SERIAL` when
        :func:`fastnorm._threading.fork_unsafe`).
    table_len : int
        Number of slots the C side expects.
    owns_interpreter : bool, optional
        Whether libfastnorm started this interpreter (no host Python code
        runs in it).  Then SciPy is hidden while Numba loads the cfuncs:
        Numba imports ``scipy.linalg`` only to probe for BLAS (about 0.4 s of
        the cold start), and no fastnorm kernel uses BLAS.  A host
        interpreter is left untouched.

    Returns
    -------
    str
        The threading layer name (``"tbb"``, ``"omp"``...).

    Raises
    ------
    RuntimeError
        If the C and Python sides disagree on the table layout.
    """
    hide_scipy = owns_interpreter and "scipy" not in sys.modules
    if hide_scipy:
        sys.modules["scipy"] = None  # makes ``import scipy...`` raise ImportError
    try:
        cfuncs = build_cfuncs()
    finally:
        if hide_scipy and sys.modules.get("scipy", 0) is None:
            del sys.modules["scipy"]
    setter, getter, max_threads, layer = threading_addresses()
    after_fork = AFTER_FORK_SERIAL if fork_unsafe() else AFTER_FORK_PARALLEL
    values = [cfuncs[key].address for key in TABLE_ORDER] + [setter, getter, max_threads, after_fork]
    if table_len != len(values):
        raise RuntimeError(f"libfastnorm expects {table_len} table slots, the runtime provides {len(values)}")
    for index, value in enumerate(values):
        table[index] = value
    _KEEP_ALIVE.append(cfuncs)
    return layer
