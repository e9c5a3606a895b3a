"""The oneDNN baseline of the benchmark (benchmarks/baselines/onednn.py) computes the same passes as fastnorm.

A benchmark against a baseline wired to the wrong buffers, flags or
statistics would compare different work, so every primitive the binding
builds is checked against the float64 reference of tests/naive.py.  oneDNN
accumulates in float32, so the tolerance is looser than fastnorm's own
(``k=512``: about 6e-5 relative); the point here is the wiring, not oneDNN's
accuracy.  Skipped when oneDNN cannot be loaded (it is in the bench extra).
"""

import os
import subprocess
import sys
from pathlib import Path

import naive
import numpy as np
import pytest

import benchmarks as bench
from benchmarks.baselines import onednn

try:
    onednn.load()
except onednn.OneDNNError as exc:  # pragma: no cover - the bench extra installs it
    pytest.skip(f"oneDNN not loadable: {exc}", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent  # `python -c` imports benchmarks from here
EPS = 1e-5
K = 512


def _inputs(shape, channels, seed=0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, channels)
    offset = rng.uniform(-2.0, 2.0, channels)
    bshape = (1, -1) + (1,) * (len(shape) - 2) if len(shape) > 2 else (1, -1)
    if len(shape) == 2:  # rows: the offsets vary per row, not per column
        scale, offset = scale[:1], offset[:1]
    x = (rng.standard_normal(shape) * scale.reshape(bshape) + offset.reshape(bshape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    return x, dy, weight, bias


def _run(kind, pass_, layout, x, dy, weight, bias, mean, variance):
    out = np.full_like(x, np.nan)
    grads = (np.full_like(weight, np.nan), np.full_like(bias, np.nan))
    primitive = onednn.normalization(
        kind, pass_, layout, x, out, weight, bias, mean, variance, EPS, dy=dy, grads=grads
    )
    primitive()
    return out, grads


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("pass_", ["fwd", "inf", "bwd"])
def test_batch_norm(layout, pass_):
    shape = (3, 8, 5, 7)
    x, dy, weight, bias = _inputs(shape, 8)
    y_ref, mean_ref, rstd_ref = naive.forward(x, "batch_norm", weight, bias, EPS)
    dx_ref, dw_ref, db_ref = naive.backward(dy, x, "batch_norm", weight, EPS)
    to_memory = (lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))) if layout == "nhwc" else (lambda a: a)
    from_memory = (lambda a: np.moveaxis(a, -1, 1)) if layout == "nhwc" else (lambda a: a)
    mean = np.full(8, np.nan, np.float32) if pass_ == "fwd" else mean_ref.astype(np.float32)
    variance = (1.0 / rstd_ref**2 - EPS).astype(np.float32)
    if pass_ == "fwd":
        variance[:] = np.nan
    out, grads = _run("batch_norm", pass_, layout, to_memory(x), to_memory(dy), weight, bias, mean, variance)
    if pass_ == "bwd":
        naive.assert_close(from_memory(out), dx_ref, k=K, err_msg="dx")
        naive.assert_close(grads[0], dw_ref, k=K, err_msg="dweight")
        naive.assert_close(grads[1], db_ref, k=K, err_msg="dbias")
        return
    naive.assert_close(from_memory(out), y_ref, k=K, err_msg="y")
    if pass_ == "fwd":  # training writes the batch statistics (biased variance)
        naive.assert_close(mean, mean_ref, k=K, scale=1.0 / rstd_ref.min(), err_msg="mean")
        naive.assert_close(variance, 1.0 / rstd_ref**2 - EPS, k=K, err_msg="variance")


@pytest.mark.parametrize("pass_", ["fwd", "inf", "bwd"])
def test_instance_norm_as_batch_norm_over_samples_times_channels(pass_):
    n, c = 2, 4
    x, dy, weight, bias = _inputs((n, c, 6, 5), c, seed=1)
    y_ref, mean_ref, rstd_ref = naive.forward(x, "instance_norm", weight, bias, EPS)
    dx_ref, dw_ref, db_ref = naive.backward(dy, x, "instance_norm", weight, EPS)
    mean = mean_ref.astype(np.float32).reshape(-1)
    variance = (1.0 / rstd_ref**2 - EPS).astype(np.float32).reshape(-1)
    weight_nc, bias_nc = np.tile(weight, n), np.tile(bias, n)
    out, grads = _run("instance_norm", pass_, "nchw", x, dy, weight_nc, bias_nc, mean, variance)
    if pass_ == "bwd":
        naive.assert_close(out, dx_ref, k=K, err_msg="dx")
        # per (n, c): their sum over n is the InstanceNorm dweight/dbias
        naive.assert_close(grads[0].reshape(n, c).sum(axis=0), dw_ref, k=K, err_msg="dweight")
        naive.assert_close(grads[1].reshape(n, c).sum(axis=0), db_ref, k=K, err_msg="dbias")
    else:
        naive.assert_close(out, y_ref, k=K, err_msg="y")


@pytest.mark.parametrize("pass_", ["fwd", "inf", "bwd"])
def test_layer_norm(pass_):
    rows, width = 5, 48
    x, dy, weight, bias = _inputs((rows, width), width, seed=2)
    y_ref, mean_ref, rstd_ref = naive.forward(x, "layer_norm", weight, bias, EPS, normalized_ndim=1)
    dx_ref, dw_ref, db_ref = naive.backward(dy, x, "layer_norm", weight, EPS, normalized_ndim=1)
    mean = mean_ref.astype(np.float32).reshape(-1)
    variance = (1.0 / rstd_ref**2 - EPS).astype(np.float32).reshape(-1)
    out, grads = _run("layer_norm", pass_, "nchw", x, dy, weight, bias, mean, variance)
    if pass_ == "bwd":
        naive.assert_close(out, dx_ref, k=K, err_msg="dx")
        naive.assert_close(grads[0], dw_ref, k=K, err_msg="dweight")
        naive.assert_close(grads[1], db_ref, k=K, err_msg="dbias")
    else:
        naive.assert_close(out, y_ref, k=K, err_msg="y")


def test_supports():
    assert onednn.supports("batch_norm", "nhwc", "float32")
    assert onednn.supports("layer_norm", "nchw", np.float32)
    assert onednn.supports("instance_norm", "nchw", "float32")
    assert not onednn.supports("instance_norm", "nhwc", "float32")
    assert not onednn.supports("batch_norm", "nchw", "float64")
    assert not onednn.supports("group_norm", "nchw", "float32")
    assert not onednn.supports("rms_norm", "nchw", "float32")


def test_unsupported_cases_and_buffers_are_refused():
    x = np.zeros((2, 4, 3, 3), np.float32)
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="no group_norm primitive"):
        onednn.normalization("group_norm", "fwd", "nchw", x, x.copy(), p, p, p, p, EPS)
    with pytest.raises(ValueError, match="no channels-last InstanceNorm"):
        onednn.normalization("instance_norm", "fwd", "nhwc", x, x.copy(), p, p, p, p, EPS)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        onednn.normalization("batch_norm", "fwd", "nchw", x.astype(np.float64), x.copy(), p, p, p, p, EPS)
    with pytest.raises(ValueError, match="weight has 3 values; this oneDNN primitive needs 4"):
        onednn.normalization("batch_norm", "fwd", "nchw", x, x.copy(), p[:3], p, p, p, EPS)
    with pytest.raises(ValueError, match="needs dy and grads"):
        onednn.normalization("batch_norm", "bwd", "nchw", x, x.copy(), p, p, p, p, EPS)


