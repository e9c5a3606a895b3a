"""Shared test helpers: Hypothesis strategies and the bad-input check.

* :func:`rejected` -- the one check of a bad call: it raises the expected exception, with a message
  that matches and names the offending argument, and changes no array it was given (byte for byte);
  :func:`snapshot`, :func:`assert_unchanged` and :func:`assert_names` are its parts, for oracles
  that do not know in advance whether a call raises (``tests/test_fuzz_api.py``).
* :func:`problems` -- valid problems with groups of at least 2 elements (``tests/test_properties.py``).
* the call generator of ``tests/test_fuzz_api.py``: :class:`Call` and the ``draw_*`` builders, each
  of which draws one argument (valid, or invalid when its slot is mutated), given ``d``, the
  ``draw`` of ``st.data()``; for the fused epilogue and the skip add :func:`draw_epilogue`,
  :func:`draw_like_x` (residual, skip, ``stats.h``), :func:`draw_sum_out`, and
  :func:`overlap_errors` (the documented overlap rules of the outputs); :data:`ACTS` is shared with
  ``tests/test_epilogue.py``.

Importing this module also pre-imports Hypothesis' failure-report machinery (see below).
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Mapping

import numpy as np
import pytest
from cases import Case
from hypothesis import assume, event
from hypothesis import strategies as st

from fastnorm import NormSpec, Stats

try:  # bfloat16 data needs ml_dtypes (a test dependency); without it the fuzzer draws float16 only
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

# Hypothesis imports libcst (which warns through mypy_extensions) only when it reports a failure, and
# filterwarnings=error would turn that report into an INTERNALERROR: import it here, warnings ignored.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # libcst not installed: nothing to pre-import
        pass


# ---------------------------------------------------------------------------
# bad input: raises, names the argument, changes nothing
# ---------------------------------------------------------------------------


def _labelled(watched):
    """``(label, array)`` for each array among ``watched`` (arrays, or mappings name -> array)."""
    items = []
    for i, a in enumerate(watched):
        pairs = a.items() if isinstance(a, Mapping) else [(f"watched[{i}]", a)]
        items += [(label, v) for label, v in pairs if isinstance(v, np.ndarray)]
    return items


def snapshot(*watched):
    """Byte-for-byte copies of the arrays among ``watched`` (None, lists and scalars are skipped)."""
    return {label: (a.dtype, a.shape, np.array(a, copy=True).tobytes()) for label, a in _labelled(watched)}


def assert_unchanged(before, *watched, skip=()):
    """Every array of ``watched`` still has the dtype, shape and bytes ``snapshot`` recorded (NaN-safe)."""
    for label, a in _labelled(watched):
        if label in skip:
            continue
        dtype, shape, data = before[label]
        assert (a.dtype, a.shape) == (dtype, shape) and np.array(a, copy=True).tobytes() == data, (
            f"argument {label} was modified"
        )


def assert_names(error, names):
    """``error`` has a non-empty message that matches one of the regexes ``names`` (a str or several)."""
    msg = str(error)
    assert msg.strip(), f"{type(error).__name__} with an empty message"
    if names is None:
        return
    patterns = [names] if isinstance(names, str) else list(names)
    assert any(re.search(p, msg) for p in patterns), (
        f"{type(error).__name__}({msg!r}) names none of the arguments {patterns}"
    )


def rejected(exc, match, fn, *watched, names=None):
    """``fn()`` raises ``exc`` and leaves every array in ``watched`` unchanged, byte for byte.

    The message must match the regex ``match`` (``re.search``, as ``pytest.raises``; None: any) and
    one of the regexes ``names`` (the argument(s) the message must name; None: only non-empty).
    ``watched`` holds arrays or mappings name -> array.  Returns the exception.
    """
    before = snapshot(*watched)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert_names(info.value, names)
    assert_unchanged(before, *watched)
    return info.value


# ---------------------------------------------------------------------------
# tests/test_properties.py: valid problems
# ---------------------------------------------------------------------------


@st.composite
def problems(draw):
    """A (case, layout, seed, scale, offset) with groups of at least 2 elements."""
    kind = draw(st.sampled_from(["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]))
    n = draw(st.integers(1, 4))
    if kind in ("layer_norm", "rms_norm"):
        lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
        k = draw(st.integers(1, 3))
        tail = draw(st.lists(st.integers(1, 7), min_size=k, max_size=k))
        case = Case(kind, tuple(lead + tail), normalized_ndim=k, eps=0.0)
        group = math.prod(tail)
        layout = "cf"
    else:
        c = draw(st.integers(1, 8))
        spatial = draw(st.lists(st.integers(1, 6), min_size=0 if kind != "instance_norm" else 1, max_size=3))
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        groups = draw(st.sampled_from(divisors)) if kind == "group_norm" else None
        case = Case(kind, (n, c, *spatial), num_groups=groups, eps=0.0)
        s = math.prod(spatial)
        group = {"batch_norm": n * s, "instance_norm": s, "group_norm": (c // (groups or 1)) * s}[kind]
        layout = draw(st.sampled_from(["cf", "cl", "cl_memory"]))
    assume(group >= 2)
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0]))
    return case, layout, seed, scale, offset


# ---------------------------------------------------------------------------
# tests/test_fuzz_api.py: one call, built valid, with zero to two mutations
# ---------------------------------------------------------------------------


PER_CHANNEL = ("batch_norm", "instance_norm", "group_norm")
TRAILING = ("layer_norm", "rms_norm")
MAX_SIZE = 240

# Natural errors of valid-looking geometry (training statistics of too-small groups).
NATURAL = r"value per channel|spatial element|0 elements|hold no elements|x\.shape"


class Call:
    """One fuzzed call: its arguments, the keywords an error may name, the in-place arrays."""

    def __init__(self, d, slots):
        # the arguments this call gets an invalid value for: none (about half the calls), one or two
        n = d(st.sampled_from([0, 0, 0, 0, 1, 1, 1, 2]), label="number of mutations")
        self.slots = set(
            d(
                st.lists(st.sampled_from(slots), min_size=n, max_size=n, unique=True),
                label="mutated arguments",
            )
        )
        self.invalid = []  # regexes: the call must raise and name one of them
        self.may_fail = []  # regexes: the call may raise (natural errors of the geometry)
        self.watched = {}  # name -> array argument (snapshotted)
        self.running = None
        self.counter = None
        self.dtype = None  # x's dtype (draw_x)

    def choose(self, d, slot, good, bad, label):
        """A valid option, or an invalid one when ``slot`` is to be mutated."""
        return d(st.sampled_from(bad if slot in self.slots else good), label=label)

    def bad(self, label, pattern):
        self.invalid.append(pattern)
        event(f"mutation: {label}")


F16 = np.dtype(np.float16)
#: ml_dtypes' bfloat16 (NumPy kind "V"), or float16 again when ml_dtypes is missing.
BF16 = np.dtype(ml_dtypes.bfloat16) if ml_dtypes is not None else F16
#: The data dtypes draw_x draws from: 1 in 3 nominally, about 1 call in 4 of the fuzzer in practice
#: (Hypothesis' mutations of earlier examples skew the draws), stores its data in 16 bits.
DATA_DTYPES = [np.float32, np.float64, np.float32, np.float64, F16, BF16]
#: Float dtypes that are not a data dtype of ``x`` (out / residual / dy of another dtype) draw from.
FLOATS = [np.dtype(np.float32), np.dtype(np.float64), F16, BF16]


def native_dtype(dtype):
    return np.dtype(dtype).newbyteorder("=")


def is_half(dtype):
    """Whether ``dtype`` is a 16-bit storage dtype (float16 or bfloat16), any byte order."""
    return native_dtype(dtype) in (F16, BF16)


def is_float(dtype):
    """A floating-point dtype, ml_dtypes' bfloat16 (kind "V") included."""
    return np.dtype(dtype).kind == "f" or native_dtype(dtype) == BF16


