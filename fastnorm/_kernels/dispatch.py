"""Which compiled kernel runs a call: the schedule's (view, parallel) picks it from one table.

Each kernel family has a parallel build and a serial build of the same source
(:func:`_serial_build`); :data:`KERNELS` maps ``(pass, view, parallel)`` to
the build, for the Python API, and :func:`run_forward`, :func:`run_backward`,
:func:`run_backward_epilogue` (:data:`EPILOGUE_BACKWARD`'s) and the skip add's
:func:`run_skip_forward` /
:func:`run_skip_bias_backward` make the same choice inside compiled code, for
the C ABI's cfuncs (a compiled function cannot index a table of functions).
:func:`run_batch_stats`, :func:`run_backward_reduce` and
:func:`run_backward_apply` those of the BatchNorm split across processes.
``tests/test_kernel_paths.py`` checks that both agree.
"""

from __future__ import annotations

import types

from .._config import helper
from .channels_last import (
    channels_last_backward,
    channels_last_backward_apply,
    channels_last_backward_epilogue,
    channels_last_backward_reduce,
    channels_last_batch_stats,
    channels_last_forward,
    channels_last_inference,
)
from .planes import (
    planes_backward,
    planes_backward_apply,
    planes_backward_epilogue,
    planes_backward_reduce,
    planes_batch_stats,
    planes_forward,
    planes_inference,
)
from .rows import (
    rows_backward,
    rows_forward,
    rows_forward_with_skip,
    rows_inference,
    rows_skip_bias_backward,
    rows_skip_forward,
)
from .schedule import (
    BACKWARD,
    BACKWARD_APPLY,
    BACKWARD_REDUCE,
    BATCH_STATS,
    CHANNELS_LAST_VIEW,
    FORWARD,
    INFERENCE,
    PLANES,
    ROWS,
    SKIP_BIAS_BACKWARD,
    SKIP_FORWARD,
    SPEC_FIELDS,
)


def _serial_build(parallel_kernel, **serial_callees):
    """Compile the same source as ``parallel_kernel`` without threads.

    The clone gets its own ``__qualname__`` so that Numba's on-disk cache keeps
    the two builds apart.  ``serial_callees`` rebinds global names for the
    clone: a function that calls a kernel (:func:`~.rows.rows_forward`) calls
    the kernel's serial build in its own.
    """
    # With NUMBA_DISABLE_JIT=1 the decorators return the plain function.
    func = getattr(parallel_kernel, "py_func", parallel_kernel)
    scope = {**func.__globals__, **serial_callees} if serial_callees else func.__globals__
    clone = types.FunctionType(
        func.__code__, scope, func.__name__ + "_serial", func.__defaults__, func.__closure__
    )
    clone.__qualname__ = func.__qualname__ + "_serial"
    clone.__doc__ = f"Single-threaded build of :func:`{func.__name__}` (same source)."
    return helper(clone)


rows_forward_with_skip_serial = _serial_build(rows_forward_with_skip)
rows_forward_serial = _serial_build(rows_forward, rows_forward_with_skip=rows_forward_with_skip_serial)
rows_skip_forward_serial = _serial_build(
    rows_skip_forward, rows_forward_with_skip=rows_forward_with_skip_serial
)
rows_inference_serial = _serial_build(rows_inference)
rows_backward_serial = _serial_build(rows_backward)
rows_skip_bias_backward_serial = _serial_build(rows_skip_bias_backward)
planes_forward_serial = _serial_build(planes_forward)
planes_inference_serial = _serial_build(planes_inference)
planes_backward_serial = _serial_build(planes_backward)
planes_backward_epilogue_serial = _serial_build(planes_backward_epilogue)
channels_last_forward_serial = _serial_build(channels_last_forward)
channels_last_inference_serial = _serial_build(channels_last_inference)
channels_last_backward_serial = _serial_build(channels_last_backward)
channels_last_backward_epilogue_serial = _serial_build(channels_last_backward_epilogue)
planes_batch_stats_serial = _serial_build(planes_batch_stats)
planes_backward_reduce_serial = _serial_build(planes_backward_reduce)
planes_backward_apply_serial = _serial_build(planes_backward_apply)
channels_last_batch_stats_serial = _serial_build(channels_last_batch_stats)
channels_last_backward_reduce_serial = _serial_build(channels_last_backward_reduce)
channels_last_backward_apply_serial = _serial_build(channels_last_backward_apply)

