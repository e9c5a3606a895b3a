"""Benchmark fastnorm against torch and a memcpy, and gate regressions on the ratios.

Run ``python -m fastnorm.bench --help``.  For every case (norm kind x pass x
memory layout x dtype x shape) the command times three things *interleaved in
rounds within one process*: the fastnorm call, the same work in
``torch.nn.functional`` (when torch is importable) and ``np.copyto`` of the
same tensor into a preallocated buffer (the physical floor: one read and one
write of the tensor).  It reports the medians and two ratios per case:

* ``fastnorm/torch`` -- the median over rounds of the per-round ratio;
* ``fastnorm/memcpy`` -- likewise against the copy.

With ``--floor`` it also times the pass's *traffic floor*: a parallel Numba
kernel, on the same threads, that reads every input of the pass once and
writes its output once and does nothing else (forward and inference: ``y =
x``; backward: ``dx = x + dy``), and reports ``fastnorm/floor``.  No schedule
of the pass moves less memory, so this ratio says how far a case is from the
memory-bandwidth floor of this machine.  ``--scaling`` reports the floor's own
1 -> N thread speed-up beside fastnorm's: the speed-up the memory system
allows.

In each round, each implementation's time is the fastest of 3 short blocks of
calls (about 1 ms each, at least one call): preemption by other processes
only ever adds time, so this keeps a shared machine's noise out of the rounds,
and the median over rounds discards the rounds it still reaches.

Ratios of times measured side by side cancel most of the machine and load
dependence of absolute times, so the regression gate (``--check``) compares
ratios only, never absolute times, against the committed thresholds in
``benchmarks/thresholds.toml``.  See ``docs/benchmarks.md``.

Cases
-----
``bn``/``in``/``gn`` (BatchNorm, InstanceNorm, GroupNorm) run on
``(N, C, H, W)`` tensors in NCHW or channels-last (``nhwc``) memory;
``ln``/``rms`` (LayerNorm, RMSNorm) normalize the last dim of ``(rows, 768)``
and have no channels-last variant.  GroupNorm uses 32 groups when 32 divides
``C`` (every shape here), else 8, else 1 (:func:`group_count`).  Passes:
``fwd`` (:func:`fastnorm.forward`, training statistics), ``inf``
(:func:`fastnorm.forward_inference`) and ``bwd`` (:func:`fastnorm.backward`,
``dx``, ``dweight`` and ``dbias``).  Every fastnorm call writes into a
preallocated ``out=``.

With ``--onednn`` it also times oneDNN's primitives (``libdnnl`` from the
``onednn-cpu-gomp`` wheel, through :mod:`fastnorm._onednn`) on preallocated
buffers, where oneDNN 3.2 has one: BatchNorm (both layouts), InstanceNorm
(NCHW) and LayerNorm, float32; it reports ``fastnorm/onednn``.

torch's functional calls allocate their outputs.  glibc serves an
allocation above its mmap threshold (at most 32 MiB) with fresh pages, and
first-touching them costs more than the kernel (about 10 ms for 33.5 MB
here), a cost fastnorm's ``out=`` calls never pay.  So that the benchmark
compares kernels and not page faults, the CLI first asks glibc to keep freed
memory for reuse (:func:`reuse_freed_memory`; ``--fresh-pages`` leaves the
allocator alone); the JSON records which was used.

The torch baseline of ``inf`` is ``F.batch_norm(training=False)`` for
BatchNorm; torch has no given-statistics path for the other norms, whose
inference is the same call as training, so their ``inf`` baseline is the
ordinary forward.  The torch ``bwd`` baseline is ``torch.autograd.grad`` of a
graph built once (``retain_graph=True``), so only the backward is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import prange

from ._config import glue, helper, kernel

__all__ = [
    "Case",
    "Measurement",
    "Threshold",
    "Violation",
    "CheckResult",
    "group_count",
    "all_cases",
    "select_cases",
    "make_workload",
    "floor_copy",
    "floor_add",
    "load_onednn",
    "reuse_freed_memory",
    "measure_case",
    "measure_scaling",
    "summarize_scaling",
    "load_thresholds",
    "evaluate",
    "run_check",
    "write_json",
    "write_markdown",
    "format_thresholds",
    "worst_ratios",
    "main",
]

#: Short kind names and the :class:`fastnorm.NormSpec` kinds they stand for.
KINDS = {
    "bn": "batch_norm",
    "in": "instance_norm",
    "gn": "group_norm",
    "ln": "layer_norm",
    "rms": "rms_norm",
}
#: ``fwd``: :func:`fastnorm.forward`, ``inf``: :func:`fastnorm.forward_inference`,
#: ``bwd``: :func:`fastnorm.backward`.
PASSES = ("fwd", "inf", "bwd")
#: ``nchw``: channels-first memory; ``nhwc``: channels-last (BN/IN/GN only).
LAYOUTS = ("nchw", "nhwc")
DTYPES = ("float32", "float64")
SIZES = ("tiny", "mid", "large")
_DTYPE_SHORT = {"float32": "f32", "float64": "f64"}
_ROW_KINDS = ("ln", "rms")

#: Shapes per size: ``conv`` for BN/IN/GN (logical NCHW), ``rows`` for LN/RMS.
SHAPES = {
    "conv": {
        "tiny": [(1, 64, 8, 8)],
        "mid": [(8, 64, 32, 32)],
        "large": [(32, 64, 56, 56), (8, 256, 64, 64)],
    },
    "rows": {"tiny": [(1, 768)], "mid": [(512, 768)], "large": [(4096, 768)]},
}
#: Shapes of the ``--quick`` subset (with float32 only unless ``--dtypes`` is given).
QUICK_SHAPES = frozenset({(8, 64, 32, 32), (32, 64, 56, 56), (512, 768), (4096, 768)})
#: Minimum tensor size of the ``--scaling`` report.
SCALING_MIN_BYTES = 4 * 2**20
EPS = 1e-5
RMS_EPS = 1e-6

DEFAULT_THRESHOLDS = Path("benchmarks") / "thresholds.toml"
_THRESHOLD_KEYS = ("max_vs_memcpy", "max_vs_torch")
_SETTING_KEYS = {"rounds": int, "threads": int, "rechecks": int, "target_ms": float}


def group_count(channels):
    """Return the number of GroupNorm groups the benchmarks use for ``channels`` channels.

    Parameters
    ----------
    channels : int
        ``C``.

    Returns
    -------
    int
        32 if it divides ``channels`` (the usual GroupNorm setting), else 8 if
        it divides, else 1.
    """
    for groups in (32, 8):
        if channels % groups == 0:
            return groups
    return 1


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes
    ----------
    kind : str
        Short kind name, a key of :data:`KINDS`.
    pass_ : str
        One of :data:`PASSES`.
    layout : str
        ``"nchw"`` or ``"nhwc"`` (always ``"nchw"`` for LN/RMS).
    dtype : str
        ``"float32"`` or ``"float64"``.
    size : str
        One of :data:`SIZES`.
    shape : tuple of int
        Logical shape: ``(N, C, H, W)`` for BN/IN/GN whatever the layout,
        ``(rows, width)`` for LN/RMS.
    """

    kind: str
    pass_: str
    layout: str
    dtype: str
    size: str
    shape: tuple

    @property
    def id(self):
        """Stable identifier, e.g. ``"gn-bwd-nhwc-f32-8x64x32x32"``."""
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.kind}-{self.pass_}-{self.layout}-{_DTYPE_SHORT[self.dtype]}-{dims}"

    @property
    def nbytes(self):
        """Size of the input tensor in bytes."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def memory_shape(self):
        """Shape of the array fastnorm is given (``(N, H, W, C)`` for ``nhwc``)."""
        if self.layout == "nhwc":
            return (self.shape[0], *self.shape[2:], self.shape[1])
        return self.shape


def all_cases():
    """Every benchmark case, in a fixed order.

    Returns
    -------
    list of Case
    """
    cases = []
    for kind in KINDS:
        family = "rows" if kind in _ROW_KINDS else "conv"
        layouts = ("nchw",) if kind in _ROW_KINDS else LAYOUTS
        for pass_ in PASSES:
            for layout in layouts:
                for dtype in DTYPES:
                    for size in SIZES:
                        for shape in SHAPES[family][size]:
                            cases.append(Case(kind, pass_, layout, dtype, size, shape))
    return cases


def _normalize_kinds(kinds):
    if kinds is None:
        return None
    full_to_short = {v: k for k, v in KINDS.items()}
    out = set()
    for kind in kinds:
        kind = full_to_short.get(kind, kind)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        out.add(kind)
    return out


def _check_choices(values, allowed, what):
    if values is None:
        return None
    values = set(values)
    unknown = values - set(allowed)
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    return values


def select_cases(kinds=None, passes=None, layouts=None, dtypes=None, sizes=None, quick=False, ids=None):
    """Filter :func:`all_cases`; ``None`` means no restriction.

    Parameters
    ----------
    kinds : iterable of str, optional
        Short (``"bn"``) or full (``"batch_norm"``) kind names.
    passes, layouts, dtypes, sizes : iterable of str, optional
        Values from :data:`PASSES`, :data:`LAYOUTS`, :data:`DTYPES`, :data:`SIZES`.
    quick : bool
        Keep only the shapes of :data:`QUICK_SHAPES`, and float32 unless
        ``dtypes`` is given.
    ids : iterable of str, optional
        Keep only these case ids (unknown ids raise ``ValueError``).

    Returns
    -------
    list of Case

    Raises
    ------
    ValueError
        An unknown kind, pass, layout, dtype, size or case id.
    """
    kinds = _normalize_kinds(kinds)
    passes = _check_choices(passes, PASSES, "pass")
    layouts = _check_choices(layouts, LAYOUTS, "layout")
    dtypes = _check_choices(dtypes, DTYPES, "dtype")
    sizes = _check_choices(sizes, SIZES, "size")
    if quick and dtypes is None:
        dtypes = {"float32"}
    cases = all_cases()
    if ids is not None:
        ids = set(ids)
        unknown = ids - {c.id for c in cases}
        if unknown:
            raise ValueError(f"unknown case id(s): {', '.join(sorted(unknown))} (list them with --list)")
    selected = []
    for case in cases:
        if kinds is not None and case.kind not in kinds:
            continue
        if passes is not None and case.pass_ not in passes:
            continue
        if layouts is not None and case.layout not in layouts:
            continue
        if dtypes is not None and case.dtype not in dtypes:
            continue
        if sizes is not None and case.size not in sizes:
            continue
        if quick and case.shape not in QUICK_SHAPES:
            continue
        if ids is not None and case.id not in ids:
            continue
        selected.append(case)
    return selected


# --------------------------------------------------------------------------- workloads


#: ``GOMP_SPINCOUNT`` the bench gives torch's OpenMP runtime (libgomp) unless
#: the environment sets one.  With libgomp's default, torch's idle workers
#: busy-wait for milliseconds after every torch call and take a core from
#: whatever runs next -- in an interleaved round, fastnorm's turn: measured on
#: ``ln-fwd-nchw-f32-4096x768``, fastnorm 0.80-1.01 ms after torch with the
#: default and 0.46-0.48 ms with 10000 spins, torch's own times unchanged
#: (``docs/benchmarks.md``).  10000 spins (tens of microseconds) still cover
#: the gap between torch's back-to-back calls inside its timed block.
TORCH_SPINCOUNT = "10000"


def _short_openmp_spin():
    """Set ``GOMP_SPINCOUNT`` to :data:`TORCH_SPINCOUNT` unless the environment sets it.

    libgomp reads it once, when it is loaded: call this before importing torch
    or loading oneDNN (which links its own libgomp).
    """
    os.environ.setdefault("GOMP_SPINCOUNT", TORCH_SPINCOUNT)


def optional_torch():
    """Return the ``torch`` module, or ``None`` when it is not importable.

    Sets ``GOMP_SPINCOUNT`` to :data:`TORCH_SPINCOUNT` before the import when
    the environment does not set it (:func:`_short_openmp_spin`); it has no
    effect if torch was imported before.
    """
    if "torch" not in sys.modules:
        _short_openmp_spin()
    try:
        import torch
    except ImportError:
        return None
    return torch


def load_onednn():
    """Load oneDNN for the benchmark (:func:`fastnorm._onednn.load`) with the same short OpenMP spin as torch.

    Returns
    -------
    The loaded library.

    Raises
    ------
    fastnorm._onednn.OneDNNError
        oneDNN cannot be loaded (``pip install onednn-cpu-gomp``).
    """
    from . import _onednn

    if _onednn._LIBRARY is None:
        _short_openmp_spin()
    return _onednn.load()


def _loaded_onednn():
    """Return the oneDNN library loaded in this process, or ``None`` (never loads it)."""
    module = sys.modules.get(__package__ + "._onednn")
    return None if module is None else module._LIBRARY


def set_threads(threads):
    """Use ``threads`` threads in Numba and, when they are loaded, torch and oneDNN.

    Parameters
    ----------
    threads : int
        At most ``numba.config.NUMBA_NUM_THREADS``.
    """
    import numba

    numba.set_num_threads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    onednn = _loaded_onednn()
    if onednn is not None:
        onednn.set_threads(threads)


def reuse_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB with
    ``mallopt``: large allocations then come from the heap, and a freed
    output's pages, already touched, serve the next call's output.  Without
    it, torch pays first-touch page faults on every output above glibc's
    mmap threshold (at most 32 MiB), which fastnorm's ``out=`` calls do not.

    Returns
    -------
    bool
        Whether the setting took effect (``False`` off glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def max_threads():
    """Largest thread count Numba can use in this process (``NUMBA_NUM_THREADS``)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


