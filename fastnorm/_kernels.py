"""The one parameterized normalization kernel family (forward, inference, backward).

Every norm is computed on a flat, C-contiguous buffer viewed as ``(N, C, S)``
(channels-first, "cf") or ``(N, S, C)`` (channels-last, "cl"), with the ``C``
channels split into ``G`` groups of ``D = C // G`` channels. Statistics are
taken over the ``D * S`` elements of a group for every sample ``n``, or over
the ``N * D * S`` elements of a group across the batch (flag ``BATCH``):

=============  ======================  ===================================
norm           kernel view             flags
=============  ======================  ===================================
BatchNorm      (N, C, S), G = C        BATCH | CENTERED
InstanceNorm   (N, C, S), G = C        CENTERED
GroupNorm      (N, C, S), G groups     CENTERED
LayerNorm      (R, 1, K), G = 1        CENTERED | PER_ELEMENT
RMSNorm        (R, 1, K), G = 1        PER_ELEMENT
=============  ======================  ===================================

(``R`` = product of the leading dims, ``K`` = product of the normalized dims;
``PER_ELEMENT`` means weight/bias are indexed by the position ``s`` inside the
group instead of by the channel.)  Add ``CHANNELS_LAST`` for an (N, S, C)
buffer.  The parameters travel in one small value, :class:`KernelSpec`.

Numerics and determinism
------------------------
Moments are accumulated in float64 over fixed blocks of at most ``BLOCK``
elements (one plane slice in cf; ``max(BLOCK // C, CL_MIN_ROWS)`` rows in cl), each block in
one pass with sums shifted by its first element (two passes when that would
cancel too many bits, see :func:`_moments`), and blocks are merged with Chan et
al.'s pairwise update in a fixed order.  Block boundaries and merge order
depend only on the shape, never on the number of threads, so results are
bitwise reproducible for any ``numba.set_num_threads``.  The strategy (fused
per group vs. split into block / group / block phases) is chosen from the
shape alone, except that channels-last training passes also fuse when asked
to by ``FUSE_SETS`` (from the thread count): the same arithmetic in the same
order either way.

The kernels validate nothing: the public layer (:mod:`fastnorm.core`) checks
shapes, dtypes and contiguity before calling them.
"""

from __future__ import annotations

import types
from collections import namedtuple

import numpy as np
from numba import prange

from ._config import glue, helper, kernel

#: Statistics are shared by all samples of the batch (BatchNorm).
BATCH = 1
#: Subtract the mean (all norms but RMSNorm).
CENTERED = 2
#: weight/bias are indexed by the position in the group (LayerNorm, RMSNorm).
PER_ELEMENT = 4
#: The buffer is (N, S, C) instead of (N, C, S).
CHANNELS_LAST = 8
#: Channels-last training passes: one fused task per statistics set even below
#: ``FUSE_MIN_GROUPS`` sets.  Set per call by :mod:`fastnorm.core` from 4 sets
#: per thread on (a kernel cannot ask for the thread count and stay cacheable);
#: both ways do the same arithmetic in the same order, so the results are
#: bitwise identical.
FUSE_SETS = 16

#: Elements per reduction block. Fixed, so results never depend on threads.
BLOCK = 4096
#: Run one fused task per group (read it once into cache, normalize it while
#: hot) when there are at least this many groups; otherwise split every pass
#: into parallel blocks so that a few huge groups still use every core.
FUSE_MIN_GROUPS = 32
#: A one-pass (shifted) block moment that lost more than log2 of this many bits
#: to cancellation is recomputed with two passes.
CANCELLATION_LIMIT = 1024.0
#: Fewest rows of a channels-last reduction block (``max(BLOCK // C,
#: CL_MIN_ROWS)`` rows of one sample).  Every block ends with a per-channel
#: finish (a division and a cancellation check) costing about as much as 16 rows
#: of accumulation, so at C=256 blocks of ``BLOCK // C = 16`` rows spent a
#: third of the moments pass finishing blocks (measured fwd 8.2 -> 4.9 ms).
CL_MIN_ROWS = 256
#: Longest channels-last row, in bytes, whose moments take four consecutive
#: rows per step; the backward dot products, and the moments of longer rows,
#: take four rows per step too, but one from each quarter of the block.  Either
#: way the float64 accumulators are loaded and stored once per four rows (two
#: rows per step were 1.6x faster than one at C=64, four 0.69-0.72x of two in
#: cache).  Four consecutive rows of 512 bytes or more read memory slowly: one
#: thread, 33.5 MB, moments per element, consecutive / quarters / one row per
#: step: float32 C=128 0.45 / 0.18 ns, C=256 0.38-0.52 / 0.15-0.20 / 0.24-0.32
#: ns, C=512 0.33-0.35 / 0.16-0.19 / 0.27-0.38 ns; float64 C=64 0.60 / 0.28 ns,
#: C=128 0.59 / 0.23 ns.  Up to 256 bytes consecutive rows were as fast or faster
#: (float32 C=64 0.19 / 0.20, C=32 0.19 / 0.22, C=16 0.21 / 0.26 ns; float64 C=32
#: 0.31 / 0.30 ns).  Kernel A/B against the one-row (wider than 128 channels)
#: and consecutive-row loops of before (stop 14), 2 threads, same process:
#: forward float32 (16,4096,128) 0.70x, (8,4096,256) 0.87-0.97x, (2,1024,1024)
#: 0.89x, (32,3136,64) 1.02-1.04x (its moments unchanged), float64 (32,3136,64)
#: 0.82-0.83x; backward float32 (16,4096,128) 0.79x, (8,4096,16) 0.85x,
#: (8,2048,32) 0.89x, (2,1024,1024) 0.83x, (8,4096,256) and (32,3136,64)
#: 1.00-1.04x, float64 (32,3136,64) 0.84-0.88x (docs/benchmarks.md, stop 15).
CL_CONSECUTIVE_ROW_BYTES = 256
#: Channels-last elementwise passes (normalize, dx) over at most this many
#: channels, with one statistics set (BatchNorm), step over several rows at
#: once: a row of C <= 32 elements is too short for the per-row cost of a
#: vector loop.  Kernel A/B, float32, 2 threads, same process, fwd / inf / bwd:
#: (8,16,64,64) 0.78-0.82 / 0.62-0.63 / 0.77-0.80x, (8,32,64,32) 0.88 / 0.72-0.80 /
#: 0.89x.  At C=64 the gain was within the noise in cache ((8,64,32,32)
#: 0.86-1.01x) and from memory ((32,64,56,56) 0.95-1.39x with 2 KB steps,
#: 0.97-1.05x with 1 KB): more coefficient streams beside x and y.
CL_TILE_MAX_CHANNELS = 32
#: Bytes of ``x`` per step of those passes (the coefficient vectors repeated to that length).
CL_TILE_BYTES = 1024
#: Columns per task of the per-element (LayerNorm) parameter-gradient reduction.
COLUMN_TILE = 2048
#: Fewest rows per task when LayerNorm's backward accumulates dweight/dbias
#: partials while computing dx (used from 4 * ROW_CHUNK rows on).
ROW_CHUNK = 32
#: Most tasks (row chunks) of that pass: chunks grow beyond ROW_CHUNK rows so
#: that there are at most this many float64 partial vectors to allocate and
#: merge.  At (4096, 768) float32 on 2 threads, 128 chunks of 32 rows took
#: 1.97-2.13 ms, 32 chunks of 128 rows 1.46 ms (same process, interleaved).
ROW_TASKS = 32
#: Shortest LayerNorm row whose training forward is software-pipelined (normalize
#: a row while summing the next one's moments: :func:`_rows_forward`).  Kernel
#: A/B, float32, 2 threads, same process: (512, 768) 0.82-0.93x, (4096, 768)
#: 0.73-1.08x (memory-bound, noisy), rows of 128 and 56 0.92-1.04x, rows of 16
#: 1.06-1.12x.
PIPELINE_MIN_WIDTH = 256
#: Longest such row, in bytes: two input rows, an output row and the weights
#: must stay in L1.  One thread, 1024 rows: float32 0.82-0.88x from 256 to 1536
#: elements (6 KB), 0.94-1.00x at 2048; float64 0.87x at 256, 0.93-0.97x at 512,
#: 0.97-1.08x at 768 (6 KB), 1.00-1.17x from 1024 on.
PIPELINE_MAX_ROW_BYTES = 4096

KernelSpec = namedtuple("KernelSpec", ["batch", "channels", "spatial", "groups", "flags", "eps"])
KernelSpec.__doc__ = """Geometry and options of one kernel call.

Parameters
----------
batch : int
    ``N``, number of samples (rows for LayerNorm / RMSNorm).
channels : int
    ``C``, number of channels (1 for LayerNorm / RMSNorm).
spatial : int
    ``S``, product of the spatial dims (``K`` for LayerNorm / RMSNorm).
groups : int
    ``G``, number of channel groups; divides ``channels``.
flags : int
    Bitwise or of ``BATCH``, ``CENTERED``, ``PER_ELEMENT``, ``CHANNELS_LAST``.
eps : float
    Added to the variance (mean square for RMSNorm) before the square root.
"""


