"""Unit tests of the benchmark CLI logic (the benchmarks/ package): no timing is asserted.

Measurements are synthetic (a fake ``measure`` / ``measure_case``), except the
smoke test that runs each benchmark workload once on a tiny tensor and checks
that fastnorm and torch compute the same thing.
"""

import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import benchmarks as bench
import fastnorm
from benchmarks import cli, report, runtime

CASE = "bn-fwd-nchw-f32-8x64x32x32"
OTHER = "ln-bwd-nchw-f64-512x768"


def write(tmp_path, text, name="thresholds.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def m(case_id, vs_memcpy, vs_torch=None, rounds=7, vs_floor=None, vs_onednn=None, vs_onnxruntime=None):
    times = {"fastnorm": vs_memcpy * 1e-3, "memcpy": 1e-3}
    if vs_torch is not None:
        times["torch"] = vs_memcpy * 1e-3 / vs_torch
    if vs_floor is not None:
        times["floor"] = vs_memcpy * 1e-3 / vs_floor
    if vs_onednn is not None:
        times["onednn"] = vs_memcpy * 1e-3 / vs_onednn
    if vs_onnxruntime is not None:
        times["onnxruntime"] = vs_memcpy * 1e-3 / vs_onnxruntime
    return bench.Measurement(
        case_id, times, vs_memcpy, vs_torch, rounds, {}, vs_floor, vs_onednn, vs_onnxruntime
    )


def case(case_id):
    (found,) = [c for c in bench.all_cases() if c.id == case_id]
    return found


# --------------------------------------------------------------------------- cases


def test_case_matrix():
    cases = bench.all_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    # BN/IN/GN: 3 passes x 2 layouts x 2 dtypes x 4 shapes; LN/RMS: 3 x 1 x 2 x 3;
    # the epilogues: BN resrelu (2 layouts), GN silu, LN and RMS skip, each fwd and fb.
    assert len(cases) == 3 * (3 * 2 * 2 * 4) + 2 * (3 * 1 * 2 * 3) + 2 * (2 + 1 + 1 + 1)
    assert not [c for c in cases if c.kind in ("ln", "rms") and c.layout == "nhwc"]
    plain = [c for c in cases if c.pass_ in bench.PASSES]
    assert {c.shape for c in plain if c.size == "large"} == {(32, 64, 56, 56), (8, 256, 64, 64), (4096, 768)}
    assert {c.pass_ for c in cases} == set(bench.PASSES) | set(bench.EPILOGUE_PASSES)
    nhwc = case("gn-bwd-nhwc-f64-8x64x32x32")
    assert nhwc.memory_shape == (8, 32, 32, 64)
    assert nhwc.nbytes == 8 * 64 * 32 * 32 * 8


def test_select_cases_filters():
    quick = bench.select_cases(quick=True)
    assert quick and all(c.dtype == "float32" and c.shape in bench.QUICK_SHAPES for c in quick)
    assert {c.dtype for c in bench.select_cases(quick=True, dtypes=["float64"])} == {"float64"}
    gn = bench.select_cases(kinds=["group_norm", "in"], passes=["bwd"], sizes=["tiny"], layouts=["nhwc"])
    assert {c.id for c in gn} == {
        "gn-bwd-nhwc-f32-1x64x8x8",
        "gn-bwd-nhwc-f64-1x64x8x8",
        "in-bwd-nhwc-f32-1x64x8x8",
        "in-bwd-nhwc-f64-1x64x8x8",
    }
    assert [c.id for c in bench.select_cases(ids=[CASE])] == [CASE]
    with pytest.raises(ValueError, match="unknown kind 'xx'"):
        bench.select_cases(kinds=["xx"])
    with pytest.raises(ValueError, match="unknown pass"):
        bench.select_cases(passes=["forward"])
    with pytest.raises(ValueError, match="unknown case id"):
        bench.select_cases(ids=["nope"])


def test_group_count():
    assert bench.group_count(64) == 32
    assert bench.group_count(256) == 32
    assert bench.group_count(24) == 8
    assert bench.group_count(6) == 1


# --------------------------------------------------------------------------- thresholds


def test_load_thresholds(tmp_path):
    path = write(
        tmp_path,
        f"""
[settings]
rounds = 9
threads = 2
target_ms = 3

[cases]
"{OTHER}" = {{ max_vs_memcpy = 4.5 }}
"{CASE}" = {{ max_vs_memcpy = 3, max_vs_torch = 1.25 }}
""",
    )
    settings, thresholds = bench.load_thresholds(path)
    assert settings == {"rounds": 9, "threads": 2, "target_ms": 3.0}
    assert list(thresholds) == [OTHER, CASE]
    assert thresholds[CASE] == bench.Threshold(CASE, 3.0, 1.25)
    assert thresholds[OTHER] == bench.Threshold(OTHER, 4.5, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[cases]\n"bn-fwd-nchw-f32-9x9" = { max_vs_memcpy = 3 }', "unknown case id"),
        (f'[cases]\n"{CASE}" = {{ max_vs_copy = 3 }}', "unknown key"),
        (f'[cases]\n"{CASE}" = {{ max_vs_memcpy = -1 }}', "positive number"),
        (f'[cases]\n"{CASE}" = {{ max_vs_memcpy = 0 }}', "positive number"),
        (f'[cases]\n"{CASE}" = {{ max_vs_memcpy = true }}', "positive number"),
        (f'[cases]\n"{CASE}" = {{ max_vs_memcpy = "3" }}', "positive number"),
        (f'[cases]\n"{CASE}" = {{ }}', "sets no threshold"),
        (f'[cases]\n"{CASE}" = 3.0', "must be a table"),
        ("[settings]\nrepeats = 3", "unknown setting"),
        ("[settings]\nrounds = 2.5", "must be an integer"),
        ("[settings]\nrounds = 0", "positive number"),
        ("[limits]\nx = 1", "unknown top-level"),
        ("[cases\n", "invalid TOML"),
    ],
)
def test_load_thresholds_rejects(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        bench.load_thresholds(path)
    assert str(path) in str(info.value)


ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", ["thresholds.toml", "ci-thresholds.toml"])
def test_committed_thresholds_are_valid(name):
    settings, thresholds = bench.load_thresholds(ROOT / "benchmarks" / name)
    assert thresholds, f"benchmarks/{name} lists no case"
    assert set(settings) <= {"rounds", "threads", "rechecks", "target_ms"}


def test_ci_gate_is_short_single_threaded_and_needs_no_torch():
    """The gate .ci/run runs: every mid-size case (all dtypes) at 1 thread, memcpy limits, rechecks."""
    settings, thresholds = bench.load_thresholds(ROOT / "benchmarks" / "ci-thresholds.toml")
    assert settings["threads"] == 1
    assert settings["rechecks"] >= 2
    mid = {
        c.id for c in bench.select_cases(sizes=["mid"], dtypes=["float32", "float64", "bfloat16", "float16"])
    }
    assert set(thresholds) == mid
    assert all(t.max_vs_memcpy is not None and t.max_vs_torch is None for t in thresholds.values())
    command = "-m benchmarks --check --thresholds benchmarks/ci-thresholds.toml --no-torch"
    assert command in (ROOT / "Makefile").read_text(encoding="utf-8")
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci_lines.index("make test") < ci_lines.index("make bench-ci")


def test_format_thresholds_round_trip(tmp_path):
    ratios = {CASE: (2.34, 0.512), OTHER: (7.0, None)}
    text = bench.format_thresholds(ratios, headroom=2.0, settings={"rounds": 5, "rechecks": 1}, comment="x")
    settings, thresholds = bench.load_thresholds(write(tmp_path, text))
    assert settings == {"rounds": 5, "rechecks": 1}
    assert thresholds[CASE] == bench.Threshold(CASE, 4.7, 1.1)  # rounded up to 2 significant digits
    assert thresholds[OTHER] == bench.Threshold(OTHER, 14.0, None)
    assert "Format (TOML)" in text


def test_worst_ratios():
    def result(memcpy, torch):
        return {"cases": [{"id": CASE, "fastnorm_over_memcpy": memcpy, "fastnorm_over_torch": torch}]}

    cases = bench.select_cases(ids=[CASE, OTHER])
    worst = bench.worst_ratios([result(2.0, 0.5), result(3.0, 0.4), result(1.0, None)], cases)
    assert worst == {CASE: (3.0, 0.5, None, None)}


def test_worst_ratios_and_limits_of_onednn_and_onnxruntime(tmp_path):
    """Peer ratios are worst-of-runs too (a run without the peer leaves it as it was), become
    max_vs_onednn / max_vs_onnxruntime limits, and load back."""

    def result(onednn, ort):
        entry = {"id": CASE, "fastnorm_over_memcpy": 2.0, "fastnorm_over_torch": 0.5}
        entry |= {"fastnorm_over_onednn": onednn, "fastnorm_over_onnxruntime": ort}
        return {"cases": [entry]}

    cases = bench.select_cases(ids=[CASE])
    worst = bench.worst_ratios([result(1.2, None), result(1.1, 0.7), result(None, 0.9)], cases)
    assert worst == {CASE: (2.0, 0.5, 1.2, 0.9)}
    target = tmp_path / "t.toml"
    target.write_text(bench.format_thresholds(worst, headroom=1.5), encoding="utf-8")
    # limits are ratio * headroom rounded up to 2 significant digits: 0.9 * 1.5 = 1.35 -> 1.4
    assert bench.load_thresholds(target)[1] == {CASE: bench.Threshold(CASE, 3.0, 0.75, 1.8, 1.4)}


def test_worst_ratios_uses_the_fastest_reference_round():
    # torch was slowed down in most rounds (median ratio 0.1) but once ran at 1.0 ms:
    # the limit must hold on a quiet machine, so fastnorm 2 ms / torch 1 ms = 2.0 counts.
    entry = {
        "id": CASE,
        "fastnorm_over_memcpy": 2.0,
        "fastnorm_over_torch": 0.1,
        "time_s": {"fastnorm": 2e-3, "memcpy": 1e-3, "torch": 20e-3},
        "time_min_s": {"fastnorm": 1.9e-3, "memcpy": 0.8e-3, "torch": 1e-3},
    }
    worst = bench.worst_ratios([{"cases": [entry]}], bench.select_cases(ids=[CASE]))
    assert worst[CASE][:2] == pytest.approx((2.5, 2.0))


# --------------------------------------------------------------------------- gate decision


def test_evaluate():
    limit = bench.Threshold(CASE, max_vs_memcpy=3.0, max_vs_torch=1.2)
    assert bench.evaluate(m(CASE, 2.9, 1.1), limit) == []
    assert bench.evaluate(m(CASE, 3.0, 1.2), limit) == []  # equal is within the limit
    (violation,) = bench.evaluate(m(CASE, 3.6, 1.0), limit)
    assert violation.metric == "fastnorm/memcpy"
    assert violation.excess == pytest.approx(0.2)
    assert CASE in str(violation) and "+20%" in str(violation)
    both = bench.evaluate(m(CASE, 3.6, 1.5), limit)
    assert [v.metric for v in both] == ["fastnorm/memcpy", "fastnorm/torch"]
    assert bench.evaluate(m(CASE, 2.0, None), limit) == []  # no torch: torch limit not checked


def test_evaluate_onednn_and_onnxruntime_limits():
    limit = bench.Threshold(CASE, max_vs_memcpy=3.0, max_vs_onednn=1.5, max_vs_onnxruntime=1.0)
    within = dataclasses.replace(m(CASE, 2.0, 0.5), vs_onednn=1.5, vs_onnxruntime=0.9)
    assert bench.evaluate(within, limit) == []
    slow = dataclasses.replace(within, vs_onednn=1.8, vs_onnxruntime=1.2)
    assert [(v.metric, v.measured) for v in bench.evaluate(slow, limit)] == [
        ("fastnorm/onednn", 1.8),
        ("fastnorm/onnxruntime", 1.2),
    ]
    assert bench.evaluate(m(CASE, 2.0, 9.0), limit) == []  # peers not measured; no torch limit


def fake_measure(script):
    """measure(case, attempt) returning scripted ratios per case id and attempt."""
    calls = []

    def measure(case, attempt):
        calls.append((case.id, attempt))
        values = script[case.id]
        vs_memcpy, vs_torch = values[min(attempt, len(values) - 1)]
        return m(case.id, vs_memcpy, vs_torch)

    return measure, calls


def thresholds_for(*ids):
    return {i: bench.Threshold(i, max_vs_memcpy=3.0, max_vs_torch=1.0) for i in ids}


def test_run_check_passes():
    cases = bench.select_cases(ids=[CASE, OTHER])
    measure, calls = fake_measure({CASE: [(2.0, 0.5)], OTHER: [(2.9, 0.99)]})
    result = bench.run_check(cases, thresholds_for(CASE, OTHER), measure, rechecks=2)
    assert result.passed and result.violations == [] and result.rechecked == []
    assert sorted(calls) == sorted([(CASE, 0), (OTHER, 0)])


def test_run_check_persistent_regression_fails():
    cases = bench.select_cases(ids=[CASE, OTHER])
    measure, calls = fake_measure({CASE: [(4.0, 0.5), (3.9, 0.5), (3.6, 0.5)], OTHER: [(1.0, 0.5)]})
    result = bench.run_check(cases, thresholds_for(CASE, OTHER), measure, rechecks=2)
    assert not result.passed
    (violation,) = result.violations
    assert violation.case_id == CASE and violation.metric == "fastnorm/memcpy"
    assert violation.measured == pytest.approx(3.6)  # the best of the three attempts
    assert calls.count((CASE, 1)) == 1 and calls.count((CASE, 2)) == 1
    assert (OTHER, 1) not in calls  # only failing cases are re-measured
    assert result.rechecked == [CASE]


def test_run_check_transient_slowdown_passes():
    cases = bench.select_cases(ids=[CASE])
    measure, calls = fake_measure({CASE: [(5.0, 2.0), (2.5, 0.8)]})
    result = bench.run_check(cases, thresholds_for(CASE), measure, rechecks=2)
    assert result.passed
    assert result.rechecked == [CASE]
    assert calls == [(CASE, 0), (CASE, 1)]  # stops re-measuring once within limits
    assert result.measurements[CASE].vs_memcpy == 2.5


def test_run_check_no_recheck():
    cases = bench.select_cases(ids=[CASE])
    measure, _ = fake_measure({CASE: [(5.0, None), (1.0, None)]})
    result = bench.run_check(cases, thresholds_for(CASE), measure, rechecks=0)
    assert not result.passed
    assert result.torch_unchecked == [CASE]
    assert result.unchecked == {"fastnorm/torch": [CASE]}


def test_run_check_rechecks_and_reports_peer_limits():
    """A oneDNN limit fails like the others: re-measured, the best ratio kept; an ONNX Runtime
    limit with no measurement is reported unchecked."""
    cases = bench.select_cases(ids=[CASE])
    limits = {CASE: bench.Threshold(CASE, max_vs_memcpy=3.0, max_vs_onednn=1.0, max_vs_onnxruntime=1.0)}
    onednn = iter([1.4, 1.3, 1.2])

    def measure(case, attempt):
        return dataclasses.replace(m(case.id, 2.0, None), vs_onednn=next(onednn))

    result = bench.run_check(cases, limits, measure, rechecks=2)
    assert not result.passed
    (violation,) = result.violations
    assert (violation.metric, violation.measured) == ("fastnorm/onednn", 1.2)
    assert result.unchecked == {"fastnorm/onnxruntime": [CASE]}


# --------------------------------------------------------------------------- output


def test_write_json_and_markdown(tmp_path):
    cases = bench.select_cases(ids=[CASE, OTHER])
    measurements = {CASE: m(CASE, 2.0, 0.5), OTHER: m(OTHER, 4.0, None)}
    meta = {"date": "2026-01-01", "threads": 2, "platform": "test"}
    scaling = [{"case": CASE, "threads": 2, "nbytes": 2097152, "fastnorm": 1.8, "torch": 1.5}]
    json_path = tmp_path / "r.json"
    bench.write_json(json_path, cases, measurements, meta, scaling)
    data = json.loads(json_path.read_text())
    assert data["meta"] == meta
    assert [c["id"] for c in data["cases"]] == [c.id for c in cases]
    first = data["cases"][0]
    assert first["kind"] == "batch_norm" and first["pass"] == "fwd" and first["shape"] == [8, 64, 32, 32]
    assert first["fastnorm_over_memcpy"] == 2.0 and first["fastnorm_over_torch"] == 0.5
    assert set(first["time_s"]) == {"fastnorm", "memcpy", "torch"}
    assert data["cases"][1]["fastnorm_over_torch"] is None
    assert data["summary"]["fastnorm/memcpy"] == {"worst": 4.0, "worst_case": OTHER, "median": 3.0}
    assert data["scaling"] == scaling
    md_path = tmp_path / "r.md"
    bench.write_markdown(md_path, cases, measurements, meta, scaling, command="python -m benchmarks")
    text = md_path.read_text()
    assert f"| {CASE} | 2.10 |" in text and "| 0.50 | 2.00 |" in text
    assert "fastnorm/memcpy: median 3.00, worst 4.00" in text
    assert "| 1.80 | - | 1.50 |" in text  # a scaling entry without the floor's speed-up
    table = bench.format_table(cases, measurements)
    assert CASE in table and OTHER in table


def test_floor_ratio_in_json_markdown_and_table(tmp_path):
    cases = bench.select_cases(ids=[CASE, OTHER])
    measurements = {CASE: m(CASE, 2.0, 0.5, vs_floor=1.5), OTHER: m(OTHER, 4.0, None, vs_floor=3.0)}
    meta = {"date": "2026-01-01", "threads": 2, "platform": "test"}
    scaling = [{"case": CASE, "threads": 2, "nbytes": 2097152, "fastnorm": 1.8, "floor": 1.25, "torch": 1.5}]
    json_path = tmp_path / "r.json"
    bench.write_json(json_path, cases, measurements, meta, scaling)
    data = json.loads(json_path.read_text())
    assert [c["fastnorm_over_floor"] for c in data["cases"]] == [1.5, 3.0]
    assert data["summary"]["fastnorm/floor"] == {"worst": 3.0, "worst_case": OTHER, "median": 2.25}
    md_path = tmp_path / "r.md"
    bench.write_markdown(md_path, cases, measurements, meta, scaling)
    text = md_path.read_text()
    assert "| floor | fastnorm/floor |" in text and "| 0.50 | 2.00 | 1.33 ms | 1.50 |" in text
    assert "fastnorm/floor: median 2.25, worst 3.00" in text
    assert "| fastnorm speed-up | floor speed-up | torch speed-up |" in text
    assert "| 1.80 | 1.25 | 1.50 |" in text
    assert "- median speed-up over 1 cases: fastnorm 1.80, floor 1.25, torch 1.50" in text
    assert "fastnorm/floor" in bench.format_table(cases, measurements)
    # without floors (older results) neither the column nor the summary line appears
    plain = {CASE: m(CASE, 2.0, 0.5), OTHER: m(OTHER, 4.0, None)}
    assert "floor" not in bench.format_table(cases, plain)
    old_scaling = [{"case": CASE, "threads": 2, "nbytes": 2097152, "fastnorm": 1.8, "torch": 1.5}]
    bench.write_markdown(md_path, cases, plain, meta, old_scaling)
    assert "| 1.80 | - | 1.50 |" in md_path.read_text()
    assert "median speed-up over 1 cases: fastnorm 1.80, torch 1.50" in md_path.read_text()


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint16"])
@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 100_003])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_floor_kernels_copy_and_add(dtype, size, offset):
    """Both floor variants do the whole pass's reads and writes (every chunk, odd sizes, any alignment).

    The streaming kernels store the 64-byte-aligned middle of each chunk with
    their vector loop and the ends with ordinary stores: views starting 0, 1
    and 3 elements into an allocation move that boundary.
    """
    rng = np.random.default_rng(size)

    def operand():  # uint16: sums below 2**16, which pure Python (NUMBA_DISABLE_JIT=1) checks
        return (rng.uniform(0, 1000, size + offset)).astype(dtype)[offset:]

    a, b = operand(), operand()
    out = np.empty(size + offset, dtype)[offset:]
    for copy, add in ((bench.floor_copy, bench.floor_add), (bench.floor_copy_stream, bench.floor_add_stream)):
        out[:] = 7
        copy(a, out)
        np.testing.assert_array_equal(out, a)
        out[:] = 7
        add(a, b, out)
        np.testing.assert_array_equal(out, a + b)


