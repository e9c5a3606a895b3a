"""Reports of a run: progress bar, text table, JSON, Markdown, plot, and the machine's description."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .cases import KINDS
from .runtime import _loaded_onednn


class Progress:
    """Plain-text progress bar on a stream (stderr by default).

    On a terminal the bar is redrawn in place; otherwise a line is written at
    every 5 % step so that logs stay short.

    Parameters
    ----------
    total : int
        Number of steps.
    stream : file, optional
    width : int
        Characters of the bar.
    """

    def __init__(self, total, stream=None, width=30):
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_step = -1

    def update(self, label, advance=1, force=False):
        """Advance by ``advance`` steps and show ``label`` (``force``: write a line even between steps)."""
        self.done = min(self.done + advance, self.total)
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s elapsed, ~{eta:4.0f}s left  {label}"
        )
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
            self.stream.flush()
        else:
            step = int(frac * 20)
            if step != self._last_step or force:
                self._last_step = step
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self):
        """End the bar (newline on a terminal)."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_time(seconds):
    """Format a duration with a unit (``"12.3 us"``, ``"4.56 ms"``); ``"-"`` for ``None``."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}"


def summarize_scaling(scaling):
    """Median speed-up of fastnorm, its traffic floor and torch over :func:`measure_scaling` results.

    Parameters
    ----------
    scaling : list of dict

    Returns
    -------
    str
        One line, e.g. ``"median speed-up over 3 cases: fastnorm 1.45, floor 1.38,
        torch 1.64"`` (an implementation never measured is left out).
    """
    parts = []
    for impl in ("fastnorm", "floor", "torch"):
        values = [s[impl] for s in scaling if s.get(impl) is not None]
        if values:
            parts.append(f"{impl} {statistics.median(values):.2f}")
    return f"median speed-up over {len(scaling)} cases: {', '.join(parts)}"


#: Baselines measured only on request: (time key, ratio attribute, plot label, plot colour).
#: Their table columns and plot panels appear when any case has them.
_OPTIONAL_BASELINES = (
    ("floor", "vs_floor", "fastnorm / traffic floor (1 = bandwidth floor)", "tab:green"),
    ("onednn", "vs_onednn", "fastnorm / oneDNN (< 1: fastnorm faster)", "tab:purple"),
    ("onnxruntime", "vs_onnxruntime", "fastnorm / ONNX Runtime (< 1: fastnorm faster)", "tab:red"),
)


def _measured_baselines(ids, measurements):
    """Return the entries of :data:`_OPTIONAL_BASELINES` that any of the cases ``ids`` has a ratio for."""
    return [b for b in _OPTIONAL_BASELINES if any(getattr(measurements[i], b[1]) is not None for i in ids)]


#: Ratios of a :class:`Measurement`: (name in tables and summaries, attribute).
_METRICS = (
    ("fastnorm/torch", "vs_torch"),
    ("fastnorm/memcpy", "vs_memcpy"),
    ("fastnorm/floor", "vs_floor"),
    ("fastnorm/onednn", "vs_onednn"),
    ("fastnorm/onnxruntime", "vs_onnxruntime"),
)


def summarize(measurements):
    """Worst and median of each ratio.

    Parameters
    ----------
    measurements : iterable of Measurement

    Returns
    -------
    dict
        ``{"fastnorm/torch": {"worst", "median", "worst_case"}, "fastnorm/memcpy": {...},
        "fastnorm/floor": {...}, "fastnorm/onednn": {...}, "fastnorm/onnxruntime": {...}}``
        (a metric without any value is left out).
    """
    measurements = list(measurements)
    summary = {}
    for metric, attr in _METRICS:
        values = [(getattr(m, attr), m.case_id) for m in measurements if getattr(m, attr) is not None]
        if values:
            worst = max(values)
            summary[metric] = {
                "worst": worst[0],
                "worst_case": worst[1],
                "median": statistics.median(v for v, _ in values),
            }
    return summary


def table_rows(cases, measurements):
    """Rows (lists of str) of the results table, with a header row first.

    The ``floor``/``fastnorm/floor``, ``onednn``/``fastnorm/onednn`` and
    ``onnxruntime``/``fastnorm/onnxruntime`` columns are there when any case has them.
    """
    optional = _measured_baselines([c.id for c in cases], measurements)
    rows = [["case", "MB", "fastnorm", "torch", "fastnorm/torch", "fastnorm/memcpy"]]
    for key, _, _, _ in optional:
        rows[0] += [key, f"fastnorm/{key}"]
    for case in cases:
        m = measurements[case.id]
        row = [
            case.id,
            f"{case.nbytes / 1e6:.2f}",
            format_time(m.times.get("fastnorm")),
            format_time(m.times.get("torch")),
            _fmt_ratio(m.vs_torch),
            _fmt_ratio(m.vs_memcpy),
        ]
        for key, attr, _, _ in optional:
            row += [format_time(m.times.get(key)), _fmt_ratio(getattr(m, attr))]
        rows.append(row)
    return rows


def format_table(cases, measurements):
    """Plain-text results table.

    Parameters
    ----------
    cases : sequence of Case
    measurements : dict of str to Measurement

    Returns
    -------
    str
    """
    rows = table_rows(cases, measurements)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    for metric, s in summarize(measurements[c.id] for c in cases).items():
        lines.append(f"{metric}: median {s['median']:.2f}, worst {s['worst']:.2f} ({s['worst_case']})")
    return "\n".join(lines)


def environment(threads):
    """Describe the machine and libraries (stored with the results)."""
    import numba

    import fastnorm

    torch = sys.modules.get("torch")
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "numba_threading_layer": layer,
        "fastnorm": fastnorm.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "onednn": _onednn_version(),
        "onnxruntime": _onnxruntime_version(),
    }


def _onednn_version():
    """``"major.minor.patch"`` of the oneDNN loaded in this process, or ``None``."""
    onednn = _loaded_onednn()
    return None if onednn is None else ".".join(str(v) for v in onednn.version)


def _onnxruntime_version():
    """Return the version of the ONNX Runtime imported in this process, or ``None`` (never imports it)."""
    module = sys.modules.get("onnxruntime")
    return None if module is None else getattr(module, "__version__", None)


def results_dict(cases, measurements, meta, scaling=None):
    """JSON-ready dict of a run (see :func:`write_json`)."""
    out_cases = []
    for case in cases:
        m = measurements[case.id]
        out_cases.append(
            {
                "id": case.id,
                "kind": KINDS[case.kind],
                "pass": case.pass_,
                "layout": case.layout,
                "dtype": case.dtype,
                "size": case.size,
                "shape": list(case.shape),
                "nbytes": case.nbytes,
                "rounds": m.rounds,
                "time_s": dict(m.times),
                "time_min_s": dict(m.min_times),
                "fastnorm_over_torch": m.vs_torch,
                "fastnorm_over_memcpy": m.vs_memcpy,
                "fastnorm_over_floor": m.vs_floor,
                "fastnorm_over_onednn": m.vs_onednn,
                "fastnorm_over_onnxruntime": m.vs_onnxruntime,
            }
        )
    result = {"meta": meta, "cases": out_cases, "summary": summarize(measurements[c.id] for c in cases)}
    if scaling is not None:
        result["scaling"] = scaling
    return result


def write_json(path, cases, measurements, meta, scaling=None):
    """Write the results of a run as JSON.

    Parameters
    ----------
    path : str or Path
    cases : sequence of Case
    measurements : dict of str to Measurement
    meta : dict
        Run description (:func:`environment`, options).
    scaling : list of dict, optional
        :func:`measure_scaling` results.

    Notes
    -----
    Layout: ``{"meta": {...}, "cases": [{"id", "kind", "pass", "layout",
    "dtype", "size", "shape", "nbytes", "rounds", "time_s": {"fastnorm",
    "memcpy", "torch", "floor", "onednn", "onnxruntime"}, "fastnorm_over_torch",
    "fastnorm_over_memcpy", "fastnorm_over_floor", "fastnorm_over_onednn",
    "fastnorm_over_onnxruntime"},
    ...], "summary": {...}, "scaling": [...]}``; times
    are median seconds per call; a ratio not measured is ``null``.
    """
    data = results_dict(cases, measurements, meta, scaling)
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_markdown(path, cases, measurements, meta, scaling=None, command=None):
    """Write the results table (and the scaling table) as Markdown.

    Parameters
    ----------
    path : str or Path
    cases, measurements, meta, scaling
        As in :func:`write_json`.
    command : str, optional
        The command line that produced the results, quoted in the file.
    """
    lines = []
    if command:
        lines += [f"Generated by `{command}` on {meta.get('date', '?')}.", ""]
    lines += [
        f"Machine: {meta.get('platform')}, {meta.get('cpu_count')} CPUs, {meta.get('threads')} threads "
        f"(Numba threading layer {meta.get('numba_threading_layer')}); numba {meta.get('numba')}, "
        f"numpy {meta.get('numpy')}, torch {meta.get('torch')} "
        f"(GOMP_SPINCOUNT={meta.get('gomp_spincount')})"
        + (f", oneDNN {meta['onednn']}" if meta.get("onednn") else "")
        + (f", ONNX Runtime {meta['onnxruntime']}" if meta.get("onnxruntime") else "")
        + (
            f"; freed memory {'reused' if meta['reused_freed_memory'] else 'returned to the system'}"
            if "reused_freed_memory" in meta
            else ""
        )
        + ".",
        "",
    ]
    rows = table_rows(cases, measurements)
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
    for row in rows[1:]:
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for metric, s in summarize(measurements[c.id] for c in cases).items():
        lines.append(f"- {metric}: median {s['median']:.2f}, worst {s['worst']:.2f} (`{s['worst_case']}`)")
    if scaling:
        lines += [
            "",
            "| case | MB | fastnorm speed-up | floor speed-up | torch speed-up |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in scaling:
            lines.append(
                f"| {s['case']} | {s['nbytes'] / 1e6:.1f} | {_fmt_ratio(s['fastnorm'])} "
                f"| {_fmt_ratio(s.get('floor'))} | {_fmt_ratio(s['torch'])} |"
            )
        lines += ["", f"- {summarize_scaling(scaling)}"]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(path, cases, measurements, title=None):
    """Draw the ratios of every case (log scale) into a PNG: one panel per ratio measured.

    Parameters
    ----------
    path : str or Path
    cases : sequence of Case
    measurements : dict of str to Measurement
    title : str, optional

    Raises
    ------
    RuntimeError
        matplotlib is not installed (``pip install 'fastnorm[plot]'``).
    """
    plt = _require_matplotlib()
    if plt is None:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastnorm[plot]' (or matplotlib)")
    from matplotlib import ticker

    ids = [c.id for c in cases]
    y = np.arange(len(ids))
    height = max(3.0, 0.16 * len(ids) + 1.2)
    panels = [
        ("fastnorm / torch (< 1: fastnorm faster)", [measurements[i].vs_torch for i in ids], "tab:blue"),
        ("fastnorm / memcpy (1 = copy speed)", [measurements[i].vs_memcpy for i in ids], "tab:orange"),
    ]
    for _, attr, label, color in _measured_baselines(ids, measurements):
        panels.append((label, [getattr(measurements[i], attr) for i in ids], color))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), height), sharey=True)
    for ax, (label, values, color) in zip(axes, panels, strict=True):
        vals = np.array([np.nan if v is None else v for v in values], dtype=float)
        ax.barh(y, vals, color=color, height=0.7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(label)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(ids, fontsize=7)
    axes[0].set_ylim(len(ids) - 0.5, -0.5)  # first case on top, no margins
    for ax in axes:
        ax.tick_params(axis="x", which="both", labeltop=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