def num_stats(spec):
    """Return the number of (mean, rstd) pairs a kernel call produces or consumes."""
    sets = 1 if spec.flags & BATCH else spec.batch
    return sets * spec.groups


# ---------------------------------------------------------------------------
# Shared numerics
# ---------------------------------------------------------------------------


@helper
def _merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two sets of moments (count, mean, sum of squared deviations).

    Notes
    -----
    Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm
    for computing sample variances": stable for any ratio of mean to spread.
    """
    if count_a == 0.0:
        return count_b, mean_b, m2_b
    count = count_a + count_b
    frac = count_b / count
    delta = mean_b - mean_a
    return count, mean_a + delta * frac, m2_a + m2_b + delta * delta * count_a * frac


@glue
def _finish(count, mean, m2, flags, eps):
    """Return the ``(mean, rstd)`` used to normalize a group.

    ``rstd = 1 / sqrt(m2 / count + eps)``: with ``CENTERED`` ``m2`` is the sum
    of squared deviations (biased variance ``m2 / count``); without it
    (RMSNorm) the moments are ``(0, sum(x**2))``, so this is
    ``1 / sqrt(mean(x**2) + eps)`` and the mean used is 0.
    """
    return mean, 1.0 / np.sqrt(m2 / count + eps)


@glue
def _stat_index(spec, n, c):
    """Index of the statistics that apply to sample ``n``, channel ``c``.

    No division for one channel per group (BatchNorm, InstanceNorm): a 64-bit
    division per plane was about 2.5 ns of a 9-20 ns per-plane overhead.
    """
    if spec.groups == spec.channels:
        group = np.int64(c)
    else:
        group = np.int64(c) // (spec.channels // spec.groups)
    if spec.flags & BATCH:
        return group
    return n * spec.groups + group


@glue
def _plane_stat_index(spec, plane):
    """:func:`_stat_index` of plane ``plane = n * C + c``.

    Without integer division for one channel (LayerNorm / RMSNorm rows): two
    64-bit divisions cost as much as normalizing a row of a few elements.
    """
    if spec.channels == 1:
        return 0 if spec.flags & BATCH else np.int64(plane)
    if spec.groups == spec.channels and not spec.flags & BATCH:
        return np.int64(plane)  # InstanceNorm: one statistics pair per plane
    n = plane // spec.channels
    return _stat_index(spec, n, plane - n * spec.channels)


@glue
def _block_plane(blk, nblocks):
    """``(plane, block)`` of flat block index ``blk`` (no division for one block per plane)."""
    if nblocks == 1:
        return np.int64(blk), 0
    plane = np.int64(blk) // nblocks
    return plane, np.int64(blk) - plane * nblocks


@glue
def _group(spec, k):
    """Return ``(first sample, samples, first channel, channels)`` of group ``k``."""
    if spec.groups == 1:  # no division (LayerNorm / RMSNorm rows)
        if spec.flags & BATCH:
            return 0, spec.batch, 0, spec.channels
        return np.int64(k), 1, 0, spec.channels
    d = spec.channels // spec.groups
    c0 = (k % spec.groups) * d
    if spec.flags & BATCH:
        return 0, spec.batch, c0, d
    return k // spec.groups, 1, c0, d


@glue
def _moments(x, off, count, centered):
    """Moments of ``x[off:off+count]`` in float64: ``(mean, sum((x - mean)**2))``.

    One pass over the block with sums shifted by its first element ``K``:
    ``mean = K + sum(x-K)/n``, ``m2 = sum((x-K)**2) - sum(x-K)**2/n``.  The
    subtraction can only lose accuracy when ``K`` is far from the block mean
    relative to its spread; when it has cost more than ``log2(CANCELLATION_LIMIT)``
    bits the block is recomputed with the corrected two-pass algorithm
    (:func:`_moments_two_pass`), so the result is always as accurate as a
    centered computation.  A constant block gets exactly its value as mean and
    0 as sum of squares.  Without ``centered`` (RMSNorm) returns
    ``(0, sum(x**2))``: no ``inf - inf`` when ``x`` holds an inf.
    """
    xs = x[off : off + count]
    if not centered:
        sum_sq = 0.0
        for i in range(count):
            sum_sq += xs[i] * np.float64(xs[i])
        return 0.0, sum_sq
    shift = np.float64(xs[0])
    sum_dev = 0.0
    sum_sq = 0.0
    for i in range(count):
        dev = xs[i] - shift
        sum_dev += dev
        sum_sq += dev * dev
    return _shifted_moments(xs, count, shift, sum_dev, sum_sq)


@glue
def _shifted_moments(xs, count, shift, sum_dev, sum_sq):
    """Finish :func:`_moments` from the sums of ``xs - shift`` and of its squares."""
    m2 = sum_sq - sum_dev * sum_dev / count
    if sum_sq > CANCELLATION_LIMIT * m2:
        return _moments_two_pass(xs, count)
    return shift + sum_dev / count, m2


@helper
def _moments_two_pass(xs, count):
    """Corrected two-pass moments (Chan, Golub & LeVeque 1983, eq. 1.7) of ``xs``."""
    total = 0.0
    for i in range(count):
        total += xs[i]
    mean = total / count
    sum_dev = 0.0
    m2 = 0.0
    for i in range(count):
        dev = xs[i] - mean
        sum_dev += dev
        m2 += dev * dev
    return mean + sum_dev / count, m2 - sum_dev * sum_dev / count


@glue
def _dots(dy, x, off, count, mean):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` over ``[off, off+count)``."""
    xs = x[off : off + count]
    dys = dy[off : off + count]
    sum_dy = 0.0
    sum_dy_xc = 0.0
    for i in range(count):
        sum_dy += dys[i]
        sum_dy_xc += dys[i] * (xs[i] - mean)
    return sum_dy, sum_dy_xc


@glue
def _dots_weighted(dy, x, weight, off, count, s0, mean):
    """:func:`_dots` of ``g = dy * weight[s0 + i]`` (per-element affine)."""
    xs = x[off : off + count]
    dys = dy[off : off + count]
    ws = weight[s0 : s0 + count]
    sum_g = 0.0
    sum_g_xc = 0.0
    for i in range(count):
        g = dys[i] * ws[i]
        sum_g += g
        sum_g_xc += g * (xs[i] - mean)
    return sum_g, sum_g_xc


@glue
def _split(like, value):
    """Round the float64 ``value`` to ``like``'s dtype as ``hi + lo`` (both that dtype).

    ``hi`` is ``value`` rounded, ``lo`` the rounded remainder: ``hi + lo``
    carries about twice the dtype's precision, and ``lo`` is 0 for float64.
    """
    hi = like.dtype.type(value)
    return hi, like.dtype.type(value - hi)


@glue
def _fold(constant, factor, mean_lo, like):
    """``constant - factor * mean_lo`` rounded to ``like``'s dtype.

    Skips the product when ``mean_lo`` is 0 (float64 data, or a mean exact in
    float32), so that an infinite ``factor`` does not turn ``constant`` into NaN.
    """
    if mean_lo == 0.0:
        return like.dtype.type(constant)
    return like.dtype.type(constant - factor * mean_lo)


# The elementwise passes (normalize, dx) run in the input's dtype: for float32
# data, float32 arithmetic does twice the elements per instruction and needs no
# conversions (measured 1.75x faster on a LayerNorm normalize loop).  Every
# coefficient is computed in float64 and rounded once; the mean keeps its
# float64 accuracy as ``hi + lo``: ``x - hi`` is exact near the mean (Sterbenz),
# and ``lo`` is folded into the per-group additive constant in float64.  The
# result is within a few units in the last place of the largest term (see
# docs/guarantees.md); for float64 data ``lo`` is 0 and nothing changes.


@glue
def _normalize(x, y, off, count, mean, scale, shift):
    """``y = (x - mean) * scale + shift`` over ``[off, off+count)``, in ``x``'s dtype.

    Computed as ``(x - mean_hi) * scale + (shift - mean_lo * scale)``.
    """
    xs = x[off : off + count]
    ys = y[off : off + count]
    mean_hi, mean_lo = _split(xs, mean)
    scale_x = xs.dtype.type(scale)
    shift_x = _fold(shift, scale, mean_lo, xs)
    for i in range(count):
        ys[i] = (xs[i] - mean_hi) * scale_x + shift_x


@glue
def _normalize_per_element(x, y, weight, bias, off, count, s0, mean, rstd):
    """``y = (x - mean) * (rstd * weight[s]) + bias[s]``, ``s = s0 + i`` (LayerNorm).

    In ``x``'s dtype as ``((x - mean_hi) - mean_lo) * (rstd * weight[s]) + bias[s]``.
    """
    xs = x[off : off + count]
    ys = y[off : off + count]
    ws = weight[s0 : s0 + count]
    bs = bias[s0 : s0 + count]
    mean_hi, mean_lo = _split(xs, mean)
    rstd_x = xs.dtype.type(rstd)
    if weight.size > 0 and bias.size > 0:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * (rstd_x * ws[i]) + bs[i]
    elif weight.size > 0:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * (rstd_x * ws[i])
    elif bias.size > 0:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * rstd_x + bs[i]
    else:
        for i in range(count):
            ys[i] = ((xs[i] - mean_hi) - mean_lo) * rstd_x


