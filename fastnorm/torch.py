"""PyTorch autograd functions and ``torch.nn`` modules that run fastnorm's kernels on CPU tensors.

``import fastnorm`` never imports torch; ``import fastnorm.torch`` does.

The functions have ``torch.nn.functional``'s names and arguments, plus the fused
epilogue (``residual=``, ``activation=``, ``negative_slope=``), and are differentiable
with respect to the input, the weight, the bias and the residual. The modules subclass
torch's own (``torch.nn.BatchNorm2d`` ...), so they have torch's constructor
arguments, parameter and buffer names and ``state_dict`` layout: a torch checkpoint
loads into them and back. :func:`convert` turns the norm modules of a model into
them, in place.

Tensors are shared with the kernels, never converted: a CPU tensor's NumPy view goes
in, and the output array comes back as a tensor over the same memory. A contiguous or
``channels_last`` / ``channels_last_3d`` input runs without a copy and its output has
the same memory format; any other strides are copied once into C order. float32 and
float64; bfloat16 and float16 data (float32 or same-dtype parameters) when ml_dtypes
is installed (the ``bf16`` extra), without an activation.

The kernels are ``torch.library`` custom ops with fake implementations and autograd
(``fastnorm::forward``, ``fastnorm::backward``, ``fastnorm::forward_inference``), so
that ``torch.compile`` traces through them. The training pass (statistics of the batch)
runs fastnorm's forward and backward kernels. The backward of a pass with fixed
statistics (``BatchNorm`` in eval mode, ``InstanceNorm`` with running statistics) is an
elementwise affine map, computed with torch operations.
"""

from __future__ import annotations

import copy
import functools
import os

import numpy as np
import torch
import torch.fx
import torch.nn.functional as torch_functional
from torch.autograd.function import once_differentiable

import fastnorm
from fastnorm import _kernels as K
from fastnorm import _threading
from fastnorm import functional as _np_functional
from fastnorm._buffers import _check_like_x, _check_param, _kernel_view
from fastnorm._plan import _EMPTY, _kernel_call, _plan
from fastnorm.core import _backward_kernels
from fastnorm.spec import NormSpec, check_epilogue, check_eps, check_positive_int

# The kernels run on torch's OpenMP threads unless Numba's pool already runs (see _threading).
_threading.share_torch_openmp()

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "convert_sync_batchnorm",
    "fold_conv_bn",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "skip_layer_norm",
    "skip_rms_norm",
]

_FLOAT_TYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
#: The dtypes whose tensors the kernels read through ``tensor.numpy()`` (16-bit ones take a view).
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _array(tensor):
    """Return the NumPy view of a CPU tensor (``None`` stays ``None``); bfloat16 as ml_dtypes'.

    The public functions have checked the tensor (:func:`_check_tensor`).
    """
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # the bf16 extra

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _tensor(array):
    """Return a tensor over ``array``'s memory (``None`` stays ``None``)."""
    if array is None:
        return None
    if array.dtype.itemsize == 2 and array.dtype.name == "bfloat16":  # .name: 1-3 us
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _gradient(x, grad, dtype):
    """Return ``grad`` as a tensor of ``dtype``, or a fresh empty tensor if not computed.

    Fresh: a custom op's outputs must not alias one another.
    """
    return x.new_empty(0) if grad is None else _tensor(grad).to(dtype)


def _check_tensor(tensor, name, optional=True):
    """Raise ``TypeError`` / ``ValueError`` naming ``tensor`` unless it is a floating CPU tensor."""
    if tensor is None and optional:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}: fastnorm.torch runs on CPU tensors only")
    if tensor.dtype not in _FLOAT_TYPES:
        raise TypeError(
            f"{name}.dtype={tensor.dtype} is not supported: float32, float64, float16 or bfloat16"
        )


@functools.lru_cache(maxsize=256)
def _spec(kind, arg, eps, activation, negative_slope):
    """Return the :class:`fastnorm.NormSpec` of an op's arguments (built once per distinct call)."""
    epilogue = {"activation": activation, "negative_slope": negative_slope}
    if kind == "batch_norm":
        return NormSpec.batch_norm(eps, **epilogue)
    if kind == "instance_norm":
        return NormSpec.instance_norm(eps, **epilogue)
    if kind == "group_norm":
        return NormSpec.group_norm(arg, eps, **epilogue)
    if kind == "layer_norm":
        return NormSpec.layer_norm(arg, eps, **epilogue)
    return NormSpec.rms_norm(arg, eps, **epilogue)


def _channels_last_format(x, kind):
    """Return the channels-last format in which the kernel reads ``x`` in place, or ``None`` (C order)."""
    if kind in ("layer_norm", "rms_norm") or x.is_contiguous():
        return None
    for memory_format, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == ndim and x.is_contiguous(memory_format=memory_format):
            return memory_format
    return None


def _kernel_layout(tensor, x, kind):
    """Return ``tensor`` (``x`` or one of its shape) in the order the kernel reads ``x`` in (a copy if not).

    The channel norms read a ``channels_last`` / ``channels_last_3d`` input in
    place and anything else in C order; LayerNorm and RMSNorm read C order.
    """
    if tensor is None:
        return None
    memory_format = _channels_last_format(x, kind)
    return tensor.contiguous(memory_format=memory_format or torch.contiguous_format)


def _kernel_layouts(x, residual, kind):
    """``(x, residual)`` in the order the kernel reads ``x`` in (:func:`_kernel_layout`)."""
    return _kernel_layout(x, x, kind), _kernel_layout(residual, x, kind)


def _empty_output(x, kind):
    """Return an uninitialized tensor of ``x``'s shape and dtype, in the order the kernel writes it in.

    The kernels write every output into tensors from torch's allocator, 64-byte
    aligned as torch's own outputs (NumPy's large arrays start 16 bytes into a page).
    """
    memory_format = _channels_last_format(x, kind)
    return torch.empty_like(x, memory_format=memory_format or torch.contiguous_format)


