"""Bad input: a clear exception naming the problem, and nothing modified.

Also the unusual-but-valid inputs: zero-size tensors, non-contiguous and
negatively-strided views, read-only and misaligned buffers, big-endian dtypes.
"""

from __future__ import annotations

import naive
import numpy as np
import pytest
from cases import misaligned, normal
from strategies import rejected

import fastnorm
from fastnorm import NormSpec, Stats

# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------

BAD_DTYPES = [
    (np.int32, TypeError, "x.dtype=int32 is not supported"),
    (np.int64, TypeError, "x.dtype=int64 is not supported"),
    (np.bool_, TypeError, "x.dtype=bool is not supported"),
    (np.complex128, TypeError, "x.dtype=complex128 is not supported"),
    (np.longdouble, TypeError, "x.dtype=float128 is not supported"),  # float16: tests/test_half.py
]


@pytest.mark.parametrize(("dtype", "exc", "match"), BAD_DTYPES, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("kind", ["batch_norm", "group_norm", "layer_norm", "rms_norm", "instance_norm"])
def test_bad_x_dtype_functional(kind, dtype, exc, match):
    x = (np.arange(2 * 4 * 3) % 5).reshape(2, 4, 3).astype(dtype)
    out = np.zeros(x.shape, np.float64)
    rm, rv = np.zeros(4), np.ones(4)
    calls = {
        "batch_norm": lambda: fastnorm.batch_norm(x, rm, rv, training=True, out=out),
        "group_norm": lambda: fastnorm.group_norm(x, 2, out=out),
        "layer_norm": lambda: fastnorm.layer_norm(x, 3, out=out),
        "rms_norm": lambda: fastnorm.rms_norm(x, 3, out=out),
        "instance_norm": lambda: fastnorm.instance_norm(x, rm, rv, out=out),
    }
    rejected(exc, match, calls[kind], x, out, rm, rv, names=r"\bx\.dtype")


@pytest.mark.parametrize(("dtype", "exc", "match"), BAD_DTYPES, ids=lambda v: getattr(v, "__name__", None))
def test_bad_dtype_explicit_api(dtype, exc, match):
    spec = NormSpec.group_norm(2)
    good = normal((2, 4, 3))
    y, stats = fastnorm.forward(good, spec)
    bad = (np.arange(good.size) % 3).reshape(good.shape).astype(dtype)
    x_dtype, dy_dtype = r"\bx\.dtype", r"\bdy\.dtype"
    rejected(exc, match, lambda: fastnorm.forward(bad, spec), bad, names=x_dtype)
    rejected(exc, match, lambda: fastnorm.forward_inference(bad, stats, spec), bad, names=x_dtype)
    rejected(exc, match, lambda: fastnorm.backward(good, bad, stats, spec), good, bad, names=x_dtype)
    rejected(
        exc,
        match.replace("x.", "dy."),
        lambda: fastnorm.backward(bad, good, stats, spec),
        good,
        bad,
        names=dy_dtype,
    )


def test_bad_param_dtype():
    x = normal((2, 4, 3))
    rejected(TypeError, "weight.dtype=complex128", lambda: fastnorm.group_norm(x, 2, np.ones(4, complex)), x)
    rejected(TypeError, "bias.dtype=<U1", lambda: fastnorm.group_norm(x, 2, None, np.array(list("abcd"))), x)
    rejected(
        TypeError,
        "running_mean.dtype=int64",
        lambda: fastnorm.batch_norm(x, np.zeros(4, np.int64), np.ones(4), training=True),
        x,
    )


def test_dy_dtype_mismatch():
    spec = NormSpec.layer_norm(1)
    x = normal((3, 5))
    _, stats = fastnorm.forward(x, spec)
    dy = np.ones((3, 5), np.float32)
    rejected(
        TypeError,
        r"dy.dtype=float32 does not match x.dtype=float64",
        lambda: fastnorm.backward(dy, x, stats, spec),
        dy,
        x,
    )


# ---------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (2, 3, 2, 2, 2, 2), ()], ids=["1d", "6d", "0d"])
@pytest.mark.parametrize("kind", ["batch_norm", "instance_norm", "group_norm"])
def test_wrong_rank(kind, shape):
    x = np.ones(shape)
    spec = {
        "batch_norm": NormSpec.batch_norm(),
        "instance_norm": NormSpec.instance_norm(),
        "group_norm": NormSpec.group_norm(1),
    }[kind]
    match = r"2-D to 5-D" if len(shape) else r"2-D to 5-D|x.shape"
    stats = Stats(np.zeros(1), np.ones(1))
    rejected(ValueError, match, lambda: fastnorm.forward(x, spec), x, names=r"\bx\.shape")
    rejected(ValueError, match, lambda: fastnorm.forward_inference(x, stats, spec), x, names=r"\bx\.shape")


def test_layer_norm_rank_too_small():
    x = np.ones(4)
    rejected(ValueError, "needs x.ndim >= 2", lambda: fastnorm.forward(x, NormSpec.layer_norm(2)), x)


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize(
    ("kind", "bad_shape"),
    [
        ("batch_norm", (5,)),
        ("batch_norm", (1, 4)),
        ("group_norm", (3,)),
        ("instance_norm", ()),
        ("layer_norm", (5, 3)),
        ("layer_norm", (4,)),
    ],
)
def test_param_shape_mismatch(kind, bad_shape, which):
    x = normal((2, 4, 3, 5))
    out = np.zeros_like(x)
    spec = {
        "batch_norm": NormSpec.batch_norm(),
        "group_norm": NormSpec.group_norm(2),
        "instance_norm": NormSpec.instance_norm(),
        "layer_norm": NormSpec.layer_norm(2),
    }[kind]
    bad = np.ones(bad_shape)
    kwargs = {which: bad}
    rejected(
        ValueError,
        rf"{which}.shape=\(.*\) does not match the expected shape",
        lambda: fastnorm.forward(x, spec, out=out, **kwargs),
        x,
        out,
        bad,
    )


def test_rms_norm_weight_shape_mismatch():
    x = normal((3, 6))
    rejected(ValueError, "weight.shape", lambda: fastnorm.rms_norm(x, 6, np.ones(5)), x)


@pytest.mark.parametrize("groups", [3, 5, 8])
def test_num_groups_not_dividing_channels(groups):
    x = normal((2, 4, 3))
    out = np.zeros_like(x)
    rejected(
        ValueError,
        rf"num_groups={groups} does not divide C=4",
        lambda: fastnorm.group_norm(x, groups, out=out),
        x,
        out,
    )


@pytest.mark.parametrize("groups", [0, -2, 1.5, True])
def test_num_groups_invalid(groups):
    exc = ValueError if isinstance(groups, int) and not isinstance(groups, bool) else TypeError
    rejected(exc, "num_groups", lambda: NormSpec.group_norm(groups))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_batch_norm_training_one_value_per_channel(shape, channels_last):
    x = normal(shape)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    rm, rv = np.zeros(3), np.ones(3)
    counter = np.zeros((), np.int64)
    out = np.zeros_like(x)
    rejected(
        ValueError,
        "Expected more than 1 value per channel when training",
        lambda: fastnorm.batch_norm(
            x, rm, rv, training=True, num_batches_tracked=counter, channels_last=channels_last, out=out
        ),
        x,
        rm,
        rv,
        counter,
        out,
    )
    rejected(
        ValueError,
        "Expected more than 1 value per channel",
        lambda: fastnorm.forward(x, NormSpec.batch_norm(channels_last=channels_last)),
        x,
    )


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1), (2, 3, 1, 1)])
def test_instance_norm_training_one_spatial_element(shape):
    x = normal(shape)
    rm, rv = np.zeros(3), np.ones(3)
    rejected(
        ValueError,
        "Expected more than 1 spatial element",
        lambda: fastnorm.instance_norm(x, rm, rv),
        x,
        rm,
        rv,
    )


