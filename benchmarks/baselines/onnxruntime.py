"""ONNX Runtime's normalization operators on preallocated buffers: a baseline of :mod:`benchmarks`.

ONNX Runtime (``onnxruntime``, the CPU execution provider) is the inference
engine most ONNX models run on.  This module builds a one-node ONNX model
(:mod:`onnx.helper`) for a normalization pass, opens an
:class:`onnxruntime.InferenceSession` on it (``intra_op_num_threads`` = the
benchmark's thread count, ``inter_op_num_threads=1``, sequential execution,
every graph optimization on, idle threads not spinning: :data:`SPINNING`) and
binds the caller's NumPy buffers as its inputs and outputs through an
:class:`onnxruntime.IOBinding` of :class:`onnxruntime.OrtValue` objects over
that memory (no copies), so that a call runs the operator on preallocated
outputs, like fastnorm's ``out=`` calls, and allocates no output (GroupNorm's
composite, below, takes its intermediates from ONNX Runtime's arena).  It is
a benchmark baseline, not a dependency: fastnorm itself never imports ONNX
Runtime.  ``onnxruntime`` and ``onnx`` are in the ``bench`` extra.

ONNX Runtime is an inference engine: only forward passes are compared.  What
the CPU execution provider of ONNX Runtime 1.32 offers, and therefore what
is compared (:func:`supports`):

* BatchNorm, ``BatchNormalization`` (opset 15), float32 and float64: ``inf``
  with ``training_mode=0`` on the given mean and variance, ``fwd`` with
  ``training_mode=1`` (batch statistics; the running statistics it also
  writes go to scratch buffers).  ONNX's BatchNorm is channels-first and the
  CPU provider has no channels-last kernel: a ``Transpose -> BatchNormalization
  -> Transpose`` model keeps both transposes after optimization (the NHWC
  transformer rewrites none of them; only a preceding ``Conv`` makes it fold
  BatchNorm into an NCHWc convolution).  A channels-last case therefore runs
  the same operator on the ``(N*H*W, C)`` view of the same memory: a 2-D input
  is ``(batch, channels)`` to ``BatchNormalization``, so the statistics and the
  affine parameters are per channel, as in the case;
* InstanceNorm, ``InstanceNormalization``, float32 only (the provider has no
  float64 kernel), NCHW only;
* GroupNorm, ``GroupNormalization`` (opset 21: weight and bias per channel),
  NCHW, float32 and float64 (``stash_type`` double: by default its
  statistics are float32).  ONNX Runtime has no kernel for it: it inlines
  the operator's ONNX function body, 29 nodes (``Reshape``, ``ReduceMean``,
  ``Sub``, ``Mul``, ``Sqrt``, ``Div``, ``Add``...), so this baseline is that
  composite (the contrib ``com.microsoft.GroupNorm`` has no CPU kernel);
* LayerNorm, ``LayerNormalization`` (opset 17, ``axis=-1``), float32 and
  float64; ``fwd`` also writes the ``Mean`` and ``InvStdDev`` outputs (float32);
* RMSNorm, ``RMSNormalization`` (opset 23, ``axis=-1``), float32 and float64;
* the skip epilogue ``skip_fwd`` (``norm(x + skip + skip_bias)``, returning the
  sum too), float32: ``com.microsoft.SkipLayerNormalization`` (LayerNorm) and
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (RMSNorm), with their
  ``input_skip_bias_sum`` output bound to the sum buffer.

ONNX's InstanceNorm, GroupNorm, LayerNorm and RMSNorm have no given-statistics
form, so their ``inf`` baseline is the ordinary forward (as torch's is).
There are no backward passes, and no 16-bit cases: the provider has no
bfloat16 kernels, and its float16 BatchNorm, InstanceNorm and GroupNorm run
as float32 between ``Cast`` nodes.
"""

from __future__ import annotations

import numpy as np

from . import dtype_name as _dtype_name

__all__ = ["OnnxRuntimeError", "load", "supports", "normalization", "OPSETS", "SPINNING"]

