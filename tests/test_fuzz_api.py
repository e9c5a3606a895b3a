"""Hypothesis fuzzing of the whole public API (issue 5), the fused epilogue and the skip add included.

Every generated call goes through one oracle, :func:`_run`:

* it returns a result equal to the float64 reference of ``tests/naive.py`` (shape, dtype and
  memory layout of the output checked too; ``Stats`` of :func:`fastnorm.forward` as well), or
* it raises ``ValueError`` / ``TypeError`` with a non-empty message naming one of the arguments
  the generator made invalid -- never another exception, and never for a call built valid;
* in both cases no input is modified (byte-for-byte snapshots of every array argument), except the
  documented in-place updates: ``out=``, ``sum_out=`` and, in BatchNorm/InstanceNorm training,
  ``running_mean``, ``running_var`` and ``num_batches_tracked`` -- which are compared with
  hand-computed values when the call succeeds and must be untouched when it raised.

A call is built valid (shape, dtype, layout, parameters, ``out``, statistics) and then gets zero to
two *mutations*, each of which is known to make it invalid and names the argument(s) the error
message may mention.  Valid variants that must be accepted (strided, negatively-strided,
channels-last, broadcast, read-only, misaligned and big-endian views; parameters of another real
dtype or as lists; ``out`` equal to the input) are drawn independently of the mutations.  Run-level
tests assert that both valid and rejected calls occurred in a healthy mix.  The generator (:class:`Call`
and the ``draw_*`` builders) lives in ``tests/strategies.py``; the oracle and the tests live here.

The fused epilogue ``y = act(norm(x) * weight + bias + residual)`` and the pre-norm skip add
``h = x + skip (+ skip_bias)``, ``y = norm(h)`` have their own two tests
(:func:`fuzz_epilogue_functional`, :func:`fuzz_epilogue_explicit`), through the same oracle:

* the arguments: ``residual``, ``activation`` and ``negative_slope`` of the five norm functions and
  of every ``NormSpec`` constructor (and ``NormSpec(...)`` itself); ``skip_layer_norm`` /
  ``skip_rms_norm`` (``skip``, ``skip_bias``, ``out``, ``sum_out``); ``forward(residual= | skip=,
  skip_bias=, sum_out=)``, ``forward_inference(residual=)`` and ``backward(bias=, residual=)``
  after a fused forward or a skip add (``Stats`` with ``has_residual``, ``h``, ``has_skip_bias``);
* the results: ``y`` (every activation, float32 tolerances scaled by the size of z's terms), ``h``
  (bitwise the sum rounded to x's dtype), the statistics, ``dx``, ``dweight``, ``dbias``,
  ``dresidual`` (``dy`` itself without an activation), ``dskip`` (``dx`` itself) and ``dskip_bias``;
  at a ReLU kink within rounding of 0 the derivative's side is the library's own ``z``;
* the mutations: unknown activations and ones of another type; a ``negative_slope`` that is not a
  finite real number; a residual / skip / ``stats.h`` of another shape, dtype (big-endian too) or
  memory order, misaligned, broadcast or a list; ``out`` partly overlapping the residual; a skip
  with BatchNorm/InstanceNorm/GroupNorm or with a residual, ``skip_bias`` or ``sum_out`` without a
  skip; an unusable ``sum_out`` (read-only, wrong shape/dtype/order, misaligned, ``out`` itself,
  partly overlapping ``x`` or ``skip``); ``out`` / ``sum_out`` holding the weight, bias or skip
  bias; with an activation, a backward whose ``bias`` / ``residual`` disagree with the forward's;
* the valid variants: ``out`` (and ``sum_out``) equal to ``x``, the residual or ``skip``; a
  residual that is ``x`` or partly overlaps it; read-only residuals and skips; no residual.

16-bit storage (docs/api.md, "16-bit storage"): about one call in four draws ``float16`` or
ml_dtypes' ``bfloat16`` data, in every test.  ``dy``, the residual, ``skip``, ``stats.h``, ``out``
and ``sum_out`` then have that dtype (another float dtype, the other 16-bit one included, is a
mutation); the parameters are float32, the data dtype or another real dtype (read as float32, as
the reference reads them); running statistics float32 or the data dtype.  The oracle knows the
rules: an activation raises a ``ValueError`` naming ``activation``; ``y`` / ``dx`` / ``h`` have x's
dtype, ``dweight`` / ``dbias`` float32 or the data dtype when the weight is given in it,
``dskip_bias`` float32, ``Stats`` float64; ``rms_norm(eps=None)`` uses float32's epsilon; ``h`` is
the float32 sum rounded once; results are within ``K`` (2) ulps of the 16-bit format of the float64
reference, relative to the scale of their terms (see ``K``).  ``COUNTS`` counts the 16-bit calls.
"""

from __future__ import annotations

import collections
import contextlib
import math
import warnings

import naive
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from strategies import (
    BF16,
    F16,
    NATURAL,
    PER_CHANNEL,
    TRAILING,
    Call,
    assert_names,
    assert_unchanged,
    counter_arg,
    draw_alias_into_out,
    draw_channels_last,
    draw_epilogue,
    draw_eps,
    draw_like_x,
    draw_out,
    draw_param,
    draw_running,
    draw_spec,
    draw_stats,
    draw_sum_out,
    draw_x,
    draw_x_array,
    fresh_like_x,
    group_min_of,
    is_cl_memory,
    is_half,
    native_dtype,
    natural_errors,
    other_dtypes,
    overlap_errors,
    param_dtype,
    snapshot,
)