def param_dtype(dtype):
    """The dtype in which the kernels read parameters of ``dtype`` data: float32 for 16-bit data."""
    return np.dtype(np.float32) if is_half(dtype) else native_dtype(dtype)


def other_dtypes(dtype, extra=()):
    """Float dtypes (and ``extra``) that differ from the native ``dtype``: a mismatch of ``x``'s."""
    return [t for t in (*FLOATS, *extra) if np.dtype(t) != native_dtype(dtype)]


def is_cl_memory(a):
    """``a`` is a logically (N, C, ...) array with channels-last memory (the no-copy fast path)."""
    return a.ndim > 2 and not a.flags.c_contiguous and np.moveaxis(a, 1, -1).flags.c_contiguous


def draw_dims(d, rank):
    dims = [d(st.sampled_from([1, 2, 2, 3, 3, 4, 5, 0])) for _ in range(rank)]
    while math.prod(dims) > MAX_SIZE:
        dims[dims.index(max(dims))] -= 1
    return dims


def draw_view(d, a, name, *, allow_broadcast=True):
    """A view of ``a`` with the same values and an unusual memory layout (always a valid input)."""
    options = ["c", "c", "step", "neg", "fortran", "perm", "readonly", "misaligned", "bigendian"]
    if allow_broadcast:
        options.append("broadcast")
    how = d(st.sampled_from(options), label=f"{name} layout")
    if a.ndim == 0 and how in ("step", "neg", "perm", "broadcast"):
        how = "c"
    if how == "bigendian" and native_dtype(a.dtype) == BF16 and BF16 != F16:
        how = "c"  # ml_dtypes' bfloat16 has no byte-swapped dtype (">" gives raw bytes, kind "V")
    if how == "c":
        return np.array(a, copy=True)
    if how == "step":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if how == "neg":
        axis = d(st.integers(0, a.ndim - 1))
        return np.flip(np.ascontiguousarray(np.flip(a, axis)), axis)
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "perm":
        perm = d(st.permutations(range(a.ndim)))
        return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))
    if how == "readonly":
        r = np.array(a, copy=True)
        r.flags.writeable = False
        return r
    if how == "misaligned":
        buf = np.zeros(a.nbytes + 1, np.uint8)
        r = np.ndarray(a.shape, a.dtype, buffer=buf, offset=1)
        r[...] = a
        return r
    if how == "bigendian":
        return a.astype(a.dtype.newbyteorder(">"))
    # broadcast: a zero-stride view; the values change (constant along the axis), callers re-read them
    axis = d(st.integers(0, a.ndim - 1))
    return np.broadcast_to(a.take([0], axis=axis) if a.shape[axis] else a, a.shape)


