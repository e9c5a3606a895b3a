"""What a kernel call computes (:class:`KernelSpec`) and how it runs (:class:`Schedule`).

:func:`plan_schedule` is the one place where a schedule is chosen: the Python
API calls it once per plan and call variant (:mod:`fastnorm.core`), the C ABI's
cfuncs call the same compiled function (:mod:`fastnorm.capi._cfuncs`), and
the kernels only read the result.  Every choice depends on the shape, the
dtype, the thread count and the call's variant (which parameters are given,
whether the output is the input), never on the data; the thread count only
picks between schedules that do the same arithmetic in the same order, so
results are bitwise the same for any thread count.

Each tunable constant below states its rule; the measurements behind it are
in ``docs/perf-notes/``.
"""

from __future__ import annotations

import platform
from collections import namedtuple

from .._config import glue, helper
from .epilogue import IDENTITY, LEAKY_RELU, RELU

__all__ = [
    "BACKWARD", "BACKWARD_APPLY", "BACKWARD_REDUCE", "BATCH", "BATCH_STATS", "BLOCK", "CENTERED",
    "CHANNELS_LAST", "CHANNELS_LAST_VIEW", "CHANNEL_TILE_BYTES", "CL_CHUNK_BYTES", "CL_CONSECUTIVE_ROW_BYTES",
    "CL_FUSED_TILE_ROW_BYTES", "CL_MIN_ROWS", "CL_TILE_BYTES", "CL_TILE_CACHE_BYTES", "CL_TILE_MAX_CHANNELS",
    "CL_TILE_MAX_CHANNELS_CACHED", "COLUMN_TILE", "COLUMN_TILES", "ELEMENTWISE", "FORWARD", "FUSED",
    "FUSE_MIN_GROUPS", "FUSE_SETS_PER_THREAD", "INFERENCE", "MIN_CHANNEL_TILES", "MOMENTS", "ONE_BLOCK",
    "PER_ELEMENT", "PIPELINED", "PIPELINE_HOST", "PIPELINE_MAX_ROW_BYTES", "PIPELINE_MIN_ITEMSIZE",
    "PIPELINE_MIN_WIDTH",
    "PLANES", "ROWS", "ROW_CHUNK", "ROW_CHUNKS", "ROW_TASKS", "SERIAL_MAX_ELEMENTS", "SKIP_BIAS_BACKWARD",
    "SKIP_FORWARD", "SPEC_FIELDS", "SPLIT", "STREAM_MIN_BYTES", "TILE_CACHE_BYTES", "KernelSpec", "Schedule",
    "num_stats", "plan_schedule", "schedule_of", "share", "task_count",
]  # fmt: skip

# ---------------------------------------------------------------------------
# What to compute
# ---------------------------------------------------------------------------

#: Statistics are shared by all samples of the batch (BatchNorm).
BATCH = 1
#: Subtract the mean (all norms but RMSNorm).
CENTERED = 2
#: weight/bias are indexed by the position in the group (LayerNorm, RMSNorm).
PER_ELEMENT = 4
#: The buffer is (N, S, C) instead of (N, C, S).
CHANNELS_LAST = 8
#: The statistics pass returns each group's ``(mean, m2)`` (sum of squared
#: deviations) instead of ``(mean, rstd)``: a BatchNorm split across processes.
MOMENTS = 16

KernelSpec = namedtuple(
    "KernelSpec",
    ["batch", "channels", "spatial", "groups", "flags", "eps", "activation", "slope"],
    defaults=(0, 0.0),
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
    Bitwise or of ``BATCH``, ``CENTERED``, ``PER_ELEMENT``, ``CHANNELS_LAST``
    and ``MOMENTS``.
eps : float
    Added to the variance (mean square for RMSNorm) before the square root.
activation : int
    The epilogue's activation code (:data:`~.epilogue.ACTIVATIONS`; 0, the
    default, is none).
slope : float
    The negative slope of ``leaky_relu`` (unused by the other activations).