@pytest.mark.parametrize("normalized_shape", [(4,), (3, 6), (2, 3, 5, 1), 6, (5, 0)])
def test_normalized_shape_not_matching(normalized_shape):
    x = normal((2, 3, 5))
    rejected(ValueError, "normalized_shape", lambda: fastnorm.layer_norm(x, normalized_shape), x)
    rejected(ValueError, "normalized_shape", lambda: fastnorm.rms_norm(x, normalized_shape), x)


@pytest.mark.parametrize("normalized_shape", [5.0, (5.0,), (3.0, 5), True, (True,), (3, True)])
def test_normalized_shape_entries_must_be_integers(normalized_shape):
    """Values equal to the dims but not integers are refused (also past the functional fast path)."""
    x = normal((2, 3, 5)) if normalized_shape not in (True, (True,), (3, True)) else normal((2, 3, 1))
    rejected(TypeError, "normalized_shape", lambda: fastnorm.layer_norm(x, normalized_shape), x)
    rejected(TypeError, "normalized_shape", lambda: fastnorm.rms_norm(x, normalized_shape), x)


@pytest.mark.parametrize("dims", [(0,), 0, (3, 0)])
def test_normalized_shape_zero_dims_are_refused(dims):
    x = normal((2, 3, 0))
    rejected(ValueError, "normalized_shape", lambda: fastnorm.layer_norm(x, dims), x)