def _stats_shape(x, kind, arg):
    if kind == "batch_norm":
        return (x.shape[1],)
    if kind == "instance_norm":
        return (x.shape[0], x.shape[1])
    if kind == "group_norm":
        return (x.shape[0], arg)
    return tuple(x.shape[: x.dim() - arg])


# Each pass is a Python body registered twice: as a torch.library custom op (with a
# fake implementation and autograd) for torch.compile, and as a torch.autograd.Function
# with the same autograd formulas for eager calls, whose dispatch costs a fraction of
# the custom op's: docs/perf-notes/torch-eager-dispatch.md.


def _custom_op(name, body):
    """Register ``body`` as the CPU custom op ``name`` (it returns fresh tensors, mutates none)."""
    return torch.library.custom_op(name, mutates_args=(), device_types="cpu")(body)


def _eager_function(body, setup_context, backward, backward_pass=None):
    """Return the ``torch.autograd.Function`` that runs ``body`` with a custom op's autograd formulas.

    ``setup_context`` and ``backward`` are the functions registered with the op's
    ``register_autograd``; ``setup_context`` stores the op that the backward calls
    in ``ctx.backward_pass``, which here becomes that op's body ``backward_pass``.
    """

    # forward(ctx, ...) rather than a setup_context method, which costs about 25 us
    # a call more (torch binds the arguments to forward's signature with inspect).
    def forward(ctx, *args):
        output = body(*args)
        setup_context(ctx, args, output)
        if backward_pass is not None:
            ctx.backward_pass = backward_pass
        return output

    # the profiler names the calls after the class: fastnorm_forward, fastnorm_forwardBackward
    name = "fastnorm_" + body.__name__.strip("_").removesuffix("_impl")
    methods = {"forward": staticmethod(forward), "backward": staticmethod(once_differentiable(backward))}
    return type(name, (torch.autograd.Function,), methods)


def _run(op, function, *args):
    """Call the custom op ``op`` when torch.compile traces the call, else its eager ``function``."""
    if torch.compiler.is_compiling():
        return op(*args)
    return function.apply(*args)


def _forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    kind: str,
    arg: int,
    eps: float | None,
    activation: str | None,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)`` of :func:`fastnorm.forward` (the training pass)."""
    spec = _spec(kind, arg, eps, activation, negative_slope)
    x, residual = _kernel_layouts(x, residual, kind)
    y = _empty_output(x, kind)
    _, stats = fastnorm.forward(
        _array(x), spec, _array(weight), _array(bias), residual=_array(residual), out=_array(y)
    )
    return y, torch.from_numpy(stats.mean), torch.from_numpy(stats.rstd)


_forward_op = _custom_op("fastnorm::forward", _forward_impl)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, residual, kind, arg, eps, activation, negative_slope):
    shape = _stats_shape(x, kind, arg)
    return (
        _empty_output(x, kind),
        x.new_empty(shape, dtype=torch.float64),
        x.new_empty(shape, dtype=torch.float64),
    )


def _backward_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    kind: str,
    arg: int,
    eps: float | None,
    activation: str | None,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias, dresidual)`` of :func:`fastnorm.backward`; empty where not computed.

    ``dresidual`` is computed only with an activation (otherwise it is ``dy``).
    """
    spec = _spec(kind, arg, eps, activation, negative_slope)
    x, residual = _kernel_layouts(x, residual, kind)
    stats = fastnorm.Stats(
        mean.numpy(), rstd.numpy(), has_bias=bias is not None, has_residual=residual is not None
    )
    fused = activation is not None
    dx = _empty_output(x, kind)
    grads = fastnorm.backward(
        _array(dy),
        _array(x),
        stats,
        spec,
        _array(weight),
        bias=_array(bias) if fused else None,
        residual=_array(residual) if fused else None,
        with_bias=bias is not None,
        out=_array(dx),
    )
    _, dweight, dbias = grads
    return (
        dx,
        _gradient(x, dweight, None if weight is None else weight.dtype),
        _gradient(x, dbias, None if bias is None else bias.dtype),
        _gradient(x, grads.dresidual if fused and residual is not None else None, x.dtype),
    )


_backward_op = _custom_op("fastnorm::backward", _backward_impl)


@_backward_op.register_fake
def _backward_fake(dy, x, weight, bias, residual, mean, rstd, kind, arg, eps, activation, negative_slope):
    return (
        _empty_output(x, kind),
        x.new_empty(0) if weight is None else torch.empty_like(weight),
        x.new_empty(0) if bias is None else torch.empty_like(bias),
        _empty_output(x, kind) if activation is not None and residual is not None else x.new_empty(0),
    )


def _forward_setup(ctx, inputs, output):
    x, weight, bias, residual, *params = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
    ctx.params = params
    ctx.backward_pass = _backward_op


def _input_grads(grads, dy, weight, bias, residual, activation):
    """Autograd's gradients of ``(x, weight, bias, residual)`` from a backward pass's ``grads``.

    ``grads = (dx, dweight, dbias, dresidual)``; ``None`` for an absent input.
    """
    dx, dweight, dbias, dresidual = grads
    if residual is not None and activation is None:
        dresidual = dy  # no activation: the residual's gradient is y's
    return (
        dx,
        None if weight is None else dweight,
        None if bias is None else dbias,
        None if residual is None else dresidual,
    )


def _forward_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    grads = ctx.backward_pass(dy, x, weight, bias, residual, mean, rstd, *ctx.params)
    return *_input_grads(grads, dy, weight, bias, residual, ctx.params[3]), *[None] * len(ctx.params)


_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)
_Forward = _eager_function(_forward_impl, _forward_setup, _forward_backward, _backward_impl)


def _inference_impl(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str | None,
    negative_slope: float,
) -> torch.Tensor:
    """:func:`fastnorm.forward_inference` with per-channel statistics (BatchNorm's ``eps`` is in ``rstd``)."""
    spec = NormSpec.batch_norm(0.0, activation=activation, negative_slope=negative_slope)
    x, residual = _kernel_layouts(x, residual, "batch_norm")
    stats = fastnorm.Stats(mean.numpy(), rstd.numpy())
    y = _empty_output(x, "batch_norm")
    fastnorm.forward_inference(
        _array(x), stats, spec, _array(weight), _array(bias), residual=_array(residual), out=_array(y)
    )
    return y