import fastnorm
from fastnorm import NormSpec, Stats

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # fixed seed: CI runs the same examples every time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# Tolerances: |result - float64 reference| <= K * eps(dtype) * (scale + |reference|), ``scale`` the size
# of the terms the result is computed from (``_y_scale``, ``_z_scale``, ...).  16-bit data is computed
# in float32 and rounded once (docs/api.md): within one ulp of the rounded reference, 1.5 ulp of the
# reference, i.e. 1.5 * eps(16-bit) * |reference| (ulp(v) <= eps * |v|, and eps * scale >= one
# subnormal ulp as scale >= 1), plus float32's error of the terms, which K[float32] * eps(float32)
# = 2**-19 (times scale) bounds far below one 16-bit eps (2**-10 float16, 2**-7 bfloat16).  So 2 ulps
# of the 16-bit format relative to scale (and to |reference|) hold everywhere with margin.
K = {np.dtype(np.float32): 16, np.dtype(np.float64): 64, F16: 2, BF16: 2}
#: Running statistics stored in a 16-bit dtype: the float64 update rounded once (k ulps of their scale).
K_RUNNING_16 = 2

COUNTS = collections.Counter()

# KNOWN_BUGS: library bugs the generator steers around (the oracle stays strict), until they are fixed:
# none at present.  Add one here with the steer, and remove both with the fix.


# ---------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """The float64 reference on zero-size groups: NumPy's empty-mean warnings are expected."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ---------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------


def _run(call, fn, check):
    """Run ``fn()`` and apply the oracle; ``check(result)`` verifies a successful call.

    A rejection gets the checks of :func:`strategies.rejected` (its parts: whether the call may raise
    is known only after it ran).
    """
    before = snapshot(call.watched)
    half = call.dtype is not None and is_half(call.dtype)
    try:
        result = fn()
    except (ValueError, TypeError) as exc:
        patterns = call.invalid + call.may_fail
        assert patterns, f"a valid call was rejected: {type(exc).__name__}: {exc}"
        assert_names(exc, patterns)
        assert_unchanged(before, call.watched)
        COUNTS["rejected"] += 1
        COUNTS["16-bit rejected"] += half
        event(f"rejected: {type(exc).__name__}")
        return
    assert not call.invalid, f"an invalid call was accepted (expected an error naming {call.invalid})"
    skip = {"out", "sum_out", "running_mean", "running_var", "num_batches_tracked"}
    for written in (call.watched.get("out"), call.watched.get("sum_out")):
        if isinstance(written, np.ndarray):
            skip |= {
                name
                for name, a in call.watched.items()
                if isinstance(a, np.ndarray) and np.shares_memory(a, written)
            }
    assert_unchanged(before, call.watched, skip=skip)
    check(result)
    COUNTS["valid"] += 1
    COUNTS["16-bit valid"] += half
    event("valid")


def _check_output(y, x_arg, out, dtype, kind, cl, ref, *, k=None, scale=None, what="y"):
    dtype = native_dtype(dtype)
    assert isinstance(y, np.ndarray) and y.shape == np.shape(x_arg) and y.dtype == dtype, (
        f"{what}: shape/dtype {getattr(y, 'shape', None)} {getattr(y, 'dtype', None)}"
    )
    if isinstance(out, np.ndarray):
        assert y is out, f"{what} is not the out= buffer"
    elif kind in PER_CHANNEL and not cl and is_cl_memory(x_arg):
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


def _watch_backward_weight(call, weight):
    """Watch the backward's weight array (it must come back unmodified); returns it."""
    if isinstance(weight, np.ndarray):
        call.watched["weight"] = weight
    return weight


def _draw_problem(d, call, kind, functional):
    """x (:func:`strategies.draw_x`), then eps (:func:`strategies.draw_eps`); and the parameters' shape.

    Returns ``(p, eps, eps_ref)``: ``p`` is draw_x's dict with ``param_shape`` added.
    """
    p = draw_x(d, call, kind, functional=functional)
    eps, eps_ref = draw_eps(d, call, kind, group_min_of(p, kind), p["dtype"])
    shape, k = p["shape"], p["k"]
    if kind in TRAILING:
        p["param_shape"] = tuple(shape[len(shape) - k :])
    else:
        p["param_shape"] = (shape[-1] if p["cl"] else shape[1],)
    return p, eps, eps_ref


def _grad_dtype(dtype, weight):
    """dweight's and dbias's dtype: x's; for 16-bit data float32, or x's when ``weight`` is of x's dtype."""
    if not is_half(dtype):
        return native_dtype(dtype)
    given = isinstance(weight, np.ndarray) and native_dtype(weight.dtype) == native_dtype(dtype)
    return native_dtype(dtype) if given else np.dtype(np.float32)


def _half_activation(d, call, dtype, epi, act):
    """An activation with 16-bit data raises a ValueError naming it (docs/api.md): ``(epi, act)``.

    Two in three such calls drop the activation instead (``activation=None``), so that most 16-bit
    calls of the epilogue tests reach the kernels.
    """
    if act is None or "activation" in call.slots or not is_half(dtype):
        return epi, act
    if d(st.sampled_from([False, False, True]), label="16-bit data keeps the activation"):
        call.bad(f"activation={act!r} with {np.dtype(dtype).name} data", r"\bactivation\b")
        return epi, act
    return {**epi, "activation": None}, None


# ---------------------------------------------------------------------------
# x and the common mutations
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------


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
    p, eps, eps_ref = _draw_problem(d, call, kind, functional=True)
    cl, shape, k, groups, dtype, rng, values, param_shape = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values", "param_shape")
    )
    weight, w = draw_param(d, call, "weight", param_shape, dtype, rng)
    bias, b = (None, None) if kind == "rms_norm" else draw_param(d, call, "bias", param_shape, dtype, rng)
    x, out = draw_out(d, call, p["x"], shape, dtype, kind, cl)
    if x is not p["x"]:
        p["x"] = x
    call.watched.update(x=x, out=out)
    training = True
    momentum = 0.1
    counter = None
    if kind in ("batch_norm", "instance_norm"):
        training = d(st.booleans(), label="training / use_input_stats")
        rm, rv = draw_running(d, call, param_shape[0], training=training, required=not training, dtype=dtype)
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
            counter = counter_arg(call, counter, training)
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
    aliased = draw_alias_into_out(d, call, out, call.fresh_out, targets, [x])
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
    cl_arg = draw_channels_last(d, call, p) if kind in PER_CHANNEL else None
    degenerate = natural_errors(kind, shape, cl, k, groups, training, functional=True)
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
            _check_running_unchanged(call, out, running_before)
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