def test_normalized_shape_empty():
    x = normal((2, 3))
    rejected(ValueError, "normalized_shape", lambda: fastnorm.layer_norm(x, ()), x)


def test_dy_shape_mismatch():
    spec = NormSpec.batch_norm()
    x = normal((3, 2, 4))
    _, stats = fastnorm.forward(x, spec)
    dy = np.ones((3, 2, 5))
    out = np.zeros_like(x)
    rejected(
        ValueError,
        r"dy.shape=\(3, 2, 5\) does not match x.shape=\(3, 2, 4\)",
        lambda: fastnorm.backward(dy, x, stats, spec, out=out),
        x,
        dy,
        out,
    )


def test_stats_mismatch():
    spec = NormSpec.group_norm(2)
    x = normal((3, 4, 5))
    out = np.zeros_like(x)
    bad = Stats(np.zeros((3, 4)), np.ones((3, 4)))
    rejected(
        ValueError,
        r"stats.mean.shape=\(3, 4\) does not match \(3, 2\)",
        lambda: fastnorm.backward(x, x, bad, spec, out=out),
        x,
        out,
    )
    rejected(
        ValueError, "stats.mean.shape", lambda: fastnorm.forward_inference(x, bad, spec, out=out), x, out
    )
    rejected(
        TypeError,
        "stats must be a fastnorm.Stats",
        lambda: fastnorm.forward_inference(x, (np.zeros((3, 2)), np.ones((3, 2))), spec),
        x,
    )
    rejected(
        TypeError,
        "stats.rstd.dtype",
        lambda: fastnorm.forward_inference(x, Stats(np.zeros((3, 2)), np.ones((3, 2), int)), spec),
        x,
    )


def test_spec_not_a_normspec():
    x = normal((3, 4))
    rejected(TypeError, "spec must be a fastnorm.NormSpec", lambda: fastnorm.forward(x, "layer_norm"), x)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(kind="foo"), ValueError, "kind='foo' is not one of"),
        (dict(kind="batch_norm", num_groups=2), ValueError, "num_groups is only meaningful"),
        (dict(kind="layer_norm"), TypeError, "normalized_ndim must be an integer"),
        (dict(kind="layer_norm", normalized_ndim=0), ValueError, "normalized_ndim=0 must be >= 1"),
        (
            dict(kind="rms_norm", normalized_ndim=1, channels_last=True),
            ValueError,
            "channels_last does not apply",
        ),
        (dict(kind="group_norm", num_groups=2, normalized_ndim=1), ValueError, "normalized_ndim is only"),
        (dict(kind="batch_norm", channels_last=1), TypeError, "channels_last must be a bool"),
        (dict(kind="batch_norm", eps=None), TypeError, "eps must be a real number"),
    ],
)
def test_invalid_spec(kwargs, exc, match):
    rejected(exc, match, lambda: NormSpec(**kwargs))


# ---------------------------------------------------------------------------
# eps, momentum, running statistics, counter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eps", "exc"),
    [
        (-1e-5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-0.0 - 1e-300, ValueError),
        ("1e-5", TypeError),
        (True, TypeError),
        (1j, TypeError),
    ],
    ids=["negative", "nan", "inf", "tiny-negative", "str", "bool", "complex"],
)
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"])
def test_bad_eps(fn, eps, exc):
    x = normal((2, 4, 3))
    out = np.zeros_like(x)
    rm, rv = np.zeros(4), np.ones(4)
    counter = np.zeros((), np.int64)
    calls = {
        "batch_norm": lambda: fastnorm.batch_norm(
            x, rm, rv, training=True, eps=eps, num_batches_tracked=counter, out=out
        ),
        "instance_norm": lambda: fastnorm.instance_norm(x, rm, rv, eps=eps, out=out),
        "group_norm": lambda: fastnorm.group_norm(x, 2, eps=eps, out=out),
        "layer_norm": lambda: fastnorm.layer_norm(x, 3, eps=eps, out=out),
        "rms_norm": lambda: fastnorm.rms_norm(x, 3, eps=eps, out=out),
    }
    rejected(exc, "eps", calls[fn], x, out, rm, rv, counter, names=r"\beps\b")