@dataclass
class Workload:
    """Zero-argument callables doing the work of one case.

    Attributes
    ----------
    fastnorm : callable
        The fastnorm call, writing into preallocated buffers.
    memcpy : callable
        ``np.copyto`` of the input tensor into a preallocated buffer.
    torch : callable or None
        The same work in ``torch.nn.functional``; ``None`` without torch.
    floor : callable or None
        The pass's traffic floor (:func:`floor_copy` or :func:`floor_add`)
        on the same tensors, writing into the memcpy buffer.
    onednn : callable or None
        The same pass in oneDNN on preallocated buffers (:mod:`fastnorm._onednn`);
        ``None`` when not asked for or oneDNN has no primitive for the case.
    """

    fastnorm: Callable[[], object]
    memcpy: Callable[[], object]
    torch: Callable[[], object] | None = None
    floor: Callable[[], object] | None = None
    onednn: Callable[[], object] | None = None


#: Fixed chunks of the traffic-floor kernels (independent of the thread count).
FLOOR_CHUNKS = 64


@glue
def _floor_chunk(size, t):
    """``(lo, hi)`` of fixed chunk ``t`` of ``FLOOR_CHUNKS`` over ``size`` elements."""
    step = (size + FLOOR_CHUNKS - 1) // FLOOR_CHUNKS
    lo = min(size, t * step)
    return lo, min(size, lo + step)


