"""The data and the zero-argument callables of one case: fastnorm, the memcpy and the baselines."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .baselines.floor import (
    floor_add,
    floor_add3_twice,
    floor_add_stream,
    floor_add_twice,
    floor_copy,
    floor_copy_stream,
)
from .baselines.torch import _torch_callable, _torch_epilogue_callable, half_baseline_reason
from .cases import _ROW_KINDS, EPILOGUE_PASSES, EPS, KINDS, RMS_EPS, group_count
from .runtime import load_onednn, optional_torch


@dataclass
class Workload:
    """Zero-argument callables doing the work of one case.

    Attributes
    ----------
    fastnorm : callable
        The fastnorm call, writing into preallocated buffers.
    memcpy : callable
        ``np.copyto`` of the input tensor into a preallocated buffer (of its
        ``uint16`` view for 16-bit data: the same bytes).
    torch : callable or None
        The same work in ``torch.nn.functional``; ``None`` without torch, or
        for a 16-bit case torch has no CPU kernel for (``torch_skip`` says why).
    floor : callable or None
        The pass's traffic floor (:func:`floor_copy` or :func:`floor_add`)
        on the same tensors, writing into the memcpy buffer (on their
        ``uint16`` views for 16-bit data: the floor moves bytes, the integer
        add of the backward floor stands for any elementwise work).
    floor_stream : callable or None
        The same floor with non-temporal stores (:func:`floor_copy_stream`,
        :func:`floor_add_stream`); ``None`` for the epilogue passes.  The
        bench's floor is the faster of the two in each round (and of
        ``memcpy`` for a forward or inference pass).
    onednn : callable or None
        The same pass in oneDNN on preallocated buffers (:mod:`.baselines.onednn`);
        ``None`` when not asked for or oneDNN has no primitive for the case.
    onnxruntime : callable or None
        The same pass in ONNX Runtime on preallocated buffers, through an
        IOBinding (:mod:`.baselines.onnxruntime`); ``None`` when not asked for
        or ONNX Runtime has no operator for the case (backward passes among them).
    inputs : dict
        The epilogue cases' logical input arrays by name (``x``, ``other`` -- the
        residual or the skip --, ``weight``, ``bias``, and ``skip_bias`` for the
        skip epilogue), for checks; empty otherwise.
    torch_skip : str or None
        Why ``torch`` is ``None`` although torch is importable (a 16-bit case
        without a torch CPU kernel), else ``None``.
    prepared : callable or None
        The ``fastnorm`` call through :func:`fastnorm.prepare`: checked once,
        then run on the same buffers, as the oneDNN primitive is
        (``python -m benchmarks.prepared``); ``None`` unless asked for
        (``with_prepared``), and for the epilogue passes.
    """

    fastnorm: Callable[[], object]
    memcpy: Callable[[], object]
    torch: Callable[[], object] | None = None
    floor: Callable[[], object] | None = None
    floor_stream: Callable[[], object] | None = None
    onednn: Callable[[], object] | None = None
    onnxruntime: Callable[[], object] | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    torch_skip: str | None = None
    prepared: Callable[[], object] | None = None


def _spec(case):
    import fastnorm

    cl = case.layout == "nhwc"
    kind = KINDS[case.kind]
    if kind == "batch_norm":
        return fastnorm.NormSpec.batch_norm(EPS, channels_last=cl)
    if kind == "instance_norm":
        return fastnorm.NormSpec.instance_norm(EPS, channels_last=cl)
    if kind == "group_norm":
        return fastnorm.NormSpec.group_norm(group_count(case.shape[1]), EPS, channels_last=cl)
    if kind == "layer_norm":
        return fastnorm.NormSpec.layer_norm(1, EPS)
    return fastnorm.NormSpec.rms_norm(1, RMS_EPS)


def make_workload(
    case,
    seed=0,
    with_torch=True,
    with_onednn=False,
    with_onnxruntime=False,
    threads=None,
    with_prepared=False,
):
    """Build the data and the callables of ``case``.

    Parameters
    ----------
    case : Case
        With 16-bit data (:data:`~benchmarks.cases.HALF_DTYPES`) ``x`` and
        ``dy`` are drawn in float64 and rounded to the 16-bit dtype, and
        ``weight`` and ``bias`` are float32 (torch's "mixed" mode).
    seed : int
        Seed of the random data (activations with per-channel scales and offsets).
    with_torch : bool
        Also build the torch callable (when torch is importable).
    with_onednn : bool
        Also build the oneDNN callable when oneDNN has the case
        (:func:`benchmarks.baselines.onednn.supports`).
    with_onnxruntime : bool
        Also build the ONNX Runtime callable when it has the case
        (:func:`benchmarks.baselines.onnxruntime.supports`).
    threads : int, optional
        Intra-op threads of the ONNX Runtime session (fixed when it is built;
        default: Numba's current thread count).
    with_prepared : bool
        Also build the prepared call (:func:`fastnorm.prepare`) of a forward,
        inference or backward case.

    Raises
    ------
    benchmarks.baselines.onednn.OneDNNError
        ``with_onednn`` and oneDNN cannot be loaded.
    benchmarks.baselines.onnxruntime.OnnxRuntimeError
        ``with_onnxruntime`` and ONNX Runtime cannot be imported.

    Returns
    -------
    Workload
        Callables not yet run: call each once to warm up (compile) before timing.
    """
    import fastnorm

    rng = np.random.default_rng(seed)
    dtype = case.numpy_dtype
    param_dtype = np.dtype(np.float32) if case.half else dtype
    rows = case.kind in _ROW_KINDS
    channels = case.shape[-1] if rows else case.shape[1]
    bshape = (1, -1) if rows else (1, -1) + (1,) * (len(case.shape) - 2)
    scale = rng.uniform(0.5, 3.0, channels).reshape(bshape)
    offset = rng.uniform(-2.0, 2.0, channels).reshape(bshape)
    x_logical = (rng.standard_normal(case.shape) * scale + offset).astype(dtype)
    dy_logical = rng.standard_normal(case.shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(param_dtype)
    bias = None if case.kind == "rms" else rng.uniform(-0.5, 0.5, channels).astype(param_dtype)
    x, dy = _memory_order(case, x_logical), _memory_order(case, dy_logical)
    spec = _spec(case)
    out = np.empty_like(x)
    copy_buffer = np.empty_like(x)
    _, stats = fastnorm.forward(x, spec, weight, bias)

    copy_source, copy_target = _bytes_view(x), _bytes_view(copy_buffer)

    def memcpy():
        np.copyto(copy_target, copy_source)

    if case.pass_ in EPILOGUE_PASSES:
        arrays = (x, dy, x_logical, dy_logical, weight, bias)
        workload = _epilogue_workload(case, rng, spec, arrays, memcpy, with_torch)
        if with_onnxruntime:
            workload.onnxruntime = _onnxruntime_skip_callable(case, workload.inputs, threads)
        return workload
    # The public call is timed as a user writes it: no argument unpacking.
    if case.pass_ == "fwd":
        function, args = fastnorm.forward, (x, spec, weight, bias)

        def fast():
            return fastnorm.forward(x, spec, weight, bias, out=out)

    elif case.pass_ == "inf":
        function, args = fastnorm.forward_inference, (x, stats, spec, weight, bias)

        def fast():
            return fastnorm.forward_inference(x, stats, spec, weight, bias, out=out)

    else:
        function, args = fastnorm.backward, (dy, x, stats, spec, weight)

        def fast():
            return fastnorm.backward(dy, x, stats, spec, weight, out=out)

    x_flat, dy_flat, scratch = (_bytes_view(a).reshape(-1) for a in (x, dy, copy_buffer))
    if case.pass_ == "bwd":

        def floor():
            floor_add(x_flat, dy_flat, scratch)

        def floor_stream():
            floor_add_stream(x_flat, dy_flat, scratch)

    else:

        def floor():
            floor_copy(x_flat, scratch)

        def floor_stream():
            floor_copy_stream(x_flat, scratch)

    workload = Workload(fastnorm=fast, memcpy=memcpy, floor=floor, floor_stream=floor_stream)
    if with_prepared:
        workload.prepared = fastnorm.prepare(function, *args, out=out)
    torch = optional_torch() if with_torch else None
    if torch is not None:
        workload.torch_skip = half_baseline_reason(torch, case)
        if workload.torch_skip is None:
            workload.torch = _torch_callable(torch, case, x_logical, dy_logical, weight, bias, stats)
    if with_onednn:
        workload.onednn = _onednn_callable(case, x, dy, weight, bias, stats)
    if with_onnxruntime:
        workload.onnxruntime = _onnxruntime_callable(case, x, weight, bias, stats, threads)
    return workload


def _epilogue_workload(case, rng, spec, arrays, memcpy, with_torch):
    """Build the :class:`Workload` of an epilogue case (:data:`~benchmarks.cases.EPILOGUE_PASSES`).

    ``arrays`` is ``(x, dy, x_logical, dy_logical, weight, bias)``; the residual
    or skip tensor and the skip bias are drawn here.  fastnorm writes ``y``,
    ``h`` and ``dx`` into preallocated buffers.  No oneDNN callable (oneDNN
    fuses ReLU into BatchNorm only).
    """
    import fastnorm

    x, dy, x_logical, dy_logical, weight, bias = arrays
    epilogue, suffix = case.pass_.split("_")
    other_logical = None if epilogue == "silu" else rng.standard_normal(case.shape).astype(x.dtype)
    other = None if other_logical is None else _memory_order(case, other_logical)
    skip_bias = rng.uniform(-0.5, 0.5, weight.shape).astype(x.dtype) if epilogue == "skip" else None
    out, dx, h = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    if epilogue == "skip":
        extra = {"skip": other, "skip_bias": skip_bias, "sum_out": h}
        backward_extra = {}
    else:
        spec = dataclasses.replace(spec, activation="relu" if epilogue == "resrelu" else "silu")
        extra = {"residual": other}
        backward_extra = {"bias": bias, "residual": other}

    def fast_forward():
        return fastnorm.forward(x, spec, weight, bias, out=out, **extra)

    def fast_forward_backward():
        _, stats = fastnorm.forward(x, spec, weight, bias, out=out, **extra)
        return fastnorm.backward(dy, x, stats, spec, weight, out=dx, **backward_extra)

    floor = _epilogue_floor(
        epilogue, suffix, x.reshape(-1), dy.reshape(-1), None if other is None else other.reshape(-1)
    )
    workload = Workload(
        fastnorm=fast_forward if suffix == "fwd" else fast_forward_backward, memcpy=memcpy, floor=floor
    )
    workload.inputs = {"x": x_logical, "other": other_logical, "weight": weight, "bias": bias}
    if skip_bias is not None:
        workload.inputs["skip_bias"] = skip_bias
    torch = optional_torch() if with_torch else None
    if torch is not None:
        workload.torch = _torch_epilogue_callable(
            torch, case, x_logical, other_logical, dy_logical, weight, bias, skip_bias
        )
    return workload


def _epilogue_floor(epilogue, suffix, x, dy, other):
    """Return the traffic floor of an epilogue pass: each input read once, each output written once.

    ``fwd``: ``x`` (and the residual or skip) in; ``y`` (and ``h``) out.  ``fb``:
    that, then ``dy``, ``x`` (``h`` after a skip add) and the residual in, ``dx``
    (and ``dresidual``) out.  No implementation moves less: the statistics need
    ``x`` before ``y`` and ``dy`` before ``dx``, so a real pass reads more
    (docs/perf-notes/fused-epilogue.md).  Writes into its own scratch buffers.
    """
    y, h, dx, dresidual = (np.empty_like(x) for _ in range(4))

    def forward():
        if epilogue == "silu":
            floor_copy(x, y)
        elif epilogue == "resrelu":
            floor_add(x, other, y)
        else:
            floor_add_twice(x, other, h, y)

    def forward_backward():
        forward()
        if epilogue == "silu":
            floor_add(dy, x, dx)
        elif epilogue == "resrelu":
            floor_add3_twice(dy, x, other, dx, dresidual)
        else:
            floor_add(dy, h, dx)

    return forward if suffix == "fwd" else forward_backward


def _bytes_view(array):
    """``array`` itself, or the ``uint16`` view of 16-bit data (NumPy and Numba copy plain integers)."""
    return array.view(np.uint16) if array.dtype.itemsize == 2 else array


def _memory_order(case, logical):
    """``logical`` (N, C, ...) in ``case``'s memory layout."""
    return np.ascontiguousarray(np.moveaxis(logical, 1, -1)) if case.layout == "nhwc" else logical


def _onednn_callable(case, x, dy, weight, bias, stats):
    """Build the oneDNN callable of ``case`` on its own output buffers, or ``None``.

    ``None`` also when oneDNN has no implementation on this CPU (16-bit data:
    float16 needs ``avx512_core_fp16``).
    """
    from .baselines import onednn

    kind = KINDS[case.kind]
    if not onednn.supports(kind, case.layout, case.numpy_dtype):
        return None
    load_onednn()
    repeat = case.shape[0] if kind == "instance_norm" else 1
    weight_v, bias_v = np.tile(weight, repeat), np.tile(bias, repeat)
    mean = np.asarray(stats.mean, np.float32).reshape(-1)
    variance = (1.0 / np.square(np.asarray(stats.rstd, np.float64)) - EPS).astype(np.float32).reshape(-1)
    out = np.empty_like(x)
    x2d = x.reshape(case.shape) if kind == "layer_norm" else x
    grads = (np.empty_like(weight_v), np.empty_like(bias_v))
    try:
        return onednn.normalization(
            kind,
            case.pass_,
            case.layout,
            x2d,
            out.reshape(x2d.shape),
            weight_v,
            bias_v,
            mean,
            variance,
            EPS,
            dy=dy.reshape(x2d.shape),
            grads=grads,
        )
    except onednn.OneDNNError as exc:
        if case.half and exc.status == onednn.UNIMPLEMENTED:
            return None
        raise


def _onnxruntime_threads(threads):
    if threads is not None:
        return threads
    import numba

    return numba.get_num_threads()


def _onnxruntime_callable(case, x, weight, bias, stats, threads):
    """Build the ONNX Runtime callable of a plain pass of ``case`` on its own output buffer, or ``None``.

    BatchNorm's ``inf`` reads fastnorm's statistics (the biased variance
    ``1 / rstd**2 - eps``); its ``fwd`` computes batch statistics and updates
    running ones it is given (the same values, read only).
    """
    from .baselines import onnxruntime

    kind = KINDS[case.kind]
    if not onnxruntime.supports(kind, case.pass_, case.layout, case.numpy_dtype):
        return None
    mean = variance = None
    if kind == "batch_norm":
        mean = np.ascontiguousarray(np.asarray(stats.mean, x.dtype).reshape(-1))
        rstd = np.asarray(stats.rstd, np.float64).reshape(-1)
        variance = (1.0 / np.square(rstd) - EPS).astype(x.dtype)
    return onnxruntime.normalization(
        kind,
        case.pass_,
        case.layout,
        x,
        np.empty_like(x),
        weight,
        bias,
        RMS_EPS if kind == "rms_norm" else EPS,
        threads=_onnxruntime_threads(threads),
        groups=group_count(case.shape[1]) if kind == "group_norm" else None,
        mean=mean,
        variance=variance,
    )


def _onnxruntime_skip_callable(case, inputs, threads):
    """Build the ONNX Runtime callable of an epilogue case (``skip_fwd`` only), or ``None``.

    ``inputs`` are the epilogue workload's (:attr:`Workload.inputs`): the same
    ``x``, skip, weight, bias and skip bias as fastnorm's call.
    """
    from .baselines import onnxruntime

    kind = KINDS[case.kind]
    if not onnxruntime.supports(kind, case.pass_, case.layout, case.numpy_dtype):
        return None
    x = inputs["x"]
    return onnxruntime.normalization(
        kind,
        case.pass_,
        case.layout,
        x,
        np.empty_like(x),
        inputs["weight"],
        inputs["bias"],
        RMS_EPS if kind == "rms_norm" else EPS,
        threads=_onnxruntime_threads(threads),
        skip=inputs["other"],
        skip_bias=inputs["skip_bias"],
        sum_out=np.empty_like(x),
    )
