"""Channels-first planes: BatchNorm, InstanceNorm and GroupNorm on an (N, C, S) buffer.

A group is ``D = C / G`` consecutive planes of ``S`` elements for each sample
(across all samples for BatchNorm); a reduction block is up to ``BLOCK``
contiguous elements of one plane.  The strategies (:mod:`.schedule`):

* ``ONE_BLOCK`` -- one task per group of at most ``BLOCK`` elements: its
  moments in one pass, then its planes normalized while in cache;
* ``FUSED`` -- one task per group: block moments, merge, normalize;
* ``SPLIT`` -- parallel over blocks, then over groups, then over blocks.

The block helpers here also serve the row view (:mod:`.rows`), which is the
same buffer with one channel and per-element parameters.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._config import glue, kernel
from .epilogue import _dx_constants, _normalize, _normalize_fused, _normalize_streamed, _store_mode
from .numerics import (
    _block_plane,
    _dots,
    _dx_coefs,
    _dx_coefs_of_sums,
    _finish,
    _group,
    _merge,
    _moments,
    _stat_index,
)
from .schedule import (
    BATCH,
    BLOCK,
    CENTERED,
    ELEMENTWISE,
    FUSED,
    ONE_BLOCK,
    KernelSpec,
    Schedule,
    share,
    task_count,
)
from .storage import affine_dx_span, compute

# ---------------------------------------------------------------------------
# Blocks of a plane (shared with the row view)
# ---------------------------------------------------------------------------


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
def _cf_group_statistics(x, work, mean, rstd, spec, nblocks, k):
    """Moments of every block of group ``k`` into ``work``, merged into ``mean[k]``, ``rstd[k]``."""
    n0, samples, c0, d = _group(spec, k)
    for n in range(n0, n0 + samples):
        for c in range(c0, c0 + d):
            for b in range(nblocks):
                _cf_moments_block(x, work, spec, nblocks, n * spec.channels + c, b)
    _cf_merge_group(work, mean, rstd, spec, nblocks, k)


@glue
def _cf_tasks(spec, schedule):
    """Return ``(tasks, blocks)``: a split pass's tasks over every block (:func:`~.schedule.task_count`)."""
    blocks = spec.batch * spec.channels * schedule.nblocks
    return task_count(schedule, blocks), blocks


@glue
def _block_position(spec, nblocks, blk):
    """``(plane, block, sample, channel)`` of flat block index ``blk``: where a counted walk starts."""
    plane, b = _block_plane(blk, nblocks)
    n = plane // spec.channels
    return plane, b, n, plane - n * spec.channels


@glue
def _next_block(spec, nblocks, plane, b, n, c, step):
    """Return the position one block after (``step = 1``) or before (``-1``) ``(plane, b, n, c)``.

    Counted, not derived from the flat index: a share's walk over small planes
    divides once, not once or twice per plane
    (docs/perf-notes/per-plane-overhead-and-inlining.md).
    """
    b += step
    if 0 <= b < nblocks:
        return plane, b, n, c
    b = 0 if step > 0 else nblocks - 1
    plane += step
    c += step
    if c == spec.channels:
        c = 0
        n += 1
    elif c < 0:
        c = spec.channels - 1
        n -= 1
    return plane, b, n, c


@glue
def _cf_split_statistics(x, mean, rstd, spec, schedule):
    """Every group's statistics: block moments in parallel over blocks, then merges over groups.

    The blocks run as the first pass of :func:`~.schedule.task_count`.
    """
    nblocks = schedule.nblocks
    work = np.empty(2 * spec.batch * spec.channels * nblocks)
    tasks, blocks = _cf_tasks(spec, schedule)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        for blk in range(lo, hi):
            plane, b = _block_plane(blk, nblocks)
            _cf_moments_block(x, work, spec, nblocks, plane, b)
    for k in prange(mean.size):
        _cf_merge_group(work, mean, rstd, spec, nblocks, k)


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


