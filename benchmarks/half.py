"""16-bit data (bfloat16, float16) against float32 and against torch's and oneDNN's 16-bit kernels.

Usage, from the repository root::

    python -m benchmarks.half [--rounds 11] [--threads N] [--kinds bn,ln] [--passes fwd,bwd]
                              [--dtypes bf16,f16] [--no-torch] [--no-onednn]

For each entry of the 16-bit comparison set (:data:`benchmarks.cases.HALF_SET`:
BatchNorm, InstanceNorm and GroupNorm on a ResNet stage, ``(32, 64, 56, 56)``
in NCHW and channels-last memory; LayerNorm and RMSNorm on BERT-base rows,
``(4096, 768)``), forward and backward, it times, interleaved in rounds in one
process (:func:`benchmarks.timing.interleaved`):

* ``f32``: :func:`fastnorm.forward` / :func:`fastnorm.backward` on float32 data;
* ``bf16``, ``f16``: the same call on the same values rounded to bfloat16
  (``ml_dtypes.bfloat16``) or float16, with float32 weight and bias;
* ``torch bf16``, ``torch f16``: ``torch.nn.functional`` on the 16-bit tensors
  in torch's mixed mode (float32 weight and bias; :mod:`benchmarks.baselines.torch`);
* ``oneDNN bf16``: oneDNN 3.2's primitive on bfloat16 buffers where it has one
  (BatchNorm, InstanceNorm NCHW, LayerNorm; float16 needs an
  ``avx512_core_fp16`` CPU);
* ``floor16``: the pass's traffic floor on the 16-bit bytes (:mod:`benchmarks.baselines.floor`).

Each workload is built as in ``python -m benchmarks`` (:func:`benchmarks.workloads.make_workload`;
the cases are ``python -m benchmarks --half``).  The table gives median times
per call and the medians over rounds of the per-round ratios; ``-`` where a
baseline has no kernel (the notes under the table say why).  The 16-bit data
halve the bytes moved, so a memory-bound pass should approach ``bf16 / f32 =
0.5``.  Each 16-bit fastnorm kernel compiles on its first call (minutes, then
cached); that call is the warm-up, never timed.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.baselines.onednn import supports
from benchmarks.cases import HALF_DTYPES, HALF_SET_PASSES, KINDS, Case, _normalize_dtypes, half_set_keys
from benchmarks.runtime import add_comparison_options, check_comparison_options, start_baselines
from benchmarks.timing import interleaved
from benchmarks.workloads import make_workload

_SHORT = {"bfloat16": "bf16", "float16": "f16"}
#: Columns of the table: ``(header, kind, a, b)``; ``kind`` ``"t"`` prints the median
#: time of entry ``a`` in ms, ``"r"`` the median ratio ``a / b``.
COLUMNS = (
    ("f32 ms", "t", "f32", None),
    ("bf16 ms", "t", "bf16", None),
    ("bf16/f32", "r", "bf16", "f32"),
    ("torch bf16 ms", "t", "torch_bf16", None),
    ("bf16/torch", "r", "bf16", "torch_bf16"),
    ("oneDNN bf16 ms", "t", "onednn_bf16", None),
    ("bf16/oneDNN", "r", "bf16", "onednn_bf16"),
    ("f16 ms", "t", "f16", None),
    ("f16/f32", "r", "f16", "f32"),
    ("torch f16 ms", "t", "torch_f16", None),
    ("f16/torch", "r", "f16", "torch_f16"),
    ("floor16 ms", "t", "floor16", None),
    ("bf16/floor16", "r", "bf16", "floor16"),
    ("f16/floor16", "r", "f16", "floor16"),
)


def _ratio(samples, a, b):
    """Median over rounds of ``samples[a] / samples[b]``, or ``None`` when either is missing."""
    if a not in samples or b not in samples:
        return None
    return statistics.median(p / q for p, q in zip(samples[a], samples[b], strict=True))


def _median_ms(samples, name):
    return statistics.median(samples[name]) * 1e3 if name in samples else None


def entries_of(kind, layout, shape, pass_, dtypes=HALF_DTYPES, with_torch=True, with_onednn=True):
    """Build the timed entries of one row of the table.

    Parameters
    ----------
    kind, layout : str
        A short kind name and a layout of :data:`benchmarks.cases.HALF_SET`.
    shape : tuple of int
        The logical shape.
    pass_ : str
        ``"fwd"``, ``"inf"`` or ``"bwd"``.
    dtypes : sequence of str
        The 16-bit dtypes to time beside float32.
    with_torch, with_onednn : bool
        Also the torch and oneDNN baselines of the 16-bit dtypes, where they have the case.

    Returns
    -------
    entries : list of (str, callable, None)
        For :func:`benchmarks.timing.interleaved`: ``f32``, ``bf16``, ``f16``,
        ``torch_bf16``, ``torch_f16``, ``onednn_bf16``, ``onednn_f16``, ``floor16``.
    notes : list of str
        Why a baseline is missing (torch or oneDNN without the case).
    """
    f32 = make_workload(Case(kind, pass_, layout, "float32", "large", shape), with_torch=False)
    entries, notes = [("f32", f32.fastnorm, None)], []
    floor16 = None
    for dtype in dtypes:
        short = _SHORT[dtype]
        case = Case(kind, pass_, layout, dtype, "large", shape)
        workload = make_workload(case, with_torch=with_torch, with_onednn=with_onednn)
        entries.append((short, workload.fastnorm, None))
        if workload.torch is not None:
            entries.append((f"torch_{short}", workload.torch, None))
        elif workload.torch_skip is not None:
            notes.append(f"{case.id}: no torch baseline: {workload.torch_skip}")
        if workload.onednn is not None:
            entries.append((f"onednn_{short}", workload.onednn, None))
        elif with_onednn and supports(KINDS[kind], layout, case.numpy_dtype):
            notes.append(f"{case.id}: no oneDNN baseline: oneDNN answers 'unimplemented' for {dtype} here")
        floor16 = floor16 or workload.floor
    if floor16 is not None:
        entries.append(("floor16", floor16, None))
    return entries, notes


def measure(
    rounds, kinds=None, passes=HALF_SET_PASSES, dtypes=HALF_DTYPES, with_torch=True, with_onednn=True
):
    """Time every selected row of the 16-bit comparison set.

    Parameters
    ----------
    rounds : int
        Interleaved rounds per row.
    kinds : collection of str, optional
        Short kind names to keep (default all of :data:`benchmarks.cases.HALF_SET`).
    passes : sequence of str
    dtypes : sequence of str
        16-bit dtypes, of :data:`benchmarks.cases.HALF_DTYPES`.
    with_torch, with_onednn : bool

    Returns
    -------
    rows : list of (str, dict)
        ``(label, samples)``: seconds per call, one value per round, per entry
        (see :func:`entries_of`).
    notes : list of str
    """
    rows, notes = [], []
    for kind, layout, shape in half_set_keys():
        if kinds is not None and kind not in kinds:
            continue
        for pass_ in passes:
            entries, row_notes = entries_of(kind, layout, shape, pass_, dtypes, with_torch, with_onednn)
            notes += row_notes
            label = f"{kind} {pass_} {layout} {'x'.join(map(str, shape))}"
            rows.append((label, interleaved(entries, rounds)))
    return rows, notes


def format_rows(rows):
    """Render :func:`measure`'s rows as a Markdown table (``-`` where an entry was not timed).

    Parameters
    ----------
    rows : list of (str, dict)

    Returns
    -------
    str
    """
    lines = ["| case | " + " | ".join(header for header, *_ in COLUMNS) + " |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 1))
    for label, samples in rows:
        cells = []
        for _, what, a, b in COLUMNS:
            value = _median_ms(samples, a) if what == "t" else _ratio(samples, a, b)
            cells.append("-" if value is None else f"{value:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.half", description=__doc__.splitlines()[0])
    add_comparison_options(parser, "row")
    parser.add_argument("--kinds", help=f"comma-separated, of {','.join(KINDS)} (default all)")
    parser.add_argument("--passes", default=",".join(HALF_SET_PASSES), help="fwd,inf,bwd (default fwd,bwd)")
    parser.add_argument(
        "--dtypes", default="bf16,f16", help="16-bit dtypes beside float32 (default bf16,f16)"
    )
    args = parser.parse_args(argv)
    args.kinds = None if args.kinds is None else set(args.kinds.split(","))
    args.passes = [p for p in args.passes.split(",") if p]
    args.dtypes = _normalize_dtypes([d for d in args.dtypes.split(",") if d])
    if not set(args.dtypes) <= set(HALF_DTYPES):
        parser.error(f"--dtypes: choose from {', '.join(HALF_DTYPES)} (or bf16, f16)")
    if args.kinds is not None and not args.kinds <= set(KINDS):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    if not set(args.passes) <= {"fwd", "inf", "bwd"}:
        parser.error("--passes: choose from fwd, inf, bwd")
    check_comparison_options(parser, args)
    return args


def main(argv=None):
    """Measure and print the table.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).
    """
    args = _parse_args(argv)
    baselines = start_baselines(not args.no_torch, not args.no_onednn, args.threads)
    torch, onednn_version, reused, threads = baselines
    rows, notes = measure(
        args.rounds, args.kinds, args.passes, args.dtypes, torch is not None, onednn_version is not None
    )
    torch_note = f"torch {torch.__version__} mixed (float32 weight/bias)" if torch is not None else "no torch"
    onednn_note = f"oneDNN {onednn_version}" if onednn_version else "no oneDNN"
    print(
        f"medians of {args.rounds} interleaved rounds, {threads} threads; {torch_note}; {onednn_note}; "
        f"freed memory {'reused' if reused else 'not reused'}; ratios: medians of per-round ratios"
    )
    print(format_rows(rows))
    for note in _grouped(notes):
        print(f"- {note}")


def _grouped(notes):
    """``"<case id>: <reason>"`` notes as one line per reason, listing its case ids."""
    by_reason = {}
    for note in notes:
        case_id, reason = note.split(": ", 1)
        by_reason.setdefault(reason, []).append(case_id)
    return [f"{reason}: {', '.join(ids)}" for reason, ids in by_reason.items()]


if __name__ == "__main__":
    main()
