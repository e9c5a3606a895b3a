"""Hypothesis fuzzing of the whole public API (issue 5).

Every generated call goes through one oracle, :func:`_run`:

* it returns a result equal to the float64 reference of ``tests/naive.py`` (shape, dtype and
  memory layout of the output checked too; ``Stats`` of :func:`fastnorm.forward` as well), or
* it raises ``ValueError`` / ``TypeError`` with a non-empty message naming one of the arguments
  the generator made invalid -- never another exception, and never for a call built valid;
* in both cases no input is modified (byte-for-byte snapshots of every array argument), except the
  documented in-place updates: ``out=`` and, in BatchNorm/InstanceNorm training, ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` -- which are compared with hand-computed values when
  the call succeeds and must be untouched when it raised.

A call is built valid (shape, dtype, layout, parameters, ``out``, statistics) and then gets zero to
two *mutations*, each of which is known to make it invalid and names the argument(s) the error
message may mention.  Valid variants that must be accepted (strided, negatively-strided,
channels-last, broadcast, read-only, misaligned and big-endian views; parameters of another real
dtype or as lists; ``out`` equal to the input) are drawn independently of the mutations.  Run-level
tests assert that both valid and rejected calls occurred in a healthy mix.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import warnings

import naive
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastnorm
from fastnorm import NormSpec, Stats

# Hypothesis imports libcst (which warns through mypy_extensions) only when it reports a failure, and
# filterwarnings=error would turn that report into an INTERNALERROR: import it here, warnings ignored.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # libcst not installed: nothing to pre-import
        pass

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # fixed seed: CI runs the same examples every time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

PER_CHANNEL = ("batch_norm", "instance_norm", "group_norm")
TRAILING = ("layer_norm", "rms_norm")
K = {np.dtype(np.float32): 16, np.dtype(np.float64): 64}
MAX_SIZE = 240

COUNTS = collections.Counter()

# Natural errors of valid-looking geometry (training statistics of too-small groups).
NATURAL = r"value per channel|spatial element|0 elements|hold no elements|x\.shape"


# ---------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------


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

    def choose(self, d, slot, good, bad, label):
        """A valid option, or an invalid one when ``slot`` is to be mutated."""
        return d(st.sampled_from(bad if slot in self.slots else good), label=label)

    def bad(self, label, pattern):
        self.invalid.append(pattern)
        event(f"mutation: {label}")


@contextlib.contextmanager
def _quiet():
    """The float64 reference on zero-size groups: NumPy's empty-mean warnings are expected."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def _cl_memory(a):
    """``a`` is a logically (N, C, ...) array with channels-last memory (the no-copy fast path)."""
    return a.ndim > 2 and not a.flags.c_contiguous and np.moveaxis(a, 1, -1).flags.c_contiguous


def _dims(d, rank):
    dims = [d(st.sampled_from([1, 2, 2, 3, 3, 4, 5, 0])) for _ in range(rank)]
    while math.prod(dims) > MAX_SIZE:
        dims[dims.index(max(dims))] -= 1
    return dims


def _view(d, a, name, *, allow_broadcast=True):
    """A view of ``a`` with the same values and an unusual memory layout (always a valid input)."""
    options = ["c", "c", "step", "neg", "fortran", "perm", "readonly", "misaligned", "bigendian"]
    if allow_broadcast:
        options.append("broadcast")
    how = d(st.sampled_from(options), label=f"{name} layout")
    if a.ndim == 0 and how in ("step", "neg", "perm", "broadcast"):
        how = "c"
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


