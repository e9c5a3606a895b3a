"""The 16-bit storage conversions of ``fastnorm/_kernels/storage.py``, on every bit pattern.

The kernels load bfloat16 and float16 data through ``load`` (16 bits to
float32) and store it through ``store`` (float32 to 16 bits, round to
nearest even).  Both directions are compared with ml_dtypes (bfloat16) and
NumPy (float16) over all 65,536 16-bit patterns (subnormals, infinities,
every NaN payload), and float32 to 16 bits over every rounding tie and its
neighbours, the overflow thresholds, and 2**22 random float32 patterns.

NaN: both formats follow IEEE 754 (and the F16C instructions): a NaN keeps
its sign and the top of its payload and comes out quiet.  ml_dtypes stores
every bfloat16 NaN as ``0x7FC0`` with its sign, and NumPy keeps a
*signaling* float16 NaN signaling: the documented differences, checked here.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from fastnorm._config import JIT_OPTIONS
from fastnorm._kernels import storage
from fastnorm._kernels.numerics import _moments, _shifted_moments
from fastnorm._kernels.storage import load, store

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
ALL_BITS = np.arange(1 << 16, dtype=np.uint16)


@pytest.fixture(autouse=True)
def _quiet_casts():
    """NumPy warns when it casts a NaN or an out-of-range value to a 16-bit float: expected here."""
    with np.errstate(invalid="ignore", over="ignore"):
        yield


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _convert(src, dst):
    for i in range(src.size):
        store(dst, i, load(src, i))


def _convert_py(src, dst):
    """The pure-Python ``load`` / ``store`` (what ``NUMBA_DISABLE_JIT=1`` runs)."""
    for i in range(src.size):
        store(dst, i, load(src, i))


def _f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def _to_16(values, view, convert=_convert):
    out = np.empty(values.size, view)
    convert(np.ascontiguousarray(values, np.float32), out)
    return out.view(np.uint16)


def _assert_bits_equal(actual, desired, inputs, what):
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    bad = np.flatnonzero(actual != desired)
    if bad.size:
        rows = [f"  input {inputs[i]:#x}: got {actual[i]:#x}, expected {desired[i]:#x}" for i in bad[:8]]
        raise AssertionError(f"{what}: {bad.size} of {actual.size} differ\n" + "\n".join(rows))


def _ties_and_neighbours(dtype):
    """float32 patterns halfway between two consecutive finite ``dtype`` values, and one ulp either side.

    The midpoint of two 16-bit values needs one more mantissa bit than the
    format, so it is a float32; both signs, subnormals included.
    """
    bits = ALL_BITS.view(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        low = bits[:-1].astype(np.float64)
        high = bits[1:].astype(np.float64)
        keep = np.isfinite(low) & np.isfinite(high) & (np.sign(low) * np.sign(high) >= 0)
    ties = ((low[keep] + high[keep]) / 2).astype(np.float32)
    assert np.array_equal(ties.astype(np.float64), (low[keep] + high[keep]) / 2)  # exact midpoints
    tie_bits = ties.view(np.uint32)
    return np.concatenate([tie_bits - 1, tie_bits, tie_bits + 1]).astype(np.uint32)


def _random_f32(count=1 << 22, seed=20261203):
    return np.random.default_rng(seed).integers(0, 1 << 32, count, dtype=np.uint64).astype(np.uint32)


# ---------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------


def test_bf16_load_is_exact_on_every_pattern():
    out = np.empty(ALL_BITS.size, np.float32)
    _convert(ALL_BITS, out)
    desired = ALL_BITS.view(BF16).astype(np.float32)
    _assert_bits_equal(out.view(np.uint32), desired.view(np.uint32), ALL_BITS, "bfloat16 -> float32")


def _bf16_nan_rule(bits, ml_dtypes_bits):
    """ml_dtypes' bfloat16 bits, except for a NaN: the quiet NaN with its sign and top payload bits."""
    bits = np.asarray(bits, np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), ml_dtypes_bits)


