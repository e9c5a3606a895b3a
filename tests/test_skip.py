"""The pre-norm skip add ``h = x + skip (+ skip_bias); y = norm(h)`` of LayerNorm and RMSNorm.

Forward (``y`` and ``h``) and backward (``dx = dskip``, ``dweight``, ``dbias``,
``dskip_bias``) against the float64 reference of tests/naive.py, central finite
differences, and the torch composite ``x + skip + skip_bias`` -> ``F.layer_norm``
/ ``F.rms_norm`` (autograd); bitwise across thread counts; aliasing; bad input.
"""

from __future__ import annotations

import dataclasses

import naive
import numba
import numpy as np
import pytest
from cases import ln, rms, rng_for
from strategies import rejected

import fastnorm
from fastnorm import _kernels as K
from fastnorm._plan import _prepare_input

KDT = {np.dtype(np.float32): 32, np.dtype(np.float64): 64}

# every forward strategy of the row view (one block, pipelined, fused long rows, split few
# rows) and both backward ones (row chunks from 128 rows on, column tiles below)
STRATEGIES = [
    ln(1, 300, 70),
    ln(1, 64, 768),
    rms(1, 64, 768),
    rms(1, 33, 4500),
    ln(1, 3, 9001),
    ln(2, 3, 4, 5),
]


def _problem(case, dtype, with_skip_bias, key=()):
    rng = rng_for(case, np.dtype(dtype).name, "skip", *key)
    shape, pshape = case.shape, case.param_shape
    x = rng.standard_normal(shape).astype(dtype)
    skip = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, pshape).astype(dtype)
    b = rng.standard_normal(pshape).astype(dtype) if case.kind == "layer_norm" else None
    sb = rng.standard_normal(pshape).astype(dtype) if with_skip_bias else None
    return x, skip, dy, w, b, sb


def _run(case, x, skip, dy, w, b, sb, act=None, **out):
    spec = dataclasses.replace(case.spec(), activation=act)
    y, stats = fastnorm.forward(x, spec, w, b, skip=skip, skip_bias=sb, **out)
    grads = fastnorm.backward(dy, x, stats, spec, w, bias=b)
    return y, stats, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("with_skip_bias", [False, True], ids=["no_skip_bias", "skip_bias"])
@pytest.mark.parametrize("case", STRATEGIES, ids=str)
def test_skip_matches_the_reference(case, with_skip_bias, dtype):
    dtype = np.dtype(dtype)
    k = KDT[dtype]
    x, skip, dy, w, b, sb = _problem(case, dtype, with_skip_bias)
    before = [a.copy() for a in (x, skip, dy)]
    y, stats, grads = _run(case, x, skip, dy, w, b, sb)
    geo = dict(eps=case.eps, normalized_ndim=case.normalized_ndim)
    ry, rh, rmean, rrstd = naive.skip_forward(x, skip, case.kind, w, b, skip_bias=sb, **geo)
    naive.assert_close(stats.h, rh, k=k, err_msg=f"{case} h")
    naive.assert_close(y, ry, k=k, err_msg=f"{case} y")
    # float64 statistics of the rounded h: to the data's precision from those of the exact sum
    naive.assert_close(stats.rstd, rrstd, dtype=dtype, k=k, err_msg=f"{case} rstd")
    assert stats.has_skip_bias == with_skip_bias
    for a, a0 in zip((x, skip, dy), before, strict=True):
        assert a.tobytes() == a0.tobytes(), "an input was modified"
    # h is the rounded sum, as NumPy computes it in the data's dtype
    expected_h = x + skip if sb is None else x + skip + sb
    assert stats.h.tobytes() == expected_h.tobytes()

    rdh, rdw, rdb, rdsb = naive.skip_backward(dy, x, skip, case.kind, w, b, skip_bias=sb, **geo)
    scale = max(1.0, float(np.abs(rdh).max()))
    naive.assert_close(grads.dx, rdh, k=4 * k, scale=scale, err_msg=f"{case} dx")
    assert grads.dskip is grads.dx
    naive.assert_close(grads.dweight, rdw, k=4 * k, scale=float(np.abs(rdw).max()), err_msg="dweight")
    if b is not None:
        naive.assert_close(grads.dbias, rdb, k=4 * k, scale=float(np.abs(rdb).max()), err_msg="dbias")
    if with_skip_bias:
        naive.assert_close(grads.dskip_bias, rdsb, k=4 * k, scale=float(np.abs(rdsb).max()), err_msg="dsb")
        # the column sums of dx itself, in float64
        np.testing.assert_allclose(
            grads.dskip_bias, grads.dx.astype(np.float64).reshape(-1, *case.param_shape).sum(0), rtol=1e-5
        )
    else:
        assert grads.dskip_bias is None


