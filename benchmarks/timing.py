"""Timing: callables interleaved in rounds in one process, and the measurements of a case."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

from .runtime import set_threads
from .workloads import make_workload


@dataclass
class Measurement:
    """Interleaved timings of one case.

    Attributes
    ----------
    case_id : str
    times : dict of str to float
        Median seconds per call of each implementation (``"fastnorm"``,
        ``"memcpy"``, ``"torch"`` when measured).
    vs_memcpy : float
        Median over rounds of the per-round ratio fastnorm / memcpy.
    vs_torch : float or None
        Median over rounds of fastnorm / torch; ``None`` without torch.
    rounds : int
    min_times : dict of str to float
        Fastest round of each implementation (seconds per call); load on a
        shared machine only ever adds time, so these are the least disturbed.
    vs_floor : float or None
        Median over rounds of fastnorm / traffic floor; ``None`` unless measured.
    vs_onednn : float or None
        Median over rounds of fastnorm / oneDNN; ``None`` unless measured.
    vs_onnxruntime : float or None
        Median over rounds of fastnorm / ONNX Runtime; ``None`` unless measured.
    """

    case_id: str
    times: dict
    vs_memcpy: float
    vs_torch: float | None
    rounds: int
    min_times: dict = dataclasses.field(default_factory=dict)
    vs_floor: float | None = None
    vs_onednn: float | None = None
    vs_onnxruntime: float | None = None


def _time_block(fn, inner):
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def interleaved(entries, rounds, target_s=0.001, repeats=3, max_inner=10000):
    """Time several callables interleaved in rounds.

    Parameters
    ----------
    entries : sequence of (name, callable, threads)
        ``threads`` (or ``None`` to leave it) is set before each entry's turn.
    rounds : int
        Number of rounds; in every round each entry has one turn, in an order
        rotated from round to round.
    target_s : float
        A block repeats its call until it lasts about this long (at least one call).
    repeats : int
        Blocks per turn; the turn's value is the fastest of them.  Preemption
        by other processes only ever adds time, so the fastest of a few short
        blocks is the least disturbed.
    max_inner : int
        Upper bound of calls per block.

    Returns
    -------
    dict of str to list of float
        Seconds per call, one value per round, for each entry.
    """
    inner = {}
    for name, fn, threads in entries:
        if threads is not None:
            set_threads(threads)
        fn()  # warm-up: compilation and first touch excluded
        once = min(_time_block(fn, 1) for _ in range(2))
        inner[name] = max(1, min(max_inner, math.ceil(target_s / max(once, 1e-9))))
    samples = {name: [] for name, _, _ in entries}
    for r in range(rounds):
        shift = r % len(entries)
        for name, fn, threads in entries[shift:] + entries[:shift]:
            if threads is not None:
                set_threads(threads)
            samples[name].append(min(_time_block(fn, inner[name]) for _ in range(repeats)))
    return samples


def _median_ratio(numerator, denominator):
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def _best_floor(samples, with_memcpy):
    """Per round, the fastest pass with the floor's traffic: ordinary or streaming stores, or memcpy.

    ``memcpy`` (one ``np.copyto``) moves a forward's or inference's traffic,
    not a backward's.  Timed in the same rounds, so the round's minimum is a
    fair floor for that round (docs/perf-notes/traffic-floor-and-scaling.md).
    """
    names = [n for n in ("floor_plain", "floor_stream") if n in samples]
    if with_memcpy:
        names.append("memcpy")
    return [min(times) for times in zip(*(samples[n] for n in names), strict=True)]


def measure_case(
    case,
    rounds=11,
    threads=None,
    target_s=0.001,
    with_torch=True,
    seed=0,
    with_floor=False,
    with_onednn=False,
    with_onnxruntime=False,
):
    """Measure fastnorm, torch, memcpy (and the floor, oneDNN, ONNX Runtime) for ``case``, interleaved.

    Parameters
    ----------
    case : Case
    rounds : int
    threads : int, optional
        Thread count of Numba and torch (the current one when ``None``).
    target_s : float
        Target duration of a timed block (see :func:`interleaved`).
    with_torch : bool
        Include torch when it is importable.
    seed : int
    with_floor : bool
        Also time the pass's traffic floor: ``floor`` is, per round, the
        fastest of :func:`floor_copy` / :func:`floor_add`, their streaming-store
        variants, and (forward and inference) ``memcpy``; the two variants are
        kept as ``floor_plain`` and ``floor_stream``.
    with_onednn : bool
        Also time oneDNN where it has the case (see :func:`make_workload`).
    with_onnxruntime : bool
        Also time ONNX Runtime where it has the case, its session on
        ``threads`` intra-op threads.

    Returns
    -------
    Measurement
    """
    workload = make_workload(
        case,
        seed=seed,
        with_torch=with_torch,
        with_onednn=with_onednn,
        with_onnxruntime=with_onnxruntime,
        threads=threads,
    )
    entries = [("fastnorm", workload.fastnorm, threads), ("memcpy", workload.memcpy, threads)]
    if workload.torch is not None:
        entries.append(("torch", workload.torch, threads))
    if with_floor:
        entries.append(("floor_plain", workload.floor, threads))
        if workload.floor_stream is not None:
            entries.append(("floor_stream", workload.floor_stream, threads))
    if workload.onednn is not None:
        entries.append(("onednn", workload.onednn, threads))
    if getattr(workload, "onnxruntime", None) is not None:
        entries.append(("onnxruntime", workload.onnxruntime, threads))
    samples = interleaved(entries, rounds, target_s)
    if with_floor:
        samples["floor"] = _best_floor(samples, case.pass_ in ("fwd", "inf"))

    def ratio(name):
        return _median_ratio(samples["fastnorm"], samples[name]) if name in samples else None

    times = {name: statistics.median(values) for name, values in samples.items()}
    min_times = {name: min(values) for name, values in samples.items()}
    return Measurement(
        case.id,
        times,
        ratio("memcpy"),
        ratio("torch"),
        rounds,
        min_times,
        ratio("floor"),
        ratio("onednn"),
        ratio("onnxruntime"),
    )


def measure_scaling(case, threads, rounds=5, target_s=0.001, with_torch=True, seed=0):
    """Speed-up from 1 to ``threads`` threads of fastnorm, its traffic floor (and torch), interleaved.

    Parameters
    ----------
    case : Case
    threads : int
        The many-thread count (``> 1``).
    rounds, target_s, with_torch, seed
        As in :func:`measure_case`.

    Returns
    -------
    dict
        ``case``, ``threads``, ``nbytes``, and ``fastnorm``, ``floor`` and
        ``torch`` (``None`` without torch): median over rounds of ``time(1
        thread) / time(threads)``.  ``floor`` is the speed-up of the pass's
        traffic floor (:func:`floor_copy`, :func:`floor_add`): what the memory
        system allows a pass of this size.
    """
    workload = make_workload(case, seed=seed, with_torch=with_torch)
    entries = [("fastnorm@1", workload.fastnorm, 1), (f"fastnorm@{threads}", workload.fastnorm, threads)]
    entries += [("floor@1", workload.floor, 1), (f"floor@{threads}", workload.floor, threads)]
    if workload.torch is not None:
        entries += [("torch@1", workload.torch, 1), (f"torch@{threads}", workload.torch, threads)]
    samples = interleaved(entries, rounds, target_s)
    set_threads(threads)
    result = {"case": case.id, "threads": threads, "nbytes": case.nbytes, "torch": None}
    for impl in ("fastnorm", "floor", "torch"):
        if f"{impl}@1" in samples:
            result[impl] = _median_ratio(samples[f"{impl}@1"], samples[f"{impl}@{threads}"])
    return result
