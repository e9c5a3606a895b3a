"""Channels-last: BatchNorm, InstanceNorm and GroupNorm on an (N, S, C) buffer.

A reduction block is ``Schedule.block`` rows (``max(BLOCK // C,
CL_MIN_ROWS)``) of one sample, reduced per channel and vectorized over ``C``;
channel partials are merged per statistics set (a sample, or the whole batch
for BatchNorm) and then per group, in a fixed order.  The strategies
(:mod:`.schedule`): ``FUSED`` -- one task per statistics set; ``SPLIT`` --
parallel over blocks, then sets, then blocks.  The elementwise passes use
per-channel coefficient vectors (in the input's dtype), tiled over several
rows per step for few channels (``Schedule.tile_rows``; the fused forward
tiles each set's vectors in its task).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._config import glue, helper, kernel
from .epilogue import (
    LEAKY_RELU,
    RELU,
    _activate_stored,
    _dx_constants,
    _fold,
    _rectify,
    _rectify_grad,
    _split,
    _store_mode,
)
from .numerics import (
    _dx_coefs,
    _dx_coefs_of_sums,
    _finish,
    _group,
    _merge,
    _moments_two_pass,
    cancellation_limit,
    finish_channel_dots,
)
from .schedule import BATCH, CENTERED, CL_CHUNK_BYTES, FUSED, KernelSpec, Schedule, share, task_count
from .storage import (
    STREAM_BYTES,
    acc,
    affine_coefs,
    affine_dx_coefs,
    compute_empty,
    is_16bit,
    load,
    store,
    stream_affine,
    stream_split,
)

# ---------------------------------------------------------------------------
# Blocks of rows
# ---------------------------------------------------------------------------


@glue
def _cl_block(spec, schedule, blk):
    """Return ``(offset, rows, sample)`` of channels-last block ``blk``."""
    rows_per_block = schedule.block
    n = blk // schedule.nblocks
    row0 = (blk - n * schedule.nblocks) * rows_per_block
    rows = min(rows_per_block, spec.spatial - row0)
    return (n * spec.spatial + row0) * spec.channels, rows, n


@glue
def _cl_tasks(spec, schedule):
    """Return ``(tasks, blocks)``: a split pass's tasks over all blocks (:func:`~.schedule.task_count`)."""
    blocks = spec.batch * schedule.nblocks
    return task_count(schedule, blocks), blocks


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
def _cl_block_moments(x, work, spec, schedule, blk):
    """Per-channel moments of block ``blk``, as :func:`_moments` (vectorized over C).

    One pass with sums shifted by the block's first row; a channel that lost
    too many bits to cancellation is recomputed with two passes.  Stored as
    ``work[2C*blk : 2C*blk+C]`` (means) and the next ``C`` (sums of squared
    deviations; of squares without ``CENTERED``).
    """
    nc = spec.channels
    off, rows, _ = _cl_block(spec, schedule, blk)
    mean = work[2 * nc * blk : 2 * nc * blk + nc]
    m2 = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
    mean[:] = 0.0
    m2[:] = 0.0
    centered = spec.flags & CENTERED != 0
    # The shift is read from the block's first row of x (in L1), not from a
    # float64 copy (docs/perf-notes/channels-last-row-streams.md).
    first = x[off : off + nc]
    # Four rows per step cut the accumulator traffic: four consecutive short
    # rows, or one row from each quarter of the block (schedule.quarters;
    # docs/perf-notes/channels-last-row-streams.md).  The rows are read
    # through one slice of the block: as four slices they need more runtime
    # alias checks than LLVM allows.  A step's four deviations and their sums
    # are in the accumulation type (float32 for 16-bit data), the per-channel
    # sums over the block in float64.
    quarter = rows // 4
    consecutive = schedule.quarters == 0
    xb = x[off : off + rows * nc]
    for j in range(quarter):
        o0, o1, o2, o3 = _four_rows(j, quarter, nc, consecutive)
        for c in range(nc):
            shift_c = acc(xb, load(first, c) if centered else 0.0)
            d0 = acc(xb, load(xb, o0 + c)) - shift_c
            d1 = acc(xb, load(xb, o1 + c)) - shift_c
            d2 = acc(xb, load(xb, o2 + c)) - shift_c
            d3 = acc(xb, load(xb, o3 + c)) - shift_c
            mean[c] += (d0 + d1) + (d2 + d3)
            m2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for row in range(4 * quarter, rows):
        xr = x[off + row * nc : off + (row + 1) * nc]
        for c in range(nc):
            dev = acc(xr, load(xr, c)) - acc(xr, load(first, c) if centered else 0.0)
            mean[c] += dev
            m2[c] += dev * dev
    if not centered:
        mean[:] = 0.0
        return
    limit = cancellation_limit(x)
    # Count the channels that need the two-pass recomputation first: without its
    # call in the loop, the common finish is vectorized
    # (docs/perf-notes/channels-last-per-channel-finish.md).
    recompute = 0
    for c in range(nc):
        recompute += m2[c] > limit * (m2[c] - mean[c] * mean[c] / rows)
    if recompute == 0:
        for c in range(nc):
            sum_dev = mean[c]
            m2[c] = m2[c] - sum_dev * sum_dev / rows
            mean[c] = load(first, c) + sum_dev / rows
        return
    for c in range(nc):
        sum_dev = mean[c]
        sum_sq = m2[c]
        m2[c] = sum_sq - sum_dev * sum_dev / rows
        mean[c] = load(first, c) + sum_dev / rows
        if sum_sq > limit * m2[c]:
            mean[c], m2[c] = _moments_two_pass(x[off + c : off + rows * nc : nc], rows)


