"""Numba ``@cfunc`` entry points of the C ABI, built from the kernels of :mod:`fastnorm._kernels`.

Each cfunc wraps raw pointers into arrays with :func:`numba.carray`, passes
the :class:`~fastnorm._kernels.KernelSpec` fields as a plain tuple (as
:mod:`fastnorm.core` does) and calls the *same* kernel functions as
the Python API (there is no second implementation).  The C side
(``capi/fastnorm_capi.c``) has already validated every argument; the cfuncs
trust their inputs.

Conventions
-----------
* One cfunc per (operation, dtype); the layout is chosen at run time from the
  ``CHANNELS_LAST`` flag, so 6 cfuncs cover 3 operations x 2 dtypes x 2 layouts.
* Data buffers are ``T*`` (``float32`` or ``float64``); ``mean``/``rstd`` are
  ``double*``.  An absent weight/bias/dweight/dbias is passed with length 0
  (its pointer may be NULL) and becomes an empty array, as the kernels expect.
* The thread count is not an argument: the C layer calls the threading
  layer's own ``set_num_threads`` (see :func:`threading_addresses`), because
  ``numba.set_num_threads`` inside a cfunc makes it uncachable.
* Every cfunc returns ``1`` on success.  A Numba cfunc that raises (only
  possible on memory exhaustion in a kernel's workspace allocation) returns
  ``0`` instead, which the C layer reports as ``FASTNORM_INTERNAL_ERROR``.

Caching
-------
The cfuncs are compiled with ``cache=True``.  Numba keys a cache entry on the
cfunc's own source file only, not on the functions it calls, so each cfunc is
a closure over :data:`DEPS_KEY`, a hash of ``fastnorm/_*.py`` (``_kernels.py``,
``_config.py``...) and this file: Numba hashes closure variables into the
cache index key, so editing a kernel invalidates the cached cfuncs instead of
silently reusing stale code.
"""

from __future__ import annotations

import ctypes
import hashlib
import pathlib

import numba
import numpy as np
from numba import carray, cfunc, types

from .. import _kernels as K

__all__ = ["DEPS_KEY", "SIGNATURES", "build_cfuncs", "threading_addresses"]

_PKG = pathlib.Path(__file__).resolve().parent.parent


def _deps_key():
    """Hash of every source file whose code can end up inside the cfuncs.

    That is this file and the package's private modules (``fastnorm/_*.py``:
    ``_kernels.py``, ``_config.py`` and any helper module the kernels may be
    split into later), so that no kernel edit can leave stale machine code.
    """
    digest = hashlib.sha256()
    paths = sorted(p for p in _PKG.glob("_*.py") if p.name != "__init__.py")
    for path in [*paths, pathlib.Path(__file__).resolve()]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return int(digest.hexdigest()[:15], 16)


#: Cache-invalidation key (see the module docstring).
DEPS_KEY = _deps_key()

_i64 = types.int64
_f64 = types.float64
_p64 = types.CPointer(types.float64)


def _signatures(dtype):
    pt = types.CPointer(dtype)
    forward = types.int32(pt, pt, _i64, pt, _i64, pt, _p64, _p64, _i64, _i64, _i64, _i64, _i64, _i64, _f64)
    inference = forward
    backward = types.int32(
        pt, pt, pt, _i64, _p64, _p64, _i64, pt, pt, _i64, pt, _i64, _i64, _i64, _i64, _i64, _i64, _f64
    )
    return {"forward_training": forward, "forward_inference": inference, "backward": backward}


#: ``{(operation, dtype name): numba signature}`` of every cfunc.
SIGNATURES = {
    (op, np.dtype(nb_dtype.name).name): sig
    for nb_dtype in (types.float32, types.float64)
    for op, sig in _signatures(nb_dtype).items()
}