"""

# ---------------------------------------------------------------------------
# How to run it
# ---------------------------------------------------------------------------

#: Passes.  The pre-norm skip add (LayerNorm / RMSNorm rows only) has two more:
#: SKIP_FORWARD, the forward pass that first writes ``h = x + skip (+ skip_bias)``, runs the
#: FORWARD schedule; SKIP_BIAS_BACKWARD, the skip bias's gradient after the backward pass,
#: runs the BACKWARD schedule.
FORWARD = 0
INFERENCE = 1
BACKWARD = 2
SKIP_FORWARD = 3
SKIP_BIAS_BACKWARD = 4
#: BatchNorm split around a collective (planes and channels-last views): BATCH_STATS, the
#: local moments (the FORWARD schedule); BACKWARD_REDUCE, the local ``sum(dy)`` and
#: ``sum(dy * xhat)``, and BACKWARD_APPLY, ``dx`` from global sums (the BACKWARD schedule).
BATCH_STATS = 5
BACKWARD_REDUCE = 6
BACKWARD_APPLY = 7

#: Data views: LayerNorm / RMSNorm rows (R, K); channels-first planes (N, C, S); (N, S, C).
ROWS = 0
PLANES = 1
CHANNELS_LAST_VIEW = 2

#: Strategies.  SPLIT: parallel phases (reduce blocks, merge per group, an
#: elementwise pass over blocks), so that a few huge groups use every core.
#: FUSED: one task per group or statistics set, which reduces it and then runs
#: the elementwise pass while it is in cache.  ONE_BLOCK: FUSED for groups of
#: one block (moments in one pass, no workspace).  PIPELINED: ONE_BLOCK rows
#: that normalize a row while summing the next one's moments.  ELEMENTWISE:
#: the inference pass (no reduction).  ROW_CHUNKS / COLUMN_TILES: the row
#: backward for many rows (tasks of whole rows with float64 parameter-gradient
#: partials) or few long rows (dot products per block, then column tiles).
SPLIT = 0
FUSED = 1
ONE_BLOCK = 2
PIPELINED = 3
ELEMENTWISE = 4
ROW_CHUNKS = 5
COLUMN_TILES = 6

Schedule = namedtuple(
    "Schedule",
    "view strategy parallel nblocks block tile_rows chunk quarters stream shares",
)
Schedule.__doc__ = """How a kernel call runs; chosen by :func:`plan_schedule` only.

Parameters
----------
view : int
    ``ROWS``, ``PLANES`` or ``CHANNELS_LAST_VIEW``: which kernel family runs.
strategy : int
    ``SPLIT``, ``FUSED``, ``ONE_BLOCK``, ``PIPELINED``, ``ELEMENTWISE``,
    ``ROW_CHUNKS`` or ``COLUMN_TILES``.
parallel : int
    1 for the multithreaded build, 0 for the serial one.
nblocks : int
    Reduction blocks per plane (row; sample for channels-last).
block : int
    Elements per block (``BLOCK``), or rows per channels-last block.
tile_rows : int
    Channels-last elementwise passes: rows per step (1 elsewhere; the fused
    backward's ``dx`` takes one row per step).
chunk : int
    Rows per task of the ``PIPELINED`` and ``ROW_CHUNKS`` row schedules; groups per
    task of the ``FUSED`` channels-first passes (a tile of channels for BatchNorm,
    else 1); 0 elsewhere.
quarters : int
    Channels-last moments: 1 to take the four rows of a step from the
    block's quarters, 0 for four consecutive rows (the backward dot products
    always take quarters).
stream : int
    1 to store the normalized output with non-temporal stores where the pass
    has no epilogue (``STREAM_MIN_BYTES``), else 0.
shares : int
    Parallel ``SPLIT`` training passes below ``STREAM_MIN_BYTES`` (planes and
    channels-last): the number of contiguous shares of the block list, one per
    thread; the first pass walks each share forwards and the second backwards,
    so that a thread first re-reads the blocks it read last
    (docs/perf-notes/two-pass-reverse-order.md).  0: one block per task, in
    order (every other schedule).
