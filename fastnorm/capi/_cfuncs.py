"""Numba ``@cfunc`` entry points of the C ABI, built from the kernels of :mod:`fastnorm._kernels`.

Each cfunc wraps raw pointers into arrays with :func:`numba.carray`, asks
:func:`fastnorm._kernels.plan_schedule` for the schedule -- the same compiled
function the Python API calls, with the same arguments -- and runs the kernel
through :func:`fastnorm._kernels.run_forward` / ``run_backward``, which pick
from the same table as the Python API (there is no second implementation and
no second choice of schedule).  The C side (``capi/src/fastnorm_capi.c``) has
already validated every argument; the cfuncs trust their inputs.

Conventions
-----------
* One cfunc per (operation, data dtype): the training and inference forward
  passes, the backward pass, the forward pass after a pre-norm skip add and
  the running-statistics update for float32, float64, float16 and bfloat16;
  the split BatchNorm's local moments, backward sums and ``dx``
  (:mod:`fastnorm.distributed`) for float32 and float64 (:data:`SPLIT_DTYPES`);
  and one merge of per-rank moments (doubles only).
* Data buffers are ``T*`` (``float32``, ``float64``, or the 16-bit views of
  :mod:`fastnorm._kernels.storage`: ``int16`` for float16, ``uint16`` for
  bfloat16); ``mean``/``rstd`` are ``double*``.  Parameter buffers (weight,
  bias, skip_bias and their gradients) are ``void*``: the data dtype for
  float32/float64 data; for 16-bit data float32, or the data dtype when the
  argument ``param16`` is 1 (then converted to float32 for the kernels, and
  the gradients rounded back, by the same conversions as the data:
  :func:`_param_in`, :func:`_param_out`, :func:`_param_store`).  An absent
  weight/bias/residual/dweight/dbias/dresidual/skip_bias/dskip_bias is passed
  with length 0 (its pointer may be NULL) and becomes an empty array, as the
  kernels expect.  The activation and its slope are the last two
  KernelSpec fields.
* The last two arguments are ``param16`` and the thread count of the call:
  the C layer sets the count with the threading layer's own ``set_num_threads`` (see
  :func:`threading_addresses`) and passes it, because a compiled function
  that asks Numba for the thread count cannot be cached.  ``0`` asks for the
  serial build of every kernel (:func:`_serial`), whatever the size: the C
  layer passes it in a process forked from one whose threading layer cannot
  run there (GNU OpenMP; see :mod:`fastnorm._threading`).
* Every cfunc returns ``1`` on success.  A Numba cfunc that raises (only
  possible on memory exhaustion in a kernel's workspace allocation) returns
  ``0`` instead, which the C layer reports as ``FASTNORM_INTERNAL_ERROR``.

Caching
-------
The cfuncs are compiled with ``cache=True``.  Numba keys a cache entry on the
cfunc's own source file only, not on the functions it calls, so each cfunc is
a closure over :data:`DEPS_KEY` (:data:`fastnorm._config.DEPS_KEY`, a hash of
every kernel file): Numba hashes closure variables into the cache index key,
so editing a kernel invalidates the cached cfuncs instead of silently reusing
stale code.
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np
from numba import carray, cfunc, types
from numba.extending import overload

from .. import _kernels as K
from .._config import DEPS_KEY, glue
from .._kernels.storage import load, store

__all__ = ["DEPS_KEY", "SIGNATURES", "build_cfunc", "build_cfuncs", "threading_addresses"]

_i64 = types.int64
_f64 = types.float64
_p64 = types.CPointer(types.float64)


_vp = types.voidptr

#: The Numba element type of each data dtype's buffers (16-bit floats as their integer views).
DATA_TYPES = {
    "float32": types.float32,
    "float64": types.float64,
    "float16": types.int16,
    "bfloat16": types.uint16,
}


def _signatures(dtype):
    pt = types.CPointer(dtype)
    spec = (_i64, _i64, _i64, _i64, _i64, _f64, _i64, _f64)  # KernelSpec fields
    forward = types.int32(pt, pt, _i64, _vp, _i64, _vp, _i64, pt, _p64, _p64, _i64, *spec, _i64, _i64)
    backward = types.int32(
        pt, pt, pt, _i64, _vp, _i64, _vp, _i64, _p64, _p64, _i64, pt, pt, _i64, _vp, _i64, _vp, _i64,
        _vp, _i64, *spec, _i64, _i64,
    )  # fmt: skip
    skip_forward = types.int32(
        pt, pt, _vp, _i64, _vp, _i64, _vp, _i64, pt, pt, _p64, _p64, _i64, *spec, _i64, _i64
    )
    return {
        "forward_training": forward,
        "forward_inference": forward,
        "backward": backward,
        "skip_forward": skip_forward,
        "update_running": types.int32(pt, pt, _p64, _p64, _i64, _f64, _f64),
    }


def _split_signatures(dtype):
    """Signatures of the BatchNorm split across processes (float32 and float64 data)."""
    pt = types.CPointer(dtype)
    spec = (_i64, _i64, _i64, _i64, _i64, _f64, _i64, _f64)  # KernelSpec fields
    return {
        "batch_stats": types.int32(pt, _p64, _p64, *spec, _i64),
        "backward_reduce": types.int32(pt, pt, _p64, _p64, _p64, _p64, *spec, _i64),
        "backward_apply": types.int32(pt, pt, pt, _i64, _p64, _p64, _p64, _p64, _f64, pt, *spec, _i64),
    }


#: Data dtypes of the split BatchNorm cfuncs (16-bit data: ``FASTNORM_UNSUPPORTED`` in C).
SPLIT_DTYPES = ("float32", "float64")

#: ``{(operation, dtype name): numba signature}`` of every cfunc.
SIGNATURES = {
    **{(op, name): sig for name, nb_dtype in DATA_TYPES.items() for op, sig in _signatures(nb_dtype).items()},
    **{(op, name): sig for name in SPLIT_DTYPES for op, sig in _split_signatures(DATA_TYPES[name]).items()},
    ("merge_stats", "float64"): types.int32(
        _i64, _i64, types.CPointer(_i64), _p64, _p64, _p64, _p64, types.CPointer(_i64)
    ),
}


def _param_in(ptr, n, data, param16):
    """Return the float array the kernels take for a parameter buffer of ``n`` elements (compiled only).

    For float32/float64 ``data`` the buffer itself, of the data dtype; for
    16-bit data the float32 buffer, or (``param16``) a float32 copy of the
    16-bit one.
    """


def _param_out(ptr, n, data, param16):
    """Return the float array a kernel writes a parameter gradient into (compiled only).

    The buffer itself, except for 16-bit parameters (``param16``): a float32
    workspace that :func:`_param_store` rounds into the buffer.
    """


def _param_store(ptr, n, data, param16, values):
    """Round ``values`` (from :func:`_param_out`) into a 16-bit buffer when ``param16`` (compiled only)."""


def _half_view(data):
    """Return the NumPy dtype of a 16-bit data array type's view (None for float32/float64)."""
    if data.dtype == types.uint16:
        return np.uint16
    if data.dtype == types.int16:
        return np.int16
    return None


