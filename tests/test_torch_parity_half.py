"""Parity with torch's CPU bfloat16 and float16 kernels: forward values and autograd gradients.

fastnorm and torch get the same 16-bit inputs (and the same float32 or
16-bit parameters).  Every output (``y``, ``dx``, ``dweight``, ``dbias``;
the running statistics in the functional API) must match torch's within
torch's own tolerance for its dtype (``torch.testing.assert_close``'s
defaults).  Where the two differ by more, fastnorm must be the closer of the
two to the float64 reference (tests/naive.py on the rounded inputs), element
by element, or within one unit in the last place of that reference rounded to
the output dtype; and fastnorm's largest error must not exceed torch's (or be
within one ulp everywhere).  ``-s`` prints the largest errors of both against
each other and against the reference.
"""

from __future__ import annotations

import functools
import warnings

import naive
import numpy as np
import pytest
from cases import arrange, bn, gn, inorm, ln, rms, rng_for, to_ref_layout

import fastnorm

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
F = torch.nn.functional

pytestmark = pytest.mark.torch

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
HALF_DTYPES = {"bfloat16": BF16, "float16": F16}

#: torch.testing.assert_close's default (rtol, atol) per dtype.
TORCH_TOL = {BF16: (1.6e-2, 1e-5), F16: (1e-3, 1e-5), F32: (1.3e-6, 1e-5)}

CASES = [
    bn(4, 8, 7, 9),
    bn(2, 3, 40, 41),
    inorm(2, 6, 9, 11),
    inorm(2, 3, 40, 41),
    gn(4, 2, 16, 9, 11),
    gn(4, 2, 8, 33, 35),
    ln(1, 6, 40),
    ln(1, 2, 5000),
    ln(2, 3, 7, 11),
    rms(1, 5, 70, eps=1e-6),
    rms(1, 3, 4100, eps=None),  # the default eps (float32's for 16-bit data, in both libraries)
]

#: (kind, dtype, params, output) -> [max |fastnorm - torch|, max fastnorm error, max torch error,
#: elements outside torch's tolerance, elements]; printed at the end with ``-s``.
ERRORS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    print("\n16-bit parity with torch (CPU): max abs difference, max abs error vs the float64 reference")
    print(
        f"  {'kind':14s} {'dtype':8s} {'params':7s} {'output':12s} {'|fn-torch|':>10s} "
        f"{'fastnorm':>10s} {'torch':>10s}  outside torch tol"
    )
    for (kind, dtype, param, what), (diff, ours, theirs, outside, total) in sorted(ERRORS.items()):
        flag = "  <- fastnorm less accurate" if ours > theirs else ""
        print(
            f"  {kind:14s} {dtype:8s} {param:7s} {what:12s} {diff:10.3g} {ours:10.3g} {theirs:10.3g}"
            f"  {outside:6d} / {total:<7d}{flag}"
        )


# ---------------------------------------------------------------------------
# Conversions and comparisons
# ---------------------------------------------------------------------------


