"""The regression gate: thresholds files, the ratios compared with them, and re-measurement of failures."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .cases import all_cases

DEFAULT_THRESHOLDS = Path("benchmarks") / "thresholds.toml"
_THRESHOLD_KEYS = ("max_vs_memcpy", "max_vs_torch")
_SETTING_KEYS = {"rounds": int, "threads": int, "rechecks": int, "target_ms": float}


@dataclass(frozen=True)
class Threshold:
    """Committed upper bounds of the ratios of one case (``None``: not checked).

    Attributes
    ----------
    case_id : str
    max_vs_memcpy : float or None
    max_vs_torch : float or None
    """

    case_id: str
    max_vs_memcpy: float | None = None
    max_vs_torch: float | None = None


@dataclass(frozen=True)
class Violation:
    """A ratio above its threshold.

    Attributes
    ----------
    case_id : str
    metric : str
        ``"fastnorm/memcpy"`` or ``"fastnorm/torch"``.
    measured : float
        The (best re-measured) ratio.
    limit : float
        The threshold.
    """

    case_id: str
    metric: str
    measured: float
    limit: float

    @property
    def excess(self):
        """How far above the limit, as a fraction (0.25 = 25 % slower than allowed)."""
        return self.measured / self.limit - 1.0

    def __str__(self):
        return (
            f"{self.case_id}: {self.metric} = {self.measured:.3g} > threshold {self.limit:.3g} "
            f"(+{100 * self.excess:.0f}%)"
        )


def load_thresholds(path, known_ids=None):
    """Read a thresholds file (format: see ``benchmarks/thresholds.toml``).

    Parameters
    ----------
    path : str or Path
    known_ids : set of str, optional
        Valid case ids (default: those of :func:`all_cases`, 16-bit ones included).

    Returns
    -------
    settings : dict
        The ``[settings]`` table (``rounds``, ``threads``, ``rechecks``,
        ``target_ms``), only the keys present.
    thresholds : dict of str to Threshold
        In file order.

    Raises
    ------
    ValueError
        Invalid TOML, an unknown table, key or case id, or a limit that is not
        a positive number; the message names the file and the entry.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    if known_ids is None:
        known_ids = {c.id for c in all_cases(half=True)}
    unknown_tables = set(data) - {"settings", "cases"}
    if unknown_tables:
        raise ValueError(
            f"{path}: unknown top-level key(s) {sorted(unknown_tables)}; expected [settings], [cases]"
        )
    settings = {}
    for key, value in data.get("settings", {}).items():
        if key not in _SETTING_KEYS:
            raise ValueError(f"{path}: unknown setting {key!r}; expected one of {sorted(_SETTING_KEYS)}")
        kind = _SETTING_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{path}: setting {key} = {value!r} must be a positive number")
        if kind is int and not isinstance(value, int):
            raise ValueError(f"{path}: setting {key} = {value!r} must be an integer")
        settings[key] = kind(value)
    thresholds = {}
    for case_id, entry in data.get("cases", {}).items():
        if case_id not in known_ids:
            raise ValueError(f"{path}: unknown case id {case_id!r} (list valid ids with --list)")
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: case {case_id!r} must be a table like {{ max_vs_memcpy = 3.0 }}")
        extra = set(entry) - set(_THRESHOLD_KEYS)
        if extra:
            raise ValueError(
                f"{path}: case {case_id!r}: unknown key(s) {sorted(extra)}; expected {_THRESHOLD_KEYS}"
            )
        if not entry:
            raise ValueError(f"{path}: case {case_id!r} sets no threshold")
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{path}: case {case_id!r}: {key} = {value!r} must be a positive number")
        thresholds[case_id] = Threshold(
            case_id,
            None if "max_vs_memcpy" not in entry else float(entry["max_vs_memcpy"]),
            None if "max_vs_torch" not in entry else float(entry["max_vs_torch"]),
        )
    return settings, thresholds


