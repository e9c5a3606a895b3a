"""Shared test-case builders: shapes, specs, layouts, random data."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

import fastnorm

DTYPES = (np.float32, np.float64)
LAYOUTS = ("cf", "cl", "cl_memory")  # NCHW; channels_last=True; NCHW view of NHWC memory


@dataclass(frozen=True)
class Case:
    """One norm on one logical shape (always given channels-first for BN/IN/GN)."""

    kind: str
    shape: tuple  # (N, C, *spatial) for BN/IN/GN; any shape for LN/RMS
    num_groups: int | None = None
    normalized_ndim: int | None = None
    eps: float | None = 1e-5

    @property
    def per_channel(self):
        return self.kind in ("batch_norm", "instance_norm", "group_norm")

    def spec(self, channels_last=False):
        if self.kind == "batch_norm":
            return fastnorm.NormSpec.batch_norm(self.eps, channels_last)
        if self.kind == "instance_norm":
            return fastnorm.NormSpec.instance_norm(self.eps, channels_last)
        if self.kind == "group_norm":
            return fastnorm.NormSpec.group_norm(self.num_groups, self.eps, channels_last)
        if self.kind == "layer_norm":
            return fastnorm.NormSpec.layer_norm(self.normalized_ndim, self.eps)
        return fastnorm.NormSpec.rms_norm(self.normalized_ndim, self.eps)

    @property
    def param_shape(self):
        if self.per_channel:
            return (self.shape[1],)
        return tuple(self.shape[len(self.shape) - self.normalized_ndim :])

    def ref_kwargs(self, channels_last=False):
        return dict(
            eps=self.eps,
            num_groups=self.num_groups,
            normalized_ndim=self.normalized_ndim,
            channels_last=channels_last,
        )

    def __str__(self):
        extra = f"G{self.num_groups}" if self.num_groups else ""
        extra += f"k{self.normalized_ndim}" if self.normalized_ndim else ""
        return f"{self.kind}-{'x'.join(map(str, self.shape))}{extra}"


def bn(*shape):
    return Case("batch_norm", shape)


def inorm(*shape):
    return Case("instance_norm", shape)


def gn(groups, *shape):
    return Case("group_norm", shape, num_groups=groups)


def ln(k, *shape):
    return Case("layer_norm", shape, normalized_ndim=k)


def rms(k, *shape, eps=None):
    return Case("rms_norm", shape, normalized_ndim=k, eps=eps)


def rng_for(*key):
    """A generator seeded from a readable key (stable across runs)."""
    seed = zlib.crc32("|".join(str(k) for k in key).encode())
    return np.random.default_rng(seed)


def normal(shape, dtype=np.float64, seed=0):
    """Standard-normal values of ``shape`` and ``dtype`` from ``default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def misaligned(a):
    """A copy of ``a`` in a buffer that starts one byte past an aligned address (a valid input)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


def arrange(x_cf, layout, case):
    """Turn a channels-first array into the layout under test.

    Returns ``(array passed to fastnorm, channels_last flag)``.
    """
    if layout == "cf" or not case.per_channel:
        return np.ascontiguousarray(x_cf), False
    nhwc = np.ascontiguousarray(np.moveaxis(x_cf, 1, -1))
    if layout == "cl":
        return nhwc, True
    return np.moveaxis(nhwc, -1, 1), False  # "cl_memory": logically NCHW, channels-last memory


def empty_like_layout(x):
    """An uninitialized buffer with the same shape, dtype and memory order as ``x``."""
    if x.ndim > 2 and not x.flags.c_contiguous and np.moveaxis(x, 1, -1).flags.c_contiguous:
        return np.moveaxis(np.empty(np.moveaxis(x, 1, -1).shape, x.dtype), -1, 1)
    return np.empty(x.shape, x.dtype)


def data(case, dtype, *, key=(), offset=0.0, scale=1.0, affine=True):
    """Random ``(x, dy, weight, bias)`` (channels-first), weight/bias None unless affine."""
    rng = rng_for(case, np.dtype(dtype).name, *key)
    x = (rng.standard_normal(case.shape) * scale + offset).astype(dtype)
    dy = rng.standard_normal(case.shape).astype(dtype)
    if affine:
        weight = rng.uniform(0.5, 1.5, case.param_shape).astype(dtype)
        bias = rng.standard_normal(case.param_shape).astype(dtype)
    else:
        weight = bias = None
    return x, dy, weight, bias


def to_ref_layout(a, layout, case):
    """Channels-last arrays back to channels-first (for comparing with the reference)."""
    if layout == "cl" and case.per_channel:
        return np.moveaxis(a, -1, 1)
    return a
