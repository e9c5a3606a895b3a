"""Elementary functions whose loops vectorize: float32 ``exp`` and ``tanh`` without libm calls.

``math.exp`` and ``math.tanh`` compile to a call of libm's scalar ``expf`` /
``tanhf`` per element, which keeps a loop from vectorizing: a SiLU over a
Stable-Diffusion GroupNorm output cost more than the norm itself
(docs/perf-notes/vectorized-exp.md).  :func:`exp` and :func:`tanh` are libm's
for float64, and for float32 branch-free arithmetic that LLVM vectorizes.

Float32 ``exp(x)``: ``n = round(x / ln 2)``, ``r = x - n ln 2`` (``ln 2`` in
two parts, so that ``r`` is exact), ``exp(r)`` by its Taylor polynomial of
degree 7 on ``|r| <= ln(2) / 2`` (truncation below ``2.2e-8``), times ``2**n``
built from the exponent bits.  ``2**n`` is applied as two factors, so that ``n
= 128`` (``x`` up to ``ln(FLT_MAX)``) does not overflow the scale.  Error: below
1 ulp (0.894 at most over 4.4 million arguments, ``tests/test_vmath.py``).
Special values as libm: ``exp(nan) = nan``, ``exp(inf) = inf``, ``exp(x) =
inf`` above ``ln(FLT_MAX)``, ``exp(-inf) = 0``; below ``ln(FLT_MIN)`` (where
libm returns a subnormal, at most ``1.2e-38``) the result is 0.

Float32 ``tanh(x)``: for ``|x| < 0.55`` its Taylor polynomial to ``x**17``
(truncation below 0.05 ulp); elsewhere ``sign(x) * (1 - 2 / (exp(2|x|) + 1))``.
Error: below 2 ulp (1.53 at most, just above 0.55, where the subtraction
cancels one bit).  ``tanh(+-0) = +-0``, ``tanh(+-inf) = +-1``, NaN stays NaN.
"""

from __future__ import annotations

import math

import numpy as np
from numba import types
from numba.core import config
from numba.extending import intrinsic, overload

from .._config import FASTMATH, JIT_OPTIONS, helper

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 rounded to 12 significant bits: n * _LN2_HI is exact
_LN2_LO = 1.428606765330187e-06  # ln 2 - _LN2_HI
_EXP_MAX = 88.72283905206835  # ln(FLT_MAX)
_EXP_MIN = -87.33654475055310  # ln(FLT_MIN)

#: Taylor coefficients 1/k!, k = 7 .. 0 (Horner order).
_EXP_POLY = tuple(1.0 / math.factorial(k) for k in range(7, -1, -1))


def exp(x):
    """``e**x`` as libm for float64, vectorizable for float32 (see the module's notes).

    The Python body runs under ``NUMBA_DISABLE_JIT=1`` only.
    """
    return math.exp(x)


def tanh(x):
    """``tanh(x)`` as libm for float64, vectorizable for float32 (see the module's notes).

    The Python body runs under ``NUMBA_DISABLE_JIT=1`` only.
    """
    return math.tanh(x)


def _pow2_python(n):
    return np.float32(math.ldexp(1.0, int(n)))


if config.DISABLE_JIT:
    _pow2 = _pow2_python
