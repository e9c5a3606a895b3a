"""The plan cache of ``fastnorm._plan``: a hit is only a shortcut, never a way around a check.

A plan is cached per ``(x.shape, x.strides, x.dtype, spec, training)``.  These
tests warm the cache with a valid call, then make calls that differ in exactly
one of the things a plan must not be shared across (or in something outside
the key: values, alignment, parameters, ``out``) and check they still raise or
compute what an uncached call would.
"""

from __future__ import annotations

import naive
import numpy as np
import pytest
from cases import misaligned, normal
from strategies import rejected

import fastnorm
from fastnorm import NormSpec, Stats
from fastnorm import _plan as planner


@pytest.fixture(autouse=True)
def _cold_cache():
    planner._PLAN_CACHE.clear()
    yield
    planner._PLAN_CACHE.clear()


def test_repeated_call_hits_the_cache_and_gives_the_same_result():
    x, w = normal((1, 8, 4, 4)), np.linspace(0.5, 1.5, 8)
    spec = NormSpec.group_norm(4)
    first, stats = fastnorm.forward(x, spec, w)
    assert len(planner._PLAN_CACHE) == 1
    again, stats_again = fastnorm.forward(x, spec, w)
    assert len(planner._PLAN_CACHE) == 1
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(stats_again.rstd, stats.rstd)


def test_training_checks_are_not_skipped_by_an_inference_plan():
    """Same geometry and spec: the inference plan must not serve a training call."""
    x = normal((1, 6))  # one value per channel: fine for inference, not for training
    spec = NormSpec.batch_norm()
    stats = Stats(np.zeros(6), np.ones(6))
    np.testing.assert_allclose(fastnorm.forward_inference(x, stats, spec), x)
    rejected(ValueError, "more than 1 value per channel", lambda: fastnorm.forward(x, spec), x)
    rejected(ValueError, "more than 1 value per channel", lambda: fastnorm.forward(x, spec), x)


def test_another_spec_is_checked_again():
    x = normal((2, 6, 5))
    fastnorm.forward(x, NormSpec.group_norm(3))
    rejected(
        ValueError, "num_groups=4 does not divide C=6", lambda: fastnorm.forward(x, NormSpec.group_norm(4)), x
    )
    rejected(TypeError, "spec must be a fastnorm.NormSpec", lambda: fastnorm.forward(x, "group_norm"), x)
    rejected(TypeError, "spec must be a fastnorm.NormSpec", lambda: fastnorm.forward(x, ["group_norm"]), x)


@pytest.mark.parametrize(
    ("dtype", "match"), [(np.int64, "x.dtype=int64"), (np.complex64, "x.dtype=complex64")]
)
def test_bad_dtype_with_the_strides_of_a_cached_plan(dtype, match):
    """An int64 / complex64 array with exactly the shape and strides of a cached float64 plan."""
    good = normal((3, 4, 2))
    fastnorm.forward(good, NormSpec.layer_norm(1))
    bad = np.zeros(good.shape, dtype)
    assert bad.strides == good.strides
    rejected(TypeError, match, lambda: fastnorm.forward(bad, NormSpec.layer_norm(1)), bad)


def test_dtypes_do_not_share_a_plan():
    """RMSNorm's default eps depends on the dtype; float32 and float64 views with equal strides."""
    x64 = normal((2, 4))
    x32 = normal((2, 8), np.float32)[:, ::2]
    assert x32.strides == x64.strides
    spec = NormSpec.rms_norm(1)
    assert planner._plan(x64, spec, True).kspec.eps == np.finfo(np.float64).eps
    assert planner._plan(x32, spec, True).kspec.eps == np.finfo(np.float32).eps
    y32 = fastnorm.rms_norm(x32, 4)
    x = x32.astype(np.float64)
    eps32 = float(np.finfo(np.float32).eps)
    naive.assert_close(y32, x / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + eps32), dtype=np.float32)


