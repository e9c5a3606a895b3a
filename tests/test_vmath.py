"""``fastnorm._kernels.vmath.exp``: float32 within 1 ulp, libm's special values, vectorizable loops.

Float32 results are compared with float64 ``np.exp`` rounded to float32 (errors in
its ulps); the float32 SiLU and sigmoid loops must keep no libm call.
"""

from __future__ import annotations

import math
import re

import numba
import numpy as np
import pytest
from numba import types

from fastnorm._config import JIT_OPTIONS
from fastnorm._kernels import epilogue, vmath

F32 = np.finfo(np.float32)


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = vmath.exp(x[i])


def _float32_sweep():
    """Every 512th float32 from ln(FLT_MIN) to ln(FLT_MAX) (about 4.4 million values)."""
    lo, hi = np.float32(-87.33654), np.float32(88.72283)
    negative = np.arange(np.float32(-0.0).view(np.int32), lo.view(np.int32), 512, dtype=np.int32)
    positive = np.arange(0, hi.view(np.int32), 512, dtype=np.int32)
    return np.concatenate([negative.view(np.float32), positive.view(np.float32), [lo, hi]])


def _ulp_errors(x, y):
    """|y - exp(x)| in units of the last place of exp(x) rounded to float32 (float64 reference)."""
    reference = np.exp(x.astype(np.float64))
    return np.abs(y.astype(np.float64) - reference) / np.spacing(reference.astype(np.float32)).astype(
        np.float64
    )


def _worst(x, errors):
    i = int(np.argmax(errors))
    return f"worst: exp({x[i]!r}) off by {errors[i]:.3f} ulp"


@pytest.mark.jit
def test_float32_exp_within_one_ulp():
    x = _float32_sweep()
    y = np.empty_like(x)
    _exp_all(x, y)
    errors = _ulp_errors(x, y)
    assert errors.max() <= 1.0, _worst(x, errors)


def test_float32_exp_algorithm_in_python(monkeypatch):
    """The same reduction and polynomial in plain Python (what NUMBA_DISABLE_JIT=1 would run)."""
    monkeypatch.setattr(vmath, "_pow2", vmath._pow2_python)
    x = np.concatenate([np.linspace(-87.3, 88.7, 2001, dtype=np.float32), [-1e-30, 0.0, 1e-30]]).astype(
        np.float32
    )
    y = np.array([vmath._exp_float32(value) for value in x], np.float32)
    errors = _ulp_errors(x, y)
    assert errors.max() <= 1.0, _worst(x, errors)


SPECIAL = [
    (np.nan, np.nan),
    (np.inf, np.inf),
    (-np.inf, 0.0),
    (0.0, 1.0),
    (-0.0, 1.0),
    (89.0, np.inf),  # above ln(FLT_MAX)
    (88.7229, np.inf),
    (1000.0, np.inf),
    (-88.0, 0.0),  # libm: a subnormal (6.1e-39); flushed here (module notes)
    (-1000.0, 0.0),
]


@pytest.mark.jit
@pytest.mark.parametrize(("x", "expected"), SPECIAL, ids=[str(x) for x, _ in SPECIAL])
def test_float32_exp_special_values(x, expected):
    out = np.empty(1, np.float32)
    _exp_all(np.array([x], np.float32), out)
    np.testing.assert_array_equal(out, np.array([expected], np.float32))


@pytest.mark.jit
def test_float32_exp_largest_finite():
    """Up to ln(FLT_MAX) the result stays finite (2**n applied as two factors, n up to 128)."""
    x = np.array([88.5, 88.72283, 88.3], np.float32)
    y = np.empty_like(x)
    _exp_all(x, y)
    assert np.isfinite(y).all() and y[1] > F32.max * 0.99, y
    errors = _ulp_errors(x, y)
    assert errors.max() <= 1.0, _worst(x, errors)


@pytest.mark.jit
def test_float64_exp_is_libm():
    x = np.random.default_rng(0).uniform(-700, 700, 10_000)
    y = np.empty_like(x)
    _exp_all(x, y)
    np.testing.assert_array_equal(y, [math.exp(v) for v in x])


def _libm_calls(code, dtype):
    """Names of the exp/erf/tanh functions called by the compiled activation loop ``code``."""
    namespace = {"epilogue": epilogue}
    exec(f"def act(ys, dys, slope):\n    epilogue._act_loop(ys, dys, {code}, slope)\n", namespace)
    dispatcher = numba.njit(**{**JIT_OPTIONS, "cache": False})(namespace["act"])
    signature = (types.Array(dtype, 1, "C"), types.Array(dtype, 1, "C"), types.float64)
    dispatcher.compile(signature)
    calls = re.findall(r"call [^@]*@([\w.]+)\(", dispatcher.inspect_llvm(signature))
    return sorted({name for name in calls if re.search("exp|erf|tanh", name)})


@pytest.mark.jit
@pytest.mark.parametrize("code", [epilogue.SIGMOID, epilogue.SILU], ids=["sigmoid", "silu"])
def test_float32_sigmoid_and_silu_loops_call_no_libm(code):
    """Forward and gradient loops of float32 SiLU / sigmoid: no scalar ``expf`` left (so they vectorize)."""
    assert _libm_calls(code, types.float32) == []
    # the control: float64 keeps libm's exp
    assert "llvm.exp.f64" in _libm_calls(code, types.float64)