def evaluate(measurement, threshold):
    """Compare one measurement with its thresholds.

    Parameters
    ----------
    measurement : Measurement
    threshold : Threshold

    Returns
    -------
    list of Violation
        Empty when every checked ratio is within its limit.  A torch limit is
        not checked when the measurement has no torch ratio.
    """
    violations = []
    if threshold.max_vs_memcpy is not None and measurement.vs_memcpy > threshold.max_vs_memcpy:
        violations.append(
            Violation(measurement.case_id, "fastnorm/memcpy", measurement.vs_memcpy, threshold.max_vs_memcpy)
        )
    if (
        threshold.max_vs_torch is not None
        and measurement.vs_torch is not None
        and measurement.vs_torch > threshold.max_vs_torch
    ):
        violations.append(
            Violation(measurement.case_id, "fastnorm/torch", measurement.vs_torch, threshold.max_vs_torch)
        )
    return violations


def _best_of(measurements):
    """Merge repeated measurements of one case keeping the lowest (best) ratios."""
    torch_ratios = [m.vs_torch for m in measurements if m.vs_torch is not None]
    best = min(measurements, key=lambda m: m.vs_memcpy)
    return dataclasses.replace(
        best,
        vs_memcpy=min(m.vs_memcpy for m in measurements),
        vs_torch=min(torch_ratios) if torch_ratios else None,
        rounds=sum(m.rounds for m in measurements),
    )


@dataclass
class CheckResult:
    """Outcome of :func:`run_check`.

    Attributes
    ----------
    measurements : dict of str to Measurement
        Final (best over attempts) measurement of each case.
    violations : list of Violation
        Regressions that persisted through every re-measurement.
    rechecked : list of str
        Cases that failed at first and were re-measured.
    torch_unchecked : list of str
        Cases with a torch threshold that could not be checked (no torch).
    """

    measurements: dict
    violations: list
    rechecked: list
    torch_unchecked: list

    @property
    def passed(self):
        """Whether no case regressed."""
        return not self.violations


def run_check(cases, thresholds, measure, rechecks=2, on_progress=None):
    """Measure ``cases`` and compare them with ``thresholds``, re-measuring failures.

    A case fails only if it is above a threshold in its first measurement and
    in each of ``rechecks`` re-measurements (each ratio taken as its lowest
    over the attempts), so a transient slowdown of a shared machine does not
    fail the gate, while a real regression does.

    Parameters
    ----------
    cases : sequence of Case
        Cases to check; each must have an entry in ``thresholds``.
    thresholds : dict of str to Threshold
    measure : callable
        ``measure(case, attempt)`` returns a :class:`Measurement`; ``attempt``
        is 0 for the first measurement, 1.. for re-measurements (the command
        line runs those in a new process).
    rechecks : int
        Re-measurements of a failing case.
    on_progress : callable, optional
        Called with ``(case, attempt)`` before each measurement.

    Returns
    -------
    CheckResult
    """
    measurements = {}
    attempts = {}
    failing = []
    for case in cases:
        if on_progress is not None:
            on_progress(case, 0)
        attempts[case.id] = [measure(case, 0)]
        measurements[case.id] = attempts[case.id][0]
        if evaluate(measurements[case.id], thresholds[case.id]):
            failing.append(case)
    rechecked = [case.id for case in failing]
    for attempt in range(1, rechecks + 1):
        still = []
        for case in failing:
            if on_progress is not None:
                on_progress(case, attempt)
            attempts[case.id].append(measure(case, attempt))
            measurements[case.id] = _best_of(attempts[case.id])
            if evaluate(measurements[case.id], thresholds[case.id]):
                still.append(case)
        failing = still
    violations = [v for case in failing for v in evaluate(measurements[case.id], thresholds[case.id])]
    torch_unchecked = [
        case.id
        for case in cases
        if thresholds[case.id].max_vs_torch is not None and measurements[case.id].vs_torch is None
    ]
    return CheckResult(measurements, violations, rechecked, torch_unchecked)