def test_big_endian_input_is_converted_after_a_native_call():
    x = normal((2, 4, 3))
    spec = NormSpec.group_norm(2)
    expected, _ = fastnorm.forward(x, spec)
    big = x.astype(">f8")
    planner._plan(big, spec, True)  # planning a big-endian array must not cache it as kernel-ready
    y, _ = fastnorm.forward(big, spec)
    assert y.dtype == np.float64 and y.dtype.isnative
    np.testing.assert_array_equal(y, expected)
    assert all(key[2].isnative for key in planner._PLAN_CACHE)


def test_strides_do_not_share_a_plan():
    """Same shape, channels-last memory: its own plan (channels-last kernel), same values."""
    spec = NormSpec.group_norm(2)
    nchw = normal((2, 4, 3, 5))
    nhwc_memory = np.ascontiguousarray(np.moveaxis(nchw, 1, -1))
    as_nchw = np.moveaxis(nhwc_memory, -1, 1)
    y, stats = fastnorm.forward(nchw, spec)
    y_cl, stats_cl = fastnorm.forward(as_nchw, spec)
    assert len(planner._PLAN_CACHE) == 2
    assert not planner._plan(nchw, spec, True).kspec.flags & fastnorm._kernels.CHANNELS_LAST
    assert planner._plan(as_nchw, spec, True).kspec.flags & fastnorm._kernels.CHANNELS_LAST
    np.testing.assert_allclose(y_cl, y, rtol=1e-12, atol=1e-12)
    assert np.moveaxis(y_cl, 1, -1).flags.c_contiguous  # output in the memory order of x
    np.testing.assert_allclose(stats_cl.mean, stats.mean, rtol=1e-12, atol=1e-12)
    # a strided view of the same shape: copied, not read with a cached contiguous plan
    strided = normal((2, 8, 3, 5))[:, ::2]
    y_strided, _ = fastnorm.forward(strided, spec)
    np.testing.assert_array_equal(y_strided, fastnorm.forward(np.ascontiguousarray(strided), spec)[0])


def test_misaligned_input_after_an_aligned_call():
    x = normal((3, 4, 5))
    spec = NormSpec.group_norm(2)
    expected, stats = fastnorm.forward(x, spec)
    dy = normal((3, 4, 5), seed=1)
    dx, dw, _ = fastnorm.backward(dy, x, stats, spec, np.ones(4))
    y, _ = fastnorm.forward(misaligned(x), spec)
    np.testing.assert_array_equal(y, expected)
    dx_mis, dw_mis, _ = fastnorm.backward(misaligned(dy), misaligned(x), stats, spec, np.ones(4))
    np.testing.assert_array_equal(dx_mis, dx)
    np.testing.assert_array_equal(dw_mis, dw)


def test_array_likes_take_the_full_path_after_a_cached_call():
    x = normal((2, 4))
    spec = NormSpec.layer_norm(1)
    expected, _ = fastnorm.forward(x, spec)
    np.testing.assert_array_equal(fastnorm.forward(x.tolist(), spec)[0], expected)
    rejected(TypeError, "x.dtype=<U", lambda: fastnorm.forward([["a"] * 4] * 2, spec))