def to_torch(a):
    """A copy of a NumPy array (bfloat16 through its int16 bits) as a torch tensor.

    A copy: torch updates running statistics in place, and must not update fastnorm's.
    """
    a = np.array(a, order="C", copy=True)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def from_torch(t):
    """A torch tensor as a NumPy array of the same dtype (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def _ordered(a):
    """Float bit patterns as integers in the order of their values (+0 and -0 both 0)."""
    size = a.dtype.itemsize
    bits = a.view({2: np.uint16, 4: np.uint32}[size]).astype(np.int64)
    sign = 1 << (8 * size - 1)
    magnitude = bits & (sign - 1)
    return np.where(bits & sign, -magnitude, magnitude)


def ulps_from_rounded(actual, reference):
    """Units in the last place between ``actual`` and the float64 ``reference`` rounded to its dtype."""
    with np.errstate(over="ignore"):
        rounded = np.asarray(reference, np.float64).astype(actual.dtype)
    return np.abs(_ordered(np.asarray(actual)) - _ordered(rounded))


def check(key, ours, theirs, reference):
    """fastnorm's ``ours`` against torch's ``theirs`` and the float64 ``reference`` (see the module doc)."""
    __tracebackhide__ = True
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    what = " ".join(map(str, key))
    assert ours.dtype == theirs.dtype, f"{what}: fastnorm {ours.dtype}, torch {theirs.dtype}"
    assert ours.shape == theirs.shape == np.shape(reference), what
    o, t = ours.astype(np.float64), theirs.astype(np.float64)
    r = np.asarray(reference, np.float64)
    assert np.isfinite(r).all() and np.isfinite(o).all() and np.isfinite(t).all(), what
    err_ours, err_theirs = np.abs(o - r), np.abs(t - r)
    rtol, atol = TORCH_TOL[ours.dtype]
    outside = ~np.isclose(o, t, rtol=rtol, atol=atol)  # torch's result as the expected one
    ulps = ulps_from_rounded(ours, r)
    row = ERRORS.setdefault(key[:4], [0.0, 0.0, 0.0, 0, 0])
    row[0] = max(row[0], float(np.abs(o - t).max(initial=0.0)))
    row[1] = max(row[1], float(err_ours.max(initial=0.0)))
    row[2] = max(row[2], float(err_theirs.max(initial=0.0)))
    row[3] += int(outside.sum())
    row[4] += int(ours.size)
    # where the two differ by more than torch's tolerance, fastnorm is the closer to the exact value
    worse = outside & (err_ours > err_theirs) & (ulps > 1)
    if worse.any():
        i = tuple(int(k) for k in np.argwhere(worse)[0])
        pytest.fail(
            f"{what}: {int(worse.sum())} of {int(outside.sum())} elements outside torch's tolerance "
            f"(rtol={rtol}, atol={atol}) are farther than torch's from the float64 reference and more "
            f"than one ulp from it; first at {i}: fastnorm {o[i]!r}, torch {t[i]!r}, reference {r[i]!r}"
        )
    # and overall fastnorm is no less accurate than torch, or within one ulp everywhere
    if err_ours.max(initial=0.0) > err_theirs.max(initial=0.0) and ulps.max(initial=0) > 1:
        i = np.unravel_index(int(np.argmax(err_ours)), err_ours.shape)
        pytest.fail(
            f"{what}: fastnorm's max error {err_ours.max():.4g} exceeds torch's {err_theirs.max():.4g} "
            f"and it is up to {int(ulps.max())} ulp from the rounded reference; largest error at "
            f"{tuple(int(k) for k in i)}: fastnorm {o[i]!r}, torch {t[i]!r}, reference {r[i]!r}"
        )


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------


def _torch_eps(case, dtype):
    """The eps fastnorm uses for ``case`` (``None``: float32's epsilon, as torch), for torch."""
    return float(np.finfo(np.float32).eps) if case.eps is None else case.eps


def torch_forward(case, xt, wt, bt, eps):
    with warnings.catch_warnings():
        # rms_norm with float32 weight and 16-bit input: torch's composite (unfused) path, which warns
        warnings.filterwarnings("ignore", "Mismatch dtype between input and weight", UserWarning)
        if case.kind == "batch_norm":
            return F.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
        if case.kind == "instance_norm":
            return F.instance_norm(xt, None, None, wt, bt, use_input_stats=True, eps=eps)
        if case.kind == "group_norm":
            return F.group_norm(xt, case.num_groups, wt, bt, eps=eps)
        if case.kind == "layer_norm":
            return F.layer_norm(xt, case.param_shape, wt, bt, eps=eps)
        return F.rms_norm(xt, case.param_shape, wt, eps=eps)


def torch_run(case, x_cf, dy_cf, weight, bias, layout, eps):
    """torch's ``(y, dx, dweight, dbias)`` as channels-first NumPy arrays (dbias None without bias)."""
    xt, dyt = to_torch(x_cf), to_torch(dy_cf)
    if layout != "cf":
        xt = xt.contiguous(memory_format=torch.channels_last)
        dyt = dyt.contiguous(memory_format=torch.channels_last)
    xt.requires_grad_(True)
    wt = to_torch(weight).requires_grad_(True)
    bt = to_torch(bias).requires_grad_(True) if bias is not None else None
    yt = torch_forward(case, xt, wt, bt, eps)
    yt.backward(dyt)
    return (
        from_torch(yt),
        from_torch(xt.grad),
        from_torch(wt.grad),
        from_torch(bt.grad) if bt is not None else None,
    )


def _param_dtype(param, dtype):
    return F32 if param == "float32" else dtype


@functools.cache
def torch_refuses(case, name, param, layout):
    """Why torch's CPU kernels refuse this combination (a tiny problem of its shape rank), or None."""
    dtype = HALF_DTYPES[name]
    pdtype = _param_dtype(param, dtype)
    shape = (2, case.shape[1], *[3] * (len(case.shape) - 2)) if case.per_channel else (2, *case.param_shape)
    small = type(case)(case.kind, shape, case.num_groups, case.normalized_ndim, case.eps)
    x = np.linspace(-1, 1, int(np.prod(shape))).reshape(shape).astype(dtype)
    weight = np.ones(small.param_shape, pdtype)
    bias = None if case.kind == "rms_norm" else np.zeros(small.param_shape, pdtype)
    try:
        torch_run(small, x, x, weight, bias, layout, _torch_eps(case, dtype))
    except (RuntimeError, NotImplementedError, TypeError) as error:
        return f"torch has no CPU kernel for {case.kind} {name} params={param} {layout}: {error}"
    return None


def _layouts(case):
    # cf: both NCHW; cl: torch channels_last, fastnorm channels_last=True (NHWC);
    # cl_memory: torch channels_last, fastnorm an NCHW view of NHWC memory
    return ("cf", "cl", "cl_memory") if case.per_channel else ("cf",)


def _param(case, name, param, layout):
    reason = torch_refuses(case, name, param, layout)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(case, name, param, layout, id=f"{case}-{name}-{param}-{layout}", marks=marks)


PARAMS = [
    _param(case, name, param, layout)
    for case in CASES
    for name in HALF_DTYPES
    for param in ("float32", "same")
    for layout in _layouts(case)
]


# ---------------------------------------------------------------------------
# forward + backward, every kind and layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case, name, param, layout", PARAMS)
def test_forward_and_gradients_match_torch(case, name, param, layout):
    dtype = HALF_DTYPES[name]
    pdtype = _param_dtype(param, dtype)
    rng = rng_for(case, name, param, layout, "torch-half")
    x_cf = (rng.standard_normal(case.shape) * 2.0 + 0.5).astype(dtype)
    dy_cf = rng.standard_normal(case.shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, case.param_shape).astype(pdtype)
    bias = None if case.kind == "rms_norm" else rng.standard_normal(case.param_shape).astype(pdtype)
    eps = _torch_eps(case, dtype)

    y_t, dx_t, dw_t, db_t = torch_run(case, x_cf, dy_cf, weight, bias, layout, eps)

    x, channels_last = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    spec = case.spec(channels_last)
    y, stats = fastnorm.forward(x, spec, weight, bias)
    dx, dweight, dbias = fastnorm.backward(dy, x, stats, spec, weight)

    kw = case.ref_kwargs(False)
    kw["eps"] = eps
    x64, dy64 = x_cf.astype(np.float64), dy_cf.astype(np.float64)
    w64 = weight.astype(np.float64)
    b64 = bias.astype(np.float64) if bias is not None else None
    y_ref, _, _ = naive.forward(x64, case.kind, w64, b64, **kw)
    dx_ref, dw_ref, db_ref = naive.backward(dy64, x64, case.kind, w64, **kw)

    key = (case.kind, name, param)
    label = (str(case), layout)
    check((*key, "y", *label), to_ref_layout(y, layout, case), y_t, y_ref)
    check((*key, "dx", *label), to_ref_layout(dx, layout, case), dx_t, dx_ref)
    check((*key, "dweight", *label), dweight, dw_t, dw_ref)
    if db_t is not None:
        check((*key, "dbias", *label), dbias, db_t, db_ref)


# ---------------------------------------------------------------------------
# The functional API, with running statistics
# ---------------------------------------------------------------------------

FUNCTIONAL = {
    "batch_norm": bn(4, 6, 5, 7),
    "instance_norm": inorm(3, 6, 9, 11),
    "group_norm": gn(4, 2, 16, 9, 11),
    "layer_norm": ln(1, 6, 40),
    "rms_norm": rms(1, 5, 70, eps=1e-6),
}


def _functional_params():
    return [
        pytest.param(kind, name, param, id=f"{kind}-{name}-{param}")
        for kind in FUNCTIONAL
        for name in HALF_DTYPES
        for param in ("float32", "same")
    ]


def _running_reference(kind, x64, rm0, rv0, momentum):
    """torch's running-statistics update in float64: the batch mean and unbiased variance."""
    if kind == "batch_norm":
        axes = (0, *range(2, x64.ndim))
        count = x64.size // x64.shape[1]
        mean, var = x64.mean(axis=axes), x64.var(axis=axes) * count / (count - 1)
    else:  # instance_norm: the batch average of the per-instance statistics
        axes = tuple(range(2, x64.ndim))
        count = int(np.prod(x64.shape[2:]))
        mean = x64.mean(axis=axes).mean(axis=0)
        var = (x64.var(axis=axes) * count / (count - 1)).mean(axis=0)
    rm = (1 - momentum) * rm0.astype(np.float64) + momentum * mean
    rv = (1 - momentum) * rv0.astype(np.float64) + momentum * var
    return rm, rv


@pytest.mark.parametrize("kind, name, param", _functional_params())
def test_functional_matches_torch(kind, name, param):
    """Training forward, running statistics (in the parameters' dtype, as torch needs) and inference."""
    case = FUNCTIONAL[kind]
    dtype = HALF_DTYPES[name]
    pdtype = _param_dtype(param, dtype)
    rng = rng_for("functional", kind, name, param)
    x = (rng.standard_normal(case.shape) * 1.5 - 0.7).astype(dtype)
    weight = rng.uniform(0.5, 1.5, case.param_shape).astype(pdtype)
    bias = rng.standard_normal(case.param_shape).astype(pdtype)
    xt, wt, bt = to_torch(x), to_torch(weight), to_torch(bias)
    x64, w64, b64 = (a.astype(np.float64) for a in (x, weight, bias))
    key = (kind, name, param)
    eps, momentum = case.eps, 0.1

    if kind in ("batch_norm", "instance_norm"):
        rm, rv = np.zeros(case.param_shape, pdtype), np.ones(case.param_shape, pdtype)
        rm_t, rv_t = to_torch(rm), to_torch(rv)
        if kind == "batch_norm":
            y = fastnorm.batch_norm(x, rm, rv, weight, bias, training=True, momentum=momentum, eps=eps)
            y_t = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=momentum, eps=eps)
        else:
            y = fastnorm.instance_norm(x, rm, rv, weight, bias, momentum=momentum, eps=eps)
            y_t = F.instance_norm(xt, rm_t, rv_t, wt, bt, use_input_stats=True, momentum=momentum, eps=eps)
        y_ref, _, _ = naive.forward(x64, kind, w64, b64, eps)
        check((*key, "y", "functional"), y, from_torch(y_t), y_ref)
        rm_ref, rv_ref = _running_reference(kind, x64, np.zeros(rm.shape), np.ones(rv.shape), momentum)
        check((*key, "running_mean", "functional"), rm, from_torch(rm_t), rm_ref)
        check((*key, "running_var", "functional"), rv, from_torch(rv_t), rv_ref)

        # inference from the same running statistics (fastnorm's) on both sides
        rm_t, rv_t = to_torch(rm), to_torch(rv)
        if kind == "batch_norm":
            y = fastnorm.batch_norm(x, rm, rv, weight, bias, training=False, eps=eps)
            y_t = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=False, eps=eps)
        else:
            y = fastnorm.instance_norm(x, rm, rv, weight, bias, use_input_stats=False, eps=eps)
            y_t = F.instance_norm(xt, rm_t, rv_t, wt, bt, use_input_stats=False, eps=eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        rstd = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
        y_ref = (x64 - rm.astype(np.float64).reshape(shape)) * (rstd * w64).reshape(shape) + b64.reshape(
            shape
        )
        check((*key, "y_inference", "functional"), y, from_torch(y_t), y_ref)
        return

    if kind == "group_norm":
        y = fastnorm.group_norm(x, case.num_groups, weight, bias, eps=eps)
        y_t = F.group_norm(xt, case.num_groups, wt, bt, eps=eps)
    elif kind == "layer_norm":
        y = fastnorm.layer_norm(x, case.param_shape, weight, bias, eps=eps)
        y_t = F.layer_norm(xt, case.param_shape, wt, bt, eps=eps)
    else:
        bias = b64 = None
        y = fastnorm.rms_norm(x, case.param_shape, weight, eps=eps)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Mismatch dtype between input and weight", UserWarning)
            y_t = F.rms_norm(xt, case.param_shape, wt, eps=eps)
    y_ref, _, _ = naive.forward(x64, kind, w64, b64, **case.ref_kwargs())
    check((*key, "y", "functional"), y, from_torch(y_t), y_ref)


# ---------------------------------------------------------------------------
# rms_norm's default eps
# ---------------------------------------------------------------------------


def _small_rows(name):
    """Rows of standard deviation 0.05: mean(x**2) ~ 2.5e-3, where the default eps matters."""
    return (rng_for("rms-eps", name).standard_normal((4, 64)) * 0.05).astype(HALF_DTYPES[name])


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_torch_rms_norm_default_eps_is_float32s(name):
    """torch 2.13's CPU rms_norm(eps=None) on 16-bit data uses finfo(float32).eps, the opmath type's.

    (pytorch#142848; its documentation says so since pytorch#173039.)  fastnorm matches it when
    given that eps explicitly.
    """
    x = _small_rows(name)
    y_t = from_torch(F.rms_norm(to_torch(x), (64,)))
    eps32 = float(np.finfo(np.float32).eps)
    assert np.array_equal(
        y_t.view(np.uint16), from_torch(F.rms_norm(to_torch(x), (64,), eps=eps32)).view(np.uint16)
    )
    y = fastnorm.rms_norm(x, 64, eps=eps32)
    y_ref, _, _ = naive.forward(x.astype(np.float64), "rms_norm", eps=eps32, normalized_ndim=1)
    check(("rms_norm", name, "none", "y_eps=f32", "default eps"), y, y_t, y_ref)


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_rms_norm_default_eps_matches_torch(name):
    x = _small_rows(name)
    y = fastnorm.rms_norm(x, 64)
    y_t = from_torch(F.rms_norm(to_torch(x), (64,)))
    rtol, atol = TORCH_TOL[HALF_DTYPES[name]]
    np.testing.assert_allclose(y.astype(np.float64), y_t.astype(np.float64), rtol=rtol, atol=atol)