def worst_ratios(results, cases):
    """Largest (worst) ratios of each case over several runs' JSON results.

    Besides the median ratio of each run, the median fastnorm time over the
    *fastest* round of the reference is considered: on a loaded machine the
    reference (torch, whose OpenMP barriers suffer most from preemption) may
    have been slowed down in most rounds, and limits derived from such a run
    alone would be too tight on a quiet machine.

    Parameters
    ----------
    results : sequence of dict
        Contents of ``--json`` files (:func:`write_json`).
    cases : sequence of Case
        Cases to keep, in this order; cases absent from every result are left out.

    Returns
    -------
    dict of str to (float, float or None)
        ``case_id -> (fastnorm/memcpy, fastnorm/torch)``.
    """
    worst = {}
    for result in results:
        for entry in result["cases"]:
            memcpy, torch = entry["fastnorm_over_memcpy"], entry["fastnorm_over_torch"]
            fast, fastest = entry.get("time_s", {}).get("fastnorm"), entry.get("time_min_s", {})
            if fast is not None and fastest.get("memcpy"):
                memcpy = max(memcpy, fast / fastest["memcpy"])
            if fast is not None and torch is not None and fastest.get("torch"):
                torch = max(torch, fast / fastest["torch"])
            old_memcpy, old_torch = worst.get(entry["id"], (memcpy, torch))
            if old_torch is not None and torch is not None:
                torch = max(torch, old_torch)
            worst[entry["id"]] = (max(memcpy, old_memcpy), torch if torch is not None else old_torch)
    return {case.id: worst[case.id] for case in cases if case.id in worst}


def format_thresholds(ratios, headroom=2.0, settings=None, comment=None):
    """Render a thresholds file (TOML) from measured ratios times ``headroom``.

    Parameters
    ----------
    ratios : dict of str to (float, float or None)
        ``case_id -> (fastnorm/memcpy, fastnorm/torch)``, in output order.
    headroom : float
        Each limit is the measured ratio times this, rounded up to 2
        significant digits.
    settings : dict, optional
        The ``[settings]`` table.
    comment : str, optional
        Line(s) added to the header, e.g. where the numbers come from.

    Returns
    -------
    str
    """

    def limit(ratio):
        value = ratio * headroom
        digits = 1 - math.floor(math.log10(value))
        return math.ceil(value * 10**digits) / 10**digits

    lines = THRESHOLDS_HEADER.splitlines()
    if comment:
        lines += [f"# {line}" if line else "#" for line in comment.splitlines()]
    lines.append("")
    if settings:
        lines.append("[settings]")
        lines += [f"{k} = {v}" for k, v in settings.items()]
        lines.append("")
    lines.append("[cases]")
    for case_id, (vs_memcpy, vs_torch) in ratios.items():
        parts = [f"max_vs_memcpy = {limit(vs_memcpy):g}"]
        if vs_torch is not None:
            parts.append(f"max_vs_torch = {limit(vs_torch):g}")
        lines.append(f'"{case_id}" = {{ {", ".join(parts)} }}')
    return "\n".join(lines) + "\n"


THRESHOLDS_HEADER = """\
# fastnorm benchmark regression thresholds, read by `python -m benchmarks --check`.
#
# Format (TOML):
#
#   [settings]            optional; command-line options override these
#   rounds = 11           interleaved rounds per measurement
#   threads = 2           Numba and torch threads (clamped to the CPUs available)
#   rechecks = 2          re-measurements of a failing case before it fails
#   target_ms = 1.0       duration of a timed block (the fastest of 3 blocks counts)
#
#   [cases]               one entry per checked case id (`python -m benchmarks --list`)
#   "bn-fwd-nchw-f32-8x64x32x32" = { max_vs_memcpy = 3.0, max_vs_torch = 1.2 }
#
# max_vs_memcpy bounds fastnorm time / np.copyto time of the same tensor, and
# max_vs_torch bounds fastnorm time / torch.nn.functional time, both medians over
# rounds of the ratio of timings interleaved in one process.  Absolute times are
# never compared.  Either key may be left out (not checked); max_vs_torch is
# skipped when torch is not installed.  A case fails only if a ratio stays above
# its limit in the first measurement and in every re-measurement (each in a new
# process, with twice the rounds and fresh data).
# Regenerate from a fresh measurement with
#   python -m benchmarks --write-thresholds benchmarks/thresholds.toml --headroom 2.0
"""