_inference_op = _custom_op("fastnorm::forward_inference", _inference_impl)


@_inference_op.register_fake
def _inference_fake(x, weight, bias, residual, mean, rstd, activation, negative_slope):
    return _empty_output(x, "batch_norm")


_TORCH_ACTIVATIONS = {
    "relu": lambda z, slope: torch.relu(z),
    "leaky_relu": lambda z, slope: torch_functional.leaky_relu(z, slope),
    "sigmoid": lambda z, slope: torch.sigmoid(z),
    "tanh": lambda z, slope: torch.tanh(z),
    "silu": lambda z, slope: torch_functional.silu(z),
    "gelu": lambda z, slope: torch_functional.gelu(z),
    "gelu_tanh": lambda z, slope: torch_functional.gelu(z, approximate="tanh"),
}


def _inference_setup(ctx, inputs, output):
    x, weight, bias, residual, mean, rstd, activation, negative_slope = inputs
    ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
    ctx.activation, ctx.negative_slope = activation, negative_slope


def _inference_backward(ctx, dy):
    """Differentiate ``act((x - mean) * rstd * weight + bias + residual)`` with torch operations."""
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    saved = (x, weight, bias, residual)
    wanted = [s is not None and ctx.needs_input_grad[i] for i, s in enumerate(saved)]
    inputs = [None if s is None else s.detach().requires_grad_(w) for s, w in zip(saved, wanted, strict=True)]
    x, weight, bias, residual = inputs
    shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel, axis 1
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    with torch.enable_grad():
        z = (x.to(compute) - mean.to(compute).reshape(shape)) * rstd.to(compute).reshape(shape)
        if weight is not None:
            z = z * weight.to(compute).reshape(shape)
        if bias is not None:
            z = z + bias.to(compute).reshape(shape)
        if residual is not None:
            z = z + residual.to(compute)
        if ctx.activation is not None:
            z = _TORCH_ACTIVATIONS[ctx.activation](z, ctx.negative_slope)
        targets = [t for t, w in zip(inputs, wanted, strict=True) if w]
        found = iter(torch.autograd.grad(z, targets, dy.to(compute)) if targets else ())
    grads = [next(found).to(s.dtype) if w else None for s, w in zip(saved, wanted, strict=True)]
    return *grads, None, None, None, None


_inference_op.register_autograd(_inference_backward, setup_context=_inference_setup)
_Inference = _eager_function(_inference_impl, _inference_setup, _inference_backward)


def _check_inputs(x, weight, bias, residual, activation, negative_slope):
    """Check the tensors and the epilogue of a pass; return ``negative_slope`` as a float."""
    for tensor, name in ((x, "input"), (weight, "weight"), (bias, "bias"), (residual, "residual")):
        _check_tensor(tensor, name, optional=name != "input")
    return check_epilogue(activation, negative_slope)


def _normalize(kind, arg, eps, x, weight, bias, residual, activation, negative_slope):
    """Check the tensors and run the training pass: ``(y, mean, rstd)``.

    Eagerly, a geometry seen before runs its prepared pass (:func:`_prepared_pass`),
    whose ``mean`` and ``rstd`` are NumPy arrays (tensors on the general route).
    """
    if _USE_PREPARED and not torch.compiler.is_compiling():
        prepared = _prepared_pass(kind, arg, eps, x, weight, bias, residual, activation, negative_slope)
        if prepared is not None:
            stats = []  # the forward's (mean, rstd), as NumPy arrays
            y = _PreparedTraining.apply(x, weight, bias, residual, prepared, stats)
            return y, *stats
    negative_slope = _check_inputs(x, weight, bias, residual, activation, negative_slope)
    return _run(_forward_op, _Forward, x, weight, bias, residual, kind, arg, eps, activation, negative_slope)


# ---------------------------------------------------------------------------
# Prepared eager training passes: the checks and the plan once per geometry
# ---------------------------------------------------------------------------
# A model calls each layer with the same geometry every step, and inside a model every
# line of Python between two kernels runs with cold caches: the path from a module's
# call to its kernels costs several times its hot-loop time there
# (docs/perf-notes/torch-eager-dispatch.md). A prepared pass keeps what the geometry
# decides (the checks passed, the plan, the kernel variants) and, per call, only takes
# the tensors' NumPy views, allocates the outputs and calls the kernels: the same
# kernels with the same parameters as the general route, so the same bits.

#: Whether eager training calls look their prepared pass up (the tests switch it off
#: to compare both routes bit for bit).
_USE_PREPARED = True
#: Prepared passes by call signature (the key of :func:`_prepared_pass`); ``None`` for the signatures
#: that take the general route (other dtypes, copies). Only calls that passed every
#: check are stored, so a hit proves the tensors passed them.
_PREPARED: dict = {}
_PREPARED_SIZE = 256
#: Tensor types whose calls are prepared (a subclass may change what a view reads).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _signature(tensor):
    """Return what a prepared pass assumes of a tensor argument: type, dtype, shape, strides, CPU."""
    if tensor is None:
        return None
    return type(tensor), tensor.dtype, tensor.shape, tensor.stride(), tensor.is_cpu


def _flat(tensor):
    """Return the flat NumPy view of a dense tensor's memory, in memory order (the kernel's here)."""
    return tensor.detach().numpy().ravel("K")


def _prepared_pass(kind, arg, eps, x, weight, bias, residual, activation, negative_slope):
    """Return the :class:`_PreparedPass` of a training call, or ``None`` for the general route.

    A new signature runs the general route's checks first (a bad call raises
    their errors and is not stored).
    """
    try:
        key = (kind, arg, eps, activation, negative_slope, *map(_signature, (x, weight, bias, residual)))
        return _PREPARED[key]
    except KeyError:
        pass
    except (AttributeError, TypeError):  # not tensors, or unhashable: the general route says why
        return None
    prepared = _PreparedPass.build(kind, arg, eps, x, weight, bias, residual, activation, negative_slope)
    if len(_PREPARED) >= _PREPARED_SIZE:
        _PREPARED.clear()
    _PREPARED[key] = prepared
    return prepared