def _make_forward(key, training):
    """Forward cfunc: training statistics (``training``) or given statistics."""

    def forward(x, w, nw, b, nb, y, mean, rstd, nstats, batch, channels, spatial, groups, flags, eps):
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags, eps)  # KernelSpec fields, as core passes them
        size = batch * channels * spatial
        xa = carray(x, size)
        ya = carray(y, size)
        wa = carray(w, nw)
        ba = carray(b, nb)
        ma = carray(mean, nstats)
        ra = carray(rstd, nstats)
        # The same builds as K.select picks for the Python API.
        small = size <= K.SERIAL_MAX_ELEMENTS
        channels_last = flags & K.CHANNELS_LAST
        if training:
            if small and channels_last:
                K.forward_train_cl_serial(xa, wa, ba, ya, ma, ra, spec)
            elif small:
                K.forward_train_cf_serial(xa, wa, ba, ya, ma, ra, spec)
            elif channels_last:
                K.forward_train_cl(xa, wa, ba, ya, ma, ra, spec)
            else:
                K.forward_train_cf(xa, wa, ba, ya, ma, ra, spec)
        elif small and channels_last:
            K.normalize_cl_serial(xa, wa, ba, ya, ma, ra, spec)
        elif small:
            K.normalize_cf_serial(xa, wa, ba, ya, ma, ra, spec)
        elif channels_last:
            K.normalize_cl(xa, wa, ba, ya, ma, ra, spec)
        else:
            K.normalize_cf(xa, wa, ba, ya, ma, ra, spec)
        return 1

    return forward


def _make_backward(key):
    def backward(
        dy, x, w, nw, mean, rstd, nstats, dx, dw, ndw, db, ndb,
        batch, channels, spatial, groups, flags, eps,
    ):  # fmt: skip
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags, eps)  # KernelSpec fields, as core passes them
        size = batch * channels * spatial
        dya = carray(dy, size)
        xa = carray(x, size)
        dxa = carray(dx, size)
        wa = carray(w, nw)
        dwa = carray(dw, ndw)
        dba = carray(db, ndb)
        ma = carray(mean, nstats)
        ra = carray(rstd, nstats)
        if size <= K.SERIAL_MAX_ELEMENTS:  # the same builds as K.select picks for Python
            if flags & K.CHANNELS_LAST:
                K.backward_cl_serial(dya, xa, wa, ma, ra, dxa, dwa, dba, spec)
            else:
                K.backward_cf_serial(dya, xa, wa, ma, ra, dxa, dwa, dba, spec)
        elif flags & K.CHANNELS_LAST:
            K.backward_cl(dya, xa, wa, ma, ra, dxa, dwa, dba, spec)
        else:
            K.backward_cf(dya, xa, wa, ma, ra, dxa, dwa, dba, spec)
        return 1

    return backward


_FACTORIES = {
    "forward_training": lambda key: _make_forward(key, True),
    "forward_inference": lambda key: _make_forward(key, False),
    "backward": _make_backward,
}


def build_cfuncs(cache=True):
    """Compile (or load from Numba's cache) every cfunc of the C ABI.

    Parameters
    ----------
    cache : bool, optional
        Use Numba's on-disk cache (default).  The first run compiles every
        kernel specialization (about a minute on 2 cores); later runs load
        the machine code from the cache in a fraction of a second.

    Returns
    -------
    dict
        ``{(operation, dtype name): numba CFunc}``; keep it alive for as long
        as the addresses (``cfunc.address``) are in use.
    """
    # A cfunc loaded from the cache does not start the threading layer (its
    # parfor symbols, e.g. ``allocate_sched``, would be unresolved: LLVM aborts
    # the process), so start it first.
    from numba.np.ufunc import parallel

    parallel._launch_threads()
    result = {}
    for (op, dtype), sig in SIGNATURES.items():
        result[op, dtype] = cfunc(sig, cache=cache)(_FACTORIES[op](DEPS_KEY))
    return result


def threading_addresses():
    """Start Numba's threading layer and return its thread-count entry points.

    Returns
    -------
    set_num_threads : int
        Address of the threading layer's ``void set_num_threads(int)``: sets
        the number of threads used by parallel regions launched from the
        *calling* thread (thread-local, as ``numba.set_num_threads``).
    get_num_threads : int
        Address of ``int get_num_threads(void)`` (thread-local value).
    max_threads : int
        ``numba.config.NUMBA_NUM_THREADS``, the number of threads launched.
    layer : str
        Name of the threading layer in use (``"tbb"``, ``"omp"``, ...).
    """
    from numba.np.ufunc import parallel

    parallel._launch_threads()
    setter = ctypes.cast(parallel._set_num_threads, ctypes.c_void_p).value
    getter = ctypes.cast(parallel._get_num_threads, ctypes.c_void_p).value
    return setter, getter, int(numba.config.NUMBA_NUM_THREADS), numba.threading_layer()