@helper
def _copy_span(src, dst):
    for i in range(src.size):
        dst[i] = src[i]


@helper
def _add_span(a, b, out):
    for i in range(a.size):
        out[i] = a[i] + b[i]


@kernel
def floor_copy(src, dst):
    """Copy 1-D ``src`` into ``dst`` in parallel: the traffic of a forward pass.

    Parameters
    ----------
    src, dst : ndarray, 1-D, same size and dtype

    Notes
    -----
    One read and one write of the tensor, split into ``FLOOR_CHUNKS`` fixed
    chunks run by the Numba threads (the same threading layer and thread count
    as fastnorm's kernels); no pass over the whole tensor can move less memory.
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(src.size, t)
        _copy_span(src[lo:hi], dst[lo:hi])


@kernel
def floor_add(a, b, out):
    """``out = a + b`` on 1-D arrays in parallel: the traffic of a backward pass.

    Parameters
    ----------
    a, b, out : ndarray, 1-D, same size and dtype

    Notes
    -----
    Two reads and one write (``x`` and ``dy`` in, ``dx`` out), chunked as
    :func:`floor_copy`.
    """
    for t in prange(FLOOR_CHUNKS):
        lo, hi = _floor_chunk(a.size, t)
        _add_span(a[lo:hi], b[lo:hi], out[lo:hi])


def _spec(case):
    import fastnorm

    cl = case.layout == "nhwc"
    kind = KINDS[case.kind]
    if kind == "batch_norm":
        return fastnorm.NormSpec.batch_norm(EPS, channels_last=cl)
    if kind == "instance_norm":
        return fastnorm.NormSpec.instance_norm(EPS, channels_last=cl)
    if kind == "group_norm":
        return fastnorm.NormSpec.group_norm(group_count(case.shape[1]), EPS, channels_last=cl)
    if kind == "layer_norm":
        return fastnorm.NormSpec.layer_norm(1, EPS)
    return fastnorm.NormSpec.rms_norm(1, RMS_EPS)


def make_workload(case, seed=0, with_torch=True, with_onednn=False):
    """Build the data and the callables of ``case``.

    Parameters
    ----------
    case : Case
    seed : int
        Seed of the random data (activations with per-channel scales and offsets).
    with_torch : bool
        Also build the torch callable (when torch is importable).
    with_onednn : bool
        Also build the oneDNN callable when oneDNN has the case
        (:func:`fastnorm._onednn.supports`).

    Raises
    ------
    fastnorm._onednn.OneDNNError
        ``with_onednn`` and oneDNN cannot be loaded.

    Returns
    -------
    Workload
        Callables not yet run: call each once to warm up (compile) before timing.
    """
    import fastnorm

    rng = np.random.default_rng(seed)
    dtype = np.dtype(case.dtype)
    rows = case.kind in _ROW_KINDS
    channels = case.shape[-1] if rows else case.shape[1]
    bshape = (1, -1) if rows else (1, -1) + (1,) * (len(case.shape) - 2)
    scale = rng.uniform(0.5, 3.0, channels).reshape(bshape)
    offset = rng.uniform(-2.0, 2.0, channels).reshape(bshape)
    x_logical = (rng.standard_normal(case.shape) * scale + offset).astype(dtype)
    dy_logical = rng.standard_normal(case.shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bias = None if case.kind == "rms" else rng.uniform(-0.5, 0.5, channels).astype(dtype)
    if case.layout == "nhwc":
        x = np.ascontiguousarray(np.moveaxis(x_logical, 1, -1))
        dy = np.ascontiguousarray(np.moveaxis(dy_logical, 1, -1))
    else:
        x, dy = x_logical, dy_logical
    spec = _spec(case)
    out = np.empty_like(x)
    copy_buffer = np.empty_like(x)
    _, stats = fastnorm.forward(x, spec, weight, bias)

    def memcpy():
        np.copyto(copy_buffer, x)

    if case.pass_ == "fwd":

        def fast():
            return fastnorm.forward(x, spec, weight, bias, out=out)

    elif case.pass_ == "inf":

        def fast():
            return fastnorm.forward_inference(x, stats, spec, weight, bias, out=out)

    else:

        def fast():
            return fastnorm.backward(dy, x, stats, spec, weight, out=out)

    x_flat, dy_flat, scratch = x.reshape(-1), dy.reshape(-1), copy_buffer.reshape(-1)
    if case.pass_ == "bwd":

        def floor():
            floor_add(x_flat, dy_flat, scratch)

    else:

        def floor():
            floor_copy(x_flat, scratch)

    workload = Workload(fastnorm=fast, memcpy=memcpy, floor=floor)
    torch = optional_torch() if with_torch else None
    if torch is not None:
        workload.torch = _torch_callable(torch, case, x_logical, dy_logical, weight, bias, stats)
    if with_onednn:
        workload.onednn = _onednn_callable(case, x, dy, weight, bias, stats)
    return workload


def _onednn_callable(case, x, dy, weight, bias, stats):
    """Build the oneDNN callable of ``case`` on its own output buffers, or ``None``."""
    from . import _onednn

    kind = KINDS[case.kind]
    if not _onednn.supports(kind, case.layout, case.dtype):
        return None
    load_onednn()
    repeat = case.shape[0] if kind == "instance_norm" else 1
    weight_v, bias_v = np.tile(weight, repeat), np.tile(bias, repeat)
    mean = np.asarray(stats.mean, np.float32).reshape(-1)
    variance = (1.0 / np.square(np.asarray(stats.rstd, np.float64)) - EPS).astype(np.float32).reshape(-1)
    out = np.empty_like(x)
    x2d = x.reshape(case.shape) if kind == "layer_norm" else x
    grads = (np.empty_like(weight_v), np.empty_like(bias_v))
    return _onednn.normalization(
        kind,
        case.pass_,
        case.layout,
        x2d,
        out.reshape(x2d.shape),
        weight_v,
        bias_v,
        mean,
        variance,
        EPS,
        dy=dy.reshape(x2d.shape),
        grads=grads,
    )


def _torch_callable(torch, case, x_logical, dy_logical, weight, bias, stats):
    """Build the torch callable of ``case`` (see the module docstring for the baselines)."""
    functional = torch.nn.functional
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    x_t = torch.from_numpy(x_logical).contiguous(memory_format=fmt)
    dy_t = torch.from_numpy(dy_logical).contiguous(memory_format=fmt)
    w_t = torch.from_numpy(weight)
    b_t = None if bias is None else torch.from_numpy(bias)
    kind = KINDS[case.kind]
    width = (case.shape[-1],)

    def norm(x, w, b):
        if kind == "batch_norm":
            return functional.batch_norm(x, None, None, w, b, training=True, eps=EPS)
        if kind == "instance_norm":
            return functional.instance_norm(x, weight=w, bias=b, eps=EPS)
        if kind == "group_norm":
            return functional.group_norm(x, group_count(case.shape[1]), w, b, EPS)
        if kind == "layer_norm":
            return functional.layer_norm(x, width, w, b, EPS)
        return functional.rms_norm(x, width, w, RMS_EPS)

    if case.pass_ == "bwd":
        leaves = [x_t.detach().requires_grad_(), w_t.detach().requires_grad_()]
        if b_t is not None:
            leaves.append(b_t.detach().requires_grad_())
        y = norm(leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None)

        def torch_bwd():
            return torch.autograd.grad(y, leaves, dy_t, retain_graph=True)

        return torch_bwd

    if case.pass_ == "inf" and kind == "batch_norm":
        running_mean = torch.from_numpy(np.asarray(stats.mean, dtype=x_logical.dtype))
        running_var = torch.from_numpy((1.0 / np.square(stats.rstd) - EPS).astype(x_logical.dtype))

        def torch_inf():
            with torch.no_grad():
                return functional.batch_norm(
                    x_t, running_mean, running_var, w_t, b_t, training=False, eps=EPS
                )

        return torch_inf

    def torch_fwd():
        with torch.no_grad():
            return norm(x_t, w_t, b_t)

    return torch_fwd


# --------------------------------------------------------------------------- timing


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
    """

    case_id: str
    times: dict
    vs_memcpy: float
    vs_torch: float | None
    rounds: int
    min_times: dict = dataclasses.field(default_factory=dict)
    vs_floor: float | None = None
    vs_onednn: float | None = None


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


