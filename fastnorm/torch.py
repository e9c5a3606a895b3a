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

The training pass (statistics of the batch) runs fastnorm's forward and backward
kernels. The backward of a pass with fixed statistics (``BatchNorm`` in eval mode,
``InstanceNorm`` with running statistics) is an elementwise affine map, computed with
torch operations.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx
import torch.nn.functional as torch_functional

import fastnorm
from fastnorm import functional as _np_functional
from fastnorm.spec import NormSpec

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
    "batch_norm",
    "convert",
    "fold_conv_bn",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]

_FLOAT_TYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def _array(tensor, name):
    """Return the NumPy view of a CPU tensor (``None`` stays ``None``); bfloat16 as ml_dtypes'."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}: fastnorm.torch runs on CPU tensors only")
    if tensor.dtype not in _FLOAT_TYPES:
        raise TypeError(
            f"{name}.dtype={tensor.dtype} is not supported: float32, float64, float16 or bfloat16"
        )
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # the bf16 extra

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _tensor(array):
    """Return a tensor over ``array``'s memory (``None`` stays ``None``)."""
    if array is None:
        return None
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class _Normalize(torch.autograd.Function):
    """``y = act(norm(x) * weight + bias + residual)`` with the statistics of ``x``.

    ``forward`` appends the :class:`fastnorm.Stats` to ``stats_out`` (for the
    running statistics); ``backward`` is :func:`fastnorm.backward`.
    """

    @staticmethod
    def forward(ctx, spec, stats_out, x, weight, bias, residual):
        y, stats = fastnorm.forward(
            _array(x, "input"),
            spec,
            _array(weight, "weight"),
            _array(bias, "bias"),
            residual=_array(residual, "residual"),
        )
        stats_out.append(stats)
        ctx.spec, ctx.stats = spec, stats
        ctx.save_for_backward(x, weight, bias, residual)
        return _tensor(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, residual = ctx.saved_tensors
        activation = ctx.spec.activation is not None
        grads = fastnorm.backward(
            _array(dy, "grad_output"),
            _array(x, "input"),
            ctx.stats,
            ctx.spec,
            _array(weight, "weight"),
            bias=_array(bias, "bias") if activation else None,
            residual=_array(residual, "residual") if activation else None,
            with_bias=bias is not None,
        )
        dx, dweight, dbias = grads
        if residual is None:
            dresidual = None
        else:
            dresidual = _tensor(grads.dresidual) if activation else dy
        return None, None, _tensor(dx), _tensor(dweight), _tensor(dbias), dresidual


_TORCH_ACTIVATIONS = {
    "relu": lambda z, slope: torch.relu(z),
    "leaky_relu": lambda z, slope: torch_functional.leaky_relu(z, slope),
    "sigmoid": lambda z, slope: torch.sigmoid(z),
    "tanh": lambda z, slope: torch.tanh(z),
    "silu": lambda z, slope: torch_functional.silu(z),
    "gelu": lambda z, slope: torch_functional.gelu(z),
    "gelu_tanh": lambda z, slope: torch_functional.gelu(z, approximate="tanh"),
}


class _NormalizeWithStats(torch.autograd.Function):
    """``y = act((x - mean) * rstd * weight + bias + residual)`` with given (fixed) statistics.

    The forward is :func:`fastnorm.forward_inference`; the backward, of an
    elementwise map, recomputes it with torch operations and differentiates those.
    """

    @staticmethod
    def forward(ctx, spec, stats, x, weight, bias, residual):
        y = fastnorm.forward_inference(
            _array(x, "input"),
            stats,
            spec,
            _array(weight, "weight"),
            _array(bias, "bias"),
            residual=_array(residual, "residual"),
        )
        ctx.spec, ctx.stats = spec, stats
        ctx.save_for_backward(x, weight, bias, residual)
        return _tensor(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        wanted = [s is not None and ctx.needs_input_grad[2 + i] for i, s in enumerate(saved)]
        inputs = [
            None if s is None else s.detach().requires_grad_(w) for s, w in zip(saved, wanted, strict=True)
        ]
        x, weight, bias, residual = inputs
        shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel, axis 1
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        with torch.enable_grad():
            mean = torch.from_numpy(ctx.stats.mean).to(compute).reshape(shape)
            rstd = torch.from_numpy(ctx.stats.rstd).to(compute).reshape(shape)
            z = (x.to(compute) - mean) * rstd
            if weight is not None:
                z = z * weight.to(compute).reshape(shape)
            if bias is not None:
                z = z + bias.to(compute).reshape(shape)
            if residual is not None:
                z = z + residual.to(compute)
            if ctx.spec.activation is not None:
                z = _TORCH_ACTIVATIONS[ctx.spec.activation](z, ctx.spec.negative_slope)
            targets = [t for t, w in zip(inputs, wanted, strict=True) if w]
            found = iter(torch.autograd.grad(z, targets, dy.to(compute)) if targets else ())
        grads = [next(found).to(s.dtype) if w else None for s, w in zip(saved, wanted, strict=True)]
        return None, None, *grads


def _epilogue(activation, negative_slope):
    return {"activation": activation, "negative_slope": negative_slope}


def _residual_like(residual, x, spec):
    """Return ``residual`` in the memory order the kernel reads ``x`` in (a copy only when it is not).

    The channel norms read a ``channels_last`` / ``channels_last_3d`` input in
    place and anything else in C order; LayerNorm and RMSNorm read C order.
    """
    if residual is None or not isinstance(residual, torch.Tensor):
        return residual
    if spec.kind not in ("layer_norm", "rms_norm") and not x.is_contiguous():
        for memory_format, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if x.dim() == ndim and x.is_contiguous(memory_format=memory_format):
                return residual.contiguous(memory_format=memory_format)
    return residual.contiguous()


def _normalize(spec, x, weight, bias, residual):
    """Run the training pass: return ``(y, stats)``."""
    residual = _residual_like(residual, x, spec)
    stats_out = []
    y = _Normalize.apply(spec, stats_out, x, weight, bias, residual)
    return y, stats_out[0]


def _running_arrays(running_mean, running_var, channels, writeable):
    mean, var = _array(running_mean, "running_mean"), _array(running_var, "running_var")
    return _np_functional._running_pair(mean, var, channels, writeable=writeable)


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
    spec = NormSpec.batch_norm(eps, **_epilogue(activation, negative_slope))
    x = _array(input, "input")
    channels = _np_functional._channels(x, False)
    running = _running_arrays(running_mean, running_var, channels, writeable=bool(training))
    if not training:
        if running is None:
            raise ValueError("batch_norm with training=False needs running_mean and running_var")
        stats = _np_functional._running_stats(running, spec.eps)
        residual = _residual_like(residual, input, spec)
        return _NormalizeWithStats.apply(spec, stats, input, weight, bias, residual)
    momentum = _np_functional._check_momentum(momentum, allow_none=True)
    counter = _np_functional._check_counter(
        _array_counter(num_batches_tracked), required=momentum is None and running is not None
    )
    y, stats = _normalize(spec, input, weight, bias, residual)
    if counter is not None:
        counter += 1
    if running is not None:
        factor = momentum if momentum is not None else 1.0 / float(counter.reshape(-1)[0])
        count = x.size // channels
        _np_functional._update_running(
            running, stats.mean, _np_functional._variance(stats, spec.eps), count, factor
        )
    return y


def _array_counter(counter):
    if counter is None:
        return None
    if not isinstance(counter, torch.Tensor) or counter.device.type != "cpu":
        raise TypeError("num_batches_tracked must be an integer CPU torch.Tensor of shape () or (1,)")
    return counter.detach().numpy()


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
    epilogue = _epilogue(activation, negative_slope)
    spec = NormSpec.instance_norm(eps, **epilogue)
    x = _array(input, "input")
    channels = _np_functional._channels(x, False)
    running = _running_arrays(running_mean, running_var, channels, writeable=bool(use_input_stats))
    if not use_input_stats:
        if running is None:
            raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
        stats = _np_functional._running_stats(running, spec.eps)
        residual = _residual_like(residual, input, spec)
        return _NormalizeWithStats.apply(
            NormSpec.batch_norm(eps, **epilogue), stats, input, weight, bias, residual
        )
    momentum = _np_functional._check_momentum(momentum, allow_none=False)
    y, stats = _normalize(spec, input, weight, bias, residual)
    if running is not None and x.shape[0] > 0:
        var = _np_functional._variance(stats, spec.eps)
        count = x.size // (x.shape[0] * channels)
        _np_functional._update_running(running, stats.mean.mean(axis=0), var.mean(axis=0), count, momentum)
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
    spec = NormSpec.group_norm(num_groups, eps, **_epilogue(activation, negative_slope))
    return _normalize(spec, input, weight, bias, residual)[0]


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
    ndim = _np_functional._normalized_ndim(_array(input, "input"), normalized_shape)
    spec = NormSpec.layer_norm(ndim, eps, **_epilogue(activation, negative_slope))
    return _normalize(spec, input, weight, bias, residual)[0]


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
    ndim = _np_functional._normalized_ndim(_array(input, "input"), normalized_shape)
    spec = NormSpec.rms_norm(ndim, eps, **_epilogue(activation, negative_slope))
    return _normalize(spec, input, weight, None, residual)[0]


# ---------------------------------------------------------------------------
# Modules: torch's own, with fastnorm's forward
# ---------------------------------------------------------------------------


class _Epilogue:
    """The ``activation`` / ``negative_slope`` attributes the modules add to torch's."""

    activation: str | None = None
    negative_slope: float = 0.01

    def _set_epilogue(self, activation, negative_slope):
        NormSpec.layer_norm(1, activation=activation, negative_slope=negative_slope)  # checks both
        self.activation, self.negative_slope = activation, float(negative_slope)

    def _epilogue(self):
        return _epilogue(self.activation, self.negative_slope)

    def extra_repr(self):
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        return text


class _BatchNorm(_Epilogue):
    def __init__(self, *args, activation=None, negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_epilogue(activation, negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(batch_norm(input) + residual)``, with torch's rules for the running statistics.

        Parameters
        ----------
        input : torch.Tensor
            CPU tensor, as the torch module takes it.
        residual : torch.Tensor, optional
            Added after the affine transform, before the activation; ``input``'s shape.

        Returns
        -------
        torch.Tensor
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
    def __init__(self, *args, activation=None, negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_epilogue(activation, negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(instance_norm(input) + residual)``; an unbatched input is one sample.

        Parameters
        ----------
        input : torch.Tensor
            CPU tensor, as the torch module takes it.
        residual : torch.Tensor, optional
            Added after the affine transform, before the activation; ``input``'s shape.

        Returns
        -------
        torch.Tensor
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

    def __init__(self, *args, activation=None, negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_epilogue(activation, negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(group_norm(input) + residual)``.

        Parameters
        ----------
        input : torch.Tensor
            CPU tensor, as the torch module takes it.
        residual : torch.Tensor, optional
            Added after the affine transform, before the activation; ``input``'s shape.

        Returns
        -------
        torch.Tensor
        """
        return group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, residual=residual, **self._epilogue()
        )


class LayerNorm(_Epilogue, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with fastnorm's kernels; also ``activation=``, ``negative_slope=``."""

    def __init__(self, *args, activation=None, negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_epilogue(activation, negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(layer_norm(input) + residual)``.

        Parameters
        ----------
        input : torch.Tensor
            CPU tensor, as the torch module takes it.
        residual : torch.Tensor, optional
            Added after the affine transform, before the activation; ``input``'s shape.

        Returns
        -------
        torch.Tensor
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

    def __init__(self, *args, activation=None, negative_slope=0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self._set_epilogue(activation, negative_slope)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(rms_norm(input) + residual)``.

        Parameters
        ----------
        input : torch.Tensor
            CPU tensor, as the torch module takes it.
        residual : torch.Tensor, optional
            Added after the affine transform, before the activation; ``input``'s shape.

        Returns
        -------
        torch.Tensor
        """
        return rms_norm(
            input, self.normalized_shape, self.weight, self.eps, residual=residual, **self._epilogue()
        )


#: torch's module type -> fastnorm's (exact types: subclasses such as SyncBatchNorm are not converted).
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
