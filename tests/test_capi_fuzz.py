"""Fuzz the C ABI: ``capi/tests/fuzz.c`` under AddressSanitizer + UBSan.

The harness makes >= 2 * 10**5 random calls of the thirteen compute entry points (the plain
forward training / inference / backward, their fused forms with the residual + activation
epilogue, the skip add's forward and backward, the five passes of the BatchNorm split across
processes): random descriptors (struct_size and the epilogue fields included) and scalar arguments
(counts, momentum, merge_stats' ranks and channels), NULL / misaligned / aliased / overlapping
buffers, valid calls of every activation and of every data dtype (float16 and bfloat16 with 16-bit
or float32 parameters too) mixed in.  It checks each status against the rules of fastnorm.h and
docs/c-api.md, that invalid calls write nothing, and valid results against a float64 reference (see
the comment at the top of fuzz.c and docs/c-api.md#fuzzing).

The library is built with ``-fsanitize=address,undefined`` into a temporary
directory, like ``tests/test_capi.py::test_c_tests_under_address_sanitizer``;
the Numba cache is warmed first (``python -m fastnorm.capi --warm``, a no-op
when it is warm already).  The program runs in a clean environment.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from test_capi import ASAN_ENV, CAPI, GCC, _have_cffi, build_sanitized_library, compile_sanitized, run

# C ABI / LLVM IR: needs the compiled kernels (skipped under NUMBA_DISABLE_JIT=1, see conftest.py).
pytestmark = pytest.mark.jit

MIN_CALLS = 200_000

#: The compute entry points, as fuzz.c names them in its summary lines.
ENTRIES = (
    "forward_training",
    "forward_inference",
    "backward",
    "forward_training_fused",
    "forward_inference_fused",
    "backward_fused",
    "skip_forward_training",
    "skip_backward",
)
#: Every entry point can return each of these by the docs: all take a descriptor (struct_size:
#: VERSION_MISMATCH; mixed dtypes, flags, an activation with 16-bit data: UNSUPPORTED; dims:
#: SIZE_OVERFLOW), required pointers
#: (NULL_POINTER) and outputs (OVERLAP).  NOT_INITIALIZED and INTERNAL_ERROR (runtime start-up, out of
#: memory) must not happen here.
STATUSES = (
    "OK",
    "INVALID_ARGUMENT",
    "UNSUPPORTED",
    "NULL_POINTER",
    "SIZE_OVERFLOW",
    "OVERLAP",
    "VERSION_MISMATCH",
)
#: The BatchNorm split across processes (0.6), and the statuses each can return by the docs:
#: merge_stats takes no descriptor (no UNSUPPORTED, no VERSION_MISMATCH).
SPLIT_ENTRIES = {
    "batch_stats": STATUSES,
    "merge_stats": ("OK", "INVALID_ARGUMENT", "NULL_POINTER", "SIZE_OVERFLOW", "OVERLAP"),
    "backward_reduce": STATUSES,
    "backward_apply": STATUSES,
    "update_running_stats": STATUSES,
}
ACTIVATIONS = ("NONE", "RELU", "LEAKY_RELU", "SIGMOID", "TANH", "SILU", "GELU", "GELU_TANH")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@pytest.fixture(scope="module")
def fuzz_exe(tmp_path_factory):
    """Build the sanitized library and compile fuzz.c against it; returns the program path."""
    if GCC is None:
        pytest.skip("gcc is not available: cannot compile the C API fuzzer")
    if not _have_cffi():
        pytest.skip("cffi is not installed: cannot build libfastnorm.so")
    out = tmp_path_factory.mktemp("capi-fuzz")
    warm = subprocess.run(
        [sys.executable, "-m", "fastnorm.capi", "--warm"], capture_output=True, text=True, timeout=1200
    )
    assert warm.returncode == 0, warm.stdout + warm.stderr
    lib = build_sanitized_library(out / "asan")
    return compile_sanitized(CAPI / "tests" / "fuzz.c", out / "fuzz", lib)


def _summary(stdout):
    match = re.search(r"^fuzz: seed=(\d+) calls=(\d+) failures=(\d+)$", stdout, re.MULTILINE)
    assert match, stdout
    return int(match.group(2)), int(match.group(3))


def test_fuzz_entry_points_under_sanitizers(fuzz_exe):
    result = run([fuzz_exe, "--calls", str(MIN_CALLS + 40_000)], timeout=600, **ASAN_ENV)
    report = result.stdout + result.stderr[-6000:]
    assert result.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in result.stderr and "runtime error" not in result.stderr, report
    assert "FAIL" not in result.stderr, report
    calls, failures = _summary(result.stdout)
    assert calls >= MIN_CALLS and failures == 0, report
    # Every entry point ran (those before 0.6 about 1 / 10 of the calls each, the split passes
    # 1 / 25), with valid and rejected calls of every kind of error (each at least 0.1 % of its
    # calls).
    for entry, statuses, least in [(entry, STATUSES, MIN_CALLS // 10) for entry in ENTRIES] + [
        (entry, statuses, MIN_CALLS // 30) for entry, statuses in SPLIT_ENTRIES.items()
    ]:
        line = re.search(rf"^fuzz: {entry}: (\d+) calls:(.*)$", result.stdout, re.MULTILINE)
        assert line and int(line.group(1)) > least, (entry, report)
        for status in statuses:
            count = re.search(rf"FASTNORM_{status}=(\d+)", line.group(2))
            assert count and int(count.group(1)) > int(line.group(1)) // 1000, (entry, status, report)
        # Nothing else: no NOT_INITIALIZED, INTERNAL_ERROR or unknown value.
        assert not re.search(r"FASTNORM_(NOT_INITIALIZED|INTERNAL_ERROR)|other=", line.group(2)), report
    # Valid calls of every split pass were checked against the reference, merge_stats' also with NaN
    # moments at ranks of count 0 (which it must not read).
    line = re.search(r"^fuzz: checked per entry point:(.*)$", result.stdout, re.MULTILINE)
    assert line, report
    for entry in SPLIT_ENTRIES:
        count = re.search(rf" {entry}=(\d+)", line.group(1))
        assert count and int(count.group(1)) > MIN_CALLS // 200, (entry, report)
    nan = re.search(r"NaN moments at a rank of count 0: (\d+)", line.group(1))
    assert nan and int(nan.group(1)) > MIN_CALLS // 1000, report
    pattern = r"valid=(\d+) \(checked against the reference (\d+),.* right after an invalid call (\d+)\)"
    valid = re.search(pattern, result.stdout)
    assert valid and int(valid.group(2)) > MIN_CALLS // 10 and int(valid.group(3)) > 1000, report
    # Valid calls of every activation were checked against the reference, and backward passes with
    # z exactly at (leaky) ReLU's kink (act' = 0 / the slope there).
    line = re.search(
        r"^fuzz: checked per activation:(.*)\(.*z == 0 exactly (\d+)", result.stdout, re.MULTILINE
    )
    assert line and int(line.group(2)) > 10, report
    for activation in ACTIVATIONS:
        count = re.search(rf" {activation}=(\d+)", line.group(1))
        assert count and int(count.group(1)) > MIN_CALLS // 100, (activation, report)
    # The harness's own 16-bit conversions passed their self-check, and valid calls of every data
    # dtype were checked against the reference: float16 and bfloat16 each about 7 % of the calls
    # (each output the float32 result rounded once to nearest even), some with float32 parameters.
    conversions = re.search(r"^fuzz: 16-bit conversions: \d+ checks.*, 0 wrong$", result.stdout, re.MULTILINE)
    assert conversions, report
    line = re.search(r"^fuzz: valid per dtype[^:]*:(.*)$", result.stdout, re.MULTILINE)
    assert line, report
    for dtype in DTYPES:
        count = re.search(rf" {dtype}=\d+ \((\d+)\)", line.group(1))
        assert count and int(count.group(1)) > MIN_CALLS // 20, (dtype, report)
    mixed = re.search(r"float32 parameters checked (\d+)", line.group(1))
    assert mixed and int(mixed.group(1)) > MIN_CALLS // 50, report


def test_fuzz_seed_and_replay_arguments(fuzz_exe):
    """Another seed gives other calls; --first K --calls 1 replays call K alone."""
    a = run([fuzz_exe, "--seed", "7", "--calls", "300", "--verbose"], timeout=300, **ASAN_ENV)
    b = run([fuzz_exe, "--seed", "7", "--first", "123", "--calls", "1", "--verbose"], timeout=300, **ASAN_ENV)
    c = run([fuzz_exe, "--seed", "8", "--calls", "300", "--verbose"], timeout=300, **ASAN_ENV)
    for result in (a, b, c):
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "fuzz: seed=7 calls=300 failures=0" in a.stdout
    calls_a = [line for line in a.stdout.splitlines() if line.startswith("call ")]
    calls_b = [line for line in b.stdout.splitlines() if line.startswith("call ")]
    calls_c = [line for line in c.stdout.splitlines() if line.startswith("call ")]
    assert len(calls_a) == 300 and calls_b == [calls_a[123]]
    assert calls_a != calls_c
    assert run([fuzz_exe, "--bogus"], timeout=60).returncode == 2
