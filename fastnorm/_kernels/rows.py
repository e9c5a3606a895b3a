"""LayerNorm and RMSNorm rows: an (R, K) buffer normalized row by row, per-element parameters.

The row view is the channels-first buffer with one channel (``N = R`` rows
of ``S = K`` elements, ``G = 1``) whose weight and bias are indexed by the
position in the row; it shares the block helpers of :mod:`.planes`.  The
strategies (:mod:`.schedule`):

* forward: ``PIPELINED`` (normalize a row while summing the next one's
  moments), ``ONE_BLOCK`` (rows of at most ``BLOCK`` elements, one task per
  row), ``FUSED`` (longer rows, one task per row), ``SPLIT`` (few rows:
  parallel over blocks);
* backward: ``ROW_CHUNKS`` (many rows: tasks of whole rows, each with its own
  float64 parameter-gradient partials) or ``COLUMN_TILES`` (few long rows).

The pre-norm skip (:func:`rows_skip_forward`) is a prologue of the forward
strategies: each task first writes ``h = x + skip (+ skip_bias)`` for its own
rows (:func:`_add_skip_rows`), then normalizes ``h`` while it is in cache.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._config import glue, helper, kernel
from .epilogue import (
    _dx_row_span,
    _normalize_per_element,
    _normalize_per_element_fused,
    _normalize_per_element_streamed,
    _rectify,
    _split,
    _store_mode,
)
from .numerics import (
    _block_plane,
    _dots,
    _dots_finish,
    _dots_weighted,
    _dx_coefs,
    _finish,
    _moments,
    _shifted_moments,
)
from .planes import (
    _cf_block_span,
    _cf_group_one_block,
    _cf_group_statistics,
    _cf_split_statistics,
    _group_coef_table,
)
from .schedule import (
    BLOCK,
    CENTERED,
    COLUMN_TILE,
    FUSED,
    ONE_BLOCK,
    PIPELINED,
    ROW_CHUNKS,
    KernelSpec,
    Schedule,
)
from .storage import acc, compute, load, store

# ---------------------------------------------------------------------------
# Training forward and inference
# ---------------------------------------------------------------------------


@helper
def _add_skip_span(source, skip, skip_bias, h, off, count, s0):
    """``h = source + skip (+ skip_bias)`` over ``count`` elements at ``off`` (row position ``s0``).

    The sum is ``(source + skip) + skip_bias``, left to right, as
    ``x + skip + skip_bias`` in NumPy and torch.  ``skip_bias`` is empty
    when absent.
    """
    xs = source[off : off + count]
    ss = skip[off : off + count]
    hs = h[off : off + count]
    if skip_bias.size > 0:
        bs = skip_bias[s0 : s0 + count]
        for i in range(count):
            store(hs, i, (load(xs, i) + load(ss, i)) + bs[i])
    else:
        for i in range(count):
            store(hs, i, load(xs, i) + load(ss, i))


@helper
def _add_skip_rows(source, skip, skip_bias, h, width, k0, k1):
    """:func:`_add_skip_span` over rows ``k0 .. k1-1`` of ``width`` elements: one task's prologue."""
    for k in range(k0, k1):
        _add_skip_span(source, skip, skip_bias, h, k * width, width, 0)


@glue
def _normalize_row_sum_next(xs, ys, ws, bs, rs, mean, rstd, next_xs, shift, with_residual, fused, slope):
    """Normalize one LayerNorm row while summing the moments of the next one, in one loop.

    ``ys`` is :func:`_normalize_per_element` of ``xs`` with weight ``ws`` and
    bias ``bs``, plus the residual ``rs`` (``with_residual``), rectified
    (``fused``, :func:`_rectify`): the same arithmetic.  The return value is
    the sums that :func:`_moments` takes over ``next_xs``: of ``next_xs -
    shift`` and of its squares.  The normalize loop is bound by its stores
    and the moments loop by float64 arithmetic, so together they take less
    time than one after the other.  ``with_residual`` and ``fused`` are
    constants at each call site (:func:`_pipelined_task`).
    """
    mean_hi, mean_lo = _split(xs, mean)
    rstd_x = compute(xs, rstd)
    sum_dev = 0.0
    sum_sq = 0.0
    for i in range(xs.size):
        z = ((load(xs, i) - mean_hi) - mean_lo) * (rstd_x * ws[i]) + bs[i]
        if with_residual:
            z = z + load(rs, i)
        store(ys, i, _rectify(z, slope) if fused else z)
        dev = load(next_xs, i) - shift
        sum_dev += dev
        sum_sq += dev * dev
    return sum_dev, sum_sq


