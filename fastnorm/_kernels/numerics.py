"""Numerics shared by every kernel family: moments, merges, dot products, group geometry.

Moments are accumulated in float64 over fixed blocks, each in one pass with
sums shifted by its first element (two passes when that would cancel too many
bits), and merged in float64 with Chan et al.'s pairwise update in a fixed
order (docs/perf-notes/reduction-blocks-and-determinism.md).  Some sums
run in the accumulation type of the data's storage (:func:`.storage.acc`:
float64 for float32 and float64 data, float32 for 16-bit data): the steps of
four vectors of the channels-first and row block moments and dot products and of
four rows of the channels-last sums, each chained in float64, and the row dot
products that set only ``dx`` (docs/perf-notes/16-bit-float32-accumulation.md).  Everything here is
inlined into the kernels (``glue``) except the rare two-pass fallback and the
merge.
"""

from __future__ import annotations

import numpy as np
from numba.extending import overload

from .._config import exact_helper, glue, helper
from .schedule import BATCH, CENTERED, MOMENTS
from .storage import (
    BFLOAT16_VIEW,
    FLOAT16_VIEW,
    _is_16bit,
    acc,
    dot_sums,
    is_16bit,
    load,
    step_dots,
    step_sums,
    store,
)

#: A one-pass (shifted) block moment that lost more than log2 of this many bits
#: to cancellation is recomputed with two passes.
CANCELLATION_LIMIT = 1024.0
#: The limit where the terms are float32 (16-bit data, channels-last steps of
#: four rows, summed into float64): each step's sum of squares carries a few
#: float32 roundings, so with 4 bits cancelled the block's ``m2`` keeps a
#: relative error of about ``16 * 3 * 2**-24`` (3e-6), far below a float16 ulp
#: (4.9e-4).
CANCELLATION_LIMIT_FLOAT32 = 16.0


#: The range of ``sum(x**2)`` over a block in which :func:`_moments` takes the bfloat16
#: dot-product sums (:func:`.storage.dot_sums`): the instruction flushes subnormals, and
#: above it no square can overflow float32.
DOT_SUMS_MIN = 2.0**-100
DOT_SUMS_MAX = 2.0**100


def cancellation_limit(like):
    """Return the cancellation limit for sums in the accumulation type of ``like``'s storage."""
    if like.dtype in (BFLOAT16_VIEW, FLOAT16_VIEW):
        return CANCELLATION_LIMIT_FLOAT32
    return CANCELLATION_LIMIT


@overload(cancellation_limit)
def _ol_cancellation_limit(like):
    limit = CANCELLATION_LIMIT_FLOAT32 if _is_16bit(like) else CANCELLATION_LIMIT
    return lambda like: limit


#: Whether block moments of ``like``'s storage are summed in steps (:func:`.storage.step_sums`):
#: for 16-bit data, whose steps run in float32; float32 and float64 data widen every element
#: to float64.  :func:`.storage.is_16bit` itself, a compile-time constant in compiled code.
in_steps = is_16bit


# ---------------------------------------------------------------------------
# Moments and their merge
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
def merge_rank_moments(counts, means, m2s, mean, m2):
    """Merge per-rank moments ``(counts[r], means[r], m2s[r])`` in rank order into ``mean``, ``m2``.

    ``means`` and ``m2s`` are (R, C) float64; a rank with count 0 is skipped.
    Each channel is the chain of :func:`_merge` from rank 0 on, so every
    process that merges the same numbers gets the same bits.
    """
    for c in range(mean.size):
        count = 0.0
        channel_mean = 0.0
        channel_m2 = 0.0
        for r in range(counts.size):
            if counts[r] > 0.0:
                count, channel_mean, channel_m2 = _merge(
                    count, channel_mean, channel_m2, counts[r], means[r, c], m2s[r, c]
                )
        mean[c] = channel_mean
        m2[c] = channel_m2