"""

#: Number of KernelSpec fields at the head of a kernel's flat parameter tuple.
SPEC_FIELDS = len(KernelSpec._fields)

#: Elements per reduction block.  Fixed, so results never depend on threads
#: (docs/perf-notes/reduction-blocks-and-determinism.md).
BLOCK = 4096
#: Run one fused task per group from this many groups on; with fewer, split
#: every pass so that a few huge groups still use every core
#: (docs/perf-notes/fused-vs-split-schedules.md).
FUSE_MIN_GROUPS = 32
#: Channels-last training passes with 2 .. FUSE_MIN_GROUPS-1 statistics sets
#: also fuse from this many sets per thread on (same arithmetic, same order).
FUSE_SETS_PER_THREAD = 4
#: BatchNorm's fused channels-first training passes: bytes of each sample's run of
#: consecutive planes in a task's tile of channels, ...
CHANNEL_TILE_BYTES = 4096
#: ... at least this many tiles, ...
MIN_CHANNEL_TILES = 8
#: ... and at most this many bytes of a tile's planes over the batch (one tensor); a
#: larger tile runs the split passes (docs/perf-notes/fused-vs-split-schedules.md).
TILE_CACHE_BYTES = 512 * 1024
#: Fewest rows of a channels-last reduction block: every block ends with a
#: per-channel finish that costs about 16 rows of accumulation
#: (docs/perf-notes/channels-last-row-streams.md).
CL_MIN_ROWS = 256
#: Longest channels-last row, in bytes, whose moments take four consecutive
#: rows per step; longer rows, and the backward dot products, take one row
#: from each quarter of the block (docs/perf-notes/channels-last-row-streams.md).
CL_CONSECUTIVE_ROW_BYTES = 256
#: BatchNorm's channels-last elementwise passes over at most this many
#: channels step over CL_TILE_BYTES of rows at once, with the coefficient
#: vectors repeated (docs/perf-notes/channels-last-small-channel-tiles.md), ...
CL_TILE_MAX_CHANNELS = 32
#: ... and over at most this many while the tensor is smaller than
#: CL_TILE_CACHE_BYTES: a pass from the cache is bound by each row's loop set-up,
#: one from memory is not.
CL_TILE_MAX_CHANNELS_CACHED = 64
CL_TILE_CACHE_BYTES = 16 * 2**20
#: The fused channels-last forward (one task per statistics set) tiles the normalize
#: of rows of at most this many bytes, each task its own set's vectors: 16-bit rows
#: of 64 channels are bound by the row loop's set-up, float32 rows of 64 are not.
CL_FUSED_TILE_ROW_BYTES = 128
#: Bytes of ``x`` per step of those passes.
CL_TILE_BYTES = 1024
#: Channels-last passes over rows longer than this many bytes of one per-channel
#: vector walk the rows in chunks of channels of that size, every row of a block per
#: chunk, so that the chunk's vectors stay in L1 (the same arithmetic per element, in
#: the same order: the same bits; docs/perf-notes/channels-last-channel-chunks.md).
CL_CHUNK_BYTES = 4096
#: Columns per task of the few-long-rows parameter-gradient reduction.
COLUMN_TILE = 2048
#: Fewest rows per ROW_CHUNKS task; that schedule runs from 4 * ROW_CHUNK rows on.
ROW_CHUNK = 32
#: Most tasks of the ROW_CHUNKS and PIPELINED schedules: chunks grow so that
#: there are at most this many (docs/perf-notes/layernorm-backward-partials.md).
ROW_TASKS = 32
#: Shortest and longest (in bytes) LayerNorm row of the PIPELINED forward
#: (docs/perf-notes/layernorm-pipelined-forward.md).
PIPELINE_MIN_WIDTH = 256
PIPELINE_MAX_ROW_BYTES = 4096
#: Bytes per element from which the forward pipelines: 16-bit rows run the two loops,
#: 0.73-0.88x the pipelined time (docs/perf-notes/layernorm-pipelined-forward.md).
PIPELINE_MIN_ITEMSIZE = 4


def _host_has_avx512():
    """Whether this host has AVX-512 (``avx512f``), read from LLVM's host features."""
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f"))


#: Whether the PIPELINED forward may run on this host: it gives the two loops' bits where
#: LLVM vectorizes both loops' float64 sums at AVX-512's 8 lanes; on an AVX2 host (4
#: lanes) their orders differ, and an in-place call (two loops) would not match an
#: out-of-place one (docs/perf-notes/layernorm-pipelined-forward.md).
PIPELINE_HOST = _host_has_avx512()
#: Forward and inference passes whose float32 or float64 output has at least this many
#: bytes store it with non-temporal stores (x86-64 only), which skip reading each line
#: before writing it; smaller outputs stay in the cache for the next layer
#: (docs/perf-notes/streaming-stores.md).
STREAM_MIN_BYTES = 16 * 2**20 if platform.machine() in ("x86_64", "AMD64") else 2**62
#: Tensors of at most this many elements run the serial build: below it a
#: parallel launch costs more than the work (docs/perf-notes/small-call-overhead.md).
SERIAL_MAX_ELEMENTS = 16384