@helper
def _cl_merge_set(work, chan, spec, schedule, set_index):
    """Merge the block moments of one statistics set per channel, vectorized over C.

    Order: sample, block.  Writes the per-channel mean and sum of squared
    deviations to ``chan[2C*set : 2C*set + 2C]`` and returns the per-channel
    element count.
    """
    nc = spec.channels
    rows_per_block = schedule.block
    nblocks = schedule.nblocks
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
    has_weight = weight.size > 0
    has_bias = bias.size > 0
    if d == 1:
        # One channel per group: the loop below with its inner loop of one channel,
        # as one loop (docs/perf-notes/channels-last-per-channel-finish.md).
        set_stats = stats[2 * nc * set_index : 2 * nc * (set_index + 1)]
        mean_his = coef[base : base + nc]
        scales = coef[base + nc : base + 2 * nc]
        shifts = coef[base + 2 * nc : base + 3 * nc]
        for c in range(nc):
            mean_hi, mean_lo = _split(coef, set_stats[2 * c])
            scale = set_stats[2 * c + 1] * weight[c] if has_weight else set_stats[2 * c + 1]
            mean_his[c] = mean_hi
            scales[c] = scale
            shifts[c] = _fold(bias[c] if has_bias else 0.0, scale, mean_lo, coef)
        return
    # group by group: one split of the mean per group, no division per channel
    for g in range(spec.groups):
        k = set_index * spec.groups + g
        mean_hi, mean_lo = _split(coef, stats[2 * k])
        rstd = stats[2 * k + 1]
        for c in range(g * d, (g + 1) * d):
            scale = rstd * weight[c] if has_weight else rstd
            coef[base + c] = mean_hi
            coef[base + nc + c] = scale
            coef[base + 2 * nc + c] = _fold(bias[c] if has_bias else 0.0, scale, mean_lo, coef)