@overload(_param_in)
def _ol_param_in(ptr, n, data, param16):
    view = _half_view(data)
    if view is None:
        dtype = np.dtype(data.dtype.name)
        return lambda ptr, n, data, param16: carray(ptr, n, dtype)

    def impl(ptr, n, data, param16):
        if param16:
            bits = carray(ptr, n, view)
            values = np.empty(n, np.float32)
            for i in range(n):
                values[i] = load(bits, i)
            return values
        return carray(ptr, n, np.float32)

    return impl


@overload(_param_out)
def _ol_param_out(ptr, n, data, param16):
    view = _half_view(data)
    if view is None:
        dtype = np.dtype(data.dtype.name)
        return lambda ptr, n, data, param16: carray(ptr, n, dtype)
    return lambda ptr, n, data, param16: np.empty(n, np.float32) if param16 else carray(ptr, n, np.float32)


@overload(_param_store)
def _ol_param_store(ptr, n, data, param16, values):
    view = _half_view(data)
    if view is None:
        return lambda ptr, n, data, param16, values: None

    def impl(ptr, n, data, param16, values):
        if param16:
            bits = carray(ptr, n, view)
            for i in range(n):
                store(bits, i, values[i])

    return impl


@glue
def _serial(schedule, num_threads):
    """``schedule`` with its ``parallel`` field 0 when ``num_threads`` is 0 (serial build, same bits)."""
    if num_threads < 1:
        return schedule[:2] + (0,) + schedule[3:]
    return schedule