def measure_case(
    case,
    rounds=11,
    threads=None,
    target_s=0.001,
    with_torch=True,
    seed=0,
    with_floor=False,
    with_onednn=False,
):
    """Measure fastnorm, torch and memcpy (and the traffic floor, oneDNN) for ``case``, interleaved.

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
        Also time the pass's traffic floor (:func:`floor_copy`, :func:`floor_add`).
    with_onednn : bool
        Also time oneDNN where it has the case (see :func:`make_workload`).

    Returns
    -------
    Measurement
    """
    workload = make_workload(case, seed=seed, with_torch=with_torch, with_onednn=with_onednn)
    entries = [("fastnorm", workload.fastnorm, threads), ("memcpy", workload.memcpy, threads)]
    if workload.torch is not None:
        entries.append(("torch", workload.torch, threads))
    if with_floor:
        entries.append(("floor", workload.floor, threads))
    if workload.onednn is not None:
        entries.append(("onednn", workload.onednn, threads))
    samples = interleaved(entries, rounds, target_s)
    times = {name: statistics.median(values) for name, values in samples.items()}
    vs_torch = _median_ratio(samples["fastnorm"], samples["torch"]) if "torch" in samples else None
    vs_memcpy = _median_ratio(samples["fastnorm"], samples["memcpy"])
    vs_floor = _median_ratio(samples["fastnorm"], samples["floor"]) if with_floor else None
    vs_onednn = _median_ratio(samples["fastnorm"], samples["onednn"]) if "onednn" in samples else None
    min_times = {name: min(values) for name, values in samples.items()}
    return Measurement(case.id, times, vs_memcpy, vs_torch, rounds, min_times, vs_floor, vs_onednn)


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