def cl_view(a):
    """(N, C, ...) values laid out channels-last in memory."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def draw_x_array(d, values, kind, cl, name):
    if kind in PER_CHANNEL and not cl and values.ndim > 2 and d(st.booleans(), label=f"{name} cl-memory"):
        return cl_view(values)
    return draw_view(d, values, name)


def draw_eps(d, call, kind, group_min, dtype=np.float64):
    """An eps argument; returns (value, eps used by the reference or None when invalid).

    ``rms_norm(eps=None)`` means the compute dtype's epsilon: float32's for 16-bit ``dtype`` data
    (returned as the reference's eps), ``x.dtype``'s otherwise (None: the reference's default).
    """
    valid = [1e-5, 1e-3, np.float64(1e-4), np.float32(1e-2), 1, 2.5e-6]
    if kind == "rms_norm":
        valid.append(None)
    if group_min >= 2:
        valid.append(0.0)
    invalid = [-1e-5, float("nan"), float("inf"), -float("inf"), "1e-5", True, complex(1e-5, 0), [1e-5]]
    if kind != "rms_norm":
        invalid.append(None)
    if "eps" in call.slots:
        eps = d(st.sampled_from(invalid), label="eps")
        call.bad(f"eps={eps!r}", r"\beps\b")
        return eps, None
    eps = d(st.sampled_from(valid), label="eps")
    if eps is None:
        return eps, (float(np.finfo(np.float32).eps) if is_half(dtype) else None)
    return eps, float(eps)


def draw_param(d, call, name, shape, dtype, rng):
    """Weight/bias argument: (argument, float64 values the kernel must use or None).

    With 16-bit ``dtype`` data the parameters are float32 or the data dtype ("exact"), or of another
    real dtype; the kernels read them as float32 (:func:`param_dtype`), and so does the reference.
    """
    choice = call.choose(
        d,
        name,
        ["none", "exact", "exact", "view", "other-float", "int", "list"],
        ["bad-shape", "bad-dtype"],
        name,
    )
    base = rng.uniform(0.5, 1.5, shape) if name == "weight" else rng.standard_normal(shape)
    if choice == "none":
        return None, None
    if choice == "bad-shape":
        bad_shape = d(st.sampled_from([shape + (1,), (shape[0] + 1,) + shape[1:], ()]))
        call.bad(f"{name} shape", rf"\b{name}\b")
        return np.ones(bad_shape, dtype), None
    if choice == "bad-dtype":
        bad = d(st.sampled_from([np.complex128, np.bool_, object, "U3"]))
        call.bad(f"{name} dtype", rf"\b{name}\b")
        return base.astype(bad), None
    if choice == "int":
        value = np.rint(np.abs(base) * 2).astype(d(st.sampled_from([np.int32, np.int64, np.uint8])))
    elif choice == "other-float":
        value = base.astype(d(st.sampled_from([np.float16, np.float32, np.float64, BF16])))
    else:
        given = dtype
        if is_half(dtype):  # torch's "mixed" mode: float32 parameters, or the data dtype
            given = d(st.sampled_from([np.dtype(np.float32), native_dtype(dtype)]), label=f"{name} dtype")
        if choice == "list" and 0 not in shape:  # a list cannot carry the shape of an empty array
            value = base.astype(given).tolist()
        else:
            value = base.astype(given)
            if choice == "view":
                value = draw_view(d, value, name, allow_broadcast=False)
    call.watched[name] = value
    return value, np.asarray(value).astype(param_dtype(dtype)).astype(np.float64)


def draw_out(d, call, x, shape, dtype, kind, cl, *, allow_dy=None, x_is_read=True):
    """An ``out=`` argument and whether it is valid; may replace ``x`` (partial overlap).

    ``x_is_read=False`` (a backward after a skip add reads ``stats.h``): no partial overlap of ``x``.
    """
    good = ["none", "none", "fresh", "x"] + (["dy"] if allow_dy is not None else [])
    bad = ["wrong-shape", "wrong-dtype", "wrong-order", "readonly", "misaligned", "list", "partial"]
    mode = call.choose(d, "out", good, bad, "out")
    if mode == "partial" and not x_is_read:
        mode = "wrong-shape"
    need_cl = kind in PER_CHANNEL and not cl and is_cl_memory(x)
    native = native_dtype(dtype)

    def fresh(s=shape, dt=native):
        if need_cl and len(s) > 2:
            return np.moveaxis(np.empty(np.moveaxis(np.empty(s, dt), 1, -1).shape, dt), -1, 1)
        return np.empty(s, dt)

    def ok(a):
        layout = np.moveaxis(a, 1, -1).flags.c_contiguous if need_cl else a.flags.c_contiguous
        return (
            a.shape == tuple(shape)
            and a.dtype == native
            and a.dtype.isnative
            and a.flags.writeable
            and a.flags.aligned
            and layout
        )

    call.fresh_out = fresh
    if mode == "none":
        return x, None
    if mode == "partial" and not (x.size >= 2 and x.shape == tuple(shape) and is_float(x.dtype)):
        mode = "wrong-shape"
    if mode == "partial":
        buf = np.zeros(x.size + 1, native)
        buf[: x.size] = np.asarray(x).reshape(-1)
        x = buf[: x.size].reshape(shape)
        out = buf[1:].reshape(shape)
        call.bad("out partly overlaps x", r"\bout\b")
        return x, out
    if mode == "list":
        call.bad("out is a list", r"\bout\b")
        return x, np.zeros(shape).tolist()
    if mode == "x":
        out = x
    elif mode == "dy":
        out = allow_dy
    elif mode == "wrong-shape":
        out = np.empty(tuple(shape) + (1,), native)
    elif mode == "wrong-dtype":
        out = np.empty(shape, d(st.sampled_from(other_dtypes(dtype, [np.dtype(np.int64)]))))
    elif mode == "wrong-order":
        out = np.asfortranarray(np.empty(shape, native)) if not need_cl else np.empty(shape, native)
    elif mode == "readonly":
        out = fresh()
        out.flags.writeable = False
    elif mode == "misaligned":
        buf = np.zeros(int(np.prod(shape)) * native.itemsize + 1, np.uint8)
        out = np.ndarray(shape, native, buffer=buf, offset=1)
    else:
        out = fresh()
    if not ok(out) and "out" not in call.slots:
        out, mode = fresh(), "fresh"  # out=x / out=dy on an unusable layout: that is a mutation
    if not ok(out):
        call.bad(f"out {mode}", r"\bout\b")
    event(f"out={mode} ({'ok' if ok(out) else 'bad'})")
    return x, out


def memory_of(out):
    """A flat view of ``out``'s memory (C-contiguous or channels-last)."""
    flat = np.ravel(out, order="K")
    assert np.shares_memory(flat, out)
    return flat


def draw_alias_into_out(d, call, out, make_out, targets, avoid):
    """Mutation: rebind one parameter/statistic argument to memory inside ``out``.

    ``targets`` maps a name to ``(values, dtype, pattern-or-None)``; None means the overlap is only
    *allowed* to be rejected (the argument is copied first).  Returns ``(out, name, view)`` or None.
    """
    if "alias" not in call.slots:
        return None
    if not (isinstance(out, np.ndarray) and is_float(out.dtype) and out.flags.writeable) or any(
        isinstance(a, np.ndarray) and np.shares_memory(out, a) for a in avoid
    ):
        out = make_out()
    usable = [n for n, (v, _, _) in targets.items() if 0 < np.size(v) <= out.size]
    if not usable:
        return None
    name = d(st.sampled_from(usable), label="aliased argument")
    values, dtype, pattern = targets[name]
    view = memory_of(out).view(out.dtype)[: np.size(values)].reshape(np.shape(values))
    if view.dtype != np.dtype(dtype):
        return None
    view[...] = values
    if pattern is None:
        call.may_fail.append(r"\bout\b")
    else:
        call.bad(f"out overlaps {name}", pattern)
    return out, name, view


def draw_running(d, call, channels, *, training, required, dtype=np.float64):
    """running_mean / running_var arguments (and their float64 initial values).

    With 16-bit ``dtype`` data they are float32 or the data dtype (float64 otherwise, or float32).
    """
    good = ["given", "given", "given-f32", "strided"]
    good += ["none"] if not required else []
    good += ["readonly"] if not training else []
    bad = ["one", "bad-shape", "int", "list"]
    bad += (["none"] if required else []) + (["readonly"] if training else [])
    mode = call.choose(d, "running", good, bad, "running")
    rng = np.random.default_rng(d(st.integers(0, 2**16)))
    rm, rv = rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)
    if mode == "none":
        if required:
            call.bad("running stats missing", r"running_mean|running_var")
        return None, None
    if mode == "one":
        call.bad("only running_mean", r"running_mean|running_var")
        return rm, None
    if mode == "bad-shape":
        call.bad("running shape", r"running_mean|running_var")
        return np.zeros(channels + 1), rv
    if mode == "int":
        call.bad("running dtype", r"running_mean|running_var")
        return rm, rv.astype(np.int64)
    if mode == "list":
        call.bad("running list", r"running_mean|running_var")
        return rm.tolist(), rv
    if is_half(dtype):
        rm, rv = rm.astype(native_dtype(dtype)), rv.astype(native_dtype(dtype))
    if mode == "given-f32":
        rm, rv = rm.astype(np.float32), rv.astype(np.float32)
    if mode == "strided":
        big_m, big_v = np.zeros(2 * channels, rm.dtype), np.zeros(2 * channels, rv.dtype)
        big_m[::2], big_v[::2] = rm, rv
        rm, rv = big_m[::2], big_v[::2]
    if mode == "readonly":
        rm.flags.writeable = False
        rv.flags.writeable = False
        if training:
            call.bad("running read-only", r"running_mean|running_var")
    call.running = (rm, rv)
    return rm, rv


def draw_geometry(d, kind, cl):
    """A valid logical shape for ``kind`` (zero-size dims included), and GN's num_groups."""
    if kind in TRAILING:
        k = d(st.integers(1, 3), label="normalized_ndim")
        lead = d(st.integers(0, 6 - k), label="leading rank")
        return tuple(draw_dims(d, lead + k)), k, None
    spatial = d(st.integers(0, 3), label="spatial rank")
    n = d(st.sampled_from([1, 2, 3, 0]))
    c = d(st.integers(1, 6))
    dims = draw_dims(d, spatial)
    while n * c * math.prod(dims) > MAX_SIZE:
        dims[dims.index(max(dims))] -= 1
    shape = (n, *dims, c) if cl else (n, c, *dims)
    groups = d(st.sampled_from([g for g in range(1, c + 1) if c % g == 0])) if kind == "group_norm" else None
    return shape, None, groups


def natural_errors(kind, shape, cl, k, groups, training, functional):
    """Whether a (training) call on this geometry must raise: torch's checks and empty groups."""
    if kind in TRAILING:
        tail = shape[len(shape) - k :]
        if functional and 0 in tail:
            return True  # normalized_shape entries must be >= 1
        return training and math.prod(tail) == 0 and math.prod(shape[: len(shape) - k]) > 0
    if not training:
        return False
    n, c = (shape[0], shape[-1]) if cl else shape[:2]
    s = math.prod(shape[1:-1]) if cl else math.prod(shape[2:])
    if kind == "batch_norm":
        return n * s <= 1
    if kind == "instance_norm":
        return s == 1 or (s == 0 and n > 0)
    return (c // groups) * s == 0 and n > 0


def group_min(kind, shape, cl, k, groups):
    if kind in TRAILING:
        return math.prod(shape[len(shape) - k :])
    n, c = (shape[0], shape[-1]) if cl else shape[:2]
    s = math.prod(shape[1:-1]) if cl else math.prod(shape[2:])
    return {"batch_norm": n * s, "instance_norm": s, "group_norm": (c // (groups or 1)) * s}[kind]


def draw_x(d, call, kind, functional, cl_allowed=True):
    """Draw geometry, dtype, values and layout of x; returns a dict describing the problem."""
    cl = kind in PER_CHANNEL and cl_allowed and d(st.booleans(), label="channels_last")
    shape, k, groups = draw_geometry(d, kind, cl)
    dtype = np.dtype(d(st.sampled_from(DATA_DTYPES), label="dtype"))
    event(f"dtype {dtype.name}")
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1), label="seed"))
    values = rng.standard_normal(shape).astype(dtype)
    x = draw_x_array(d, values, kind, cl, "x")
    values = np.array(x, dtype=dtype)  # broadcast views change the values
    p = dict(cl=cl, shape=shape, k=k, groups=groups, dtype=dtype, rng=rng, values=values, x=x)
    call.dtype = dtype
    # rank / dtype / channel mutations of x (replace x, keep the rest consistent)
    mutation = call.choose(d, "x", ["none"], ["dtype", "dtype", "rank", "channels0"], "x mutation")
    if mutation == "channels0" and kind in TRAILING:
        mutation = "dtype"
    if mutation == "dtype":
        unsupported = [np.int32, np.int64, np.uint8, np.bool_, np.complex128, np.longdouble, object, "U4"]
        unsupported += [np.int16, np.uint16]  # the kernels' views of 16-bit data are not data
        bad = d(st.sampled_from(unsupported))
        p["x"] = values.astype(np.float64).astype(bad)  # bfloat16 casts to no string dtype
        call.bad(f"x.dtype={np.dtype(bad)}", r"x\.dtype")
    elif mutation == "rank" and kind in PER_CHANNEL:
        bad_shape = d(st.sampled_from([(), (3,), (1, 1, 1, 1, 1, 2)]))
        p["x"] = np.zeros(bad_shape, dtype)
        call.bad("x rank", r"x\.shape")
    elif mutation == "rank":
        p["x"] = np.zeros((), dtype)
        call.bad("x rank 0", r"x\.shape|x\.ndim|normalized_shape")
    elif mutation == "channels0":
        zshape = list(shape)
        zshape[-1 if cl else 1] = 0
        p["x"] = np.zeros(zshape, dtype)
        call.bad("C = 0", r"channels|num_groups|x\.shape|normalized|hold no elements")
    return p


def group_min_of(p, kind):
    """Smallest group size; 0 when x may have constant groups (broadcast), where eps=0 gives 0/0."""
    x = p["x"]
    if any(s == 0 and n > 1 for s, n in zip(x.strides, x.shape, strict=True)):
        return 0
    return group_min(kind, p["shape"], p["cl"], p["k"], p["groups"])


def draw_channels_last(d, call, p):
    if "channels_last" not in call.slots:
        return p["cl"]
    bad = d(st.sampled_from([1, 0, "yes", None, np.bool_(True)]))
    call.bad(f"channels_last={bad!r}", r"channels_last")
    return bad


def counter_arg(call, mode, training):
    if mode == "none":
        return None
    if mode == "int64":
        return np.zeros((), np.int64)
    if mode == "int32-1":
        return np.array([3], np.int32)
    if mode == "float":
        c = np.zeros(())
        pattern = r"num_batches_tracked"
    elif mode == "shape2":
        c = np.zeros(2, np.int64)
        pattern = r"num_batches_tracked"
    elif mode == "readonly":
        c = np.zeros((), np.int64)
        c.flags.writeable = False
        pattern = r"num_batches_tracked"
    elif mode == "negative":
        c = np.array(-1, np.int64)
        pattern = r"num_batches_tracked"
    else:  # at-max: incrementing would overflow
        c = np.array([np.iinfo(np.int8).max], np.int8)
        pattern = r"num_batches_tracked"
    if training:
        call.bad(f"num_batches_tracked {mode}", pattern)
    return c


def draw_spec(d, call, kind, p, eps, *, epilogue=None, allow_not_a_spec=True):
    """Build the spec the way a user would, sometimes with invalid constructor arguments.

    ``epilogue`` (the ``activation`` / ``negative_slope`` keywords, possibly invalid) is passed to
    every constructor; with it, a valid spec is sometimes built by ``NormSpec(...)`` directly.
    ``allow_not_a_spec=False`` turns the "not a NormSpec" mutation into an unknown kind.
    """
    cl, k, groups = p["cl"], p["k"], p["groups"]
    epi = epilogue or {}
    how = call.choose(d, "spec", ["ok"], ["bad-field", "bad-kind", "not-a-spec", "bad-int"], "spec")
    if how == "not-a-spec" and not allow_not_a_spec:
        how = "bad-kind"
    if how == "not-a-spec":
        call.bad("spec is not a NormSpec", r"\bspec\b")
        return lambda: kind
    if how == "bad-kind":
        call.bad("unknown kind", r"\bkind\b")
        return lambda: NormSpec(kind.replace("_norm", "norm"), eps, **epi)
    if how == "bad-field":
        if kind in TRAILING:
            field = d(st.sampled_from(["channels_last", "num_groups"]))
            call.bad(f"{field} for {kind}", field)
            if field == "channels_last":
                return lambda: NormSpec(kind, eps, normalized_ndim=k, channels_last=True, **epi)
            return lambda: NormSpec(kind, eps, num_groups=2, normalized_ndim=k, **epi)
        other = "num_groups" if kind != "group_norm" else "channels_last"
        field = d(st.sampled_from(["normalized_ndim", other]))
        call.bad(f"{field} for {kind}", field)
        if field == "normalized_ndim":
            return lambda: NormSpec(kind, eps, num_groups=groups, normalized_ndim=1, channels_last=cl, **epi)
        if field == "channels_last":
            return lambda: NormSpec(kind, eps, num_groups=groups, channels_last="no", **epi)
        return lambda: NormSpec(kind, eps, num_groups=3, channels_last=cl, **epi)
    if how == "bad-int":
        bad = d(st.sampled_from([0, -2, True, 1.0, None, "2"]))
        if kind in TRAILING:
            call.bad(f"normalized_ndim={bad!r}", r"normalized_ndim")
            k = bad
        elif kind == "group_norm":
            call.bad(f"num_groups={bad!r}", r"num_groups")
            groups = bad
        else:
            how = "ok"
    if epilogue is not None and d(st.booleans(), label="spec by NormSpec(...)"):
        return lambda: NormSpec(
            kind,
            eps,
            num_groups=groups if kind == "group_norm" else None,
            normalized_ndim=k if kind in TRAILING else None,
            channels_last=cl if kind in PER_CHANNEL else False,
            **epi,
        )
    if kind == "batch_norm":
        return lambda: NormSpec.batch_norm(eps, cl, **epi)
    if kind == "instance_norm":
        return lambda: NormSpec.instance_norm(eps=eps, channels_last=cl, **epi)
    if kind == "group_norm":
        return lambda: NormSpec.group_norm(groups, eps, channels_last=cl, **epi)
    if kind == "layer_norm":
        return lambda: NormSpec.layer_norm(k, eps, **epi)
    return lambda: NormSpec.rms_norm(k, eps=eps, **epi)


def draw_stats(d, call, ref_mean, ref_rstd, has_bias, inference, **fields):
    """A ``stats`` argument; ``fields`` are further ``Stats`` fields (``has_residual``, ``h``, ...)."""
    # backward needs the exact statistics of x (its formula assumes them); inference takes any
    good = ["ok", "ok"] + (["list"] if ref_mean.size else []) + (["f32"] if inference else [])
    how = call.choose(d, "stats", good, ["tuple", "bad-shape", "int", "complex"], "stats")
    if how == "tuple":
        call.bad("stats is a tuple", r"\bstats\b")
        return (ref_mean, ref_rstd), ref_mean, ref_rstd
    if how == "bad-shape":
        call.bad("stats shape", r"\bstats\b")
        bad_mean = ref_mean.reshape(-1)[:-1] if ref_mean.size else np.zeros(1)
        return Stats(bad_mean, ref_rstd, **fields), None, None
    if how == "int":
        call.bad("stats dtype", r"\bstats\b")
        return Stats(ref_mean.astype(np.int64), ref_rstd, **fields), None, None
    if how == "complex":
        call.bad("stats dtype", r"\bstats\b")
        return Stats(ref_mean, ref_rstd.astype(np.complex128), **fields), None, None
    if how == "f32":
        m, r = ref_mean.astype(np.float32), ref_rstd.astype(np.float32)
        return Stats(m, r, has_bias, **fields), m.astype(np.float64), r.astype(np.float64)
    if how == "list":
        return Stats(ref_mean.tolist(), ref_rstd.tolist(), has_bias, **fields), ref_mean, ref_rstd
    return Stats(ref_mean.copy(), ref_rstd.copy(), has_bias, **fields), ref_mean, ref_rstd


# ---------------------------------------------------------------------------
# tests/test_fuzz_api.py: the fused epilogue and the pre-norm skip add
# ---------------------------------------------------------------------------

#: The epilogue's activations (torch's F.relu, F.leaky_relu, sigmoid, tanh, F.silu, F.gelu two ways).
ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "silu", "gelu", "gelu_tanh"]
#: Activation arguments that are not one of them (names, other types).
BAD_ACTS = ["ReLU", "swish", "", "gelu ", "none", "identity", b"relu", 1, 0, True, ["relu"]]
#: Stands for an argument left out of the call (its default applies).
OMIT = object()