@glue
def _pipelined_rows(x, weight, bias, residual, y, spec, mean, rstd, k0, k1, with_residual, fused, slope):
    """Run the rows loop of :func:`_pipelined_task` for one constant ``(with_residual, fused)``."""
    width = spec.spatial
    no_grad = x[:0]
    row_mean, row_m2 = _moments(x, k0 * width, width, True)
    for k in range(k0, k1):
        row_mean, row_rstd = _finish(float(width), row_mean, row_m2, spec.flags, spec.eps)
        mean[k] = row_mean
        rstd[k] = row_rstd
        xs = x[k * width : (k + 1) * width]
        ys = y[k * width : (k + 1) * width]
        if k + 1 == k1:
            off = k * width
            if with_residual or fused:
                _normalize_per_element_fused(
                    x, residual, no_grad, y, weight, bias, off, width, 0, row_mean, row_rstd, spec
                )
            else:
                _normalize_per_element(x, y, weight, bias, off, width, 0, row_mean, row_rstd)
            break
        next_xs = x[(k + 1) * width : (k + 2) * width]
        shift = np.float64(load(next_xs, 0))
        rs = residual[k * width : (k + 1) * width] if with_residual else no_grad
        sum_dev, sum_sq = _normalize_row_sum_next(
            xs, ys, weight, bias, rs, row_mean, row_rstd, next_xs, shift, with_residual, fused, slope
        )
        row_mean, row_m2 = _shifted_moments(next_xs, width, shift, sum_dev, sum_sq)


@helper
def _pipelined_task(x, weight, bias, residual, y, spec, mean, rstd, k0, k1):
    """Training forward of LayerNorm rows ``k0 .. k1-1``, with weight and bias, software-pipelined.

    The loop that normalizes row ``k`` also sums row ``k+1``'s moments
    (:func:`_normalize_row_sum_next`); the rows' statistics are those of
    :func:`_moments` and :func:`_finish`
    (docs/perf-notes/layernorm-pipelined-forward.md).  The epilogue is the
    residual and a rectifier at most (:func:`~.schedule.plan_schedule`
    pipelines no other activation); each case is its own loop.
    """
    _, fused, slope = _store_mode(spec, x[:0], residual, x)
    if residual.size > 0 and fused:
        _pipelined_rows(x, weight, bias, residual, y, spec, mean, rstd, k0, k1, True, True, slope)
    elif residual.size > 0:
        _pipelined_rows(x, weight, bias, residual, y, spec, mean, rstd, k0, k1, True, False, slope)
    elif fused:
        _pipelined_rows(x, weight, bias, residual, y, spec, mean, rstd, k0, k1, False, True, slope)
    else:
        _pipelined_rows(x, weight, bias, residual, y, spec, mean, rstd, k0, k1, False, False, slope)


