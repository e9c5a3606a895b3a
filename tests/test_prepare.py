"""fastnorm.prepare: a call checked once, then run again on the same memory.

Every prepared call must give bitwise what the function gives on the arrays'
current contents, on every run, for every kernel family and call option
(residual, activation, pre-norm skip, in place, 16-bit data, bfloat16 bits),
for any thread count; it must refuse what it cannot bind (an array the
kernels would read through a copy, which would go stale) with the argument's
name; and an invalid call must raise what the function raises.  The forked
child's run of the parent's prepared calls is in ``tests/test_fork.py``.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numba
import numpy as np
import pytest

import fastnorm
from fastnorm import NormSpec

pytestmark = pytest.mark.jit

#: (name, spec, shape, channels-last): the three kernel families (``(N, *spatial, C)`` arrays
#: with a channels-last spec), small and above the serial builds' threshold (16384 elements).
CASES = [
    ("gn-nchw", NormSpec.group_norm(4), (4, 16, 5, 5), False),
    ("bn-nchw-large", NormSpec.batch_norm(), (8, 16, 16, 16), False),
    ("bn-nhwc", NormSpec.batch_norm(channels_last=True), (4, 8, 6, 16), True),
    ("in-nhwc-large", NormSpec.instance_norm(channels_last=True), (8, 16, 16, 32), True),
    ("ln", NormSpec.layer_norm(1), (64, 96), False),
    ("ln-2d-params", NormSpec.layer_norm(2), (8, 6, 40), False),
    ("rms-large", NormSpec.rms_norm(1), (64, 768), False),
]
IDS = [case[0] for case in CASES]


def _arrays(spec, shape, dtype, seed=0):
    """x, dy, residual, weight, bias of a case (channels-last memory is ``shape``'s own order)."""
    rng = np.random.default_rng(seed)
    if spec.kind in ("layer_norm", "rms_norm"):
        pshape = shape[-spec.normalized_ndim :]
    else:
        pshape = (shape[-1] if spec.channels_last else shape[1],)
    x, dy, residual = ((rng.standard_normal(shape) * 2 + 1).astype(dtype) for _ in range(3))
    param_dtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    weight = (1 + 0.5 * rng.standard_normal(pshape)).astype(param_dtype)
    bias = rng.standard_normal(pshape).astype(param_dtype)
    return x, dy, residual, weight, bias


def _same(actual, expected):
    """Bitwise equality of two results (arrays, Stats, Gradients, tuples, None)."""
    if isinstance(expected, fastnorm.Stats):
        for field in ("mean", "rstd", "h"):
            _same(getattr(actual, field), getattr(expected, field))
        return
    if isinstance(expected, tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _same(a, e)
        if isinstance(expected, fastnorm.Gradients):
            for name in ("dresidual", "dskip", "dskip_bias"):
                _same(getattr(actual, name), getattr(expected, name))
        return
    if expected is None:
        assert actual is None
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert np.array_equal(actual.view(np.uint8), expected.view(np.uint8))


def _check_runs(function, args, kwargs, refill):
    """The prepared call equals the function, on the first run and after the inputs change."""
    run = fastnorm.prepare(function, *args, **kwargs)
    first = run()
    _same(first, function(*args, **kwargs))
    refill()
    second = run()
    _same(second, function(*args, **kwargs))
    return first, second


def _refill(*arrays, seed=1):
    """Give every array new random contents in place."""
    rng = np.random.default_rng(seed)

    def refill():
        for array in arrays:
            array[...] = rng.standard_normal(array.shape).astype(array.dtype)

    return refill


@pytest.mark.parametrize("name, spec, shape, channels_last", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prepared_calls_match_the_functions_run_after_run(name, spec, shape, channels_last, dtype):
    assert spec.channels_last == channels_last
    x, dy, _, weight, bias = _arrays(spec, shape, dtype)
    refill = _refill(x, weight, bias)
    (y, stats), (y2, stats2) = _check_runs(fastnorm.forward, (x, spec, weight, bias), {}, refill)
    assert y2 is y and stats2 is stats  # the same objects, overwritten
    _check_runs(fastnorm.forward_inference, (x, stats, spec, weight, bias), {}, refill)
    _, stats = fastnorm.forward(x, spec, weight, bias)
    first, second = _check_runs(
        fastnorm.backward, (dy, x, stats, spec, weight), {"bias": bias}, _refill(dy, x)
    )
    assert second.dx is first.dx and second.dweight is first.dweight and second.dbias is first.dbias


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_residual_activation_and_outputs_in_place(activation):
    spec = NormSpec.group_norm(4, activation=activation)
    x, dy, residual, weight, bias = _arrays(spec, (4, 16, 6, 6), np.float32)
    refill = _refill(x, residual, weight, bias)
    kwargs = {"residual": residual}
    (y, stats), _ = _check_runs(fastnorm.forward, (x, spec, weight, bias), kwargs, refill)
    _check_runs(fastnorm.forward_inference, (x, stats, spec, weight, bias), kwargs, refill)
    _, stats = fastnorm.forward(x, spec, weight, bias, residual=residual)
    backward_kwargs = {"bias": bias, "residual": residual}
    grads, _ = _check_runs(fastnorm.backward, (dy, x, stats, spec, weight), backward_kwargs, _refill(dy))
    assert grads.dresidual is not None
    # out = x (in place): each run normalizes x's current contents into x
    x_copy = x.copy()
    run = fastnorm.prepare(fastnorm.forward, x, spec, weight, bias, residual=residual, out=x)
    expected, _ = fastnorm.forward(x_copy, spec, weight, bias, residual=residual)
    assert run()[0] is x
    _same(x, expected)
    # out = dy without an activation: dresidual is dy's copy taken before dx overwrites it, every run
    plain = NormSpec.group_norm(4)
    _, stats = fastnorm.forward(x_copy, plain, weight, bias, residual=residual)
    run = fastnorm.prepare(fastnorm.backward, dy, x_copy, stats, plain, weight, residual=residual, out=dy)
    for seed in (2, 3):
        _refill(dy, seed=seed)()
        dy_before = dy.copy()
        expected = fastnorm.backward(dy_before.copy(), x_copy, stats, plain, weight, residual=residual)
        grads = run()
        _same(grads, expected)
        _same(grads.dresidual, dy_before)


def test_skip_forward_and_backward():
    spec = NormSpec.layer_norm(1)
    x, dy, skip, weight, bias = _arrays(spec, (32, 64), np.float32)
    skip_bias = np.random.default_rng(5).standard_normal(64).astype(np.float32)
    kwargs = {"skip": skip, "skip_bias": skip_bias}
    (_, stats), _ = _check_runs(
        fastnorm.forward, (x, spec, weight, bias), kwargs, _refill(x, skip, skip_bias)
    )
    grads, _ = _check_runs(fastnorm.backward, (dy, x, stats, spec, weight), {}, _refill(dy))
    assert grads.dskip is grads.dx and grads.dskip_bias is not None
    # after a skip add the backward reads stats.h: x only fixes the geometry and is not bound
    fastnorm.prepare(fastnorm.backward, dy, np.asfortranarray(x), stats, spec, weight)()


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_16bit_data_with_float32_parameters(dtype):
    spec = NormSpec.layer_norm(1)
    x, dy, _, weight, bias = _arrays(spec, (16, 64), dtype)
    (_, stats), _ = _check_runs(fastnorm.forward, (x, spec, weight, bias), {}, _refill(x))
    _check_runs(fastnorm.backward, (dy, x, stats, spec, weight), {}, _refill(dy))
    # 16-bit parameters are widened to float32 copies: refused, by name
    with pytest.raises(ValueError, match="^weight .* would be read through a copy"):
        fastnorm.prepare(fastnorm.forward, x, spec, weight.astype(dtype), bias)


def test_bfloat16_bits():
    spec = NormSpec.rms_norm(1)
    values, _, _, weight, _ = _arrays(spec, (8, 32), ml_dtypes.bfloat16)
    bits = values.view(np.uint16)
    _check_runs(fastnorm.forward, (bits, spec, weight), {"dtype": "bfloat16"}, _refill(values))


def test_any_thread_count_and_a_changed_one():
    spec = NormSpec.batch_norm(channels_last=True)
    x, dy, _, weight, bias = _arrays(spec, (8, 16, 16, 32), np.float32)
    forward = fastnorm.prepare(fastnorm.forward, x, spec, weight, bias)
    threads = numba.get_num_threads()
    results = []
    try:
        for count in sorted({1, threads}):
            numba.set_num_threads(count)
            y, stats = forward()
            backward = fastnorm.prepare(fastnorm.backward, dy, x, stats, spec, weight)
            results.append([a.copy() for a in (y, stats.mean, stats.rstd, *backward())])
    finally:
        numba.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            _same(a, b)


def test_arrays_read_through_a_copy_are_refused_by_name():
    spec = NormSpec.group_norm(4)
    x, dy, residual, weight, bias = _arrays(spec, (4, 16, 5, 5), np.float32)
    _, stats = fastnorm.forward(x, spec, weight, bias)
    with pytest.raises(ValueError, match="^x .* would be read through a copy"):
        fastnorm.prepare(fastnorm.forward, x[:, :, ::2], spec, weight, bias)
    with pytest.raises(ValueError, match="^bias .* would be read through a copy"):
        fastnorm.prepare(fastnorm.forward, x, spec, weight, bias.astype(np.float64))
    with pytest.raises(ValueError, match="^dy .* would be read through a copy"):
        fastnorm.prepare(fastnorm.backward, np.asfortranarray(dy), x, stats, spec, weight)
    with pytest.raises(ValueError, match="residual must be an aligned C-contiguous array"):  # as forward
        fastnorm.prepare(fastnorm.forward, x, spec, weight, residual=np.asfortranarray(residual))
    f32_stats = fastnorm.Stats(stats.mean.astype(np.float32), stats.rstd)
    with pytest.raises(ValueError, match=r"^stats\.mean .* would be read through a copy"):
        fastnorm.prepare(fastnorm.forward_inference, x, f32_stats, spec, weight, bias)
    with pytest.raises(TypeError, match="weight must be a numpy.ndarray, got list"):
        fastnorm.prepare(fastnorm.forward, x, spec, list(weight), bias)
    # a parameter the backward does not read (bias without an activation) is not bound
    fastnorm.prepare(fastnorm.backward, dy, x, stats, spec, weight, bias=bias.astype(np.float64))()


def test_invalid_calls_raise_what_the_function_raises():
    spec = NormSpec.group_norm(4)
    x, _, _, weight, bias = _arrays(spec, (4, 16, 5, 5), np.float32)
    with pytest.raises(TypeError, match="prepare takes fastnorm.forward.*got batch_norm"):
        fastnorm.prepare(fastnorm.batch_norm, x)
    with pytest.raises(TypeError, match="unexpected keyword argument 'weights'"):
        fastnorm.prepare(fastnorm.forward, x, spec, weights=weight)
    for call in (fastnorm.forward, fastnorm.prepare):
        args = (
            (x, spec, weight[:8], bias)
            if call is fastnorm.forward
            else (fastnorm.forward, x, spec, weight[:8], bias)
        )
        with pytest.raises(ValueError, match=r"weight.shape=\(8,\) does not match"):
            call(*args)
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="overlaps weight"):
        fastnorm.prepare(fastnorm.forward, x, spec, out.reshape(-1)[:16], bias, out=out)


def test_prepared_call_keeps_its_memory_when_the_caller_reshapes():
    spec = dataclasses.replace(NormSpec.layer_norm(1))
    x, _, _, weight, bias = _arrays(spec, (8, 32), np.float32)
    run = fastnorm.prepare(fastnorm.forward, x, spec, weight, bias)
    expected = fastnorm.forward(x, spec, weight, bias)[0].copy()
    x.shape = (32, 8)  # in place: the prepared call still reads the (8, 32) rows it checked
    y, _ = run()
    assert y.shape == (8, 32)
    _same(y, expected)