else:

    @intrinsic
    def _pow2(typingctx, n):
        """``2.0 ** n`` as float32 for an integer ``-126 <= n <= 127``: the bits ``(n + 127) << 23``."""
        if not isinstance(n, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            value = context.cast(builder, args[0], signature.args[0], types.int32)
            biased = builder.add(value, context.get_constant(types.int32, 127))
            bits = builder.shl(biased, context.get_constant(types.int32, 23))
            return builder.bitcast(bits, context.get_value_type(types.float32))

        return types.float32(n), codegen


def _exp_float32(x):
    """Float32 ``e**x`` (the module's notes): reduction, polynomial, two power-of-two factors."""
    t = np.float32
    # Clamped with selects that keep NaN (a comparison with NaN is false).
    xc = t(_EXP_MAX) if x > t(_EXP_MAX) else x
    xc = t(_EXP_MIN) if xc < t(_EXP_MIN) else xc
    xn = xc if xc == xc else t(0.0)  # the exponent of NaN: any finite value
    n = np.floor(xn * t(_LOG2E) + t(0.5))
    r = (xc - n * t(_LN2_HI)) - n * t(_LN2_LO)
    p = t(_EXP_POLY[0])
    p = p * r + t(_EXP_POLY[1])
    p = p * r + t(_EXP_POLY[2])
    p = p * r + t(_EXP_POLY[3])
    p = p * r + t(_EXP_POLY[4])
    p = p * r + t(_EXP_POLY[5])
    p = p * r + t(_EXP_POLY[6])
    p = p * r + t(_EXP_POLY[7])
    k = np.int32(n)
    half = k >> np.int32(1)
    y = p * _pow2(half) * _pow2(k - half)
    y = t(np.inf) if x > t(_EXP_MAX) else y
    return t(0.0) if x < t(_EXP_MIN) else y


#: Below this ``|x|``, float32 ``tanh`` is its Taylor polynomial; above, ``1 - 2 / (exp(2|x|) + 1)``.
_TANH_SMALL = 0.55

#: Taylor coefficients of ``tanh(x) / x`` in ``x**2``: powers 8 .. 1 (Horner order; the constant 1 apart).
_TANH_POLY = (
    6404582.0 / 10854718875.0,
    -929569.0 / 638512875.0,
    21844.0 / 6081075.0,
    -1382.0 / 155925.0,
    62.0 / 2835.0,
    -17.0 / 315.0,
    2.0 / 15.0,
    -1.0 / 3.0,
)


def _tanh_float32(x):
    """Float32 ``tanh(x)``: a Taylor polynomial near 0, :func:`exp` elsewhere (both computed; one kept)."""
    t = np.float32
    a = abs(x)
    x2 = x * x
    p = t(_TANH_POLY[0])
    p = p * x2 + t(_TANH_POLY[1])
    p = p * x2 + t(_TANH_POLY[2])
    p = p * x2 + t(_TANH_POLY[3])
    p = p * x2 + t(_TANH_POLY[4])
    p = p * x2 + t(_TANH_POLY[5])
    p = p * x2 + t(_TANH_POLY[6])
    p = p * x2 + t(_TANH_POLY[7])
    return _tanh_select(x, a, x * (t(1.0) + x2 * p), exp(t(2.0) * a))


@helper
def _tanh_select(x, a, small, exp_2a):
    """Return the polynomial ``small`` near 0, else ``sign(x) * (1 - 2 / (exp_2a + 1))``.

    A function of its own (LLVM inlines it), so that the selects are not in
    the IR that :func:`tanh` inlines into its callers (Numba warns about such
    branches there).
    """
    t = np.float32
    large = t(1.0) - t(2.0) / (exp_2a + t(1.0))
    large = -large if x < t(0.0) else large
    return small if a < t(_TANH_SMALL) else large


if not config.DISABLE_JIT:
    # Compiled apart from its callers (LLVM still inlines it), without ``reassoc``: re-association
    # would merge ``(x - n * _LN2_HI) - n * _LN2_LO`` back into one inexact product.
    _OVERLOAD_OPTIONS = {"fastmath": set(FASTMATH - {"reassoc"}), "error_model": JIT_OPTIONS["error_model"]}

    @overload(exp, jit_options=_OVERLOAD_OPTIONS)
    def _exp_overload(x):
        if x == types.float32:
            return _exp_float32
        if isinstance(x, types.Float):
            return lambda x: math.exp(x)
        return None

    # Inlined into its callers at Numba IR level (too large for LLVM's inliner, and a call per
    # element keeps the loop scalar); its exp stays a function of its own, compiled as above.
    @overload(tanh, inline="always", jit_options=_OVERLOAD_OPTIONS)
    def _tanh_overload(x):
        if x == types.float32:
            return _tanh_float32
        if isinstance(x, types.Float):
            return lambda x: math.tanh(x)
        return None