@pytest.mark.jit
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 instruction names")
def test_streaming_floor_kernels_emit_non_temporal_stores():
    """The point of the variant: its machine code stores with ``vmovnt*`` (the plain floor's does not).

    Compiled afresh (Numba cannot inspect code loaded from its cache).
    """
    from fastnorm._config import JIT_OPTIONS

    a = np.ones(4096, np.float32)
    expected = ((bench.floor_copy_stream, True), (bench.floor_add_stream, True), (bench.floor_copy, False))
    for kernel, streams in expected:
        fresh = numba.njit(**{**JIT_OPTIONS, "cache": False}, parallel=True)(kernel.py_func)
        args = (a, np.empty_like(a)) if "copy" in kernel.__name__ else (a, a, np.empty_like(a))
        fresh(*args)
        assert ("vmovnt" in fresh.inspect_asm(fresh.signatures[0])) is streams, kernel.__name__


def test_measure_with_floor_and_scaling():
    """A real (tiny, one-round) measurement carries the floor ratio and the floor's speed-up.

    The floor is the round's fastest pass with its traffic: the ordinary and
    the streaming floor for a backward, and also memcpy for a forward.
    """
    tiny = case("ln-bwd-nchw-f64-1x768")
    got = bench.measure_case(tiny, rounds=1, threads=1, target_s=1e-5, with_torch=False, with_floor=True)
    assert set(got.times) == {"fastnorm", "memcpy", "floor", "floor_plain", "floor_stream"}
    assert got.times["floor"] == min(got.times["floor_plain"], got.times["floor_stream"])
    assert got.vs_floor > 0 and got.vs_torch is None
    forward = bench.measure_case(
        case("ln-fwd-nchw-f64-1x768"), rounds=1, threads=1, target_s=1e-5, with_torch=False, with_floor=True
    )
    assert forward.times["floor"] == min(forward.times[k] for k in ("floor_plain", "floor_stream", "memcpy"))
    assert bench.measure_case(tiny, rounds=1, threads=1, target_s=1e-5, with_torch=False).vs_floor is None
    threads = min(2, bench.max_threads())
    scaling = bench.measure_scaling(tiny, threads, rounds=1, target_s=1e-5, with_torch=False)
    assert scaling["floor"] > 0 and scaling["fastnorm"] > 0 and scaling["torch"] is None