@exact_helper
def update_running_stats(running_mean, running_var, mean, var, count, factor):
    """Update ``running = (1 - factor) * running + factor * batch`` per channel, in place, in float64.

    The variance stored is the unbiased ``var * (count / (count - 1))``
    (``count > 1``); ``running_mean`` and ``running_var`` are storage arrays
    (:mod:`.storage`): each value is rounded once to float32 or float64, and
    a 16-bit one then to 16 bits, as every 16-bit store (and torch's
    ``c10::Half`` from a double).  Compiled without fastmath: the same
    operations, rounded as NumPy and torch round them.
    """
    _update_running(running_mean, running_var, mean, var, False, 0.0, count, factor)


@exact_helper
def update_running_from_rstd(running_mean, running_var, mean, rstd, eps, count, factor):
    """:func:`update_running_stats` with the batch's biased variance recovered from ``rstd``.

    ``var = max(1 / rstd**2 - eps, 0)``, rounded as NumPy's
    ``np.maximum(1.0 / np.square(rstd) - eps, 0.0)`` (NaN and ``-0.0`` kept):
    one compiled call where the NumPy operations take four.
    """
    _update_running(running_mean, running_var, mean, rstd, True, eps, count, factor)


@exact_helper
def _update_running(running_mean, running_var, mean, moment, from_rstd, eps, count, factor):
    """Run the loop of :func:`update_running_stats`; ``moment`` is ``rstd`` if ``from_rstd``, else ``var``."""
    correction = count / (count - 1.0)
    keep = 1.0 - factor
    for c in range(mean.size):
        var = moment[c]
        if from_rstd:
            var = 1.0 / (var * var) - eps
            if not (var >= 0.0 or var != var):  # np.maximum(var, 0.0)
                var = 0.0
        store(running_mean, c, keep * np.float64(load(running_mean, c)) + factor * mean[c])
        store(running_var, c, keep * np.float64(load(running_var, c)) + factor * (var * correction))