def draw_epilogue(d, call):
    """The ``activation`` / ``negative_slope`` keywords (a dict) and the (activation, slope) they mean.

    ``negative_slope`` is validated whatever the activation (a finite real number).
    """
    good = [*ACTS, None, OMIT, np.str_("silu")]
    act = call.choose(d, "activation", good, BAD_ACTS, "activation")
    if "activation" in call.slots:
        call.bad(f"activation={act!r}", r"\bactivation\b")
    good_slopes = [OMIT, 0.01, 0.0, 0.2, -0.5, 2.0, 1, np.float32(0.25), np.float64(-0.125), np.int64(3)]
    bad_slopes = [float("nan"), float("inf"), -float("inf"), "0.1", True, None, complex(0.1, 0), [0.1]]
    slope = call.choose(d, "negative_slope", good_slopes, bad_slopes, "negative_slope")
    if "negative_slope" in call.slots:
        call.bad(f"negative_slope={slope!r}", r"negative_slope")
    kwargs = {}
    if act is not OMIT:
        kwargs["activation"] = act
    if slope is not OMIT:
        kwargs["negative_slope"] = slope
    act_ref = None if act is OMIT else act
    slope_ref = 0.01 if slope is OMIT or "negative_slope" in call.slots else float(slope)
    event(f"activation {act_ref!r}")
    return kwargs, (str(act_ref) if act_ref is not None else None), slope_ref