def test_progress_plain_text():
    stream = io.StringIO()
    progress = bench.Progress(40, stream=stream)
    for k in range(40):
        progress.update(f"case{k}")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert 1 <= len(lines) <= 21  # one line per 5 % step when not a terminal
    assert lines[-1].startswith("[" + "#" * 30 + "] 40/40")


def test_format_time():
    assert bench.format_time(12.3e-6) == "12.3 us"
    assert bench.format_time(4.561e-3) == "4.56 ms"
    assert bench.format_time(None) == "-"


# --------------------------------------------------------------------------- main()


@pytest.fixture
def fake_cli(monkeypatch):
    """Replace the timing in main() by scripted ratios (attempt = seed offset)."""
    script = {}

    def measure_case(case, rounds=7, threads=None, target_s=0.005, with_torch=True, seed=0, **options):
        with_floor, with_onednn = options.get("with_floor", False), options.get("with_onednn", False)
        values = script[case.id]
        vs_memcpy, vs_torch = values[min(seed, len(values) - 1)]
        return m(
            case.id,
            vs_memcpy,
            vs_torch,
            rounds,
            vs_floor=vs_memcpy / 2 if with_floor else None,
            vs_onednn=vs_memcpy / 4 if with_onednn else None,
        )

    def measure_in_fresh_process(case, args, threads, rounds, target_s, with_torch, seed):
        fresh_processes.append((case.id, seed))
        return measure_case(case, rounds, threads, target_s, with_torch, seed)

    fresh_processes = script["fresh processes"] = []
    monkeypatch.setattr(cli, "measure_case", measure_case)
    monkeypatch.setattr(cli, "_measure_in_fresh_process", measure_in_fresh_process)
    # main() would change this process's allocator (see test_reuse_freed_memory_...)
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: True)
    return script