def _check_running_unchanged(call, out, running_before):
    """Inference: the running statistics are read, never written."""
    for a, old in zip(call.running, running_before, strict=True):
        if isinstance(out, np.ndarray) and np.shares_memory(a, out):
            continue  # running_mean inside out (copied before out was written): out wins
        np.testing.assert_array_equal(np.asarray(a, np.float64), old, err_msg="running stats changed")


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
        k = K_RUNNING_16 if is_half(a.dtype) else 64
        naive.assert_close(
            a, expected, dtype=a.dtype, k=k, scale=max(1.0, float(np.abs(expected).max())), err_msg=name
        )


# ---------------------------------------------------------------------------
# explicit passes: NormSpec constructors, forward, forward_inference, backward
# ---------------------------------------------------------------------------


def fuzz_explicit(d):
    kind = d(st.sampled_from(["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]))
    api = d(st.sampled_from(["forward", "forward_inference", "backward"]))
    slots = ["x", "eps", "weight", "out", "spec", "alias"]
    slots += {"forward": ["bias"], "forward_inference": ["bias", "stats"], "backward": ["stats", "dy"]}[api]
    call = Call(d, slots)
    p, eps, eps_ref = _draw_problem(d, call, kind, functional=False)
    cl, shape, k, groups, dtype, rng, values, param_shape = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values", "param_shape")
    )
    training = api != "forward_inference"
    make_spec = draw_spec(d, call, kind, p, eps)
    weight, w = draw_param(d, call, "weight", param_shape, dtype, rng)
    bias, b = (None, None) if api == "backward" else draw_param(d, call, "bias", param_shape, dtype, rng)
    if natural_errors(kind, shape, cl, k, groups, training, functional=False):
        call.may_fail.append(NATURAL)
        if not call.invalid:
            call.invalid.append(NATURAL)
    # reference statistics for the stats argument (valid geometry only)
    ref_ok = eps_ref is not None or kind == "rms_norm"
    ref_eps = eps_ref if eps_ref is not None else (None if kind == "rms_norm" else 1e-5)
    if ref_ok and not natural_errors(kind, shape, cl, k, groups, True, functional=False):
        with _quiet():
            ry, rmean, rrstd = naive.forward(values, kind, w, b, **_ref_kwargs(kind, ref_eps, cl, k, groups))
    else:
        stats_shape = _stats_shape(kind, shape, cl, k, groups)
        ry, rmean, rrstd = None, np.zeros(stats_shape), np.ones(stats_shape)
    dy = dyl = None
    if api == "backward":
        dy, dyl = _draw_dy(d, call, rng, shape, dtype, kind, cl)
    x, out = draw_out(d, call, p["x"], shape, dtype, kind, cl, allow_dy=dy if api == "backward" else None)
    if x is not p["x"]:
        p["x"] = x
    call.watched.update(x=x, out=out, dy=dy)
    stats = None
    if api != "forward":
        has_bias = b is not None if api != "backward" else d(st.booleans(), label="stats.has_bias")
        stats, smean, srstd = draw_stats(d, call, rmean, rrstd, has_bias, api == "forward_inference")
        if isinstance(stats, Stats):
            call.watched.update(stats_mean=stats.mean, stats_rstd=stats.rstd)
    with_bias = d(st.sampled_from([None, True, False]), label="with_bias") if api == "backward" else None
    targets = {"weight": (w if w is not None else np.ones(param_shape), dtype, r"\bout\b")}
    if api == "forward":
        targets["bias"] = (b if b is not None else np.zeros(param_shape), dtype, r"\bout\b")
    if isinstance(stats, Stats) and smean is not None and isinstance(stats.mean, np.ndarray):
        targets["stats.mean"] = (smean, np.float64, r"\bout\b")
    aliased = draw_alias_into_out(d, call, out, call.fresh_out, targets, [x, dy])
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
    if api == "backward":
        weight = _watch_backward_weight(call, weight)

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
            _check_stats(st_, rmean, rrstd, values)
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
        pscale = max(1.0, float(np.abs(dyl.astype(np.float64)).sum()))
        wants_bias = stats.has_bias if with_bias is None else with_bias
        grads = (("dweight", dw, rdw, weight is not None), ("dbias", db, rdb, wants_bias))
        gdtype = _grad_dtype(dtype, weight)
        for name, got, want, present in grads:
            if not present:
                assert got is None, f"{name} returned but not requested"
                continue
            assert got.shape == tuple(param_shape) and got.dtype == gdtype, f"{name} shape/dtype {got.dtype}"
            naive.assert_close(got, want, dtype=gdtype, k=K[gdtype], scale=pscale, err_msg=name)

    event(f"explicit {api} {kind}")
    _run(call, fn, check)


def _draw_dy(d, call, rng, shape, dtype, kind, cl):
    """The backward's dy argument, and its values in x's dtype (None when invalid)."""
    dyl = rng.standard_normal(shape).astype(dtype)
    dy_mut = call.choose(d, "dy", ["ok"], ["shape", "dtype", "other-float"], "dy")
    if dy_mut == "shape":
        call.bad("dy shape", r"\bdy\b")
        return np.zeros(tuple(shape) + (1,), dtype), dyl
    if dy_mut == "dtype":
        call.bad("dy dtype", r"dy\.dtype")
        bad = [np.int64, np.complex64, object, *(t for t in (F16, BF16) if t != dtype)]
        return dyl.astype(d(st.sampled_from(bad))), dyl
    if dy_mut == "other-float":
        call.bad("dy dtype mismatch", r"dy\.dtype")
        if is_half(dtype):  # the other 16-bit dtype, or a float32 / float64 dy
            return dyl.astype(d(st.sampled_from(other_dtypes(dtype)))), dyl
        return dyl.astype(np.float64 if dtype == np.float32 else np.float32), dyl
    dy = draw_x_array(d, dyl, kind, cl, "dy")
    return dy, np.array(dy, dtype=dtype)


def _check_stats(st_, rmean, rrstd, values):
    """The float64 statistics of a training forward against the reference of ``values``."""
    for name, got, want in (("mean", st_.mean, rmean), ("rstd", st_.rstd, rrstd)):
        assert got.dtype == np.float64 and got.shape == want.shape, f"stats.{name} shape/dtype"
    # 16-bit data sum each block in float32 (docs/guarantees.md; the bounds of test_half.py)
    sums, k_mean, k_rstd = (np.float32, 8, 32) if is_half(values.dtype) else (np.float64, 256, 256)
    naive.assert_close(
        st_.mean,
        rmean,
        dtype=sums,
        k=k_mean,
        scale=max(1.0, float(np.max(np.abs(values), initial=0.0))),
        err_msg="mean",
    )
    naive.assert_close(st_.rstd, rrstd, dtype=sums, k=k_rstd, atol=0.0, err_msg="rstd")


def _stats_shape(kind, shape, cl, k, groups):
    if kind in TRAILING:
        return tuple(shape[: len(shape) - k])
    n, c = (shape[0], shape[-1]) if cl else shape[:2]
    return {"batch_norm": (c,), "instance_norm": (n, c), "group_norm": (n, groups)}[kind]


# ---------------------------------------------------------------------------
# the fused epilogue (residual, activation, negative_slope) and the pre-norm skip add
# ---------------------------------------------------------------------------


# Known library bugs the generator steers around (the oracle stays strict; see the report of the
# epilogue fuzzing):
# * forward(x, spec, skip=...) with a spec that is not a NormSpec raises AttributeError, not TypeError;
# * backward(..., out=dy) without an activation returns grads.dresidual = dy, which then holds dx;
# * skip_layer_norm / skip_rms_norm(x, None, ...) are accepted and return h = None.
def _top(a):
    """max |a| (0 for None or an empty array)."""
    return 0.0 if a is None else float(np.max(np.abs(np.asarray(a, np.float64)), initial=0.0))


def _act_bounds(act, slope):
    """``(lip, curved)``: a bound on |act'|, and 1 when act' varies (then z's error moves it)."""
    if act == "leaky_relu":
        return max(1.0, abs(slope)), 0.0
    if act in (None, "relu"):
        return 1.0, 0.0
    return 1.2, 1.0  # |gelu'| <= 1.13; |act''| <= 0.8 for sigmoid, tanh, silu, gelu, gelu_tanh


def _z_scale(values, mean, rstd, w, b, r):
    """Size of the terms of z = norm(x) * w + b + residual (its absolute error is eps times this)."""
    return _y_scale(values, mean, rstd, w) + _top(b) + _top(r)


def _ref_fused_backward(dyl, xr, kind, w, b, r, act, slope, ref_kw, dtype, zscale, library_z):
    """Float64 ``(dx, dweight, dbias, dz, scale)`` of the fused backward (``naive``'s formulas).

    At a ReLU / leaky-ReLU kink (``|z|`` within z's rounding of 0, e.g. the exact 0 of a constant
    group) either side is right; there the side is the one of the library's own ``z``
    (``library_z()``, the inference pass without activation, which the backward recomputes).
    """
    with _quiet():
        _, z, _, _ = naive.fused_forward(xr, kind, w, b, residual=r, act=act, slope=slope, **ref_kw)
        if act in ("relu", "leaky_relu"):
            kink = np.abs(z) <= K[np.dtype(dtype)] * np.finfo(dtype).eps * zscale
            if kink.any():
                event("activation kink")
                z = np.where(kink, library_z(), z)
        dz = np.asarray(dyl, np.float64) * naive.activation_grad(z, act, slope)
        dx, dw, db, scale = naive.backward(dz, xr, kind, w, return_scale=True, **ref_kw)
    return dx, dw, db, dz, scale


def _plain_spec(kind, eps, cl, k, groups):
    """The spec of a call without its epilogue."""
    return NormSpec(
        kind,
        eps,
        num_groups=groups if kind == "group_norm" else None,
        normalized_ndim=k if kind in TRAILING else None,
        channels_last=cl if kind in PER_CHANNEL else False,
    )


def fuzz_epilogue_functional(d):
    kind = d(st.sampled_from([*naive.KINDS, "skip_layer_norm", "skip_rms_norm"]))
    if kind.startswith("skip_"):
        _fuzz_skip_functional(d, kind.removeprefix("skip_"))
    else:
        _fuzz_functional_epilogue(d, kind)


def _fuzz_functional_epilogue(d, kind):
    """``<norm>(..., residual=, activation=, negative_slope=, out=)``."""
    slots = ["x", "eps", "weight", "out", "residual", "activation", "negative_slope"]
    slots += ["bias"] if kind != "rms_norm" else []
    call = Call(d, slots)
    epi, act, slope = draw_epilogue(d, call)
    p, eps, eps_ref = _draw_problem(d, call, kind, functional=True)
    cl, shape, k, groups, dtype, rng, values, param_shape = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values", "param_shape")
    )
    epi, act = _half_activation(d, call, dtype, epi, act)
    weight, w = draw_param(d, call, "weight", param_shape, dtype, rng)
    bias, b = (None, None) if kind == "rms_norm" else draw_param(d, call, "bias", param_shape, dtype, rng)
    x, out = draw_out(d, call, p["x"], shape, dtype, kind, cl)
    need_cl = kind in PER_CHANNEL and not cl and is_cl_memory(x)
    arrays = {"x": x, "out": out}
    r_values = rng.standard_normal(shape).astype(dtype)
    residual, r = draw_like_x(d, call, "residual", r_values, arrays, shape, dtype, need_cl, allow_none=True)
    x, out = arrays["x"], arrays["out"]
    overlap_errors(call, [("out", out)], [("x", x), ("residual", residual)], shape, dtype, need_cl)
    call.watched.update(x=x, out=out, residual=residual)
    training = True
    rm = rv = None
    if kind in ("batch_norm", "instance_norm"):
        training = d(st.booleans(), label="training / use_input_stats")
        rm, rv = draw_running(d, call, param_shape[0], training=training, required=not training, dtype=dtype)
        call.watched.update(running_mean=rm, running_var=rv)
    if natural_errors(kind, shape, cl, k, groups, training, functional=True):
        call.may_fail.append(NATURAL + r"|normalized_shape")
        if not call.invalid:
            call.invalid.append(NATURAL + r"|normalized_shape")  # must raise
    tail = tuple(shape[len(shape) - k :]) if kind in TRAILING else None
    running_before = None if call.running is None else tuple(np.array(a, np.float64) for a in call.running)

    def fn():
        kw = dict(residual=residual, out=out, **epi)
        if kind == "batch_norm":
            return fastnorm.batch_norm(x, rm, rv, weight, bias, training, 0.1, eps, channels_last=cl, **kw)
        if kind == "instance_norm":
            return fastnorm.instance_norm(x, rm, rv, weight, bias, training, 0.1, eps, channels_last=cl, **kw)
        if kind == "group_norm":
            return fastnorm.group_norm(x, groups, weight, bias, eps, channels_last=cl, **kw)
        if kind == "layer_norm":
            return fastnorm.layer_norm(x, tail, weight, bias, eps, **kw)
        return fastnorm.rms_norm(x, tail, weight, eps, **kw)

    def check(y):
        with _quiet():
            if not training:  # BatchNorm / InstanceNorm from the running statistics
                mean, var = running_before
                rstd = 1.0 / np.sqrt(var + eps_ref)
                z = _ref_inference(values.astype(np.float64), mean, rstd, "batch_norm", w, b, cl, None, None)
                z = z if r is None else z + r
            else:
                ref_kw = _ref_kwargs(kind, eps_ref, cl, k, groups)
                _, z, mean, rstd = naive.fused_forward(values, kind, w, b, residual=r, **ref_kw)
            ref = naive.activation(z, act, slope)
        lip, _ = _act_bounds(act, slope)
        scale = _z_scale(values, mean, rstd, w, b, r) * lip
        _check_output(y, x, out, dtype, kind, cl, ref, scale=scale)
        if kind in ("batch_norm", "instance_norm") and call.running is not None:
            if training:
                _check_running(call, kind, values, cl, 0.1, None, running_before)
            else:
                _check_running_unchanged(call, out, running_before)

    event(f"epilogue functional {kind}")
    _run(call, fn, check)


def _fuzz_skip_functional(d, kind):
    """``skip_layer_norm`` / ``skip_rms_norm(x, skip, ..., skip_bias=, out=, sum_out=)`` -> ``(y, h)``."""
    slots = ["x", "eps", "weight", "out", "skip", "skip_bias", "sum_out", "alias"]
    slots += ["bias"] if kind == "layer_norm" else []
    call = Call(d, slots)
    p, eps, eps_ref = _draw_problem(d, call, kind, functional=True)
    shape, k, dtype, rng, values, param_shape = (
        p[n] for n in ("shape", "k", "dtype", "rng", "values", "param_shape")
    )
    weight, w = draw_param(d, call, "weight", param_shape, dtype, rng)
    bias, b = (None, None) if kind == "rms_norm" else draw_param(d, call, "bias", param_shape, dtype, rng)
    skip_bias, sb = draw_param(d, call, "skip_bias", param_shape, dtype, rng)
    x, out = draw_out(d, call, p["x"], shape, dtype, kind, False)
    arrays = {"x": x, "out": out}
    skip_values = rng.standard_normal(shape).astype(dtype)
    skip, s = draw_like_x(d, call, "skip", skip_values, arrays, shape, dtype, False)
    if "skip" in call.slots and d(st.booleans(), label="skip=None"):
        skip = s = None
        call.bad("skip=None", r"\bskip\b")
    arrays["skip"] = skip
    sum_out = draw_sum_out(d, call, arrays, shape, dtype)
    x, out, skip = arrays["x"], arrays["out"], arrays["skip"]
    sum_out, out, named = _draw_skip_alias(d, call, x, skip, out, sum_out, shape, dtype, w, b, sb)
    weight, bias, skip_bias = (
        named.get(n, a) for n, a in (("weight", weight), ("bias", bias), ("skip_bias", skip_bias))
    )
    writes = [("sum_out", sum_out), ("out", out)]
    overlap_errors(call, writes, [("x", x), ("skip", skip)], shape, dtype, False)
    call.watched.update(x=x, out=out, skip=skip, sum_out=sum_out)
    call.watched.update({n: a for n, a in named.items()})
    if natural_errors(kind, shape, False, k, None, True, functional=True):
        call.may_fail.append(NATURAL + r"|normalized_shape")
        if not call.invalid:
            call.invalid.append(NATURAL + r"|normalized_shape")
    tail = param_shape

    def fn():
        kw = dict(skip_bias=skip_bias, out=out, sum_out=sum_out)
        if kind == "layer_norm":
            return fastnorm.skip_layer_norm(x, skip, tail, weight, bias, eps, **kw)
        return fastnorm.skip_rms_norm(x, skip, tail, weight, eps, **kw)

    h_ref = None if s is None else _skip_sum(values, s, sb, dtype)

    def check(result):
        y, h = result
        _check_skip_forward(y, h, x, out, sum_out, h_ref, kind, w, b, eps_ref, k, dtype)

    event(f"epilogue functional skip_{kind}")
    _run(call, fn, check)


def _skip_sum(values, s, sb, dtype):
    """h = x + skip (+ skip_bias), rounded in x's dtype as the library computes it.

    16-bit data: ``(x + skip) + skip_bias`` in float32 (the compute dtype; skip_bias is read as
    float32), rounded once to x's dtype.
    """
    if is_half(dtype):
        h = np.asarray(values, dtype).astype(np.float32) + np.asarray(s, dtype).astype(np.float32)
        h = h if sb is None else h + np.asarray(sb).astype(np.float32)
        return h.astype(dtype)
    h = np.asarray(values, dtype) + np.asarray(s).astype(dtype)
    return h if sb is None else h + np.asarray(sb).astype(dtype)


def _check_skip_forward(y, h, x, out, sum_out, h_ref, kind, w, b, eps_ref, k, dtype, act=None, slope=0.01):
    """y = act(norm(h) * w + b) and h (bitwise the sum in x's dtype) of a pre-norm skip add."""
    with _quiet():
        ref_y, _, mean, rstd = naive.fused_forward(
            h_ref, kind, w, b, eps=eps_ref, act=act, slope=slope, normalized_ndim=k
        )
    scale = _z_scale(h_ref, mean, rstd, w, b, None) * _act_bounds(act, slope)[0]
    _check_output(y, x, out, dtype, kind, False, ref_y, scale=scale)
    _check_output(h, x, sum_out, dtype, kind, False, h_ref, what="h")
    assert h.tobytes() == h_ref.tobytes(), "h is not the sum x + skip (+ skip_bias) rounded to x's dtype"
    return mean, rstd


def _draw_skip_alias(d, call, x, skip, out, sum_out, shape, dtype, w, b, sb):
    """Mutation: weight, bias or skip_bias inside the memory of ``out`` or ``sum_out``.

    Returns ``(sum_out, out, {rebound name: view})``.
    """
    if "alias" not in call.slots:
        return sum_out, out, {}
    which = d(st.sampled_from(["out", "sum_out"]), label="output holding a parameter")
    buffer, other = (out, sum_out) if which == "out" else (sum_out, out)
    pattern = rf"\b{which}\b"
    targets = {"skip_bias": (sb, dtype, pattern), "weight": (w, dtype, pattern), "bias": (b, dtype, pattern)}
    targets = {n: t for n, t in targets.items() if t[0] is not None}

    def fresh():
        return np.empty(shape, native_dtype(dtype))

    aliased = draw_alias_into_out(d, call, buffer, fresh, targets, [x, skip, other])
    if aliased is None:
        return sum_out, out, {}
    buffer, name, view = aliased
    if which == "out":
        return sum_out, buffer, {name: view}
    return buffer, out, {name: view}


def fuzz_epilogue_explicit(d):
    """The epilogue's explicit passes: ``NormSpec(activation=, negative_slope=)``, ``forward(residual=
    | skip=, skip_bias=, sum_out=)``, ``forward_inference(residual=)`` and ``backward(bias=,
    residual=)`` after a fused forward or a skip add."""
    kind = d(st.sampled_from(naive.KINDS))
    api = d(st.sampled_from(["forward", "forward_inference", "backward"]))
    with_skip = api != "forward_inference" and kind in TRAILING and d(st.booleans(), label="skip add")
    slots = ["x", "eps", "weight", "out", "spec", "activation", "negative_slope"]
    if api == "forward":
        slots += ["bias", "combo"] + (
            ["skip", "skip_bias", "sum_out", "alias"] if with_skip else ["residual"]
        )
    elif api == "forward_inference":
        slots += ["bias", "stats", "residual"]
    else:
        slots += ["stats", "dy", "bias", "presence"] + (["stats.h"] if with_skip else ["residual"])
    call = Call(d, slots)
    epi, act, slope = draw_epilogue(d, call)
    p, eps, eps_ref = _draw_problem(d, call, kind, functional=False)
    cl, shape, k, groups, dtype, rng, values, param_shape = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values", "param_shape")
    )
    epi, act = _half_activation(d, call, dtype, epi, act)
    act_set = act is not None or "activation" in call.slots
    if api == "backward" and not act_set:
        # without an activation the backward reads neither bias nor residual: no errors to expect
        call.slots -= {"bias", "residual", "presence"}
    training = api != "forward_inference"
    weight, w = draw_param(d, call, "weight", param_shape, dtype, rng)
    bias, b = draw_param(d, call, "bias", param_shape, dtype, rng)
    # the mutations that combine the skip add with what it excludes
    combo = None
    if "combo" in call.slots:
        if with_skip:
            combo = "skip+residual"
        else:
            other = "skip+residual" if kind in TRAILING else "skip-of-" + kind
            combo = d(st.sampled_from([other, "skip_bias-alone", "sum_out-alone"]), label="combination")
    make_spec = draw_spec(d, call, kind, p, eps, epilogue=epi, allow_not_a_spec=True)
    if natural_errors(kind, shape, cl, k, groups, training, functional=False):
        call.may_fail.append(NATURAL)
        if not call.invalid:
            call.invalid.append(NATURAL)
    dy = dyl = None
    if api == "backward":
        dy, dyl = _draw_dy(d, call, rng, shape, dtype, kind, cl)
    # the forward's residual / skip add: what the backward's statistics record
    has_residual = not with_skip and (api != "backward" or d(st.booleans(), label="forward had a residual"))
    skip_bias, sb = (None, None)
    if with_skip:
        skip_bias, sb = draw_param(d, call, "skip_bias", param_shape, dtype, rng)
    x, out = draw_out(
        d,
        call,
        p["x"],
        shape,
        dtype,
        kind,
        cl,
        allow_dy=dy if api == "backward" else None,
        x_is_read=not (with_skip and api == "backward"),
    )
    need_cl = kind in PER_CHANNEL and not cl and is_cl_memory(x)
    arrays = {"x": x, "out": out}
    residual = r = skip = s = sum_out = h_arg = h_ref = None
    if has_residual:
        r_values = rng.standard_normal(shape).astype(dtype)
        residual, r = draw_like_x(
            d,
            call,
            "residual",
            r_values,
            arrays,
            shape,
            dtype,
            need_cl,
            allow_none=api != "backward",
            out_checked=api != "backward",
            keep=[dy],
        )
        if api == "backward" and not act_set and d(st.booleans(), label="residual left out"):
            residual = None  # not read without an activation
    if with_skip:
        skip_values = rng.standard_normal(shape).astype(dtype)
        if api == "forward":
            skip, s = draw_like_x(d, call, "skip", skip_values, arrays, shape, dtype, False)
            arrays["skip"] = skip
            sum_out = draw_sum_out(d, call, arrays, shape, dtype)
            skip = arrays["skip"]
        else:  # the backward reads stats.h, the forward's sum
            h_values = _skip_sum(values, skip_values, sb, dtype)
            h_arg, h_ref = draw_like_x(d, call, "stats.h", h_values, arrays, shape, dtype, False, keep=[dy])
            if h_ref is not None:
                h_ref = h_ref.astype(dtype)
    x, out = arrays["x"], arrays["out"]
    named = {}
    if api == "forward" and with_skip:
        sum_out, out, named = _draw_skip_alias(d, call, x, skip, out, sum_out, shape, dtype, w, b, sb)
        weight = named.get("weight", weight)
        bias = named.get("bias", bias)
        skip_bias = named.get("skip_bias", skip_bias)
        overlap_errors(
            call, [("sum_out", sum_out), ("out", out)], [("x", x), ("skip", skip)], shape, dtype, False
        )
    elif api == "backward":
        reads = [("x", x if h_arg is None else h_arg), ("dy", dy)]
        overlap_errors(call, [("out", out)], reads, shape, dtype, need_cl)
    else:
        overlap_errors(call, [("out", out)], [("x", x), ("residual", residual)], shape, dtype, need_cl)
    if combo is not None:
        extra = fresh_like_x(np.zeros(shape, dtype), need_cl)
        if combo == "skip_bias-alone":
            skip_bias = np.ones(param_shape, dtype)
            call.bad("skip_bias without skip", r"skip_bias")
        elif combo == "sum_out-alone":
            sum_out = extra
            call.bad("sum_out without skip", r"sum_out")
        elif combo == "skip+residual":
            if with_skip:
                residual = extra
            else:
                skip = extra
                if residual is None:
                    residual = fresh_like_x(np.zeros(shape, dtype), need_cl)
            call.bad("skip with residual", r"\bskip\b|\bresidual\b")
        else:
            skip = extra
            call.bad(f"skip with {kind}", r"\bskip\b")
    call.watched.update(x=x, out=out, dy=dy, residual=residual, skip=skip, sum_out=sum_out, h=h_arg)
    call.watched.update({n: a for n, a in named.items()})
    call.watched.update(skip_bias=skip_bias)
    # reference statistics of what is normalized: x, or h after a skip add
    xr = values
    if with_skip:
        xr = h_ref if h_ref is not None else (None if s is None else _skip_sum(values, s, sb, dtype))
    ref_kw = _ref_kwargs(kind, eps_ref, cl, k, groups)
    ref_eps = eps_ref if eps_ref is not None else (None if kind == "rms_norm" else 1e-5)
    geometry_ok = not natural_errors(kind, shape, cl, k, groups, True, functional=False)
    if xr is not None and (eps_ref is not None or kind == "rms_norm") and geometry_ok:
        with _quiet():
            _, rmean, rrstd = naive.forward(xr, kind, **_ref_kwargs(kind, ref_eps, cl, k, groups))
    else:
        stats_shape = _stats_shape(kind, shape, cl, k, groups)
        rmean, rrstd = np.zeros(stats_shape), np.ones(stats_shape)
    stats = smean = srstd = None
    with_bias = None
    if api == "forward_inference":
        stats, smean, srstd = draw_stats(d, call, rmean, rrstd, bias is not None, True)
    elif api == "backward":
        stats_bias, stats_residual = bias is not None, has_residual
        if "presence" in call.slots:  # the backward's bias / residual disagree with the forward's
            flip = d(st.sampled_from(["bias", "residual"]), label="presence mismatch")
            if flip == "bias":
                stats_bias = not stats_bias
                call.bad("bias presence differs from the forward's", r"\bbias\b")
            elif with_skip:
                residual = fresh_like_x(np.zeros(shape, dtype), need_cl)
                call.watched["residual"] = residual
                call.bad("residual after a skip add", r"\bresidual\b")
            else:
                stats_residual = not stats_residual
                call.bad("residual presence differs from the forward's", r"\bresidual\b")
        fields = dict(has_residual=stats_residual, h=h_arg, has_skip_bias=sb is not None)
        stats, smean, srstd = draw_stats(d, call, rmean, rrstd, stats_bias, False, **fields)
        with_bias = d(st.sampled_from([None, True, False]), label="with_bias")
    if isinstance(stats, Stats):
        call.watched.update(stats_mean=stats.mean, stats_rstd=stats.rstd)
    lip, curved = _act_bounds(act, slope)
    spell_out = api == "forward" and d(st.booleans(), label="pass skip=None etc.")
    if api == "backward":
        weight = _watch_backward_weight(call, weight)

    def fn():
        spec = make_spec()
        if api == "forward":
            kw = dict(residual=residual, out=out)
            if skip is not None or skip_bias is not None or sum_out is not None or spell_out:
                kw.update(skip=skip, skip_bias=skip_bias, sum_out=sum_out)
            return fastnorm.forward(x, spec, weight, bias, **kw)
        if api == "forward_inference":
            return fastnorm.forward_inference(x, stats, spec, weight, bias, residual=residual, out=out)
        return fastnorm.backward(
            dy, x, stats, spec, weight, bias=bias, residual=residual, with_bias=with_bias, out=out
        )

    def check(result):
        if api == "forward":
            y, st_ = result
            assert isinstance(st_, Stats), "forward returns Stats"
            assert st_.has_bias == (bias is not None), "stats.has_bias"
            assert st_.has_residual == (residual is not None), "stats.has_residual"
            assert st_.has_skip_bias == (skip_bias is not None), "stats.has_skip_bias"
            if with_skip:
                mean, rstd = _check_skip_forward(
                    y, st_.h, x, out, sum_out, xr, kind, w, b, eps_ref, k, dtype, act, slope
                )
                _check_stats(st_, mean, rstd, xr)
                return
            assert st_.h is None, "stats.h without a skip"
            with _quiet():
                ry, _, mean, rstd = naive.fused_forward(
                    values, kind, w, b, residual=r, act=act, slope=slope, **ref_kw
                )
            _check_output(y, x, out, dtype, kind, cl, ry, scale=_z_scale(values, mean, rstd, w, b, r) * lip)
            _check_stats(st_, mean, rstd, values)
            return
        if api == "forward_inference":
            with _quiet():
                z = _ref_inference(values.astype(np.float64), smean, srstd, kind, w, b, cl, k, groups)
                ref = naive.activation(z if r is None else z + r, act, slope)
            scale = _z_scale(values, smean, srstd, w, b, r) * lip
            _check_output(result, x, out, dtype, kind, cl, ref, scale=scale)
            return
        _check_backward(result)

    def _check_backward(grads):
        assert isinstance(grads, fastnorm.Gradients) and len(grads) == 3, "backward returns Gradients"
        dx, dw, db = grads
        assert grads.dx is dx and grads.dweight is dw and grads.dbias is db
        b_used = b if act is not None else None
        r_used = r if (act is not None and residual is not None) else None
        zscale = _z_scale(xr, smean, srstd, w, b_used, r_used)

        def library_z():
            plain = _plain_spec(kind, ref_eps, cl, k, groups)
            x_c = fresh_like_x(np.asarray(xr, dtype), need_cl)
            r_c = None if r_used is None else fresh_like_x(np.asarray(r_used, dtype), need_cl)
            w_c = None if w is None else w.astype(param_dtype(dtype))
            b_c = None if b_used is None else b_used.astype(param_dtype(dtype))
            z = fastnorm.forward_inference(x_c, Stats(smean, srstd), plain, w_c, b_c, residual=r_c)
            return z.astype(np.float64)

        rdx, rdw, rdb, rdz, nscale = _ref_fused_backward(
            dyl, xr, kind, w, b_used, r_used, act, slope, ref_kw, dtype, zscale, library_z
        )
        dy_top = _top(dyl)
        dz_scale = max(1.0, dy_top * (lip + curved * zscale))
        # z's error moves act'(z): dx gets rstd * w times that error of dz
        extra = _top(srstd) * (_top(w) if w is not None else 1.0) * dy_top * curved * zscale
        dx_scale = max(1.0, nscale, _top(rdx), extra)
        _check_output(dx, x, out, dtype, kind, cl, rdx, scale=dx_scale, what="dx")
        pscale = max(1.0, float(np.abs(dyl.astype(np.float64)).sum()) * (lip + curved * zscale))
        wants_bias = stats.has_bias if with_bias is None else with_bias
        gdtype = _grad_dtype(dtype, weight)
        for name, got, want, present in (
            ("dweight", dw, rdw, weight is not None),
            ("dbias", db, rdb, wants_bias),
        ):
            if not present:
                assert got is None, f"{name} returned but not requested"
                continue
            assert got.shape == tuple(param_shape) and got.dtype == gdtype, f"{name} shape/dtype {got.dtype}"
            naive.assert_close(got, want, dtype=gdtype, k=K[gdtype], scale=pscale, err_msg=name)
        if stats.has_residual:
            dres = grads.dresidual
            if act is None:  # dy itself
                assert isinstance(dres, np.ndarray) and dres.dtype == native_dtype(dtype), "dresidual dtype"
                np.testing.assert_array_equal(dres, dyl, err_msg="dresidual is not dy")
                if out is dy:  # dx overwrote dy: dresidual is a copy of it, taken before
                    assert dres is not dy and not np.shares_memory(dres, dy), "dresidual is out=dy"
                elif type(dy) is np.ndarray and dy.dtype == native_dtype(dtype):
                    assert dres is dy, "without an activation dresidual is dy itself"
            else:
                _check_output(dres, x, None, dtype, kind, cl, rdz, scale=dz_scale, what="dresidual")
        else:
            assert grads.dresidual is None, "dresidual without a residual"
        if not with_skip:
            assert grads.dskip is None and grads.dskip_bias is None, "dskip without a skip add"
            return
        assert grads.dskip is dx, "dskip is dx"
        if sb is None:
            assert grads.dskip_bias is None, "dskip_bias without a skip bias"
            return
        dsb = grads.dskip_bias
        assert dsb.shape == tuple(param_shape) and dsb.dtype == param_dtype(dtype), "dskip_bias shape/dtype"
        rows = math.prod(shape[: len(shape) - k])
        want = rdx.reshape(rows, *param_shape).sum(axis=0)
        # the column sums of dx (for 16-bit data of the rounded dx: x's eps, not float32's)
        naive.assert_close(
            dsb, want, dtype=dtype, k=K[dtype], scale=max(1.0, rows * dx_scale), err_msg="dskip_bias"
        )

    event(f"epilogue explicit {api} {kind}{' skip' if with_skip else ''}")
    _run(call, fn, check)


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