#: The ONNX opset each operator's model imports (the version of the operator it uses).
OPSETS = {
    "batch_norm": 15,
    "instance_norm": 17,
    "group_norm": 21,
    "layer_norm": 17,
    "rms_norm": 23,
}
#: Passes the baseline covers: ONNX Runtime runs forward passes only.
PASSES = ("fwd", "inf", "skip_fwd")
_MS_DOMAIN = "com.microsoft"
#: Session option turning off the spinning of ONNX Runtime's idle intra-op threads.  By
#: default they busy-wait after each run and take a core from whatever runs next -- in an
#: interleaved round, fastnorm's turn: on ``ln-fwd-nchw-f32-4096x768`` (2 threads) fastnorm
#: measured 0.84-1.0 ms next to a spinning session and 0.38-0.45 ms with this option, ONNX
#: Runtime's own time 1.16-1.30 ms either way; ``session.force_spinning_stop`` left fastnorm
#: at 0.49-0.58 ms.  (torch's OpenMP threads do the same: :data:`benchmarks.runtime.TORCH_SPINCOUNT`.)
SPINNING = ("session.intra_op.allow_spinning", "0")
#: Momentum of BatchNorm's training mode (it updates running statistics nobody reads).
_MOMENTUM = 0.9


class OnnxRuntimeError(RuntimeError):
    """ONNX Runtime (or ``onnx``) cannot be imported, or a session cannot be built."""


def load():
    """Import ``onnxruntime`` and ``onnx`` and return ``onnxruntime``.

    Returns
    -------
    module
        ``onnxruntime``, with its default log level raised to errors (its
        warnings about serializing optimized models and unused outputs are
        noise here).

    Raises
    ------
    OnnxRuntimeError
        When either package is missing (``pip install onnxruntime onnx``; both
        are in the ``bench`` extra).
    """
    try:
        import onnx  # noqa: F401  (the model builder)
        import onnxruntime
    except ImportError as exc:
        raise OnnxRuntimeError(f"cannot import ONNX Runtime (pip install onnxruntime onnx): {exc}") from exc
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def supports(kind, pass_, layout, dtype):
    """Whether ONNX Runtime's CPU provider has an operator for this benchmark case.

    Parameters
    ----------
    kind : str
        ``"batch_norm"``, ``"instance_norm"``, ``"group_norm"``,
        ``"layer_norm"`` or ``"rms_norm"``.
    pass_ : str
        ``"fwd"``, ``"inf"``, ``"bwd"`` or an epilogue pass (``"skip_fwd"``...).
    layout : str
        ``"nchw"`` or ``"nhwc"``.
    dtype : numpy dtype-like

    Returns
    -------
    bool
        See the module docstring.
    """
    name = _dtype_name(dtype)
    if pass_ == "skip_fwd":
        return kind in ("layer_norm", "rms_norm") and name == "float32"
    if pass_ not in ("fwd", "inf") or name not in ("float32", "float64"):
        return False
    if kind == "batch_norm":
        return True
    if kind == "instance_norm":
        return layout == "nchw" and name == "float32"
    if kind == "group_norm":
        return layout == "nchw"
    return kind in ("layer_norm", "rms_norm")


_TENSOR_TYPES = {"float32": 1, "float64": 11}  # onnx.TensorProto.FLOAT, DOUBLE


def _model(op, inputs, outputs, attributes, opset, domain=""):
    """Build a one-node ONNX model of ``op`` whose inputs and outputs have the names, dtypes and shapes given.

    ``inputs`` and ``outputs`` are ``(name, array)`` pairs; an output named
    ``""`` is an optional output left out.
    """
    from onnx import helper

    def info(name, array):
        return helper.make_tensor_value_info(name, _TENSOR_TYPES[array.dtype.name], list(array.shape))

    node = helper.make_node(op, [n for n, _ in inputs], [n for n, _ in outputs], domain=domain, **attributes)
    graph = helper.make_graph(
        [node],
        f"fastnorm_bench_{op}",
        [info(n, a) for n, a in inputs],
        [info(n, a) for n, a in outputs if n],
    )
    imports = [helper.make_opsetid("", opset)]
    if domain:
        imports.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=imports, producer_name="fastnorm-benchmarks")
    model.ir_version = helper.find_min_ir_version_for(imports, ignore_unknown=True)
    return model