#: ``{(pass, view, parallel): kernel}``; ``SKIP_FORWARD`` and ``SKIP_BIAS_BACKWARD`` exist
#: for the row view only (they take the ``FORWARD`` and ``BACKWARD`` schedules), the split
#: BatchNorm passes ``BATCH_STATS`` (``FORWARD`` schedule), ``BACKWARD_REDUCE`` and
#: ``BACKWARD_APPLY`` (``BACKWARD`` schedule) for the planes and channels-last views only.
KERNELS = {
    (FORWARD, ROWS, 0): rows_forward_serial,
    (FORWARD, ROWS, 1): rows_forward,
    (FORWARD, PLANES, 0): planes_forward_serial,
    (FORWARD, PLANES, 1): planes_forward,
    (FORWARD, CHANNELS_LAST_VIEW, 0): channels_last_forward_serial,
    (FORWARD, CHANNELS_LAST_VIEW, 1): channels_last_forward,
    (INFERENCE, ROWS, 0): rows_inference_serial,
    (INFERENCE, ROWS, 1): rows_inference,
    (INFERENCE, PLANES, 0): planes_inference_serial,
    (INFERENCE, PLANES, 1): planes_inference,
    (INFERENCE, CHANNELS_LAST_VIEW, 0): channels_last_inference_serial,
    (INFERENCE, CHANNELS_LAST_VIEW, 1): channels_last_inference,
    (BACKWARD, ROWS, 0): rows_backward_serial,
    (BACKWARD, ROWS, 1): rows_backward,
    (BACKWARD, PLANES, 0): planes_backward_serial,
    (BACKWARD, PLANES, 1): planes_backward,
    (BACKWARD, CHANNELS_LAST_VIEW, 0): channels_last_backward_serial,
    (BACKWARD, CHANNELS_LAST_VIEW, 1): channels_last_backward,
    (SKIP_FORWARD, ROWS, 0): rows_skip_forward_serial,
    (SKIP_FORWARD, ROWS, 1): rows_skip_forward,
    (SKIP_BIAS_BACKWARD, ROWS, 0): rows_skip_bias_backward_serial,
    (SKIP_BIAS_BACKWARD, ROWS, 1): rows_skip_bias_backward,
    (BATCH_STATS, PLANES, 0): planes_batch_stats_serial,
    (BATCH_STATS, PLANES, 1): planes_batch_stats,
    (BATCH_STATS, CHANNELS_LAST_VIEW, 0): channels_last_batch_stats_serial,
    (BATCH_STATS, CHANNELS_LAST_VIEW, 1): channels_last_batch_stats,
    (BACKWARD_REDUCE, PLANES, 0): planes_backward_reduce_serial,
    (BACKWARD_REDUCE, PLANES, 1): planes_backward_reduce,
    (BACKWARD_REDUCE, CHANNELS_LAST_VIEW, 0): channels_last_backward_reduce_serial,
    (BACKWARD_REDUCE, CHANNELS_LAST_VIEW, 1): channels_last_backward_reduce,
    (BACKWARD_APPLY, PLANES, 0): planes_backward_apply_serial,
    (BACKWARD_APPLY, PLANES, 1): planes_backward_apply,
    (BACKWARD_APPLY, CHANNELS_LAST_VIEW, 0): channels_last_backward_apply_serial,
    (BACKWARD_APPLY, CHANNELS_LAST_VIEW, 1): channels_last_backward_apply,
}

#: ``{(view, parallel): kernel}`` of the backward through an activation in one kernel
#: (:func:`select_epilogue_backward`), with the ``BACKWARD`` schedule: the planes and the
#: channels-last views; rows (LayerNorm, RMSNorm) run the ``dz`` pass, then the backward
#: (docs/perf-notes/fused-epilogue.md).
EPILOGUE_BACKWARD = {
    (PLANES, 0): planes_backward_epilogue_serial,
    (PLANES, 1): planes_backward_epilogue,
    (CHANNELS_LAST_VIEW, 0): channels_last_backward_epilogue_serial,
    (CHANNELS_LAST_VIEW, 1): channels_last_backward_epilogue,
}


def select(pass_id, params):
    """Return the kernel of :data:`KERNELS` for a pass and a flat ``spec + schedule`` tuple."""
    return KERNELS[pass_id, params[SPEC_FIELDS], params[SPEC_FIELDS + 2]]


def select_epilogue_backward(params):
    """Return the kernel of the backward through ``params``' epilogue in one kernel, or ``None``.

    ``params`` are a ``BACKWARD`` call's.  The planes and channels-last views
    have one (:func:`~.planes.planes_backward_epilogue`,
    :func:`~.channels_last.channels_last_backward_epilogue`; the parallel or
    serial build, as the schedule says): the values of the inference kernel's
    ``dz`` followed by the backward kernel, with the backward's schedule.
    """
    return EPILOGUE_BACKWARD.get((params[SPEC_FIELDS], params[SPEC_FIELDS + 2]))