@glue
def _finish(count, mean, m2, flags, eps):
    """Return the ``(mean, rstd)`` used to normalize a group (``(mean, m2)`` with ``MOMENTS``).

    ``rstd = 1 / sqrt(m2 / count + eps)``: with ``CENTERED`` ``m2`` is the sum
    of squared deviations (biased variance ``m2 / count``); without it
    (RMSNorm) the moments are ``(0, sum(x**2))``, so this is
    ``1 / sqrt(mean(x**2) + eps)`` and the mean used is 0.  The statistics
    pass of a BatchNorm split across processes sets ``MOMENTS``: its moments
    are merged with other processes' before any ``rstd`` is taken.
    """
    if flags & MOMENTS:
        return mean, m2
    return mean, 1.0 / np.sqrt(m2 / count + eps)


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
    ``(0, sum(x**2))``: no ``inf - inf`` when ``x`` holds an inf.  16-bit
    data sums in steps (:func:`.storage.step_sums`): four vectors'
    deviations and squares added in float32, the steps in float64, and the
    two-pass fallback from 4 lost bits (:func:`cancellation_limit`).  Whole
    blocks summed in float32 had left float32 ``dweight`` farther from the
    reference than torch's (docs/perf-notes/16-bit-float32-accumulation.md).
    bfloat16 data on a CPU with AVX512-BF16 first takes the plain sums by
    dot-product instructions (:func:`.storage.dot_sums`, 2x-3x faster), and
    keeps them when ``sum(x**2)`` lies in ``[DOT_SUMS_MIN, DOT_SUMS_MAX)`` and,
    centered, lost at most 4 bits to the mean, as the steps' limit; any other
    block (NaN, inf, huge or tiny values, a constant block) takes the steps
    (docs/perf-notes/16-bit-float32-accumulation.md).
    """
    xs = x[off : off + count]
    if in_steps(xs):
        total, sum_sq = dot_sums(xs, 0, count)
        if DOT_SUMS_MIN <= sum_sq < DOT_SUMS_MAX:
            if not centered:
                return 0.0, sum_sq
            m2 = sum_sq - total * total / count
            if sum_sq <= cancellation_limit(xs) * m2:
                return total / count, m2
    if not centered:
        if in_steps(xs):
            return 0.0, step_sums(xs, 0, count, 0.0)[1]
        sum_sq = 0.0
        for i in range(count):
            sum_sq += load(xs, i) * np.float64(load(xs, i))
        return 0.0, sum_sq
    shift = np.float64(load(xs, 0))
    if in_steps(xs):
        sum_dev, sum_sq = step_sums(xs, 0, count, shift)
        return _shifted_moments(xs, count, shift, sum_dev, sum_sq)
    sum_dev = 0.0
    sum_sq = 0.0
    for i in range(count):
        dev = load(xs, i) - shift
        sum_dev += dev
        sum_sq += dev * dev
    return _shifted_moments(xs, count, shift, sum_dev, sum_sq)


@glue
def _shifted_moments(xs, count, shift, sum_dev, sum_sq):
    """Finish :func:`_moments` from the sums of ``xs - shift`` and of its squares."""
    m2 = sum_sq - sum_dev * sum_dev / count
    if sum_sq > cancellation_limit(xs) * m2:
        return _moments_two_pass(xs, count)
    return shift + sum_dev / count, m2


@helper
def _moments_two_pass(xs, count):
    """Corrected two-pass moments (Chan, Golub & LeVeque 1983, eq. 1.7) of ``xs``."""
    total = 0.0
    for i in range(count):
        total += np.float64(load(xs, i))  # float64 in pure Python too (NumPy 2 keeps 0.0 + float32 float32)
    mean = total / count
    sum_dev = 0.0
    m2 = 0.0
    for i in range(count):
        dev = load(xs, i) - mean
        sum_dev += dev
        m2 += dev * dev
    return mean + sum_dev / count, m2 - sum_dev * sum_dev / count


# ---------------------------------------------------------------------------
# Backward dot products and dx coefficients
# ---------------------------------------------------------------------------


@glue
def _dots(dy, x, off, count, mean):
    """``sum(dy)`` and ``sum(dy * (x - mean))`` over ``[off, off+count)``, in float64.

    16-bit data sums in steps (:func:`.storage.step_dots`: four vectors'
    products in float32, the steps in float64) about ``mean_hi``, the mean in
    float32, and takes ``mean_lo * sum(dy)`` off at the end
    (:func:`_dots_finish`).  A channels-first plane's sums are its
    ``dweight`` / ``dbias`` terms: whole blocks summed in float32 had left
    them 6 to 23 float32 ulps from the reference, farther than torch's
    (docs/perf-notes/16-bit-float32-accumulation.md).
    """
    if in_steps(x):
        mean_hi = acc(x, mean)
        sum_dy, sum_dy_xc = step_dots(dy, x, off, count, mean_hi)
        return _dots_finish(sum_dy, sum_dy_xc, mean, mean_hi)
    xs = x[off : off + count]
    dys = dy[off : off + count]
    sum_dy = 0.0
    sum_dy_xc = 0.0
    for i in range(count):
        sum_dy += np.float64(load(dys, i))  # as in _moments_two_pass
        sum_dy_xc += load(dys, i) * (load(xs, i) - mean)
    return sum_dy, sum_dy_xc


@glue
def _dots_weighted(dy, x, weight, off, count, s0, mean):
    """:func:`_dots` of ``g = dy * weight[s0 + i]`` (per-element affine), for ``dx`` only.

    Summed in the accumulation type of ``x``'s storage (:func:`.storage.acc`)
    from ``x - mean_hi``, ``mean_hi`` the mean in that type; the rest of the
    mean, ``mean_lo`` (0 in float64), is taken off the sums once at the end
    (:func:`_dots_finish`).
    """
    xs = x[off : off + count]
    dys = dy[off : off + count]
    ws = weight[s0 : s0 + count]
    mean_hi = acc(xs, mean)
    sum_g = acc(xs, 0.0)
    sum_g_xc = acc(xs, 0.0)
    for i in range(count):
        g = acc(xs, load(dys, i) * ws[i])
        sum_g += g
        sum_g_xc += g * (acc(xs, load(xs, i)) - mean_hi)
    return _dots_finish(sum_g, sum_g_xc, mean, mean_hi)


@glue
def _dots_finish(sum_g, sum_g_xc, mean, mean_hi):
    """Return the float64 ``(sum(g), sum(g * (x - mean)))`` from sums taken about ``mean_hi``."""
    sum_g = np.float64(sum_g)
    sum_g_xc = np.float64(sum_g_xc)
    mean_lo = mean - np.float64(mean_hi)
    if mean_lo != 0.0 and np.isfinite(mean_lo):  # only ever when summed in float32
        sum_g_xc -= mean_lo * sum_g
    return sum_g, sum_g_xc


@glue
def _finish_channel_dots_loop(sum_dy, sum_dy_xc, mean, like):
    """Apply :func:`_dots_finish` to each channel's sums, taken about ``acc(like, mean[c])``."""
    for c in range(mean.shape[0]):
        sum_dy[c], sum_dy_xc[c] = _dots_finish(sum_dy[c], sum_dy_xc[c], mean[c], acc(like, mean[c]))