class _PreparedPass:
    """The training pass of one call signature: its plan and kernel variants, checked once.

    ``forward`` and ``backward`` take the tensors of that signature and call the
    kernels that :func:`fastnorm.forward` and :func:`fastnorm.backward` call
    for them (:func:`fastnorm._plan._kernel_call`), with outputs from torch's
    allocator; float32 and float64 tensors of one dtype, dense in the kernel's
    order, with contiguous parameters and a residual laid out like ``x``.
    """

    __slots__ = ("plan", "dtype", "activation", "forward_variant")

    @classmethod
    def build(cls, kind, arg, eps, x, weight, bias, residual, activation, negative_slope):
        """Check a call as the general route does; its prepared pass, or ``None`` if it needs that route."""
        negative_slope = _check_inputs(x, weight, bias, residual, activation, negative_slope)
        tensors = [t for t in (x, weight, bias, residual) if t is not None]
        if (
            any(type(t) not in _PLAIN_TENSORS or t.dtype != x.dtype for t in tensors)
            or x.dtype not in _KERNEL_DTYPES
            or x.numel() == 0
            or _kernel_layout(x, x, kind) is not x  # read after a copy
            or (residual is not None and residual.stride() != x.stride())
            or any(p is not None and not p.is_contiguous() for p in (weight, bias))
        ):
            return None
        spec = _spec(kind, arg, eps, activation, negative_slope)
        array = _array(x)
        plan = _plan(array, spec, True)  # raises as fastnorm.forward does
        for param, name in ((weight, "weight"), (bias, "bias")):
            _check_param(_array(param), name, plan, array.dtype)
        if residual is not None:
            _check_like_x(_array(residual), "residual", array, plan)
        if not np.shares_memory(_flat(x), _kernel_view(array, plan)):
            return None
        self = cls()
        self.plan, self.dtype, self.activation = plan, array.dtype, activation
        self.forward_variant = (weight is not None) * 4 + (bias is not None) * 2
        return self

    def forward(self, x, weight, bias, residual):
        """``(y, mean, rstd)`` of the training pass, as :func:`fastnorm.forward` computes them.

        ``mean`` and ``rstd`` are NumPy arrays of the statistics' shape.
        """
        plan = self.plan
        y = torch.empty_like(x)  # x is dense: y gets its strides
        mean = np.empty(plan.stats_shape)
        rstd = np.empty(plan.stats_shape)
        empty = _EMPTY[self.dtype]
        kernel, params = _kernel_call(plan, K.FORWARD, self.forward_variant)
        kernel(
            _flat(x),
            empty if weight is None else _flat(weight),
            empty if bias is None else _flat(bias),
            empty if residual is None else _flat(residual),
            _flat(y),
            mean.reshape(-1),
            rstd.reshape(-1),
            params,
        )
        return y, mean, rstd

    def backward(self, dy, x, weight, bias, residual, mean, rstd):
        """``(dx, dweight, dbias, dresidual)`` as :func:`_backward_impl`: empty where not computed.

        ``mean`` and ``rstd`` are those of :meth:`forward`.
        """
        plan = self.plan
        if dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)
        x_flat, dy_flat = _flat(x), _flat(dy)
        empty = _EMPTY[self.dtype]
        weight_flat = empty if weight is None else _flat(weight)
        mean, rstd = mean.reshape(-1), rstd.reshape(-1)
        dresidual = x.new_empty(0)
        dx = torch.empty_like(x)
        dx_flat = _flat(dx)
        epilogue = None
        if self.activation is not None:
            # dz is the residual's gradient, or written into dx's memory (_backward_kernels)
            dz_flat = dx_flat
            if residual is not None:
                dresidual = torch.empty_like(x)
                dz_flat = _flat(dresidual)
            bias_flat = empty if bias is None else _flat(bias)
            residual_flat = empty if residual is None else _flat(residual)
            epilogue = (bias_flat, residual_flat, dz_flat, bias is not None)
        dweight = None if weight is None else np.zeros(plan.param_shape, self.dtype)
        dbias = None if bias is None else np.zeros(plan.param_shape, self.dtype)
        _backward_kernels(
            plan,
            weight is not None,
            False,
            dy_flat,
            x_flat,
            weight_flat,
            mean,
            rstd,
            dx_flat,
            empty if dweight is None else dweight.reshape(-1),
            empty if dbias is None else dbias.reshape(-1),
            epilogue,
        )
        return dx, _gradient(x, dweight, x.dtype), _gradient(x, dbias, x.dtype), dresidual


def _prepared_forward(ctx, x, weight, bias, residual, prepared, stats):
    y, mean, rstd = prepared.forward(x, weight, bias, residual)
    ctx.save_for_backward(x, weight, bias, residual)
    ctx.prepared, ctx.mean, ctx.rstd = prepared, mean, rstd
    stats += mean, rstd
    return y


def _prepared_backward(ctx, dy):
    x, weight, bias, residual = ctx.saved_tensors
    grads = ctx.prepared.backward(dy, x, weight, bias, residual, ctx.mean, ctx.rstd)
    return *_input_grads(grads, dy, weight, bias, residual, ctx.prepared.activation), None, None


#: The training pass through a :class:`_PreparedPass`, with :func:`_forward_backward`'s
#: gradients. Its one output is ``y``: the statistics stay NumPy arrays, kept in ``ctx``
#: and appended to the list ``stats`` for the running-statistics update. Named as the
#: general route's Function, so that the profiler shows ``fastnorm_forward`` and
#: ``fastnorm_forwardBackward`` on both routes.
_PreparedTraining = type(
    "fastnorm_forward",
    (torch.autograd.Function,),
    {
        "forward": staticmethod(_prepared_forward),
        "backward": staticmethod(once_differentiable(_prepared_backward)),
    },
)