@pytest.mark.parametrize("training", [True, False])
def test_bad_eps_batch_norm_inference_too(training):
    x = normal((2, 4, 3))
    rm, rv = np.zeros(4), np.ones(4)
    rejected(
        ValueError, "eps", lambda: fastnorm.batch_norm(x, rm, rv, training=training, eps=-1.0), x, rm, rv
    )


@pytest.mark.parametrize(
    ("momentum", "exc"),
    [
        (-0.1, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        ("0.1", TypeError),
        (False, TypeError),
    ],
    ids=["negative", "above-1", "nan", "str", "bool"],
)
@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
def test_bad_momentum(fn, momentum, exc):
    x = normal((3, 4, 5))
    rm, rv = np.zeros(4), np.ones(4)
    counter = np.zeros((), np.int64)
    out = np.zeros_like(x)
    if fn == "batch_norm":
        call = lambda: fastnorm.batch_norm(  # noqa: E731
            x, rm, rv, training=True, momentum=momentum, num_batches_tracked=counter, out=out
        )
    else:
        call = lambda: fastnorm.instance_norm(x, rm, rv, momentum=momentum, out=out)  # noqa: E731
    rejected(exc, "momentum", call, x, rm, rv, counter, out, names=r"\bmomentum\b")


def test_instance_norm_momentum_none_rejected():
    x = normal((3, 4, 5))
    rm, rv = np.zeros(4), np.ones(4)
    rejected(TypeError, "momentum", lambda: fastnorm.instance_norm(x, rm, rv, momentum=None), x, rm, rv)


@pytest.mark.parametrize(
    ("rm_shape", "rv_shape", "match"),
    [
        ((3,), (4,), "running_mean.shape=.3,. does not match the C=4"),
        ((4,), (4, 1), "running_var.shape=.4, 1. does not match"),
        ((1,), (1,), "running_mean.shape"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_running_stats_shape_mismatch(rm_shape, rv_shape, match, training):
    x = normal((3, 4, 5))
    rm, rv = np.zeros(rm_shape), np.ones(rv_shape)
    counter = np.zeros((), np.int64)
    out = np.zeros_like(x)
    rejected(
        ValueError,
        match,
        lambda: fastnorm.batch_norm(x, rm, rv, training=training, num_batches_tracked=counter, out=out),
        x,
        rm,
        rv,
        counter,
        out,
    )
    rejected(
        ValueError,
        match,
        lambda: fastnorm.instance_norm(x, rm, rv, use_input_stats=training, out=out),
        x,
        rm,
        rv,
        out,
    )


def test_running_stats_problems():
    x = normal((3, 4, 5))
    rm, rv = np.zeros(4), np.ones(4)
    counter = np.zeros((), np.int64)
    rejected(
        TypeError,
        "running_mean must be a numpy.ndarray",
        lambda: fastnorm.batch_norm(x, [0.0] * 4, rv, training=True),
        x,
        rv,
    )
    rejected(
        ValueError,
        "pass both running_mean and running_var",
        lambda: fastnorm.batch_norm(x, rm, None, training=True, num_batches_tracked=counter),
        x,
        rm,
        counter,
    )
    rejected(ValueError, "needs running_mean and running_var", lambda: fastnorm.batch_norm(x, None, None), x)
    ro = np.ones(4)
    ro.flags.writeable = False
    rejected(
        ValueError,
        "running_var is read-only",
        lambda: fastnorm.batch_norm(x, rm, ro, training=True, num_batches_tracked=counter),
        x,
        rm,
        ro,
        counter,
    )
    rejected(ValueError, "running_var is read-only", lambda: fastnorm.instance_norm(x, rm, ro), x, rm, ro)


@pytest.mark.parametrize(
    ("counter", "exc", "match"),
    [
        (np.zeros((), np.float64), TypeError, "num_batches_tracked must be a numpy integer array"),
        (np.zeros(2, np.int64), TypeError, "num_batches_tracked"),
        (0, TypeError, "num_batches_tracked"),
    ],
)
def test_bad_counter(counter, exc, match):
    x = normal((3, 4, 5))
    rm, rv = np.zeros(4), np.ones(4)
    rejected(
        exc,
        match,
        lambda: fastnorm.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=counter),
        x,
        rm,
        rv,
    )


def test_read_only_counter():
    x = normal((3, 4, 5))
    rm, rv = np.zeros(4), np.ones(4)
    counter = np.zeros((), np.int64)
    counter.flags.writeable = False
    rejected(
        ValueError,
        "num_batches_tracked is read-only",
        lambda: fastnorm.batch_norm(x, rm, rv, training=True, num_batches_tracked=counter),
        x,
        rm,
        rv,
    )


# ---------------------------------------------------------------------------
# out=
# ---------------------------------------------------------------------------


def _out_calls(x, out):
    spec = NormSpec.group_norm(2)
    _, stats = fastnorm.forward(x, spec)
    return {
        "forward": lambda: fastnorm.forward(x, spec, out=out),
        "inference": lambda: fastnorm.forward_inference(x, stats, spec, out=out),
        "backward": lambda: fastnorm.backward(x, x, stats, spec, out=out),
        "functional": lambda: fastnorm.group_norm(x, 2, out=out),
    }


CALL_NAMES = ["forward", "inference", "backward", "functional"]


@pytest.mark.parametrize("call", CALL_NAMES)
def test_out_wrong_shape_or_dtype(call):
    x = normal((2, 4, 3))
    for out, match in [
        (np.zeros((2, 4, 4)), r"out has shape \(2, 4, 4\)"),
        (np.zeros((2, 4, 3), np.float32), "dtype float32"),
        (np.zeros((4, 2, 3)), "out has shape"),
    ]:
        rejected(ValueError, match, _out_calls(x, out)[call], x, out)
    out = [[0.0] * 3] * 8
    rejected(TypeError, "out must be a numpy.ndarray", _out_calls(x, out)[call], x)


@pytest.mark.parametrize("call", CALL_NAMES)
def test_out_read_only(call):
    x = normal((2, 4, 3))
    out = np.zeros_like(x)
    out.flags.writeable = False
    rejected(ValueError, "out is read-only", _out_calls(x, out)[call], x, out, names=r"\bout\b")


@pytest.mark.parametrize("call", CALL_NAMES)
def test_out_not_contiguous(call):
    x = normal((2, 4, 3))
    big = np.zeros((2, 4, 6))
    out = big[:, :, ::2]
    rejected(ValueError, "C-contiguous", _out_calls(x, out)[call], x, big, names=r"\bout\b")


@pytest.mark.parametrize("call", CALL_NAMES)
def test_out_partly_overlapping_input(call):
    buf = np.random.default_rng(1).standard_normal(40)
    x = buf[:24].reshape(2, 4, 3)
    out = buf[6:30].reshape(2, 4, 3)
    rejected(ValueError, "partly overlaps an input", _out_calls(x, out)[call], buf, names=r"\bout\b")


def test_backward_out_partly_overlapping_dy():
    buf = np.random.default_rng(1).standard_normal(40)
    x = np.random.default_rng(2).standard_normal((2, 4, 3))
    dy = buf[:24].reshape(2, 4, 3)
    out = buf[12:36].reshape(2, 4, 3)
    spec = NormSpec.instance_norm()
    _, stats = fastnorm.forward(x, spec)
    rejected(
        ValueError,
        "partly overlaps",
        lambda: fastnorm.backward(dy, x, stats, spec, out=out),
        buf,
        x,
        names=r"\bout\b",
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_overlap_status_classifies_every_argument(dtype):
    """The compiled overlap check behind every ``out=``: each slot, each boundary, read-only views."""
    from fastnorm._buffers import _overlap_status

    buf = np.zeros(64, dtype)
    none = np.empty(0, dtype)
    no_stats = np.empty(0)
    out = buf[16:32]

    def status(first=None, second=None, weight=none, bias=none, mean=no_stats, rstd=no_stats, target=out):
        first = buf[40:56] if first is None else first
        second = first if second is None else second
        return _overlap_status(target, first, second, weight, bias, mean, rstd)

    assert status() == 0
    assert status(first=out) == 3  # in place
    assert status(second=out) == 3
    assert status(first=buf[32:48], second=buf[0:16]) == 0  # touching both ends, no shared byte
    assert status(first=buf[31:47]) == 2  # one shared element
    assert status(second=buf[15:31]) == 2
    assert status(first=buf[16:31]) == 2  # same start, shorter
    assert status(first=buf[16:32][::-1].copy()) == 0  # a copy is separate memory
    for slot in ("weight", "bias"):
        assert status(**{slot: buf[31:33]}) == 1
        assert status(**{slot: buf[32:34]}) == 0
    stats_buf = np.zeros(8)
    view = stats_buf.view(dtype)
    for slot in ("mean", "rstd"):
        assert status(target=view, **{slot: stats_buf[3:4]}) == 1
        assert status(**{slot: stats_buf}) == 0
    assert status(target=buf[16:16]) == 0  # an empty out overlaps nothing
    read_only = buf[40:56]
    read_only.flags.writeable = False
    assert status(first=read_only, weight=read_only[:0]) == 0
    assert status(target=read_only, first=read_only) == 3


def test_out_misaligned():
    x = normal((2, 4, 3))
    raw = np.zeros(x.nbytes + 1, np.uint8)
    out = raw[1:].view(np.float64).reshape(x.shape)
    assert not out.flags.aligned
    rejected(ValueError, "aligned", lambda: fastnorm.group_norm(x, 2, out=out), x, raw, names=r"\bout\b")


# ---------------------------------------------------------------------------
# zero-size tensors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "shape", "param_shape"),
    [
        ("group_norm", (0, 4, 3), (4,)),
        ("instance_norm", (0, 4, 3, 2), (4,)),
        ("layer_norm", (0, 5), (5,)),
        ("layer_norm", (2, 0, 5), (5,)),
        ("rms_norm", (0, 3, 5), (3, 5)),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_size_no_groups_gives_empty_outputs(case, shape, param_shape, dtype):
    spec = {
        "group_norm": NormSpec.group_norm(2),
        "instance_norm": NormSpec.instance_norm(),
        "layer_norm": NormSpec.layer_norm(len(param_shape)),
        "rms_norm": NormSpec.rms_norm(len(param_shape)),
    }[case]
    x = np.zeros(shape, dtype)
    w, b = np.ones(param_shape, dtype), np.zeros(param_shape, dtype)
    y, stats = fastnorm.forward(x, spec, w, b)
    assert y.shape == shape and y.dtype == dtype and stats.mean.size == 0 and stats.rstd.size == 0
    assert fastnorm.forward_inference(x, stats, spec, w, b).shape == shape
    dx, dw, db = fastnorm.backward(x, x, stats, spec, w)
    assert dx.shape == shape
    np.testing.assert_array_equal(dw, np.zeros(param_shape, dtype))
    np.testing.assert_array_equal(db, np.zeros(param_shape, dtype))


def test_zero_size_functional_empty_batch():
    x = np.zeros((0, 4, 3))
    rm, rv = np.zeros(4), np.ones(4)
    assert fastnorm.group_norm(x, 2).shape == (0, 4, 3)
    assert fastnorm.instance_norm(x, rm, rv).shape == (0, 4, 3)
    np.testing.assert_array_equal(rm, 0.0)  # no instances: running stats unchanged
    np.testing.assert_array_equal(rv, 1.0)
    assert fastnorm.batch_norm(x, rm, rv, training=False).shape == (0, 4, 3)


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (NormSpec.batch_norm(), (0, 3, 4)),  # BatchNorm with N = 0: each channel has 0 values
        (NormSpec.batch_norm(), (2, 3, 0)),
        (NormSpec.group_norm(2), (2, 4, 0)),
        (NormSpec.instance_norm(), (2, 4, 0, 3)),
        (NormSpec.group_norm(2, channels_last=True), (2, 0, 4)),
        (NormSpec.layer_norm(1), (3, 0)),
        (NormSpec.rms_norm(2), (3, 2, 0)),
    ],
    ids=str,
)
def test_zero_size_groups_of_zero_elements_raise_in_training(spec, shape):
    x = np.zeros(shape)
    out = np.zeros(shape)
    rejected(
        ValueError,
        "0 elements|no elements|Expected more than 1",
        lambda: fastnorm.forward(x, spec, out=out),
        x,
        out,
    )


@pytest.mark.parametrize(
    ("spec", "shape", "stats_shape"),
    [
        (NormSpec.batch_norm(), (0, 3, 4), (3,)),
        (NormSpec.group_norm(2), (2, 4, 0), (2, 2)),
        (NormSpec.layer_norm(1), (3, 0), (3,)),
    ],
    ids=str,
)
def test_zero_size_groups_of_zero_elements_inference_is_empty(spec, shape, stats_shape):
    x = np.zeros(shape)
    y = fastnorm.forward_inference(x, Stats(np.zeros(stats_shape), np.ones(stats_shape)), spec)
    assert y.shape == shape


def test_zero_channels_raise():
    x = np.zeros((2, 0, 3))
    rejected(
        ValueError,
        "has no channels",
        lambda: fastnorm.forward(x, NormSpec.batch_norm()),
        x,
        names=r"\bx\.shape",
    )


def test_batch_norm_functional_empty_batch_training_raises_and_changes_nothing():
    x = np.zeros((0, 3, 4))
    rm, rv = np.zeros(3), np.ones(3)
    counter = np.zeros((), np.int64)
    rejected(
        ValueError,
        "0 elements",
        lambda: fastnorm.batch_norm(x, rm, rv, training=True, num_batches_tracked=counter),
        rm,
        rv,
        counter,
    )


# ---------------------------------------------------------------------------
# unusual but valid inputs: views, read-only, misaligned, big-endian
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    ["big-endian", "float32", "strided view", "fortran order", "list"],
)
@pytest.mark.parametrize("spec", [NormSpec.batch_norm(), NormSpec.instance_norm()], ids=["bn", "in"])
def test_stats_in_any_float_form_give_the_same_result(form, spec):
    """Statistics that are not native C-contiguous float64 arrays are converted, never misread."""
    x, dy = normal((3, 4, 5)), normal((3, 4, 5), seed=1)
    _, stats = fastnorm.forward(x, spec)
    mean, rstd = stats.mean, stats.rstd.astype(np.float32).astype(np.float64)  # float32-exact rstd

    def convert(a):
        if form == "big-endian":
            return a.astype(a.dtype.newbyteorder(">"))
        if form == "float32":
            return a.astype(np.float32)
        if form == "strided view":
            return np.repeat(a, 2, axis=-1)[..., ::2]
        if form == "fortran order":
            return np.asfortranarray(a)
        return a.tolist()

    odd = Stats(convert(mean), convert(rstd))
    if form == "float32":
        mean = mean.astype(np.float32).astype(np.float64)
    native = Stats(mean, rstd)
    np.testing.assert_array_equal(
        fastnorm.forward_inference(x, odd, spec), fastnorm.forward_inference(x, native, spec)
    )
    got, want = fastnorm.backward(dy, x, odd, spec), fastnorm.backward(dy, x, native, spec)
    for got_array, want_array in zip(got, want, strict=True):
        np.testing.assert_array_equal(got_array, want_array)


def _check_all_passes(x, dy, w, b, spec, kind, **ref):
    """Forward, inference and backward on (possibly odd) arrays vs the reference on clean copies."""
    xc = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    x_before = np.array(x, copy=True)
    y, stats = fastnorm.forward(x, spec, w, b)
    ry, rmean, rrstd = naive.forward(xc, kind, w, b, eps=spec.eps, **ref)
    naive.assert_close(y, ry, dtype=xc.dtype)
    naive.assert_close(fastnorm.forward_inference(x, stats, spec, w, b), ry, dtype=xc.dtype)
    dx, dw, db = fastnorm.backward(dy, x, stats, spec, w)
    rdx, rdw, rdb, scale = naive.backward(dy, xc, kind, w, eps=spec.eps, return_scale=True, **ref)
    naive.assert_close(dx, rdx, dtype=xc.dtype, scale=scale)
    if w is not None:
        naive.assert_close(dw, rdw, dtype=xc.dtype, scale=float(np.abs(dy).sum()))
    if b is not None:
        naive.assert_close(db, rdb, dtype=xc.dtype, scale=float(np.abs(dy).sum()))
    np.testing.assert_array_equal(x, x_before)
    return y, dx


VIEWS = {
    "step": lambda a: a[:, :, ::2],
    "negative-stride": lambda a: a[:, ::-1, ::-1],
    "batch-step": lambda a: a[::2],
    "transposed-spatial": lambda a: a.swapaxes(2, 3),
    "fortran": lambda a: np.asfortranarray(a),
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_and_negative_strides(view, dtype):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 6, 8, 5)).astype(dtype)
    dbase = rng.standard_normal((4, 6, 8, 5)).astype(dtype)
    x, dy = VIEWS[view](base), VIEWS[view](dbase)
    assert not x.flags.c_contiguous
    w = rng.uniform(0.5, 1.5, x.shape[1]).astype(dtype)
    b = rng.standard_normal(x.shape[1]).astype(dtype)
    for spec, kind, ref in [
        (NormSpec.group_norm(3), "group_norm", dict(num_groups=3)),
        (NormSpec.batch_norm(), "batch_norm", {}),
        (NormSpec.instance_norm(), "instance_norm", {}),
    ]:
        _check_all_passes(x, dy, w, b, spec, kind, **ref)
    lw = rng.uniform(0.5, 1.5, x.shape[-1]).astype(dtype)
    lb = rng.standard_normal(x.shape[-1]).astype(dtype)
    _check_all_passes(x, dy, lw, lb, NormSpec.layer_norm(1), "layer_norm", normalized_ndim=1)
    _check_all_passes(x, dy, lw, None, NormSpec.rms_norm(1, eps=1e-6), "rms_norm", normalized_ndim=1)


def test_non_contiguous_param_views():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 5))
    w = rng.standard_normal(8)[::2]
    b = rng.standard_normal(8)[::-2]
    _check_all_passes(x, x.copy(), w, b, NormSpec.batch_norm(), "batch_norm")