#: Channels per task of the inference over one-block BatchNorm/InstanceNorm planes
#: (:func:`_cf_normalize_planes`): one division per task instead of per plane.
_TASK_CHANNELS = 64


# ---------------------------------------------------------------------------
# Training forward and inference
# ---------------------------------------------------------------------------


@glue
def _channel_coefs(weight, bias, rstd, c):
    """``(scale, shift)`` of channel ``c``: ``rstd * weight[c]`` and ``bias[c]`` (1 and 0 without them)."""
    scale = rstd * weight[c] if weight.size > 0 else rstd
    shift = bias[c] if bias.size > 0 else 0.0
    return scale, shift


@glue
def _cf_normalize_planes(x, weight, bias, residual, grad, y, mean, rstd, spec, schedule):
    """Normalize every block of every plane with its group's statistics (parallel over blocks).

    The elementwise loop is called directly, with the per-channel scale and
    shift computed per block outside it
    (docs/perf-notes/per-plane-overhead-and-inlining.md).  The blocks run as
    the second pass of :func:`~.schedule.task_count` (each share backwards).
    """
    nblocks = schedule.nblocks
    centered = spec.flags & CENTERED != 0
    plain, _, _ = _store_mode(spec, grad, residual, x)
    d = spec.channels // spec.groups
    if schedule.strategy == ELEMENTWISE and nblocks == 1 and d > 1 and not spec.flags & BATCH:
        # GroupNorm inference over one-block planes: a group's planes are consecutive, so
        # one task per group, without the index arithmetic of a task per plane.
        for k in prange(mean.size):
            n0, _, c0, _ = _group(spec, k)
            group_mean = mean[k] if centered else 0.0
            for c in range(c0, c0 + d):
                scale, shift = _channel_coefs(weight, bias, rstd[k], c)
                off = (n0 * spec.channels + c) * spec.spatial
                if plain and schedule.stream:
                    _normalize_streamed(x, y, off, spec.spatial, group_mean, scale, shift)
                elif plain:
                    _normalize(x, y, off, spec.spatial, group_mean, scale, shift)
                else:
                    _normalize_fused(x, residual, grad, y, off, spec.spatial, group_mean, scale, shift, spec)
        return
    if schedule.strategy == ELEMENTWISE and nblocks == 1 and d == 1:
        # BatchNorm / InstanceNorm inference over one-block planes: a task walks
        # _TASK_CHANNELS consecutive planes of one sample, the channel and statistics
        # indices counted, not derived per plane (no division).  A GroupNorm task in
        # this loop, with its statistics index fixed, took 1.2x the loop above.
        per_sample = (spec.channels + _TASK_CHANNELS - 1) // _TASK_CHANNELS
        for t in prange(spec.batch * per_sample):
            n = t // per_sample
            c0 = (t - n * per_sample) * _TASK_CHANNELS
            k0 = _stat_index(spec, n, c0)
            for j in range(min(spec.channels - c0, _TASK_CHANNELS)):
                k = k0 + j
                scale, shift = _channel_coefs(weight, bias, rstd[k], c0 + j)
                off = (n * spec.channels + c0 + j) * spec.spatial
                plane_mean = mean[k] if centered else 0.0
                if plain and schedule.stream:
                    _normalize_streamed(x, y, off, spec.spatial, plane_mean, scale, shift)
                elif plain:
                    _normalize(x, y, off, spec.spatial, plane_mean, scale, shift)
                else:
                    _normalize_fused(x, residual, grad, y, off, spec.spatial, plane_mean, scale, shift, spec)
        return
    tasks, blocks = _cf_tasks(spec, schedule)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        plane, b, n, c = _block_position(spec, nblocks, hi - 1)
        for _ in range(hi - lo):
            k = _stat_index(spec, n, c)
            off, count, _ = _cf_block_span(spec, plane, b)
            scale, shift = _channel_coefs(weight, bias, rstd[k], c)
            group_mean = mean[k] if centered else 0.0
            if plain and schedule.stream:
                _normalize_streamed(x, y, off, count, group_mean, scale, shift)
            elif plain:
                _normalize(x, y, off, count, group_mean, scale, shift)
            else:
                _normalize_fused(x, residual, grad, y, off, count, group_mean, scale, shift, spec)
            plane, b, n, c = _next_block(spec, nblocks, plane, b, n, c, -1)


