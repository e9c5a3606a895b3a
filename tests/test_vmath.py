"""``fastnorm._kernels.vmath``: float32 ``exp`` (1 ulp) and ``tanh`` (2 ulp), special values, SIMD loops.

Float32 results are compared with the float64 function (errors in ulps of the
result rounded to float32); the float32 sigmoid, SiLU, tanh and GELU-tanh loops
must keep no libm call.
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


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _tanh_all(x, out):
    for i in range(x.size):
        out[i] = vmath.tanh(x[i])


def _float32_sweep():
    """Every 512th float32 from ln(FLT_MIN) to ln(FLT_MAX) (about 4.4 million values)."""
    lo, hi = np.float32(-87.33654), np.float32(88.72283)
    negative = np.arange(np.float32(-0.0).view(np.int32), lo.view(np.int32), 512, dtype=np.int32)
    positive = np.arange(0, hi.view(np.int32), 512, dtype=np.int32)
    return np.concatenate([negative.view(np.float32), positive.view(np.float32), [lo, hi]])


def _ulp_errors(x, y, function=np.exp):
    """|y - f(x)| in units of the last place of f(x) rounded to float32 (float64 reference)."""
    reference = function(x.astype(np.float64))
    spacing = np.spacing(np.abs(reference).astype(np.float32)).astype(np.float64)
    return np.abs(y.astype(np.float64) - reference) / spacing


def _worst(x, errors, name="exp"):
    i = int(np.argmax(errors))
    return f"worst: {name}({x[i]!r}) off by {errors[i]:.3f} ulp"


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
@pytest.mark.parametrize(
    "code",
    [epilogue.SIGMOID, epilogue.SILU, epilogue.TANH, epilogue.GELU_TANH],
    ids=["sigmoid", "silu", "tanh", "gelu_tanh"],
)
def test_float32_activation_loops_call_no_libm(code):
    """Forward and gradient loops of these float32 activations: no scalar ``expf``/``tanhf`` left."""
    assert _libm_calls(code, types.float32) == []
    # the control: float64 keeps libm
    assert _libm_calls(code, types.float64)


def _tanh_sweep():
    """Every 97th float32 in [0, 20) and their negatives (about 22 million values), and the specials."""
    positive = np.arange(0, np.float32(20.0).view(np.int32), 97, dtype=np.int32).view(np.float32)
    return np.concatenate([positive, -positive])


@pytest.mark.jit
def test_float32_tanh_within_two_ulp():
    x = _tanh_sweep()
    y = np.empty_like(x)
    _tanh_all(x, y)
    tiny = np.abs(x) < 1e-30  # the reference's float32 spacing is subnormal there
    errors = np.where(tiny, 0.0, _ulp_errors(x, y, np.tanh))
    assert errors.max() <= 2.0, _worst(x, errors, "tanh")
    np.testing.assert_array_equal(np.signbit(y), np.signbit(x))


@pytest.mark.jit
def test_float32_tanh_special_values():
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 10.0, 100.0, -100.0], np.float32)
    y = np.empty_like(x)
    _tanh_all(x, y)
    np.testing.assert_array_equal(y, np.tanh(x))
    np.testing.assert_array_equal(np.signbit(y), np.signbit(x))


def test_float32_tanh_algorithm_in_python(monkeypatch):
    monkeypatch.setattr(vmath, "_pow2", vmath._pow2_python)
    monkeypatch.setattr(vmath, "exp", vmath._exp_float32)
    x = np.linspace(-10, 10, 2001, dtype=np.float32)
    y = np.array([vmath._tanh_float32(value) for value in x], np.float32)
    errors = _ulp_errors(x, y, np.tanh)
    assert errors.max() <= 2.0, _worst(x, errors, "tanh")


@pytest.mark.jit
@pytest.mark.parametrize(("name", "bound"), [("exp", 700.0), ("tanh", 20.0)])
def test_float64_is_libm(name, bound):
    x = np.random.default_rng(0).uniform(-bound, bound, 10_000)
    y = np.empty_like(x)
    {"exp": _exp_all, "tanh": _tanh_all}[name](x, y)
    np.testing.assert_array_equal(y, [getattr(math, name)(v) for v in x])
