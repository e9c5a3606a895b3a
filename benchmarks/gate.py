"""The regression gate: thresholds files, the ratios compared with them, and re-measurement of failures."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .cases import all_cases

DEFAULT_THRESHOLDS = Path("benchmarks") / "thresholds.toml"
#: The ratios a threshold may bound, in file order: (thresholds key, reference as named in
#: the JSON results' ``time_s``, ``Measurement`` attribute, metric name).  memcpy is always
#: measured; the other references only when their library loads.
_RATIOS = (
    ("max_vs_memcpy", "memcpy", "vs_memcpy", "fastnorm/memcpy"),
    ("max_vs_torch", "torch", "vs_torch", "fastnorm/torch"),
    ("max_vs_onednn", "onednn", "vs_onednn", "fastnorm/onednn"),
    ("max_vs_onnxruntime", "onnxruntime", "vs_onnxruntime", "fastnorm/onnxruntime"),
)
_THRESHOLD_KEYS = tuple(key for key, *_ in _RATIOS)
_SETTING_KEYS = {"rounds": int, "threads": int, "rechecks": int, "target_ms": float}


@dataclass(frozen=True)
class Threshold:
    """Committed upper bounds of the ratios of one case (``None``: not checked).

    Attributes
    ----------
    case_id : str
    max_vs_memcpy, max_vs_torch, max_vs_onednn, max_vs_onnxruntime : float or None
        Bounds of fastnorm's time over memcpy's, torch's, oneDNN's and ONNX Runtime's.
    """

    case_id: str
    max_vs_memcpy: float | None = None
    max_vs_torch: float | None = None
    max_vs_onednn: float | None = None
    max_vs_onnxruntime: float | None = None


@dataclass(frozen=True)
class Violation:
    """A ratio above its threshold.

    Attributes
    ----------
    case_id : str
    metric : str
        ``"fastnorm/memcpy"``, ``"fastnorm/torch"``, ``"fastnorm/onednn"`` or
        ``"fastnorm/onnxruntime"``.
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
        thresholds[case_id] = Threshold(case_id, **{key: float(value) for key, value in entry.items()})
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
        Empty when every checked ratio is within its limit, else one per ratio
        above its limit, in the order of :data:`_RATIOS`.  A limit is not
        checked when the measurement lacks its ratio (torch, oneDNN or ONNX
        Runtime not loaded, or without the case).
    """
    violations = []
    for key, _, attribute, metric in _RATIOS:
        limit, measured = getattr(threshold, key), getattr(measurement, attribute)
        if limit is not None and measured is not None and measured > limit:
            violations.append(Violation(measurement.case_id, metric, measured, limit))
    return violations


def _best_of(measurements):
    """Merge repeated measurements of one case keeping the lowest (best) ratios."""
    best = min(measurements, key=lambda m: m.vs_memcpy)
    ratios = {}
    for _, _, attribute, _ in _RATIOS:
        measured = [getattr(m, attribute) for m in measurements if getattr(m, attribute) is not None]
        ratios[attribute] = min(measured) if measured else None
    return dataclasses.replace(best, **ratios, rounds=sum(m.rounds for m in measurements))


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
    unchecked : dict of str to list of str
        By metric (``"fastnorm/torch"``, ...), the cases with a limit that
        could not be checked: the measurement lacks that ratio.
    """

    measurements: dict
    violations: list
    rechecked: list
    unchecked: dict

    @property
    def passed(self):
        """Whether no case regressed."""
        return not self.violations

    @property
    def torch_unchecked(self):
        """The cases with a torch limit that could not be checked (torch not importable)."""
        return self.unchecked.get("fastnorm/torch", [])


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
    unchecked = {}
    for key, _, attribute, metric in _RATIOS:
        bounded = [case.id for case in cases if getattr(thresholds[case.id], key) is not None]
        missing = [case_id for case_id in bounded if getattr(measurements[case_id], attribute) is None]
        if missing:
            unchecked[metric] = missing
    return CheckResult(measurements, violations, rechecked, unchecked)


def worst_ratios(results, cases):
    """Largest (worst) ratios of each case over several runs' JSON results.

    Besides the median ratio of each run, the median fastnorm time over the
    *fastest* round of each reference is considered: on a loaded machine a
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
    dict of str to tuple
        ``case_id -> (fastnorm/memcpy, fastnorm/torch, fastnorm/onednn,
        fastnorm/onnxruntime)``, ``None`` for a reference no run measured.
    """
    worst = {}
    for result in results:
        for entry in result["cases"]:
            fast, fastest = entry.get("time_s", {}).get("fastnorm"), entry.get("time_min_s", {})
            old = worst.get(entry["id"], (None,) * len(_RATIOS))
            ratios = []
            for (_, reference, _, _), previous in zip(_RATIOS, old, strict=True):
                ratio = entry.get(f"fastnorm_over_{reference}")
                if ratio is not None and fast is not None and fastest.get(reference):
                    ratio = max(ratio, fast / fastest[reference])
                if ratio is not None and previous is not None:
                    ratio = max(ratio, previous)
                ratios.append(previous if ratio is None else ratio)
            worst[entry["id"]] = tuple(ratios)
    return {case.id: worst[case.id] for case in cases if case.id in worst and worst[case.id][0] is not None}


def format_thresholds(ratios, headroom=2.0, settings=None, comment=None):
    """Render a thresholds file (TOML) from measured ratios times ``headroom``.

    Parameters
    ----------
    ratios : dict of str to tuple
        ``case_id -> (fastnorm/memcpy, fastnorm/torch, ...)`` in the order of
        :func:`worst_ratios` (trailing entries may be left out), ``None`` for
        a ratio not bounded; cases in output order.
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
    for case_id, values in ratios.items():
        keys = [key for key, *_ in _RATIOS][: len(values)]
        bounds = [(key, value) for key, value in zip(keys, values, strict=True) if value is not None]
        parts = [f"{key} = {limit(value):g}" for key, value in bounds]
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
# max_vs_memcpy bounds fastnorm time / np.copyto time of the same tensor;
# max_vs_torch, max_vs_onednn and max_vs_onnxruntime bound fastnorm time / the time of
# torch.nn.functional, of oneDNN's primitive and of ONNX Runtime's one-node model;
# all are medians over rounds of the ratio of timings interleaved in one process.
# Absolute times are never compared.  Any key may be left out (not checked).  A
# torch, oneDNN or ONNX Runtime limit is skipped, and counted as unchecked, when that
# library is not installed.  A case fails only if a ratio stays above
# its limit in the first measurement and in every re-measurement (each in a new
# process, with twice the rounds and fresh data).
# Regenerate from a fresh measurement with
#   python -m benchmarks --onednn --onnxruntime --write-thresholds benchmarks/thresholds.toml
# (--headroom 2.0 by default), or from saved --json runs with --thresholds-from.
# --check measures oneDNN and ONNX Runtime when the file bounds them.
"""
