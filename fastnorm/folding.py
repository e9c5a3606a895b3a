"""Folding an inference-mode BatchNorm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .spec import check_eps


def _vector(value, name, channels, default):
    if value is None:
        return np.full(channels, default, np.float64)
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name}.dtype={array.dtype} must hold real numbers")
    if array.shape != (channels,):
        raise ValueError(f"{name}.shape={array.shape} must be ({channels},), the layer's output channels")
    return array.astype(np.float64)


def fold_batch_norm(
    conv_weight: ArrayLike,
    conv_bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    *,
    channels_axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference-mode BatchNorm into the layer before it: return its new weight and bias.

    A convolution or linear layer ``u = conv(x, W) + b`` followed by
    ``y = (u - running_mean) / sqrt(running_var + eps) * weight + bias`` is the
    single layer ``y = conv(x, W') + b'`` with, per output channel ``c``,
    ``s_c = weight_c / sqrt(running_var_c + eps)``, ``W'[c] = W[c] * s_c`` and
    ``b'_c = (b_c - running_mean_c) * s_c + bias_c``.

    Parameters
    ----------
    conv_weight : array_like
        The layer's weight: ``(C_out, C_in, *kernel)`` for a convolution,
        ``(C_out, C_in)`` for a linear layer.
    conv_bias : array_like of shape (C_out,) or None
        The layer's bias (``None``: no bias, i.e. zero).
    running_mean, running_var : array_like of shape (C_out,)
        The BatchNorm's running statistics.
    weight, bias : array_like of shape (C_out,), optional
        The BatchNorm's affine parameters (``None``: 1 and 0).
    eps : float
        The BatchNorm's epsilon.
    channels_axis : int
        The axis of ``conv_weight`` that indexes the output channels (0 for
        convolutions and linear layers; 1 for a transposed convolution's
        ``(C_in, C_out / groups, *kernel)``).

    Returns
    -------
    folded_weight, folded_bias : ndarray
        In ``conv_weight``'s dtype (float64 for integer weights), computed in
        float64 and rounded once; ``folded_bias`` has shape ``(C_out,)``.

    Raises
    ------
    ValueError
        Shapes that do not match the output channels, ``running_var + eps``
        not positive, a bad ``eps`` or ``channels_axis``.
    TypeError
        Non-numeric arrays.

    Notes
    -----
    Ioffe & Szegedy 2015, Algorithm 2, step 11: at inference the BatchNorm is
    the affine map ``y = s * u + (beta - s * E[x])``, which composes with the
    preceding linear map.
    """
    conv_weight = np.asarray(conv_weight)
    if conv_weight.dtype.kind not in "fiu":
        raise TypeError(f"conv_weight.dtype={conv_weight.dtype} must hold real numbers")
    if conv_weight.ndim < 1:
        raise ValueError("conv_weight must have at least one dimension (the output channels)")
    if isinstance(channels_axis, bool) or not isinstance(channels_axis, int | np.integer):
        raise TypeError(f"channels_axis must be an int, got {channels_axis!r}")
    if not -conv_weight.ndim <= channels_axis < conv_weight.ndim:
        raise ValueError(
            f"channels_axis={channels_axis} is out of range for conv_weight.ndim={conv_weight.ndim}"
        )
    eps = check_eps(eps)
    channels = conv_weight.shape[channels_axis]
    conv_bias = _vector(conv_bias, "conv_bias", channels, 0.0)
    mean = _vector(running_mean, "running_mean", channels, 0.0)
    var = _vector(running_var, "running_var", channels, 1.0)
    weight = _vector(weight, "weight", channels, 1.0)
    bias = _vector(bias, "bias", channels, 0.0)
    denominator = var + eps
    if not np.all(denominator > 0):  # also refuses NaN
        worst = int(np.argmin(np.nan_to_num(denominator, nan=-np.inf)))
        raise ValueError(
            f"running_var + eps must be > 0 in every channel: channel {worst} has {denominator[worst]!r}"
        )
    scale = weight / np.sqrt(denominator)
    shape = [1] * conv_weight.ndim
    shape[channels_axis] = channels
    dtype = conv_weight.dtype if conv_weight.dtype.kind == "f" else np.dtype(np.float64)
    folded_weight = (conv_weight.astype(np.float64) * scale.reshape(shape)).astype(dtype)
    folded_bias = ((conv_bias - mean) * scale + bias).astype(dtype)
    return folded_weight, folded_bias