def finish_channel_dots(sum_dy, sum_dy_xc, mean, like):
    """Apply :func:`_dots_finish` to per-channel sums taken about ``acc(like, mean[c])``, in place.

    A no-op unless ``like``'s storage is 16-bit: only float32 sums are taken
    about a rounded mean (compiled away for float32/float64 data).
    """
    if like.dtype in (BFLOAT16_VIEW, FLOAT16_VIEW):
        _finish_channel_dots_loop(sum_dy, sum_dy_xc, mean, like)


@overload(finish_channel_dots)
def _ol_finish_channel_dots(sum_dy, sum_dy_xc, mean, like):
    if not _is_16bit(like):
        return lambda sum_dy, sum_dy_xc, mean, like: None
    return lambda sum_dy, sum_dy_xc, mean, like: _finish_channel_dots_loop(sum_dy, sum_dy_xc, mean, like)


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
def _dx_coefs_of_sums(w, sum_dy, sum_dy_xhat, rstd, m):
    """:func:`_dx_coefs` of a BatchNorm channel from its sums over a batch split across processes.

    ``sum_dy`` and ``sum_dy_xhat = sum(dy * xhat)`` span the global batch of
    ``m`` elements; with ``g = w * dy``, ``sum(g * (x - mean)) = w *
    sum_dy_xhat / rstd``, so ``kx = rstd^2 * w * sum_dy_xhat / m`` and
    ``k0 = rstd * w * sum_dy / m``.
    """
    return rstd * rstd * w * sum_dy_xhat / m, rstd * w * sum_dy / m


# ---------------------------------------------------------------------------
# Group geometry of the (N, G, C/G, S) view
# ---------------------------------------------------------------------------


@glue
def _group(spec, k):
    """Return ``(first sample, samples, first channel, channels)`` of group ``k``."""
    if spec.groups == 1:  # no division (LayerNorm / RMSNorm rows)
        if spec.flags & BATCH:
            return 0, spec.batch, 0, spec.channels
        return np.int64(k), 1, 0, spec.channels
    if spec.groups == spec.channels and spec.flags & BATCH:
        # BatchNorm: group k is channel k (no division: a BatchNorm task merges or
        # finishes one group per channel)
        return 0, spec.batch, np.int64(k), 1
    d = spec.channels // spec.groups
    c0 = (k % spec.groups) * d
    if spec.flags & BATCH:
        return 0, spec.batch, c0, d
    return k // spec.groups, 1, c0, d


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
def _block_plane(blk, nblocks):
    """``(plane, block)`` of flat block index ``blk`` (no division for one block per plane)."""
    if nblocks == 1:
        return np.int64(blk), 0
    plane = np.int64(blk) // nblocks
    return plane, np.int64(blk) - plane * nblocks