@glue
def _params(spec, pass_id, num_threads, itemsize, has_weight, has_bias, in_place):
    """``spec`` and its schedule for ``pass_id``, as the Python API's ``_kernel_call`` passes them.

    The schedule is :func:`~fastnorm._kernels.plan_schedule`'s for
    ``num_threads`` threads, serial for 0 (:func:`_serial`).
    """
    schedule = K.plan_schedule(spec, pass_id, max(num_threads, 1), itemsize, has_weight, has_bias, in_place)
    return spec + _serial(schedule, num_threads)


def _make_forward(key, pass_id):
    """Forward cfunc: training statistics (``K.FORWARD``) or given statistics (``K.INFERENCE``)."""

    def forward(
        x, r, nr, w, nw, b, nb, y, mean, rstd, nstats,
        batch, channels, spatial, groups, flags, eps, activation, slope, param16, num_threads,
    ):  # fmt: skip
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags, eps, activation, slope)  # a KernelSpec (_plan.py)
        size = batch * channels * spatial
        xa = carray(x, size)
        ya = carray(y, size)
        ra = carray(r, nr)
        in_place = xa.ctypes.data == ya.ctypes.data or (nr > 0 and ra.ctypes.data == ya.ctypes.data)
        params = _params(spec, pass_id, num_threads, xa.itemsize, nw > 0, nb > 0, in_place)
        wa = _param_in(w, nw, xa, param16)
        ba = _param_in(b, nb, xa, param16)
        meana = carray(mean, nstats)
        rstda = carray(rstd, nstats)
        K.run_forward(pass_id, xa, wa, ba, ra, xa[:0], ya, meana, rstda, params)
        return 1

    return forward


def _make_backward(key):
    """Backward cfunc: the norm's backward on ``dz`` (``dy``, or ``dy * act'(z)`` with an activation).

    ``dz`` comes from the inference kernel's gradient epilogue (rows), or, on
    the planes and channels-last views, from the one backward kernel that
    writes it block by block (``K.run_backward_epilogue``), as in
    :func:`fastnorm.backward`.
    """

    def backward(
        dy, x, r, nr, w, nw, b, nb, mean, rstd, nstats, dx, dr, ndr, dw, ndw, db, ndb, dsb, ndsb,
        batch, channels, spatial, groups, flags, eps, activation, slope, param16, num_threads,
    ):  # fmt: skip
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags, eps, activation, slope)  # a KernelSpec (_plan.py)
        size = batch * channels * spatial
        xa = carray(x, size)
        dya = carray(dy, size)
        dxa = carray(dx, size)
        dra = carray(dr, ndr)
        wa = _param_in(w, nw, xa, param16)
        meana = carray(mean, nstats)
        rstda = carray(rstd, nstats)
        in_place = dxa.ctypes.data == dya.ctypes.data or dxa.ctypes.data == xa.ctypes.data
        grad = dya
        if activation != 0:
            # dz into dresidual; without one, into dx's memory and the backward runs in place
            # there (as fastnorm.backward); a workspace when dresidual is dy's memory, or dx x's or dy's
            if ndr > 0 and dra.ctypes.data != dya.ctypes.data:
                grad = dra
            elif ndr == 0 and not in_place:
                grad = dxa
                in_place = True
            else:
                grad = np.empty_like(xa)
        elif ndr > 0 and dra.ctypes.data != dya.ctypes.data:
            dra[:] = dya  # dresidual = dy, before dx may overwrite dy
        params = _params(spec, K.BACKWARD, num_threads, xa.itemsize, nw > 0, False, in_place)
        dwa = _param_out(dw, ndw, xa, param16)
        dba = _param_out(db, ndb, xa, param16)
        # planes, channels-last: dz (grad) written block by block inside the backward
        # (core._backward_kernels)
        one_kernel = activation != 0 and params[8] != K.ROWS
        if activation != 0:
            ba = _param_in(b, nb, xa, param16)
            ra = carray(r, nr)
            if one_kernel:
                K.run_backward_epilogue(dya, xa, wa, ba, ra, grad, meana, rstda, dxa, dwa, dba, params)
            else:
                dz_params = _params(spec, K.INFERENCE, num_threads, xa.itemsize, nw > 0, nb > 0, False)
                K.run_forward(K.INFERENCE, xa, wa, ba, ra, dya, grad, meana, rstda, dz_params)
        if not one_kernel:
            K.run_backward(grad, xa, wa, meana, rstda, dxa, dwa, dba, params)
        _param_store(dw, ndw, xa, param16, dwa)
        _param_store(db, ndb, xa, param16, dba)
        if ndr > 0 and dra.ctypes.data != grad.ctypes.data and dra.ctypes.data == dya.ctypes.data:
            dra[:] = grad  # dresidual is dy's memory: the workspace's dz, now that dy is read
        if ndsb > 0:  # after a skip add (x is h): dskip_bias, the column sums of dx
            dsba = _param_out(dsb, ndsb, xa, param16)
            K.run_skip_bias_backward(dxa, dsba, params)
            _param_store(dsb, ndsb, xa, param16, dsba)
        return 1

    return backward