EPILOGUE_FUZZ = settings(FUZZ, max_examples=4000)


@EPILOGUE_FUZZ
@given(st.data())
def _fuzz_epilogue_functional(data):
    fuzz_epilogue_functional(data.draw)


@EPILOGUE_FUZZ
@given(st.data())
def _fuzz_epilogue_explicit(data):
    fuzz_epilogue_explicit(data.draw)


def _mix(run):
    COUNTS.clear()
    run()
    valid, rejected = COUNTS["valid"], COUNTS["rejected"]
    total = valid + rejected
    assert total > 0
    # both kinds of call occur, and neither dominates: the fuzzer proves something about each
    assert valid >= 0.25 * total and rejected >= 0.25 * total, dict(COUNTS)
    # a minority of the calls store their data in 16 bits, valid and rejected ones
    half_valid, half_rejected = COUNTS["16-bit valid"], COUNTS["16-bit rejected"]
    half = half_valid + half_rejected
    assert 0.1 * total <= half <= 0.5 * total, dict(COUNTS)
    assert half_valid >= 0.25 * half and half_rejected >= 0.25 * half, dict(COUNTS)


def test_fuzz_functional_api():
    _mix(_fuzz_functional)


def test_fuzz_explicit_passes_and_specs():
    _mix(_fuzz_explicit)


def test_fuzz_epilogue_functional():
    _mix(_fuzz_epilogue_functional)


def test_fuzz_epilogue_explicit():
    _mix(_fuzz_epilogue_explicit)