def _forget_prepared():
    """In a forked child that must run serial builds, drop the parent's prepared passes (their plans)."""
    if _threading.serial_after_fork():
        _PREPARED.clear()


if hasattr(os, "register_at_fork"):  # after fastnorm._plan's handler (imported first)
    os.register_at_fork(after_in_child=_forget_prepared)


def _normalize_with(running, eps, x, weight, bias, residual, activation, negative_slope):
    """Run the pass with fixed per-channel statistics ``running = (running_mean, running_var)``."""
    negative_slope = _check_inputs(x, weight, bias, residual, activation, negative_slope)
    running_mean, running_var = running
    mean = running_mean.detach().to(torch.float64)
    rstd = 1.0 / torch.sqrt(running_var.detach().to(torch.float64) + check_eps(eps))
    return _run(_inference_op, _Inference, x, weight, bias, residual, mean, rstd, activation, negative_slope)


def _running_pair(running_mean, running_var, x):
    """``(running_mean, running_var)`` checked against ``x``'s channels, or ``None``."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if running_mean is None:
        return None
    if x.dim() < 2:
        raise ValueError(f"expected a 2-D to 5-D input (N, C, *spatial), got input.shape={tuple(x.shape)}")
    for tensor, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        _check_tensor(tensor, name, optional=False)
        if tuple(tensor.shape) != (x.shape[1],):
            raise ValueError(
                f"{name}.shape={tuple(tensor.shape)} does not match ({x.shape[1]},), the channels"
            )
    return running_mean, running_var


def _update_running(running, mean, rstd, eps, count, factor, per_instance=False):
    """Update ``running = (1 - factor) * running + factor * batch`` in float64 (unbiased variance).

    The batch variance is recovered from ``rstd`` (never below 0); with
    ``per_instance`` (InstanceNorm's ``(N, C)`` statistics) the batch's are
    their averages over the instances, as torch's.  Eagerly by the NumPy API's
    compiled update (``fastnorm._kernels.update_running_from_rstd``, which
    writes contiguous buffers in place; about 6 us where the torch operations
    take 30); under torch.compile by the same IEEE operations as torch
    operations, which trace.
    """
    if torch.compiler.is_compiling():
        with torch.no_grad():
            var = torch.clamp(1.0 / torch.square(rstd) - eps, min=0.0)
            if per_instance:
                mean, var = mean.mean(0), var.mean(0)
            running_mean, running_var = running
            unbiased = var * (count / (count - 1))
            running_mean.copy_((1.0 - factor) * running_mean.to(torch.float64) + factor * mean)
            running_var.copy_((1.0 - factor) * running_var.to(torch.float64) + factor * unbiased)
        return
    if isinstance(mean, torch.Tensor):  # the general route's (a prepared pass gives arrays)
        mean, rstd = mean.detach().numpy(), rstd.detach().numpy()
    running = tuple(_array(r) for r in running)
    if per_instance:
        var = _np_functional._variance(rstd, eps)
        _np_functional._update_running(running, mean.mean(axis=0), var.mean(axis=0), count, factor)
    else:  # the variance recovered from rstd in the compiled update
        _np_functional._update_running(running, mean, rstd, count, factor, eps)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Batch normalization (Ioffe & Szegedy 2015), like ``torch.nn.functional.batch_norm``; differentiable.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, *spatial)`` CPU tensor, spatial rank 0-3, any memory format.
    running_mean, running_var : torch.Tensor of shape (C,) or None
        Running statistics, updated in place when ``training`` (torch's rule:
        ``(1 - momentum) * old + momentum * batch``, unbiased batch variance).
        Required when not ``training``.
    weight, bias : torch.Tensor of shape (C,), optional
        Affine parameters.
    training : bool
        Normalize with the batch's statistics (True) or the running ones.
    momentum : float or None
        Update factor; ``None``: cumulative average, factor
        ``1 / num_batches_tracked`` after incrementing it.
    eps : float
        Added to the variance.
    num_batches_tracked : torch.Tensor, optional
        Integer batch counter, incremented in place by a training call that
        updates running statistics. Required with ``momentum=None``.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)`` (see
        :class:`fastnorm.NormSpec`).

    Returns
    -------
    torch.Tensor
        Of ``input``'s shape, dtype and memory format.

    Notes
    -----
    Ioffe & Szegedy 2015, Algorithm 1 (training) and Algorithm 2 (inference).
    """
    _check_tensor(input, "input", optional=False)
    running = _running_pair(running_mean, running_var, input)
    if not training:
        if running is None:
            raise ValueError("batch_norm with training=False needs running_mean and running_var")
        return _normalize_with(running, eps, input, weight, bias, residual, activation, negative_slope)
    momentum = _np_functional._check_momentum(momentum, allow_none=True)
    counter = _check_counter(num_batches_tracked, required=momentum is None and running is not None)
    eps = check_eps(eps)
    y, mean, rstd = _normalize(
        "batch_norm", 0, eps, input, weight, bias, residual, activation, negative_slope
    )
    if counter is not None:
        counter.add_(1)
    if running is not None:
        factor = momentum if momentum is not None else 1.0 / float(counter)
        _update_running(running, mean, rstd, eps, input.numel() // input.shape[1], factor)
    return y


def _check_counter(counter, required):
    """``num_batches_tracked`` checked: an integer CPU tensor of one element, or ``None``."""
    if counter is None:
        if required:
            raise ValueError(
                "momentum=None (cumulative average) needs num_batches_tracked, an integer tensor counting "
                "the batches seen, e.g. torch.zeros((), dtype=torch.long)"
            )
        return None
    if (
        not isinstance(counter, torch.Tensor)
        or counter.is_floating_point()
        or counter.is_complex()
        or counter.dtype == torch.bool
        or counter.numel() != 1
        or counter.device.type != "cpu"
    ):
        raise TypeError("num_batches_tracked must be an integer CPU torch.Tensor of one element")
    return counter


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Instance normalization (Ulyanov et al. 2016), like ``torch.nn.functional.instance_norm``.

    Differentiable.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, *spatial)`` CPU tensor, spatial rank 1-3, any memory format.
    running_mean, running_var : torch.Tensor of shape (C,), optional
        Running statistics. With ``use_input_stats`` they are updated in place
        (if given) with the batch average of the per-instance mean and
        unbiased variance, as torch does; otherwise they normalize.
    weight, bias : torch.Tensor of shape (C,), optional
        Affine parameters.
    use_input_stats : bool
        Normalize each instance with its own statistics (True) or the running ones.
    momentum : float
        Update factor of the running statistics.
    eps : float
        Added to the variance.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)`` (see
        :class:`fastnorm.NormSpec`); ``residual`` has ``input``'s shape.

    Returns
    -------
    torch.Tensor
        Of ``input``'s shape, dtype and memory format.
    """
    _check_tensor(input, "input", optional=False)
    running = _running_pair(running_mean, running_var, input)
    if not use_input_stats:
        if running is None:
            raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
        return _normalize_with(running, eps, input, weight, bias, residual, activation, negative_slope)
    momentum = _np_functional._check_momentum(momentum, allow_none=False)
    eps = check_eps(eps)
    y, mean, rstd = _normalize(
        "instance_norm", 0, eps, input, weight, bias, residual, activation, negative_slope
    )
    if running is not None and input.shape[0] > 0:
        count = input.numel() // (input.shape[0] * input.shape[1])
        _update_running(running, mean, rstd, eps, count, momentum, per_instance=True)
    return y


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Group normalization (Wu & He 2018), like ``torch.nn.functional.group_norm``; differentiable.

    Parameters
    ----------
    input : torch.Tensor
        ``(N, C, *spatial)`` CPU tensor, any memory format.
    num_groups : int
        Number of groups; divides ``C``.
    weight, bias : torch.Tensor of shape (C,), optional
        Affine parameters.
    eps : float
        Added to the variance.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)`` (see
        :class:`fastnorm.NormSpec`); ``residual`` has ``input``'s shape.

    Returns
    -------
    torch.Tensor
        Of ``input``'s shape, dtype and memory format.
    """
    num_groups = check_positive_int(num_groups, "num_groups")
    return _normalize(
        "group_norm", num_groups, check_eps(eps), input, weight, bias, residual, activation, negative_slope
    )[0]


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Layer normalization (Ba et al. 2016), like ``torch.nn.functional.layer_norm``; differentiable.

    Parameters
    ----------
    input : torch.Tensor
        CPU tensor whose trailing dims are ``normalized_shape``.
    normalized_shape : int or tuple of int
        The trailing dims normalized over.
    weight, bias : torch.Tensor of shape ``normalized_shape``, optional
        Affine parameters.
    eps : float
        Added to the variance.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)`` (see
        :class:`fastnorm.NormSpec`); ``residual`` has ``input``'s shape.

    Returns
    -------
    torch.Tensor
        Of ``input``'s shape and dtype.
    """
    _check_tensor(input, "input", optional=False)
    ndim = _np_functional._normalized_ndim(input, normalized_shape)
    return _normalize(
        "layer_norm", ndim, check_eps(eps), input, weight, bias, residual, activation, negative_slope
    )[0]


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """RMS normalization (Zhang & Sennrich 2019), like ``torch.nn.functional.rms_norm``; differentiable.

    Parameters
    ----------
    input : torch.Tensor
        CPU tensor whose trailing dims are ``normalized_shape``.
    normalized_shape : int or tuple of int
        The trailing dims normalized over.
    weight : torch.Tensor of shape ``normalized_shape``, optional
        Scale.
    eps : float or None
        Added to the mean square; ``None``: the machine epsilon of the input's
        dtype (float32's for 16-bit data), as torch's.
    residual, activation, negative_slope
        The fused epilogue ``y = activation(normalized + residual)`` (see
        :class:`fastnorm.NormSpec`); ``residual`` has ``input``'s shape.

    Returns
    -------
    torch.Tensor
        Of ``input``'s shape and dtype.
    """
    _check_tensor(input, "input", optional=False)
    ndim = _np_functional._normalized_ndim(input, normalized_shape)
    eps = check_eps(eps, allow_none=True)
    return _normalize("rms_norm", ndim, eps, input, weight, None, residual, activation, negative_slope)[0]


def _skip_forward_impl(
    x: torch.Tensor,
    skip: torch.Tensor,
    skip_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    kind: str,
    arg: int,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h, mean, rstd)`` of :func:`fastnorm.forward` with ``skip=`` (``h = x + skip + skip_bias``)."""
    spec = _spec(kind, arg, eps, None, 0.01)
    x = x.contiguous()
    y, h = _empty_output(x, kind), _empty_output(x, kind)
    _, stats = fastnorm.forward(
        _array(x),
        spec,
        _array(weight),
        _array(bias),
        skip=_array(skip.contiguous()),
        skip_bias=_array(skip_bias),
        out=_array(y),
        sum_out=_array(h),
    )
    return y, h, torch.from_numpy(stats.mean), torch.from_numpy(stats.rstd)


_skip_forward_op = _custom_op("fastnorm::skip_forward", _skip_forward_impl)


@_skip_forward_op.register_fake
def _skip_forward_fake(x, skip, skip_bias, weight, bias, kind, arg, eps):
    shape = _stats_shape(x, kind, arg)
    y, h = (torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2))
    return y, h, x.new_empty(shape, dtype=torch.float64), x.new_empty(shape, dtype=torch.float64)