@glue
def _rows_normalize(x, weight, bias, residual, grad, y, mean, rstd, spec, schedule):
    """Normalize every block of every row with its statistics (parallel over blocks)."""
    nblocks = schedule.nblocks
    centered = spec.flags & CENTERED != 0
    plain, _, _ = _store_mode(spec, grad, residual, x)
    if plain and nblocks == 1 and not schedule.stream:
        # Rows of one block: the span is the whole row, its length read once out of the
        # spec. Through _cf_block_span in the loop, rows of 96-384 elements took
        # 1.2-1.5x longer (docs/perf-notes/per-plane-overhead-and-inlining.md).
        width = spec.spatial
        for row in prange(spec.batch):
            row_mean = mean[row] if centered else 0.0
            _normalize_per_element(x, y, weight, bias, row * width, width, 0, row_mean, rstd[row])
        return
    for blk in prange(spec.batch * nblocks):
        row, b = _block_plane(blk, nblocks)
        off, count, s0 = _cf_block_span(spec, row, b)
        row_mean = mean[row] if centered else 0.0
        if plain and schedule.stream and weight.size > 0:
            _normalize_per_element_streamed(x, y, weight, bias, off, count, s0, row_mean, rstd[row])
        elif plain:
            _normalize_per_element(x, y, weight, bias, off, count, s0, row_mean, rstd[row])
        else:
            _normalize_per_element_fused(
                x, residual, grad, y, weight, bias, off, count, s0, row_mean, rstd[row], spec
            )