def test_bf16_round_trip_on_every_pattern():
    widened = ALL_BITS.view(BF16).astype(np.float32)
    out = _to_16(widened, np.uint16)
    finite = ~np.isnan(widened)
    assert np.array_equal(out[finite], ALL_BITS[finite])  # every non-NaN pattern survives
    # a NaN keeps its sign and payload, made quiet (a quiet NaN survives as it is)
    assert np.array_equal(out[~finite], ALL_BITS[~finite] | np.uint16(0x40))


@pytest.mark.parametrize(
    "name, bits",
    [
        ("ties", _ties_and_neighbours(BF16)),
        ("random", _random_f32()),
        (
            "edges",
            np.array([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x00007FFF, 0x00008000, 0x80008000], np.uint32),
        ),
    ],
)
def test_f32_to_bf16_rounds_like_ml_dtypes(name, bits):
    values = _f32(bits)
    out = _to_16(values, np.uint16)
    with np.errstate(invalid="ignore", over="ignore"):
        desired = _bf16_nan_rule(bits, values.astype(BF16).view(np.uint16))
    _assert_bits_equal(out, desired, bits, f"float32 -> bfloat16 ({name})")


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _convert_explicit(src, dst):
    """``dst = src`` through the explicit vector loop's store (``storage.affine_rows``).

    ``y = ((x - 0) - 0) * (1 * 1) + b`` with ``x = -0`` and ``b = src`` is
    ``src`` exactly, signed zeros included; a signaling NaN comes out quiet,
    as the store itself makes it.
    """
    x = np.full(dst.size, 0x8000, np.uint16)
    weight = np.ones(dst.size, np.float32)
    storage.affine_rows(dst, x, weight, src, 0, dst.size, 0, 0.0, 0.0, 1.0)


@pytest.mark.jit
@pytest.mark.parametrize(
    "name, bits",
    [
        ("ties", _ties_and_neighbours(BF16)),
        ("random", _random_f32()),
        ("every bfloat16", ALL_BITS.astype(np.uint32) << 16),
        ("subnormal", _random_f32(1 << 16, seed=7) & np.uint32(0x807FFFFF)),
        (
            "edges",
            np.array([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x00007FFF, 0x00008000, 0x80008000], np.uint32),
        ),
    ],
)
@pytest.mark.parametrize("count", [None, 29], ids=["all", "29"])
def test_explicit_vector_store_rounds_like_the_scalar_one(name, bits, count):
    """The explicit vector loops' bfloat16 store (``_SpanLoop.store``) gives the scalar store's bits.

    On a CPU with AVX512-BF16 it rounds with ``vcvtneps2bf16`` and takes the
    integer rounding for a vector holding a subnormal, which the instruction
    flushes to zero: subnormals, ties, NaN payloads and signed zeros, whole
    vectors and a masked last one (``count`` 29: one whole, 13 masked lanes).
    """
    bits = bits[:count]
    values = _f32(bits)
    out = np.empty(values.size, np.uint16)
    _convert_explicit(np.ascontiguousarray(values), out)
    _assert_bits_equal(out, storage.bfloat16_bits(values), bits, f"explicit float32 -> bfloat16 ({name})")


def test_f32_to_bf16_rounding_cases():
    # 1 + 2**-8 is a tie between 1 and 1 + 2**-7: even is 1; 1 + 3 * 2**-8 ties to 1 + 2**-6
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8)], np.float32)
    out = _to_16(values, np.uint16).view(BF16).astype(np.float64)
    assert out.tolist() == [1.0, 1 + 2**-6, 1 + 2**-7, -1.0]
    # the largest finite float32 rounds up to infinity, a NaN stays a NaN with its sign
    special = _to_16(
        np.array([np.finfo(np.float32).max, np.inf, -np.inf, np.nan, -np.nan], np.float32), np.uint16
    )
    assert special.tolist() == [0x7F80, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0]


# ---------------------------------------------------------------------------
# float16
# ---------------------------------------------------------------------------