def test_bad_arguments_beside_a_cached_plan_still_raise_and_modify_nothing():
    x, dy = normal((2, 4, 3)), normal((2, 4, 3), seed=1)
    spec = NormSpec.group_norm(2)
    w, b = np.ones(4), np.zeros(4)
    _, stats = fastnorm.forward(x, spec, w, b)
    fastnorm.backward(dy, x, stats, spec, w)
    out = np.zeros_like(x)
    rejected(
        ValueError, r"weight.shape=\(3,\)", lambda: fastnorm.forward(x, spec, np.ones(3), out=out), x, out
    )
    rejected(
        TypeError, "bias.dtype=complex128", lambda: fastnorm.forward(x, spec, w, b + 0j, out=out), x, out
    )
    rejected(ValueError, "out has shape", lambda: fastnorm.forward(x, spec, w, b, out=out[:1]), x, out)
    rejected(
        ValueError, "overlaps weight", lambda: fastnorm.forward(x, spec, out.reshape(-1)[:4], out=out), x, out
    )
    bad_stats = Stats(stats.mean[:1], stats.rstd)
    rejected(
        ValueError, r"stats.mean.shape=\(1, 2\)", lambda: fastnorm.forward_inference(x, bad_stats, spec), x
    )
    rejected(
        TypeError, "stats must be a fastnorm.Stats", lambda: fastnorm.forward_inference(x, (1, 2), spec), x
    )
    rejected(
        ValueError, r"dy.shape=\(2, 4, 2\)", lambda: fastnorm.backward(dy[..., :2], x, stats, spec), x, dy
    )
    rejected(
        TypeError, "dy.dtype=float32", lambda: fastnorm.backward(dy.astype(np.float32), x, stats, spec), x
    )
    rejected(TypeError, "dy.dtype=int64", lambda: fastnorm.backward(dy.astype(np.int64), x, stats, spec), x)


def test_cache_size_is_bounded():
    spec = NormSpec.layer_norm(1)
    for width in range(1, planner._PLAN_CACHE_SIZE + 20):
        fastnorm.forward(np.ones((1, width)), spec)
        assert len(planner._PLAN_CACHE) <= planner._PLAN_CACHE_SIZE


@pytest.mark.parametrize(
    "spec",
    [
        NormSpec.batch_norm(),
        NormSpec.group_norm(4, eps=1e-3, channels_last=True),
        NormSpec.layer_norm(2),
        NormSpec.rms_norm(1),
        NormSpec("instance_norm", 0.5),
        NormSpec.group_norm(2, activation="leaky_relu", negative_slope=0.2),
    ],
)
def test_spec_hash_is_that_of_its_fields_and_survives_pickling(spec):
    """Specs key the plan cache with a hash computed once: equal specs, equal hashes."""
    import copy
    import dataclasses
    import pickle

    twin = NormSpec(
        spec.kind, spec.eps, spec.num_groups, spec.normalized_ndim, spec.channels_last, spec.activation,
        spec.negative_slope,
    )  # fmt: skip
    assert twin is not spec and twin == spec and hash(twin) == hash(spec)
    other = dataclasses.replace(spec, eps=0.25)
    fields = (other.kind, 0.25, other.num_groups, other.normalized_ndim, other.channels_last)
    assert other != spec and hash(other) == hash((*fields, other.activation, other.negative_slope))
    for copied in (pickle.loads(pickle.dumps(spec)), copy.copy(spec), copy.deepcopy(spec)):
        assert copied == spec and hash(copied) == hash(spec)


def test_pickled_spec_hashes_right_in_another_process():
    """The hash of a string changes between processes: an unpickled spec must recompute it."""
    import pickle
    import subprocess
    import sys

    spec = NormSpec.group_norm(4)
    code = (
        "import pickle, sys; from fastnorm import NormSpec; "
        "spec = pickle.loads(sys.stdin.buffer.read()); "
        "fresh = NormSpec.group_norm(4); "
        "assert hash(spec) == hash(fresh) and {spec: 1}[fresh] == 1, 'stale hash'"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(spec), capture_output=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr.decode()


def test_forward_stats_are_ordinary_frozen_stats():
    """forward builds its Stats without the dataclass __init__: it must still be a normal value."""
    import dataclasses

    x = normal((3, 8))
    y, stats = fastnorm.forward(x, NormSpec.layer_norm(1), bias=np.zeros(8))
    built = Stats(stats.mean, stats.rstd, True)
    assert type(stats) is Stats and stats == built and stats.has_bias is True
    assert set(vars(stats)) == {field.name for field in dataclasses.fields(Stats)}  # every field set
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.mean = np.zeros(3)
    assert fastnorm.forward(x, NormSpec.layer_norm(1))[1].has_bias is False