def _cl_view(a):
    """(N, C, ...) values laid out channels-last in memory."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def _x_array(d, values, kind, cl, name):
    if kind in PER_CHANNEL and not cl and values.ndim > 2 and d(st.booleans(), label=f"{name} cl-memory"):
        return _cl_view(values)
    return _view(d, values, name)


def _eps(d, call, kind, group_min):
    """An eps argument; returns (value, eps used by the reference or None when invalid)."""
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
    return eps, (None if eps is None else float(eps))


def _param(d, call, name, shape, dtype, rng):
    """Weight/bias argument: (argument, float64 values the kernel must use or None)."""
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
        value = base.astype(d(st.sampled_from([np.float16, np.float32, np.float64])))
    elif choice == "list" and 0 not in shape:  # a list cannot carry the shape of an empty array
        value = base.astype(dtype).tolist()
    else:
        value = base.astype(dtype)
        if choice == "view":
            value = _view(d, value, name, allow_broadcast=False)
    call.watched[name] = value
    return value, np.asarray(value).astype(dtype).astype(np.float64)


def _out(d, call, x, shape, dtype, kind, cl, *, allow_dy=None):
    """An ``out=`` argument and whether it is valid; may replace ``x`` (partial overlap)."""
    good = ["none", "none", "fresh", "x"] + (["dy"] if allow_dy is not None else [])
    bad = ["wrong-shape", "wrong-dtype", "wrong-order", "readonly", "misaligned", "list", "partial"]
    mode = call.choose(d, "out", good, bad, "out")
    need_cl = kind in PER_CHANNEL and not cl and _cl_memory(x)
    native = _native(dtype)

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
    if mode == "partial" and not (x.size >= 2 and x.shape == tuple(shape) and x.dtype.kind == "f"):
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
        out = np.empty(shape, d(st.sampled_from([np.float32, np.float64, np.int64, np.float16])))
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


def _memory_of(out):
    """A flat view of ``out``'s memory (C-contiguous or channels-last)."""
    flat = np.ravel(out, order="K")
    assert np.shares_memory(flat, out)
    return flat


def _alias_into_out(d, call, out, make_out, targets, avoid):
    """Mutation: rebind one parameter/statistic argument to memory inside ``out``.

    ``targets`` maps a name to ``(values, dtype, pattern-or-None)``; None means the overlap is only
    *allowed* to be rejected (the argument is copied first).  Returns ``(out, name, view)`` or None.
    """
    if "alias" not in call.slots:
        return None
    if not (isinstance(out, np.ndarray) and out.dtype.kind == "f" and out.flags.writeable) or any(
        isinstance(a, np.ndarray) and np.shares_memory(out, a) for a in avoid
    ):
        out = make_out()
    usable = [n for n, (v, _, _) in targets.items() if 0 < np.size(v) <= out.size]
    if not usable:
        return None
    name = d(st.sampled_from(usable), label="aliased argument")
    values, dtype, pattern = targets[name]
    view = _memory_of(out).view(out.dtype)[: np.size(values)].reshape(np.shape(values))
    if view.dtype != np.dtype(dtype):
        return None
    view[...] = values
    if pattern is None:
        call.may_fail.append(r"\bout\b")
    else:
        call.bad(f"out overlaps {name}", pattern)
    return out, name, view


def _running(d, call, channels, *, training, required):
    """running_mean / running_var arguments (and their float64 initial values)."""
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
    if mode == "given-f32":
        rm, rv = rm.astype(np.float32), rv.astype(np.float32)
    if mode == "strided":
        big_m, big_v = np.zeros(2 * channels), np.zeros(2 * channels)
        big_m[::2], big_v[::2] = rm, rv
        rm, rv = big_m[::2], big_v[::2]
    if mode == "readonly":
        rm.flags.writeable = False
        rv.flags.writeable = False
        if training:
            call.bad("running read-only", r"running_mean|running_var")
    call.running = (rm, rv)
    return rm, rv


def _geometry(d, kind, cl):
    """A valid logical shape for ``kind`` (zero-size dims included), and GN's num_groups."""
    if kind in TRAILING:
        k = d(st.integers(1, 3), label="normalized_ndim")
        lead = d(st.integers(0, 6 - k), label="leading rank")
        return tuple(_dims(d, lead + k)), k, None
    spatial = d(st.integers(0, 3), label="spatial rank")
    n = d(st.sampled_from([1, 2, 3, 0]))
    c = d(st.integers(1, 6))
    dims = _dims(d, spatial)
    while n * c * math.prod(dims) > MAX_SIZE:
        dims[dims.index(max(dims))] -= 1
    shape = (n, *dims, c) if cl else (n, c, *dims)
    groups = d(st.sampled_from([g for g in range(1, c + 1) if c % g == 0])) if kind == "group_norm" else None
    return shape, None, groups


def _natural_errors(kind, shape, cl, k, groups, training, functional):
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