@glue
def _planes_forward_one_block(x, weight, bias, residual, y, mean, rstd, spec, stream):
    """``ONE_BLOCK``: per group, its moments in one pass, then its planes normalized while hot.

    A fused group is contiguous (its ``D`` planes follow each other), so a
    group of at most ``BLOCK`` elements is one block even when it spans
    several planes; its statistics go straight to ``mean``, ``rstd``.
    """
    plain, _, _ = _store_mode(spec, x[:0], residual, x)
    for k in prange(mean.size):
        plane, group_mean, group_rstd = _cf_group_one_block(x, mean, rstd, spec, k)
        c0 = plane % spec.channels  # the group's planes are consecutive channels
        for j in range(spec.channels // spec.groups):
            scale, shift = _channel_coefs(weight, bias, group_rstd, c0 + j)
            off = (plane + j) * spec.spatial
            if plain and stream:
                _normalize_streamed(x, y, off, spec.spatial, group_mean, scale, shift)
            elif plain:
                _normalize(x, y, off, spec.spatial, group_mean, scale, shift)
            else:
                _normalize_fused(x, residual, x[:0], y, off, spec.spatial, group_mean, scale, shift, spec)


@glue
def _fused_tile(spec, schedule, t, groups):
    """``(k0, k1, n0, samples, c0, d)``: fused task ``t``'s groups ``[k0, k1)``, samples and channels.

    A task takes ``schedule.chunk`` consecutive groups: one for GroupNorm and
    InstanceNorm, a tile of channels for BatchNorm, whose groups all span the
    whole batch (docs/perf-notes/fused-vs-split-schedules.md).  A tile of
    more than one group has one channel per group (``d == 1``), so the task's
    channels are ``c0 .. c0 + (k1 - k0) * d`` and channel ``c`` belongs to group
    :func:`_tile_group` ``(k0, c0, d, c)``: counted, no division per plane.
    """
    k0 = t * schedule.chunk
    n0, samples, c0, d = _group(spec, k0)
    return k0, min(groups, k0 + schedule.chunk), n0, samples, c0, d


@glue
def _tile_group(k0, c0, d, c):
    """Group of channel ``c`` in a tile from :func:`_fused_tile`: ``k0 + (c - c0)`` (BatchNorm), or ``k0``."""
    return k0 + (c - c0) if d == 1 else k0


@glue
def _planes_forward_fused(x, weight, bias, residual, y, mean, rstd, spec, schedule):
    """``FUSED``: one task per tile of groups reads it once and normalizes it while it is in cache.

    A BatchNorm tile walks sample by sample over its channels' planes, which
    are consecutive in memory; the moments and merges are those of the split
    passes, so the results are the same bits.
    """
    nblocks = schedule.nblocks
    work = np.empty(2 * spec.batch * spec.channels * nblocks)
    plain, _, _ = _store_mode(spec, x[:0], residual, x)
    for t in prange((mean.size + schedule.chunk - 1) // schedule.chunk):
        k0, k1, n0, samples, c0, d = _fused_tile(spec, schedule, t, mean.size)
        for n in range(n0, n0 + samples):
            for c in range(c0, c0 + (k1 - k0) * d):
                for b in range(nblocks):
                    _cf_moments_block(x, work, spec, nblocks, n * spec.channels + c, b)
        for k in range(k0, k1):
            _cf_merge_group(work, mean, rstd, spec, nblocks, k)
        for n in range(n0, n0 + samples):
            for c in range(c0, c0 + (k1 - k0) * d):
                k = _tile_group(k0, c0, d, c)
                plane = n * spec.channels + c
                scale, shift = _channel_coefs(weight, bias, rstd[k], c)
                for b in range(nblocks):
                    off, count, _ = _cf_block_span(spec, plane, b)
                    if plain and schedule.stream:
                        _normalize_streamed(x, y, off, count, mean[k], scale, shift)
                    elif plain:
                        _normalize(x, y, off, count, mean[k], scale, shift)
                    else:
                        _normalize_fused(x, residual, x[:0], y, off, count, mean[k], scale, shift, spec)


@glue
def _planes_forward_split(x, weight, bias, residual, y, mean, rstd, spec, schedule):
    """``SPLIT``: block moments in parallel, then the group merges, then the normalize pass."""
    _cf_split_statistics(x, mean, rstd, spec, schedule)
    _cf_normalize_planes(x, weight, bias, residual, x[:0], y, mean, rstd, spec, schedule)


@kernel
def planes_forward(x, weight, bias, residual, y, mean, rstd, params):
    """Training forward pass of BatchNorm / InstanceNorm / GroupNorm on an (N, C, S) buffer.

    Parameters
    ----------
    x : ndarray, 1-D, C-contiguous, float32 or float64
        Input, ``N * C * S`` elements in (N, C, S) order.
    weight, bias : ndarray, 1-D, same dtype as ``x``
        Per-channel affine parameters (length ``C``); empty means absent
        (weight 1, bias 0).
    residual : ndarray, 1-D, same dtype as ``x``
        Added after the affine transform (same layout and size as ``x``), or
        empty.  The activation is ``params``' ``activation``
        (:mod:`.epilogue`).
    y : ndarray, 1-D, same dtype and size as ``x``
        Output; may be ``x`` or ``residual`` itself (in place).
    mean, rstd : ndarray, 1-D, float64, length :func:`~.schedule.num_stats`
        Outputs: the per-group mean (0 without ``CENTERED``) and
        ``1 / sqrt(var + eps)``.
    params : tuple
        The fields of a :class:`~.schedule.KernelSpec` followed by those of
        its :class:`~.schedule.Schedule` (a plain tuple: Numba dispatches it
        faster than a namedtuple).

    Notes
    -----
    Ioffe & Szegedy (2015), Algorithm 1 (BN); Ulyanov et al. (2016), eq. 2
    (IN); Wu & He (2018), eq. 1-3 (GN).  Normalization uses the centered form
    ``(x - mean) * (rstd * weight) + bias`` so that constant groups map
    exactly to ``bias``.
    """
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    if schedule.strategy == ONE_BLOCK:
        _planes_forward_one_block(x, weight, bias, residual, y, mean, rstd, spec, schedule.stream)
    elif schedule.strategy == FUSED:
        _planes_forward_fused(x, weight, bias, residual, y, mean, rstd, spec, schedule)
    else:
        _planes_forward_split(x, weight, bias, residual, y, mean, rstd, spec, schedule)


@kernel
def planes_inference(x, weight, bias, residual, grad, y, mean, rstd, params):
    """Inference forward pass (given statistics) on an (N, C, S) buffer.

    Parameters are those of :func:`planes_forward`, except that ``mean`` and
    ``rstd`` are inputs, and ``grad``: empty, or the gradient of the output
    (size of ``x``), and then ``y`` receives ``grad * act'(z)`` instead of
    ``act(z)``, the first step of a backward pass through the epilogue.

    Notes
    -----
    Ioffe & Szegedy (2015), Algorithm 2, step 11: one multiply-add per element
    with ``scale = weight * rstd``, written in the centered form
    ``(x - mean) * scale + bias``.
    """
    spec = KernelSpec(*params[:8])
    _cf_normalize_planes(x, weight, bias, residual, grad, y, mean, rstd, spec, Schedule(*params[8:]))


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@glue
def _cf_dots_block(dy, x, work, coef, spec, nblocks, plane, b, k):
    """Store ``sum(dy)`` and ``sum(dy * (x - mean))`` of block ``b`` of ``plane`` in ``work``.

    The per-channel weight is applied per plane in :func:`_cf_group_coefs`.
    """
    off, count, _ = _cf_block_span(spec, plane, b)
    blk = plane * nblocks + b
    work[2 * blk], work[2 * blk + 1] = _dots(dy, x, off, count, coef[4 * k])


@glue
def _cf_group_coefs(weight, work, coef, spec, nblocks, k):
    """Turn the dot products of group ``k`` into its dx coefficients ``coef[4k+2], coef[4k+3]``.

    ``dx = rstd*w*dy - kx * (x - mean) - k0`` with ``kx = rstd^3 * sum(g*(x-mean)) / m``
    and ``k0 = rstd * sum(g) / m`` (0 without ``CENTERED``), ``g = weight * dy``.
    """
    n0, samples, c0, d = _group(spec, k)
    sum_g = 0.0
    sum_g_xc = 0.0
    for n in range(n0, n0 + samples):
        for c in range(c0, c0 + d):
            w = weight[c] if weight.size > 0 else 1.0
            blk0 = (n * spec.channels + c) * nblocks
            for b in range(nblocks):
                sum_g += w * work[2 * (blk0 + b)]
                sum_g_xc += w * work[2 * (blk0 + b) + 1]
    m = float(samples * d * spec.spatial)
    coef[4 * k + 2], coef[4 * k + 3] = _dx_coefs(sum_g, sum_g_xc, coef[4 * k + 1], m, spec.flags)


@glue
def _cf_dx_block_k(dy, x, weight, dx, coef, spec, plane, b, k, c):
    """Write ``dx`` of block ``b`` of ``plane`` (channel ``c``) from group ``k``'s ``coef[4k : 4k+4]``.

    The slices are local variables: passed as call arguments of the inlined
    loop, each plane paid reference-count calls (1.4 us more on (1, 64, 64);
    docs/perf-notes/per-plane-overhead-and-inlining.md).
    """
    mean, rstd, kx, k0 = coef[4 * k], coef[4 * k + 1], coef[4 * k + 2], coef[4 * k + 3]
    off, count, _ = _cf_block_span(spec, plane, b)
    a = rstd * weight[c] if weight.size > 0 else rstd
    mean_hi, kx_x, k0_x = _dx_constants(x, mean, kx, k0)
    affine_dx_span(dx, dy, x, off, count, compute(x, a), kx_x, mean_hi, k0_x)


@glue
def _group_coef_table(mean, rstd, spec):
    """``coef[4k : 4k+2] = (mean or 0, rstd)`` of every group; ``kx``, ``k0`` follow later."""
    coef = np.empty(4 * mean.size)
    for k in range(mean.size):
        coef[4 * k] = mean[k] if spec.flags & CENTERED else 0.0
        coef[4 * k + 1] = rstd[k]
    return coef


@glue
def _cf_dots_plane(dy, x, work, coef, spec, nblocks, plane, k):
    """:func:`_cf_dots_block` of every block of ``plane``; a one-block plane without the block loop."""
    if nblocks == 1:
        _cf_dots_block(dy, x, work, coef, spec, 1, plane, 0, k)
    else:
        for b in range(nblocks):
            _cf_dots_block(dy, x, work, coef, spec, nblocks, plane, b, k)


@glue
def _cf_dz_span(x, grad, residual, weight, bias, dz, coef, spec, off, count, k, c):
    """Write ``dz = grad * act'(z)`` over ``[off, off + count)`` of channel ``c``, group ``k``.

    The inference kernel's code for the span (:func:`_normalize_fused` with
    ``grad``), with the group's ``coef[4k : 4k+2]`` = (mean or 0, rstd).
    """
    scale, shift = _channel_coefs(weight, bias, coef[4 * k + 1], c)
    _normalize_fused(x, residual, grad, dz, off, count, coef[4 * k], scale, shift, spec)


@glue
def _cf_dx_plane(dy, x, weight, dx, coef, spec, nblocks, plane, k, c):
    """:func:`_cf_dx_block_k` of every block of ``plane``; a one-block plane without the block loop."""
    if nblocks == 1:
        _cf_dx_block_k(dy, x, weight, dx, coef, spec, plane, 0, k, c)
    else:
        for b in range(nblocks):
            _cf_dx_block_k(dy, x, weight, dx, coef, spec, plane, b, k, c)


@glue
def _planes_backward_fused(dy, x, weight, dx, dweight, dbias, coef, work, spec, schedule, epilogue):
    """``FUSED``: one task per tile of groups: dot products, coefficients, then ``dx`` while in cache.

    Tiles as in :func:`_planes_forward_fused`; the same bits as the split
    passes.  A BatchNorm tile also writes its channels' ``dweight`` and
    ``dbias`` (:func:`_channel_param_grads`).  With an ``epilogue`` (as
    :func:`_cf_split_dots`'s), the tile's ``dz`` is written first, plane by
    plane, and its dot products read it from the cache.
    """
    nblocks = schedule.nblocks
    groups = coef.size // 4
    for t in prange((groups + schedule.chunk - 1) // schedule.chunk):
        k0, k1, n0, samples, c0, d = _fused_tile(spec, schedule, t, groups)
        c1 = c0 + (k1 - k0) * d
        if epilogue is not None:  # the tile's dz, kept in cache for its dot products
            grad, residual, bias = epilogue
            for n in range(n0, n0 + samples):
                for c in range(c0, c1):
                    off = (n * spec.channels + c) * spec.spatial
                    k = _tile_group(k0, c0, d, c)
                    _cf_dz_span(x, grad, residual, weight, bias, dy, coef, spec, off, spec.spatial, k, c)
        for n in range(n0, n0 + samples):
            for c in range(c0, c1):
                k = _tile_group(k0, c0, d, c)
                _cf_dots_plane(dy, x, work, coef, spec, nblocks, n * spec.channels + c, k)
        for k in range(k0, k1):
            _cf_group_coefs(weight, work, coef, spec, nblocks, k)
        if spec.flags & BATCH:
            for c in range(c0, c1):
                _channel_param_grads(work, coef, dweight, dbias, spec, nblocks, c)
        for n in range(n0, n0 + samples):
            for c in range(c0, c1):
                k = _tile_group(k0, c0, d, c)
                _cf_dx_plane(dy, x, weight, dx, coef, spec, nblocks, n * spec.channels + c, k, c)


@glue
def _cf_split_dots(dy, x, weight, work, coef, spec, schedule, epilogue):
    """Store the dot products of every block in ``work`` (the first pass of :func:`~.schedule.task_count`).

    ``epilogue``: ``None``, or ``(grad, residual, bias)`` of
    :func:`planes_backward_epilogue`, and then each block's ``dy`` is first
    written as ``grad * act'(z)`` (:func:`_cf_dz_span`).  ``None`` is a
    compile-time constant: the plain backward has no branch per block (one
    cost 1.1-1.2x on 49-element planes; docs/perf-notes/fused-epilogue.md).
    """
    nblocks = schedule.nblocks
    tasks, blocks = _cf_tasks(spec, schedule)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        plane, b, n, c = _block_position(spec, nblocks, lo)
        if epilogue is not None:  # unpacked once per task, not per block
            grad, residual, bias = epilogue
        for _ in range(hi - lo):
            k = _stat_index(spec, n, c)
            if epilogue is not None:
                off, count, _ = _cf_block_span(spec, plane, b)
                _cf_dz_span(x, grad, residual, weight, bias, dy, coef, spec, off, count, k, c)
            _cf_dots_block(dy, x, work, coef, spec, nblocks, plane, b, k)
            plane, b, n, c = _next_block(spec, nblocks, plane, b, n, c, 1)


@glue
def _cf_split_dx(dy, x, weight, dx, coef, spec, schedule):
    """``dx`` of every block from the groups' coefficients (second pass of :func:`~.schedule.task_count`)."""
    nblocks = schedule.nblocks
    tasks, blocks = _cf_tasks(spec, schedule)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        plane, b, n, c = _block_position(spec, nblocks, hi - 1)
        for _ in range(hi - lo):
            _cf_dx_block_k(dy, x, weight, dx, coef, spec, plane, b, _stat_index(spec, n, c), c)
            plane, b, n, c = _next_block(spec, nblocks, plane, b, n, c, -1)


@glue
def _planes_backward_split(dy, x, weight, dx, coef, work, spec, schedule, epilogue):
    """``SPLIT``: dot products over blocks, coefficients over groups, ``dx`` over blocks."""
    _cf_split_dots(dy, x, weight, work, coef, spec, schedule, epilogue)
    for k in prange(coef.size // 4):
        _cf_group_coefs(weight, work, coef, spec, schedule.nblocks, k)
    _cf_split_dx(dy, x, weight, dx, coef, spec, schedule)


@glue
def _channel_param_grads(work, coef, dweight, dbias, spec, nblocks, c):
    """``dweight[c] = sum over samples of rstd * sum(dy * (x - mean))``, ``dbias[c] = sum(dy)``.

    Each skipped when empty.
    """
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


@glue
def _planes_param_grads(work, coef, dweight, dbias, spec, nblocks):
    """:func:`_channel_param_grads` of every channel, in parallel.

    Spelled out, not a call of :func:`_channel_param_grads`: inlined into this
    parallel loop, the sum over blocks lost its vector form
    (``tests/test_vectorized_kernels.py``, ``planes_backward_reduce``).
    """
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


@kernel
def planes_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params):
    """Backward pass of BatchNorm / InstanceNorm / GroupNorm on an (N, C, S) buffer.

    Parameters
    ----------
    dy, x : ndarray, 1-D, C-contiguous, same dtype
        Upstream gradient and the forward input.
    weight : ndarray
        Weight used in the forward pass (empty: none).
    mean, rstd : ndarray, float64
        Statistics saved by the forward pass.
    dx : ndarray
        Output gradient of ``x``; may be ``dy`` or ``x`` itself (in place).
    dweight, dbias : ndarray
        Outputs (length ``C``), or empty to skip them.
    params : tuple
        As in :func:`planes_forward`.

    Notes
    -----
    Ioffe & Szegedy (2015), Section 3 (chain rule for BN), generalized to any
    group: with ``xhat = (x - mean) * rstd`` and ``g = weight * dy`` over the
    ``m`` elements of a group, ``dx = rstd * (g - mean(g) - xhat *
    mean(g * xhat))``.  The dot products are taken centered,
    ``sum(g * (x - mean))``, never as ``sum(g*x) - mean*sum(g)``.
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over all but the
    channel.  See ``docs/math.md``.
    """
    _planes_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params, None)


@kernel
def planes_backward_epilogue(grad, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params):
    """Backward pass through ``act(norm(x) (+ residual))`` on an (N, C, S) buffer, in one kernel.

    As :func:`~.channels_last.channels_last_backward_epilogue`: ``dz = grad *
    act'(z)`` is written into ``dz`` (``dx``'s memory, or the residual's
    gradient) inside the backward's first pass, per fused tile or per block of
    a split task, which reduces it while it is in cache; the ``dx`` pass then
    reads ``dz``.  The
    values of :func:`planes_inference`'s ``dz`` followed by
    :func:`planes_backward`, with the backward's schedule
    (docs/perf-notes/fused-epilogue.md).
    """
    _planes_backward(dz, x, weight, mean, rstd, dx, dweight, dbias, params, (grad, residual, bias))


@glue
def _planes_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params, epilogue):
    """Run the backward kernels' body; ``epilogue`` as :func:`_cf_split_dots`'s."""
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    work = np.empty(2 * spec.batch * spec.channels * schedule.nblocks)
    coef = _group_coef_table(mean, rstd, spec)
    fused = schedule.strategy == FUSED
    if fused:
        _planes_backward_fused(dy, x, weight, dx, dweight, dbias, coef, work, spec, schedule, epilogue)
    else:
        _planes_backward_split(dy, x, weight, dx, coef, work, spec, schedule, epilogue)
    if (dweight.size > 0 or dbias.size > 0) and not (fused and spec.flags & BATCH):
        _planes_param_grads(work, coef, dweight, dbias, spec, schedule.nblocks)


# ---------------------------------------------------------------------------
# BatchNorm split around a collective (fastnorm.sync_batch_norm)
# ---------------------------------------------------------------------------


@kernel
def planes_batch_stats(x, mean, m2, params):
    """Local BatchNorm moments of an (N, C, S) buffer: per-channel ``mean`` and ``m2``.

    Parameters
    ----------
    x : ndarray, 1-D, C-contiguous
        Input, as in :func:`planes_forward`.
    mean, m2 : ndarray, 1-D, float64, length C
        Outputs: the mean and the sum of squared deviations of each channel
        over the ``N * S`` local elements.
    params : tuple
        As in :func:`planes_forward`, for a BatchNorm spec with ``MOMENTS`` in
        its flags, and the ``FORWARD`` schedule.

    Notes
    -----
    The moments of the training forward pass (fixed blocks, Chan et al. 1979
    merge in a fixed order), before ``rstd`` is taken: the processes' moments
    are merged first (:func:`fastnorm.merge_stats`).
    """
    spec = KernelSpec(*params[:8])
    _cf_split_statistics(x, mean, m2, spec, Schedule(*params[8:]))


@kernel
def planes_backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat, params):
    """Local BatchNorm backward sums of an (N, C, S) buffer: ``sum(dy)``, ``sum(dy * xhat)`` per channel.

    Parameters
    ----------
    dy, x : ndarray, 1-D, C-contiguous, same dtype
        Upstream gradient and forward input.
    mean, rstd : ndarray, float64, length C
        The global statistics the forward pass normalized with.
    sum_dy, sum_dy_xhat : ndarray, float64, length C
        Outputs.
    params : tuple
        As in :func:`planes_forward`, with the ``BACKWARD`` schedule.

    Notes
    -----
    The dot products of :func:`planes_backward` (Ioffe & Szegedy 2015,
    Section 3): ``sum_dy`` is the local ``dbias``, ``sum_dy_xhat`` the local
    ``dweight``.
    """
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    work = np.empty(2 * spec.batch * spec.channels * schedule.nblocks)
    coef = _group_coef_table(mean, rstd, spec)
    _cf_split_dots(dy, x, x[:0], work, coef, spec, schedule, None)
    _planes_param_grads(work, coef, sum_dy_xhat, sum_dy, spec, schedule.nblocks)


@kernel
def planes_backward_apply(dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx, params):
    """BatchNorm ``dx`` of an (N, C, S) buffer from sums over the global batch of ``count`` per channel.

    Parameters
    ----------
    dy, x, weight, mean, rstd, dx
        As in :func:`planes_backward`.
    sum_dy, sum_dy_xhat : ndarray, float64, length C
        ``sum(dy)`` and ``sum(dy * xhat)`` over the global batch.
    count : float
        Elements per channel in the global batch.
    params : tuple
        As in :func:`planes_backward_reduce`.

    Notes
    -----
    ``dx = rstd * w * (dy - sum_dy / m - xhat * sum_dy_xhat / m)`` with the
    global ``m = count`` (Ioffe & Szegedy 2015, Section 3), computed as
    :func:`planes_backward` computes it.
    """
    spec = KernelSpec(*params[:8])
    coef = _group_coef_table(mean, rstd, spec)
    for c in range(spec.channels):
        w = weight[c] if weight.size > 0 else 1.0
        coef[4 * c + 2], coef[4 * c + 3] = _dx_coefs_of_sums(w, sum_dy[c], sum_dy_xhat[c], rstd[c], count)
    _cf_split_dx(dy, x, weight, dx, coef, spec, Schedule(*params[8:]))
