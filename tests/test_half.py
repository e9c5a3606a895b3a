"""bfloat16 and float16 storage: every norm, layout and pass against the float64 reference.

The data is rounded to the 16-bit format first, and the reference is computed
in float64 from those rounded values (and the parameters the call was given),
then rounded once to the storage format: the *exactly rounded* result.
fastnorm computes in float32 (block sums in float32, merged and kept in
float64: docs/guarantees.md) and rounds once, so each element must be that
value or one unit in the last place (ulp) of the format next to it.  The one
allowance: an element whose float32 arithmetic error, measured against the
size of the terms that cancel to give it (``scale``), exceeds half an ulp of
its own tiny value may differ by more, within ``32 * eps(float32) * scale``.
Every test counts the elements that are exact, one ulp off, and beyond
(``-s`` prints the table).
"""

from __future__ import annotations

import naive
import numba
import numpy as np
import pytest
from cases import arrange, bn, gn, inorm, ln, rms, rng_for, to_ref_layout

import fastnorm

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF_DTYPES = {"bfloat16": BF16, "float16": F16}

CASES = [
    bn(4, 8, 7, 9),
    bn(2, 3, 40, 41),
    inorm(2, 6, 9, 11),
    gn(4, 2, 12, 5, 5),
    gn(2, 3, 4, 33, 35),
    ln(1, 6, 40),
    ln(1, 2, 5000),
    ln(2, 3, 7, 11),
    rms(1, 5, 70, eps=1e-6),
    rms(1, 3, 4100, eps=None),
]

#: (exact, one ulp, beyond one ulp within the float32 bound) per (dtype, what), printed at the end.
COUNTS: dict = {}


def _ordered(bits):
    """16-bit float patterns as integers in the order of their values (+0 and -0 both 0)."""
    bits = bits.astype(np.int64)
    magnitude = bits & 0x7FFF
    return np.where(bits & 0x8000, -magnitude, magnitude)