def _skip_backward_impl(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    skip_bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    kind: str,
    arg: int,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh_total, dweight, dbias, dskip_bias)``: the norm's backward at ``h`` plus ``h``'s own gradient.

    ``dh_total`` is the gradient of ``h = x + skip + skip_bias``, so of ``x`` and of
    ``skip``; ``dskip_bias`` its column sums (float64 over the rows in order, for
    ``dh``'s share). Empty where not computed.
    """
    spec = _spec(kind, arg, eps, None, 0.01)
    h_array = _array(h.contiguous())
    stats = fastnorm.Stats(
        mean.numpy(), rstd.numpy(), has_bias=bias is not None, h=h_array, has_skip_bias=skip_bias is not None
    )
    dx = _empty_output(h, kind)
    grads = fastnorm.backward(
        _array(dy), h_array, stats, spec, _array(weight), with_bias=bias is not None, out=_array(dx)
    )
    _, dweight, dbias = grads
    dskip_bias = grads.dskip_bias
    if dh is not None:
        dh_array = _array(dh.contiguous())
        dx_array = _array(dx)
        np.add(dx_array, dh_array, out=dx_array)
        if skip_bias is not None:
            columns = dh_array.reshape(-1, dskip_bias.size).astype(np.float64).sum(axis=0)
            dskip_bias = (dskip_bias.astype(np.float64) + columns).astype(dskip_bias.dtype)
    return (
        dx,
        h.new_empty(0) if dweight is None else _tensor(dweight).to(weight.dtype),
        h.new_empty(0) if dbias is None else _tensor(dbias).to(bias.dtype),
        h.new_empty(0) if skip_bias is None else _tensor(dskip_bias).to(skip_bias.dtype),
    )


_skip_backward_op = _custom_op("fastnorm::skip_backward", _skip_backward_impl)


@_skip_backward_op.register_fake
def _skip_backward_fake(dy, dh, h, weight, bias, skip_bias, mean, rstd, kind, arg, eps):
    return (
        torch.empty_like(h, memory_format=torch.contiguous_format),
        h.new_empty(0) if weight is None else torch.empty_like(weight),
        h.new_empty(0) if bias is None else torch.empty_like(bias),
        h.new_empty(0) if skip_bias is None else torch.empty_like(skip_bias),
    )


def _skip_setup(ctx, inputs, output):
    x, skip, skip_bias, weight, bias, *params = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, bias, skip_bias, mean, rstd)
    ctx.params = params
    ctx.backward_pass = _skip_backward_op


def _skip_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, skip_bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dskip_bias = ctx.backward_pass(
        dy, dh, h, weight, bias, skip_bias, mean, rstd, *ctx.params
    )
    return (
        dx,
        dx,
        None if skip_bias is None else dskip_bias,
        None if weight is None else dweight,
        None if bias is None else dbias,
        *[None] * len(ctx.params),
    )


_skip_forward_op.register_autograd(_skip_backward, setup_context=_skip_setup)
_SkipForward = _eager_function(_skip_forward_impl, _skip_setup, _skip_backward, _skip_backward_impl)


def _skip_norm(kind, x, skip, normalized_shape, weight, bias, eps, skip_bias):
    for tensor, name in ((x, "input"), (skip, "skip")):
        _check_tensor(tensor, name, optional=False)
    for tensor, name in ((weight, "weight"), (bias, "bias"), (skip_bias, "skip_bias")):
        _check_tensor(tensor, name)
    ndim = _np_functional._normalized_ndim(x, normalized_shape)
    y, h, _, _ = _run(_skip_forward_op, _SkipForward, x, skip, skip_bias, weight, bias, kind, ndim, eps)
    return y, h


def skip_layer_norm(
    input: torch.Tensor,
    skip: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    skip_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm skip add and LayerNorm in one pass: ``h = input + skip + skip_bias``, ``y = layer_norm(h)``.

    Differentiable with respect to every tensor, through ``y`` and ``h`` (the next
    residual stream): as ONNX Runtime's ``SkipLayerNormalization``.

    Parameters
    ----------
    input, skip : torch.Tensor
        CPU tensors of the same shape, whose trailing dims are ``normalized_shape``.
    normalized_shape : int or tuple of int
        The trailing dims normalized over.
    weight, bias : torch.Tensor of shape ``normalized_shape``, optional
        Affine parameters.
    eps : float
        Added to the variance.
    skip_bias : torch.Tensor of shape ``normalized_shape``, optional
        Added to every row of the sum.

    Returns
    -------
    y, h : torch.Tensor
        The normalized sum and the sum, C-contiguous.
    """
    return _skip_norm("layer_norm", input, skip, normalized_shape, weight, bias, check_eps(eps), skip_bias)


def skip_rms_norm(
    input: torch.Tensor,
    skip: torch.Tensor,
    normalized_shape: int | tuple[int, ...],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    skip_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm skip add and RMSNorm in one pass: ``h = input + skip + skip_bias``, ``y = rms_norm(h)``.

    Differentiable with respect to every tensor, through ``y`` and ``h``: as ONNX
    Runtime's ``SkipSimplifiedLayerNormalization``.

    Parameters
    ----------
    input, skip : torch.Tensor
        CPU tensors of the same shape, whose trailing dims are ``normalized_shape``.
    normalized_shape : int or tuple of int
        The trailing dims normalized over.
    weight : torch.Tensor of shape ``normalized_shape``, optional
        Scale.
    eps : float or None
        Added to the mean square; ``None``: the machine epsilon of the dtype.
    skip_bias : torch.Tensor of shape ``normalized_shape``, optional
        Added to every row of the sum.

    Returns
    -------
    y, h : torch.Tensor
        The normalized sum and the sum, C-contiguous.
    """
    eps = check_eps(eps, allow_none=True)
    return _skip_norm("rms_norm", input, skip, normalized_shape, weight, None, eps, skip_bias)


# ---------------------------------------------------------------------------
# Modules: torch's own, with fastnorm's forward
# ---------------------------------------------------------------------------


class _Epilogue:
    """The ``activation`` / ``negative_slope`` attributes the modules add to torch's."""

    activation: str | None = None
    negative_slope: float = 0.01

    def __init__(self, *args, activation=None, negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_epilogue(activation, negative_slope)

    def _set_epilogue(self, activation, negative_slope):
        self.activation, self.negative_slope = activation, check_epilogue(activation, negative_slope)

    def _epilogue(self):
        return {"activation": self.activation, "negative_slope": self.negative_slope}

    def extra_repr(self):
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        return text


class _BatchNorm(_Epilogue):
    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(batch_norm(input) + residual)``, with torch's rules for the running statistics.

        Parameters are those of :func:`batch_norm`: ``input``, and ``residual`` (``input``'s shape).
        """
        self._check_input_dim(input)
        track = self.training and self.track_running_stats
        if track and self.num_batches_tracked is not None and self.momentum is not None:
            self.num_batches_tracked.add_(1)  # torch counts batches whatever the momentum
            counter = None
        else:
            counter = self.num_batches_tracked if track else None
        training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            training,
            self.momentum,
            self.eps,
            num_batches_tracked=counter,
            residual=residual,
            **self._epilogue(),
        )


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""


class _InstanceNorm(_Epilogue):
    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(instance_norm(input) + residual)``; an unbatched input is one sample.

        Parameters are those of :func:`instance_norm`: ``input``, and ``residual`` (``input``'s shape).
        """
        self._check_input_dim(input)
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
            residual = None if residual is None else residual.unsqueeze(0)
        use_running = not self.training or self.track_running_stats
        y = instance_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            residual=residual,
            **self._epilogue(),
        )
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""


class GroupNorm(_Epilogue, torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(group_norm(input) + residual)``.

        Parameters are those of :func:`group_norm`: ``input``, and ``residual`` (``input``'s shape).
        """
        return group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, residual=residual, **self._epilogue()
        )


class LayerNorm(_Epilogue, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(layer_norm(input) + residual)``.

        Parameters are those of :func:`layer_norm`: ``input``, and ``residual`` (``input``'s shape).
        """
        return layer_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            residual=residual,
            **self._epilogue(),
        )


class RMSNorm(_Epilogue, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(rms_norm(input) + residual)``.

        Parameters are those of :func:`rms_norm`: ``input``, and ``residual`` (``input``'s shape).
        """
        return rms_norm(
            input, self.normalized_shape, self.weight, self.eps, residual=residual, **self._epilogue()
        )


#: torch's module type -> fastnorm's (exact types: subclasses of them are not converted).
_CONVERSIONS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Make every torch norm module of ``model`` (itself included) fastnorm's, in place.

    Each module keeps its parameters, buffers, hooks and training mode, the
    very same tensors (an optimizer built before the conversion still updates
    them): only its class changes, to fastnorm's subclass of it.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        A norm module has a tensor off the CPU, or of a dtype fastnorm does not
        support; nothing is converted then.
    """
    found = [(name, module) for name, module in model.named_modules() if type(module) in _CONVERSIONS]
    for name, module in found:
        for tensor_name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            where = f"{name or type(module).__name__}.{tensor_name}"
            if tensor.device.type != "cpu":
                raise ValueError(f"{where} is on {tensor.device}: fastnorm.torch runs on CPU tensors only")
            if tensor.is_floating_point() and tensor.dtype not in _FLOAT_TYPES:
                raise ValueError(f"{where}.dtype={tensor.dtype} is not supported")
    for _, module in found:
        module.__class__ = _CONVERSIONS[type(module)]
        module._set_epilogue(None, 0.01)
    return model


# SyncBatchNorm lives in its own file (it imports torch.distributed); torch's converts to it too.
from ._torch_sync import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402

_CONVERSIONS[torch.nn.SyncBatchNorm] = SyncBatchNorm

#: Layers an inference BatchNorm folds into: their weight's axis 0 is the output channels.
_FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


class _Tracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, with fastnorm's modules as leaves like torch's own."""

    def is_leaf_module(self, module, qualified_name):
        return type(module).__module__ == __name__ or super().is_leaf_module(module, qualified_name)


def fold_conv_bn(model: torch.nn.Module) -> torch.fx.GraphModule:
    """Fold every BatchNorm fed only by a convolution or linear layer into that layer.

    ``model`` is traced with ``torch.fx``; each ``Conv1d/2d/3d`` or ``Linear`` →
    ``BatchNorm1d/2d/3d`` pair (torch's modules or fastnorm's, without an
    activation or residual) whose layer output goes nowhere else becomes one layer
    with the weights of :func:`fastnorm.fold_batch_norm`. ``model`` itself is left
    unchanged: the folded layers are new modules of the returned graph module.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode (a training BatchNorm normalizes with the batch's statistics,
        which no weights can fold), traceable by ``torch.fx`` (fastnorm's modules are leaves).

    Returns
    -------
    torch.fx.GraphModule
        The model with the pairs folded; the same outputs to rounding.

    Raises
    ------
    ValueError
        ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_conv_bn needs an eval-mode model (call model.eval() first)")
    traced = torch.fx.GraphModule(model, _Tracer().trace(model))
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BATCH_NORMS):
            continue
        bn, source = modules[node.target], node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or getattr(bn, "activation", None) is not None:
            continue  # a residual or an activation does not fold
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        layer = modules[source.target]
        if (
            not isinstance(layer, _FOLDABLE)
            or bn.running_mean is None
            or layer.weight.shape[0] != bn.num_features
        ):
            continue
        weight, bias = fastnorm.fold_batch_norm(
            layer.weight.detach().numpy(),
            None if layer.bias is None else layer.bias.detach().numpy(),
            bn.running_mean.detach().numpy(),
            bn.running_var.detach().numpy(),
            None if bn.weight is None else bn.weight.detach().numpy(),
            None if bn.bias is None else bn.bias.detach().numpy(),
            bn.eps,
        )
        folded = copy.deepcopy(layer)
        folded.weight = torch.nn.Parameter(torch.from_numpy(weight), requires_grad=layer.weight.requires_grad)
        folded.bias = torch.nn.Parameter(torch.from_numpy(bias), requires_grad=layer.weight.requires_grad)
        parent, _, name = source.target.rpartition(".")
        setattr(traced.get_submodule(parent), name, folded)
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.graph.lint()
    traced.recompile()
    return traced
