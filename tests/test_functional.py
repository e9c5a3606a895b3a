"""The torch.nn.functional-style API: running statistics, inference, eps defaults, out= buffers."""

from __future__ import annotations

import naive
import numpy as np
import pytest
from strategies import rejected

import fastnorm


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_batch_norm_running_stats_momentum(dtype, momentum):
    x = (_rng(1).standard_normal((4, 3, 5, 2)) * 3 + 2).astype(dtype)
    rm = np.array([0.5, -1.0, 2.0], dtype)
    rv = np.array([1.0, 2.0, 0.5], dtype)
    rm0, rv0 = rm.copy().astype(np.float64), rv.copy().astype(np.float64)
    counter = np.zeros(1, np.int64)
    y = fastnorm.batch_norm(x, rm, rv, training=True, momentum=momentum, num_batches_tracked=counter)
    mean = x.astype(np.float64).mean(axis=(0, 2, 3))
    m = x.size // 3
    unbiased = x.astype(np.float64).var(axis=(0, 2, 3)) * m / (m - 1)
    tol = naive.default_tol(dtype, 16)
    np.testing.assert_allclose(rm, (1 - momentum) * rm0 + momentum * mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, (1 - momentum) * rv0 + momentum * unbiased, rtol=tol, atol=tol)
    assert counter[0] == 1  # incremented by every training call, as torch's module buffer
    ry, _, _ = naive.forward(x, "batch_norm")
    naive.assert_close(y, ry)