@glue
def _normalize_row_sum_next(xs, ys, ws, bs, mean, rstd, next_xs, shift):
    """Normalize one LayerNorm row while summing the moments of the next one, in one loop.

    ``ys`` is :func:`_normalize_per_element` of ``xs`` with weight ``ws`` and
    bias ``bs`` (the same arithmetic); the return value is the sums that
    :func:`_moments` takes over ``next_xs``: of ``next_xs - shift`` and of
    its squares.  The normalize loop is bound by its stores and the moments
    loop by float64 arithmetic, so together they take less time than one
    after the other.
    """
    mean_hi, mean_lo = _split(xs, mean)
    rstd_x = xs.dtype.type(rstd)
    sum_dev = 0.0
    sum_sq = 0.0
    for i in range(xs.size):
        ys[i] = ((xs[i] - mean_hi) - mean_lo) * (rstd_x * ws[i]) + bs[i]
        dev = next_xs[i] - shift
        sum_dev += dev
        sum_sq += dev * dev
    return sum_dev, sum_sq


@helper
def _rows_forward(x, y, weight, bias, spec, mean, rstd, k0, k1):
    """Training forward of LayerNorm rows ``k0 .. k1-1``, with weight and bias (:func:`_pipelined_rows`).

    Software-pipelined: the loop that normalizes row ``k`` also sums row
    ``k+1``'s moments (:func:`_normalize_row_sum_next`); the rows' statistics
    are those of :func:`_moments` and :func:`_finish`.  Measured on one
    thread with rows of 768 float32 in cache: 0.19 ns per element against
    0.25 for the two loops one after the other.
    """
    width = spec.spatial
    row_mean, row_m2 = _moments(x, k0 * width, width, True)
    for k in range(k0, k1):
        row_mean, row_rstd = _finish(float(width), row_mean, row_m2, spec.flags, spec.eps)
        mean[k] = row_mean
        rstd[k] = row_rstd
        xs = x[k * width : (k + 1) * width]
        ys = y[k * width : (k + 1) * width]
        if k + 1 == k1:
            _normalize_per_element(x, y, weight, bias, k * width, width, 0, row_mean, row_rstd)
            break
        next_xs = x[(k + 1) * width : (k + 2) * width]
        shift = np.float64(next_xs[0])
        sum_dev, sum_sq = _normalize_row_sum_next(xs, ys, weight, bias, row_mean, row_rstd, next_xs, shift)
        row_mean, row_m2 = _shifted_moments(next_xs, width, shift, sum_dev, sum_sq)


@glue
def _dx_constants(like, mean, kx, k0):
    """``(mean_hi, kx, k0 - kx * mean_lo)`` of :func:`_dx_span` in ``like``'s dtype."""
    mean_hi, mean_lo = _split(like, mean)
    return mean_hi, like.dtype.type(kx), _fold(k0, kx, mean_lo, like)


@glue
def _dx_span(dys, xs, dxs, a, kx, k0, mean):
    """``dx = a * dy - kx * (x - mean) - k0`` over equal-length spans, in ``x``'s dtype.

    Computed as ``a * dy - kx * (x - mean_hi) - (k0 - kx * mean_lo)``.
    """
    mean_hi, kx_x, k0_x = _dx_constants(xs, mean, kx, k0)
    a_x = xs.dtype.type(a)
    for i in range(xs.size):
        dxs[i] = a_x * dys[i] - kx_x * (xs[i] - mean_hi) - k0_x


@glue
def _dx_per_element_span(dys, xs, ws, dxs, rstd, kx, k0, mean):
    """:func:`_dx_span` with ``a = rstd * ws[i]`` (per-element affine)."""
    mean_hi, kx_x, k0_x = _dx_constants(xs, mean, kx, k0)
    rstd_x = xs.dtype.type(rstd)
    for i in range(xs.size):
        dxs[i] = (rstd_x * ws[i]) * dys[i] - kx_x * (xs[i] - mean_hi) - k0_x


@glue
def _dx_row_span(dys, xs, ws, dxs, rstd, kx, k0, mean):
    """``dx`` over a span of a LayerNorm/RMSNorm row: ``ws`` its weights, or empty for none."""
    if ws.size > 0:
        _dx_per_element_span(dys, xs, ws, dxs, rstd, kx, k0, mean)
    else:
        _dx_span(dys, xs, dxs, rstd, kx, k0, mean)


# ---------------------------------------------------------------------------
# Channels-first: (N, C, S); block = up to BLOCK contiguous elements of a plane
# ---------------------------------------------------------------------------


@glue
def _cf_fused(spec, nstats):
    """Whether a channels-first pass runs one fused task per group.

    Only for groups that are contiguous in memory (not ``BATCH``): a BatchNorm
    group is ``N`` planes far apart, and reading it plane after plane defeats
    the hardware prefetcher (measured 3.6x slower than streaming the whole
    tensor twice in the split phases).
    """
    return nstats >= FUSE_MIN_GROUPS and not spec.flags & BATCH


@glue
def _cf_block_span(spec, plane, b):
    """``(off, count, s0)`` of block ``b`` of plane ``plane``.

    Its offset in the buffer, its length, and its first position in the plane.
    """
    s0 = b * BLOCK
    return plane * spec.spatial + s0, min(BLOCK, spec.spatial - s0), s0


@glue
def _cf_moments_block(x, work, spec, nblocks, plane, b):
    """Store the moments of block ``b`` of plane ``plane = n*C + c`` in ``work``."""
    off, count, _ = _cf_block_span(spec, plane, b)
    blk = plane * nblocks + b
    work[2 * blk], work[2 * blk + 1] = _moments(x, off, count, spec.flags & CENTERED)


@glue
def _cf_merge_group(work, mean, rstd, spec, nblocks, k):
    """Merge group ``k``'s block moments into ``mean[k], rstd[k]``.

    Merge order: sample, channel, block (fixed).
    """
    n0, samples, c0, d = _group(spec, k)
    count = 0.0
    group_mean = 0.0
    m2 = 0.0
    for n in range(n0, n0 + samples):
        for c in range(c0, c0 + d):
            blk0 = (n * spec.channels + c) * nblocks
            for b in range(nblocks):
                block_count = float(min(BLOCK, spec.spatial - b * BLOCK))
                count, group_mean, m2 = _merge(
                    count, group_mean, m2, block_count, work[2 * (blk0 + b)], work[2 * (blk0 + b) + 1]
                )
    mean[k], rstd[k] = _finish(count, group_mean, m2, spec.flags, spec.eps)


@glue
def _cf_normalize_block(x, y, weight, bias, spec, mean, rstd, plane, b):
    """Normalize block ``b`` of plane ``plane`` with its group's ``mean``, ``rstd``."""
    off, count, s0 = _cf_block_span(spec, plane, b)
    if spec.flags & PER_ELEMENT:
        _normalize_per_element(x, y, weight, bias, off, count, s0, mean, rstd)
    else:
        scale, shift = _cf_plane_coefs(weight, bias, spec, rstd, plane)
        _normalize(x, y, off, count, mean, scale, shift)


@glue
def _cf_plane_coefs(weight, bias, spec, rstd, plane):
    """``(scale, shift)`` of a per-channel plane: ``rstd * weight[c]`` and ``bias[c]``."""
    c = plane % spec.channels
    scale = rstd * weight[c] if weight.size > 0 else rstd
    shift = bias[c] if bias.size > 0 else 0.0
    return scale, shift


@glue
def _cf_group_one_block(x, mean, rstd, spec, k):
    """Moments of fused group ``k``, contiguous and of at most ``BLOCK`` elements, in one pass.

    Stores its ``mean[k]`` and ``rstd[k]``; returns its first plane and both.
    """
    n0, _, c0, d = _group(spec, k)
    plane = n0 * spec.channels + c0
    count = d * spec.spatial
    block_mean, block_m2 = _moments(x, plane * spec.spatial, count, spec.flags & CENTERED)
    group_mean, group_rstd = _finish(float(count), block_mean, block_m2, spec.flags, spec.eps)
    mean[k] = group_mean
    rstd[k] = group_rstd
    return plane, group_mean, group_rstd


@glue
def _cf_normalize_planes(x, weight, bias, y, mean, rstd, spec):
    """Normalize every block of every plane with its group's statistics (parallel over blocks).

    One loop per kind of parameters, each calling its elementwise loop
    directly.  Through :func:`_cf_normalize_block`, whose branch sits inside
    the loop, every plane cost about 20 ns more, whatever its size: the
    compiled loop called Numba's reference-count functions per iteration.
    Serial build, BatchNorm (1, 64, 64) float32: 1.48 us before, 0.83-1.04 us
    with these loops, 0.65 us once :func:`_stat_index` also skipped its
    division (docs/benchmarks.md, stop 14).
    """
    nblocks = (spec.spatial + BLOCK - 1) // BLOCK
    centered = spec.flags & CENTERED != 0
    if spec.flags & PER_ELEMENT:
        for blk in prange(spec.batch * spec.channels * nblocks):
            plane, b = _block_plane(blk, nblocks)
            k = _plane_stat_index(spec, plane)
            off, count, s0 = _cf_block_span(spec, plane, b)
            _normalize_per_element(x, y, weight, bias, off, count, s0, mean[k] if centered else 0.0, rstd[k])
    else:
        for blk in prange(spec.batch * spec.channels * nblocks):
            plane, b = _block_plane(blk, nblocks)
            k = _plane_stat_index(spec, plane)
            off, count, _ = _cf_block_span(spec, plane, b)
            scale, shift = _cf_plane_coefs(weight, bias, spec, rstd[k], plane)
            _normalize(x, y, off, count, mean[k] if centered else 0.0, scale, shift)