def in_kernel_order(a, need_cl):
    """Whether ``a``'s memory is in the kernel's order: C order, or channels-last like ``x``."""
    return np.moveaxis(a, 1, -1).flags.c_contiguous if need_cl else a.flags.c_contiguous


def like_x_ok(a, shape, dtype, need_cl):
    """Whether ``a`` is usable as a residual / skip / ``stats.h`` of an ``x`` (read in place, never copied).

    An ndarray of ``x``'s shape and (native) dtype, aligned, in the kernel's memory order.
    """
    return (
        isinstance(a, np.ndarray)
        and a.shape == tuple(shape)
        and a.dtype == native_dtype(dtype)
        and a.flags.aligned
        and in_kernel_order(a, need_cl)
    )


def writable_like_x(a, shape, dtype, need_cl):
    """Whether ``a`` is usable as an output (``out``, ``sum_out``) of an ``x``."""
    return like_x_ok(a, shape, dtype, need_cl) and a.flags.writeable


def fresh_like_x(values, need_cl):
    """A new array holding ``values`` in the kernel's memory order."""
    return cl_view(values) if need_cl else np.array(values, copy=True, order="C")


def same_memory(a, b):
    """Whether two contiguous arrays are exactly the same memory (in place, not a partial overlap)."""
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.nbytes == b.nbytes