def _checked(name, array, dtype_name):
    if array.dtype.name != dtype_name or not array.flags.c_contiguous:
        raise ValueError(
            f"ONNX Runtime buffer {name} must be a C-contiguous {dtype_name} array; "
            f"got {array.dtype.name}{'' if array.flags.c_contiguous else ', not C-contiguous'}"
        )
    return array


class _Session:
    """An :class:`onnxruntime.InferenceSession` bound to its buffers: calling it runs the model once.

    A call returns ``result``: the caller's output array (``y``), or ``(y,
    sum_out)`` for the skip epilogue, filled in place.
    """

    def __init__(self, ort, model, inputs, outputs, threads, result):
        self.result = result
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(*SPINNING)
        try:
            self.session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types (NOT_IMPLEMENTED...)
            raise OnnxRuntimeError(f"ONNX Runtime cannot run {model.graph.node[0].op_type}: {exc}") from exc
        # The OrtValues wrap the NumPy memory (CPU: no copy); they and the arrays must outlive the binding.
        self._keep = [(a, ort.OrtValue.ortvalue_from_numpy(a)) for _, a in inputs + outputs if a is not None]
        self.binding = self.session.io_binding()
        values = iter(self._keep)
        for name, _ in inputs:
            self.binding.bind_ortvalue_input(name, next(values)[1])
        for name, _ in outputs:
            if name:
                self.binding.bind_ortvalue_output(name, next(values)[1])
        self._run = self.session.run_with_iobinding

    def __call__(self):
        self._run(self.binding)
        return self.result