@glue
def _pipelined_rows(x, y, weight, bias, spec):
    """Whether :func:`_rows_forward` serves these rows.

    LayerNorm with weight and bias, over rows of ``PIPELINE_MIN_WIDTH``
    elements to ``PIPELINE_MAX_ROW_BYTES`` bytes, out of place.  Other affine
    variants and RMSNorm keep the two loops of the one-block path (RMSNorm's
    cheaper moments loop gained nothing: 0.89-1.16x at (4096, 768), same
    process).  So does an in-place call: with ``y`` on ``x``, LLVM's runtime
    overlap check sends the pipelined loop to its scalar version, whose
    sums run in another order, and the statistics would differ in their
    last bits from the out-of-place ones.
    """
    if not spec.flags & CENTERED or weight.size == 0 or bias.size == 0 or x.ctypes.data == y.ctypes.data:
        return False
    return PIPELINE_MIN_WIDTH <= spec.spatial and spec.spatial * x.itemsize <= PIPELINE_MAX_ROW_BYTES


@kernel
def forward_train_cf(x, weight, bias, y, mean, rstd, params):
    """Training forward pass on a channels-first buffer.

    Parameters
    ----------
    x : ndarray, 1-D, C-contiguous, float32 or float64
        Input, ``N * C * S`` elements in (N, C, S) order.
    weight, bias : ndarray, 1-D, same dtype as ``x``
        Affine parameters (length ``C``, or ``S`` with ``PER_ELEMENT``); an
        empty array means absent (weight 1, bias 0).
    y : ndarray, 1-D, same dtype and size as ``x``
        Output. May be ``x`` itself (in-place).
    mean, rstd : ndarray, 1-D, float64, length :func:`num_stats`
        Outputs: the per-group mean (0 without ``CENTERED``) and
        ``1 / sqrt(var + eps)``.
    params : tuple
        The fields of a :class:`KernelSpec` (a ``KernelSpec`` itself, or a
        plain tuple: Numba dispatches a plain tuple about 0.7 us faster).

    Notes
    -----
    Ioffe & Szegedy (2015), Algorithm 1 (BN); Ba et al. (2016), eq. 4 (LN);
    Ulyanov et al. (2016), eq. 2 (IN); Wu & He (2018), eq. 1-3 (GN); Zhang &
    Sennrich (2019), eq. 4 (RMSNorm).  Normalization uses the centered form
    ``(x - mean) * (rstd * weight) + bias`` so that constant groups map
    exactly to ``bias``.
    """
    spec = KernelSpec(*params)
    nblocks = (spec.spatial + BLOCK - 1) // BLOCK
    planes = spec.batch * spec.channels
    nstats = mean.size
    fused = _cf_fused(spec, nstats)
    # Statistics go straight to mean/rstd; one-block groups need no workspace
    # (a (rows,)-sized staging buffer cost page faults on millions of short rows).
    # A fused group is contiguous (its d planes follow each other), so a group
    # of at most BLOCK elements is one block even when it spans several planes.
    one_block = fused and (spec.channels // spec.groups) * spec.spatial <= BLOCK
    if one_block and spec.flags & PER_ELEMENT and _pipelined_rows(x, y, weight, bias, spec):
        chunk = (nstats + ROW_TASKS - 1) // ROW_TASKS
        for t in prange((nstats + chunk - 1) // chunk):
            _rows_forward(x, y, weight, bias, spec, mean, rstd, t * chunk, min(nstats, (t + 1) * chunk))
        return
    if one_block:
        # One task per one-block group (short LayerNorm row, small
        # InstanceNorm plane, the few small planes of a GroupNorm group): the
        # moments of the whole group in one pass, no workspace, then its
        # planes normalized while in cache.  One loop per kind of parameters,
        # as in _cf_normalize_planes.
        if spec.flags & PER_ELEMENT:
            for k in prange(nstats):
                row, group_mean, group_rstd = _cf_group_one_block(x, mean, rstd, spec, k)
                off = row * spec.spatial
                _normalize_per_element(x, y, weight, bias, off, spec.spatial, 0, group_mean, group_rstd)
        else:
            for k in prange(nstats):
                plane, group_mean, group_rstd = _cf_group_one_block(x, mean, rstd, spec, k)
                for c in range(plane, plane + spec.channels // spec.groups):
                    scale, shift = _cf_plane_coefs(weight, bias, spec, group_rstd, c)
                    _normalize(x, y, c * spec.spatial, spec.spatial, group_mean, scale, shift)
        return
    work = np.empty(2 * planes * nblocks)
    if fused:
        # One task per group: read it once, normalize it while it is in cache.
        for k in prange(nstats):
            n0, samples, c0, d = _group(spec, k)
            for n in range(n0, n0 + samples):
                for c in range(c0, c0 + d):
                    for b in range(nblocks):
                        _cf_moments_block(x, work, spec, nblocks, n * spec.channels + c, b)
            _cf_merge_group(work, mean, rstd, spec, nblocks, k)
            for n in range(n0, n0 + samples):
                for c in range(c0, c0 + d):
                    for b in range(nblocks):
                        plane = n * spec.channels + c
                        _cf_normalize_block(x, y, weight, bias, spec, mean[k], rstd[k], plane, b)
    else:
        # Few (large) groups: every pass is parallel over blocks.
        for blk in prange(planes * nblocks):
            plane, b = _block_plane(blk, nblocks)
            _cf_moments_block(x, work, spec, nblocks, plane, b)
        for k in prange(nstats):
            _cf_merge_group(work, mean, rstd, spec, nblocks, k)
        _cf_normalize_planes(x, weight, bias, y, mean, rstd, spec)


@kernel
def normalize_cf(x, weight, bias, y, mean, rstd, params):
    """Inference forward pass (given statistics) on a channels-first buffer.

    Parameters are those of :func:`forward_train_cf`, except that ``mean`` and
    ``rstd`` are inputs.

    Notes
    -----
    Ioffe & Szegedy (2015), Algorithm 2, step 11: one multiply-add per element
    with ``scale = weight * rstd``, written in the centered form
    ``(x - mean) * scale + bias``.
    """
    _cf_normalize_planes(x, weight, bias, y, mean, rstd, KernelSpec(*params))


@glue
def _cf_dots_block(dy, x, weight, work, coef, spec, nblocks, plane, b, k):
    """Store block ``b`` of ``plane``'s dot products in ``work``.

    ``sum(g)`` and ``sum(g * (x - mean))`` with ``g = dy * weight[s]`` for
    ``PER_ELEMENT`` with a weight, else ``g = dy`` (per-channel weights are
    applied per plane in :func:`_cf_group_coefs`).
    """
    off, count, s0 = _cf_block_span(spec, plane, b)
    blk = plane * nblocks + b
    if spec.flags & PER_ELEMENT and weight.size > 0:
        work[2 * blk], work[2 * blk + 1] = _dots_weighted(dy, x, weight, off, count, s0, coef[4 * k])
    else:
        work[2 * blk], work[2 * blk + 1] = _dots(dy, x, off, count, coef[4 * k])


@glue
def _dx_coefs(sum_g, sum_g_xc, rstd, m, flags):
    """``(kx, k0)`` of :func:`_dx_span` for a group of ``m`` elements.

    ``kx = rstd^3 * sum(g * (x - mean)) / m`` and ``k0 = rstd * sum(g) / m``
    (0 without ``CENTERED``), with ``g = weight * dy``.
    """
    kx = rstd * rstd * rstd * sum_g_xc / m
    k0 = rstd * sum_g / m if flags & CENTERED else 0.0
    return kx, k0


@glue
def _cf_group_coefs(weight, work, coef, spec, nblocks, k):
    """Turn the dot products of group ``k`` into its dx coefficients.

    ``dx = rstd*w*dy - kx * (x - mean) - k0`` with ``kx = rstd^3 * sum(g*(x-mean)) / m``
    and ``k0 = rstd * sum(g) / m`` (0 without ``CENTERED``), stored in
    ``coef[4k+2], coef[4k+3]``.
    """
    n0, samples, c0, d = _group(spec, k)
    per_channel_weight = not (spec.flags & PER_ELEMENT) and weight.size > 0
    sum_g = 0.0
    sum_g_xc = 0.0
    for n in range(n0, n0 + samples):
        for c in range(c0, c0 + d):
            w = weight[c] if per_channel_weight else 1.0
            blk0 = (n * spec.channels + c) * nblocks
            for b in range(nblocks):
                sum_g += w * work[2 * (blk0 + b)]
                sum_g_xc += w * work[2 * (blk0 + b) + 1]
    m = float(samples * d * spec.spatial)
    coef[4 * k + 2], coef[4 * k + 3] = _dx_coefs(sum_g, sum_g_xc, coef[4 * k + 1], m, spec.flags)


@glue
def _cf_dx_block(dy, x, weight, dx, spec, plane, b, mean, rstd, kx, k0):
    """Write ``dx`` of block ``b`` of ``plane`` from its group's coefficients."""
    off, count, s0 = _cf_block_span(spec, plane, b)
    xs = x[off : off + count]
    dys = dy[off : off + count]
    dxs = dx[off : off + count]
    if spec.flags & PER_ELEMENT:
        _dx_row_span(dys, xs, weight[s0 : s0 + count], dxs, rstd, kx, k0, mean)
    else:
        c = plane % spec.channels
        a = rstd * weight[c] if weight.size > 0 else rstd
        _dx_span(dys, xs, dxs, a, kx, k0, mean)


@glue
def _cf_dx_block_k(dy, x, weight, dx, coef, spec, plane, b, k):
    """:func:`_cf_dx_block` with group ``k``'s coefficients ``coef[4k : 4k+4]``."""
    mean, rstd, kx, k0 = coef[4 * k], coef[4 * k + 1], coef[4 * k + 2], coef[4 * k + 3]
    _cf_dx_block(dy, x, weight, dx, spec, plane, b, mean, rstd, kx, k0)


@glue
def _row_dots_and_partials(dys, xs, ws, acc_dy, acc_dy_xhat, mean, rstd):
    """Return :func:`_cf_dots_block`'s sums over a span of a row and accumulate its partials.

    Per-element affine only (``ws`` the span's weights, empty for none); the
    same pass adds the span's ``dy`` and ``dy * xhat`` to the per-position
    partial sums ``acc_dy``, ``acc_dy_xhat``.
    """
    sum_g = 0.0
    sum_g_xc = 0.0
    # Each input element is loaded once, before the stores: Numba tells LLVM
    # nothing about aliasing, so a `dys[i]` written after `acc_dy[i] += ...`
    # is loaded (and converted to float64) again.
    if ws.size > 0:
        for i in range(xs.size):
            dy_i = dys[i]
            xc = xs[i] - mean
            g = dy_i * ws[i]
            acc_dy[i] += dy_i
            acc_dy_xhat[i] += dy_i * xc * rstd
            sum_g += g
            sum_g_xc += g * xc
    else:
        for i in range(xs.size):
            dy_i = dys[i]
            xc = xs[i] - mean
            acc_dy[i] += dy_i
            acc_dy_xhat[i] += dy_i * xc * rstd
            sum_g += dy_i
            sum_g_xc += dy_i * xc
    return sum_g, sum_g_xc


@glue
def _row_backward(dys, xs, ws, dxs, acc_dy, acc_dy_xhat, mean, rstd, flags):
    """Backward of one whole row (one block): dot products and partials, then ``dx``.

    The row is sliced once and the weights and partials are used whole: on
    short rows, slicing them per call cost more than the arithmetic.
    """
    sum_g, sum_g_xc = _row_dots_and_partials(dys, xs, ws, acc_dy, acc_dy_xhat, mean, rstd)
    kx, k0 = _dx_coefs(sum_g, sum_g_xc, rstd, float(xs.size), flags)
    _dx_row_span(dys, xs, ws, dxs, rstd, kx, k0, mean)


@helper
def _param_partials(dys, xs, mean, rstd, part_dy, part_dy_xhat):
    """Add ``dy`` and ``dy * xhat`` over equal-length spans to the partial sums."""
    for s in range(xs.size):
        dy_s = dys[s]  # loaded once: see _row_dots_and_partials
        part_dy[s] += dy_s
        part_dy_xhat[s] += dy_s * (xs[s] - mean) * rstd


@kernel
def backward_cf(dy, x, weight, mean, rstd, dx, dweight, dbias, params):
    """Backward pass on a channels-first buffer.

    Parameters
    ----------
    dy, x : ndarray, 1-D, C-contiguous, same dtype
        Upstream gradient and the forward input.
    weight : ndarray
        Weight used in the forward pass (empty: none).
    mean, rstd : ndarray, float64
        Statistics saved by the forward pass.
    dx : ndarray
        Output gradient of ``x``; may be ``dy`` or ``x`` itself (in-place).
    dweight, dbias : ndarray
        Outputs (length of weight), or empty to skip them.
    params : tuple
        The fields of a :class:`KernelSpec` (a ``KernelSpec`` itself, or a
        plain tuple: Numba dispatches a plain tuple about 0.7 us faster).

    Notes
    -----
    Ioffe & Szegedy (2015), Section 3 (chain rule for BN), generalized to any
    group: with ``xhat = (x - mean) * rstd`` and ``g = weight * dy`` over the
    ``m`` elements of a group, ``dx = rstd * (g - mean(g) - xhat *
    mean(g * xhat))``; without centering (Zhang & Sennrich 2019) the
    ``mean(g)`` term vanishes.  The dot products are taken centered,
    ``sum(g * (x - mean))``, never as ``sum(g*x) - mean*sum(g)``.
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over all but the channel
    (position for ``PER_ELEMENT``).  See ``docs/math.md``.
    """
    spec = KernelSpec(*params)
    nblocks = (spec.spatial + BLOCK - 1) // BLOCK
    planes = spec.batch * spec.channels
    nstats = mean.size
    want_params = dweight.size > 0 or dbias.size > 0
    width = spec.spatial
    if spec.flags & PER_ELEMENT and nstats >= 4 * ROW_CHUNK:
        # Many rows (LayerNorm/RMSNorm): each task takes `chunk` rows and adds
        # their dy and dy*xhat into its own float64 partial vectors (fixed
        # chunks, merged in order below: deterministic).  Taken whether or not
        # dweight/dbias are wanted, so that dx never depends on that choice.
        # A row's dx follows its dot products while it is in L1; no per-row
        # workspace (at millions of short rows, allocating one cost more than
        # the arithmetic).  dx may alias dy: a row is read before it is written.
        chunk = max(ROW_CHUNK, (nstats + ROW_TASKS - 1) // ROW_TASKS)
        nchunks = (nstats + chunk - 1) // chunk
        partial = np.empty(2 * width * nchunks)
        m = float(width)
        for t in prange(nchunks):
            part_dy = partial[2 * width * t : 2 * width * t + width]
            part_dy_xhat = partial[2 * width * t + width : 2 * width * (t + 1)]
            part_dy[:] = 0.0
            part_dy_xhat[:] = 0.0
            for n in range(t * chunk, min(nstats, (t + 1) * chunk)):
                row_mean = mean[n] if spec.flags & CENTERED else 0.0
                row_rstd = rstd[n]
                off = n * width
                if nblocks == 1:
                    xs = x[off : off + width]
                    dys = dy[off : off + width]
                    dxs = dx[off : off + width]
                    _row_backward(dys, xs, weight, dxs, part_dy, part_dy_xhat, row_mean, row_rstd, spec.flags)
                    continue
                sum_g = 0.0
                sum_g_xc = 0.0
                for b in range(nblocks):
                    s0 = b * BLOCK
                    s1 = min(width, s0 + BLOCK)
                    xs = x[off + s0 : off + s1]
                    dys = dy[off + s0 : off + s1]
                    block_g, block_g_xc = _row_dots_and_partials(
                        dys, xs, weight[s0:s1], part_dy[s0:s1], part_dy_xhat[s0:s1], row_mean, row_rstd
                    )
                    sum_g += block_g
                    sum_g_xc += block_g_xc
                kx, k0 = _dx_coefs(sum_g, sum_g_xc, row_rstd, m, spec.flags)
                for b in range(nblocks):
                    _cf_dx_block(dy, x, weight, dx, spec, n, b, row_mean, row_rstd, kx, k0)
        if not want_params:
            return
        for tile in prange((width + COLUMN_TILE - 1) // COLUMN_TILE):
            for s in range(tile * COLUMN_TILE, min(width, (tile + 1) * COLUMN_TILE)):
                sum_dy = 0.0
                sum_dy_xhat = 0.0
                for t in range(nchunks):
                    sum_dy += partial[2 * width * t + s]
                    sum_dy_xhat += partial[2 * width * t + width + s]
                if dbias.size > 0:
                    dbias[s] = sum_dy
                if dweight.size > 0:
                    dweight[s] = sum_dy_xhat
        return
    work = np.empty(2 * planes * nblocks)
    coef = np.empty(4 * nstats)
    for k in range(nstats):
        coef[4 * k] = mean[k] if spec.flags & CENTERED else 0.0
        coef[4 * k + 1] = rstd[k]
    if spec.flags & PER_ELEMENT:
        # Few (long) rows: dot products in parallel over (row, block), then dx
        # and the parameter partials in parallel over column tiles, each tile
        # walking the rows in order (float64, deterministic) while its segment
        # of x and dy is in L1.  The partials read dy before dx is written, so
        # dx may alias dy.
        for blk in prange(nstats * nblocks):
            n = blk // nblocks
            _cf_dots_block(dy, x, weight, work, coef, spec, nblocks, n, blk - n * nblocks, n)
        for k in prange(nstats):
            _cf_group_coefs(weight, work, coef, spec, nblocks, k)
        acc = np.zeros(2 * width if want_params else 0)
        for tile in prange((width + COLUMN_TILE - 1) // COLUMN_TILE):
            lo = tile * COLUMN_TILE
            hi = min(width, lo + COLUMN_TILE)
            for n in range(nstats):
                off = n * width + lo
                span = hi - lo
                xs = x[off : off + span]
                dys = dy[off : off + span]
                row_mean, row_rstd = coef[4 * n], coef[4 * n + 1]
                if want_params:
                    _param_partials(dys, xs, row_mean, row_rstd, acc[lo:hi], acc[width + lo : width + hi])
                kx, k0 = coef[4 * n + 2], coef[4 * n + 3]
                _dx_row_span(dys, xs, weight[lo:hi], dx[off : off + span], row_rstd, kx, k0, row_mean)
            if want_params:
                for s in range(lo, hi):
                    if dbias.size > 0:
                        dbias[s] = acc[s]
                    if dweight.size > 0:
                        dweight[s] = acc[width + s]
        return
    if _cf_fused(spec, nstats):
        for k in prange(nstats):
            n0, samples, c0, d = _group(spec, k)
            for n in range(n0, n0 + samples):
                for c in range(c0, c0 + d):
                    for b in range(nblocks):
                        _cf_dots_block(dy, x, weight, work, coef, spec, nblocks, n * spec.channels + c, b, k)
            _cf_group_coefs(weight, work, coef, spec, nblocks, k)
            for n in range(n0, n0 + samples):
                for c in range(c0, c0 + d):
                    for b in range(nblocks):
                        _cf_dx_block_k(dy, x, weight, dx, coef, spec, n * spec.channels + c, b, k)
    else:
        for blk in prange(planes * nblocks):
            plane, b = _block_plane(blk, nblocks)
            k = _plane_stat_index(spec, plane)
            _cf_dots_block(dy, x, weight, work, coef, spec, nblocks, plane, b, k)
        for k in prange(nstats):
            _cf_group_coefs(weight, work, coef, spec, nblocks, k)
        for blk in prange(planes * nblocks):
            plane, b = _block_plane(blk, nblocks)
            k = _plane_stat_index(spec, plane)
            _cf_dx_block_k(dy, x, weight, dx, coef, spec, plane, b, k)
    if want_params and not spec.flags & PER_ELEMENT:
        for c in prange(spec.channels):
            sum_dy = 0.0
            sum_dy_xhat = 0.0
            for n in range(spec.batch):
                partial_dy_xc = 0.0
                blk0 = (n * spec.channels + c) * nblocks
                for b in range(nblocks):
                    sum_dy += work[2 * (blk0 + b)]
                    partial_dy_xc += work[2 * (blk0 + b) + 1]
                sum_dy_xhat += coef[4 * _stat_index(spec, n, c) + 1] * partial_dy_xc
            if dweight.size > 0:
                dweight[c] = sum_dy_xhat
            if dbias.size > 0:
                dbias[c] = sum_dy


# ---------------------------------------------------------------------------
# Channels-last: (N, S, C); block = up to max(BLOCK // C, CL_MIN_ROWS) rows of one sample
# ---------------------------------------------------------------------------


@glue
def _cl_fused(spec, sets):
    """Whether a channels-last training pass runs one fused task per statistics set.

    From ``FUSE_MIN_GROUPS`` sets on, or when the caller asks for it with
    ``FUSE_SETS`` (see :func:`fastnorm.core._training_params`).
    """
    return sets >= FUSE_MIN_GROUPS or spec.flags & FUSE_SETS


@glue
def _cl_rows_per_block(spec):
    """Rows of one channels-last block: ``BLOCK // C``, at least ``CL_MIN_ROWS``.

    A channel's sum runs over as many elements as in a channels-first block
    (``BLOCK``) for ``C <= 16``, over ``CL_MIN_ROWS`` for wider tensors.
    """
    return max(BLOCK // spec.channels, CL_MIN_ROWS)


@glue
def _cl_block(spec, nblocks, blk):
    """Return ``(offset, rows, sample)`` of channels-last block ``blk``."""
    rows_per_block = _cl_rows_per_block(spec)
    n = blk // nblocks
    row0 = (blk - n * nblocks) * rows_per_block
    rows = min(rows_per_block, spec.spatial - row0)
    return (n * spec.spatial + row0) * spec.channels, rows, n


@glue
def _four_rows(j, quarter, nc, consecutive):
    """Offsets, within a block of rows of ``nc`` elements, of the four rows of step ``j``.

    Rows ``4j .. 4j+3`` when ``consecutive``; otherwise row ``j`` of each of the
    block's four quarters of ``quarter`` rows.  Either way ``quarter`` steps
    cover the first ``4 * quarter`` rows; the rest are left over.
    """
    if consecutive:
        o0 = 4 * j * nc
        step = nc
    else:
        o0 = j * nc
        step = quarter * nc
    return o0, o0 + step, o0 + 2 * step, o0 + 3 * step


@helper
def _cl_block_moments(x, work, spec, nblocks, blk):
    """Per-channel moments of block ``blk``, as :func:`_moments` (vectorized over C).

    One pass with sums shifted by the block's first row; a channel that lost
    too many bits to cancellation is recomputed with two passes.  Stored as
    ``work[2C*blk : 2C*blk+C]`` (means) and the next ``C`` (sums of squared
    deviations; of squares without ``CENTERED``).
    """
    nc = spec.channels
    off, rows, _ = _cl_block(spec, nblocks, blk)
    mean = work[2 * nc * blk : 2 * nc * blk + nc]
    m2 = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
    mean[:] = 0.0
    m2[:] = 0.0
    centered = spec.flags & CENTERED != 0
    # The shift is read from the block's first row of x (in L1), not from a
    # float64 copy beside the accumulators: the forward kernel at (8, 4096, C)
    # float32 then took 0.79-0.92x the time at C=256 (BN, IN, GN(32); two
    # runs) and 0.87x at C=512, and the same at C <= 128 (same process,
    # interleaved; 2 threads); the values are bitwise the same.  A
    # single-threaded loop of this helper alone showed no difference, so the
    # cause is not pinned down.
    first = x[off : off + nc]
    # Four rows per step cut the accumulator traffic: four consecutive rows of
    # at most CL_CONSECUTIVE_ROW_BYTES, else one row from each quarter of the
    # block (see that constant).  The rows are read through one slice of the
    # block: as four slices they needed more runtime alias checks than LLVM
    # allows, and the loop stayed scalar.
    quarter = rows // 4
    consecutive = nc * x.itemsize <= CL_CONSECUTIVE_ROW_BYTES
    xb = x[off : off + rows * nc]
    for j in range(quarter):
        o0, o1, o2, o3 = _four_rows(j, quarter, nc, consecutive)
        for c in range(nc):
            shift_c = np.float64(first[c]) if centered else 0.0
            d0 = xb[o0 + c] - shift_c
            d1 = xb[o1 + c] - shift_c
            d2 = xb[o2 + c] - shift_c
            d3 = xb[o3 + c] - shift_c
            mean[c] += (d0 + d1) + (d2 + d3)
            m2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for row in range(4 * quarter, rows):
        xr = x[off + row * nc : off + (row + 1) * nc]
        for c in range(nc):
            dev = xr[c] - (np.float64(first[c]) if centered else 0.0)
            mean[c] += dev
            m2[c] += dev * dev
    if not centered:
        mean[:] = 0.0
        return
    for c in range(nc):
        sum_dev = mean[c]
        sum_sq = m2[c]
        m2[c] = sum_sq - sum_dev * sum_dev / rows
        mean[c] = first[c] + sum_dev / rows
        if sum_sq > CANCELLATION_LIMIT * m2[c]:
            mean[c], m2[c] = _moments_two_pass(x[off + c : off + rows * nc : nc], rows)


@helper
def _cl_merge_set(work, chan, spec, nblocks, set_index):
    """Merge the block moments of one statistics set per channel, vectorized over C.

    Order: sample, block.  Writes the per-channel mean and sum of squared
    deviations to ``chan[2C*set : 2C*set + 2C]`` and returns the per-channel
    element count.
    """
    nc = spec.channels
    rows_per_block = _cl_rows_per_block(spec)
    n0, samples = (0, spec.batch) if spec.flags & BATCH else (set_index, 1)
    mean = chan[2 * nc * set_index : 2 * nc * set_index + nc]
    m2 = chan[2 * nc * set_index + nc : 2 * nc * (set_index + 1)]
    count = 0.0
    for n in range(n0, n0 + samples):
        for b in range(nblocks):
            blk = n * nblocks + b
            rows = float(min(rows_per_block, spec.spatial - b * rows_per_block))
            block_mean = work[2 * nc * blk : 2 * nc * blk + nc]
            block_m2 = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
            if count == 0.0:
                mean[:] = block_mean
                m2[:] = block_m2
            else:
                # Chan et al. update (see _merge) with one division per block.
                frac = rows / (count + rows)
                weight = count * frac
                for c in range(nc):
                    delta = block_mean[c] - mean[c]
                    mean[c] += delta * frac
                    m2[c] += block_m2[c] + delta * delta * weight
            count += rows
    return count


@helper
def _cl_group_stats(chan, count, stats, spec, k):
    """Merge the channels of group ``k`` (equal counts, in order) into its stats."""
    _, _, c0, d = _group(spec, k)
    base = 2 * spec.channels * (k // spec.groups)
    total = 0.0
    mean = 0.0
    m2 = 0.0
    for c in range(c0, c0 + d):
        total, mean, m2 = _merge(total, mean, m2, count, chan[base + c], chan[base + spec.channels + c])
    stats[2 * k], stats[2 * k + 1] = _finish(total, mean, m2, spec.flags, spec.eps)


@helper
def _cl_set_coefs(weight, bias, stats, coef, spec, set_index):
    """Per-channel ``mean_hi, scale, shift - mean_lo * scale`` vectors of one set.

    ``coef`` has the input's dtype: ``y = (x - mean_hi) * scale + shift'`` is
    :func:`_normalize`'s arithmetic, per channel.
    """
    nc = spec.channels
    d = nc // spec.groups
    base = 3 * nc * set_index
    for c in range(nc):
        k = set_index * spec.groups + c // d
        mean_hi, mean_lo = _split(coef, stats[2 * k])
        rstd = stats[2 * k + 1]
        scale = rstd * weight[c] if weight.size > 0 else rstd
        coef[base + c] = mean_hi
        coef[base + nc + c] = scale
        coef[base + 2 * nc + c] = _fold(bias[c] if bias.size > 0 else 0.0, scale, mean_lo, coef)


@glue
def _cl_tile_rows(spec, x, sets):
    """Rows per step of the channels-last elementwise passes (normalize, dx).

    One row when ``C > CL_TILE_MAX_CHANNELS`` or there are several statistics
    sets; otherwise as many rows as fill ``CL_TILE_BYTES`` of ``x``: the
    per-channel coefficients are then repeated that many times
    (:func:`_cl_tile`), and one inner loop runs over the whole span.
    """
    if sets > 1 or spec.channels > CL_TILE_MAX_CHANNELS:
        return 1
    return max(1, CL_TILE_BYTES // x.itemsize // spec.channels)


@helper
def _cl_tile(coef, vectors, nc, tile_rows):
    """``coef`` (``vectors`` per-channel vectors of one set) with each vector repeated ``tile_rows`` times.

    A compiled call, not inlined: inside a parallel kernel Numba would turn
    each slice copy into a parallel loop of its own (measured 5.7x slower on
    a (1, 16, 4096) inference).
    """
    if tile_rows == 1:
        return coef
    span = tile_rows * nc
    tiled = np.empty(vectors * span, coef.dtype)
    for j in range(vectors):
        for r in range(tile_rows):
            tiled[j * span + r * nc : j * span + (r + 1) * nc] = coef[j * nc : (j + 1) * nc]
    return tiled


@glue
def _cl_steps(spec, nblocks, blk, tile_rows, vectors):
    """Return ``(offset, rows, base, span)`` of block ``blk`` for an elementwise pass.

    ``span = tile_rows * C`` elements per step; the pass's ``vectors``
    coefficient vectors of the block's set start at ``coef[base]``, each
    ``span`` long (:func:`_cl_tile`).
    """
    span = tile_rows * spec.channels
    off, rows, n = _cl_block(spec, nblocks, blk)
    return off, rows, (0 if spec.flags & BATCH else vectors * span * n), span


@helper
def _cl_normalize_block(x, y, coef, spec, nblocks, blk, tile_rows):
    """Normalize block ``blk``, ``tile_rows`` rows per step (``coef`` tiled by :func:`_cl_tile`)."""
    nc = spec.channels
    off, rows, base, span = _cl_steps(spec, nblocks, blk, tile_rows, 3)
    mean = coef[base : base + span]
    scale = coef[base + span : base + 2 * span]
    shift = coef[base + 2 * span : base + 3 * span]
    for r0 in range(0, rows, tile_rows):
        o = off + r0 * nc
        count = min(tile_rows, rows - r0) * nc
        xs = x[o : o + count]
        ys = y[o : o + count]
        for i in range(count):
            ys[i] = (xs[i] - mean[i]) * scale[i] + shift[i]


@kernel
def forward_train_cl(x, weight, bias, y, mean, rstd, params):
    """Training forward pass on a channels-last (N, S, C) buffer.

    Parameters and Notes as :func:`forward_train_cf`; here a block is up to
    ``max(BLOCK // C, CL_MIN_ROWS)`` rows of one sample, reduced per channel (vectorized over
    ``C``), and channel partials are merged per group in a fixed order.
    """
    spec = KernelSpec(*params)
    nblocks = (spec.spatial + _cl_rows_per_block(spec) - 1) // _cl_rows_per_block(spec)
    total_blocks = spec.batch * nblocks
    nstats = mean.size
    sets = nstats // spec.groups
    work = np.empty(2 * spec.channels * total_blocks)
    chan = np.empty(2 * spec.channels * sets)
    stats = np.empty(2 * nstats)
    coef = np.empty(3 * spec.channels * sets, x.dtype)
    if _cl_fused(spec, sets):
        for n in prange(sets):
            for b in range(nblocks):
                _cl_block_moments(x, work, spec, nblocks, n * nblocks + b)
            count = _cl_merge_set(work, chan, spec, nblocks, n)
            for g in range(spec.groups):
                _cl_group_stats(chan, count, stats, spec, n * spec.groups + g)
            _cl_set_coefs(weight, bias, stats, coef, spec, n)
            for b in range(nblocks):
                _cl_normalize_block(x, y, coef, spec, nblocks, n * nblocks + b, 1)
    else:
        for blk in prange(total_blocks):
            _cl_block_moments(x, work, spec, nblocks, blk)
        for s in prange(sets):
            count = _cl_merge_set(work, chan, spec, nblocks, s)
            for g in range(spec.groups):
                _cl_group_stats(chan, count, stats, spec, s * spec.groups + g)
        for s in range(sets):
            _cl_set_coefs(weight, bias, stats, coef, spec, s)
        tile_rows = _cl_tile_rows(spec, x, sets)
        tiled = _cl_tile(coef, 3, spec.channels, tile_rows)
        for blk in prange(total_blocks):
            _cl_normalize_block(x, y, tiled, spec, nblocks, blk, tile_rows)
    for k in range(nstats):
        mean[k] = stats[2 * k]
        rstd[k] = stats[2 * k + 1]


@kernel
def normalize_cl(x, weight, bias, y, mean, rstd, params):
    """Inference forward pass (given statistics) on a channels-last buffer.

    See :func:`normalize_cf`.
    """
    spec = KernelSpec(*params)
    nblocks = (spec.spatial + _cl_rows_per_block(spec) - 1) // _cl_rows_per_block(spec)
    nstats = mean.size
    sets = nstats // spec.groups
    stats = np.empty(2 * nstats)
    for k in range(nstats):
        stats[2 * k] = mean[k] if spec.flags & CENTERED else 0.0
        stats[2 * k + 1] = rstd[k]
    coef = np.empty(3 * spec.channels * sets, x.dtype)
    for s in range(sets):
        _cl_set_coefs(weight, bias, stats, coef, spec, s)
    tile_rows = _cl_tile_rows(spec, x, sets)
    tiled = _cl_tile(coef, 3, spec.channels, tile_rows)
    for blk in prange(spec.batch * nblocks):
        _cl_normalize_block(x, y, tiled, spec, nblocks, blk, tile_rows)


@helper
def _cl_set_means(mean, chan_mean, spec, set_index):
    """Fill the per-channel float64 mean vector (``chan_mean[C*set : +C]``) of one set."""
    nc = spec.channels
    d = nc // spec.groups
    base = nc * set_index
    for c in range(nc):
        chan_mean[base + c] = mean[set_index * spec.groups + c // d] if spec.flags & CENTERED else 0.0


@helper
def _cl_block_dots(dy, x, work, chan_mean, spec, nblocks, blk):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` of block ``blk``."""
    nc = spec.channels
    off, rows, n = _cl_block(spec, nblocks, blk)
    base = 0 if spec.flags & BATCH else nc * n
    mean = chan_mean[base : base + nc]
    sum_dy = work[2 * nc * blk : 2 * nc * blk + nc]
    sum_dy_xc = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
    sum_dy[:] = 0.0
    sum_dy_xc[:] = 0.0
    # Four rows per step, one from each quarter of the block (each array read
    # through one slice, see _cl_block_moments): the accumulators are loaded
    # and stored once per four rows (CL_CONSECUTIVE_ROW_BYTES).
    quarter = rows // 4
    xb = x[off : off + rows * nc]
    dyb = dy[off : off + rows * nc]
    for j in range(quarter):
        o0, o1, o2, o3 = _four_rows(j, quarter, nc, False)
        for c in range(nc):
            mean_c = mean[c]
            dy0 = dyb[o0 + c]
            dy1 = dyb[o1 + c]
            dy2 = dyb[o2 + c]
            dy3 = dyb[o3 + c]
            sum_dy[c] += (dy0 + dy1) + (dy2 + dy3)
            sum_dy_xc[c] += (dy0 * (xb[o0 + c] - mean_c) + dy1 * (xb[o1 + c] - mean_c)) + (
                dy2 * (xb[o2 + c] - mean_c) + dy3 * (xb[o3 + c] - mean_c)
            )
    for row in range(4 * quarter, rows):
        xr = x[off + row * nc : off + (row + 1) * nc]
        dyr = dy[off + row * nc : off + (row + 1) * nc]
        for c in range(nc):
            dy_c = dyr[c]  # loaded once: see _row_dots_and_partials
            sum_dy[c] += dy_c
            sum_dy_xc[c] += dy_c * (xr[c] - mean[c])


@helper
def _cl_sum_set(work, chan, spec, nblocks, set_index):
    """Per-channel sums of one set's block dot products, vectorized over C.

    Order: sample, block.  ``chan[2C*set : +C]`` gets ``sum(dy)`` and the next
    ``C`` get ``sum(dy * (x - mean))``.
    """
    nc = spec.channels
    n0, samples = (0, spec.batch) if spec.flags & BATCH else (set_index, 1)
    sum_dy = chan[2 * nc * set_index : 2 * nc * set_index + nc]
    sum_dy_xc = chan[2 * nc * set_index + nc : 2 * nc * (set_index + 1)]
    sum_dy[:] = 0.0
    sum_dy_xc[:] = 0.0
    for n in range(n0, n0 + samples):
        for b in range(nblocks):
            blk = n * nblocks + b
            block_dy = work[2 * nc * blk : 2 * nc * blk + nc]
            block_dy_xc = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
            for c in range(nc):
                sum_dy[c] += block_dy[c]
                sum_dy_xc[c] += block_dy_xc[c]


@helper
def _cl_group_coefs(weight, mean, rstd, chan, coef, spec, k):
    """Dx coefficients of group ``k`` into the per-channel vectors of its set.

    ``coef`` (the input's dtype) gets ``coef[4C*set + C*j + c]`` for j = 0
    (``mean_hi``), 1 (rstd*w), 2 (kx), 3 (``k0 - kx * mean_lo``): the
    arithmetic of :func:`_dx_span`; see :func:`_cf_group_coefs` for kx and k0.
    """
    _, samples, c0, d = _group(spec, k)
    nc = spec.channels
    set_index = k // spec.groups
    sum_g = 0.0
    sum_g_xc = 0.0
    for c in range(c0, c0 + d):
        w = weight[c] if weight.size > 0 else 1.0
        sum_g += w * chan[2 * nc * set_index + c]
        sum_g_xc += w * chan[2 * nc * set_index + nc + c]
    m = float(samples * d * spec.spatial)
    r = rstd[k]
    kx, k0 = _dx_coefs(sum_g, sum_g_xc, r, m, spec.flags)
    mean_hi, kx_x, k0_x = _dx_constants(coef, mean[k] if spec.flags & CENTERED else 0.0, kx, k0)
    base = 4 * nc * set_index
    for c in range(c0, c0 + d):
        coef[base + c] = mean_hi
        coef[base + nc + c] = r * weight[c] if weight.size > 0 else r
        coef[base + 2 * nc + c] = kx_x
        coef[base + 3 * nc + c] = k0_x


@helper
def _cl_dx_block(dy, x, dx, coef, spec, nblocks, blk, tile_rows):
    """``dx`` of block ``blk``, ``tile_rows`` rows per step (``coef`` tiled by :func:`_cl_tile`)."""
    nc = spec.channels
    off, rows, base, span = _cl_steps(spec, nblocks, blk, tile_rows, 4)
    mean = coef[base : base + span]
    a = coef[base + span : base + 2 * span]
    kx = coef[base + 2 * span : base + 3 * span]
    k0 = coef[base + 3 * span : base + 4 * span]
    for r0 in range(0, rows, tile_rows):
        o = off + r0 * nc
        count = min(tile_rows, rows - r0) * nc
        xs = x[o : o + count]
        dys = dy[o : o + count]
        dxs = dx[o : o + count]
        for i in range(count):
            dxs[i] = a[i] * dys[i] - kx[i] * (xs[i] - mean[i]) - k0[i]


@kernel
def backward_cl(dy, x, weight, mean, rstd, dx, dweight, dbias, params):
    """Backward pass on a channels-last (N, S, C) buffer.

    Parameters and Notes as :func:`backward_cf`.
    """
    spec = KernelSpec(*params)
    nc = spec.channels
    nblocks = (spec.spatial + _cl_rows_per_block(spec) - 1) // _cl_rows_per_block(spec)
    total_blocks = spec.batch * nblocks
    nstats = mean.size
    sets = nstats // spec.groups
    work = np.empty(2 * nc * total_blocks)
    chan = np.empty(2 * nc * sets)
    chan_mean = np.empty(nc * sets)
    coef = np.empty(4 * nc * sets, x.dtype)
    if _cl_fused(spec, sets):
        for n in prange(sets):
            _cl_set_means(mean, chan_mean, spec, n)
            for b in range(nblocks):
                _cl_block_dots(dy, x, work, chan_mean, spec, nblocks, n * nblocks + b)
            _cl_sum_set(work, chan, spec, nblocks, n)
            for g in range(spec.groups):
                _cl_group_coefs(weight, mean, rstd, chan, coef, spec, n * spec.groups + g)
            for b in range(nblocks):
                _cl_dx_block(dy, x, dx, coef, spec, nblocks, n * nblocks + b, 1)
    else:
        for s in range(sets):
            _cl_set_means(mean, chan_mean, spec, s)
        for blk in prange(total_blocks):
            _cl_block_dots(dy, x, work, chan_mean, spec, nblocks, blk)
        for s in prange(sets):
            _cl_sum_set(work, chan, spec, nblocks, s)
        for k in prange(nstats):
            _cl_group_coefs(weight, mean, rstd, chan, coef, spec, k)
        tile_rows = _cl_tile_rows(spec, x, sets)
        tiled = _cl_tile(coef, 4, nc, tile_rows)
        for blk in prange(total_blocks):
            _cl_dx_block(dy, x, dx, tiled, spec, nblocks, blk, tile_rows)
    if dweight.size > 0 or dbias.size > 0:
        # dweight[c] = sum over sets of rstd * sum(dy * (x - mean)), dbias[c] = sum(dy).
        d = nc // spec.groups
        for c in prange(nc):
            sum_dy = 0.0
            sum_dy_xhat = 0.0
            for set_index in range(sets):
                sum_dy += chan[2 * nc * set_index + c]
                sum_dy_xhat += rstd[set_index * spec.groups + c // d] * chan[2 * nc * set_index + nc + c]
            if dweight.size > 0:
                dweight[c] = sum_dy_xhat
            if dbias.size > 0:
                dbias[c] = sum_dy


# ---------------------------------------------------------------------------
# Serial builds for small tensors and kernel selection
# ---------------------------------------------------------------------------

#: Tensors of at most this many elements run on one thread: below it a
#: parallel launch costs more than the work.  The choice depends only on the
#: shape, so results stay bitwise reproducible.
SERIAL_MAX_ELEMENTS = 16384


def _serial_build(parallel_kernel):
    """Compile the same source as ``parallel_kernel`` without threads.

    The clone gets its own ``__qualname__`` so that Numba's on-disk cache keeps
    the two builds apart.
    """
    # With NUMBA_DISABLE_JIT=1 the decorators return the plain function.
    func = getattr(parallel_kernel, "py_func", parallel_kernel)
    clone = types.FunctionType(
        func.__code__, func.__globals__, func.__name__ + "_serial", func.__defaults__, func.__closure__
    )
    clone.__qualname__ = func.__qualname__ + "_serial"
    clone.__doc__ = f"Single-threaded build of :func:`{func.__name__}` (same source)."
    return helper(clone)


forward_train_cf_serial = _serial_build(forward_train_cf)
forward_train_cl_serial = _serial_build(forward_train_cl)
normalize_cf_serial = _serial_build(normalize_cf)
normalize_cl_serial = _serial_build(normalize_cl)
backward_cf_serial = _serial_build(backward_cf)
backward_cl_serial = _serial_build(backward_cl)

_KERNELS = {
    ("forward_train", False): (forward_train_cf, forward_train_cf_serial),
    ("forward_train", True): (forward_train_cl, forward_train_cl_serial),
    ("normalize", False): (normalize_cf, normalize_cf_serial),
    ("normalize", True): (normalize_cl, normalize_cl_serial),
    ("backward", False): (backward_cf, backward_cf_serial),
    ("backward", True): (backward_cl, backward_cl_serial),
}


def select(pass_name, spec):
    """Return the kernel for ``pass_name`` ("forward_train", "normalize", "backward").

    Picks the layout from ``spec.flags`` and the serial build for tensors of at
    most ``SERIAL_MAX_ELEMENTS`` elements.
    """
    parallel, serial = _KERNELS[pass_name, bool(spec.flags & CHANNELS_LAST)]
    return serial if runs_serial(spec) else parallel


def runs_serial(spec):
    """Whether :func:`select` picks the serial build (at most ``SERIAL_MAX_ELEMENTS`` elements)."""
    return spec.batch * spec.channels * spec.spatial <= SERIAL_MAX_ELEMENTS