@helper
def _cl_tile(coef, nc, tile_rows):
    """``coef`` (per-channel vectors of ``nc``, of every set), each vector repeated ``tile_rows`` times."""
    if tile_rows == 1:
        return coef
    tiled = np.empty(coef.size * tile_rows, coef.dtype)
    _cl_tile_into(coef, tiled, nc, tile_rows, 0, coef.size // nc)
    return tiled


@helper
def _cl_tile_into(coef, tiled, nc, tile_rows, first, last):
    """Write ``coef``'s vectors ``first .. last - 1`` (``nc`` long) into ``tiled``, ``tile_rows`` times each.

    :func:`_cl_tile` tiles every vector; a fused forward task tiles its own
    set's three.  A compiled call, not inlined: inside a parallel kernel
    Numba would turn each slice copy into a parallel loop of its own
    (docs/perf-notes/channels-last-small-channel-tiles.md).
    """
    span = tile_rows * nc
    for j in range(first, last):
        for r in range(tile_rows):
            tiled[j * span + r * nc : j * span + (r + 1) * nc] = coef[j * nc : (j + 1) * nc]


@glue
def _cl_steps(spec, schedule, blk, tile_rows, vectors):
    """Return ``(offset, rows, base, span)`` of block ``blk`` for an elementwise pass.

    ``span = tile_rows * C`` elements per step; the pass's ``vectors``
    coefficient vectors of the block's set start at ``coef[base]``, each
    ``span`` long (:func:`_cl_tile`).
    """
    span = tile_rows * spec.channels
    off, rows, n = _cl_block(spec, schedule, blk)
    return off, rows, (0 if spec.flags & BATCH else vectors * span * n), span


@glue
def _cl_chunk(nc, tile_rows, coef):
    """Channels per chunk of an elementwise pass over rows of ``nc``: ``CL_CHUNK_BYTES`` of ``coef``'s dtype.

    ``nc`` (one chunk) when a step spans several rows (``tile_rows > 1``) or
    the rows are short (docs/perf-notes/channels-last-channel-chunks.md).
    """
    width = CL_CHUNK_BYTES // coef.itemsize
    return nc if tile_rows > 1 or nc <= width else width


@glue
def _cl_store_rows(
    x, residual, grad, y, coef, base, span, off, rows, tile_rows, spec, with_residual, fused, with_grad
):
    """``y = rectify?((x - mean) * scale + shift (+ residual))`` over ``rows`` rows from ``off``.

    ``mean``, ``scale`` and ``shift`` are the block's coefficient vectors at
    ``base`` in ``coef``, each ``span`` long.  With ``with_grad``, ``y = grad
    * rectify'(z)`` instead (:func:`~.epilogue._rectify_grad`).
    ``with_residual``, ``fused`` and ``with_grad`` are constants at each call
    site, so that every loop is compiled for one case (a branch per step of a
    few channels costs as much as the step).
    """
    nc = spec.channels
    _, _, slope = _store_mode(spec, grad, residual, x)
    leaky = spec.activation == LEAKY_RELU
    mean = coef[base : base + span]
    scale = coef[base + span : base + 2 * span]
    shift = coef[base + 2 * span : base + 3 * span]
    width = _cl_chunk(nc, tile_rows, mean)
    for c0 in range(0, nc, width):
        cmean, cscale, cshift = mean[c0:], scale[c0:], shift[c0:]
        for r0 in range(0, rows, tile_rows):
            o = off + r0 * nc + c0
            count = (min(tile_rows, rows - r0) - 1) * nc + min(width, nc - c0)
            xs = x[o : o + count]
            ys = y[o : o + count]
            if with_grad:
                gs = grad[o : o + count]
                rs = residual[o : o + count] if with_residual else xs[:0]
                for i in range(count):
                    z = (load(xs, i) - cmean[i]) * cscale[i] + cshift[i]
                    if with_residual:
                        z = z + load(rs, i)
                    store(ys, i, _rectify_grad(z, load(gs, i), slope, leaky))
            elif with_residual:
                rs = residual[o : o + count]
                for i in range(count):
                    z = (load(xs, i) - cmean[i]) * cscale[i] + cshift[i] + load(rs, i)
                    store(ys, i, _rectify(z, slope) if fused else z)
            else:
                for i in range(count):
                    z = (load(xs, i) - cmean[i]) * cscale[i] + cshift[i]
                    store(ys, i, _rectify(z, slope) if fused else z)


@glue
def _cl_store_rows_plain(x, y, coef, base, span, off, rows, nc, tile_rows):
    """:func:`_cl_store_rows` without residual or rectifier, by :func:`.storage.affine_coefs`.

    The coefficient vectors are read at their offsets in ``coef`` (the
    block's set at ``base``, each ``span`` long), not through slices; each
    chunk and step is one explicit vector loop, with no alias check or
    remainder loop per step (docs/perf-notes/per-plane-overhead-and-inlining.md).
    """
    width = _cl_chunk(nc, tile_rows, coef)
    for c0 in range(0, nc, width):
        for r0 in range(0, rows, tile_rows):
            o = off + r0 * nc + c0
            count = (min(tile_rows, rows - r0) - 1) * nc + min(width, nc - c0)
            affine_coefs(y, x, o, count, coef, base + c0, base + span + c0, base + 2 * span + c0)


@glue
def _cl_stream_block(x, y, mean, scale, shift, off, count, span):
    """Plain normalize of ``count`` elements from ``off``, the aligned middle with non-temporal stores.

    ``mean``, ``scale`` and ``shift`` hold two repetitions of the block's
    ``span``-periodic coefficient vectors (:func:`~.storage.stream_affine`);
    the same values as :func:`_cl_store_rows` (docs/perf-notes/streaming-stores.md).
    """
    xs = x[off : off + count]
    ys = y[off : off + count]
    head, body = stream_split(ys)
    for i in range(head):  # head < one vector <= span
        store(ys, i, (load(xs, i) - mean[i]) * scale[i] + shift[i])
    stream_affine(ys[head : head + body], xs[head : head + body], mean, scale, shift, head % span, span)
    for i in range(head + body, count):
        j = i % span
        store(ys, i, (load(xs, i) - mean[j]) * scale[j] + shift[j])


@helper
def _cl_normalize_block(x, residual, grad, y, coef, spec, schedule, blk, tile_rows):
    """Normalize block ``blk``, ``tile_rows`` rows per step (``coef`` tiled by :func:`_cl_tile`).

    The epilogue (:mod:`.epilogue`) as in :func:`~.epilogue._normalize_fused`:
    plus ``residual`` unless empty, rectified (or the rectifier's gradient
    taken, ``grad`` not empty) in the loop; other activations and their
    gradients over the block just stored.
    """
    nc = spec.channels
    off, rows, base, span = _cl_steps(spec, schedule, blk, tile_rows, 3)
    _, fused, slope = _store_mode(spec, grad, residual, x)
    # a rectifier's gradient in the store loop, on float32/float64 data (16-bit data compare
    # the stored, rounded z): 0.75-0.95x the time of z stored, then dz over the block
    grad_fused = (
        grad.size > 0 and not is_16bit(x) and (spec.activation == RELU or spec.activation == LEAKY_RELU)
    )
    fused = fused or grad_fused
    if grad_fused and residual.size > 0:
        _cl_store_rows(x, residual, grad, y, coef, base, span, off, rows, tile_rows, spec, True, True, True)
    elif grad_fused:
        _cl_store_rows(x, residual, grad, y, coef, base, span, off, rows, tile_rows, spec, False, True, True)
    elif residual.size > 0 and fused:
        _cl_store_rows(x, residual, grad, y, coef, base, span, off, rows, tile_rows, spec, True, True, False)
    elif residual.size > 0:
        _cl_store_rows(x, residual, grad, y, coef, base, span, off, rows, tile_rows, spec, True, False, False)
    elif fused:
        _cl_store_rows(x, residual, grad, y, coef, base, span, off, rows, tile_rows, spec, False, True, False)
    else:
        _cl_store_rows_plain(x, y, coef, base, span, off, rows, nc, tile_rows)
    _activate_stored(y[off : off + rows * nc], grad, off, rows * nc, spec.activation, slope, fused)


# ---------------------------------------------------------------------------
# Training forward and inference
# ---------------------------------------------------------------------------


@glue
def _cl_set_stats(work, chan, stats, spec, schedule, set_index):
    """Merge one set's block moments per channel, then per group into ``stats``."""
    count = _cl_merge_set(work, chan, spec, schedule, set_index)
    if spec.groups == spec.channels:
        # One channel per group: the merge of _cl_group_stats returns the channel's
        # moments as they are, so this is its _finish, in one vectorized loop
        # (docs/perf-notes/channels-last-per-channel-finish.md).
        nc = spec.channels
        mean = chan[2 * nc * set_index : 2 * nc * set_index + nc]
        m2 = chan[2 * nc * set_index + nc : 2 * nc * (set_index + 1)]
        out = stats[2 * nc * set_index : 2 * nc * (set_index + 1)]
        flags = spec.flags
        eps = spec.eps
        for c in range(nc):
            out[2 * c], out[2 * c + 1] = _finish(count, mean[c], m2[c], flags, eps)
        return
    for g in range(spec.groups):
        _cl_group_stats(chan, count, stats, spec, set_index * spec.groups + g)


@glue
def _cl_forward_fused(x, weight, bias, residual, y, work, chan, stats, coef, spec, schedule):
    """``FUSED``: one task per statistics set: block moments, merges, coefficients, normalize."""
    no_grad = x[:0]
    tile_rows = schedule.tile_rows
    tiled = coef if tile_rows == 1 else np.empty(coef.size * tile_rows, coef.dtype)
    for n in prange(stats.size // 2 // spec.groups):
        for b in range(schedule.nblocks):
            _cl_block_moments(x, work, spec, schedule, n * schedule.nblocks + b)
        _cl_set_stats(work, chan, stats, spec, schedule, n)
        _cl_set_coefs(weight, bias, stats, coef, spec, n)
        if tile_rows > 1:
            _cl_tile_into(coef, tiled, spec.channels, tile_rows, 3 * n, 3 * n + 3)
        for b in range(schedule.nblocks):
            blk = n * schedule.nblocks + b
            _cl_normalize_block(x, residual, no_grad, y, tiled, spec, schedule, blk, tile_rows)


@glue
def _cl_split_statistics(x, work, chan, stats, spec, schedule):
    """Block moments in parallel, then the set and group merges into ``stats``."""
    tasks, blocks = _cl_tasks(spec, schedule)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        for blk in range(lo, hi):
            _cl_block_moments(x, work, spec, schedule, blk)
    # One set (BatchNorm) is merged serially: a parallel loop of one iteration
    # cannot share it and costs a parallel region, 20-30 us measured here
    # (docs/perf-notes/channels-last-per-channel-finish.md).  The same rule
    # holds for every per-set loop of the split passes.
    sets = stats.size // 2 // spec.groups
    if sets == 1:
        _cl_set_stats(work, chan, stats, spec, schedule, 0)
    else:
        for s in prange(sets):
            _cl_set_stats(work, chan, stats, spec, schedule, s)


@glue
def _cl_forward_split(x, weight, bias, residual, y, work, chan, stats, coef, spec, schedule):
    """``SPLIT``: block moments in parallel, set and group merges, then the normalize pass."""
    sets = stats.size // 2 // spec.groups
    _cl_split_statistics(x, work, chan, stats, spec, schedule)
    for s in range(sets):
        _cl_set_coefs(weight, bias, stats, coef, spec, s)
    _cl_normalize(x, residual, x[:0], y, coef, spec, schedule)


@glue
def _cl_normalize(x, residual, grad, y, coef, spec, schedule):
    """Normalize every block with the sets' coefficients, ``schedule.tile_rows`` rows per step.

    With ``schedule.stream``, a plain pass whose steps span at least one
    vector stores each block through :func:`_cl_stream_block`, from
    coefficient vectors repeated over two steps.  The blocks run as the
    second pass of :func:`_cl_tasks` (each share backwards).
    """
    plain, _, _ = _store_mode(spec, grad, residual, x)
    span = schedule.tile_rows * spec.channels
    tasks, blocks = _cl_tasks(spec, schedule)
    if schedule.stream and plain and span * x.itemsize >= STREAM_BYTES:
        doubled = _cl_tile(coef, spec.channels, 2 * schedule.tile_rows)
        for t in prange(tasks):
            lo, hi = share(t, tasks, blocks)
            for i in range(hi - lo):
                off, rows, base, span2 = _cl_steps(spec, schedule, hi - 1 - i, 2 * schedule.tile_rows, 3)
                mean = doubled[base : base + span2]
                scale = doubled[base + span2 : base + 2 * span2]
                shift = doubled[base + 2 * span2 : base + 3 * span2]
                _cl_stream_block(x, y, mean, scale, shift, off, rows * spec.channels, span)
        return
    tiled = _cl_tile(coef, spec.channels, schedule.tile_rows)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        for i in range(hi - lo):
            _cl_normalize_block(x, residual, grad, y, tiled, spec, schedule, hi - 1 - i, schedule.tile_rows)


@kernel
def channels_last_forward(x, weight, bias, residual, y, mean, rstd, params):
    """Training forward pass of BatchNorm / InstanceNorm / GroupNorm on an (N, S, C) buffer.

    Parameters and Notes as :func:`~.planes.planes_forward`.
    """
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    nstats = mean.size
    sets = nstats // spec.groups
    work = np.empty(2 * spec.channels * spec.batch * schedule.nblocks)
    chan = np.empty(2 * spec.channels * sets)
    stats = np.empty(2 * nstats)
    coef = compute_empty(x, 3 * spec.channels * sets)
    if schedule.strategy == FUSED:
        _cl_forward_fused(x, weight, bias, residual, y, work, chan, stats, coef, spec, schedule)
    else:
        _cl_forward_split(x, weight, bias, residual, y, work, chan, stats, coef, spec, schedule)
    for k in range(nstats):
        mean[k] = stats[2 * k]
        rstd[k] = stats[2 * k + 1]


@kernel
def channels_last_inference(x, weight, bias, residual, grad, y, mean, rstd, params):
    """Inference forward pass (given statistics) on an (N, S, C) buffer.

    See :func:`~.planes.planes_inference`.
    """
    spec = KernelSpec(*params[:8])
    coef = _cl_given_coefs(x, weight, bias, mean, rstd, spec)
    _cl_normalize(x, residual, grad, y, coef, spec, Schedule(*params[8:]))


@helper
def _cl_given_coefs(x, weight, bias, mean, rstd, spec):
    """Every set's ``mean_hi, scale, shift`` vectors (:func:`_cl_set_coefs`) from given statistics."""
    nstats = mean.size
    sets = nstats // spec.groups
    stats = np.empty(2 * nstats)
    for k in range(nstats):
        stats[2 * k] = mean[k] if spec.flags & CENTERED else 0.0
        stats[2 * k + 1] = rstd[k]
    coef = compute_empty(x, 3 * spec.channels * sets)
    for s in range(sets):
        _cl_set_coefs(weight, bias, stats, coef, spec, s)
    return coef


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@helper
def _cl_set_means(mean, chan_mean, spec, set_index):
    """Fill the per-channel float64 mean vector (``chan_mean[C*set : +C]``) of one set."""
    nc = spec.channels
    d = nc // spec.groups
    base = nc * set_index
    for c in range(nc):
        chan_mean[base + c] = mean[set_index * spec.groups + c // d] if spec.flags & CENTERED else 0.0


@glue
def _cl_block_backward_dots(dy, x, work, chan_mean, spec, schedule, blk, epilogue):
    """:func:`_cl_block_dots` of block ``blk``; first, with an ``epilogue``, the block's ``dy``.

    ``epilogue = (grad, residual, zcoef)``: ``grad`` empty for a plain
    backward; otherwise the block's ``dy = grad * act'(z)`` is written by the
    inference kernel's block code (:func:`_cl_normalize_block`, ``z`` from
    the untiled ``zcoef`` of :func:`_cl_given_coefs`, so ``dy`` has its bits)
    and reduced while in cache: it is not read back from memory for the dot
    products (docs/perf-notes/fused-epilogue.md).
    """
    grad, residual, zcoef = epilogue
    if grad.size > 0:
        _cl_normalize_block(x, residual, grad, dy, zcoef, spec, schedule, blk, 1)
    _cl_block_dots(dy, x, work, chan_mean, spec, schedule, blk)


@helper
def _cl_block_dots(dy, x, work, chan_mean, spec, schedule, blk):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` of block ``blk``."""
    nc = spec.channels
    off, rows, n = _cl_block(spec, schedule, blk)
    base = 0 if spec.flags & BATCH else nc * n
    mean = chan_mean[base : base + nc]
    sum_dy = work[2 * nc * blk : 2 * nc * blk + nc]
    sum_dy_xc = work[2 * nc * blk + nc : 2 * nc * (blk + 1)]
    sum_dy[:] = 0.0
    sum_dy_xc[:] = 0.0
    # Four rows per step, one from each quarter of the block (each array read
    # through one slice, see _cl_block_moments): the accumulators are loaded
    # and stored once per four rows (docs/perf-notes/channels-last-row-streams.md).
    # A step's products are in the accumulation type (float32 for 16-bit data),
    # about the mean in that type; the rest of the mean is taken off at the end
    # (finish_channel_dots).
    quarter = rows // 4
    xb = x[off : off + rows * nc]
    dyb = dy[off : off + rows * nc]
    for j in range(quarter):
        o0, o1, o2, o3 = _four_rows(j, quarter, nc, False)
        for c in range(nc):
            mean_c = acc(xb, mean[c])
            dy0 = load(dyb, o0 + c)
            dy1 = load(dyb, o1 + c)
            dy2 = load(dyb, o2 + c)
            dy3 = load(dyb, o3 + c)
            sum_dy[c] += (dy0 + dy1) + (dy2 + dy3)
            sum_dy_xc[c] += (
                dy0 * (acc(xb, load(xb, o0 + c)) - mean_c) + dy1 * (acc(xb, load(xb, o1 + c)) - mean_c)
            ) + (dy2 * (acc(xb, load(xb, o2 + c)) - mean_c) + dy3 * (acc(xb, load(xb, o3 + c)) - mean_c))
    for row in range(4 * quarter, rows):
        xr = x[off + row * nc : off + (row + 1) * nc]
        dyr = dy[off + row * nc : off + (row + 1) * nc]
        for c in range(nc):
            dy_c = load(dyr, c)  # loaded once: see _row_dots_and_partials
            sum_dy[c] += dy_c
            sum_dy_xc[c] += dy_c * (acc(xr, load(xr, c)) - acc(xr, mean[c]))
    finish_channel_dots(sum_dy, sum_dy_xc, mean, x)


@helper
def _cl_sum_set(work, chan, spec, schedule, set_index):
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
        for b in range(schedule.nblocks):
            blk = n * schedule.nblocks + b
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
    kx, k0 = _dx_coefs(sum_g, sum_g_xc, rstd[k], m, spec.flags)
    _cl_store_dx_coefs(weight, mean, rstd, coef, spec, k, kx, k0)


@helper
def _cl_set_dx_coefs(weight, mean, rstd, chan, coef, spec, set_index):
    """Dx coefficients of every group of one set (:func:`_cl_group_coefs`).

    With one channel per group (BatchNorm, InstanceNorm) this is
    :func:`_cl_group_coefs`' arithmetic for ``d = 1`` in one loop over the
    channels, which LLVM vectorizes, instead of a call per channel
    (docs/perf-notes/channels-last-per-channel-finish.md).
    """
    nc = spec.channels
    if spec.groups != nc:
        for g in range(spec.groups):
            _cl_group_coefs(weight, mean, rstd, chan, coef, spec, set_index * spec.groups + g)
        return
    m = float((spec.batch if spec.flags & BATCH else 1) * spec.spatial)
    base = 4 * nc * set_index
    for c in range(nc):
        k = set_index * nc + c
        w = weight[c] if weight.size > 0 else 1.0
        sum_g = 0.0 + w * chan[2 * nc * set_index + c]
        sum_g_xc = 0.0 + w * chan[2 * nc * set_index + nc + c]
        kx, k0 = _dx_coefs(sum_g, sum_g_xc, rstd[k], m, spec.flags)
        mean_hi, kx_x, k0_x = _dx_constants(coef, mean[k] if spec.flags & CENTERED else 0.0, kx, k0)
        _cl_put_dx_coefs(weight, rstd[k], coef, nc, base, c, (mean_hi, kx_x, k0_x))


@glue
def _cl_put_dx_coefs(weight, r, coef, nc, base, c, constants):
    """Store channel ``c``'s ``dx`` coefficients in the set's four vectors at ``base``.

    ``constants`` is the group's ``(mean_hi, kx, k0)`` of :func:`_dx_constants`;
    the scale is ``r * weight[c]`` (``r`` the group's ``rstd``).
    """
    mean_hi, kx_x, k0_x = constants
    coef[base + c] = mean_hi
    coef[base + nc + c] = r * weight[c] if weight.size > 0 else r
    coef[base + 2 * nc + c] = kx_x
    coef[base + 3 * nc + c] = k0_x


@glue
def _cl_store_dx_coefs(weight, mean, rstd, coef, spec, k, kx, k0):
    """Store group ``k``'s ``kx``, ``k0`` in its channels' coefficient vectors (:func:`_cl_group_coefs`)."""
    _, _, c0, d = _group(spec, k)
    nc = spec.channels
    constants = _dx_constants(coef, mean[k] if spec.flags & CENTERED else 0.0, kx, k0)
    base = 4 * nc * (k // spec.groups)
    for c in range(c0, c0 + d):
        _cl_put_dx_coefs(weight, rstd[k], coef, nc, base, c, constants)


@helper
def _cl_dx_block(dy, x, dx, coef, spec, schedule, blk, tile_rows):
    """``dx`` of block ``blk``, ``tile_rows`` rows per step (``coef`` tiled by :func:`_cl_tile`)."""
    nc = spec.channels
    off, rows, base, span = _cl_steps(spec, schedule, blk, tile_rows, 4)
    width = _cl_chunk(nc, tile_rows, coef)
    for c0 in range(0, nc, width):
        at = base + c0
        for r0 in range(0, rows, tile_rows):
            o = off + r0 * nc + c0
            count = (min(tile_rows, rows - r0) - 1) * nc + min(width, nc - c0)
            # the coefficient vectors at their offsets in coef, as _cl_store_rows_plain's
            affine_dx_coefs(dx, dy, x, o, count, coef, at, at + span, at + 2 * span, at + 3 * span)


@glue
def _cl_backward_fused(dy, x, weight, mean, rstd, dx, work, chan, chan_mean, coef, spec, schedule, epilogue):
    """``FUSED``: one task per set: dot products, sums, coefficients, then ``dx``."""
    for n in prange(chan_mean.size // spec.channels):
        _cl_set_means(mean, chan_mean, spec, n)
        for b in range(schedule.nblocks):
            blk = n * schedule.nblocks + b
            _cl_block_backward_dots(dy, x, work, chan_mean, spec, schedule, blk, epilogue)
        _cl_sum_set(work, chan, spec, schedule, n)
        _cl_set_dx_coefs(weight, mean, rstd, chan, coef, spec, n)
        for b in range(schedule.nblocks):
            _cl_dx_block(dy, x, dx, coef, spec, schedule, n * schedule.nblocks + b, 1)


@glue
def _cl_backward_split(dy, x, weight, mean, rstd, dx, work, chan, chan_mean, coef, spec, schedule, epilogue):
    """``SPLIT``: dot products over blocks, sums over sets, coefficients over groups, ``dx`` over blocks."""
    _cl_split_dots(dy, x, mean, work, chan, chan_mean, spec, schedule, epilogue)
    if mean.size == spec.channels and spec.groups == spec.channels:  # one set: serial (_cl_split_statistics)
        _cl_set_dx_coefs(weight, mean, rstd, chan, coef, spec, 0)
    elif spec.groups == spec.channels:
        for s in prange(mean.size // spec.groups):
            _cl_set_dx_coefs(weight, mean, rstd, chan, coef, spec, s)
    else:
        for k in prange(mean.size):
            _cl_group_coefs(weight, mean, rstd, chan, coef, spec, k)
    _cl_split_dx(dy, x, dx, coef, spec, schedule)


@glue
def _cl_split_dots(dy, x, mean, work, chan, chan_mean, spec, schedule, epilogue):
    """Every set's per-channel dot products into ``chan``: blocks in parallel, then sums over sets.

    ``epilogue`` as :func:`_cl_block_backward_dots`'s.
    """
    sets = chan_mean.size // spec.channels
    for s in range(sets):
        _cl_set_means(mean, chan_mean, spec, s)
    tasks, blocks = _cl_tasks(spec, schedule)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        for blk in range(lo, hi):
            _cl_block_backward_dots(dy, x, work, chan_mean, spec, schedule, blk, epilogue)
    if sets == 1:  # serial: see _cl_split_statistics
        _cl_sum_set(work, chan, spec, schedule, 0)
    else:
        for s in prange(sets):
            _cl_sum_set(work, chan, spec, schedule, s)


@glue
def _cl_split_dx(dy, x, dx, coef, spec, schedule):
    """``dx`` of every block from the coefficient vectors, ``schedule.tile_rows`` rows per step.

    The blocks run as the second pass of :func:`_cl_tasks` (each share backwards).
    """
    tiled = _cl_tile(coef, spec.channels, schedule.tile_rows)
    tasks, blocks = _cl_tasks(spec, schedule)
    for t in prange(tasks):
        lo, hi = share(t, tasks, blocks)
        for i in range(hi - lo):
            _cl_dx_block(dy, x, dx, tiled, spec, schedule, hi - 1 - i, schedule.tile_rows)


@glue
def _cl_param_grads(rstd, chan, dweight, dbias, spec, sets):
    """``dweight[c]`` = sum over sets of rstd * sum(dy * (x - mean)), ``dbias[c] = sum(dy)``.

    Serial for one set (BatchNorm), a few operations per channel: a parallel
    loop would cost more than it shares (see :func:`_cl_split_statistics`).
    That loop is the other's without the sum over sets (``0.0 +`` the one
    term, the same bits), so that LLVM vectorizes it.
    """
    nc = spec.channels
    d = nc // spec.groups
    if sets == 1:
        for c in range(nc):
            if dweight.size > 0:
                dweight[c] = 0.0 + rstd[c // d] * chan[nc + c]
            if dbias.size > 0:
                dbias[c] = 0.0 + chan[c]
        return
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


@kernel
def channels_last_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params):
    """Backward pass of BatchNorm / InstanceNorm / GroupNorm on an (N, S, C) buffer.

    Parameters and Notes as :func:`~.planes.planes_backward`.
    """
    _cl_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params, (dy[:0], x[:0], compute_empty(x, 0)))


@kernel
def channels_last_backward_epilogue(
    grad, x, weight, bias, residual, dz, mean, rstd, dx, dweight, dbias, params
):
    """Backward pass through ``act(norm(x) (+ residual))`` on an (N, S, C) buffer, in one kernel.

    ``dz = grad * act'(z)`` is written into ``dz`` (``dx``'s memory, or the
    residual's gradient) block by block inside the backward's first pass,
    which reduces each block while it is in cache; the ``dx`` pass then reads
    ``dz`` as :func:`channels_last_backward` reads ``dy``.  The values of the
    inference kernel's ``dz`` followed by that kernel, with the backward's
    schedule, and one read of ``grad``, ``x`` (and ``residual``) and one
    write of ``dz`` in place of a pass of their own
    (docs/perf-notes/fused-epilogue.md).
    """
    spec = KernelSpec(*params[:8])
    zcoef = _cl_given_coefs(x, weight, bias, mean, rstd, spec)
    _cl_backward(dz, x, weight, mean, rstd, dx, dweight, dbias, params, (grad, residual, zcoef))


@glue
def _cl_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params, epilogue):
    """Run the backward kernels' body; ``epilogue`` as :func:`_cl_block_backward_dots`'s."""
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    nc = spec.channels
    sets = mean.size // spec.groups
    work = np.empty(2 * nc * spec.batch * schedule.nblocks)
    chan = np.empty(2 * nc * sets)
    chan_mean = np.empty(nc * sets)
    coef = compute_empty(x, 4 * nc * sets)
    if schedule.strategy == FUSED:
        _cl_backward_fused(
            dy, x, weight, mean, rstd, dx, work, chan, chan_mean, coef, spec, schedule, epilogue
        )
    else:
        _cl_backward_split(
            dy, x, weight, mean, rstd, dx, work, chan, chan_mean, coef, spec, schedule, epilogue
        )
    if dweight.size > 0 or dbias.size > 0:
        _cl_param_grads(rstd, chan, dweight, dbias, spec, sets)


# ---------------------------------------------------------------------------
# BatchNorm split around a collective (fastnorm.sync_batch_norm)
# ---------------------------------------------------------------------------


@kernel
def channels_last_batch_stats(x, mean, m2, params):
    """Local BatchNorm moments of an (N, S, C) buffer.

    Parameters and Notes as :func:`~.planes.planes_batch_stats`.
    """
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    nc = spec.channels
    work = np.empty(2 * nc * spec.batch * schedule.nblocks)
    chan = np.empty(2 * nc)
    stats = np.empty(2 * nc)
    _cl_split_statistics(x, work, chan, stats, spec, schedule)
    for c in range(nc):
        mean[c] = stats[2 * c]
        m2[c] = stats[2 * c + 1]


@kernel
def channels_last_backward_reduce(dy, x, mean, rstd, sum_dy, sum_dy_xhat, params):
    """Local BatchNorm backward sums of an (N, S, C) buffer.

    Parameters and Notes as :func:`~.planes.planes_backward_reduce`.
    """
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    nc = spec.channels
    work = np.empty(2 * nc * spec.batch * schedule.nblocks)
    chan = np.empty(2 * nc)
    chan_mean = np.empty(nc)
    _cl_split_dots(dy, x, mean, work, chan, chan_mean, spec, schedule, (dy[:0], x[:0], compute_empty(x, 0)))
    _cl_param_grads(rstd, chan, sum_dy_xhat, sum_dy, spec, 1)


@kernel
def channels_last_backward_apply(dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx, params):
    """BatchNorm ``dx`` of an (N, S, C) buffer from sums over the global batch.

    Parameters and Notes as :func:`~.planes.planes_backward_apply`.
    """
    spec = KernelSpec(*params[:8])
    coef = compute_empty(x, 4 * spec.channels)
    for c in range(spec.channels):
        w = weight[c] if weight.size > 0 else 1.0
        kx, k0 = _dx_coefs_of_sums(w, sum_dy[c], sum_dy_xhat[c], rstd[c], count)
        _cl_store_dx_coefs(weight, mean, rstd, coef, spec, c, kx, k0)
    _cl_split_dx(dy, x, dx, coef, spec, Schedule(*params[8:]))