# --------------------------------------------------------------------------- gate


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
        Valid case ids (default: those of :func:`all_cases`).

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
        known_ids = {c.id for c in all_cases()}
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
        is 0 for the first measurement, 1.. for re-measurements.
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


# --------------------------------------------------------------------------- output


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
        "fastnorm/floor": {...}, "fastnorm/onednn": {...}}`` (a metric without any
        value is left out).
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

    The ``floor``/``fastnorm/floor`` and ``onednn``/``fastnorm/onednn`` columns
    are there when any case has them.
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
    }


def _onednn_version():
    """``"major.minor.patch"`` of the oneDNN loaded in this process, or ``None``."""
    onednn = _loaded_onednn()
    return None if onednn is None else ".".join(str(v) for v in onednn.version)


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
    "memcpy", "torch", "floor", "onednn"}, "fastnorm_over_torch",
    "fastnorm_over_memcpy", "fastnorm_over_floor", "fastnorm_over_onednn"},
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
# fastnorm benchmark regression thresholds, read by `python -m fastnorm.bench --check`.
#
# Format (TOML):
#
#   [settings]            optional; command-line options override these
#   rounds = 11           interleaved rounds per measurement
#   threads = 2           Numba and torch threads (clamped to the CPUs available)
#   rechecks = 2          re-measurements of a failing case before it fails
#   target_ms = 1.0       duration of a timed block (the fastest of 3 blocks counts)
#
#   [cases]               one entry per checked case id (`python -m fastnorm.bench --list`)
#   "bn-fwd-nchw-f32-8x64x32x32" = { max_vs_memcpy = 3.0, max_vs_torch = 1.2 }
#
# max_vs_memcpy bounds fastnorm time / np.copyto time of the same tensor, and
# max_vs_torch bounds fastnorm time / torch.nn.functional time, both medians over
# rounds of the ratio of timings interleaved in one process.  Absolute times are
# never compared.  Either key may be left out (not checked); max_vs_torch is
# skipped when torch is not installed.  A case fails only if a ratio stays above
# its limit in the first measurement and in every re-measurement.
# Regenerate from a fresh measurement with
#   python -m fastnorm.bench --write-thresholds benchmarks/thresholds.toml --headroom 2.0
"""


# --------------------------------------------------------------------------- CLI


def _split(values):
    if values is None:
        return None
    out = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def build_parser():
    """Build the ``argparse`` parser of ``python -m fastnorm.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m fastnorm.bench",
        description=(
            "Time fastnorm against torch.nn.functional and a memcpy of the same tensor, interleaved in "
            "rounds; print fastnorm/torch and fastnorm/memcpy per case; optionally gate on thresholds."
        ),
    )
    sel = parser.add_argument_group("case selection (comma-separated or repeated)")
    sel.add_argument("--kinds", action="append", help=f"{','.join(KINDS)} (or full names); default all")
    sel.add_argument("--passes", action="append", help=f"{','.join(PASSES)}; default all")
    sel.add_argument("--layouts", action="append", help=f"{','.join(LAYOUTS)}; default all")
    sel.add_argument("--dtypes", action="append", help=f"{','.join(DTYPES)}; default all")
    sel.add_argument("--sizes", action="append", help=f"{','.join(SIZES)}; default all")
    sel.add_argument("--cases", action="append", help="explicit case ids")
    sel.add_argument(
        "--quick",
        action="store_true",
        help="mid and first large shape only, float32 unless --dtypes; 7 rounds",
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
    measurements = {
        c.id: Measurement(
            c.id,
            saved[c.id]["time_s"],
            saved[c.id]["fastnorm_over_memcpy"],
            saved[c.id]["fastnorm_over_torch"],
            saved[c.id]["rounds"],
            saved[c.id].get("time_min_s", {}),
            saved[c.id].get("fastnorm_over_floor"),
            saved[c.id].get("fastnorm_over_onednn"),
        )
        for c in cases
    }
    scaling = data.get("scaling")
    command = "python -m fastnorm.bench " + " ".join(meta.get("argv", []))
    print(format_table(cases, measurements))
    if args.json:
        write_json(args.json, cases, measurements, meta, scaling)
    if args.markdown:
        write_markdown(args.markdown, cases, measurements, meta, scaling, command=command.strip())
    if args.plot:
        title = f"fastnorm, {meta.get('threads')} threads ({meta.get('platform')})"
        write_plot(args.plot, cases, measurements, title=title)
    return 0


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
    try:
        cases = select_cases(
            _split(args.kinds),
            _split(args.passes),
            _split(args.layouts),
            _split(args.dtypes),
            _split(args.sizes),
            args.quick,
            _split(args.cases),
        )
    except ValueError as exc:
        parser.error(str(exc))

    settings, thresholds = {}, {}
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
    if args.onednn:
        from . import _onednn

        try:
            load_onednn()
        except _onednn.OneDNNError as exc:
            print(f"error: --onednn: {exc}", file=sys.stderr)
            return 2
    set_threads(threads)

    def measure(case, attempt=0):
        return measure_case(
            case,
            rounds=rounds * (2 if attempt else 1),
            threads=threads,
            target_s=target_s,
            with_torch=with_torch,
            seed=args.seed + attempt,
            with_floor=args.floor,
            with_onednn=args.onednn,
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
    command = "python -m fastnorm.bench " + " ".join(meta["argv"])
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
        if result.torch_unchecked:
            count = len(result.torch_unchecked)
            print(f"torch thresholds not checked (torch unavailable) for {count} case(s)")
        if result.passed:
            print(f"\ncheck passed: {len(cases)} case(s) within their thresholds")
        else:
            print(f"\ncheck FAILED: {len({v.case_id for v in result.violations})} case(s) regressed:")
            for violation in result.violations:
                print(f"  {violation}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
