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
elements (one plane slice in cf, ``BLOCK // C`` rows in cf), each block with a
two-pass centered formula while it is in L1, and blocks are merged with Chan et
al.'s pairwise update in a fixed order.  Block boundaries and merge order
depend only on the shape, never on the number of threads, so results are
bitwise reproducible for any ``numba.set_num_threads``.  The strategy (fused
per group vs. split into block / group / block phases) is also chosen from
the shape alone.

The kernels validate nothing: the public layer (:mod:`fastnorm.core`) checks
shapes, dtypes and contiguity before calling them.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import prange

from ._config import helper, kernel

#: Statistics are shared by all samples of the batch (BatchNorm).
BATCH = 1
#: Subtract the mean (all norms but RMSNorm).
CENTERED = 2
#: weight/bias are indexed by the position in the group (LayerNorm, RMSNorm).
PER_ELEMENT = 4
#: The buffer is (N, S, C) instead of (N, C, S).
CHANNELS_LAST = 8

#: Elements per reduction block. Fixed, so results never depend on threads.
BLOCK = 4096
#: Run one fused task per group (read it once into cache, normalize it while
#: hot) when there are at least this many groups; otherwise split every pass
#: into parallel blocks so that a few huge groups still use every core.
FUSE_MIN_GROUPS = 32
#: Columns per task of the per-element (LayerNorm) parameter-gradient reduction.
COLUMN_TILE = 256
#: Rows per task when LayerNorm's backward accumulates dweight/dbias partials
#: while computing dx (used from 4 * ROW_CHUNK rows on).
ROW_CHUNK = 32

KernelSpec = namedtuple(
    "KernelSpec", ["batch", "channels", "spatial", "groups", "flags", "eps"]
)
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
    """Number of (mean, rstd) pairs a kernel call produces or consumes."""
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


@helper
def _finish(count, mean, m2, flags, eps):
    """Return the ``(mean, rstd)`` used to normalize a group.

    The variance is the biased (population) one, ``m2 / count``; without
    ``CENTERED`` (RMSNorm) the mean used is 0 and ``rstd = 1/sqrt(E[x^2]+eps)``
    with ``E[x^2] = var + mean^2`` (a sum of non-negative terms, no
    cancellation).
    """
    var = m2 / count
    if flags & CENTERED:
        return mean, 1.0 / np.sqrt(var + eps)
    return 0.0, 1.0 / np.sqrt(var + mean * mean + eps)


@helper
def _stat_index(spec, n, c):
    """Index of the statistics that apply to sample ``n``, channel ``c``."""
    group = c // (spec.channels // spec.groups)
    if spec.flags & BATCH:
        return group
    return n * spec.groups + group


@helper
def _group_members(spec, nblocks, k):
    """Return ``(first sample, samples, channels per group, blocks)`` of group ``k``.

    A group has ``samples * D * nblocks`` member blocks, enumerated in the fixed
    order sample, channel, block by :func:`_cf_member`.
    """
    d = spec.channels // spec.groups
    if spec.flags & BATCH:
        return 0, spec.batch, d, nblocks
    return k // spec.groups, 1, d, nblocks


# ---------------------------------------------------------------------------
# Channels-first: (N, C, S); block = up to BLOCK contiguous elements of a plane
# ---------------------------------------------------------------------------


@helper
def _cf_block(spec, nblocks, blk):
    """Return ``(offset, count, channel, sample, s0)`` of channels-first block ``blk``."""
    plane = blk // nblocks
    s0 = (blk - plane * nblocks) * BLOCK
    count = min(BLOCK, spec.spatial - s0)
    return plane * spec.spatial + s0, count, plane % spec.channels, plane // spec.channels, s0


@helper
def _cf_member(spec, nblocks, k, j):
    """Block id of the ``j``-th member block of group ``k`` (channels-first)."""
    n0, _, d, _ = _group_members(spec, nblocks, k)
    b = j % nblocks
    t = j // nblocks
    c = (k % spec.groups) * d + t % d
    n = n0 + t // d
    return (n * spec.channels + c) * nblocks + b


@helper
def _cf_block_moments(x, work, spec, nblocks, blk):
    """Store the mean and centered sum of squares of block ``blk`` in ``work``."""
    off, count, _, _, _ = _cf_block(spec, nblocks, blk)
    xs = x[off : off + count]
    total = 0.0
    for i in range(count):
        total += xs[i]
    mean = total / count
    m2 = 0.0
    for i in range(count):
        dev = xs[i] - mean
        m2 += dev * dev
    work[2 * blk] = mean
    work[2 * blk + 1] = m2


@helper
def _cf_group_stats(work, stats, spec, nblocks, k):
    """Merge the member blocks of group ``k`` into ``stats[2k:2k+2] = mean, rstd``."""
    _, samples, d, _ = _group_members(spec, nblocks, k)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for j in range(samples * d * nblocks):
        blk = _cf_member(spec, nblocks, k, j)
        s0 = (blk % nblocks) * BLOCK
        count, mean, m2 = _merge(
            count, mean, m2, float(min(BLOCK, spec.spatial - s0)), work[2 * blk], work[2 * blk + 1]
        )
    mean_used, rstd = _finish(count, mean, m2, spec.flags, spec.eps)
    stats[2 * k] = mean_used
    stats[2 * k + 1] = rstd


@helper
def _cf_normalize_block(x, y, weight, bias, stats, spec, nblocks, blk):
    """``y = (x - mean) * (rstd * weight) + bias`` on block ``blk``."""
    off, count, c, n, s0 = _cf_block(spec, nblocks, blk)
    k = _stat_index(spec, n, c)
    mean = stats[2 * k]
    rstd = stats[2 * k + 1]
    xs = x[off : off + count]
    ys = y[off : off + count]
    if spec.flags & PER_ELEMENT:
        ws = weight[s0 : s0 + count]
        bs = bias[s0 : s0 + count]
        if weight.size > 0 and bias.size > 0:
            for i in range(count):
                ys[i] = (xs[i] - mean) * (rstd * ws[i]) + bs[i]
        elif weight.size > 0:
            for i in range(count):
                ys[i] = (xs[i] - mean) * (rstd * ws[i])
        elif bias.size > 0:
            for i in range(count):
                ys[i] = (xs[i] - mean) * rstd + bs[i]
        else:
            for i in range(count):
                ys[i] = (xs[i] - mean) * rstd
    else:
        scale = rstd * weight[c] if weight.size > 0 else rstd
        shift = bias[c] if bias.size > 0 else 0.0
        for i in range(count):
            ys[i] = (xs[i] - mean) * scale + shift


@kernel
def forward_train_cf(x, weight, bias, y, mean, rstd, spec):
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
    spec : KernelSpec
        Geometry and flags.

    Notes
    -----
    Ioffe & Szegedy (2015), Algorithm 1 (BN); Ba et al. (2016), eq. 4 (LN);
    Ulyanov et al. (2016), eq. 2 (IN); Wu & He (2018), eq. 1-3 (GN); Zhang &
    Sennrich (2019), eq. 4 (RMSNorm).  Normalization uses the centered form
    ``(x - mean) * (rstd * weight) + bias`` so that constant groups map
    exactly to ``bias``.
    """
    nblocks = (spec.spatial + BLOCK - 1) // BLOCK
    total_blocks = spec.batch * spec.channels * nblocks
    nstats = mean.size
    work = np.empty(2 * total_blocks)
    stats = np.empty(2 * nstats)
    if nstats >= FUSE_MIN_GROUPS:
        for k in prange(nstats):
            _, samples, d, _ = _group_members(spec, nblocks, k)
            members = samples * d * nblocks
            for j in range(members):
                _cf_block_moments(x, work, spec, nblocks, _cf_member(spec, nblocks, k, j))
            _cf_group_stats(work, stats, spec, nblocks, k)
            for j in range(members):
                blk = _cf_member(spec, nblocks, k, j)
                _cf_normalize_block(x, y, weight, bias, stats, spec, nblocks, blk)
    else:
        for blk in prange(total_blocks):
            _cf_block_moments(x, work, spec, nblocks, blk)
        for k in prange(nstats):
            _cf_group_stats(work, stats, spec, nblocks, k)
        for blk in prange(total_blocks):
            _cf_normalize_block(x, y, weight, bias, stats, spec, nblocks, blk)
    for k in range(nstats):
        mean[k] = stats[2 * k]
        rstd[k] = stats[2 * k + 1]


@kernel
def normalize_cf(x, weight, bias, y, mean, rstd, spec):
    """Inference forward pass (given statistics) on a channels-first buffer.

    Parameters are those of :func:`forward_train_cf`, except that ``mean`` and
    ``rstd`` are inputs.

    Notes
    -----
    Ioffe & Szegedy (2015), Algorithm 2, step 11: one multiply-add per element
    with ``scale = weight * rstd``, written in the centered form
    ``(x - mean) * scale + bias``.
    """
    nblocks = (spec.spatial + BLOCK - 1) // BLOCK
    total_blocks = spec.batch * spec.channels * nblocks
    nstats = mean.size
    stats = np.empty(2 * nstats)
    for k in range(nstats):
        stats[2 * k] = mean[k] if spec.flags & CENTERED else 0.0
        stats[2 * k + 1] = rstd[k]
    for blk in prange(total_blocks):
        _cf_normalize_block(x, y, weight, bias, stats, spec, nblocks, blk)


@helper
def _cf_block_dots(dy, x, weight, work, coef, spec, nblocks, blk):
    """Store ``sum(g)`` and ``sum(g * (x - mean))`` of block ``blk`` in ``work``.

    ``g = dy * weight[s]`` with ``PER_ELEMENT`` and a weight, else ``g = dy``
    (per-channel weights are applied per block later).
    """
    off, count, c, n, s0 = _cf_block(spec, nblocks, blk)
    mean = coef[4 * _stat_index(spec, n, c)]
    xs = x[off : off + count]
    dys = dy[off : off + count]
    sum_dy = 0.0
    sum_dy_xc = 0.0
    if spec.flags & PER_ELEMENT and weight.size > 0:
        ws = weight[s0 : s0 + count]
        for i in range(count):
            g = dys[i] * ws[i]
            sum_dy += g
            sum_dy_xc += g * (xs[i] - mean)
    else:
        for i in range(count):
            sum_dy += dys[i]
            sum_dy_xc += dys[i] * (xs[i] - mean)
    work[2 * blk] = sum_dy
    work[2 * blk + 1] = sum_dy_xc


@helper
def _cf_group_coefs(weight, work, coef, spec, nblocks, k):
    """Turn the member dots of group ``k`` into its dx coefficients.

    ``dx = rstd*w*dy - kx * (x - mean) - k0`` with ``kx = rstd^3 * sum(g*(x-mean)) / m``
    and ``k0 = rstd * sum(g) / m`` (0 without ``CENTERED``).
    """
    _, samples, d, _ = _group_members(spec, nblocks, k)
    per_channel_weight = not (spec.flags & PER_ELEMENT) and weight.size > 0
    sum_g = 0.0
    sum_g_xc = 0.0
    for j in range(samples * d * nblocks):
        blk = _cf_member(spec, nblocks, k, j)
        w = weight[(blk // nblocks) % spec.channels] if per_channel_weight else 1.0
        sum_g += w * work[2 * blk]
        sum_g_xc += w * work[2 * blk + 1]
    m = float(samples * d * spec.spatial)
    rstd = coef[4 * k + 1]
    coef[4 * k + 2] = rstd * rstd * rstd * sum_g_xc / m
    coef[4 * k + 3] = rstd * sum_g / m if spec.flags & CENTERED else 0.0


@helper
def _cf_dx_block(dy, x, weight, dx, coef, spec, nblocks, blk):
    """Write ``dx`` of block ``blk`` from its group's coefficients."""
    off, count, c, n, s0 = _cf_block(spec, nblocks, blk)
    k = _stat_index(spec, n, c)
    mean = coef[4 * k]
    rstd = coef[4 * k + 1]
    kx = coef[4 * k + 2]
    k0 = coef[4 * k + 3]
    xs = x[off : off + count]
    dys = dy[off : off + count]
    dxs = dx[off : off + count]
    if spec.flags & PER_ELEMENT and weight.size > 0:
        ws = weight[s0 : s0 + count]
        for i in range(count):
            dxs[i] = (rstd * ws[i]) * dys[i] - kx * (xs[i] - mean) - k0
    else:
        a = rstd * weight[c] if weight.size > 0 and not spec.flags & PER_ELEMENT else rstd
        for i in range(count):
            dxs[i] = a * dys[i] - kx * (xs[i] - mean) - k0


@helper
def _row_dx_and_partials(dy, x, weight, dx, coef, n, width, part_dy, part_dy_xhat):
    """dx of row ``n`` (per-element affine) and its dy, dy*xhat added to the partials."""
    mean = coef[4 * n]
    rstd = coef[4 * n + 1]
    kx = coef[4 * n + 2]
    k0 = coef[4 * n + 3]
    xs = x[n * width : (n + 1) * width]
    dys = dy[n * width : (n + 1) * width]
    dxs = dx[n * width : (n + 1) * width]
    if weight.size > 0:
        for s in range(width):
            g = dys[s]
            xc = xs[s] - mean
            part_dy[s] += g
            part_dy_xhat[s] += g * xc * rstd
            dxs[s] = (rstd * weight[s]) * g - kx * xc - k0
    else:
        for s in range(width):
            g = dys[s]
            xc = xs[s] - mean
            part_dy[s] += g
            part_dy_xhat[s] += g * xc * rstd
            dxs[s] = rstd * g - kx * xc - k0


@kernel
def backward_cf(dy, x, weight, mean, rstd, dx, dweight, dbias, spec):
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
        Output gradient of ``x``; may be ``dy`` itself (in-place).
    dweight, dbias : ndarray
        Outputs (length of weight), or empty to skip them.
    spec : KernelSpec
        Geometry and flags.

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
    nblocks = (spec.spatial + BLOCK - 1) // BLOCK
    total_blocks = spec.batch * spec.channels * nblocks
    nstats = mean.size
    work = np.empty(2 * total_blocks)
    coef = np.empty(4 * nstats)
    for k in range(nstats):
        coef[4 * k] = mean[k] if spec.flags & CENTERED else 0.0
        coef[4 * k + 1] = rstd[k]
    want_params = dweight.size > 0 or dbias.size > 0
    width = spec.spatial
    if want_params and spec.flags & PER_ELEMENT and nstats >= 4 * ROW_CHUNK:
        # Many rows: each task takes ROW_CHUNK rows, computes their dx and adds
        # their dy and dy*xhat into its own float64 partial vectors (fixed
        # chunks, merged in order below: deterministic).
        nchunks = (nstats + ROW_CHUNK - 1) // ROW_CHUNK
        partial = np.empty(2 * width * nchunks)
        for t in prange(nchunks):
            part_dy = partial[2 * width * t : 2 * width * t + width]
            part_dy_xhat = partial[2 * width * t + width : 2 * width * (t + 1)]
            part_dy[:] = 0.0
            part_dy_xhat[:] = 0.0
            for n in range(t * ROW_CHUNK, min(nstats, (t + 1) * ROW_CHUNK)):
                for b in range(nblocks):
                    _cf_block_dots(dy, x, weight, work, coef, spec, nblocks, n * nblocks + b)
                _cf_group_coefs(weight, work, coef, spec, nblocks, n)
                _row_dx_and_partials(dy, x, weight, dx, coef, n, width, part_dy, part_dy_xhat)
        for tile in prange((width + COLUMN_TILE - 1) // COLUMN_TILE):
            lo = tile * COLUMN_TILE
            hi = min(width, lo + COLUMN_TILE)
            for s in range(lo, hi):
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
    if want_params and spec.flags & PER_ELEMENT:
        # Few rows: dweight[s] = sum_n dy*xhat, dbias[s] = sum_n dy, each column
        # tile summing its rows in order in float64, before dx so that dx may
        # alias dy.
        acc = np.zeros(2 * width)
        for t in prange((width + COLUMN_TILE - 1) // COLUMN_TILE):
            lo = t * COLUMN_TILE
            hi = min(width, lo + COLUMN_TILE)
            for n in range(spec.batch):
                row_mean = coef[4 * n]
                row_rstd = coef[4 * n + 1]
                dys = dy[n * width + lo : n * width + hi]
                xs = x[n * width + lo : n * width + hi]
                acc_dy = acc[lo:hi]
                acc_dy_xhat = acc[width + lo : width + hi]
                for s in range(hi - lo):
                    acc_dy[s] += dys[s]
                    acc_dy_xhat[s] += dys[s] * (xs[s] - row_mean) * row_rstd
            for s in range(lo, hi):
                if dbias.size > 0:
                    dbias[s] = acc[s]
                if dweight.size > 0:
                    dweight[s] = acc[width + s]
    if nstats >= FUSE_MIN_GROUPS:
        for k in prange(nstats):
            _, samples, d, _ = _group_members(spec, nblocks, k)
            members = samples * d * nblocks
            for j in range(members):
                blk = _cf_member(spec, nblocks, k, j)
                _cf_block_dots(dy, x, weight, work, coef, spec, nblocks, blk)
            _cf_group_coefs(weight, work, coef, spec, nblocks, k)
            for j in range(members):
                blk = _cf_member(spec, nblocks, k, j)
                _cf_dx_block(dy, x, weight, dx, coef, spec, nblocks, blk)
    else:
        for blk in prange(total_blocks):
            _cf_block_dots(dy, x, weight, work, coef, spec, nblocks, blk)
        for k in prange(nstats):
            _cf_group_coefs(weight, work, coef, spec, nblocks, k)
        for blk in prange(total_blocks):
            _cf_dx_block(dy, x, weight, dx, coef, spec, nblocks, blk)
    if want_params and not spec.flags & PER_ELEMENT:
        for c in prange(spec.channels):
            sum_dy = 0.0
            sum_dy_xhat = 0.0
            for n in range(spec.batch):
                partial = 0.0
                for b in range(nblocks):
                    blk = (n * spec.channels + c) * nblocks + b
                    sum_dy += work[2 * blk]
                    partial += work[2 * blk + 1]
                sum_dy_xhat += coef[4 * _stat_index(spec, n, c) + 1] * partial
            if dweight.size > 0:
                dweight[c] = sum_dy_xhat
            if dbias.size > 0:
                dbias[c] = sum_dy


# ---------------------------------------------------------------------------
# Channels-last: (N, S, C); block = up to BLOCK // C rows of one sample
# ---------------------------------------------------------------------------


@helper
def _cl_rows_per_block(spec):
    return max(1, BLOCK // spec.channels)


@helper
def _cl_block(spec, nblocks, blk):
    """Return ``(offset, rows, sample)`` of channels-last block ``blk``."""
    rows_per_block = _cl_rows_per_block(spec)
    n = blk // nblocks
    row0 = (blk - n * nblocks) * rows_per_block
    rows = min(rows_per_block, spec.spatial - row0)
    return (n * spec.spatial + row0) * spec.channels, rows, n


@helper
def _cl_block_moments(x, work, spec, nblocks, blk):
    """Per-channel mean and centered sum of squares of block ``blk``.

    Stored as ``work[blk*2C : blk*2C+C]`` (means) and the next ``C`` (m2).
    """
    nc = spec.channels
    off, rows, _ = _cl_block(spec, nblocks, blk)
    acc = work[2 * nc * blk : 2 * nc * blk + nc]
    sq = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
    acc[:] = 0.0
    sq[:] = 0.0
    for r in range(rows):
        xr = x[off + r * nc : off + (r + 1) * nc]
        for c in range(nc):
            acc[c] += xr[c]
    for c in range(nc):
        acc[c] = acc[c] / rows
    for r in range(rows):
        xr = x[off + r * nc : off + (r + 1) * nc]
        for c in range(nc):
            dev = xr[c] - acc[c]
            sq[c] += dev * dev


@helper
def _cl_group_stats(work, stats, spec, nblocks, k):
    """Merge group ``k``'s channel partials (order: sample, block, channel)."""
    n0, samples, d, _ = _group_members(spec, nblocks, k)
    nc = spec.channels
    c0 = (k % spec.groups) * d
    rows_per_block = _cl_rows_per_block(spec)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for n in range(n0, n0 + samples):
        for b in range(nblocks):
            blk = n * nblocks + b
            rows = float(min(rows_per_block, spec.spatial - b * rows_per_block))
            for c in range(c0, c0 + d):
                count, mean, m2 = _merge(
                    count, mean, m2, rows, work[2 * nc * blk + c], work[2 * nc * blk + nc + c]
                )
    mean_used, rstd = _finish(count, mean, m2, spec.flags, spec.eps)
    stats[2 * k] = mean_used
    stats[2 * k + 1] = rstd


@helper
def _cl_set_coefs(weight, bias, stats, coef, spec, set_index):
    """Per-channel ``mean, scale, shift`` vectors of one statistics set."""
    nc = spec.channels
    d = nc // spec.groups
    base = 3 * nc * set_index
    for c in range(nc):
        k = set_index * spec.groups + c // d
        coef[base + c] = stats[2 * k]
        rstd = stats[2 * k + 1]
        coef[base + nc + c] = rstd * weight[c] if weight.size > 0 else rstd
        coef[base + 2 * nc + c] = bias[c] if bias.size > 0 else 0.0


@helper
def _cl_normalize_block(x, y, coef, spec, nblocks, blk):
    nc = spec.channels
    off, rows, n = _cl_block(spec, nblocks, blk)
    base = 0 if spec.flags & BATCH else 3 * nc * n
    mean = coef[base : base + nc]
    scale = coef[base + nc : base + 2 * nc]
    shift = coef[base + 2 * nc : base + 3 * nc]
    for r in range(rows):
        xr = x[off + r * nc : off + (r + 1) * nc]
        yr = y[off + r * nc : off + (r + 1) * nc]
        for c in range(nc):
            yr[c] = (xr[c] - mean[c]) * scale[c] + shift[c]


@kernel
def forward_train_cl(x, weight, bias, y, mean, rstd, spec):
    """Training forward pass on a channels-last (N, S, C) buffer.

    Parameters and Notes as :func:`forward_train_cf`; here a block is up to
    ``BLOCK // C`` rows of one sample, reduced per channel (vectorized over
    ``C``), and channel partials are merged per group in a fixed order.
    """
    nblocks = (spec.spatial + _cl_rows_per_block(spec) - 1) // _cl_rows_per_block(spec)
    total_blocks = spec.batch * nblocks
    nstats = mean.size
    sets = nstats // spec.groups
    work = np.empty(2 * spec.channels * total_blocks)
    stats = np.empty(2 * nstats)
    coef = np.empty(3 * spec.channels * sets)
    if sets >= FUSE_MIN_GROUPS:
        for n in prange(sets):
            for b in range(nblocks):
                _cl_block_moments(x, work, spec, nblocks, n * nblocks + b)
            for g in range(spec.groups):
                _cl_group_stats(work, stats, spec, nblocks, n * spec.groups + g)
            _cl_set_coefs(weight, bias, stats, coef, spec, n)
            for b in range(nblocks):
                _cl_normalize_block(x, y, coef, spec, nblocks, n * nblocks + b)
    else:
        for blk in prange(total_blocks):
            _cl_block_moments(x, work, spec, nblocks, blk)
        for k in prange(nstats):
            _cl_group_stats(work, stats, spec, nblocks, k)
        for s in range(sets):
            _cl_set_coefs(weight, bias, stats, coef, spec, s)
        for blk in prange(total_blocks):
            _cl_normalize_block(x, y, coef, spec, nblocks, blk)
    for k in range(nstats):
        mean[k] = stats[2 * k]
        rstd[k] = stats[2 * k + 1]


@kernel
def normalize_cl(x, weight, bias, y, mean, rstd, spec):
    """Inference forward pass (given statistics) on a channels-last buffer.

    See :func:`normalize_cf`.
    """
    nblocks = (spec.spatial + _cl_rows_per_block(spec) - 1) // _cl_rows_per_block(spec)
    nstats = mean.size
    sets = nstats // spec.groups
    stats = np.empty(2 * nstats)
    for k in range(nstats):
        stats[2 * k] = mean[k] if spec.flags & CENTERED else 0.0
        stats[2 * k + 1] = rstd[k]
    coef = np.empty(3 * spec.channels * sets)
    for s in range(sets):
        _cl_set_coefs(weight, bias, stats, coef, spec, s)
    for blk in prange(spec.batch * nblocks):
        _cl_normalize_block(x, y, coef, spec, nblocks, blk)


@helper
def _cl_set_means(mean, coef, spec, set_index):
    """Fill the per-channel mean vector (``coef[4C*set : +C]``) of one set."""
    nc = spec.channels
    d = nc // spec.groups
    base = 4 * nc * set_index
    for c in range(nc):
        coef[base + c] = mean[set_index * spec.groups + c // d] if spec.flags & CENTERED else 0.0


@helper
def _cl_block_dots(dy, x, work, coef, spec, nblocks, blk):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` of block ``blk``."""
    nc = spec.channels
    off, rows, n = _cl_block(spec, nblocks, blk)
    base = 0 if spec.flags & BATCH else 4 * nc * n
    mean = coef[base : base + nc]
    sum_dy = work[2 * nc * blk : 2 * nc * blk + nc]
    sum_dy_xc = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
    sum_dy[:] = 0.0
    sum_dy_xc[:] = 0.0
    for r in range(rows):
        xr = x[off + r * nc : off + (r + 1) * nc]
        dyr = dy[off + r * nc : off + (r + 1) * nc]
        for c in range(nc):
            sum_dy[c] += dyr[c]
            sum_dy_xc[c] += dyr[c] * (xr[c] - mean[c])


@helper
def _cl_group_coefs(weight, rstd, work, coef, spec, nblocks, k):
    """dx coefficients of group ``k`` into the per-channel vectors of its set.

    ``coef[4C*set + C*j + c]`` for j = 0 (mean), 1 (rstd*w), 2 (kx), 3 (k0);
    see :func:`_cf_group_coefs`.
    """
    n0, samples, d, _ = _group_members(spec, nblocks, k)
    nc = spec.channels
    c0 = (k % spec.groups) * d
    sum_g = 0.0
    sum_g_xc = 0.0
    for n in range(n0, n0 + samples):
        for b in range(nblocks):
            blk = n * nblocks + b
            for c in range(c0, c0 + d):
                w = weight[c] if weight.size > 0 else 1.0
                sum_g += w * work[2 * nc * blk + c]
                sum_g_xc += w * work[2 * nc * blk + nc + c]
    m = float(samples * d * spec.spatial)
    r = rstd[k]
    kx = r * r * r * sum_g_xc / m
    k0 = r * sum_g / m if spec.flags & CENTERED else 0.0
    base = 4 * nc * (k // spec.groups)
    for c in range(c0, c0 + d):
        coef[base + nc + c] = r * weight[c] if weight.size > 0 else r
        coef[base + 2 * nc + c] = kx
        coef[base + 3 * nc + c] = k0


@helper
def _cl_dx_block(dy, x, dx, coef, spec, nblocks, blk):
    nc = spec.channels
    off, rows, n = _cl_block(spec, nblocks, blk)
    base = 0 if spec.flags & BATCH else 4 * nc * n
    mean = coef[base : base + nc]
    a = coef[base + nc : base + 2 * nc]
    kx = coef[base + 2 * nc : base + 3 * nc]
    k0 = coef[base + 3 * nc : base + 4 * nc]
    for r in range(rows):
        xr = x[off + r * nc : off + (r + 1) * nc]
        dyr = dy[off + r * nc : off + (r + 1) * nc]
        dxr = dx[off + r * nc : off + (r + 1) * nc]
        for c in range(nc):
            dxr[c] = a[c] * dyr[c] - kx[c] * (xr[c] - mean[c]) - k0[c]


@kernel
def backward_cl(dy, x, weight, mean, rstd, dx, dweight, dbias, spec):
    """Backward pass on a channels-last (N, S, C) buffer.

    Parameters and Notes as :func:`backward_cf`.
    """
    nc = spec.channels
    nblocks = (spec.spatial + _cl_rows_per_block(spec) - 1) // _cl_rows_per_block(spec)
    total_blocks = spec.batch * nblocks
    nstats = mean.size
    sets = nstats // spec.groups
    work = np.empty(2 * nc * total_blocks)
    coef = np.empty(4 * nc * sets)
    if sets >= FUSE_MIN_GROUPS:
        for n in prange(sets):
            _cl_set_means(mean, coef, spec, n)
            for b in range(nblocks):
                _cl_block_dots(dy, x, work, coef, spec, nblocks, n * nblocks + b)
            for g in range(spec.groups):
                _cl_group_coefs(weight, rstd, work, coef, spec, nblocks, n * spec.groups + g)
            for b in range(nblocks):
                _cl_dx_block(dy, x, dx, coef, spec, nblocks, n * nblocks + b)
    else:
        for s in range(sets):
            _cl_set_means(mean, coef, spec, s)
        for blk in prange(total_blocks):
            _cl_block_dots(dy, x, work, coef, spec, nblocks, blk)
        for k in prange(nstats):
            _cl_group_coefs(weight, rstd, work, coef, spec, nblocks, k)
        for blk in prange(total_blocks):
            _cl_dx_block(dy, x, dx, coef, spec, nblocks, blk)
    if dweight.size > 0 or dbias.size > 0:
        for c in prange(nc):
            sum_dy = 0.0
            sum_dy_xhat = 0.0
            for n in range(spec.batch):
                partial = 0.0
                for b in range(nblocks):
                    blk = n * nblocks + b
                    sum_dy += work[2 * nc * blk + c]
                    partial += work[2 * nc * blk + nc + c]
                sum_dy_xhat += rstd[_stat_index(spec, n, c)] * partial
            if dweight.size > 0:
                dweight[c] = sum_dy_xhat
            if dbias.size > 0:
                dbias[c] = sum_dy