def _make_skip_forward(key):
    """Forward cfunc after the pre-norm skip add: ``h = x + skip (+ skip_bias)``, then the norm of ``h``.

    The schedule is the ``FORWARD`` one of :func:`fastnorm.forward` with
    ``skip=`` (``y`` is never ``h``'s memory: not in place).
    """

    def skip_forward(
        x, s, sb, nsb, w, nw, b, nb, h, y, mean, rstd, nstats,
        batch, channels, spatial, groups, flags, eps, activation, slope, param16, num_threads,
    ):  # fmt: skip
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags, eps, activation, slope)  # a KernelSpec (_plan.py)
        size = batch * channels * spatial
        xa = carray(x, size)
        params = _params(spec, K.FORWARD, num_threads, xa.itemsize, nw > 0, nb > 0, False)
        K.run_skip_forward(
            xa, carray(s, size), _param_in(sb, nsb, xa, param16), _param_in(w, nw, xa, param16),
            _param_in(b, nb, xa, param16), carray(h, size), carray(y, size), carray(mean, nstats),
            carray(rstd, nstats), params,
        )  # fmt: skip
        return 1

    return skip_forward


def _make_batch_stats(key):
    """Split BatchNorm: the local moments (``K.BATCH_STATS``, the ``FORWARD`` schedule)."""

    def batch_stats(
        x, mean, m2, batch, channels, spatial, groups, flags, eps, activation, slope, num_threads
    ):  # fmt: skip
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags | K.MOMENTS, eps, activation, slope)
        xa = carray(x, batch * channels * spatial)
        params = _params(spec, K.FORWARD, num_threads, xa.itemsize, False, False, False)
        K.run_batch_stats(xa, carray(mean, channels), carray(m2, channels), params)
        return 1

    return batch_stats


def _make_backward_reduce(key):
    """Split BatchNorm: the local ``sum(dy)`` and ``sum(dy * xhat)`` (the ``BACKWARD`` schedule)."""

    def backward_reduce(
        dy, x, mean, rstd, sum_dy, sum_dy_xhat,
        batch, channels, spatial, groups, flags, eps, activation, slope, num_threads,
    ):  # fmt: skip
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags, eps, activation, slope)
        size = batch * channels * spatial
        xa = carray(x, size)
        params = _params(spec, K.BACKWARD, num_threads, xa.itemsize, False, False, False)
        K.run_backward_reduce(
            carray(dy, size), xa, carray(mean, channels), carray(rstd, channels), carray(sum_dy, channels),
            carray(sum_dy_xhat, channels), params,
        )  # fmt: skip
        return 1

    return backward_reduce