def test_main_check_fails_naming_the_case(tmp_path, fake_cli, capsys):
    fake_cli.update({CASE: [(4.0, 0.5)], OTHER: [(1.0, 0.5)]})
    path = write(
        tmp_path,
        f'[cases]\n"{CASE}" = {{ max_vs_memcpy = 3.0 }}\n"{OTHER}" = {{ max_vs_memcpy = 3.0 }}\n',
    )
    json_path = tmp_path / "check.json"
    status = bench.main(["--check", "--thresholds", str(path), "--json", str(json_path), "--threads", "1"])
    out = capsys.readouterr().out
    assert status == 1
    assert "check FAILED" in out and f"{CASE}: fastnorm/memcpy = 4 > threshold 3 (+33%)" in out
    assert OTHER not in out.split("check FAILED")[1]
    assert {c["id"] for c in json.loads(json_path.read_text())["cases"]} == {CASE, OTHER}


def test_main_check_passes_after_recheck(tmp_path, fake_cli, capsys):
    fake_cli.update({CASE: [(4.0, 0.5), (2.0, 0.5)]})
    path = write(tmp_path, f'[cases]\n"{CASE}" = {{ max_vs_memcpy = 3.0, max_vs_torch = 1.0 }}\n')
    assert bench.main(["--check", "--thresholds", str(path), "--no-torch", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "check passed" in out and "re-measured after a first failure" in out
    assert fake_cli["fresh processes"] == [(CASE, 1)]


def test_main_check_measures_the_peers_its_thresholds_bound(tmp_path, capsys):
    """A thresholds file with oneDNN and ONNX Runtime limits makes --check measure both, with no
    --onednn / --onnxruntime flag: generous limits pass, an impossible one fails naming its metric."""
    case_id = "ln-fwd-nchw-f32-1x768"
    run = ["--check", "--threads", "1", "--rounds", "2", "--target-ms", "0.1", "--rechecks", "0"]
    for onnxruntime_limit, status in ((1000, 0), (1e-6, 1)):
        limits = f"max_vs_memcpy = 1000, max_vs_onednn = 1000, max_vs_onnxruntime = {onnxruntime_limit:g}"
        path = write(tmp_path, f'[cases]\n"{case_id}" = {{ {limits} }}\n')
        json_path = tmp_path / "check.json"
        assert bench.main([*run, "--thresholds", str(path), "--json", str(json_path)]) == status
        (entry,) = json.loads(json_path.read_text())["cases"]
        assert entry["fastnorm_over_onednn"] > 0 and entry["fastnorm_over_onnxruntime"] > 0
        out = capsys.readouterr().out
        assert ("fastnorm/onnxruntime =" in out) == (status == 1), out
        assert "not checked" not in out


def test_capi_overhead_python_side_runs():
    """benchmarks/capi_overhead.py's Python timings (API and bare kernel dispatch) run on the
    current kernels; the C side needs a build and runs by hand."""
    from benchmarks.capi_overhead import python_times

    times, kernel = python_times((1, 64, 8, 8), 2, 1)
    assert set(times) == {"forward_training", "forward_inference", "backward"}
    assert all(t > 0 for t in times.values()) and kernel > 0


def test_remeasure_in_a_fresh_process(tmp_path):
    """The gate's re-measurement runs ``python -m benchmarks`` for the one case and reads its JSON."""
    args = cli.build_parser().parse_args(["--floor"])
    case_id = "ln-fwd-nchw-f32-1x768"
    (case,) = bench.select_cases(ids=[case_id])
    measurement = cli._measure_in_fresh_process(case, args, 1, 2, 1e-4, False, 3)
    assert measurement.case_id == case_id and measurement.rounds == 2
    assert measurement.vs_memcpy > 0 and measurement.vs_floor > 0 and measurement.vs_torch is None


def test_main_check_only_selected_cases(tmp_path, fake_cli, capsys):
    fake_cli.update({CASE: [(9.0, 9.0)], OTHER: [(1.0, 0.5)]})
    path = write(
        tmp_path,
        f'[cases]\n"{CASE}" = {{ max_vs_memcpy = 3.0 }}\n"{OTHER}" = {{ max_vs_memcpy = 3.0 }}\n',
    )
    assert bench.main(["--check", "--thresholds", str(path), "--kinds", "ln", "--threads", "1"]) == 0


def test_main_usage_errors(tmp_path, capsys):
    assert bench.main(["--check", "--thresholds", str(tmp_path / "missing.toml")]) == 2
    bad = write(tmp_path, "[cases]\n'nope' = { max_vs_memcpy = 1 }\n")
    assert bench.main(["--check", "--thresholds", str(bad)]) == 2
    assert "unknown case id" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        bench.main(["--kinds", "xx"])
    assert info.value.code == 2


def test_main_list(capsys):
    assert bench.main(["--list", "--quick", "--kinds", "rms", "--passes", "inf"]) == 0
    assert capsys.readouterr().out.split() == ["rms-inf-nchw-f32-512x768", "rms-inf-nchw-f32-4096x768"]


def test_main_writes_thresholds_from_json(tmp_path, capsys):
    results = {
        "meta": {"rounds": 7, "threads": 2, "target_ms": 5.0, "date": "d"},
        "cases": [{"id": CASE, "fastnorm_over_memcpy": 2.0, "fastnorm_over_torch": 0.3}],
    }
    source = tmp_path / "run.json"
    source.write_text(json.dumps(results))
    target = tmp_path / "t.toml"
    assert bench.main(["--thresholds-from", str(source), "--write-thresholds", str(target)]) == 0
    settings, thresholds = bench.load_thresholds(target)
    assert thresholds == {CASE: bench.Threshold(CASE, 4.0, 0.6)}
    assert settings == {"rounds": 11, "threads": 2, "target_ms": 1.0, "rechecks": 2}


def test_main_floor_option(tmp_path, fake_cli, capsys):
    fake_cli.update({CASE: [(2.0, 0.5)]})
    json_path = tmp_path / "r.json"
    assert bench.main(["--cases", CASE, "--threads", "1", "--floor", "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "fastnorm/floor" in out and "fastnorm/floor: median 1.00, worst 1.00" in out
    assert json.loads(json_path.read_text())["cases"][0]["fastnorm_over_floor"] == 1.0
    md = tmp_path / "r.md"
    assert bench.main(["--from-json", str(json_path), "--markdown", str(md)]) == 0
    assert "| fastnorm/floor |" in md.read_text()
    assert bench.main(["--cases", CASE, "--threads", "1", "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["cases"][0]["fastnorm_over_floor"] is None


def test_onednn_ratio_in_json_markdown_table_and_plot(tmp_path):
    cases = bench.select_cases(ids=[CASE, OTHER])
    measurements = {CASE: m(CASE, 2.0, 0.5, vs_onednn=0.8), OTHER: m(OTHER, 4.0, None)}
    meta = {"date": "2026-01-01", "threads": 2, "platform": "test", "onednn": "3.2.0"}
    meta["reused_freed_memory"] = True
    json_path = tmp_path / "r.json"
    bench.write_json(json_path, cases, measurements, meta)
    data = json.loads(json_path.read_text())
    assert [c["fastnorm_over_onednn"] for c in data["cases"]] == [0.8, None]
    assert data["summary"]["fastnorm/onednn"] == {"worst": 0.8, "worst_case": CASE, "median": 0.8}
    md_path = tmp_path / "r.md"
    bench.write_markdown(md_path, cases, measurements, meta)
    text = md_path.read_text()
    assert "| onednn | fastnorm/onednn |" in text and "| 2.50 ms | 0.80 |" in text and "| - | - |" in text
    assert "oneDNN 3.2.0; freed memory reused." in text
    assert "fastnorm/onednn: median 0.80" in bench.format_table(cases, measurements)
    assert "onednn" not in bench.format_table(cases, {CASE: m(CASE, 2.0), OTHER: m(OTHER, 4.0)})
    if report._require_matplotlib() is not None:
        bench.write_plot(tmp_path / "p.png", cases, measurements)
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_main_onednn_option_and_freed_memory_setting(tmp_path, fake_cli, capsys):
    from benchmarks.baselines import onednn

    try:  # main() loads oneDNN for --onednn (the bench extra installs it)
        bench.load_onednn()
    except onednn.OneDNNError as exc:
        pytest.skip(f"oneDNN not loadable: {exc}")
    fake_cli.update({CASE: [(2.0, 0.5)]})
    json_path = tmp_path / "r.json"
    args = ["--cases", CASE, "--threads", "1", "--json", str(json_path)]
    assert bench.main([*args, "--onednn"]) == 0
    assert "fastnorm/onednn: median 0.50, worst 0.50" in capsys.readouterr().out
    data = json.loads(json_path.read_text())
    assert data["cases"][0]["fastnorm_over_onednn"] == 0.5
    assert data["meta"]["reused_freed_memory"] is True
    assert bench.main([*args, "--fresh-pages"]) == 0
    data = json.loads(json_path.read_text())
    assert data["cases"][0]["fastnorm_over_onednn"] is None
    assert data["meta"]["reused_freed_memory"] is False


def test_main_onednn_missing_is_a_usage_error(tmp_path, fake_cli, capsys, monkeypatch):
    from benchmarks.baselines import onednn

    def fail():
        raise onednn.OneDNNError("cannot load oneDNN (test)")

    monkeypatch.setattr(onednn, "load", fail)
    fake_cli.update({CASE: [(2.0, 0.5)]})
    assert bench.main(["--cases", CASE, "--threads", "1", "--onednn"]) == 2
    assert "error: --onednn: cannot load oneDNN (test)" in capsys.readouterr().err


def test_reuse_freed_memory_keeps_large_blocks_in_the_heap():
    """After the call, a 40 MB block comes from the heap (below the program break), not from mmap.

    glibc maps a block above its mmap threshold (at most 32 MiB) afresh on every
    allocation, and returns it on free: its pages fault again at each use.
    """
    code = (
        "import ctypes\n"
        "import benchmarks as bench\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p; libc.malloc.argtypes = [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.sbrk.restype = ctypes.c_void_p; libc.sbrk.argtypes = [ctypes.c_ssize_t]\n"
        "def from_heap():\n"
        "    block = libc.malloc(40 << 20); brk = libc.sbrk(0); libc.free(block)\n"
        "    return block < brk\n"
        "print(from_heap(), bench.reuse_freed_memory(), from_heap())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, applied, after = done.stdout.split()
    if applied == "False":
        pytest.skip("not glibc: mallopt is unavailable")
    assert (before, after) == ("False", "True")


def test_main_full_run_with_fake_timing(tmp_path, fake_cli, capsys):
    fake_cli.update({CASE: [(2.0, 0.5)]})
    target = tmp_path / "t.toml"
    md = tmp_path / "r.md"
    status = bench.main(
        ["--cases", CASE, "--threads", "1", "--write-thresholds", str(target), "--markdown", str(md)]
    )
    assert status == 0
    assert CASE in capsys.readouterr().out
    assert bench.load_thresholds(target)[1] == {CASE: bench.Threshold(CASE, 4.0, 1.0)}
    assert CASE in md.read_text()


# --------------------------------------------------------------------------- workloads (smoke)


# torch 2.13 returns a wrong dx for instance_norm on a channels-last tensor with N=1
# (torch with NCHW memory, and fastnorm in both layouts, agree with each other).
TORCH_IN_CL_N1 = pytest.mark.xfail(
    reason="torch 2.13 bug: instance_norm backward, channels_last memory, batch of 1", strict=True
)
SMOKE = [
    pytest.param(c, id=c.id, marks=TORCH_IN_CL_N1 if c.id == "in-bwd-nhwc-f64-1x64x8x8" else ())
    for c in bench.select_cases(sizes=["tiny"], dtypes=["float64"])
]


@pytest.mark.parametrize("smoke", SMOKE)
def test_workload_computes_the_same_as_torch(smoke):
    """Each workload runs, and fastnorm and torch do the same work (same results)."""
    workload = bench.make_workload(smoke)
    workload.memcpy()
    workload.floor()
    result = workload.fastnorm()
    if workload.torch is None:
        pytest.skip("torch is not installed")
    expected = workload.torch()
    if smoke.pass_ == "fwd":
        result = result[0]
    if smoke.pass_ == "bwd":
        got = [r for r in result if r is not None]
        expected = [e.numpy() for e in expected]
    else:
        got, expected = [result], [expected.numpy()]
    if smoke.layout == "nhwc":
        got[0] = np.moveaxis(got[0], -1, 1)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("epilogue", bench.select_cases(passes=bench.EPILOGUE_PASSES), ids=lambda c: c.id)
def test_epilogue_workload_computes_the_same_as_torch(epilogue):
    """The fused workloads and torch's composites compute the same ``y`` (and ``h``) or ``dx``."""
    workload = bench.make_workload(epilogue)
    result = workload.fastnorm()
    if workload.torch is None:
        pytest.skip("torch is not installed")
    expected = workload.torch()
    if epilogue.pass_.endswith("_fwd"):
        got, want = result[0], expected.numpy()
    else:
        got, want = result.dx, expected[0].numpy()
    if epilogue.layout == "nhwc":
        got = np.moveaxis(got, -1, 1)
    scale = float(np.abs(want).max())
    close = np.isclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    if epilogue.pass_ == "resrelu_fb":
        # At ReLU's kink the two float32 computations of z may round to opposite sides of 0:
        # there (only there) dz, hence dx, differs by about dy.
        inputs = {k: np.asarray(v, np.float64) for k, v in workload.inputs.items()}
        x = inputs["x"]
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        rstd = 1 / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + bench.cases.EPS)
        z = (x - mean) * rstd * inputs["weight"].reshape(1, -1, 1, 1) + inputs["bias"].reshape(1, -1, 1, 1)
        z = z + inputs["other"]
        assert np.all(np.abs(z[~close]) < 1e-5 * np.abs(z).max()), epilogue.id
        close |= np.abs(z) < 1e-5 * np.abs(z).max()
    assert close.all(), f"{epilogue.id}: {np.count_nonzero(~close)} elements differ"


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, fake_cli, capsys):
    monkeypatch.setattr(cli, "_require_matplotlib", lambda: None)
    fake_cli.update({CASE: [(2.0, 0.5)]})
    assert bench.main(["--cases", CASE, "--threads", "1", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_write_plot(tmp_path):
    pytest.importorskip("matplotlib")
    cases = bench.select_cases(ids=[CASE, OTHER])
    path = tmp_path / "p.png"
    bench.write_plot(path, cases, {CASE: m(CASE, 2.0, 0.5), OTHER: m(OTHER, 4.0, None)}, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_renders_saved_json(tmp_path, capsys):
    cases = bench.select_cases(ids=[CASE, OTHER])
    measurements = {CASE: m(CASE, 2.0, 0.5), OTHER: m(OTHER, 4.0, None)}
    saved = tmp_path / "run.json"
    bench.write_json(saved, cases, measurements, {"threads": 2, "argv": ["--quick"]})
    md = tmp_path / "table.md"
    assert bench.main(["--from-json", str(saved), "--markdown", str(md), "--kinds", "bn"]) == 0
    text = md.read_text()
    assert CASE in text and OTHER not in text and "python -m benchmarks --quick" in text
    assert bench.main(["--from-json", str(tmp_path / "missing.json")]) == 2


def _spincount_after_optional_torch(env):
    code = (
        "import os, sys; import benchmarks as bench; "
        "assert 'torch' not in sys.modules; bench.optional_torch(); "
        "print(os.environ.get('GOMP_SPINCOUNT')); "
        "print(bench.environment(1)['gomp_spincount'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_torch_is_imported_with_a_short_openmp_spin():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _spincount_after_optional_torch(env) == [bench.TORCH_SPINCOUNT] * 2
    env["GOMP_SPINCOUNT"] = "777"  # the user's own setting wins
    assert _spincount_after_optional_torch(env) == ["777"] * 2


# --------------------------------------------------------------------------- network layers


def test_network_cases_are_opt_in_and_cover_the_layers_named():
    """--networks: ResNet-50 BN, UNet GN at C = 320/640/1280, style-transfer IN, ConvNeXt/ViT LN and
    LLaMA RMS rows of 2048-8192, every pass, float32 unless dtypes; never in the default sweep."""
    default_ids = {c.id for c in bench.all_cases()}
    cases = bench.select_cases(networks=True)
    assert cases and not default_ids & {c.id for c in cases}
    assert not [c for c in bench.select_cases() if c.size == "net"]
    assert {c.dtype for c in cases} == {"float32"} and {c.size for c in cases} == {"net"}
    assert {c.pass_ for c in cases} == set(bench.PASSES)
    assert {c.shape[1] for c in cases if c.kind == "gn"} == {320, 640, 1280}
    assert {c.shape[1] for c in cases if c.kind == "rms"} == {2048, 4096, 8192}
    assert {c.layout for c in cases if c.kind in ("bn", "gn", "in")} == set(bench.LAYOUTS)
    assert len(cases) == sum(3 * len(layouts) for _, layouts, _, _ in bench.NETWORK_CASES)
    (one,) = bench.select_cases(ids=["gn-bwd-nhwc-f32-2x1280x8x8"])
    assert one.size == "net" and one.memory_shape == (2, 8, 8, 1280)
    narrowed = bench.select_cases(networks=True, kinds=["rms"], passes=["fwd"], dtypes=["f64"])
    assert [c.id for c in narrowed] == [
        "rms-fwd-nchw-f64-4096x2048",
        "rms-fwd-nchw-f64-2048x4096",
        "rms-fwd-nchw-f64-1024x8192",
    ]


def test_main_lists_the_network_cases(capsys):
    assert bench.main(["--list", "--networks", "--kinds", "in", "--passes", "inf", "--layouts", "nhwc"]) == 0
    assert capsys.readouterr().out.split() == ["in-inf-nhwc-f32-4x64x128x128", "in-inf-nhwc-f32-4x128x64x64"]


# --------------------------------------------------------------------------- 16-bit dtypes

HALF_CASE = "ln-bwd-nchw-bf16-512x768"


def test_half_cases_are_opt_in():
    """bfloat16/float16 cases exist (ids, --dtypes, --cases, --half) but stay out of the default sweep."""
    default = bench.all_cases()
    every = bench.all_cases(half=True)
    plain = [c for c in default if c.pass_ in bench.PASSES]
    assert len(every) == len(default) + len(plain)  # the plain cases in 2 more dtypes, not the epilogues
    assert not [c for c in default if c.half] and not [c for c in bench.select_cases() if c.half]
    assert {c.dtype for c in every} == set(bench.DTYPES)
    assert {c.dtype for c in every if c.pass_ in bench.EPILOGUE_PASSES} == {"float32"}
    (half,) = bench.select_cases(ids=[HALF_CASE])
    assert half.half and half.nbytes == 512 * 768 * 2 and half.numpy_dtype.name == "bfloat16"
    assert case("ln-bwd-nchw-f32-512x768").nbytes == 2 * half.nbytes
    short = bench.select_cases(dtypes=["bf16", "f16"], sizes=["tiny"], kinds=["rms"], passes=["fwd"])
    assert [c.id for c in short] == ["rms-fwd-nchw-bf16-1x768", "rms-fwd-nchw-f16-1x768"]
    with pytest.raises(ValueError, match="unknown dtype"):
        bench.select_cases(dtypes=["f8"])


def test_half_set_pairs_each_16_bit_case_with_its_float32_twin():
    cases = bench.select_cases(half_set=True)
    keys = {(c.kind, c.pass_, c.layout, c.shape) for c in cases}
    assert len(cases) == 3 * len(keys) == 48  # 12 BN/IN/GN + 4 LN/RMS rows, 3 dtypes each
    for key in keys:
        assert sorted(c.dtype for c in cases if (c.kind, c.pass_, c.layout, c.shape) == key) == sorted(
            bench.cases.HALF_SET_DTYPES
        )
    assert {c.shape for c in cases} == {(32, 64, 56, 56), (4096, 768)}
    assert {c.pass_ for c in cases} == {"fwd", "bwd"}
    narrowed = bench.select_cases(half_set=True, dtypes=["bf16"], passes=["inf"], kinds=["ln"])
    assert [c.id for c in narrowed] == ["ln-inf-nchw-bf16-4096x768"]


def test_main_lists_the_half_set_and_checks_16_bit_thresholds(tmp_path, fake_cli, capsys):
    assert bench.main(["--list", "--half", "--kinds", "rms", "--passes", "fwd"]) == 0
    assert capsys.readouterr().out.split() == [
        "rms-fwd-nchw-f32-4096x768",
        "rms-fwd-nchw-bf16-4096x768",
        "rms-fwd-nchw-f16-4096x768",
    ]
    # a thresholds file may list 16-bit cases; --check measures them without --dtypes
    fake_cli.update({HALF_CASE: [(2.0, 0.5)], CASE: [(1.0, 0.5)]})
    path = write(
        tmp_path,
        f'[cases]\n"{HALF_CASE}" = {{ max_vs_memcpy = 3.0 }}\n"{CASE}" = {{ max_vs_memcpy = 3.0 }}\n',
    )
    json_path = tmp_path / "r.json"
    assert bench.main(["--check", "--thresholds", str(path), "--threads", "1", "--json", str(json_path)]) == 0
    assert "check passed: 2 case(s)" in capsys.readouterr().out
    md = tmp_path / "r.md"
    assert bench.main(["--from-json", str(json_path), "--markdown", str(md)]) == 0
    assert HALF_CASE in md.read_text()


def _as_float32(array):
    from benchmarks.baselines.torch import to_numpy

    return np.asarray(to_numpy(array) if hasattr(array, "detach") else array, dtype=np.float32)


HALF_SMOKE = [
    pytest.param(c, id=c.id, marks=TORCH_IN_CL_N1 if c.id.startswith("in-bwd-nhwc-") else ())
    for c in bench.select_cases(sizes=["tiny"], dtypes=bench.cases.HALF_DTYPES)
]


@pytest.mark.parametrize("smoke", HALF_SMOKE)
def test_half_workload_computes_the_same_as_torch(smoke):
    """16-bit workloads run (memcpy and floor on the bytes) and agree with torch's mixed-mode kernels."""
    pytest.importorskip("ml_dtypes")
    workload = bench.make_workload(smoke)
    workload.memcpy()
    workload.floor()
    result = workload.fastnorm()
    if workload.torch is None:
        pytest.skip(workload.torch_skip or "torch is not installed")
    expected = workload.torch()
    if smoke.pass_ == "fwd":
        result = result[0]
    got = [r for r in result if r is not None] if smoke.pass_ == "bwd" else [result]
    expected = list(expected) if smoke.pass_ == "bwd" else [expected]
    assert got[0].dtype == smoke.numpy_dtype and _as_float32(expected[0]).shape == smoke.shape
    if smoke.layout == "nhwc":
        got[0] = np.moveaxis(got[0], -1, 1)
    assert len(got) == len(expected)
    # outputs rounded to 16 bits from float32 on both sides: within 2 units of the format's last place
    ulp = 2.0**-7 if smoke.dtype == "bfloat16" else 2.0**-10
    for a, b in zip(got, expected, strict=True):
        a, b = _as_float32(a), _as_float32(b)
        np.testing.assert_allclose(a, b, rtol=2 * ulp, atol=2 * ulp * float(np.abs(b).max()))


def test_half_memcpy_and_floor_move_the_16_bit_bytes():
    pytest.importorskip("ml_dtypes")
    (half,) = bench.select_cases(ids=["ln-fwd-nchw-f16-1x768"])
    workload = bench.make_workload(half, with_torch=False)
    workload.memcpy()  # np.copyto of the uint16 view; the floor copies the same bytes
    workload.floor()


def _host_has_avx512_core():
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return all(features.get(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq"))


@pytest.mark.skipif(not _host_has_avx512_core(), reason="oneDNN's bfloat16 kernels need AVX-512")
def test_half_onednn_bf16_matches_fastnorm():
    """oneDNN's bfloat16 primitives (f32 scale/shift) compute the same pass as fastnorm's bf16 kernels."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import fastnorm
    from benchmarks.baselines import onednn

    try:
        bench.load_onednn()
    except onednn.OneDNNError as exc:
        pytest.skip(f"oneDNN not loadable: {exc}")
    rng = np.random.default_rng(5)
    for kind, layout, shape, spec in [
        ("batch_norm", "nchw", (3, 16, 5, 7), fastnorm.NormSpec.batch_norm()),
        ("batch_norm", "nhwc", (3, 5, 7, 16), fastnorm.NormSpec.batch_norm(channels_last=True)),
        ("layer_norm", "nchw", (6, 48), fastnorm.NormSpec.layer_norm(1)),
    ]:
        x = (rng.standard_normal(shape) * 2 + 1).astype(ml_dtypes.bfloat16)
        dy = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
        channels = shape[-1] if layout == "nhwc" or kind == "layer_norm" else shape[1]
        weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        bias = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
        y, stats = fastnorm.forward(x, spec, weight, bias)
        dx, dweight, dbias = fastnorm.backward(dy, x, stats, spec, weight)
        mean = np.asarray(stats.mean, np.float32).reshape(-1)
        variance = (1.0 / np.square(stats.rstd) - bench.cases.EPS).astype(np.float32).reshape(-1)
        for pass_, want in (("fwd", y), ("inf", y), ("bwd", dx)):
            out = np.zeros_like(x)
            grads = (np.zeros_like(weight), np.zeros_like(bias))
            m, v = (mean.copy(), variance.copy())
            try:
                primitive = onednn.normalization(
                    kind, pass_, layout, x, out, weight, bias, m, v, 1e-5, dy, grads
                )
            except onednn.OneDNNError as exc:
                assert exc.status == onednn.UNIMPLEMENTED
                pytest.skip(f"oneDNN has no bfloat16 {kind} on this CPU")
            primitive()
            want32, got32 = want.astype(np.float32), out.astype(np.float32)
            scale = float(np.abs(want32).max())
            np.testing.assert_allclose(
                got32, want32, rtol=2**-6, atol=2**-6 * scale, err_msg=f"{kind} {pass_}"
            )
            if pass_ == "bwd":
                np.testing.assert_allclose(grads[0], dweight, rtol=1e-2, atol=1e-2 * np.abs(dweight).max())
                np.testing.assert_allclose(grads[1], dbias, rtol=1e-2, atol=1e-2 * np.abs(dbias).max())
    with pytest.raises(ValueError, match="C-contiguous float32"):  # data and out must share a dtype
        onednn.normalization("layer_norm", "fwd", "nchw", x, out.astype(np.float32), weight, bias, m, v, 1e-5)


def test_half_onednn_workload_is_none_where_unimplemented():
    pytest.importorskip("ml_dtypes")
    from benchmarks.baselines import onednn

    try:
        bench.load_onednn()
    except onednn.OneDNNError as exc:
        pytest.skip(f"oneDNN not loadable: {exc}")
    for case_id in ("bn-fwd-nchw-bf16-1x64x8x8", "ln-bwd-nchw-bf16-1x768", "bn-bwd-nhwc-f16-1x64x8x8"):
        (half,) = bench.select_cases(ids=[case_id])
        workload = bench.make_workload(half, with_torch=False, with_onednn=True)
        if workload.onednn is not None:  # bfloat16 on AVX-512; float16 only on avx512_core_fp16
            workload.onednn()
    (gn,) = bench.select_cases(ids=["gn-fwd-nchw-bf16-1x64x8x8"])
    assert bench.make_workload(gn, with_torch=False, with_onednn=True).onednn is None


def test_half_table_formatting_and_options(monkeypatch, capsys):
    from benchmarks import half

    samples = {"f32": [2.0e-3, 2.2e-3], "bf16": [1.0e-3, 1.2e-3], "torch_bf16": [4.0e-3, 4.0e-3]}
    table = half.format_rows([("bn fwd nchw 32x64x56x56", samples)])
    row = table.splitlines()[2]
    assert row.startswith("| bn fwd nchw 32x64x56x56 | 2.10 | 1.10 | 0.52 | 4.00 | 0.28 | - | - | - |")
    assert len(table.splitlines()[0].split("|")) == len(row.split("|"))
    monkeypatch.setattr(
        half, "measure", lambda *a, **k: ([("x", samples)], ["a-f16: no torch baseline: why"])
    )
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: True)
    half.main(["--rounds", "1", "--no-torch", "--no-onednn", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| x | 2.10 |" in out and "- no torch baseline: why: a-f16" in out
    for bad in (["--dtypes", "f64"], ["--kinds", "xx"], ["--passes", "skip_fwd"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            half.main(bad)


def test_prepared_table_formatting_and_options(monkeypatch, capsys):
    from benchmarks import prepared

    samples = {"public": [8e-6, 10e-6], "prepared": [3e-6, 3e-6], "onednn": [4e-6, 6e-6]}
    table = prepared.format_rows([("bn-fwd-nhwc-f32-1x64x8x8", samples)])
    header, _, row = table.splitlines()
    # public/prepared times in us; prepared/public = median(3/8, 3/10); public/oneDNN = median(2, 5/3)
    assert row == "| bn-fwd-nhwc-f32-1x64x8x8 | 9.0 | 3.0 | 0.34 | 5.0 | 1.83 | 0.62 | - | - |"
    assert len(header.split("|")) == len(row.split("|"))
    calls = []

    def measure(*args):
        calls.append(args)
        return [("x", samples)]

    monkeypatch.setattr(prepared, "measure", measure)
    monkeypatch.setattr(runtime, "reuse_freed_memory", lambda: True)
    prepared.main(["--rounds", "2", "--no-torch", "--no-onednn", "--threads", "1", "--kinds", "ln"])
    assert calls == [(2, ["ln"], ["fwd", "inf", "bwd"], ["tiny", "mid"], False, False)]
    assert "| x | 9.0 | 3.0 |" in capsys.readouterr().out
    for bad in (["--kinds", "xx"], ["--sizes", "huge"], ["--passes", "skip_fwd"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            prepared.main(bad)


def test_prepared_workload_matches_the_public_call():
    """The bench's prepared callable runs the case's call: same bits as the public one."""
    for case in bench.select_cases(ids=["bn-bwd-nhwc-f32-1x64x8x8", "ln-fwd-nchw-f32-512x768"]):
        assert bench.make_workload(case, with_torch=False).prepared is None  # only on request
        workload = bench.make_workload(case, with_torch=False, with_prepared=True)
        expected = [np.copy(a) for a in _outputs(workload.fastnorm())]
        assert all(np.array_equal(a, b) for a, b in zip(_outputs(workload.prepared()), expected, strict=True))


def _outputs(result):
    """The arrays of a pass's result: y, (y, stats) or Gradients."""
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result[1], fastnorm.Stats):
        return [result[0], result[1].mean, result[1].rstd]
    return [a for a in result if a is not None]


# --------------------------------------------------------------------------- ONNX Runtime (--onnxruntime)


def test_onnxruntime_ratio_in_json_markdown_table_and_plot(tmp_path):
    cases = bench.select_cases(ids=[CASE, OTHER])
    measurements = {CASE: m(CASE, 2.0, 0.5, vs_onnxruntime=0.4), OTHER: m(OTHER, 4.0, None)}
    meta = {"date": "2026-01-01", "threads": 2, "platform": "test", "onnxruntime": "1.32.0"}
    json_path = tmp_path / "r.json"
    bench.write_json(json_path, cases, measurements, meta)
    data = json.loads(json_path.read_text())
    assert [c["fastnorm_over_onnxruntime"] for c in data["cases"]] == [0.4, None]
    assert data["summary"]["fastnorm/onnxruntime"] == {"worst": 0.4, "worst_case": CASE, "median": 0.4}
    md_path = tmp_path / "r.md"
    bench.write_markdown(md_path, cases, measurements, meta)
    text = md_path.read_text()
    assert "| onnxruntime | fastnorm/onnxruntime |" in text and "| 5.00 ms | 0.40 |" in text
    assert "ONNX Runtime 1.32.0" in text
    assert "fastnorm/onnxruntime: median 0.40" in bench.format_table(cases, measurements)
    assert "onnxruntime" not in bench.format_table(cases, {CASE: m(CASE, 2.0), OTHER: m(OTHER, 4.0)})
    saved = tmp_path / "saved.md"  # --from-json keeps the ratio
    assert bench.main(["--from-json", str(json_path), "--markdown", str(saved)]) == 0
    assert "| 5.00 ms | 0.40 |" in saved.read_text()
    if report._require_matplotlib() is not None:
        bench.write_plot(tmp_path / "p.png", cases, measurements)
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_main_onnxruntime_option(tmp_path, fake_cli, monkeypatch, capsys):
    from benchmarks.baselines import onnxruntime

    try:  # main() imports ONNX Runtime for --onnxruntime (the bench extra installs it)
        onnxruntime.load()
    except onnxruntime.OnnxRuntimeError as exc:
        pytest.skip(f"ONNX Runtime not importable: {exc}")
    calls = []

    def measure(case, rounds=7, threads=None, target_s=0.005, with_torch=True, seed=0, **options):
        calls.append((case.id, threads, options))
        return m(case.id, 2.0, 0.5, rounds, vs_onnxruntime=0.25 if options["with_onnxruntime"] else None)

    monkeypatch.setattr(cli, "measure_case", measure)
    fake_cli.update({CASE: [(2.0, 0.5)]})
    json_path = tmp_path / "r.json"
    args = ["--cases", CASE, "--threads", "1", "--json", str(json_path)]
    assert bench.main([*args, "--onnxruntime", "--onednn"]) == 0
    out = capsys.readouterr().out
    assert "vs ONNX Runtime" in out and "fastnorm/onnxruntime: median 0.25, worst 0.25" in out
    assert calls == [(CASE, 1, {"with_floor": False, "with_onednn": True, "with_onnxruntime": True})]
    data = json.loads(json_path.read_text())
    assert data["cases"][0]["fastnorm_over_onnxruntime"] == 0.25
    assert data["meta"]["onnxruntime"] == onnxruntime.load().__version__
    assert bench.main(args) == 0  # without the option: no ONNX Runtime, no ratio
    assert calls[1] == (CASE, 1, {"with_floor": False, "with_onednn": False, "with_onnxruntime": False})
    assert json.loads(json_path.read_text())["cases"][0]["fastnorm_over_onnxruntime"] is None


def test_main_onnxruntime_missing_is_a_usage_error(fake_cli, capsys, monkeypatch):
    from benchmarks.baselines import onnxruntime

    def fail():
        raise onnxruntime.OnnxRuntimeError("cannot import ONNX Runtime (test)")

    monkeypatch.setattr(onnxruntime, "load", fail)
    fake_cli.update({CASE: [(2.0, 0.5)]})
    assert bench.main(["--cases", CASE, "--threads", "1", "--onnxruntime"]) == 2
    assert "error: --onnxruntime: cannot import ONNX Runtime (test)" in capsys.readouterr().err
