"""The ONNX Runtime baseline (benchmarks/baselines/onnxruntime.py) computes what fastnorm does.

A benchmark against a baseline wired to the wrong operator, attribute,
buffer or statistics would compare different work, so every operator the
binding builds is run on real-network shapes and checked against fastnorm's
own result and the float64 reference of tests/naive.py, and every benchmark
case the peer covers is checked through the workload the CLI times.  ONNX
Runtime accumulates float32 in float32, so the tolerance is a float32 one
(``k=512``: about 6e-5 relative, as for oneDNN); float64 cases are held to
float64 tolerances (:data:`K`).  Skipped when ONNX Runtime cannot be imported (it is in
the bench extra, which ``make test`` installs).
"""

import json
import subprocess
import sys
from pathlib import Path

import naive
import numpy as np
import pytest

import benchmarks as bench
import fastnorm
from benchmarks.baselines import onnxruntime as ortb

try:
    ortb.load()
except ortb.OnnxRuntimeError as exc:  # pragma: no cover - the bench extra installs it
    pytest.skip(f"ONNX Runtime not importable: {exc}", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent  # `python -m benchmarks` runs from here
EPS, RMS_EPS = bench.cases.EPS, bench.cases.RMS_EPS
#: Tolerances in machine epsilons.  float64: ONNX Runtime sums naively, e.g. 3.3e-12 (2000 eps) off
#: the reference after a BatchNorm over 8*56*56 values per channel; still far below any wrong
#: formula (an unbiased variance there is 5e-6 off).
K = {"float32": 512, "float64": 16384}


def _inputs(shape, channels, dtype=np.float32, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    rows = len(shape) == 2
    bshape = (1, -1) if rows else (1, -1) + (1,) * (len(shape) - 2)
    scale = rng.uniform(0.5, 3.0, channels).reshape(bshape)
    offset = rng.uniform(-2.0, 2.0, channels).reshape(bshape)
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
    b = rng.uniform(-0.5, 0.5, channels).astype(dtype) if bias else None
    return x, weight, b


def _close(actual, reference, fast, dtype, what):
    """ORT's ``actual`` within the dtype's tolerance of the float64 reference and of fastnorm's ``fast``."""
    k = K[np.dtype(dtype).name]
    naive.assert_close(actual, reference, k=k, err_msg=f"{what}: ONNX Runtime vs float64 reference")
    naive.assert_close(actual, fast, k=2 * k, err_msg=f"{what}: ONNX Runtime vs fastnorm")


def _to_nhwc(a):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


# (kind, shape, groups) at real-network layers.
CONV_SHAPES = {
    "batch_norm": [((8, 64, 56, 56), None), ((2, 8, 5, 7), None)],  # ResNet-50 stage 1; odd small
    "instance_norm": [((2, 64, 28, 28), None), ((3, 8, 5, 7), None)],  # style-transfer layer; odd small
    "group_norm": [((2, 320, 32, 32), 32), ((2, 16, 5, 7), 4)],  # Stable Diffusion UNet; odd small
}
ROW_SHAPES = {
    "layer_norm": [(197, 768), (5, 48)],  # ViT-B/16 tokens
    "rms_norm": [(4, 4096), (5, 48)],  # LLaMA-7B decode rows
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("pass_", ["fwd", "inf"])
@pytest.mark.parametrize("shape", [s for s, _ in CONV_SHAPES["batch_norm"]], ids=str)
def test_batch_norm(shape, pass_, layout, dtype):
    """inf: the given statistics; fwd: training mode, batch statistics; nhwc: the (N*H*W, C) view."""
    c = shape[1]
    x, weight, bias = _inputs(shape, c, dtype)
    spec = fastnorm.NormSpec.batch_norm(EPS, channels_last=layout == "nhwc")
    memory = _to_nhwc if layout == "nhwc" else np.ascontiguousarray
    logical = (lambda a: np.moveaxis(a, -1, 1)) if layout == "nhwc" else (lambda a: a)
    y_ref, mean_ref, rstd_ref = naive.forward(x, "batch_norm", weight, bias, EPS)
    fast, stats = fastnorm.forward(memory(x), spec, weight, bias)
    mean = mean_ref.astype(dtype)
    variance = (1.0 / rstd_ref**2 - EPS).astype(dtype)
    if pass_ == "fwd":  # the running statistics training mode updates: not what y uses
        mean, variance = np.zeros(c, dtype), np.ones(c, dtype)
    out = np.full_like(memory(x), np.nan)
    run = ortb.normalization(
        "batch_norm",
        pass_,
        layout,
        memory(x),
        out,
        weight,
        bias,
        EPS,
        threads=2,
        mean=mean,
        variance=variance,
    )
    assert run() is out
    _close(logical(out), y_ref, logical(fast), dtype, f"bn {pass_} {layout} {shape}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("kind", "shape", "groups"),
    [("instance_norm", s, g) for s, g in CONV_SHAPES["instance_norm"]]
    + [("group_norm", s, g) for s, g in CONV_SHAPES["group_norm"]],
    ids=str,
)
def test_instance_and_group_norm(kind, shape, groups, dtype):
    if not ortb.supports(kind, "fwd", "nchw", dtype):
        assert kind == "instance_norm" and dtype == "float64"  # no float64 InstanceNormalization kernel
        return
    x, weight, bias = _inputs(shape, shape[1], dtype, seed=1)
    if kind == "group_norm":
        spec = fastnorm.NormSpec.group_norm(groups, EPS)
    else:
        spec = fastnorm.NormSpec.instance_norm(EPS)
    y_ref, _, _ = naive.forward(x, kind, weight, bias, EPS, num_groups=groups)
    fast, _ = fastnorm.forward(x, spec, weight, bias)
    out = np.full_like(x, np.nan)
    for pass_ in ("fwd", "inf"):  # ONNX has no given-statistics form: both are the forward
        out[...] = np.nan
        ortb.normalization(kind, pass_, "nchw", x, out, weight, bias, EPS, threads=2, groups=groups)()
        _close(out, y_ref, fast, dtype, f"{kind} {pass_} {shape}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("kind", "shape"), [(k, s) for k, shapes in ROW_SHAPES.items() for s in shapes], ids=str
)
def test_layer_and_rms_norm(kind, shape, dtype):
    rms = kind == "rms_norm"
    eps = RMS_EPS if rms else EPS
    x, weight, bias = _inputs(shape, shape[1], dtype, seed=2, bias=not rms)
    spec = fastnorm.NormSpec.rms_norm(1, eps) if rms else fastnorm.NormSpec.layer_norm(1, eps)
    y_ref, _, _ = naive.forward(x, kind, weight, bias, eps, normalized_ndim=1)
    fast, _ = fastnorm.forward(x, spec, weight, bias)
    out = np.full_like(x, np.nan)
    for pass_ in ("fwd", "inf"):
        out[...] = np.nan
        ortb.normalization(kind, pass_, "nchw", x, out, weight, bias, eps, threads=2)()
        _close(out, y_ref, fast, dtype, f"{kind} {pass_} {shape}")


@pytest.mark.parametrize(("kind", "shape"), [("layer_norm", (197, 768)), ("rms_norm", (4, 4096))], ids=str)
def test_skip_norm(kind, shape):
    """Skip(Simplified)LayerNormalization: ``y = norm(x + skip + skip_bias)``, and the sum."""
    rms = kind == "rms_norm"
    eps = RMS_EPS if rms else EPS
    x, weight, bias = _inputs(shape, shape[1], seed=3, bias=not rms)
    rng = np.random.default_rng(4)
    skip = rng.standard_normal(shape).astype(np.float32)
    skip_bias = rng.uniform(-0.5, 0.5, shape[1]).astype(np.float32)
    y_ref, h_ref, _, _ = naive.skip_forward(
        x, skip, kind, weight, bias, eps, skip_bias=skip_bias, normalized_ndim=1
    )
    spec = fastnorm.NormSpec.rms_norm(1, eps) if rms else fastnorm.NormSpec.layer_norm(1, eps)
    h_fast = np.empty_like(x)
    fast, _ = fastnorm.forward(x, spec, weight, bias, skip=skip, skip_bias=skip_bias, sum_out=h_fast)
    out, total = np.full_like(x, np.nan), np.full_like(x, np.nan)
    options = {"skip": skip, "skip_bias": skip_bias, "sum_out": total}
    run = ortb.normalization(kind, "skip_fwd", "nchw", x, out, weight, bias, eps, threads=2, **options)
    got = run()
    assert got[0] is out and got[1] is total
    _close(out, y_ref, fast, np.float32, f"{kind} skip_fwd y")
    _close(total, h_ref, h_fast, np.float32, f"{kind} skip_fwd sum")


def test_inputs_are_bound_without_a_copy():
    """The session reads the caller's buffers at each call (the IOBinding holds no copy of them)."""
    x, weight, bias = _inputs((4, 48), 48)
    out = np.empty_like(x)
    run = ortb.normalization("layer_norm", "inf", "nchw", x, out, weight, bias, EPS, threads=1)
    first = run().copy()
    x *= 3.0
    x += 1.0
    np.testing.assert_allclose(run(), first, rtol=1e-5, atol=1e-5)  # LayerNorm: scale/shift-invariant
    x[0] = np.linspace(-1, 1, 48, dtype=np.float32)
    assert not np.allclose(run()[0], first[0])


def test_supports():
    assert ortb.supports("batch_norm", "fwd", "nhwc", "float64")
    assert ortb.supports("batch_norm", "inf", "nchw", np.float32)
    assert ortb.supports("instance_norm", "inf", "nchw", "float32")
    assert not ortb.supports("instance_norm", "fwd", "nhwc", "float32")
    assert not ortb.supports("instance_norm", "fwd", "nchw", "float64")
    assert ortb.supports("group_norm", "fwd", "nchw", "float64")
    assert not ortb.supports("group_norm", "fwd", "nhwc", "float32")
    assert ortb.supports("layer_norm", "inf", "nchw", "float64")
    assert ortb.supports("rms_norm", "skip_fwd", "nchw", "float32")
    assert not ortb.supports("rms_norm", "skip_fwd", "nchw", "float64")
    for pass_ in ("bwd", "skip_fb", "resrelu_fwd", "silu_fwd"):
        assert not ortb.supports("layer_norm", pass_, "nchw", "float32")
        assert not ortb.supports("batch_norm", pass_, "nchw", "float32")
    assert not ortb.supports("layer_norm", "fwd", "nchw", "float16")
    assert not ortb.supports("layer_norm", "fwd", "nchw", "bfloat16")


def test_unsupported_cases_and_buffers_are_refused():
    x = np.zeros((2, 4, 3, 3), np.float32)
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="no bwd batch_norm"):
        ortb.normalization("batch_norm", "bwd", "nchw", x, x.copy(), p, p, EPS, mean=p, variance=p)
    with pytest.raises(ValueError, match="no fwd instance_norm for nhwc"):
        ortb.normalization("instance_norm", "fwd", "nhwc", x, x.copy(), p, p, EPS)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        ortb.normalization(
            "batch_norm", "inf", "nchw", x, x.copy(), p.astype(np.float64), p, EPS, mean=p, variance=p
        )
    with pytest.raises(ValueError, match="needs mean and variance"):
        ortb.normalization("batch_norm", "inf", "nchw", x, x.copy(), p, p, EPS)
    with pytest.raises(ValueError, match="needs groups"):
        ortb.normalization("group_norm", "fwd", "nchw", x, x.copy(), p, p, EPS)
    with pytest.raises(ValueError, match="needs skip, skip_bias and sum_out"):
        ortb.normalization("layer_norm", "skip_fwd", "nchw", x[0, 0], x[0, 0].copy(), p[:3], p[:3], EPS)


# --------------------------------------------------------------------------- the benchmark's workloads

#: Every kind, pass and layout the peer covers, in float32 and float64 where it has them.
COVERED = [
    c
    for c in bench.select_cases(sizes=["tiny", "mid"], passes=["fwd", "inf"], dtypes=["float32", "float64"])
    if ortb.supports(bench.KINDS[c.kind], c.pass_, c.layout, c.dtype)
] + bench.select_cases(passes=["skip_fwd"])
NOT_COVERED = [
    "bn-bwd-nchw-f32-1x64x8x8",
    "in-fwd-nhwc-f32-1x64x8x8",
    "in-inf-nchw-f64-1x64x8x8",
    "gn-fwd-nhwc-f32-1x64x8x8",
    "ln-fwd-nchw-bf16-1x768",
    "ln-skip_fb-nchw-f32-4096x768",
    "bn-resrelu_fwd-nchw-f32-32x64x56x56",
    "gn-silu_fwd-nchw-f32-2x320x64x64",
]


@pytest.mark.parametrize("case", COVERED, ids=lambda c: c.id)
def test_workload_onnxruntime_computes_the_same_as_fastnorm(case):
    """The callable the CLI times gives fastnorm's y (and a skip case's sum) on the case's data."""
    workload = bench.make_workload(case, with_torch=False, with_onnxruntime=True, threads=2)
    assert workload.onnxruntime is not None
    fast = workload.fastnorm()
    got = workload.onnxruntime()
    if case.pass_ == "skip_fwd":
        inputs = {k: np.asarray(v, np.float64) for k, v in workload.inputs.items() if v is not None}
        total = inputs["x"] + inputs["other"] + inputs["skip_bias"]
        naive.assert_close(got[1], total, k=8, err_msg=f"{case.id} sum")
        got = got[0]
    fast_y = fast[0] if isinstance(fast, tuple) else fast
    naive.assert_close(got, fast_y, k=2 * K[case.dtype], err_msg=case.id)


@pytest.mark.parametrize("case_id", NOT_COVERED)
def test_workload_has_no_onnxruntime_where_it_has_no_operator(case_id):
    (case,) = bench.select_cases(ids=[case_id])
    assert bench.make_workload(case, with_torch=False, with_onnxruntime=True).onnxruntime is None


def test_measure_case_with_onnxruntime_ratio():
    (case,) = bench.select_cases(ids=["ln-fwd-nchw-f32-1x768"])
    options = {"rounds": 1, "threads": 1, "target_s": 1e-5, "with_torch": False, "with_onnxruntime": True}
    got = bench.measure_case(case, **options)
    assert got.vs_onnxruntime > 0 and "onnxruntime" in got.times and got.vs_memcpy > 0
    (case,) = bench.select_cases(ids=["ln-bwd-nchw-f32-1x768"])
    got = bench.measure_case(case, **options)
    assert got.vs_onnxruntime is None and "onnxruntime" not in got.times


def test_cli_reports_fastnorm_over_onnxruntime(tmp_path):
    """``python -m benchmarks ... --onnxruntime``: the column, the summary, the JSON ratio and version."""
    cases = "bn-inf-nhwc-f32-1x64x8x8,ln-fwd-nchw-f32-1x768,rms-bwd-nchw-f32-1x768"
    json_path = tmp_path / "r.json"
    command = [sys.executable, "-m", "benchmarks", "--cases", cases, "--threads", "1", "--rounds", "1"]
    command += ["--target-ms", "0.01", "--no-torch", "--onnxruntime", "--json", str(json_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "fastnorm/onnxruntime" in done.stdout.splitlines()[1]  # the table's header
    assert "fastnorm/onnxruntime: median" in done.stdout
    data = json.loads(json_path.read_text())
    ratios = {c["id"]: c["fastnorm_over_onnxruntime"] for c in data["cases"]}
    assert ratios["rms-bwd-nchw-f32-1x768"] is None
    assert ratios["bn-inf-nhwc-f32-1x64x8x8"] > 0 and ratios["ln-fwd-nchw-f32-1x768"] > 0
    assert data["meta"]["onnxruntime"] == ortb.load().__version__