def _f16_nan_rule(bits, numpy_bits):
    """NumPy's float16 bits, except for a NaN: IEEE 754's quiet NaN with the sign and top payload bits.

    ``sign | 0x7E00 | payload >> 13``: NumPy agrees on quiet NaNs, but keeps a
    signaling NaN signaling (and sets the lowest bit when its payload would
    vanish).
    """
    bits = np.asarray(bits, np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    ieee = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
    return np.where(nan, ieee.astype(np.uint16), numpy_bits)


def test_f16_load_on_every_pattern():
    out = np.empty(ALL_BITS.size, np.float32)
    _convert(ALL_BITS.view(np.int16), out)
    desired = ALL_BITS.view(np.float16).astype(np.float32).view(np.uint32)
    nan = np.isnan(ALL_BITS.view(np.float16))
    _assert_bits_equal(out.view(np.uint32)[~nan], desired[~nan], ALL_BITS[~nan], "float16 -> float32")
    # a NaN keeps its sign and payload and comes out quiet (NumPy keeps a signaling NaN signaling)
    _assert_bits_equal(
        out.view(np.uint32)[nan],
        desired[nan] | np.uint32(0x00400000),
        ALL_BITS[nan],
        "float16 NaN -> float32",
    )


def test_f16_round_trip_on_every_pattern():
    with np.errstate(invalid="ignore"):
        widened = ALL_BITS.view(np.float16).astype(np.float32)
    out = _to_16(widened, np.int16)
    finite = ~np.isnan(widened)
    assert np.array_equal(out[finite], ALL_BITS[finite])
    assert np.array_equal(out[~finite], ALL_BITS[~finite] | np.uint16(0x0200))


@pytest.mark.parametrize(
    "name, bits",
    [
        ("ties", _ties_and_neighbours(np.float16)),
        ("random", _random_f32()),
        # the overflow threshold (65520 rounds to inf), the smallest subnormal and half of it
        (
            "edges",
            np.array([0x477FEFFF, 0x477FF000, 0x33800000, 0x33000000, 0x33000001, 0x80000001], np.uint32),
        ),
    ],
)
def test_f32_to_f16_rounds_like_numpy(name, bits):
    values = _f32(bits)
    out = _to_16(values, np.int16)
    with np.errstate(invalid="ignore", over="ignore"):
        desired = _f16_nan_rule(bits, values.astype(np.float16).view(np.uint16))
    _assert_bits_equal(out, desired, bits, f"float32 -> float16 ({name})")


# ---------------------------------------------------------------------------
# the pure-Python fallback (NUMBA_DISABLE_JIT=1) does the same
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("view", [np.uint16, np.int16], ids=["bfloat16", "float16"])
def test_pure_python_load_store_agree(view):
    bits = np.concatenate([ALL_BITS[::257], _random_f32(2000).astype(np.uint16)])
    dtype = BF16 if view == np.uint16 else np.float16
    pattern = np.concatenate([_f32(_random_f32(2000)), _f32(_ties_and_neighbours(dtype)[::97])])
    loaded_jit = np.empty(bits.size, np.float32)
    loaded_py = np.empty(bits.size, np.float32)
    _convert(bits.view(view), loaded_jit)
    _convert_py(bits.view(view), loaded_py)
    assert np.array_equal(loaded_jit.view(np.uint32), loaded_py.view(np.uint32))
    with np.errstate(invalid="ignore", over="ignore"):
        stored_py = _to_16(pattern, view, _convert_py)
    _assert_bits_equal(_to_16(pattern, view), stored_py, pattern.view(np.uint32), "jit == pure Python")


# ---------------------------------------------------------------------------
# Sums in steps (16-bit block moments)
# ---------------------------------------------------------------------------


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _step_sums(x, off, count, shift):
    return storage.step_sums(x, off, count, shift)


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _step_dots(dy, x, off, count, mean_hi):
    return storage.step_dots(dy, x, off, count, mean_hi)


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _dot_sums(x, off, count):
    return storage.dot_sums(x, off, count)


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _block_moments(x, off, count, centered):
    return _moments(x, off, count, centered)


@numba.njit(**{**JIT_OPTIONS, "cache": False})
def _steps_moments(xs, count, centered):
    """``_moments`` of 16-bit data without the dot-product sums: the steps and their fallback."""
    if not centered:
        return 0.0, storage.step_sums(xs, 0, count, 0.0)[1]
    shift = np.float64(load(xs, 0))
    sum_dev, sum_sq = storage.step_sums(xs, 0, count, shift)
    return _shifted_moments(xs, count, shift, sum_dev, sum_sq)


HAS_BF16_DOT = storage._host_has_bf16_dot()


@pytest.mark.skipif(not HAS_BF16_DOT, reason="the host has no AVX512-BF16: dot_sums returns zeros")
def test_dot_sums_give_the_instructions_bits_as_numpy_and_float64():
    """``dot_sums`` (``vdpbf16ps``) gives its NumPy emulation's bits, within a few float32 roundings.

    Every remainder shape at unaligned offsets; data over a wide range of
    exponents with subnormals among them (flushed to zero by the instruction:
    the emulation must flush the same lanes), and float32 products that
    underflow.  Against the exact float64 sums of the same values.
    """
    rng = np.random.default_rng(11)
    tiny = np.array([1e-39, -3e-40, 5e-41], np.float32).astype(BF16)
    for scale in ("unit", "wide"):
        if scale == "unit":
            stored = (rng.standard_normal(5000) * 3 + 1).astype(BF16)
        else:
            exponent = rng.integers(-70, 40, 5000)
            stored = (rng.uniform(1, 2, 5000) * rng.choice([-1, 1], 5000) * 2.0**exponent).astype(BF16)
            stored[rng.integers(0, 5000, 300)] = tiny[rng.integers(0, 3, 300)]
        view = stored.view(np.uint16)
        values = stored.astype(np.float64)
        normal = np.where(np.abs(values) < np.finfo(np.float32).tiny, 0.0, values)
        short = [(0, 1), (3, 15), (1, 32), (5, 33), (0, 63), (2, 64), (7, 65), (0, 100), (9, 191)]
        for off, count in short + [(off + 11, 4096 + count) for off, count in short]:
            compiled = _dot_sums(view, off, count)
            python = storage.numpy_dot_sums(view, off, count)
            assert np.array_equal(np.array(compiled), np.array(python)), (scale, off, count, compiled, python)
            if scale == "unit":
                v = normal[off : off + count]
                eps = 2.0**-24
                assert abs(compiled[0] - v.sum()) <= 8 * eps * np.abs(v).sum(), (off, count)
                assert abs(compiled[1] - (v * v).sum()) <= 8 * eps * (v * v).sum(), (off, count)


def test_dot_sums_are_zeros_where_they_do_not_compile():
    """float16 views (and any storage but bfloat16 bits) get ``(0, 0)``: no block takes them."""
    for array in (np.ones(100, np.float16).view(np.int16), np.ones(100, np.float32)):
        assert _dot_sums(array, 0, 100) == (0.0, 0.0)
        assert storage.numpy_dot_sums(array, 0, 100) == (0.0, 0.0)


@pytest.mark.skipif(not HAS_BF16_DOT, reason="the host has no AVX512-BF16")
def test_bfloat16_moments_take_the_dot_sums_only_where_they_suit():
    """``_moments`` of bfloat16 blocks: the dot-product sums for ordinary blocks, the steps otherwise.

    Ordinary blocks (offset up to 3 standard deviations) give the dot sums'
    statistics, within a few float32 eps of the float64 ones; a constant
    block, one far from 0 relative to its spread (more than 4 bits lost),
    values whose squares would overflow or underflow float32, and NaN / inf
    give exactly what the steps give (their statistics unchanged by this path).
    """
    rng = np.random.default_rng(3)
    eps = 2.0**-24

    for offset in (0.0, 1.0, 3.0):
        stored = (rng.standard_normal(3136) + offset).astype(BF16)
        view = stored.view(np.uint16)
        values = stored.astype(np.float64)
        total, sum_sq = _dot_sums(view, 0, values.size)
        mean, m2 = _block_moments(view, 0, values.size, True)
        assert (mean, m2) == (total / values.size, sum_sq - total * total / values.size), offset
        assert abs(mean - values.mean()) <= 8 * eps * np.abs(values).max()
        assert abs(m2 - ((values - values.mean()) ** 2).sum()) <= 32 * eps * m2
        assert _block_moments(view, 0, values.size, False) == (0.0, sum_sq)
    cases = {
        "constant": np.full(3136, 1.5),
        "far from 0": rng.standard_normal(3136) + 20.0,
        "squares overflow": rng.standard_normal(3136) * 1e30,
        "squares underflow": rng.standard_normal(3136) * 1e-35,
        "nan": np.where(np.arange(3136) == 7, np.nan, rng.standard_normal(3136)),
        "inf": np.where(np.arange(3136) == 7, np.inf, rng.standard_normal(3136)),
    }
    for name, data in cases.items():
        view = data.astype(BF16).view(np.uint16)
        for centered in (True, False):
            if name == "far from 0" and not centered:
                continue  # the plain sum of squares loses nothing: the dot sums are kept
            got = _block_moments(view, 0, view.size, centered)
            if name == "constant" and centered:
                assert got == (1.5, 0.0)
                continue
            expected = _steps_moments(view, view.size, centered)
            assert np.array_equal(np.array(got), np.array(expected), equal_nan=True), (name, centered, got)
            if name in ("nan", "inf"):
                assert not np.isfinite(got[1]), (name, got)


@pytest.mark.parametrize(
    "dtype", [BF16, np.float16, np.float32, np.float64], ids=["bf16", "f16", "f32", "f64"]
)
def test_step_sums_match_numpy_and_float64(dtype):
    """``step_sums`` and ``step_dots`` (explicit vector code) give their NumPy versions' bits.

    Spans of every remainder shape (a masked last vector, one to three whole
    vectors left over, whole steps only, shorter than a vector), at offsets
    that are not vector-aligned, shifted by the first element and unshifted
    (the uncentered sum of squares).  Against the exact float64 sums of the
    same stored values: ``sum(d*d)`` within a few float32 roundings of its
    size, ``sum(d)`` within a few roundings of ``sum(|d|)``.
    """
    rng = np.random.default_rng(7)
    stored = (rng.standard_normal(5000) * 3 + 10).astype(dtype)
    view = {BF16: np.uint16, np.dtype(np.float16): np.int16}.get(np.dtype(dtype))
    view = stored if view is None else stored.view(view)
    values = stored.astype(np.float64)
    grad = rng.standard_normal(5000).astype(dtype)
    grad_view = grad if view is stored else grad.view(view.dtype)
    grads = grad.astype(np.float64)
    eps = 2.0**-52 if dtype == np.float64 else 2.0**-24
    spans = [(0, 1), (3, 15), (1, 16), (5, 17), (0, 63), (2, 64), (7, 65), (0, 100), (9, 191), (0, 4096)]
    spans.append((11, 4989))
    for off, count in spans:
        for shift in (0.0, float(values[off])):
            compiled = _step_sums(view, off, count, shift)
            python = storage.numpy_step_sums(view, off, count, shift)
            assert np.array_equal(np.array(compiled), np.array(python)), (off, count, shift, compiled, python)
            d = values[off : off + count] - np.float64(np.float32(shift) if dtype != np.float64 else shift)
            assert abs(compiled[0] - d.sum()) <= 8 * eps * np.abs(d).sum(), (off, count, shift)
            assert abs(compiled[1] - (d * d).sum()) <= 8 * eps * (d * d).sum(), (off, count, shift)
            dots = _step_dots(grad_view, view, off, count, shift)
            assert np.array_equal(
                np.array(dots), np.array(storage.numpy_step_dots(grad_view, view, off, count, shift))
            )
            g = grads[off : off + count]
            assert abs(dots[0] - g.sum()) <= 8 * eps * np.abs(g).sum(), (off, count, shift)
            assert abs(dots[1] - (g * d).sum()) <= 8 * eps * np.abs(g * d).sum(), (off, count, shift)