def overlapping_pair(values_a, values_b, need_cl):
    """Two arrays in the kernel's order whose memory overlaps but for one element (``b`` one further).

    ``a`` holds ``values_a``; ``b``'s values are whatever ``values_b`` leaves after ``a`` is written
    (``b`` is meant as an output, or as a second input read as it is).
    """
    shape = values_a.shape
    kshape = np.moveaxis(np.empty(shape, np.int8), 1, -1).shape if need_cl else shape
    buf = np.zeros(values_a.size + 1, values_a.dtype)
    a, b = buf[:-1].reshape(kshape), buf[1:].reshape(kshape)
    if need_cl:
        a, b = np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1)
    if values_b is not None:
        b[...] = values_b
    a[...] = values_a
    return a, b


def draw_like_x(
    d, call, name, values, arrays, shape, dtype, need_cl, *, allow_none=False, out_checked=True, keep=()
):
    """A residual / skip / ``stats.h`` argument holding ``values`` (``x``'s shape and dtype).

    ``arrays`` holds the call's ``x`` and ``out`` (this may replace them: the argument may be ``out``
    itself, partly overlap ``out`` -- a mutation naming ``out`` -- or share memory with ``x``).
    Whether the argument is valid is decided by :func:`like_x_ok` on what was built, not by the mode:
    e.g. a Fortran-ordered 1-D array is C-contiguous.  ``out_checked=False``: the pass does not check
    ``out`` against this argument (the backward reads the residual before writing ``dx``), so no
    partial overlap is drawn.  ``out`` is not used as the argument when it shares memory with one of
    ``keep`` (e.g. ``out=dy``: its values must stay).  Returns ``(argument, float64 values)``, the
    values None when the argument is invalid or None.
    """
    good = ["c", "c", "readonly", "x", "out", "shares-x"] + (["none", "none"] if allow_none else [])
    bad = ["shape", "dtype", "bigendian", "strided", "order", "misaligned", "list", "broadcast"]
    bad.append("partial-out")
    mode = call.choose(d, name, good, bad, f"{name} mode")
    pattern = rf"\b{re.escape(name)}\b" if "." not in name else re.escape(name)
    native = native_dtype(dtype)
    values = np.asarray(values, native)
    x, out = arrays["x"], arrays.get("out")
    out_usable = out is not None and writable_like_x(out, shape, dtype, need_cl)
    x_usable = like_x_ok(x, shape, dtype, need_cl)
    if mode == "none":
        return None, None
    if mode == "x" and not x_usable:
        mode = "c"
    if mode == "out" and not (out is None or out_usable):
        mode = "c"
    if mode == "out" and out is not None and any(np.shares_memory(out, a) for a in keep if a is not None):
        mode = "c"
    x_apart = out is None or not np.shares_memory(out, x)
    if mode == "shares-x" and not (x_usable and x.size >= 2 and x_apart):
        mode = "c"
    if mode == "partial-out" and not (out_checked and values.size >= 2 and (out is None or out_usable)):
        mode = "shape"
    if mode == "c":
        arg = fresh_like_x(values, need_cl)
    elif mode == "readonly":
        arg = fresh_like_x(values, need_cl)
        arg.flags.writeable = False
    elif mode == "x":
        arg = x
    elif mode == "out":
        if out is None:
            out = arrays["out"] = fresh_like_x(values, need_cl)
        elif out is not x:
            out[...] = values
        arg = out
    elif mode == "shares-x":
        # x and the argument in one buffer, one element apart: two inputs may overlap
        new_x, arg = overlapping_pair(np.asarray(x), values, need_cl)
        arrays["x"] = new_x
    elif mode == "partial-out":
        arg, new_out = overlapping_pair(values, None, need_cl)
        arrays["out"] = new_out
        call.bad(f"out partly overlaps {name}", r"\bout\b")
    elif mode == "shape":
        bad_shape = d(st.sampled_from([tuple(shape) + (1,), (shape[0] + 1, *shape[1:]), ()]))
        arg = np.zeros(bad_shape, native)
    elif mode == "dtype":
        extra = [np.dtype(np.int64), np.dtype(np.complex128), np.dtype(np.bool_)]
        arg = values.astype(d(st.sampled_from(other_dtypes(dtype, extra))))
    elif mode == "bigendian":
        arg = values.astype(native.newbyteorder(">"))
    elif mode == "strided":
        big = np.zeros(values.shape[:-1] + (2 * values.shape[-1],), native)
        big[..., ::2] = values
        arg = big[..., ::2]
    elif mode == "order":
        if need_cl:
            arg = np.array(values, order="C")
        elif values.ndim > 2 and d(st.booleans(), label=f"{name} channels-last memory"):
            arg = cl_view(values)
        else:
            arg = np.asfortranarray(values)
    elif mode == "misaligned":  # in the kernel's order: only the alignment is wrong
        kshape = np.moveaxis(values, 1, -1).shape if need_cl else values.shape
        arg = np.ndarray(kshape, native, buffer=np.zeros(values.nbytes + 1, np.uint8), offset=1)
        arg = np.moveaxis(arg, -1, 1) if need_cl else arg
        arg[...] = values
    elif mode == "list":
        arg = values.tolist()
    else:  # broadcast: zero strides along one axis (read-only, never contiguous when that axis is > 1)
        axis = d(st.integers(0, values.ndim - 1))
        arg = np.broadcast_to(values.take([0], axis=axis) if values.shape[axis] else values, values.shape)
    ok = like_x_ok(arg, shape, dtype, need_cl)
    event(f"{name}={mode} ({'ok' if ok else 'bad'})")
    if not ok:
        assert mode in bad, f"{name}: a valid mode {mode} built an unusable argument"
        call.bad(f"{name} {mode}", pattern)
        return arg, None
    return arg, np.array(arg, dtype=np.float64)