def normalization(
    kind,
    pass_,
    layout,
    x,
    out,
    weight,
    bias=None,
    eps=1e-5,
    *,
    threads=1,
    groups=None,
    mean=None,
    variance=None,
    skip=None,
    skip_bias=None,
    sum_out=None,
):
    """Build a callable that runs one forward pass in ONNX Runtime on the given buffers.

    Parameters
    ----------
    kind : str
        ``"batch_norm"``, ``"instance_norm"``, ``"group_norm"``,
        ``"layer_norm"`` or ``"rms_norm"``.
    pass_ : str
        ``"fwd"`` (BatchNorm: batch statistics), ``"inf"`` (BatchNorm: the
        given ``mean`` and ``variance``; the others: the same as ``fwd``) or
        ``"skip_fwd"`` (LayerNorm, RMSNorm: ``norm(x + skip + skip_bias)``).
    layout : str
        Memory of ``x``: ``"nchw"``, or ``"nhwc"`` (an ``(N, H, W, C)`` array,
        BatchNorm only); ignored for LayerNorm and RMSNorm (``(rows, width)``).
    x, out : numpy.ndarray
        Input and output ``y``, C-contiguous, same shape and dtype (float32 or
        float64, see :func:`supports`).
    weight, bias : numpy.ndarray
        Per channel (per element of a row for LayerNorm, RMSNorm), the dtype of
        ``x``; ``bias`` is ``None`` for RMSNorm.
    eps : float
    threads : int
        ``intra_op_num_threads`` of the session (its thread pool is fixed when
        the session is built).
    groups : int, optional
        GroupNorm's group count.
    mean, variance : numpy.ndarray, optional
        BatchNorm's statistics (per channel, the dtype of ``x``): read by
        ``inf``; the running statistics ``fwd`` updates (read only).
        ``variance`` is the biased variance.
    skip, skip_bias, sum_out : numpy.ndarray, optional
        ``skip_fwd``: the skip tensor (like ``x``), its per-element bias (like
        ``weight``) and the output of the sum ``x + skip + skip_bias`` (like ``x``).

    Returns
    -------
    callable
        Zero-argument callable running the pass and returning ``out`` (``skip_fwd``:
        ``(out, sum_out)``); the buffers stay owned by the caller and must outlive it.

    Raises
    ------
    OnnxRuntimeError
        ONNX Runtime is not installed, or cannot build the session.
    ValueError
        A case ONNX Runtime does not cover (:func:`supports`), a missing
        argument, or a buffer of the wrong dtype or not C-contiguous.
    """
    ort = load()
    dtype_name = x.dtype.name
    if not supports(kind, pass_, layout, x.dtype):
        raise ValueError(f"ONNX Runtime has no {pass_} {kind} for {layout} {dtype_name} here")
    buffers = {"x": x, "out": out, "weight": weight, "bias": bias, "mean": mean, "variance": variance}
    buffers.update({"skip": skip, "skip_bias": skip_bias, "sum_out": sum_out})
    for name, array in buffers.items():
        if array is not None:
            _checked(name, array, dtype_name)
    if out.shape != x.shape:
        raise ValueError(f"out has shape {out.shape}, x has {x.shape}")

    if pass_ == "skip_fwd":
        if skip is None or skip_bias is None or sum_out is None:
            raise ValueError("skip_fwd needs skip, skip_bias and sum_out")
        rows = x.shape[:-1]
        stats = [np.empty((*rows, 1), np.float32) for _ in range(2)]
        if kind == "layer_norm":
            op = "SkipLayerNormalization"
            inputs = [("input", x), ("skip", skip), ("gamma", weight), ("beta", bias), ("bias", skip_bias)]
        else:
            op = "SkipSimplifiedLayerNormalization"
            inputs = [("input", x), ("skip", skip), ("gamma", weight), ("bias", skip_bias)]
        outputs = [("output", out), ("mean", stats[0]), ("inv_std_var", stats[1])]
        outputs.append(("input_skip_bias_sum", sum_out))
        model = _model(op, inputs, outputs, {"epsilon": float(eps)}, 17, domain=_MS_DOMAIN)
        return _Session(ort, model, inputs, outputs, threads, (out, sum_out))

    result = out
    attributes = {"epsilon": float(eps)}
    outputs = [("Y", out)]
    if kind == "batch_norm":
        if mean is None or variance is None:
            raise ValueError("BatchNorm needs mean and variance (inf: the statistics; fwd: running ones)")
        if layout == "nhwc":  # channels-last memory as (batch, channels): the module docstring
            x, out = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
            outputs = [("Y", out)]
        op = "BatchNormalization"
        inputs = [("X", x), ("scale", weight), ("B", bias), ("input_mean", mean), ("input_var", variance)]
        if pass_ == "fwd":
            attributes.update(training_mode=1, momentum=_MOMENTUM)
            outputs += [("running_mean", np.empty_like(mean)), ("running_var", np.empty_like(variance))]
    elif kind == "instance_norm":
        op = "InstanceNormalization"
        inputs = [("input", x), ("scale", weight), ("B", bias)]
    elif kind == "group_norm":
        if groups is None:
            raise ValueError("GroupNorm needs groups")
        op = "GroupNormalization"
        inputs = [("X", x), ("scale", weight), ("bias", bias)]
        attributes["num_groups"] = int(groups)
        if dtype_name == "float64":  # the function body casts to float32 unless told otherwise
            attributes["stash_type"] = _TENSOR_TYPES["float64"]
    elif kind == "layer_norm":
        op = "LayerNormalization"
        inputs = [("X", x), ("Scale", weight), ("B", bias)]
        attributes["axis"] = -1
        if pass_ == "fwd":  # the training forward also writes the statistics (float32 here)
            rows = x.shape[:-1]
            outputs += [("Mean", np.empty((*rows, 1), np.float32))]
            outputs += [("InvStdDev", np.empty((*rows, 1), np.float32))]
    else:
        op = "RMSNormalization"
        inputs = [("X", x), ("scale", weight)]
        attributes["axis"] = -1
    model = _model(op, inputs, outputs, attributes, OPSETS[kind])
    return _Session(ort, model, inputs, outputs, threads, result)