def _group_min(kind, shape, cl, k, groups):
    if kind in TRAILING:
        return math.prod(shape[len(shape) - k :])
    n, c = (shape[0], shape[-1]) if cl else shape[:2]
    s = math.prod(shape[1:-1]) if cl else math.prod(shape[2:])
    return {"batch_norm": n * s, "instance_norm": s, "group_norm": (c // (groups or 1)) * s}[kind]


# ---------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------


def _snapshot(call):
    return {
        name: (a.dtype, a.shape, np.array(a, copy=True).tobytes())
        for name, a in call.watched.items()
        if isinstance(a, np.ndarray)
    }


def _unchanged(call, before, skip=()):
    for name, (dtype, shape, data) in before.items():
        if name in skip:
            continue
        a = call.watched[name]
        assert (a.dtype, a.shape) == (dtype, shape) and np.array(a, copy=True).tobytes() == data, (
            f"argument {name} was modified"
        )


def _run(call, fn, check):
    """Run ``fn()`` and apply the oracle; ``check(result)`` verifies a successful call."""
    before = _snapshot(call)
    try:
        result = fn()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        assert msg.strip(), f"{type(exc).__name__} with an empty message"
        patterns = call.invalid + call.may_fail
        assert patterns, f"a valid call was rejected: {type(exc).__name__}: {msg}"
        assert any(re.search(p, msg) for p in patterns), (
            f"{type(exc).__name__}({msg!r}) names none of the invalid arguments {patterns}"
        )
        _unchanged(call, before)
        COUNTS["rejected"] += 1
        event(f"rejected: {type(exc).__name__}")
        return
    assert not call.invalid, f"an invalid call was accepted (expected an error naming {call.invalid})"
    out = call.watched.get("out")
    skip = {"out", "running_mean", "running_var", "num_batches_tracked"}
    if isinstance(out, np.ndarray):
        skip |= {
            name for name, a in call.watched.items() if isinstance(a, np.ndarray) and np.shares_memory(a, out)
        }
    _unchanged(call, before, skip)
    check(result)
    COUNTS["valid"] += 1
    event("valid")


def _check_output(y, x_arg, out, dtype, kind, cl, ref, *, k=None, scale=None, what="y"):
    dtype = _native(dtype)
    assert isinstance(y, np.ndarray) and y.shape == np.shape(x_arg) and y.dtype == dtype, (
        f"{what}: shape/dtype {getattr(y, 'shape', None)} {getattr(y, 'dtype', None)}"
    )
    if isinstance(out, np.ndarray):
        assert y is out, f"{what} is not the out= buffer"
    elif kind in PER_CHANNEL and not cl and _cl_memory(x_arg):
        assert np.moveaxis(y, 1, -1).flags.c_contiguous, f"{what}: channels-last memory not kept"
    else:
        assert y.flags.c_contiguous, f"{what} is not C-contiguous"
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    naive.assert_close(y, ref, dtype=dtype, k=k or K[dtype], scale=scale, err_msg=what)


def _y_scale(values, mean, rstd, w):
    """Size of the terms of y: rounding x - mean costs eps * |x| * rstd * |w| (constant groups)."""

    def top(a):
        return float(np.max(np.abs(a), initial=0.0)) if a is not None else 1.0

    with _quiet():
        return max(1.0, (top(values) + top(mean)) * top(rstd) * top(w))


def _ref_kwargs(kind, eps, cl, k, groups):
    return dict(eps=eps, num_groups=groups, normalized_ndim=k, channels_last=cl and kind in PER_CHANNEL)


def _ref_inference(x, mean, rstd, kind, w, b, cl, k, groups):
    """y = (x - mean) * rstd * w + b with given statistics (float64)."""
    xc = np.moveaxis(x, -1, 1) if cl and kind in PER_CHANNEL else x
    x4, _, stats_shape, pshape = naive._grouped(xc, kind, groups, k)
    if kind == "batch_norm":
        m4, r4 = mean.reshape(1, -1, 1, 1), rstd.reshape(1, -1, 1, 1)
    else:
        m4, r4 = mean.reshape(x4.shape[:2] + (1, 1)), rstd.reshape(x4.shape[:2] + (1, 1))
    y4 = (x4 - m4) * r4
    if w is not None:
        y4 = y4 * w.reshape(pshape)
    if b is not None:
        y4 = y4 + b.reshape(pshape)
    y = y4.reshape(xc.shape)
    return np.moveaxis(y, 1, -1) if cl and kind in PER_CHANNEL else y


def _cf(a, kind, cl):
    return np.moveaxis(a, -1, 1) if cl and kind in PER_CHANNEL else a


# ---------------------------------------------------------------------------
# x and the common mutations
# ---------------------------------------------------------------------------


def _x(d, call, kind, functional, cl_allowed=True):
    """Draw geometry, dtype, values and layout of x; returns a dict describing the problem."""
    cl = kind in PER_CHANNEL and cl_allowed and d(st.booleans(), label="channels_last")
    shape, k, groups = _geometry(d, kind, cl)
    dtype = np.dtype(d(st.sampled_from([np.float32, np.float64]), label="dtype"))
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1), label="seed"))
    values = rng.standard_normal(shape).astype(dtype)
    x = _x_array(d, values, kind, cl, "x")
    values = np.array(x, dtype=dtype)  # broadcast views change the values
    p = dict(cl=cl, shape=shape, k=k, groups=groups, dtype=dtype, rng=rng, values=values, x=x)
    # rank / dtype / channel mutations of x (replace x, keep the rest consistent)
    mutation = call.choose(d, "x", ["none"], ["dtype", "dtype", "rank", "channels0"], "x mutation")
    if mutation == "channels0" and kind in TRAILING:
        mutation = "dtype"
    if mutation == "dtype":
        bad = d(
            st.sampled_from([np.int32, np.int64, np.uint8, np.bool_, np.complex128, np.float16, object, "U4"])
        )
        p["x"] = values.astype(bad)
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