@glue
def share(t, shares, count):
    """Return ``(lo, hi)``: items of contiguous share ``t`` of ``shares`` over ``count`` items."""
    return t * count // shares, (t + 1) * count // shares


@glue
def task_count(schedule, blocks):
    """Tasks of a split pass over ``blocks`` blocks: ``schedule.shares``, or one per block without shares.

    Task ``t`` runs the blocks of :func:`share` ``(t, tasks, blocks)``:
    forwards in a first pass, backwards in a second.
    """
    return schedule.shares if schedule.shares > 0 else blocks


@glue
def num_stats(spec):
    """Return the number of (mean, rstd) pairs a kernel call produces or consumes."""
    sets = 1 if spec.flags & BATCH else spec.batch
    return sets * spec.groups


@helper
def plan_schedule(params, pass_id, num_threads, itemsize, has_weight, has_bias, in_place):
    """Choose the schedule of one kernel call: the only place a schedule is chosen.

    Parameters
    ----------
    params : tuple
        The fields of a :class:`KernelSpec`.
    pass_id : int
        ``FORWARD``, ``INFERENCE`` or ``BACKWARD``.
    num_threads : int
        Threads of the calling thread's parallel regions.
    itemsize : int
        Bytes per element of the data (2, 4 or 8).
    has_weight, has_bias : bool
        Whether the call has a weight and a bias.
    in_place : bool
        Whether the output is the memory of an input (``x``, or the residual).

    Returns
    -------
    tuple
        The fields of a :class:`Schedule`.
    """
    spec = KernelSpec(*params)
    size = spec.batch * spec.channels * spec.spatial
    parallel = 1 if size > SERIAL_MAX_ELEMENTS else 0
    nstats = num_stats(spec)
    stream = 0
    if (pass_id == FORWARD or pass_id == INFERENCE) and size * itemsize >= STREAM_MIN_BYTES and itemsize >= 4:
        stream = 1
    if spec.flags & PER_ELEMENT:
        flags = (has_weight, has_bias, in_place)
        return _rows_schedule(spec, pass_id, parallel, nstats, itemsize, *flags, stream)
    if spec.flags & CHANNELS_LAST:
        return _channels_last_schedule(spec, pass_id, parallel, nstats, num_threads, itemsize, stream)
    nblocks = (spec.spatial + BLOCK - 1) // BLOCK
    strategy = ELEMENTWISE
    tile = 1
    if pass_id != INFERENCE:
        fused = nstats >= FUSE_MIN_GROUPS
        if spec.flags & BATCH:
            # A BatchNorm group is N planes far apart: a fused task takes a tile of
            # channels and walks it sample by sample, so that its reads are runs of
            # CHANNEL_TILE_BYTES; while the tile fits in TILE_CACHE_BYTES its second
            # pass reads the cache (docs/perf-notes/fused-vs-split-schedules.md).
            plane_bytes = spec.spatial * itemsize
            tile = max(1, min(CHANNEL_TILE_BYTES // plane_bytes, spec.channels // MIN_CHANNEL_TILES))
            fused = fused and spec.batch * tile * plane_bytes <= TILE_CACHE_BYTES
        strategy = FUSED if fused else SPLIT
        if (
            fused
            and pass_id == FORWARD
            and not spec.flags & BATCH
            and (spec.channels // spec.groups) * spec.spatial <= BLOCK
        ):
            strategy = ONE_BLOCK
    blocks = spec.batch * spec.channels * nblocks
    shares = _shares(strategy, parallel, num_threads, blocks, size * itemsize)
    return (
        PLANES,
        strategy,
        parallel,
        nblocks,
        BLOCK,
        1,
        tile if strategy == FUSED else 0,
        0,
        stream,
        shares,
    )


@glue
def _shares(strategy, parallel, num_threads, blocks, nbytes):
    """``Schedule.shares``: a share of blocks per thread for parallel split passes below ``STREAM_MIN_BYTES``.

    The second pass then first re-reads what its thread read last, while the
    tail of the first pass can still be in cache; results do not depend on it
    (docs/perf-notes/two-pass-reverse-order.md).
    """
    if strategy == SPLIT and parallel and nbytes < STREAM_MIN_BYTES:
        return min(num_threads, blocks)
    return 0


@helper
def _rows_schedule(spec, pass_id, parallel, nstats, itemsize, has_weight, has_bias, in_place, stream):
    """:func:`plan_schedule` of LayerNorm / RMSNorm rows."""
    width = spec.spatial
    nblocks = (width + BLOCK - 1) // BLOCK
    strategy = ELEMENTWISE
    chunk = 0
    if pass_id == FORWARD:
        strategy = SPLIT
        if nstats >= FUSE_MIN_GROUPS:
            strategy = ONE_BLOCK if width <= BLOCK else FUSED
        # With y on x (or on the residual), LLVM's runtime overlap check would
        # send the pipelined loop to its scalar version, whose sums run in
        # another order.
        # The pipelined loop applies a rectifier at most (docs/perf-notes/fused-epilogue.md).
        pipelined = spec.flags & CENTERED and has_weight and has_bias and not in_place
        pipelined = pipelined and spec.activation in (IDENTITY, RELU, LEAKY_RELU)
        if strategy == ONE_BLOCK and pipelined and PIPELINE_HOST and PIPELINE_MIN_WIDTH <= width:
            if PIPELINE_MIN_ITEMSIZE <= itemsize and width * itemsize <= PIPELINE_MAX_ROW_BYTES:
                strategy = PIPELINED
                chunk = (nstats + ROW_TASKS - 1) // ROW_TASKS
    elif pass_id == BACKWARD:
        strategy = COLUMN_TILES
        if nstats >= 4 * ROW_CHUNK:
            strategy = ROW_CHUNKS
            chunk = max(ROW_CHUNK, (nstats + ROW_TASKS - 1) // ROW_TASKS)
    # The pipelined forward normalizes a row in the loop that sums the next one: not streamed.
    stream = stream if strategy != PIPELINED else 0
    return (ROWS, strategy, parallel, nblocks, BLOCK, 1, chunk, 0, stream, 0)


@helper
def _channels_last_schedule(spec, pass_id, parallel, nstats, num_threads, itemsize, stream):
    """:func:`plan_schedule` of channels-last (N, S, C) buffers."""
    rows_per_block = max(BLOCK // spec.channels, CL_MIN_ROWS)
    nblocks = (spec.spatial + rows_per_block - 1) // rows_per_block
    sets = nstats // spec.groups
    strategy = ELEMENTWISE
    if pass_id != INFERENCE:
        fused = sets >= FUSE_MIN_GROUPS
        if parallel and 1 < sets < FUSE_MIN_GROUPS and sets >= FUSE_SETS_PER_THREAD * num_threads:
            fused = True  # a thread's samples are still in L3 when read again
        if sets > 1 and nblocks == 1:
            # one block per set: the split passes would have no more tasks than the
            # fused one, and two more parallel regions and a serial set-up between them
            # (docs/perf-notes/fused-vs-split-schedules.md)
            fused = True
        strategy = FUSED if fused else SPLIT
    nbytes = spec.batch * spec.spatial * spec.channels * itemsize
    tile_channels = CL_TILE_MAX_CHANNELS_CACHED if nbytes < CL_TILE_CACHE_BYTES else CL_TILE_MAX_CHANNELS
    if strategy == FUSED:
        tiled = pass_id == FORWARD and spec.channels * itemsize <= CL_FUSED_TILE_ROW_BYTES
    else:
        tiled = sets <= 1 and spec.channels <= tile_channels
    tile_rows = max(1, CL_TILE_BYTES // itemsize // spec.channels) if tiled else 1
    quarters = 1 if spec.channels * itemsize > CL_CONSECUTIVE_ROW_BYTES else 0
    # The fused forward normalizes each set's blocks in its own task, without streaming.
    stream = stream if strategy != FUSED else 0
    shares = _shares(strategy, parallel, num_threads, spec.batch * nblocks, nbytes)
    layout = (CHANNELS_LAST_VIEW, strategy, parallel, nblocks, rows_per_block, tile_rows, 0, quarters)
    return (*layout, stream, shares)


def schedule_of(params):
    """Return the :class:`Schedule` at the tail of a kernel's flat parameter tuple."""
    return Schedule(*params[SPEC_FIELDS:])
