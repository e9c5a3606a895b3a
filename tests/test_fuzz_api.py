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
tests assert that both valid and rejected calls occurred in a healthy mix.  The generator (:class:`Call`
and the ``draw_*`` builders) lives in ``tests/strategies.py``; the oracle and the tests live here.
"""

from __future__ import annotations

import collections
import contextlib
import warnings

import naive
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from strategies import (
    NATURAL,
    PER_CHANNEL,
    TRAILING,
    Call,
    assert_names,
    assert_unchanged,
    counter_arg,
    draw_alias_into_out,
    draw_channels_last,
    draw_eps,
    draw_out,
    draw_param,
    draw_running,
    draw_spec,
    draw_stats,
    draw_x,
    draw_x_array,
    group_min_of,
    is_cl_memory,
    native_dtype,
    natural_errors,
    snapshot,
)

import fastnorm
from fastnorm import Stats

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # fixed seed: CI runs the same examples every time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

K = {np.dtype(np.float32): 16, np.dtype(np.float64): 64}

COUNTS = collections.Counter()


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
    try:
        result = fn()
    except (ValueError, TypeError) as exc:
        patterns = call.invalid + call.may_fail
        assert patterns, f"a valid call was rejected: {type(exc).__name__}: {exc}"
        assert_names(exc, patterns)
        assert_unchanged(before, call.watched)
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
    assert_unchanged(before, call.watched, skip=skip)
    check(result)
    COUNTS["valid"] += 1
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
    p = draw_x(d, call, kind, functional=True)
    cl, shape, k, groups, dtype, rng, values = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values")
    )
    eps, eps_ref = draw_eps(d, call, kind, group_min_of(p, kind))
    param_shape = shape[len(shape) - k :] if kind in TRAILING else ((shape[-1] if cl else shape[1]),)
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
        rm, rv = draw_running(d, call, param_shape[0], training=training, required=not training)
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


def fuzz_explicit(d):
    kind = d(st.sampled_from(["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"]))
    api = d(st.sampled_from(["forward", "forward_inference", "backward"]))
    slots = ["x", "eps", "weight", "out", "spec", "alias"]
    slots += {"forward": ["bias"], "forward_inference": ["bias", "stats"], "backward": ["stats", "dy"]}[api]
    call = Call(d, slots)
    p = draw_x(d, call, kind, functional=False)
    cl, shape, k, groups, dtype, rng, values = (
        p[n] for n in ("cl", "shape", "k", "groups", "dtype", "rng", "values")
    )
    training = api != "forward_inference"
    eps, eps_ref = draw_eps(d, call, kind, group_min_of(p, kind))
    make_spec = draw_spec(d, call, kind, p, eps)
    param_shape = shape[len(shape) - k :] if kind in TRAILING else ((shape[-1] if cl else shape[1]),)
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
            dy = draw_x_array(d, dyl, kind, cl, "dy")
            dyl = np.array(dy, dtype=dtype)
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