def _group_min_of(p, kind):
    """Smallest group size; 0 when x may have constant groups (broadcast), where eps=0 gives 0/0."""
    x = p["x"]
    if any(s == 0 and n > 1 for s, n in zip(x.strides, x.shape, strict=True)):
        return 0
    return _group_min(kind, p["shape"], p["cl"], p["k"], p["groups"])


# ---------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------


def _channels_last_arg(d, call, p):
    if "channels_last" not in call.slots:
        return p["cl"]
    bad = d(st.sampled_from([1, 0, "yes", None, np.bool_(True)]))
    call.bad(f"channels_last={bad!r}", r"channels_last")
    return bad


def fuzz_functional(d):
    kind = d(st.sampled_from(["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]))
    slots = ["x", "eps", "weight", "out", "channels_last", "alias"]
    slots += {
        "batch_norm": ["bias", "running", "momentum", "num_batches_tracked"],
        "instance_norm": ["bias", "running", "momentum"],
        "group_norm": ["bias", "num_groups"],
        "layer_norm": ["bias", "normalized_shape"],
        "rms_norm": ["normalized_shape"],
    }[kind]
    call = Call(d, slots)
    p = _x(d, call, kind, functional=True)
    cl, shape, k, groups, dtype, rng, values = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values")
    )
    eps, eps_ref = _eps(d, call, kind, _group_min_of(p, kind))
    param_shape = shape[len(shape) - k :] if kind in TRAILING else ((shape[-1] if cl else shape[1]),)
    weight, w = _param(d, call, "weight", param_shape, dtype, rng)
    bias, b = (None, None) if kind == "rms_norm" else _param(d, call, "bias", param_shape, dtype, rng)
    x, out = _out(d, call, p["x"], shape, dtype, kind, cl)
    if x is not p["x"]:
        p["x"] = x
    call.watched.update(x=x, out=out)
    training = True
    momentum = 0.1
    counter = None
    if kind in ("batch_norm", "instance_norm"):
        training = d(st.booleans(), label="training / use_input_stats")
        rm, rv = _running(d, call, param_shape[0], training=training, required=not training)
        call.watched.update(running_mean=rm, running_var=rv)
        good = [0.1, 0.0, 1.0, 0.5, np.float32(0.25), 1] + ([None] if kind == "batch_norm" else [])
        bad = [-0.1, 1.5, float("nan"), "0.1", True] + ([None] if kind == "instance_norm" else [])
        momentum = call.choose(d, "momentum", good, bad, "momentum")
        if training and (
            (momentum is None and kind == "instance_norm")
            or (momentum is not None and (isinstance(momentum, (bool, str)) or not 0 <= momentum <= 1))
        ):
            call.bad(f"momentum={momentum!r}", r"momentum")
        if kind == "batch_norm":
            modes = ["none", "int64", "int32-1", "float", "shape2", "readonly", "negative", "at-max"]
            counter = call.choose(d, "num_batches_tracked", modes[:3], modes[3:], "num_batches_tracked")
            if counter == "none" and momentum is None and call.running is not None and training:
                if "num_batches_tracked" not in call.slots:
                    counter = "int64"
            counter = _counter(call, counter, training)
            if training and momentum is None and call.running is not None and counter is None:
                call.bad("momentum=None needs num_batches_tracked", r"num_batches_tracked")
            call.counter = counter
            call.watched["num_batches_tracked"] = counter
    targets = {"weight": (w if w is not None else np.ones(param_shape), dtype, r"\bout\b")}
    if kind not in ("rms_norm",):
        targets["bias"] = (b if b is not None else np.zeros(param_shape), dtype, r"\bout\b")
    if kind in ("batch_norm", "instance_norm") and call.running is not None:
        pattern = r"\bout\b" if training else None
        targets["running_mean"] = (np.asarray(call.running[0], np.float64), dtype, pattern)
    aliased = _alias_into_out(d, call, out, call.fresh_out, targets, [x])
    if aliased is not None:
        out, name, view = aliased
        call.watched["out"] = out
        if name == "weight":
            weight, w = view, view.astype(np.float64)
        elif name == "bias":
            bias, b = view, view.astype(np.float64)
        else:
            rm = view
            call.running = (rm, rv)
        call.watched[name] = view
    cl_arg = _channels_last_arg(d, call, p) if kind in PER_CHANNEL else None
    degenerate = _natural_errors(kind, shape, cl, k, groups, training, functional=True)
    if degenerate:
        call.may_fail.append(NATURAL + r"|normalized_shape")
        if not call.invalid:
            call.invalid.append(NATURAL + r"|normalized_shape")  # must raise
    normalized_shape = None
    if kind in TRAILING:
        normalized_shape = tuple(shape[len(shape) - k :])
        how = call.choose(
            d,
            "normalized_shape",
            ["tuple", "tuple", "list", "int"],
            ["wrong", "empty", "bad-entry"],
            "normalized_shape",
        )
        if how == "list":
            normalized_shape = list(normalized_shape)
        elif how == "int" and k == 1:
            normalized_shape = normalized_shape[0]
        elif how == "wrong":
            normalized_shape = (normalized_shape[0] + 1,) + normalized_shape[1:]
            call.bad("normalized_shape mismatch", r"normalized_shape")
        elif how == "empty":
            normalized_shape = ()
            call.bad("normalized_shape empty", r"normalized_shape")
        elif how == "bad-entry":
            normalized_shape = normalized_shape[:-1] + (d(st.sampled_from([0, -1, 2.0, True, "3"])),)
            call.bad("normalized_shape entry", r"normalized_shape")
    if kind == "group_norm":
        how = call.choose(
            d,
            "num_groups",
            ["ok", "ok", "npint"],
            ["non-divisor", "zero", "negative", "bool", "float"],
            "num_groups",
        )
        c = shape[-1] if cl else shape[1]
        if how == "non-divisor":
            nd = [g for g in range(2, 2 * c + 2) if c % g]
            groups_arg = d(st.sampled_from(nd))
            if p["x"].ndim >= 2:
                call.bad("num_groups does not divide C", r"num_groups")
            else:
                call.bad("num_groups does not divide C", r"num_groups|x\.shape")
        elif how == "npint":
            groups_arg = np.int64(groups)
        elif how == "ok":
            groups_arg = groups
        else:
            groups_arg = {"zero": 0, "negative": -groups, "bool": True, "float": float(groups)}[how]
            call.bad(f"num_groups={groups_arg!r}", r"num_groups")

    def fn():
        if kind == "batch_norm":
            kw = {} if counter is None else {"num_batches_tracked": counter}
            return fastnorm.batch_norm(
                x, rm, rv, weight, bias, training, momentum, eps, channels_last=cl_arg, out=out, **kw
            )
        if kind == "instance_norm":
            return fastnorm.instance_norm(
                x, rm, rv, weight, bias, training, momentum, eps, channels_last=cl_arg, out=out
            )
        if kind == "group_norm":
            return fastnorm.group_norm(x, groups_arg, weight, bias, eps, channels_last=cl_arg, out=out)
        if kind == "layer_norm":
            return fastnorm.layer_norm(x, normalized_shape, weight, bias, eps, out=out)
        return fastnorm.rms_norm(x, normalized_shape, weight, eps, out=out)

    counter_before = None if counter is None else int(counter.reshape(-1)[0])
    running_before = None if call.running is None else tuple(np.array(a, np.float64) for a in call.running)

    def check(y):
        ref_kw = _ref_kwargs(kind, eps_ref, cl, k, groups)
        if kind in ("batch_norm", "instance_norm") and not training:
            rmean, rvar = running_before
            rstd = 1.0 / np.sqrt(rvar + eps_ref)
            ref = _ref_inference(values.astype(np.float64), rmean, rstd, "batch_norm", w, b, cl, None, None)
            scale = _y_scale(values, rmean, rstd, w)
            for a, old in zip(call.running, running_before, strict=True):
                if isinstance(out, np.ndarray) and np.shares_memory(a, out):
                    continue  # running_mean inside out (copied before out was written): out wins
                np.testing.assert_array_equal(np.asarray(a, np.float64), old, err_msg="running stats changed")
            if counter is not None:
                assert int(counter.reshape(-1)[0]) == counter_before, "counter changed in inference"
        else:
            with _quiet():
                ref, ref_mean, ref_rstd = naive.forward(values, kind, w, b, **ref_kw)
            scale = _y_scale(values, ref_mean, ref_rstd, w)
        _check_output(y, x, out, dtype, kind, cl, ref, scale=scale)
        if kind not in ("batch_norm", "instance_norm") or not training:
            return
        _check_running(call, kind, values, cl, momentum, counter_before, running_before)

    event(f"functional {kind}")
    _run(call, fn, check)


def _counter(call, mode, training):
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


def _check_running(call, kind, values, cl, momentum, counter_before, running_before):
    counter = call.counter
    new_count = None
    if counter is not None:
        new_count = counter_before + 1
        assert int(counter.reshape(-1)[0]) == new_count, "num_batches_tracked not incremented by 1"
    if call.running is None:
        return
    xc = _cf(values.astype(np.float64), kind, cl)
    n, c = xc.shape[:2]
    if kind == "batch_norm":
        axes = (0,) + tuple(range(2, xc.ndim))
        m = xc.size // c
        mean, var = xc.mean(axis=axes), xc.var(axis=axes) * (m / (m - 1))
    else:
        if n == 0:
            for a, old in zip(call.running, running_before, strict=True):
                np.testing.assert_array_equal(np.asarray(a, np.float64), old)
            return
        flat = xc.reshape(n, c, -1)
        m = flat.shape[-1]
        mean = flat.mean(axis=-1).mean(axis=0)
        var = (flat.var(axis=-1) * (m / (m - 1))).mean(axis=0)
    factor = float(momentum) if momentum is not None else 1.0 / new_count
    for name, a, old, batch in zip(
        ("running_mean", "running_var"), call.running, running_before, (mean, var), strict=True
    ):
        expected = (1.0 - factor) * old + factor * batch
        naive.assert_close(
            a, expected, dtype=a.dtype, k=64, scale=max(1.0, float(np.abs(expected).max())), err_msg=name
        )


# ---------------------------------------------------------------------------
# explicit passes: NormSpec constructors, forward, forward_inference, backward
# ---------------------------------------------------------------------------


def _spec(d, call, kind, p, eps):
    """Build the spec the way a user would, sometimes with invalid constructor arguments."""
    cl, k, groups = p["cl"], p["k"], p["groups"]
    how = call.choose(d, "spec", ["ok"], ["bad-field", "bad-kind", "not-a-spec", "bad-int"], "spec")
    if how == "not-a-spec":
        call.bad("spec is not a NormSpec", r"\bspec\b")
        return lambda: kind
    if how == "bad-kind":
        call.bad("unknown kind", r"\bkind\b")
        return lambda: NormSpec(kind.replace("_norm", "norm"), eps)
    if how == "bad-field":
        if kind in TRAILING:
            field = d(st.sampled_from(["channels_last", "num_groups"]))
            call.bad(f"{field} for {kind}", field)
            if field == "channels_last":
                return lambda: NormSpec(kind, eps, normalized_ndim=k, channels_last=True)
            return lambda: NormSpec(kind, eps, num_groups=2, normalized_ndim=k)
        other = "num_groups" if kind != "group_norm" else "channels_last"
        field = d(st.sampled_from(["normalized_ndim", other]))
        call.bad(f"{field} for {kind}", field)
        if field == "normalized_ndim":
            return lambda: NormSpec(kind, eps, num_groups=groups, normalized_ndim=1, channels_last=cl)
        if field == "channels_last":
            return lambda: NormSpec(kind, eps, num_groups=groups, channels_last="no")
        return lambda: NormSpec(kind, eps, num_groups=3, channels_last=cl)
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
    if kind == "batch_norm":
        return lambda: NormSpec.batch_norm(eps, cl)
    if kind == "instance_norm":
        return lambda: NormSpec.instance_norm(eps=eps, channels_last=cl)
    if kind == "group_norm":
        return lambda: NormSpec.group_norm(groups, eps, channels_last=cl)
    if kind == "layer_norm":
        return lambda: NormSpec.layer_norm(k, eps)
    return lambda: NormSpec.rms_norm(k, eps=eps)


def _stats_arg(d, call, ref_mean, ref_rstd, has_bias, inference):
    # backward needs the exact statistics of x (its formula assumes them); inference takes any
    good = ["ok", "ok"] + (["list"] if ref_mean.size else []) + (["f32"] if inference else [])
    how = call.choose(d, "stats", good, ["tuple", "bad-shape", "int", "complex"], "stats")
    if how == "tuple":
        call.bad("stats is a tuple", r"\bstats\b")
        return (ref_mean, ref_rstd), ref_mean, ref_rstd
    if how == "bad-shape":
        call.bad("stats shape", r"\bstats\b")
        return Stats(ref_mean.reshape(-1)[:-1] if ref_mean.size else np.zeros(1), ref_rstd), None, None
    if how == "int":
        call.bad("stats dtype", r"\bstats\b")
        return Stats(ref_mean.astype(np.int64), ref_rstd), None, None
    if how == "complex":
        call.bad("stats dtype", r"\bstats\b")
        return Stats(ref_mean, ref_rstd.astype(np.complex128)), None, None
    if how == "f32":
        m, r = ref_mean.astype(np.float32), ref_rstd.astype(np.float32)
        return Stats(m, r, has_bias), m.astype(np.float64), r.astype(np.float64)
    if how == "list":
        return Stats(ref_mean.tolist(), ref_rstd.tolist(), has_bias), ref_mean, ref_rstd
    return Stats(ref_mean.copy(), ref_rstd.copy(), has_bias), ref_mean, ref_rstd


def fuzz_explicit(d):
    kind = d(st.sampled_from(["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]))
    api = d(st.sampled_from(["forward", "forward_inference", "backward"]))
    slots = ["x", "eps", "weight", "out", "spec", "alias"]
    slots += {"forward": ["bias"], "forward_inference": ["bias", "stats"], "backward": ["stats", "dy"]}[api]
    call = Call(d, slots)
    p = _x(d, call, kind, functional=False)
    cl, shape, k, groups, dtype, rng, values = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values")
    )
    training = api != "forward_inference"
    eps, eps_ref = _eps(d, call, kind, _group_min_of(p, kind))
    make_spec = _spec(d, call, kind, p, eps)
    param_shape = shape[len(shape) - k :] if kind in TRAILING else ((shape[-1] if cl else shape[1]),)
    weight, w = _param(d, call, "weight", param_shape, dtype, rng)
    bias, b = (None, None) if api == "backward" else _param(d, call, "bias", param_shape, dtype, rng)
    if _natural_errors(kind, shape, cl, k, groups, training, functional=False):
        call.may_fail.append(NATURAL)
        if not call.invalid:
            call.invalid.append(NATURAL)
    # reference statistics for the stats argument (valid geometry only)
    ref_ok = eps_ref is not None or kind == "rms_norm"
    ref_eps = eps_ref if eps_ref is not None else (None if kind == "rms_norm" else 1e-5)
    if ref_ok and not _natural_errors(kind, shape, cl, k, groups, True, functional=False):
        with _quiet():
            ry, rmean, rrstd = naive.forward(values, kind, w, b, **_ref_kwargs(kind, ref_eps, cl, k, groups))
    else:
        stats_shape = _stats_shape(kind, shape, cl, k, groups)
        ry, rmean, rrstd = None, np.zeros(stats_shape), np.ones(stats_shape)
    dy = dyl = None
    if api == "backward":
        dyl = rng.standard_normal(shape).astype(dtype)
        dy_mut = call.choose(d, "dy", ["ok"], ["shape", "dtype", "other-float"], "dy")
        if dy_mut == "shape":
            dy = np.zeros(tuple(shape) + (1,), dtype)
            call.bad("dy shape", r"\bdy\b")
        elif dy_mut == "dtype":
            dy = dyl.astype(d(st.sampled_from([np.int64, np.complex64, np.float16, object])))
            call.bad("dy dtype", r"dy\.dtype")
        elif dy_mut == "other-float":
            dy = dyl.astype(np.float64 if dtype == np.float32 else np.float32)
            call.bad("dy dtype mismatch", r"dy\.dtype")
        else:
            dy = _x_array(d, dyl, kind, cl, "dy")
            dyl = np.array(dy, dtype=dtype)
    x, out = _out(d, call, p["x"], shape, dtype, kind, cl, allow_dy=dy if api == "backward" else None)
    if x is not p["x"]:
        p["x"] = x
    call.watched.update(x=x, out=out, dy=dy)
    stats = None
    if api != "forward":
        has_bias = b is not None if api != "backward" else d(st.booleans(), label="stats.has_bias")
        stats, smean, srstd = _stats_arg(d, call, rmean, rrstd, has_bias, api == "forward_inference")
        if isinstance(stats, Stats):
            call.watched.update(stats_mean=stats.mean, stats_rstd=stats.rstd)
    with_bias = d(st.sampled_from([None, True, False]), label="with_bias") if api == "backward" else None
    targets = {"weight": (w if w is not None else np.ones(param_shape), dtype, r"\bout\b")}
    if api == "forward":
        targets["bias"] = (b if b is not None else np.zeros(param_shape), dtype, r"\bout\b")
    if isinstance(stats, Stats) and smean is not None and isinstance(stats.mean, np.ndarray):
        targets["stats.mean"] = (smean, np.float64, r"\bout\b")
    aliased = _alias_into_out(d, call, out, call.fresh_out, targets, [x, dy])
    if aliased is not None:
        out, name, view = aliased
        call.watched["out"] = out
        if name == "weight":
            weight, w = view, view.astype(np.float64)
        elif name == "bias":
            bias, b = view, view.astype(np.float64)
        else:
            stats = Stats(view, stats.rstd, stats.has_bias)
            call.watched["stats_mean"] = view
        call.watched[name] = view

    def fn():
        spec = make_spec()
        if api == "forward":
            return fastnorm.forward(x, spec, weight, bias, out=out)
        if api == "forward_inference":
            return fastnorm.forward_inference(x, stats, spec, weight, bias, out=out)
        return fastnorm.backward(dy, x, stats, spec, weight, with_bias=with_bias, out=out)

    def check(result):
        ref_kw = _ref_kwargs(kind, eps_ref, cl, k, groups)
        if api == "forward":
            y, st_ = result
            _check_output(y, x, out, dtype, kind, cl, ry, scale=_y_scale(values, rmean, rrstd, w))
            assert isinstance(st_, Stats) and st_.has_bias == (bias is not None)
            for name, got, want in (("mean", st_.mean, rmean), ("rstd", st_.rstd, rrstd)):
                assert got.dtype == np.float64 and got.shape == want.shape, f"stats.{name} shape/dtype"
            naive.assert_close(
                st_.mean,
                rmean,
                dtype=np.float64,
                k=256,
                scale=max(1.0, float(np.max(np.abs(values), initial=0.0))),
                err_msg="mean",
            )
            naive.assert_close(st_.rstd, rrstd, dtype=np.float64, k=256, atol=0.0, err_msg="rstd")
            return
        if api == "forward_inference":
            ref = _ref_inference(values.astype(np.float64), smean, srstd, kind, w, b, cl, k, groups)
            _check_output(result, x, out, dtype, kind, cl, ref, scale=_y_scale(values, smean, srstd, w))
            return
        dx, dw, db = result
        with _quiet():
            rdx, rdw, rdb, scale = naive.backward(dyl, values, kind, w, return_scale=True, **ref_kw)
        _check_output(
            dx,
            x,
            out,
            dtype,
            kind,
            cl,
            rdx,
            scale=max(1.0, scale, float(np.max(np.abs(rdx), initial=0))),
            what="dx",
        )
        pscale = max(1.0, float(np.abs(dyl).sum()))
        wants_bias = stats.has_bias if with_bias is None else with_bias
        grads = (("dweight", dw, rdw, weight is not None), ("dbias", db, rdb, wants_bias))
        for name, got, want, present in grads:
            if not present:
                assert got is None, f"{name} returned but not requested"
                continue
            assert got.shape == tuple(param_shape) and got.dtype == dtype, f"{name} shape/dtype"
            naive.assert_close(got, want, dtype=dtype, k=K[dtype], scale=pscale, err_msg=name)

    event(f"explicit {api} {kind}")
    _run(call, fn, check)


def _stats_shape(kind, shape, cl, k, groups):
    if kind in TRAILING:
        return tuple(shape[: len(shape) - k])
    n, c = (shape[0], shape[-1]) if cl else shape[:2]
    return {"batch_norm": (c,), "instance_norm": (n, c), "group_norm": (n, groups)}[kind]


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------


@FUZZ
@given(st.data())
def _fuzz_functional(data):
    fuzz_functional(data.draw)


@FUZZ
@given(st.data())
def _fuzz_explicit(data):
    fuzz_explicit(data.draw)


def _mix(run):
    COUNTS.clear()
    run()
    valid, rejected = COUNTS["valid"], COUNTS["rejected"]
    total = valid + rejected
    assert total > 0
    # both kinds of call occur, and neither dominates: the fuzzer proves something about each
    assert valid >= 0.25 * total and rejected >= 0.25 * total, dict(COUNTS)


def test_fuzz_functional_api():
    _mix(_fuzz_functional)


def test_fuzz_explicit_passes_and_specs():
    _mix(_fuzz_explicit)