def assert_rounded(actual, reference, dtype, scale, what):
    """``actual`` (16-bit) is the exactly rounded float64 ``reference``, or one ulp from it.

    NaN and inf must be where the reference has them.  An element more than
    one ulp away must be within the float32 computation's bound, ``32 *
    eps(float32) * scale``.
    """
    __tracebackhide__ = True
    actual = np.asarray(actual)
    assert actual.dtype == dtype, (what, actual.dtype, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = np.asarray(reference, np.float64).astype(dtype)
    a = actual.astype(np.float64)
    r = np.asarray(reference, np.float64)
    nan = np.isnan(r)
    assert np.array_equal(np.isnan(a), nan), f"{what}: NaN positions differ"
    finite = ~nan
    distance = np.abs(_ordered(actual.view(np.uint16)) - _ordered(rounded.view(np.uint16)))[finite]
    beyond = distance > 1
    if beyond.any():
        naive.assert_close(
            a[finite][beyond],
            r[finite][beyond],
            rtol=0.0,
            atol=32 * float(np.finfo(np.float32).eps) * scale + 1e-300,
            err_msg=f"{what}: {int(beyond.sum())} elements more than one ulp from the rounded reference",
        )
    tally = COUNTS.setdefault((dtype.name, what.split(" ")[0]), np.zeros(3, np.int64))
    tally += [int((distance == 0).sum()), int((distance == 1).sum()), int(beyond.sum())]


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\n16-bit storage: elements exactly rounded / one ulp / beyond (float32 bound)")
    for (dtype, what), (exact, one, more) in sorted(COUNTS.items()):
        total = exact + one + more
        print(f"  {dtype:9s} {what:9s} {exact:9d} {one:7d} {more:5d}   exact {exact / total:.4%}")


def _problem(case, dtype, param_dtype, layout):
    """16-bit ``(x, dy, weight, bias, residual)`` in the layout, and their float64 channels-first values."""
    rng = rng_for(case, dtype.name, param_dtype, layout)
    x64 = rng.standard_normal(case.shape) * 2.0 + 0.5
    dy64 = rng.standard_normal(case.shape)
    res64 = rng.standard_normal(case.shape)
    weight = rng.uniform(0.5, 1.5, case.param_shape).astype(param_dtype)
    bias = rng.standard_normal(case.param_shape).astype(param_dtype)
    x_cf, dy_cf, res_cf = (a.astype(dtype) for a in (x64, dy64, res64))
    x, channels_last = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    residual, _ = arrange(res_cf, layout, case)
    exact = {
        "x": x_cf.astype(np.float64),
        "dy": dy_cf.astype(np.float64),
        "residual": res_cf.astype(np.float64),
        "weight": weight.astype(np.float64),
        "bias": bias.astype(np.float64),
    }
    return x, dy, weight, bias, residual, channels_last, exact


def _layouts(case):
    return ("cf", "cl", "cl_memory") if case.per_channel else ("cf",)


PARAMS = [
    pytest.param(case, name, param, layout, id=f"{case}-{name}-{param}-{layout}")
    for case in CASES
    for name in HALF_DTYPES
    for param in ("float32", "same")
    for layout in _layouts(case)
]


def _param_dtype(param, dtype):
    return np.dtype(np.float32) if param == "float32" else dtype


@pytest.mark.parametrize("case, name, param, layout", PARAMS)
def test_forward_inference_backward(case, name, param, layout):
    dtype = HALF_DTYPES[name]
    pdtype = _param_dtype(param, dtype)
    x, dy, weight, bias, residual, channels_last, exact = _problem(case, dtype, pdtype, layout)
    spec = case.spec(channels_last)
    kw = case.ref_kwargs(False)
    if case.eps is None:
        kw["eps"] = float(np.finfo(np.float32).eps)  # the default: the compute dtype's, as torch
    label = f"{case} {name} params={param} {layout}"

    y, stats = fastnorm.forward(x, spec, weight, bias)
    y_ref, mean_ref, rstd_ref = naive.forward(exact["x"], case.kind, exact["weight"], exact["bias"], **kw)
    assert_rounded(to_ref_layout(y, layout, case), y_ref, dtype, np.abs(y_ref).max(), f"y {label}")
    # A block's sums run in float32 (docs/guarantees.md): the mean to a few float32
    # ulps of the data's scale; the variance loses up to log2(16) bits more to the
    # cancellation a one-pass block accepts (numerics.CANCELLATION_LIMIT_FLOAT32).
    naive.assert_close(stats.mean, mean_ref, dtype=np.float32, k=8, scale=np.abs(exact["x"]).max())
    naive.assert_close(stats.rstd, rstd_ref, dtype=np.float32, k=32)

    # the residual is added in the store loop: one rounding of the float32 sum
    y_res, _ = fastnorm.forward(x, spec, weight, bias, residual=residual)
    desired = y_ref + exact["residual"]
    assert_rounded(to_ref_layout(y_res, layout, case), desired, dtype, np.abs(desired).max(), f"y+r {label}")

    y_inf = fastnorm.forward_inference(x, stats, spec, weight, bias)
    assert np.array_equal(y_inf.view(np.uint16), y.view(np.uint16)) or _within_one_ulp(y_inf, y)

    dx, dweight, dbias = fastnorm.backward(dy, x, stats, spec, weight)
    dx_ref, dw_ref, db_ref, scale = naive.backward(
        exact["dy"], exact["x"], case.kind, exact["weight"], **kw, return_scale=True
    )
    assert_rounded(to_ref_layout(dx, layout, case), dx_ref, dtype, scale, f"dx {label}")
    assert dweight.dtype == pdtype and dbias.dtype == pdtype
    if pdtype == dtype:
        assert_rounded(dweight, dw_ref, dtype, np.abs(dw_ref).max(), f"dweight {label}")
        assert_rounded(dbias, db_ref, dtype, np.abs(db_ref).max(), f"dbias {label}")
    else:  # float32 parameter gradients, from float64 sums
        naive.assert_close(
            dweight, dw_ref, k=8, scale=np.abs(dw_ref).max() + np.abs(exact["dy"]).sum() * 1e-3
        )
        naive.assert_close(dbias, db_ref, k=8, scale=np.abs(db_ref).max() + np.abs(exact["dy"]).sum() * 1e-3)


def _within_one_ulp(a, b):
    return bool(np.all(np.abs(_ordered(a.view(np.uint16)) - _ordered(b.view(np.uint16))) <= 1))


@pytest.mark.parametrize("name", HALF_DTYPES)
@pytest.mark.parametrize("case", [bn(3, 5, 6, 7), gn(2, 2, 6, 35, 33), ln(1, 4, 3000)], ids=str)
def test_bitwise_same_for_any_thread_count(case, name):
    dtype = HALF_DTYPES[name]
    x, dy, weight, bias, _, channels_last, _ = _problem(case, dtype, np.dtype(np.float32), "cl")
    spec = case.spec(channels_last)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            y, stats = fastnorm.forward(x, spec, weight, bias)
            grads = fastnorm.backward(dy, x, stats, spec, weight)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        results.append(
            [y.tobytes(), stats.mean.tobytes(), stats.rstd.tobytes(), *(g.tobytes() for g in grads)]
        )
    assert results[0] == results[1]


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_offset_and_constant_groups(name):
    """A large mean costs no accuracy (float64 statistics), and a constant group maps to its bias."""
    dtype = HALF_DTYPES[name]
    case = gn(2, 2, 4, 8, 8)
    rng = rng_for("offset", name)
    x = (rng.standard_normal(case.shape) + 300.0).astype(dtype)
    x[1, 2:] = dtype.type(7.0)  # group (1, 1) constant
    bias = rng.standard_normal(4).astype(np.float32)
    y, stats = fastnorm.forward(x, case.spec(), None, bias)
    y_ref, mean_ref, _ = naive.forward(x.astype(np.float64), "group_norm", None, bias, 1e-5, num_groups=2)
    assert_rounded(y, y_ref, dtype, np.abs(y_ref).max(), f"offset {name}")
    assert np.array_equal(
        y[1, 2:].astype(np.float32),
        np.broadcast_to(bias[2:, None, None], (2, 8, 8)).astype(dtype).astype(np.float32),
    )
    assert stats.mean[1, 1] == 7.0


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_nan_and_inf_stay_in_their_group(name):
    dtype = HALF_DTYPES[name]
    x = rng_for("nan", name).standard_normal((3, 2, 50)).astype(dtype)
    x[0, 0, 3] = np.nan
    x[1, 1, 7] = np.inf
    y, _ = fastnorm.forward(x, fastnorm.NormSpec.instance_norm())
    y32 = y.astype(np.float32)
    assert np.isnan(y32[0, 0]).all() and np.isnan(y32[1, 1]).all()
    assert np.isfinite(y32[0, 1]).all() and np.isfinite(y32[1, 0]).all() and np.isfinite(y32[2]).all()


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_out_and_in_place(name):
    dtype = HALF_DTYPES[name]
    x = rng_for("out", name).standard_normal((4, 96)).astype(dtype)
    spec = fastnorm.NormSpec.layer_norm(1)
    y, _ = fastnorm.forward(x, spec)
    out = np.empty_like(x)
    fastnorm.forward(x, spec, out=out)
    assert np.array_equal(out.view(np.uint16), y.view(np.uint16))
    x_copy = x.copy()
    fastnorm.forward(x_copy, spec, out=x_copy)
    assert np.array_equal(x_copy.view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_activation_is_refused_not_rounded_twice(name):
    dtype = HALF_DTYPES[name]
    x = np.ones((2, 8), dtype)
    before = x.copy()
    with pytest.raises(ValueError, match="activation"):
        fastnorm.forward(x, fastnorm.NormSpec.layer_norm(1, activation="silu"))
    assert np.array_equal(x.view(np.uint16), before.view(np.uint16))


def test_mismatched_16bit_dtypes_are_refused():
    x = np.ones((2, 3, 4), BF16)
    with pytest.raises(TypeError, match="dy.dtype"):
        fastnorm.backward(
            np.ones((2, 3, 4), F16),
            x,
            fastnorm.forward(x, fastnorm.NormSpec.batch_norm())[1],
            fastnorm.NormSpec.batch_norm(),
        )
    with pytest.raises(TypeError, match="residual.dtype"):
        fastnorm.forward(x, fastnorm.NormSpec.batch_norm(), residual=np.ones((2, 3, 4), np.float32))


@pytest.mark.parametrize("name", HALF_DTYPES)
@pytest.mark.parametrize("what", ["weight", "bias", "skip_bias", "backward weight"])
def test_out_overlapping_a_converted_parameter_is_refused(name, what):
    """A 16-bit parameter is converted to a float32 copy; ``out`` over its memory is refused all the same."""
    dtype = HALF_DTYPES[name]
    x = rng_for("alias", name).standard_normal((3, 16)).astype(dtype)
    spec = fastnorm.NormSpec.layer_norm(1)
    buffer = np.ones((3, 16), dtype)
    param = buffer[0]  # a parameter of the data dtype living inside out
    before = buffer.copy()
    with pytest.raises(ValueError, match="overlaps weight, bias"):
        if what == "weight":
            fastnorm.forward(x, spec, param, out=buffer)
        elif what == "bias":
            fastnorm.forward(x, spec, None, param, out=buffer)
        elif what == "skip_bias":
            fastnorm.forward(x, spec, skip=x.copy(), skip_bias=param, out=buffer)
        else:
            _, stats = fastnorm.forward(x, spec)
            fastnorm.backward(x.copy(), x, stats, spec, param, out=buffer)
    assert np.array_equal(buffer.view(np.uint16), before.view(np.uint16))


def test_out_overlapping_a_copied_float32_parameter_is_refused():
    """The same rule for a float32 weight that is copied because it is not contiguous."""
    x = np.ones((8, 8), np.float32) + np.arange(8, dtype=np.float32)
    out = np.ones((8, 8), np.float32)
    weight = out[:, 0]  # every 8th element of out: strided, so the kernel gets a copy
    with pytest.raises(ValueError, match="overlaps weight, bias"):
        fastnorm.forward(x, fastnorm.NormSpec.layer_norm(1), weight, out=out)
    assert (out == 1).all()


def test_byte_swapped_float16_weight_gives_gradients_in_the_data_dtype():
    """(ml_dtypes.bfloat16 has one byte order.)"""
    dtype = F16
    x = rng_for("swap").standard_normal((4, 8)).astype(dtype)
    spec = fastnorm.NormSpec.layer_norm(1)
    weight = np.linspace(0.5, 1.5, 8).astype(dtype)
    _, stats = fastnorm.forward(x, spec, weight, weight)
    native = fastnorm.backward(x, x, stats, spec, weight)
    swapped = fastnorm.backward(x, x, stats, spec, weight.astype(dtype.newbyteorder()))
    for a, b in zip(native, swapped, strict=True):
        assert b.dtype == dtype
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_16bit_statistics_are_accepted(name):
    """``Stats`` of 16-bit floats (e.g. running statistics kept in bfloat16) are read as float64."""
    dtype = HALF_DTYPES[name]
    x = rng_for("stats", name).standard_normal((4, 3, 5)).astype(dtype)
    spec = fastnorm.NormSpec.batch_norm()
    mean = np.array([0.25, -0.5, 1.0], dtype)
    rstd = np.array([2.0, 0.5, 1.0], dtype)
    y16 = fastnorm.forward_inference(x, fastnorm.Stats(mean, rstd), spec)
    stats64 = fastnorm.Stats(mean.astype(np.float64), rstd.astype(np.float64))
    y64 = fastnorm.forward_inference(x, stats64, spec)
    assert np.array_equal(y16.view(np.uint16), y64.view(np.uint16))


# ---------------------------------------------------------------------------
# uint16 arrays read as bfloat16 bits (dtype="bfloat16"), for callers without ml_dtypes
# ---------------------------------------------------------------------------

BITS_CASES = [bn(2, 3, 5, 7), gn(2, 4, 2, 3, 5), ln(1, 3, 40), rms(1, 4, 24)]


def _bits(array):
    return None if array is None else np.asarray(array).view(np.uint16)


def _same_bits(a, b, what):
    assert a is not None and b is not None and a.dtype == np.uint16, what
    assert np.array_equal(np.asarray(a), _bits(b)), what


@pytest.mark.parametrize(
    "case, param, layout",
    [
        pytest.param(case, param, layout, id=f"{case}-{param}-{layout}")
        for case in BITS_CASES
        for param in ("float32", "bits")
        for layout in (("cf", "cl") if case.per_channel else ("cf",))
    ],
)
def test_uint16_bits_give_the_bfloat16_results(case, param, layout):
    """Every pass on uint16 bits with ``dtype="bfloat16"`` equals the ml_dtypes bfloat16 call bitwise."""
    x, dy, weight, bias, residual, channels_last, _ = _problem(case, BF16, _param_dtype(param, BF16), layout)
    spec = case.spec(channels_last=channels_last)
    w_bits = _bits(weight) if param == "bits" else weight
    b_bits = _bits(bias) if param == "bits" else bias
    y, stats = fastnorm.forward(x, spec, weight, bias, residual=residual)
    bits = {"dtype": "bfloat16"}
    y_u, stats_u = fastnorm.forward(_bits(x), spec, w_bits, b_bits, residual=_bits(residual), **bits)
    _same_bits(y_u, y, "y")
    assert np.array_equal(stats_u.mean, stats.mean) and np.array_equal(stats_u.rstd, stats.rstd)
    y_inf = fastnorm.forward_inference(x, stats, spec, weight, bias)
    _same_bits(fastnorm.forward_inference(_bits(x), stats, spec, w_bits, b_bits, **bits), y_inf, "yinf")
    grads = fastnorm.backward(dy, x, stats, spec, weight)
    grads_u = fastnorm.backward(_bits(dy), _bits(x), stats, spec, w_bits, dtype="bfloat16")
    _same_bits(grads_u.dx, grads.dx, "dx")
    if param == "bits":
        _same_bits(grads_u.dweight, grads.dweight, "dweight")
        _same_bits(grads_u.dbias, grads.dbias, "dbias")
    else:
        assert np.array_equal(grads_u.dweight, grads.dweight) and grads_u.dweight.dtype == np.float32
    out = np.empty_like(_bits(x))
    assert fastnorm.forward(_bits(x), spec, w_bits, b_bits, out=out, dtype="bfloat16")[0] is out
    _same_bits(out, fastnorm.forward(x, spec, weight, bias)[0], "out")


@pytest.mark.parametrize(
    "name", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "skip"]
)
def test_functional_api_takes_uint16_bits(name):
    rng = rng_for("bits functional", name)
    x = rng.standard_normal((4, 6, 5)).astype(BF16)
    w = rng.uniform(0.5, 1.5, 5 if name in ("layer_norm", "rms_norm", "skip") else 6).astype(BF16)
    u = _bits(x)
    if name == "batch_norm":
        rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
        rm_u, rv_u = rm.copy(), rv.copy()
        y = fastnorm.batch_norm(x, rm, rv, w, training=True)
        y_u = fastnorm.batch_norm(u, rm_u, rv_u, _bits(w), training=True, dtype="bfloat16")
        assert np.array_equal(rm, rm_u) and np.array_equal(rv, rv_u)
        y_inf = fastnorm.batch_norm(x, rm, rv, w)
        _same_bits(fastnorm.batch_norm(u, rm, rv, _bits(w), dtype="bfloat16"), y_inf, "inference")
    elif name == "instance_norm":
        y = fastnorm.instance_norm(x, weight=w)
        y_u = fastnorm.instance_norm(u, weight=_bits(w), dtype="bfloat16")
    elif name == "group_norm":
        y, y_u = fastnorm.group_norm(x, 3, w), fastnorm.group_norm(u, 3, _bits(w), dtype="bfloat16")
    elif name == "layer_norm":
        y, y_u = fastnorm.layer_norm(x, 5, w), fastnorm.layer_norm(u, 5, _bits(w), dtype="bfloat16")
    elif name == "rms_norm":
        y, y_u = fastnorm.rms_norm(x, 5, w), fastnorm.rms_norm(u, 5, _bits(w), dtype="bfloat16")
    else:
        skip = rng.standard_normal(x.shape).astype(BF16)
        (y, h), (y_u, h_u) = (
            fastnorm.skip_layer_norm(x, skip, 5, w),
            fastnorm.skip_layer_norm(u, _bits(skip), 5, _bits(w), dtype="bfloat16"),
        )
        _same_bits(h_u, h, "h")
        spec = fastnorm.NormSpec.layer_norm(1)
        _, stats = fastnorm.forward(x, spec, w, skip=skip)
        _, stats_u = fastnorm.forward(u, spec, _bits(w), skip=_bits(skip), dtype="bfloat16")
        grads = fastnorm.backward(x, x, stats, spec, w)
        grads_u = fastnorm.backward(u, u, stats_u, spec, _bits(w), dtype="bfloat16")
        _same_bits(grads_u.dskip, grads.dskip, "dskip")
    _same_bits(y_u, y, name)


def test_uint16_without_dtype_is_refused_even_after_a_bits_call():
    """A plan made for bfloat16 bits must not let a plain uint16 array through the plan cache."""
    u = np.arange(24, dtype=np.uint16).reshape(4, 6) + np.uint16(0x3F80)
    spec = fastnorm.NormSpec.layer_norm(1)
    fastnorm.forward(u, spec, dtype="bfloat16")
    fastnorm.layer_norm(u, 6, dtype="bfloat16")
    with pytest.raises(TypeError, match="dtype='bfloat16'"):
        fastnorm.forward(u, spec)
    with pytest.raises(TypeError, match="dtype='bfloat16'"):
        fastnorm.layer_norm(u, 6)
    with pytest.raises(TypeError, match="dtype='bfloat16'"):
        fastnorm.forward_inference(u, fastnorm.Stats(np.zeros(4), np.ones(4)), spec)


def test_bad_bits_arguments_are_refused():
    u = np.full((4, 6), 0x3F80, np.uint16)
    before = u.copy()
    spec = fastnorm.NormSpec.layer_norm(1)
    with pytest.raises(ValueError, match="dtype='float16' is not supported"):
        fastnorm.forward(u, spec, dtype="float16")
    with pytest.raises(TypeError, match=r"x.dtype=float32 is not supported with dtype='bfloat16'"):
        fastnorm.forward(u.astype(np.float32), spec, dtype="bfloat16")
    with pytest.raises(TypeError, match=r"x.dtype=int16 is not supported with dtype='bfloat16'"):
        fastnorm.layer_norm(u.view(np.int16), 6, dtype="bfloat16")
    with pytest.raises(TypeError, match="residual.dtype"):
        fastnorm.forward(u, spec, residual=u.view(BF16), dtype="bfloat16")
    _, stats = fastnorm.forward(u, spec, dtype="bfloat16")
    with pytest.raises(TypeError, match=r"dy.dtype=float32 is not supported with dtype='bfloat16'"):
        fastnorm.backward(u.astype(np.float32), u, stats, spec, dtype="bfloat16")
    assert np.array_equal(u, before)


def test_ml_dtypes_bfloat16_with_dtype_bfloat16_is_the_same_call():
    x = rng_for("bits same").standard_normal((3, 8)).astype(BF16)
    spec = fastnorm.NormSpec.rms_norm(1)
    y = fastnorm.forward(x, spec)[0]
    y2 = fastnorm.forward(x, spec, dtype="bfloat16")[0]
    assert y2.dtype == BF16 and np.array_equal(_bits(y2), _bits(y))