def test_a_missing_library_is_a_clear_error():
    code = (
        "from benchmarks.baselines import onednn\n"
        "try:\n    onednn.load()\nexcept onednn.OneDNNError as e:\n    print(e)"
    )
    env = dict(os.environ, **{onednn.LIBRARY_ENV: "/nonexistent/libdnnl.so.3"})
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert "cannot load oneDNN" in done.stdout and "/nonexistent/libdnnl.so.3" in done.stdout


def test_bench_workload_has_a_onednn_baseline_where_onednn_has_the_case():
    """The benchmark's oneDNN callable runs on the case's buffers; None where oneDNN has no primitive."""
    for case_id in ("bn-bwd-nhwc-f32-1x64x8x8", "in-fwd-nchw-f32-1x64x8x8", "ln-inf-nchw-f32-1x768"):
        (case,) = bench.select_cases(ids=[case_id])
        workload = bench.make_workload(case, with_torch=False, with_onednn=True)
        assert workload.onednn is not None, case_id
        workload.onednn()
    for case_id in ("gn-fwd-nchw-f32-1x64x8x8", "bn-fwd-nchw-f64-1x64x8x8", "rms-bwd-nchw-f32-1x768"):
        (case,) = bench.select_cases(ids=[case_id])
        assert bench.make_workload(case, with_torch=False, with_onednn=True).onednn is None, case_id
    (case,) = bench.select_cases(ids=["ln-fwd-nchw-f32-1x768"])
    got = bench.measure_case(case, rounds=1, threads=1, target_s=1e-5, with_torch=False, with_onednn=True)
    assert got.vs_onednn > 0 and "onednn" in got.times


def test_bench_loads_onednn_with_a_short_openmp_spin():
    """oneDNN's libgomp reads GOMP_SPINCOUNT when it loads: the bench sets it first, as for torch."""
    code = (
        "import os\nimport benchmarks as bench\n"
        "bench.load_onednn()\nprint(os.environ.get('GOMP_SPINCOUNT'), bench.environment(1)['onednn'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == [bench.TORCH_SPINCOUNT, "3.2.0"]