@helper
def run_forward(pass_id, x, weight, bias, residual, grad, y, mean, rstd, params):
    """Run the forward or inference kernel that :data:`KERNELS` names for ``params`` (compiled)."""
    view = params[8]  # SPEC_FIELDS: Numba slices a heterogeneous tuple only by literals
    parallel = params[10]
    if pass_id == FORWARD:
        if view == ROWS:
            if parallel:
                rows_forward(x, weight, bias, residual, y, mean, rstd, params)
            else:
                rows_forward_serial(x, weight, bias, residual, y, mean, rstd, params)
        elif view == PLANES:
            if parallel:
                planes_forward(x, weight, bias, residual, y, mean, rstd, params)
            else:
                planes_forward_serial(x, weight, bias, residual, y, mean, rstd, params)
        elif parallel:
            channels_last_forward(x, weight, bias, residual, y, mean, rstd, params)
        else:
            channels_last_forward_serial(x, weight, bias, residual, y, mean, rstd, params)
    elif view == ROWS:
        if parallel:
            rows_inference(x, weight, bias, residual, grad, y, mean, rstd, params)
        else:
            rows_inference_serial(x, weight, bias, residual, grad, y, mean, rstd, params)
    elif view == PLANES:
        if parallel:
            planes_inference(x, weight, bias, residual, grad, y, mean, rstd, params)
        else:
            planes_inference_serial(x, weight, bias, residual, grad, y, mean, rstd, params)
    elif parallel:
        channels_last_inference(x, weight, bias, residual, grad, y, mean, rstd, params)
    else:
        channels_last_inference_serial(x, weight, bias, residual, grad, y, mean, rstd, params)


@helper
def run_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params):
    """Run the backward kernel that :data:`KERNELS` names for ``params`` (compiled)."""
    view = params[8]
    parallel = params[10]
    if view == ROWS:
        if parallel:
            rows_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params)
        else:
            rows_backward_serial(dy, x, weight, mean, rstd, dx, dweight, dbias, params)
    elif view == PLANES:
        if parallel:
            planes_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params)
        else:
            planes_backward_serial(dy, x, weight, mean, rstd, dx, dweight, dbias, params)
    elif parallel:
        channels_last_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params)
    else:
        channels_last_backward_serial(dy, x, weight, mean, rstd, dx, dweight, dbias, params)


@helper
def run_backward_epilogue(grad, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params):
    """Run the kernel of :data:`EPILOGUE_BACKWARD` for ``params`` (compiled; planes or channels-last)."""
    if params[8] == PLANES:
        if params[10]:
            planes_backward_epilogue(
                grad, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params
            )
        else:
            planes_backward_epilogue_serial(
                grad, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params
            )
    elif params[10]:
        channels_last_backward_epilogue(
            grad, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params
        )
    else:
        channels_last_backward_epilogue_serial(
            grad, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params
        )


@helper
def run_batch_stats(x, mean, m2, params):
    """Run the ``BATCH_STATS`` kernel of :data:`KERNELS` for ``params`` (compiled)."""
    if params[8] == PLANES:
        if params[10]:
            planes_batch_stats(x, mean, m2, params)
        else:
            planes_batch_stats_serial(x, mean, m2, params)
    elif params[10]:
        channels_last_batch_stats(x, mean, m2, params)
    else:
        channels_last_batch_stats_serial(x, mean, m2, params)


@helper
def run_backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat, params):
    """Run the ``BACKWARD_REDUCE`` kernel of :data:`KERNELS` for ``params`` (compiled)."""
    if params[8] == PLANES:
        if params[10]:
            planes_backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat, params)
        else:
            planes_backward_reduce_serial(dy, x, mean, rstd, sum_dy, sum_dy_xhat, params)
    elif params[10]:
        channels_last_backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat, params)
    else:
        channels_last_backward_reduce_serial(dy, x, mean, rstd, sum_dy, sum_dy_xhat, params)


@helper
def run_backward_apply(dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx, params):
    """Run the ``BACKWARD_APPLY`` kernel of :data:`KERNELS` for ``params`` (compiled)."""
    if params[8] == PLANES:
        if params[10]:
            planes_backward_apply(dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx, params)
        else:
            planes_backward_apply_serial(dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx, params)
    elif params[10]:
        channels_last_backward_apply(dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx, params)
    else:
        channels_last_backward_apply_serial(dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx, params)


@helper
def run_skip_forward(x, skip, skip_bias, weight, bias, h, y, mean, rstd, params):
    """Run the ``SKIP_FORWARD`` kernel of :data:`KERNELS` for ``params`` (compiled)."""
    if params[10]:
        rows_skip_forward(x, skip, skip_bias, weight, bias, h, y, mean, rstd, params)
    else:
        rows_skip_forward_serial(x, skip, skip_bias, weight, bias, h, y, mean, rstd, params)


@helper
def run_skip_bias_backward(dh, dskip_bias, params):
    """Run the ``SKIP_BIAS_BACKWARD`` kernel of :data:`KERNELS` for ``params`` (compiled)."""
    if params[10]:
        rows_skip_bias_backward(dh, dskip_bias, params)
    else:
        rows_skip_bias_backward_serial(dh, dskip_bias, params)