def test_batch_norm_cumulative_average_with_counter():
    """momentum=None: factor 1/num_batches_tracked, i.e. the plain average of all batch statistics."""
    rng = _rng(2)
    rm, rv = np.full(2, 7.0), np.full(2, 9.0)
    counter = np.zeros((), np.int64)
    means, unbiased = [], []
    for step in range(4):
        x = rng.standard_normal((3, 2, 4)) * (step + 1) + step
        fastnorm.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=counter)
        means.append(x.mean(axis=(0, 2)))
        unbiased.append(x.var(axis=(0, 2), ddof=1))
        assert int(counter) == step + 1
        np.testing.assert_allclose(rm, np.mean(means, axis=0), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(rv, np.mean(unbiased, axis=0), rtol=1e-13, atol=1e-13)


def test_batch_norm_momentum_none_needs_counter_and_changes_nothing():
    x = _rng(3).standard_normal((3, 2, 4))
    rm, rv = np.zeros(2), np.ones(2)
    out = np.full_like(x, 42.0)
    rejected(
        ValueError,
        "num_batches_tracked",
        lambda: fastnorm.batch_norm(x, rm, rv, training=True, momentum=None, out=out),
        x,
        rm,
        rv,
        out,
    )
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    np.testing.assert_array_equal(out, 42.0)


def test_batch_norm_without_running_stats_and_counter_only():
    x = _rng(4).standard_normal((3, 2, 4))
    counter = np.array([5], np.int32)
    y = fastnorm.batch_norm(x, None, None, training=True, num_batches_tracked=counter)
    naive.assert_close(y, naive.forward(x, "batch_norm")[0])
    assert counter[0] == 6


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_inference_uses_running_stats(dtype, channels_last):
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    rm = rng.standard_normal(3).astype(dtype)
    rv = rng.uniform(0.5, 2, 3).astype(dtype)
    w = rng.uniform(0.5, 1.5, 3).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x
    y = fastnorm.batch_norm(xin, rm, rv, w, b, training=False, eps=1e-3, channels_last=channels_last)
    if channels_last:
        y = np.moveaxis(y, -1, 1)
    shape = (1, 3, 1, 1)
    x64, rv64 = x.astype(np.float64), rv.astype(np.float64)
    expected = (x64 - rm.reshape(shape)) / np.sqrt(rv64.reshape(shape) + 1e-3)
    expected = expected * w.reshape(shape) + b.reshape(shape)
    naive.assert_close(y, expected)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    # one value per channel is fine in inference
    y1 = fastnorm.batch_norm(x[:1, :, :1, :1], rm, rv, training=False)
    assert y1.shape == (1, 3, 1, 1)


def test_batch_norm_inference_accepts_read_only_running_stats():
    x = _rng(6).standard_normal((2, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    rm.flags.writeable = rv.flags.writeable = False
    y = fastnorm.batch_norm(x, rm, rv, training=False, eps=0.0)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("momentum", [0.1, 0.6])
def test_instance_norm_running_stats(momentum):
    """Running stats take the batch average of per-instance mean and unbiased variance."""
    x = _rng(7).standard_normal((3, 2, 5)) * 2 + 1
    rm, rv = np.array([1.0, -1.0]), np.array([2.0, 3.0])
    rm0, rv0 = rm.copy(), rv.copy()
    y = fastnorm.instance_norm(x, rm, rv, momentum=momentum)
    mean = x.mean(axis=2).mean(axis=0)
    var = x.var(axis=2, ddof=1).mean(axis=0)
    np.testing.assert_allclose(rm, (1 - momentum) * rm0 + momentum * mean, rtol=1e-13)
    np.testing.assert_allclose(rv, (1 - momentum) * rv0 + momentum * var, rtol=1e-13)
    naive.assert_close(y, naive.forward(x, "instance_norm")[0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_use_input_stats_false(channels_last):
    rng = _rng(8)
    x = rng.standard_normal((2, 3, 4, 2))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x
    y = fastnorm.instance_norm(xin, rm, rv, w, b, use_input_stats=False, channels_last=channels_last)
    if channels_last:
        y = np.moveaxis(y, -1, 1)
    s = (1, 3, 1, 1)
    expected = (x - rm.reshape(s)) / np.sqrt(rv.reshape(s) + 1e-5) * w.reshape(s) + b.reshape(s)
    naive.assert_close(y, expected)
    rejected(
        ValueError,
        "running_mean and running_var",
        lambda: fastnorm.instance_norm(x, use_input_stats=False),
        x,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rms_norm_eps_none_uses_finfo_eps(dtype):
    x = (_rng(9).standard_normal((4, 6)) * 1e-4).astype(dtype)  # mean square comparable to eps
    w = _rng(10).uniform(0.5, 1.5, 6).astype(dtype)
    y = fastnorm.rms_norm(x, 6, w)
    expected = naive.forward(x, "rms_norm", w, eps=float(np.finfo(dtype).eps), normalized_ndim=1)[0]
    naive.assert_close(y, expected)
    assert fastnorm.NormSpec.rms_norm(1).eps is None
    y2 = fastnorm.rms_norm(x, (6,), w, eps=0.5)
    naive.assert_close(y2, naive.forward(x, "rms_norm", w, eps=0.5, normalized_ndim=1)[0])


def test_layer_norm_normalized_shape_int_and_tuple():
    x = _rng(11).standard_normal((2, 3, 4))
    np.testing.assert_array_equal(fastnorm.layer_norm(x, 4), fastnorm.layer_norm(x, (4,)))
    # other integer types and sequences (past the fast path for plain ints) give the same
    for same in (np.int64(4), [4], (np.int32(4),), np.array([4])):
        np.testing.assert_array_equal(fastnorm.layer_norm(x, same), fastnorm.layer_norm(x, 4))
        np.testing.assert_array_equal(fastnorm.rms_norm(x, same), fastnorm.rms_norm(x, 4))
    # a list input (not an ndarray) is converted before its trailing dims are read
    np.testing.assert_array_equal(fastnorm.layer_norm(x.tolist(), (3, 4)), fastnorm.layer_norm(x, (3, 4)))
    naive.assert_close(fastnorm.layer_norm(x, (3, 4)), naive.forward(x, "layer_norm", normalized_ndim=2)[0])


def test_group_norm_channels_last():
    x = _rng(12).standard_normal((2, 6, 3, 4))
    y = fastnorm.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 3, channels_last=True)
    naive.assert_close(np.moveaxis(y, -1, 1), naive.forward(x, "group_norm", num_groups=3)[0])


def _calls():
    """(name, fn(x, out), x) for every functional entry point."""
    rng = _rng(13)
    x4 = rng.standard_normal((2, 4, 3, 5))
    rm, rv = np.zeros(4), np.ones(4)
    return [
        ("batch_norm-train", lambda x, out: fastnorm.batch_norm(x, None, None, training=True, out=out), x4),
        ("batch_norm-eval", lambda x, out: fastnorm.batch_norm(x, rm, rv, out=out), x4),
        ("instance_norm", lambda x, out: fastnorm.instance_norm(x, out=out), x4),
        ("group_norm", lambda x, out: fastnorm.group_norm(x, 2, out=out), x4),
        ("layer_norm", lambda x, out: fastnorm.layer_norm(x, (3, 5), out=out), x4),
        ("rms_norm", lambda x, out: fastnorm.rms_norm(x, 5, out=out), x4),
    ]


@pytest.mark.parametrize("index", range(6), ids=[c[0] for c in _calls()])
def test_out_buffers_and_in_place(index):
    _, fn, x = _calls()[index]
    expected = fn(x.copy(), None)
    out = np.empty_like(x)
    got = fn(x, out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    xb = x.copy()
    got = fn(xb, xb)
    assert got is xb
    np.testing.assert_array_equal(xb, expected)