def test_every_row_strategy_is_exercised():
    """The cases above reach each forward strategy of the row view and both backward ones."""
    seen = set()
    for case in STRATEGIES:
        for dtype in (np.float32, np.float64):
            x = np.zeros(case.shape, dtype)
            _, plan = _prepare_input(x, case.spec())
            for pass_id in (K.FORWARD, K.BACKWARD):
                schedule = K.plan_schedule(plan.kernel_params, pass_id, 2, x.itemsize, True, True, False)
                seen.add((pass_id, K.Schedule(*schedule).strategy))
    forward = {K.ONE_BLOCK, K.FUSED, K.SPLIT} | ({K.PIPELINED} if K.PIPELINE_HOST else set())  # AVX-512
    assert {(K.FORWARD, s) for s in forward} | {
        (K.BACKWARD, K.ROW_CHUNKS),
        (K.BACKWARD, K.COLUMN_TILES),
    } <= seen


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_skip_with_an_activation(act):
    case = ln(1, 40, 300)
    x, skip, dy, w, b, sb = _problem(case, np.float64, True, key=(act,))
    y, stats, grads = _run(case, x, skip, dy, w, b, sb, act=act)
    geo = dict(eps=case.eps, normalized_ndim=1)
    ry, _, _, _ = naive.skip_forward(x, skip, case.kind, w, b, skip_bias=sb, act=act, **geo)
    naive.assert_close(y, ry, k=64)
    rdh, rdw, _, rdsb = naive.skip_backward(dy, x, skip, case.kind, w, b, skip_bias=sb, act=act, **geo)
    naive.assert_close(grads.dx, rdh, k=256, scale=max(1.0, float(np.abs(rdh).max())))
    naive.assert_close(grads.dskip_bias, rdsb, k=256, scale=float(np.abs(rdsb).max()))