def test_read_only_inputs():
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    for a in (x, dy, w, b):
        a.flags.writeable = False
    _check_all_passes(x, dy, w, b, NormSpec.group_norm(2), "group_norm", num_groups=2)
    y = fastnorm.layer_norm(x, 5)
    assert y.flags.writeable
    rejected(ValueError, "read-only", lambda: fastnorm.layer_norm(x, 5, out=x), x, names=r"\bout\b")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_buffers(dtype):
    rng = np.random.default_rng(6)
    x = misaligned(rng.standard_normal((3, 4, 5)).astype(dtype))
    dy = misaligned(rng.standard_normal((3, 4, 5)).astype(dtype))
    w = misaligned(rng.uniform(0.5, 1.5, 4).astype(dtype))
    b = misaligned(rng.standard_normal(4).astype(dtype))
    _check_all_passes(x, dy, w, b, NormSpec.group_norm(2), "group_norm", num_groups=2)
    _check_all_passes(x, dy, w, b, NormSpec.batch_norm(), "batch_norm")


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian(dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4, 5)).astype(dtype)
    dy = rng.standard_normal((3, 4, 5)).astype(dtype)
    w = rng.uniform(0.5, 1.5, 4).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    assert not x.dtype.isnative
    y, _ = _check_all_passes(x, dy, w, b, NormSpec.group_norm(2), "group_norm", num_groups=2)
    assert y.dtype == np.dtype(dtype).newbyteorder("=")
    lw = rng.uniform(0.5, 1.5, 5).astype(dtype)
    _check_all_passes(x, dy, lw, None, NormSpec.layer_norm(1), "layer_norm", normalized_ndim=1)
    # functional, with big-endian running statistics updated in place
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
    fastnorm.batch_norm(x, rm, rv, training=True, momentum=1.0)
    xn = x.astype(np.float64)
    np.testing.assert_allclose(rm, xn.mean(axis=(0, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, xn.var(axis=(0, 2), ddof=1), rtol=1e-6, atol=1e-6)
    yb = fastnorm.batch_norm(x, rm, rv, training=False)
    naive.assert_close(
        yb,
        (xn - rm.reshape(1, 4, 1)) / np.sqrt(rv.reshape(1, 4, 1).astype(float) + 1e-5),
        dtype=np.dtype(dtype).newbyteorder("="),
    )