def _make_backward_apply(key):
    """Split BatchNorm: ``dx`` from the global sums and count (the ``BACKWARD`` schedule)."""

    def backward_apply(
        dy, x, w, nw, mean, rstd, sum_dy, sum_dy_xhat, count, dx,
        batch, channels, spatial, groups, flags, eps, activation, slope, num_threads,
    ):  # fmt: skip
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        spec = (batch, channels, spatial, groups, flags, eps, activation, slope)
        size = batch * channels * spatial
        xa = carray(x, size)
        dxa = carray(dx, size)
        dya = carray(dy, size)
        in_place = dxa.ctypes.data == dya.ctypes.data or dxa.ctypes.data == xa.ctypes.data
        params = _params(spec, K.BACKWARD, num_threads, xa.itemsize, nw > 0, False, in_place)
        K.run_backward_apply(
            dya, xa, carray(w, nw), carray(mean, channels), carray(rstd, channels), carray(sum_dy, channels),
            carray(sum_dy_xhat, channels), count, dxa, params,
        )  # fmt: skip
        return 1

    return backward_apply


def _make_update_running(key):
    """Update running statistics from a batch's (:func:`fastnorm._kernels.update_running_stats`)."""

    def update_running(running_mean, running_var, mean, var, channels, count, factor):
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        K.update_running_stats(
            carray(running_mean, channels), carray(running_var, channels), carray(mean, channels),
            carray(var, channels), count, factor,
        )  # fmt: skip
        return 1

    return update_running


def _make_merge_stats(key):
    """Merge per-rank moments in rank order (:func:`fastnorm._kernels.merge_rank_moments`).

    Writes the global mean, ``var = m2 / count`` and the count, as
    :func:`fastnorm.merge_stats` returns them.
    """

    def merge_stats(ranks, channels, counts, means, m2s, mean, var, total):
        if key < 0:  # never true: ties the cache entry to DEPS_KEY
            return 0
        counts_a = carray(counts, ranks)
        rank_counts = np.empty(ranks)
        count = 0
        for r in range(ranks):
            rank_counts[r] = counts_a[r]
            count += counts_a[r]
        vara = carray(var, channels)
        shape = (ranks, channels)
        meana = carray(mean, channels)
        K.merge_rank_moments(rank_counts, carray(means, shape), carray(m2s, shape), meana, vara)
        for c in range(channels):
            vara[c] = vara[c] / count
        total[0] = count
        return 1

    return merge_stats


_FACTORIES = {
    "forward_training": lambda key: _make_forward(key, K.FORWARD),
    "forward_inference": lambda key: _make_forward(key, K.INFERENCE),
    "backward": _make_backward,
    "skip_forward": _make_skip_forward,
    "update_running": _make_update_running,
    "batch_stats": _make_batch_stats,
    "backward_reduce": _make_backward_reduce,
    "backward_apply": _make_backward_apply,
    "merge_stats": _make_merge_stats,
}


def build_cfunc(op, dtype, cache=True):
    """Compile (or load from Numba's cache) the cfunc of one operation for one data dtype.

    Parameters
    ----------
    op : str
        An operation of :data:`SIGNATURES` (``"forward_training"``, ...).
    dtype : str
        A data dtype of :data:`DATA_TYPES` (the merge has only ``"float64"``).
    cache : bool, optional
        Use Numba's on-disk cache (default).

    Returns
    -------
    numba CFunc
        Keep it alive for as long as its address (``.address``) is in use.
    """
    # A cfunc loaded from the cache does not start the threading layer (its
    # parfor symbols, e.g. ``allocate_sched``, would be unresolved: LLVM aborts
    # the process), so start it first.
    from numba.np.ufunc import parallel

    parallel._launch_threads()
    return cfunc(SIGNATURES[op, dtype], cache=cache)(_FACTORIES[op](DEPS_KEY))


def build_cfuncs(cache=True, dtypes=None):
    """Compile (or load from Numba's cache) every cfunc of the C ABI (:func:`build_cfunc`).

    Parameters
    ----------
    cache : bool, optional
        Use Numba's on-disk cache (default).  The first run compiles every
        kernel specialization (minutes, one core); later runs load the
        machine code from the cache in a fraction of a second.
    dtypes : collection of str, optional
        Only the cfuncs of these data dtypes (names of :data:`DATA_TYPES`);
        all by default.

    Returns
    -------
    dict
        ``{(operation, dtype name): numba CFunc}``; keep it alive for as long
        as the addresses (``cfunc.address``) are in use.
    """
    return {
        (op, dtype): build_cfunc(op, dtype, cache)
        for op, dtype in SIGNATURES
        if dtypes is None or dtype in dtypes
    }


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
