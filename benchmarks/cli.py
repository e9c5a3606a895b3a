"""The command line, ``python -m benchmarks`` (from the repository root): see :func:`main` and ``--help``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .cases import DTYPES, EPILOGUE_PASSES, KINDS, LAYOUTS, PASSES, SCALING_MIN_BYTES, SIZES, select_cases
from .gate import DEFAULT_THRESHOLDS, format_thresholds, load_thresholds, run_check, worst_ratios
from .report import (
    Progress,
    _fmt_ratio,
    _require_matplotlib,
    environment,
    format_table,
    results_dict,
    summarize_scaling,
    write_json,
    write_markdown,
    write_plot,
)
from .runtime import load_onednn, max_threads, optional_torch, reuse_freed_memory, set_threads
from .timing import Measurement, measure_case, measure_scaling


def _split(values):
    if values is None:
        return None
    out = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def build_parser():
    """Build the ``argparse`` parser of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Time fastnorm against torch.nn.functional and a memcpy of the same tensor, interleaved in "
            "rounds; print fastnorm/torch and fastnorm/memcpy per case; optionally gate on thresholds."
        ),
    )
    sel = parser.add_argument_group("case selection (comma-separated or repeated)")
    sel.add_argument("--kinds", action="append", help=f"{','.join(KINDS)} (or full names); default all")
    sel.add_argument("--passes", action="append", help=f"{','.join(PASSES + EPILOGUE_PASSES)}; default all")
    sel.add_argument("--layouts", action="append", help=f"{','.join(LAYOUTS)}; default all")
    sel.add_argument(
        "--dtypes",
        action="append",
        help=(
            f"{','.join(DTYPES)} (or bf16,f16...); default float32,float64, with --check and "
            "--from-json all (the 16-bit dtypes are opt-in: their kernels compile on first use)"
        ),
    )
    sel.add_argument("--sizes", action="append", help=f"{','.join(SIZES)}; default all")
    sel.add_argument("--cases", action="append", help="explicit case ids")
    sel.add_argument(
        "--quick",
        action="store_true",
        help="mid and first large shape only, float32 unless --dtypes; 7 rounds",
    )
    sel.add_argument(
        "--half",
        action="store_true",
        help=(
            "the 16-bit comparison set: BN/IN/GN (32,64,56,56) both layouts, LN/RMS (4096,768), "
            "fwd and bwd, float32, bfloat16 and float16 (narrow with the options above); "
            "python -m benchmarks.half prints their 16-bit/float32 ratios"
        ),
    )
    sel.add_argument(
        "--networks",
        action="store_true",
        help=(
            "the layers of real networks instead (ResNet-50 BN, Stable Diffusion UNet GN, style-transfer "
            "IN, ConvNeXt and ViT LN, LLaMA RMS rows), every pass, float32 unless --dtypes"
        ),
    )
    sel.add_argument("--list", action="store_true", help="list the selected case ids and exit")
    run = parser.add_argument_group("measurement")
    run.add_argument(
        "--threads", type=int, help="Numba and torch threads (default: all, or the thresholds file's)"
    )
    run.add_argument("--rounds", type=int, help="interleaved rounds per case (default 11, --quick 7)")
    run.add_argument("--target-ms", type=float, help="duration of a timed block of calls (default 1)")
    run.add_argument("--no-torch", action="store_true", help="do not import or time torch")
    run.add_argument(
        "--onednn",
        action="store_true",
        help="also time oneDNN 3.2 (onednn-cpu-gomp) where it has the case; report fastnorm/onednn",
    )
    run.add_argument(
        "--onnxruntime",
        action="store_true",
        help=(
            "also time ONNX Runtime's CPU operators (forward passes: BN/IN/GN/LN/RMS and skip_fwd) "
            "where it has the case; report fastnorm/onnxruntime"
        ),
    )
    run.add_argument(
        "--fresh-pages",
        action="store_true",
        help="do not make glibc reuse freed memory: torch's outputs then page-fault on every call",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    run.add_argument(
        "--floor",
        action="store_true",
        help="also time each pass's traffic floor (parallel y = x, or dx = x + dy); report fastnorm/floor",
    )
    run.add_argument(
        "--scaling",
        action="store_true",
        help=(
            f"also report the 1 -> N thread speed-up of cases >= {SCALING_MIN_BYTES >> 20} MB "
            "(fastnorm, its traffic floor and torch)"
        ),
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write all results as JSON")
    out.add_argument(
        "--from-json",
        metavar="PATH",
        help="do not measure: print and write the outputs (--markdown, --plot...) of a --json file",
    )
    out.add_argument("--markdown", metavar="PATH", help="write the results table as Markdown")
    out.add_argument("--plot", metavar="PATH", help="draw the ratios per case into a PNG (needs matplotlib)")
    out.add_argument("--write-thresholds", metavar="PATH", help="write a thresholds file from this run")
    out.add_argument("--headroom", type=float, default=2.0, help="factor of --write-thresholds (default 2.0)")
    out.add_argument(
        "--thresholds-from",
        metavar="JSON",
        nargs="+",
        help="with --write-thresholds: use the worst ratios of these --json results instead of measuring",
    )
    gate = parser.add_argument_group("regression gate")
    gate.add_argument(
        "--check", action="store_true", help="compare ratios with the thresholds; exit 1 on regression"
    )
    gate.add_argument("--thresholds", metavar="PATH", help=f"thresholds file (default {DEFAULT_THRESHOLDS})")
    gate.add_argument("--rechecks", type=int, help="re-measurements of a failing case (default 2)")
    return parser


def _default_thresholds_path():
    local = DEFAULT_THRESHOLDS
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / DEFAULT_THRESHOLDS


def _positive(parser, name, value):
    if value is not None and value <= 0:
        parser.error(f"{name} must be positive, got {value}")


def _measurement_from_json(entry):
    """Rebuild the :class:`Measurement` of one case entry of a ``--json`` file."""
    return Measurement(
        entry["id"],
        entry["time_s"],
        entry["fastnorm_over_memcpy"],
        entry["fastnorm_over_torch"],
        entry["rounds"],
        entry.get("time_min_s", {}),
        entry.get("fastnorm_over_floor"),
        entry.get("fastnorm_over_onednn"),
        entry.get("fastnorm_over_onnxruntime"),
    )


def _measure_in_fresh_process(case, args, threads, rounds, target_s, with_torch, seed):
    """Measure ``case`` in a new ``python -m benchmarks`` process and return its :class:`Measurement`.

    The gate re-measures a failing case this way: a real regression is slow in
    any process, while the state a long run leaves behind is not carried over
    (docs/benchmarks.md, "The short gate in CI").
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        command = [sys.executable, "-m", "benchmarks", "--cases", case.id, "--threads", str(threads)]
        command += ["--rounds", str(rounds), "--target-ms", repr(target_s * 1e3), "--seed", str(seed)]
        command += ["--json", str(out)]
        command += [] if with_torch else ["--no-torch"]
        flags = (("--floor", args.floor), ("--onednn", args.onednn), ("--onnxruntime", args.onnxruntime))
        command += [flag for flag, on in flags if on]
        command += ["--fresh-pages"] if args.fresh_pages else []
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent
        )
        if done.returncode != 0:
            raise RuntimeError(f"re-measuring {case.id} in a new process failed:\n{done.stderr}")
        entry = json.loads(out.read_text(encoding="utf-8"))["cases"][0]
    return _measurement_from_json(entry)


def _render_saved(args, cases):
    """Print and write the outputs of a saved ``--json`` file (``--from-json``)."""
    try:
        data = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        saved = {entry["id"]: entry for entry in data["cases"]}
        meta = data["meta"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: cannot read --from-json {args.from_json}: {exc!r}", file=sys.stderr)
        return 2
    cases = [c for c in cases if c.id in saved]
    if not cases:
        print(f"error: {args.from_json} holds none of the selected cases", file=sys.stderr)
        return 2
    measurements = {c.id: _measurement_from_json(saved[c.id]) for c in cases}
    scaling = data.get("scaling")
    command = "python -m benchmarks " + " ".join(meta.get("argv", []))
    print(format_table(cases, measurements))
    if args.json:
        write_json(args.json, cases, measurements, meta, scaling)
    if args.markdown:
        write_markdown(args.markdown, cases, measurements, meta, scaling, command=command.strip())
    if args.plot:
        title = f"fastnorm, {meta.get('threads')} threads ({meta.get('platform')})"
        write_plot(args.plot, cases, measurements, title=title)
    return 0


def _load_peer(peer):
    """Load oneDNN or ONNX Runtime (``peer``); return ``None``, or the error message."""
    if peer == "onednn":
        from .baselines import onednn

        try:
            load_onednn()
        except onednn.OneDNNError as exc:
            return str(exc)
        return None
    from .baselines import onnxruntime

    try:
        onnxruntime.load()
    except onnxruntime.OnnxRuntimeError as exc:
        return str(exc)
    return None


def main(argv=None):
    """Run the benchmark CLI.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 when ``--check`` found a regression, 2 on a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("threads", "rounds", "target_ms", "headroom"):
        _positive(parser, "--" + name.replace("_", "-"), getattr(args, name))
    if args.rechecks is not None and args.rechecks < 0:
        parser.error("--rechecks must be >= 0")
    dtypes = _split(args.dtypes)
    if dtypes is None and (args.check or args.from_json) and not args.quick:
        dtypes = list(DTYPES)  # the thresholds file or the saved run says which dtypes
    try:
        cases = select_cases(
            _split(args.kinds),
            _split(args.passes),
            _split(args.layouts),
            dtypes,
            _split(args.sizes),
            args.quick,
            _split(args.cases),
            half_set=args.half,
            networks=args.networks,
        )
    except ValueError as exc:
        parser.error(str(exc))

    settings, thresholds, peers_bounded = {}, {}, {}
    if args.check:
        path = Path(args.thresholds) if args.thresholds else _default_thresholds_path()
        if not path.exists():
            print(f"error: thresholds file {path} not found (pass --thresholds PATH)", file=sys.stderr)
            return 2
        try:
            settings, thresholds = load_thresholds(path)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.id in thresholds]
        if not cases:
            print(f"error: no selected case has a threshold in {path}", file=sys.stderr)
            return 2
        peers_bounded = {
            peer: any(getattr(thresholds[c.id], f"max_vs_{peer}") is not None for c in cases)
            for peer in ("onednn", "onnxruntime")
        }
    if args.list:
        print("\n".join(c.id for c in cases))
        return 0
    if args.thresholds_from:
        if not args.write_thresholds:
            parser.error("--thresholds-from needs --write-thresholds PATH")
        try:
            results = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.thresholds_from]
            ratios = worst_ratios(results, cases)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: cannot read --thresholds-from results: {exc!r}", file=sys.stderr)
            return 2
        if not ratios:
            print("error: the --thresholds-from results hold none of the selected cases", file=sys.stderr)
            return 2
        meta = results[-1].get("meta", {})
        settings = {"rounds": args.rounds or (7 if args.quick else 11)}
        if "threads" in meta:
            settings["threads"] = meta["threads"]
        settings["rechecks"] = args.rechecks if args.rechecks is not None else 2
        settings["target_ms"] = args.target_ms or 1.0
        text = format_thresholds(
            ratios,
            args.headroom,
            settings=settings,
            comment=(
                f"Limits: worst ratios of {len(results)} run(s) "
                f"({', '.join(Path(p).name for p in args.thresholds_from)}; the last on "
                f"{meta.get('date', '?')}, {meta.get('platform', '?')}), times {args.headroom}."
            ),
        )
        Path(args.write_thresholds).write_text(text, encoding="utf-8")
        print(f"wrote {len(ratios)} case thresholds to {args.write_thresholds}")
        return 0
    if not cases:
        parser.error("the selection matches no case (see --list)")
    if args.plot and _require_matplotlib() is None:
        print("error: --plot needs matplotlib: pip install 'fastnorm[plot]' (or matplotlib)", file=sys.stderr)
        return 2
    if args.from_json:
        return _render_saved(args, cases)

    rounds = args.rounds or settings.get("rounds") or (7 if args.quick else 11)
    target_s = (args.target_ms or settings.get("target_ms") or 1.0) / 1e3
    rechecks = args.rechecks if args.rechecks is not None else settings.get("rechecks", 2)
    available = max_threads()
    threads = args.threads or settings.get("threads") or available
    if threads > available:
        if args.threads:
            print(f"error: --threads {threads} > {available} available (NUMBA_NUM_THREADS)", file=sys.stderr)
            return 2
        print(f"note: thresholds ask for {threads} threads, only {available} available", file=sys.stderr)
        threads = available
    reused = False if args.fresh_pages else reuse_freed_memory()
    if not args.fresh_pages and not reused:
        print("note: cannot make the allocator reuse freed memory (not glibc)", file=sys.stderr)
    with_torch = not args.no_torch and optional_torch() is not None
    if not args.no_torch and not with_torch:
        print("note: torch is not importable: fastnorm/torch is not measured", file=sys.stderr)
    for peer in ("onednn", "onnxruntime"):
        # asked for on the command line, or bounded by the thresholds of a --check
        wanted = getattr(args, peer) or peers_bounded.get(peer, False)
        error = _load_peer(peer) if wanted else None
        if error is not None and getattr(args, peer):
            print(f"error: --{peer}: {error}", file=sys.stderr)
            return 2
        if error is not None:
            print(f"note: {error}: fastnorm/{peer} limits are not checked", file=sys.stderr)
        setattr(args, peer, wanted and error is None)  # the re-measurement processes read args too
    set_threads(threads)

    def measure(case, attempt=0):
        if attempt:  # the gate's re-measurement of a failing case: twice the rounds, a new process
            seed = args.seed + attempt
            return _measure_in_fresh_process(case, args, threads, 2 * rounds, target_s, with_torch, seed)
        return measure_case(
            case,
            rounds=rounds,
            threads=threads,
            target_s=target_s,
            with_torch=with_torch,
            seed=args.seed + attempt,
            with_floor=args.floor,
            with_onednn=args.onednn,
            with_onnxruntime=args.onnxruntime,
        )

    scaling_cases = [c for c in cases if c.nbytes >= SCALING_MIN_BYTES] if args.scaling else []
    if args.scaling and threads < 2:
        print("note: --scaling needs at least 2 threads; skipped", file=sys.stderr)
        scaling_cases = []
    progress = Progress(len(cases) + len(scaling_cases))
    status = 0
    if args.check:

        def on_progress(case, attempt):
            if attempt:
                progress.total += 1
                progress.update(f"re-measure {attempt}/{rechecks}: {case.id}", force=True)
            else:
                progress.update(case.id)

        result = run_check(cases, thresholds, measure, rechecks, on_progress)
        measurements = result.measurements
    else:
        measurements = {}
        for case in cases:
            progress.update(case.id)
            measurements[case.id] = measure(case)
    scaling = []
    for case in scaling_cases:
        progress.update(f"scaling {case.id}")
        scaling.append(measure_scaling(case, threads, max(3, rounds - 2), target_s, with_torch, args.seed))
    progress.close()

    others = "torch vs memcpy" + (" vs oneDNN" if args.onednn else "")
    others += " vs ONNX Runtime" if args.onnxruntime else ""
    print(f"fastnorm vs {others}, {threads} threads, {rounds} interleaved rounds, medians")
    print(format_table(cases, measurements))
    if scaling:
        print(f"\n1 -> {threads} thread speed-up (tensors >= {SCALING_MIN_BYTES >> 20} MB)")
        for s in scaling:
            fast, floor, torch_speedup = (_fmt_ratio(s[k]) for k in ("fastnorm", "floor", "torch"))
            print(f"  {s['case']:<34} fastnorm {fast}x   floor {floor}x   torch {torch_speedup}x")
        print(summarize_scaling(scaling))
    meta = environment(threads)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    meta.update(
        {"rounds": rounds, "target_ms": target_s * 1e3, "argv": argv_used, "reused_freed_memory": reused}
    )
    command = "python -m benchmarks " + " ".join(meta["argv"])
    if args.json:
        write_json(args.json, cases, measurements, meta, scaling or None)
    if args.markdown:
        write_markdown(args.markdown, cases, measurements, meta, scaling or None, command=command.strip())
    if args.plot:
        write_plot(args.plot, cases, measurements, title=f"fastnorm, {threads} threads ({meta['platform']})")
    if args.write_thresholds:
        text = format_thresholds(
            worst_ratios([results_dict(cases, measurements, meta)], cases),
            args.headroom,
            settings={
                "rounds": rounds,
                "threads": threads,
                "rechecks": rechecks,
                "target_ms": target_s * 1e3,
            },
            comment=(
                f"Limits: ratios measured by `{command.strip()}` on {meta['date']}, times {args.headroom}."
            ),
        )
        Path(args.write_thresholds).write_text(text, encoding="utf-8")
    if args.check:
        if result.rechecked:
            print(f"\nre-measured after a first failure: {', '.join(result.rechecked)}")
        for metric, unchecked in result.unchecked.items():
            print(f"{metric} limits not checked (not measured) for {len(unchecked)} case(s)")
        if result.passed:
            print(f"\ncheck passed: {len(cases)} case(s) within their thresholds")
        else:
            print(f"\ncheck FAILED: {len({v.case_id for v in result.violations})} case(s) regressed:")
            for violation in result.violations:
                print(f"  {violation}")
            status = 1
    return status