@glue
def _rows_forward_pipelined(x, weight, bias, residual, y, mean, rstd, spec, chunk, skip):
    """``PIPELINED``: tasks of ``chunk`` rows, each normalizing a row while summing the next.

    ``skip`` is the prologue's ``(source, skip, skip_bias, h)``
    (:func:`rows_forward_with_skip`; ``skip`` empty for none): ``x`` is then ``h``,
    which each task first writes.
    """
    nrows = mean.size
    for t in prange((nrows + chunk - 1) // chunk):
        k1 = min(nrows, (t + 1) * chunk)
        if skip[1].size > 0:
            _add_skip_rows(skip[0], skip[1], skip[2], skip[3], spec.spatial, t * chunk, k1)
        _pipelined_task(x, weight, bias, residual, y, spec, mean, rstd, t * chunk, k1)


@glue
def _rows_forward_one_block(x, weight, bias, residual, y, mean, rstd, spec, skip, stream):
    """``ONE_BLOCK``: one task per row of at most ``BLOCK`` elements: moments, then normalize."""
    plain, _, _ = _store_mode(spec, x[:0], residual, x)
    if plain and not stream and skip[1].size == 0:
        # The common call, its branches taken out of the loop and the spec's fields
        # read before it: rows of 96 took 1.12x longer with them in the loop body
        # (docs/perf-notes/per-plane-overhead-and-inlining.md).
        width = spec.spatial
        flags = spec.flags
        eps = spec.eps
        centered = flags & CENTERED
        for k in prange(mean.size):
            row_mean, row_m2 = _moments(x, k * width, width, centered)
            row_mean, row_rstd = _finish(float(width), row_mean, row_m2, flags, eps)
            mean[k] = row_mean
            rstd[k] = row_rstd
            _normalize_per_element(x, y, weight, bias, k * width, width, 0, row_mean, row_rstd)
        return
    for k in prange(mean.size):
        if skip[1].size > 0:
            _add_skip_rows(skip[0], skip[1], skip[2], skip[3], spec.spatial, k, k + 1)
        row, row_mean, row_rstd = _cf_group_one_block(x, mean, rstd, spec, k)
        off, width = row * spec.spatial, spec.spatial
        if plain and stream and weight.size > 0:
            _normalize_per_element_streamed(x, y, weight, bias, off, width, 0, row_mean, row_rstd)
        elif plain:
            _normalize_per_element(x, y, weight, bias, off, width, 0, row_mean, row_rstd)
        else:
            _normalize_per_element_fused(
                x, residual, x[:0], y, weight, bias, off, width, 0, row_mean, row_rstd, spec
            )


@glue
def _rows_forward_fused(x, weight, bias, residual, y, mean, rstd, spec, schedule, skip):
    """``FUSED``: one task per long row: block moments, merge, then its blocks normalized."""
    nblocks = schedule.nblocks
    work = np.empty(2 * spec.batch * nblocks)
    plain, _, _ = _store_mode(spec, x[:0], residual, x)
    for k in prange(mean.size):
        if skip[1].size > 0:
            _add_skip_rows(skip[0], skip[1], skip[2], skip[3], spec.spatial, k, k + 1)
        _cf_group_statistics(x, work, mean, rstd, spec, nblocks, k)
        for b in range(nblocks):
            off, count, s0 = _cf_block_span(spec, k, b)
            if plain and schedule.stream and weight.size > 0:
                _normalize_per_element_streamed(x, y, weight, bias, off, count, s0, mean[k], rstd[k])
            elif plain:
                _normalize_per_element(x, y, weight, bias, off, count, s0, mean[k], rstd[k])
            else:
                _normalize_per_element_fused(
                    x, residual, x[:0], y, weight, bias, off, count, s0, mean[k], rstd[k], spec
                )


@glue
def _rows_forward_split(x, weight, bias, residual, y, mean, rstd, spec, schedule, skip):
    """``SPLIT``: few rows: block moments in parallel, the row merges, then the normalize pass.

    The skip prologue is one more parallel pass over the blocks, first.
    """
    if skip[1].size > 0:
        nblocks = schedule.nblocks
        for blk in prange(spec.batch * nblocks):
            row, b = _block_plane(blk, nblocks)
            off, count, s0 = _cf_block_span(spec, row, b)
            _add_skip_span(skip[0], skip[1], skip[2], skip[3], off, count, s0)
    _cf_split_statistics(x, mean, rstd, spec, schedule)
    _rows_normalize(x, weight, bias, residual, x[:0], y, mean, rstd, spec, schedule)


@kernel
def rows_forward_with_skip(x, skip, skip_bias, weight, bias, residual, h, y, mean, rstd, params):
    """Training forward pass of LayerNorm / RMSNorm rows, after a skip add when ``skip`` is not empty.

    The one compiled body of :func:`rows_forward` and :func:`rows_skip_forward`,
    which call it: a second kernel with the same strategies inlined would
    double their compile time, for one branch per task.

    Parameters
    ----------
    x : 1-D array
        The input, ``R * K`` elements in row order; with a skip, the first summand.
    skip : 1-D array
        The second summand (as ``x``), or empty for no skip add.
    skip_bias : 1-D array
        Added to every row of the sum (length ``K``), or empty.
    weight, bias, residual, y, mean, rstd, params
        As in :func:`rows_forward`; ``y`` must not overlap ``h``.
    h : 1-D array
        With a skip, output: ``x + skip + skip_bias``, the tensor normalized (and
        the input of :func:`rows_backward`); may be ``x`` or ``skip`` itself.
        Empty without one.
    """
    source = h if skip.size > 0 else x
    _rows_forward(source, weight, bias, residual, y, mean, rstd, params, (x, skip, skip_bias, h))


@helper
def rows_forward(x, weight, bias, residual, y, mean, rstd, params):
    """Training forward pass of LayerNorm / RMSNorm on an (R, K) buffer.

    Parameters are those of :func:`~.planes.planes_forward` for a buffer of
    ``R`` rows of ``K`` elements, with per-element ``weight`` and ``bias``
    (length ``K``) and one ``mean``, ``rstd`` per row (the mean is 0 and
    ``rstd = 1 / sqrt(mean(x**2) + eps)`` for RMSNorm).  Runs
    :func:`rows_forward_with_skip` without a skip.

    Notes
    -----
    Ba et al. (2016), eq. 4 (LN); Zhang & Sennrich (2019), eq. 4 (RMSNorm).
    Normalization uses the centered form ``(x - mean) * (rstd * weight) +
    bias``, so that a constant row maps exactly to ``bias``.
    """
    rows_forward_with_skip(x, x[:0], bias[:0], weight, bias, residual, y[:0], y, mean, rstd, params)


@helper
def rows_skip_forward(x, skip, skip_bias, weight, bias, h, y, mean, rstd, params):
    """Training forward pass of LayerNorm / RMSNorm rows after a skip add: ``h = x + skip (+ skip_bias)``.

    Parameters
    ----------
    x, skip : 1-D arrays
        The two summands, ``R * K`` elements in row order.
    skip_bias : 1-D array
        Added to every row of the sum (length ``K``), or empty.
    h : 1-D array
        Output: ``x + skip + skip_bias``, the tensor normalized (and the
        input of :func:`rows_backward`).  May be ``x`` or ``skip`` itself.
    weight, bias, y, mean, rstd, params
        As in :func:`rows_forward`, with ``h`` in place of ``x``; ``y`` must
        not overlap ``h``.

    Notes
    -----
    ONNX Runtime's ``SkipLayerNormalization`` (and its simplified RMS form):
    each task writes ``h`` for its rows, then normalizes them while they are
    in cache, so ``h`` costs one store and no second trip to memory.  Runs
    :func:`rows_forward_with_skip` without a residual.
    """
    rows_forward_with_skip(x, skip, skip_bias, weight, bias, x[:0], h, y, mean, rstd, params)


@glue
def _rows_forward(x, weight, bias, residual, y, mean, rstd, params, skip):
    """Run the strategy of :func:`rows_forward`; ``skip`` as in :func:`_rows_forward_pipelined`."""
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    if schedule.strategy == PIPELINED:
        _rows_forward_pipelined(x, weight, bias, residual, y, mean, rstd, spec, schedule.chunk, skip)
    elif schedule.strategy == ONE_BLOCK:
        _rows_forward_one_block(x, weight, bias, residual, y, mean, rstd, spec, skip, schedule.stream)
    elif schedule.strategy == FUSED:
        _rows_forward_fused(x, weight, bias, residual, y, mean, rstd, spec, schedule, skip)
    else:
        _rows_forward_split(x, weight, bias, residual, y, mean, rstd, spec, schedule, skip)


@kernel
def rows_inference(x, weight, bias, residual, grad, y, mean, rstd, params):
    """Inference forward pass (given statistics) of LayerNorm / RMSNorm rows.

    Parameters are those of :func:`rows_forward`, except that ``mean`` and
    ``rstd`` are inputs; ``grad`` as in :func:`~.planes.planes_inference`.
    """
    spec = KernelSpec(*params[:8])
    _rows_normalize(x, weight, bias, residual, grad, y, mean, rstd, spec, Schedule(*params[8:]))


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


@glue
def _row_dots_and_partials(dys, xs, ws, acc_dy, acc_dy_xhat, mean, rstd):
    """Return :func:`_cf_dots_block`'s sums over a span of a row and accumulate its partials.

    Per-element affine only (``ws`` the span's weights, empty for none); the
    same pass adds the span's ``dy`` and ``dy * xhat`` to the per-position
    partial sums ``acc_dy``, ``acc_dy_xhat``.
    """
    # the row sums in the accumulation type, about the mean in that type (as _dots)
    mean_hi = acc(xs, mean)
    rstd_a = acc(xs, rstd)
    sum_g = acc(xs, 0.0)
    sum_g_xc = acc(xs, 0.0)
    # Each input element is loaded once, before the stores: Numba tells LLVM
    # nothing about aliasing, so a `dys[i]` written after `acc_dy[i] += ...`
    # is loaded (and converted to float64) again.
    if ws.size > 0:
        for i in range(xs.size):
            dy_i = load(dys, i)
            xc = acc(xs, load(xs, i)) - mean_hi
            g = dy_i * ws[i]
            acc_dy[i] += dy_i
            acc_dy_xhat[i] += dy_i * xc * rstd_a
            sum_g += g
            sum_g_xc += g * xc
    else:
        for i in range(xs.size):
            dy_i = load(dys, i)
            xc = acc(xs, load(xs, i)) - mean_hi
            acc_dy[i] += dy_i
            acc_dy_xhat[i] += dy_i * xc * rstd_a
            sum_g += dy_i
            sum_g_xc += dy_i * xc
    return _dots_finish(sum_g, sum_g_xc, mean, mean_hi)


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
        dy_s = load(dys, s)  # loaded once: see _row_dots_and_partials
        part_dy[s] += dy_s
        part_dy_xhat[s] += dy_s * (load(xs, s) - mean) * rstd


@glue
def _row_chunk(dy, x, weight, mean, rstd, dx, part_dy, part_dy_xhat, spec, nblocks, n0, n1):
    """Backward of rows ``n0 .. n1-1``, adding their ``dy`` and ``dy * xhat`` to the partials.

    A row's ``dx`` follows its dot products while it is in L1; no per-row
    workspace.  ``dx`` may alias ``dy``: a row is read before it is written.
    """
    width = spec.spatial
    for n in range(n0, n1):
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
        kx, k0 = _dx_coefs(sum_g, sum_g_xc, row_rstd, float(width), spec.flags)
        for b in range(nblocks):
            _row_dx_block(dy, x, weight, dx, spec, n, b, row_mean, row_rstd, kx, k0)


@glue
def _row_dx_block(dy, x, weight, dx, spec, row, b, mean, rstd, kx, k0):
    """Write ``dx`` of block ``b`` of a row from the row's coefficients (slices taken here: see planes)."""
    off, count, s0 = _cf_block_span(spec, row, b)
    xs = x[off : off + count]
    dys = dy[off : off + count]
    dxs = dx[off : off + count]
    _dx_row_span(dys, xs, weight[s0 : s0 + count], dxs, rstd, kx, k0, mean)


@glue
def _rows_backward_chunks(dy, x, weight, mean, rstd, dx, dweight, dbias, spec, schedule):
    """``ROW_CHUNKS``: tasks of ``chunk`` whole rows, each with float64 partials of dweight/dbias.

    The partials are taken whether or not dweight/dbias are wanted, so that
    ``dx`` never depends on that choice; the fixed chunks are merged in order
    (deterministic; docs/perf-notes/layernorm-backward-partials.md).
    """
    width = spec.spatial
    chunk = schedule.chunk
    nrows = mean.size
    nchunks = (nrows + chunk - 1) // chunk
    partial = np.empty(2 * width * nchunks)
    for t in prange(nchunks):
        part_dy = partial[2 * width * t : 2 * width * t + width]
        part_dy_xhat = partial[2 * width * t + width : 2 * width * (t + 1)]
        part_dy[:] = 0.0
        part_dy_xhat[:] = 0.0
        _row_chunk(
            dy,
            x,
            weight,
            mean,
            rstd,
            dx,
            part_dy,
            part_dy_xhat,
            spec,
            schedule.nblocks,
            t * chunk,
            min(nrows, (t + 1) * chunk),
        )
    if dweight.size == 0 and dbias.size == 0:
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


@glue
def _rows_dots_and_coefs(dy, x, weight, mean, rstd, spec, nblocks):
    """Dot products of every (row, block) in parallel, then each row's ``(mean, rstd, kx, k0)``."""
    nrows = mean.size
    work = np.empty(2 * nrows * nblocks)
    coef = _group_coef_table(mean, rstd, spec)
    for blk in prange(nrows * nblocks):
        n, b = _block_plane(blk, nblocks)
        off, count, s0 = _cf_block_span(spec, n, b)
        if weight.size > 0:
            work[2 * blk], work[2 * blk + 1] = _dots_weighted(dy, x, weight, off, count, s0, coef[4 * n])
        else:
            work[2 * blk], work[2 * blk + 1] = _dots(dy, x, off, count, coef[4 * n])
    for k in prange(nrows):
        sum_g = 0.0
        sum_g_xc = 0.0
        for b in range(nblocks):
            sum_g += work[2 * (k * nblocks + b)]
            sum_g_xc += work[2 * (k * nblocks + b) + 1]
        coef[4 * k + 2], coef[4 * k + 3] = _dx_coefs(
            sum_g, sum_g_xc, coef[4 * k + 1], float(spec.spatial), spec.flags
        )
    return coef


@glue
def _rows_backward_columns(dy, x, weight, mean, rstd, dx, dweight, dbias, spec, schedule):
    """``COLUMN_TILES``: few long rows: dot products per block, then ``dx`` and partials per column tile.

    Each tile walks the rows in order (float64, deterministic) while its
    segment of ``x`` and ``dy`` is in L1.  The partials read ``dy`` before
    ``dx`` is written, so ``dx`` may alias ``dy``.
    """
    coef = _rows_dots_and_coefs(dy, x, weight, mean, rstd, spec, schedule.nblocks)
    width = spec.spatial
    want_params = dweight.size > 0 or dbias.size > 0
    acc = np.zeros(2 * width if want_params else 0)
    for tile in prange((width + COLUMN_TILE - 1) // COLUMN_TILE):
        lo = tile * COLUMN_TILE
        hi = min(width, lo + COLUMN_TILE)
        for n in range(mean.size):
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


@kernel
def rows_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, params):
    """Backward pass of LayerNorm / RMSNorm rows.

    Parameters are those of :func:`~.planes.planes_backward`, with per-element
    ``weight``, ``dweight`` and ``dbias`` (length ``K``) and the ``params`` of
    :func:`rows_forward`.

    Notes
    -----
    With ``xhat = (x - mean) * rstd`` and ``g = weight * dy`` over the ``K``
    elements of a row, ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``
    (Ba et al. 2016); without centering (Zhang & Sennrich 2019) the
    ``mean(g)`` term vanishes.  ``dweight = sum(dy * xhat)`` and
    ``dbias = sum(dy)`` over the rows.  See ``docs/math.md``.
    """
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    if schedule.strategy == ROW_CHUNKS:
        _rows_backward_chunks(dy, x, weight, mean, rstd, dx, dweight, dbias, spec, schedule)
    else:
        _rows_backward_columns(dy, x, weight, mean, rstd, dx, dweight, dbias, spec, schedule)


@kernel
def rows_skip_bias_backward(dh, dskip_bias, params):
    """Gradient of the skip bias: ``dskip_bias[s] = sum over rows of dh[row, s]``.

    Parameters
    ----------
    dh : 1-D array
        The gradient with respect to ``h`` (the ``dx`` of :func:`rows_backward`),
        ``R * K`` elements in row order.
    dskip_bias : 1-D array
        Output, length ``K``.
    params : tuple
        The spec and ``BACKWARD`` schedule of :func:`rows_backward`.

    Notes
    -----
    ``h = x + skip + skip_bias`` broadcasts the bias over the rows, so its
    gradient is the column sum of ``dh``.  Float64 sums over the schedule's
    fixed row chunks (``ROW_CHUNKS``) merged in order, or over all rows per
    column tile (``COLUMN_TILES``): the same bits for any thread count.
    """
    spec = KernelSpec(*params[:8])
    schedule = Schedule(*params[8:])
    width = spec.spatial
    nrows = spec.batch
    chunk = schedule.chunk if schedule.strategy == ROW_CHUNKS else nrows
    nchunks = (nrows + chunk - 1) // chunk
    partial = np.zeros(width * nchunks)
    for t in prange(nchunks):
        acc = partial[width * t : width * (t + 1)]
        for n in range(t * chunk, min(nrows, (t + 1) * chunk)):
            _add_row(dh[n * width : (n + 1) * width], acc)
    for tile in prange((width + COLUMN_TILE - 1) // COLUMN_TILE):
        for s in range(tile * COLUMN_TILE, min(width, (tile + 1) * COLUMN_TILE)):
            total = 0.0
            for t in range(nchunks):
                total += partial[width * t + s]
            dskip_bias[s] = total


@glue
def _add_row(row, acc):
    """``acc += row`` in float64."""
    for s in range(row.size):
        acc[s] += load(row, s)
