"""Prepared calls (:func:`fastnorm.prepare`) against the public call and oneDNN's bound primitive.

Usage, from the repository root::

    python -m benchmarks.prepared [--rounds 11] [--threads N] [--kinds bn,ln]
                                  [--passes fwd,inf,bwd] [--sizes tiny,mid]

oneDNN's baseline (:mod:`benchmarks.baselines.onednn`) is a primitive created
once and bound to its buffers: a timed call only executes it.  fastnorm's
public call checks every argument on every call.  This table puts the two
ways of calling fastnorm side by side, interleaved in rounds in one process
(:func:`benchmarks.timing.interleaved`), on the float32 cases of
``python -m benchmarks`` (:func:`benchmarks.workloads.make_workload`):

* ``public``: ``fastnorm.forward`` / ``forward_inference`` / ``backward``
  with ``out=``, the bench's fastnorm entry;
* ``prepared``: the same call through ``fastnorm.prepare``, checked once;
* ``oneDNN``: oneDNN's primitive on the same data (``-`` where it has none);
* ``torch``: ``torch.nn.functional`` on the same data.

The checks cost a few microseconds per call, so the difference shows on tiny
and cache-sized tensors; on large ones both run the same kernel.
"""

from __future__ import annotations

import argparse

from benchmarks.baselines.onednn import supports
from benchmarks.cases import KINDS, SIZES, select_cases
from benchmarks.half import _median_ms, _ratio
from benchmarks.runtime import add_comparison_options, check_comparison_options, start_baselines
from benchmarks.timing import interleaved
from benchmarks.workloads import make_workload

#: Columns: ``(header, kind, a, b)``; ``"t"`` prints the median time of ``a`` in
#: microseconds, ``"r"`` the median per-round ratio ``a / b``.
COLUMNS = (
    ("public us", "t", "public", None),
    ("prepared us", "t", "prepared", None),
    ("prepared/public", "r", "prepared", "public"),
    ("oneDNN us", "t", "onednn", None),
    ("public/oneDNN", "r", "public", "onednn"),
    ("prepared/oneDNN", "r", "prepared", "onednn"),
    ("torch us", "t", "torch", None),
    ("prepared/torch", "r", "prepared", "torch"),
)


def measure(rounds, kinds, passes, sizes, with_torch=True, with_onednn=True):
    """Time the selected float32 cases; return ``[(case id, samples by entry)]``.

    Parameters
    ----------
    rounds : int
        Interleaved rounds per case.
    kinds, passes, sizes : collection of str
        Short kind names, passes (``fwd``, ``inf``, ``bwd``) and sizes to keep.
    with_torch, with_onednn : bool
        Also time torch and oneDNN (where it has the case).
    """
    rows = []
    for case in select_cases(kinds=kinds, passes=passes, sizes=sizes, dtypes=["float32"]):
        onednn = with_onednn and supports(KINDS[case.kind], case.layout, case.numpy_dtype)
        workload = make_workload(case, with_torch=with_torch, with_onednn=onednn, with_prepared=True)
        entries = [("public", workload.fastnorm, None), ("prepared", workload.prepared, None)]
        if workload.onednn is not None:
            entries.append(("onednn", workload.onednn, None))
        if workload.torch is not None:
            entries.append(("torch", workload.torch, None))
        rows.append((case.id, interleaved(entries, rounds)))
    return rows


def format_rows(rows):
    """Render :func:`measure`'s rows as a Markdown table (``-`` where an entry was not timed)."""
    lines = [
        "| case | " + " | ".join(header for header, *_ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for label, samples in rows:
        cells = []
        for _, kind, a, b in COLUMNS:
            value = _median_ms(samples, a) if kind == "t" else _ratio(samples, a, b)
            if value is None:
                cells.append("-")
            else:
                cells.append(f"{value * 1e3:.1f}" if kind == "t" else f"{value:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.prepared", description=__doc__.splitlines()[0]
    )
    add_comparison_options(parser, "case")
    parser.add_argument(
        "--kinds", default="bn,ln", help=f"comma-separated, of {','.join(KINDS)} (default bn,ln)"
    )
    parser.add_argument("--passes", default="fwd,inf,bwd", help="comma-separated (default fwd,inf,bwd)")
    parser.add_argument("--sizes", default="tiny,mid", help="tiny, mid, large (default tiny,mid)")
    args = parser.parse_args(argv)
    args.kinds, args.passes, args.sizes = (
        value.split(",") for value in (args.kinds, args.passes, args.sizes)
    )
    for values, allowed, option in (
        (args.kinds, KINDS, "--kinds"),
        (args.passes, ("fwd", "inf", "bwd"), "--passes"),
        (args.sizes, SIZES, "--sizes"),
    ):
        if not set(values) <= set(allowed):
            parser.error(f"{option}: choose from {', '.join(allowed)}")
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
    rows = measure(args.rounds, args.kinds, args.passes, args.sizes, torch is not None, bool(onednn_version))
    print(
        f"float32, medians of {args.rounds} interleaved rounds, {threads} threads; "
        f"freed memory {'reused' if reused else 'not reused'}; ratios: medians of per-round ratios"
    )
    print(format_rows(rows))


if __name__ == "__main__":
    main()