def draw_sum_out(d, call, arrays, shape, dtype):
    """A ``sum_out=`` argument (LayerNorm / RMSNorm: C order) given ``arrays`` ``x``, ``skip``, ``out``.

    Valid: None, a new buffer, ``x`` or ``skip`` itself.  Invalid: wrong shape / dtype / order,
    read-only, misaligned, a list, ``out`` itself, partly overlapping ``skip``.  The overlap rules
    between the outputs and the inputs are applied afterwards (:func:`overlap_errors`).
    """
    good = ["none", "none", "fresh", "x", "skip"]
    bad = ["wrong-shape", "wrong-dtype", "order", "readonly", "misaligned", "list", "out", "partial"]
    mode = call.choose(d, "sum_out", good, bad, "sum_out")
    native = native_dtype(dtype)
    skip, out = arrays["skip"], arrays.get("out")
    if mode in ("x", "skip") and not writable_like_x(arrays[mode], shape, dtype, False):
        mode = "fresh"
    if mode == "out" and not (out is not None and writable_like_x(out, shape, dtype, False)):
        mode = "wrong-shape"
    if mode == "partial" and not (writable_like_x(skip, shape, dtype, False) and skip.size >= 2):
        mode = "wrong-dtype"
    if mode == "order" and np.empty(shape).T.flags.c_contiguous:
        mode = "readonly"  # no other order for this shape
    sum_out = None
    if mode == "fresh":
        sum_out = np.empty(shape, native)
    elif mode in ("x", "skip", "out"):
        sum_out = arrays[mode]
    elif mode == "partial":
        arrays["skip"], sum_out = overlapping_pair(np.asarray(skip), None, False)
    elif mode == "wrong-shape":
        sum_out = np.empty(tuple(shape) + (1,), native)
    elif mode == "wrong-dtype":
        sum_out = np.empty(shape, d(st.sampled_from(other_dtypes(dtype, [np.dtype(np.int64)]))))
    elif mode == "order":
        sum_out = np.asfortranarray(np.empty(shape, native))
    elif mode == "readonly":
        sum_out = np.empty(shape, native)
        sum_out.flags.writeable = False
    elif mode == "misaligned":
        buf = np.zeros(int(np.prod(shape)) * native.itemsize + 1, np.uint8)
        sum_out = np.ndarray(shape, native, buffer=buf, offset=1)
    elif mode == "list":
        sum_out = np.zeros(shape).tolist()
    if sum_out is not None and not writable_like_x(sum_out, shape, dtype, False):
        call.bad(f"sum_out {mode}", r"\bsum_out\b")
    event(f"sum_out={mode}")
    return sum_out


def overlap_errors(call, writes, reads, shape, dtype, need_cl):
    """Register the documented overlap errors among the outputs ``writes`` and inputs ``reads``.

    Each is ``(name, array or None)``.  An output may be exactly an input (in place) but must not
    partly overlap one, and two outputs must not overlap.  An input that the kernel does not read
    in place (not in kernel order, misaligned, ...: it is copied first) overlaps nothing.
    """
    outs = [(n, a) for n, a in writes if a is not None and writable_like_x(a, shape, dtype, need_cl)]
    ins = [(n, a) for n, a in reads if a is not None and like_x_ok(a, shape, dtype, need_cl)]
    for name, w in outs:
        for other, r in ins:
            if np.shares_memory(w, r) and not same_memory(w, r):
                call.bad(f"{name} partly overlaps {other}", rf"\b{name}\b")
    for (n1, w1), (n2, w2) in itertools.combinations(outs, 2):
        if np.shares_memory(w1, w2):
            call.bad(f"{n1} overlaps {n2}", rf"\b{n1}\b|\b{n2}\b")