@pytest.mark.parametrize("case", [ln(1, 3, 7), rms(1, 3, 7), ln(2, 2, 2, 3)], ids=str)
def test_gradients_match_finite_differences(case):
    rng = rng_for(case, "skip-fd")
    args = {
        "x": rng.standard_normal(case.shape),
        "skip": rng.standard_normal(case.shape),
        "w": rng.uniform(0.5, 1.5, case.param_shape),
        "sb": rng.standard_normal(case.param_shape),
    }
    if case.kind == "layer_norm":
        args["b"] = rng.standard_normal(case.param_shape)
    c = rng.standard_normal(case.shape)  # loss = sum(c * y)
    spec = case.spec()

    def loss(**changed):
        a = {**args, **changed}
        y, _ = fastnorm.forward(a["x"], spec, a["w"], a.get("b"), skip=a["skip"], skip_bias=a["sb"])
        return float(np.sum(c * y))

    _, stats = fastnorm.forward(
        args["x"], spec, args["w"], args.get("b"), skip=args["skip"], skip_bias=args["sb"]
    )
    grads = fastnorm.backward(c, args["x"], stats, spec, args["w"])
    named = {"x": grads.dx, "skip": grads.dskip, "w": grads.dweight, "sb": grads.dskip_bias}
    if "b" in args:
        named["b"] = grads.dbias
    naive.check_finite_differences(loss, args, named, rng, f"{case}")


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", [ln(1, 6, 20), ln(1, 64, 768), rms(1, 6, 20), rms(1, 3, 9001)], ids=str)
def test_torch_composite_parity(case, dtype):
    """``x + skip + skip_bias`` -> ``F.layer_norm`` / ``F.rms_norm`` with autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    dtype = np.dtype(dtype)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    x, skip, dy, w, b, sb = _problem(case, dtype, True)
    y, stats, grads = _run(case, x, skip, dy, w, b, sb)

    leaf = {"x": x, "skip": skip, "w": w, "sb": sb, **({"b": b} if b is not None else {})}
    leaf = {k: torch.tensor(v, requires_grad=True) for k, v in leaf.items()}
    h = leaf["x"] + leaf["skip"] + leaf["sb"]
    shape = case.param_shape
    if case.kind == "layer_norm":
        yt = F.layer_norm(h, shape, leaf["w"], leaf["b"], case.eps)
    else:
        yt = F.rms_norm(h, shape, leaf["w"], float(np.finfo(dtype).eps))
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol, err_msg="y")
    np.testing.assert_allclose(stats.h, h.detach().numpy(), **tol, err_msg="h")
    ours = {"x": grads.dx, "skip": grads.dskip, "w": grads.dweight, "sb": grads.dskip_bias, "b": grads.dbias}
    for name, tensor in leaf.items():
        np.testing.assert_allclose(ours[name], tensor.grad.numpy(), **tol, err_msg=f"d{name}")


@pytest.mark.parametrize("case", [ln(1, 64, 768), rms(1, 33, 4500), ln(1, 3, 9001), ln(1, 300, 70)], ids=str)
def test_bitwise_identical_for_any_thread_count(case):
    x, skip, dy, w, b, sb = _problem(case, np.float32, True)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            y, stats, grads = _run(case, x, skip, dy, w, b, sb)
            results.append([y, stats.h, stats.mean, stats.rstd, grads.dx, grads.dweight, grads.dskip_bias])
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        assert one.tobytes() == two.tobytes()


def test_functional_skip_norms_match_forward():
    case = ln(1, 40, 300)
    x, skip, _, w, b, sb = _problem(case, np.float32, True)
    y, h = fastnorm.skip_layer_norm(x, skip, 300, w, b, skip_bias=sb)
    y2, stats = fastnorm.forward(x, fastnorm.NormSpec.layer_norm(1), w, b, skip=skip, skip_bias=sb)
    assert y.tobytes() == y2.tobytes() and h.tobytes() == stats.h.tobytes()
    assert y.tobytes() == fastnorm.layer_norm(h, 300, w, b).tobytes()
    y, h = fastnorm.skip_rms_norm(x, skip, (300,), w)
    assert y.tobytes() == fastnorm.rms_norm(x + skip, 300, w).tobytes()
    assert h.tobytes() == (x + skip).tobytes()


@pytest.mark.parametrize("case", [ln(1, 64, 768), ln(1, 3, 9001)], ids=str)
def test_outputs_may_be_the_inputs(case):
    """``sum_out`` may be x or skip, ``out`` the other one: the results are the same bits."""
    x, skip, _, w, b, sb = _problem(case, np.float32, True)
    y, h = fastnorm.skip_layer_norm(x, skip, case.param_shape, w, b, skip_bias=sb)
    for h_into, y_into in (("x", "skip"), ("skip", "x")):
        arrays = {"x": x.copy(), "skip": skip.copy()}
        y2, h2 = fastnorm.skip_layer_norm(
            arrays["x"], arrays["skip"], case.param_shape, w, b, skip_bias=sb,
            sum_out=arrays[h_into], out=arrays[y_into],
        )  # fmt: skip
        assert h2 is arrays[h_into] and y2 is arrays[y_into]
        assert y2.tobytes() == y.tobytes() and h2.tobytes() == h.tobytes(), (h_into, y_into)


def test_bad_skip_arguments_are_rejected():
    rng = rng_for("skip-bad")
    x = rng.standard_normal((4, 6))
    skip = rng.standard_normal((4, 6))
    w = np.ones(6)
    spec = fastnorm.NormSpec.layer_norm(1)
    watched = (x, skip, w)
    bn = fastnorm.NormSpec.batch_norm()
    rejected(ValueError, "layer_norm", lambda: fastnorm.forward(x, bn, skip=skip), *watched, names="skip")
    rejected(ValueError, "shape", lambda: fastnorm.forward(x, spec, skip=skip[:2]), *watched, names="skip")
    rejected(
        TypeError,
        "dtype",
        lambda: fastnorm.forward(x, spec, skip=skip.astype(np.float32)),
        *watched,
        names="skip",
    )
    rejected(
        TypeError, "ndarray", lambda: fastnorm.forward(x, spec, skip=skip.tolist()), *watched, names="skip"
    )
    rejected(
        ValueError, "C-contiguous", lambda: fastnorm.forward(x, spec, skip=np.asfortranarray(skip)), *watched
    )
    rejected(
        ValueError, "shape", lambda: fastnorm.forward(x, spec, skip=skip, skip_bias=np.ones(5)), *watched,
        names="skip_bias",
    )  # fmt: skip
    rejected(
        ValueError, "without skip", lambda: fastnorm.forward(x, spec, skip_bias=w), *watched, names="skip"
    )
    rejected(
        ValueError, "without skip", lambda: fastnorm.forward(x, spec, sum_out=x), *watched, names="sum_out"
    )
    rejected(
        ValueError, "residual", lambda: fastnorm.forward(x, spec, skip=skip, residual=skip), *watched,
        names="skip",
    )  # fmt: skip
    rejected(
        ValueError, "separate", lambda: fastnorm.forward(x, spec, skip=skip, sum_out=x, out=x), *watched,
        names="out",
    )  # fmt: skip
    # h written over the weight, or over the skip bias, would change them while they are read
    buf = np.ones(24)
    shared_w, shared_h = buf[:6], buf.reshape(4, 6)
    overlap_weight = lambda: fastnorm.forward(x, spec, shared_w, skip=skip, sum_out=shared_h)  # noqa: E731
    rejected(ValueError, "overlaps", overlap_weight, *watched, buf, names="sum_out")
    overlap_bias = lambda: fastnorm.forward(x, spec, skip=skip, skip_bias=shared_w, out=shared_h)  # noqa: E731
    rejected(ValueError, "overlaps", overlap_bias, *watched, buf, names="out")
    wrong_shape = lambda: fastnorm.skip_layer_norm(x, skip, 6, sum_out=np.empty((4, 5)))  # noqa: E731
    rejected(ValueError, "shape", wrong_shape, *watched, names="sum_out")
    # the backward reads stats.h: it must be laid out like x
    _, stats = fastnorm.forward(x, spec, skip=skip)
    broken = dataclasses.replace(stats, h=stats.h[:2])
    rejected(ValueError, "shape", lambda: fastnorm.backward(x, x, broken, spec), *watched, names="stats.h")


def test_read_only_inputs():
    """Read-only x, skip, skip_bias and parameters are read, never written (h and y are new arrays)."""
    case = ln(1, 40, 300)
    x, skip, dy, w, b, sb = _problem(case, np.float32, True)
    y, h = fastnorm.skip_layer_norm(x, skip, 300, w, b, skip_bias=sb)
    for a in (x, skip, dy, w, b, sb):
        a.setflags(write=False)
    y2, h2 = fastnorm.skip_layer_norm(x, skip, 300, w, b, skip_bias=sb)
    assert y2.tobytes() == y.tobytes() and h2.tobytes() == h.tobytes()
    spec = fastnorm.NormSpec.layer_norm(1)
    _, stats = fastnorm.forward(x, spec, w, b, skip=skip, skip_bias=sb)
    stats.h.setflags(write=False)
    assert fastnorm.backward(dy, x, stats, spec, w).dskip_bias.shape == (300,)


def test_skip_none_and_a_spec_that_is_not_a_normspec_are_rejected():
    """``skip_*_norm(x, None, ...)`` names ``skip``; ``forward(x, "layer_norm", skip=...)`` names ``spec``."""
    x = np.random.default_rng(0).standard_normal((4, 8))
    for fn in (fastnorm.skip_layer_norm, fastnorm.skip_rms_norm):
        rejected(ValueError, r"\bskip\b", lambda fn=fn: fn(x, None, 8), {"x": x})
    skip = x + 1.0
    rejected(
        TypeError, r"\bspec\b", lambda: fastnorm.forward(x, "layer_norm", skip=skip), {"x": x, "skip": skip}
    )


def test_dresidual_survives_out_dy_without_an_activation():
    """Without an activation ``dresidual = dy``; with ``out=dy`` it is dy's values from before ``dx``."""
    rng = np.random.default_rng(1)
    x, residual, dy = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    spec = fastnorm.NormSpec.group_norm(2)
    _, stats = fastnorm.forward(x, spec, residual=residual)
    dy_before = dy.copy()
    grads = fastnorm.backward(dy, x, stats, spec, residual=residual, out=dy)
    assert grads.dx is dy
    np.testing.assert_array_equal(grads.dresidual, dy_before)
