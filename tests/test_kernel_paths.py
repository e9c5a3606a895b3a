"""Every internal code path of the kernels, against the float64 reference.

The kernels pick a strategy from the shape alone: serial build (at most
``SERIAL_MAX_ELEMENTS``) or parallel; fused per group (>= ``FUSE_MIN_GROUPS``
groups) or split into block / group / block phases; one or many blocks per
plane (``BLOCK`` elements channels-first, ``max(BLOCK // C, CL_MIN_ROWS)``
rows channels-last); channels-last moments over rows longer than
``CL_CONSECUTIVE_ROW_BYTES``, four rows per step from the quarters of a block
(as the backward dot products always), with the rows left over; LayerNorm's
row-chunk parameter gradients (>= ``4 * ROW_CHUNK`` rows; chunks longer than
``ROW_CHUNK`` beyond ``ROW_CHUNK * ROW_TASKS`` rows) or column tiles;
LayerNorm's software-pipelined training forward (rows of
``PIPELINE_MIN_WIDTH`` elements to ``PIPELINE_MAX_ROW_BYTES`` bytes, with
weight and bias); and the one-pass block moments' fallback to two passes when
the shift is far from the mean.  Each case below is built to land on one of
them (the test asserts which), then checked forward and backward, including
in-place outputs.
"""

from __future__ import annotations

import naive
import numba
import numpy as np
import pytest

import fastnorm
from fastnorm import _kernels as K
from fastnorm.core import _plan, _training_params

CASES = {
    # name: (kind, shape, groups/normalized_ndim, channels_last)
    "bn-split-cf-many-channels": ("batch_norm", (3, 40, 5, 7), None, False),
    "bn-split-cf-multiblock": ("batch_norm", (2, 3, 70, 70), None, False),
    "bn-split-cl": ("batch_norm", (4, 9, 9, 6), None, True),
    "bn-cl-multiblock": ("batch_norm", (2, 70, 70, 3), None, True),
    "in-fused-cf": ("instance_norm", (4, 10, 33), None, False),
    "in-split-cf-multiblock": ("instance_norm", (1, 2, 9000), None, False),
    "in-fused-cl": ("instance_norm", (40, 17, 3), None, True),
    "gn-split-cl-multiblock": ("group_norm", (2, 5000, 6), 3, True),
    # rows longer than CL_CONSECUTIVE_ROW_BYTES: moments over four rows per step, one
    # from each quarter of a block; blocks of 256 and 44 rows (quarters of 64 and 11)
    "gn-split-cl-wide-quarters-multiblock": ("group_norm", (2, 300, 512), 32, True),
    # blocks of 256 and 6 rows: quarters of 1 row and 2 rows left over
    "in-split-cl-quarters-multiblock": ("instance_norm", (2, 262, 136), None, True),
    # blocks of 256 and 3 rows: a block too short for quarters (every row left over)
    "bn-cl-quarters-multiblock": ("batch_norm", (3, 259, 144), None, True),
    # a fused group of 2 planes of 11: one block for the whole group, no merge
    "gn-fused-cf-groupblock": ("group_norm", (9, 8, 11), 4, False),
    # a fused group of 2 planes of 2500 (5000 > BLOCK): one block per plane, merged
    "gn-fused-cf-planeblocks": ("group_norm", (1, 64, 50, 50), 32, False),
    "ln-rowchunk": ("layer_norm", (130, 33), 1, False),
    "ln-rowchunk-multiblock": ("layer_norm", (129, 4100), 1, False),
    # > ROW_CHUNK * ROW_TASKS rows: chunks of 35 rows, a last chunk of 15
    "ln-rowchunk-longchunks": ("layer_norm", (1100, 20), 1, False),
    "ln-columns-fused": ("layer_norm", (40, 70), 1, False),
    # 70 rows in tasks of 3 (ROW_TASKS): pipelined tasks of 3 rows and a last task of 1
    "ln-pipelined-fused": ("layer_norm", (70, 300), 1, False),
    "ln-pipelined-fused-rowchunk": ("layer_norm", (200, 256), 1, False),
    "ln-columns-split-multiblock": ("layer_norm", (3, 9001), 1, False),
    "rms-rowchunk": ("rms_norm", (131, 20), 1, False),
    "rms-columns-split-multiblock": ("rms_norm", (5, 5000), 1, False),
}


def _spec(kind, arg, channels_last):
    if kind == "batch_norm":
        return fastnorm.NormSpec.batch_norm(channels_last=channels_last)
    if kind == "instance_norm":
        return fastnorm.NormSpec.instance_norm(channels_last=channels_last)
    if kind == "group_norm":
        return fastnorm.NormSpec.group_norm(arg, channels_last=channels_last)
    if kind == "layer_norm":
        return fastnorm.NormSpec.layer_norm(arg)
    return fastnorm.NormSpec.rms_norm(arg)


def _ref_kwargs(kind, arg, channels_last):
    return {
        "num_groups": arg if kind == "group_norm" else None,
        "normalized_ndim": arg if kind in ("layer_norm", "rms_norm") else None,
        "channels_last": channels_last,
    }


def _data(kind, shape, arg, channels_last, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + 3.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if kind in ("layer_norm", "rms_norm"):
        pshape = shape[len(shape) - arg :]
    else:
        pshape = (shape[-1] if channels_last else shape[1],)
    weight = rng.uniform(0.5, 1.5, pshape).astype(dtype)
    bias = rng.uniform(-1, 1, pshape).astype(dtype) if kind != "rms_norm" else None
    return x, dy, weight, bias


def _path(kspec, itemsize=4):
    """Describe the strategy the kernels take for this geometry (``itemsize``: 4 float32, 8 float64)."""
    nstats = K.num_stats(kspec)
    small = kspec.batch * kspec.channels * kspec.spatial <= K.SERIAL_MAX_ELEMENTS
    if kspec.flags & K.CHANNELS_LAST:
        sets = nstats // kspec.groups
        fused = sets >= K.FUSE_MIN_GROUPS
        rows_per_block = max(K.BLOCK // kspec.channels, K.CL_MIN_ROWS)
        blocks = -(-kspec.spatial // rows_per_block)
    else:
        fused = nstats >= K.FUSE_MIN_GROUPS and not kspec.flags & K.BATCH
        blocks = -(-kspec.spatial // K.BLOCK)
    planes_per_group = kspec.channels // kspec.groups
    groupblock = (
        fused
        and not kspec.flags & K.CHANNELS_LAST
        and planes_per_group > 1
        and planes_per_group * kspec.spatial <= K.BLOCK
    )
    rowchunk = bool(kspec.flags & K.PER_ELEMENT) and nstats >= 4 * K.ROW_CHUNK
    # LayerNorm with weight and bias (every LayerNorm case here)
    pipelined = (
        bool(kspec.flags & K.PER_ELEMENT and kspec.flags & K.CENTERED)
        and fused
        and blocks == 1
        and K.PIPELINE_MIN_WIDTH <= kspec.spatial
        and kspec.spatial * itemsize <= K.PIPELINE_MAX_ROW_BYTES
    )
    longchunks = rowchunk and nstats > K.ROW_CHUNK * K.ROW_TASKS
    quarters = bool(kspec.flags & K.CHANNELS_LAST) and kspec.channels * itemsize > K.CL_CONSECUTIVE_ROW_BYTES
    return {
        "serial": small,
        "fused": fused,
        "multiblock": blocks > 1,
        "rowchunk": rowchunk,
        "longchunks": longchunks,
        "groupblock": groupblock,
        "pipelined": pipelined,
        "quarters": quarters,
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_lands_on_its_path(name):
    kind, shape, arg, cl = CASES[name]
    spec = _spec(kind, arg, cl)
    path = _path(_plan(np.empty(shape, np.float32), spec, True).kspec)
    assert path["fused"] == ("fused" in name or "rowchunk" in name)
    assert path["multiblock"] == ("multiblock" in name)
    assert path["rowchunk"] == ("rowchunk" in name)
    assert path["longchunks"] == ("longchunks" in name)
    assert path["groupblock"] == ("groupblock" in name)
    assert path["pipelined"] == ("pipelined" in name)
    assert path["quarters"] == ("quarters" in name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_against_reference(name, dtype):
    kind, shape, arg, cl = CASES[name]
    spec = _spec(kind, arg, cl)
    x, dy, weight, bias = _data(kind, shape, arg, cl, dtype)
    kw = _ref_kwargs(kind, arg, cl)
    y, stats = fastnorm.forward(x, spec, weight, bias)
    y_ref, mean_ref, rstd_ref = naive.forward(x, kind, weight, bias, spec.eps, **kw)
    naive.assert_close(y, y_ref, dtype=dtype, k=64, err_msg=f"{name} y")
    naive.assert_close(stats.mean, mean_ref, dtype=np.float64, k=1e4, err_msg=f"{name} mean")
    naive.assert_close(stats.rstd, rstd_ref, dtype=np.float64, k=1e4, err_msg=f"{name} rstd")
    dx, dweight, dbias = fastnorm.backward(dy, x, stats, spec, weight)
    dx_ref, dw_ref, db_ref, scale = naive.backward(dy, x, kind, weight, spec.eps, return_scale=True, **kw)
    naive.assert_close(dx, dx_ref, dtype=dtype, k=256, scale=scale, err_msg=f"{name} dx")
    naive.assert_close(
        dweight, dw_ref, dtype=dtype, k=256, scale=np.abs(dy).sum() / dw_ref.size, err_msg=f"{name} dweight"
    )
    if bias is not None:
        naive.assert_close(
            dbias, db_ref, dtype=dtype, k=256, scale=np.abs(dy).sum() / db_ref.size, err_msg=f"{name} dbias"
        )
    else:
        assert dbias is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 64, 8, 8), (1, 64, 50, 50)])
def test_group_norm_groups_of_channels_far_apart(shape, dtype):
    """A group whose channels sit 1e4 apart: one block per group or per plane, same accuracy."""
    rng = np.random.default_rng(7)
    offsets = np.where(np.arange(shape[1]) % 2 == 0, 1e4, -1e4).reshape(1, -1, 1, 1)
    x = (rng.standard_normal(shape) + offsets).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, shape[1]).astype(dtype)
    spec = fastnorm.NormSpec.group_norm(32)
    y, stats = fastnorm.forward(x, spec, weight)
    y_ref, mean_ref, rstd_ref = naive.forward(x, "group_norm", weight, None, spec.eps, num_groups=32)
    naive.assert_close(y, y_ref, dtype=dtype, k=64, err_msg="y")
    # the group means are near 0 while the data are near +-1e4: errors against the data's size
    scale = float(np.abs(x).max())
    naive.assert_close(stats.mean, mean_ref, dtype=np.float64, k=64, scale=scale, err_msg="mean")
    naive.assert_close(stats.rstd, rstd_ref, dtype=np.float64, k=1e4, err_msg="rstd")
    dx = fastnorm.backward(dy, x, stats, spec, weight)[0]
    dx_ref, _, _, scale = naive.backward(
        dy, x, "group_norm", weight, spec.eps, return_scale=True, num_groups=32
    )
    naive.assert_close(dx, dx_ref, dtype=dtype, k=256, scale=scale, err_msg="dx")


@pytest.mark.parametrize("name", sorted(CASES))
def test_in_place_matches_out_of_place(name):
    """``out=x`` forward and ``out=dy`` / ``out=x`` backward equal the out-of-place results bitwise."""
    kind, shape, arg, cl = CASES[name]
    spec = _spec(kind, arg, cl)
    x, dy, weight, bias = _data(kind, shape, arg, cl, np.float64, seed=1)
    y, stats = fastnorm.forward(x, spec, weight, bias)
    dx, dweight, dbias = fastnorm.backward(dy, x, stats, spec, weight)
    x_inplace = x.copy()
    y2, stats2 = fastnorm.forward(x_inplace, spec, weight, bias, out=x_inplace)
    assert y2 is x_inplace
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(stats2.mean, stats.mean)
    dy_inplace = dy.copy()
    dx2, dweight2, dbias2 = fastnorm.backward(dy_inplace, x, stats, spec, weight, out=dy_inplace)
    assert dx2 is dy_inplace
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dweight2, dweight)
    x_inplace = x.copy()
    dx3, _, _ = fastnorm.backward(dy, x_inplace, stats, spec, weight, out=x_inplace)
    np.testing.assert_array_equal(dx3, dx)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("position", ["first", "middle"])
def test_one_pass_moments_fall_back_on_cancellation(channels_last, position):
    """A block whose first element is far from its mean takes the two-pass fallback.

    The result must match the float64 reference to 1e-12 either way.
    """
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 5000))
    index = 0 if position == "first" else 2500
    x[:, :, index] = 1e8
    spec = fastnorm.NormSpec.instance_norm(channels_last=channels_last)
    if position == "first":
        # Shifted by x[0], the one-pass sums would cancel more than the limit
        # allows, so the two-pass fallback must run for these blocks.
        dev = x[0, 0, : K.BLOCK] - x[0, 0, 0]
        m2 = ((dev - dev.mean()) ** 2).sum()
        assert (dev * dev).sum() > K.CANCELLATION_LIMIT * m2
    xin = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x
    y, stats = fastnorm.forward(xin, spec)
    y_ref, _, rstd_ref = naive.forward(xin, "instance_norm", None, None, 1e-5, channels_last=channels_last)
    naive.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    naive.assert_close(stats.rstd, rstd_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pipelined_layer_norm_rows_are_independent(dtype):
    """The pipelined LayerNorm forward sums row k+1 in the loop that writes row k: nothing leaks between rows.

    Rows whose first element is far from their mean take the two-pass fallback
    from the pipelined sums (rows 1 and 6 are not the first of their task), a
    NaN and an inf poison only their own rows, and every row equals the same
    row normalized alone, bitwise (one row takes the unpipelined path), also in place.
    """
    rows, width = 64, 512
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((rows, width)) * 2.0 + 3.0).astype(dtype)
    weight = rng.uniform(0.5, 1.5, width).astype(dtype)
    bias = rng.uniform(-1, 1, width).astype(dtype)
    x[1, 0] = x[6, 0] = 1e8
    x[9, 7] = np.nan
    x[20, 3] = np.inf
    spec = fastnorm.NormSpec.layer_norm(1)
    assert _path(_plan(x, spec, True).kspec, x.itemsize)["pipelined"]  # float64 rows of 512: 4 KB
    y, stats = fastnorm.forward(x, spec, weight, bias)
    assert np.isnan(y[9]).all() and np.isnan(y[20]).all()
    finite = np.ones(rows, bool)
    finite[[9, 20]] = False
    assert np.isfinite(y[finite]).all()
    y_ref, _, rstd_ref = naive.forward(x[finite], "layer_norm", weight, bias, spec.eps, normalized_ndim=1)
    # rows 1 and 6 hold 1e8 among values near 3: float64 errors of a few hundred ulps, as on one row alone
    naive.assert_close(y[finite], y_ref, dtype=dtype, k=64 if dtype == np.float32 else 4096)
    naive.assert_close(stats.rstd[finite], rstd_ref, dtype=np.float64, k=1e4)
    for k in (0, 1, 2, 6, 9, 20, rows - 1):
        y_row, stats_row = fastnorm.forward(x[k : k + 1], spec, weight, bias)
        np.testing.assert_array_equal(y_row[0], y[k])
        np.testing.assert_array_equal(stats_row.rstd[0], stats.rstd[k])
    x_inplace = x.copy()
    y_inplace, stats_inplace = fastnorm.forward(x_inplace, spec, weight, bias, out=x_inplace)
    np.testing.assert_array_equal(y_inplace, y)
    np.testing.assert_array_equal(stats_inplace.rstd, stats.rstd)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [3, 16, 32])
def test_channels_last_elementwise_steps_of_several_rows_are_bitwise_one_row_steps(channels, dtype):
    """BatchNorm's channels-last normalize and dx over several rows per step equal one row per step.

    Blocks of 301 rows (a partial last step) and of a whole block; the tiled
    coefficients are the per-channel ones repeated (``_cl_tile``).
    """
    rng = np.random.default_rng(3)
    n, spatial = 2, 301 + max(4096 // channels, K.CL_MIN_ROWS)
    x = rng.standard_normal(n * spatial * channels).astype(dtype)
    dy = rng.standard_normal(x.size).astype(dtype)
    spec = K.KernelSpec(n, channels, spatial, channels, K.CENTERED | K.BATCH | K.CHANNELS_LAST, 1e-5)
    rows_per_block = K._cl_rows_per_block(spec)
    nblocks = -(-spatial // rows_per_block)
    tile_rows = K._cl_tile_rows(spec, x, 1)
    assert tile_rows == K.CL_TILE_BYTES // x.itemsize // channels > 1
    assert rows_per_block % tile_rows != 0 or (spatial - rows_per_block) % tile_rows != 0
    for vectors, run in ((3, K._cl_normalize_block), (4, K._cl_dx_block)):
        coef = rng.standard_normal(vectors * channels).astype(dtype)
        tiled = K._cl_tile(coef, vectors, channels, tile_rows)
        assert tiled.size == vectors * channels * tile_rows
        outs = []
        for c, rows in ((coef, 1), (tiled, tile_rows)):
            out = np.full_like(x, np.nan)
            for blk in range(n * nblocks):
                if vectors == 3:
                    run(x, out, c, spec, nblocks, blk, rows)
                else:
                    run(dy, x, out, c, spec, nblocks, blk, rows)
            outs.append(out)
        assert not np.isnan(outs[0]).any()
        assert outs[0].tobytes() == outs[1].tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_builds_agree(dtype):
    """Same source, two builds: results agree to rounding (each shape always uses one)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(2 * 6 * 50).astype(dtype)
    y1, y2 = np.empty_like(x), np.empty_like(x)
    kspec = K.KernelSpec(2, 6, 50, 3, K.CENTERED, 1e-5)
    stats = [np.empty(6) for _ in range(4)]
    empty = np.empty(0, dtype)
    K.forward_train_cf(x, empty, empty, y1, stats[0], stats[1], kspec)
    K.forward_train_cf_serial(x, empty, empty, y2, stats[2], stats[3], kspec)
    naive.assert_close(y2, y1, dtype=dtype, k=4)
    assert K.select("forward_train", kspec) is K.forward_train_cf_serial
    big = K.KernelSpec(64, 64, 64, 32, K.CENTERED | K.CHANNELS_LAST, 1e-5)
    assert K.select("backward", big) is K.backward_cl


@pytest.mark.parametrize("kind", ["batch_norm", "layer_norm", "rms_norm"])
def test_float32_near_1e30_does_not_overflow(kind):
    """float32 inputs near 1e30 (pytorch#162489): the float64 sums do not overflow to inf."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 8, 16)) * 1e30).astype(np.float32)
    assert np.isfinite(x).all() and (x.astype(np.float64) ** 2).max() > np.finfo(np.float32).max
    spec = _spec(kind, 1, False)
    y, stats = fastnorm.forward(x, spec)
    assert np.isfinite(y).all() and np.isfinite(stats.rstd).all() and (stats.rstd > 0).all()
    kw = _ref_kwargs(kind, 1, False)
    y_ref, _, _ = naive.forward(x, kind, None, None, spec.eps, **kw)
    naive.assert_close(y, y_ref, dtype=np.float32, k=64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dx_does_not_depend_on_which_parameter_gradients_are_requested(name):
    """dx is bitwise the same whether or not dweight/dbias are computed (C callers may skip them)."""
    kind, shape, arg, cl = CASES[name]
    spec = _spec(kind, arg, cl)
    x, dy, _, _ = _data(kind, shape, arg, cl, np.float64, seed=2)
    _, stats = fastnorm.forward(x, spec)
    dx_with, _, dbias = fastnorm.backward(dy, x, stats, spec, with_bias=True)
    dx_without, _, none = fastnorm.backward(dy, x, stats, spec, with_bias=False)
    assert dbias is not None and none is None
    np.testing.assert_array_equal(dx_with, dx_without)


def test_channels_last_fused_sets_are_bitwise_the_split_phases(restore_threads):
    """``FUSE_SETS`` (chosen per call from the thread count) changes the schedule, not the bits."""
    spec = fastnorm.NormSpec.group_norm(2, channels_last=True)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 3000, 8)) * 3 + 5).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    weight = rng.standard_normal(8).astype(np.float32)
    plan = _plan(x, spec, True)
    assert plan.sets == 6 and plan.fused_params is not None
    assert plan.fused_params[4] == plan.kernel_params[4] | K.FUSE_SETS
    results = []
    for params in (plan.kernel_params, plan.fused_params):
        y, mean, rstd = np.empty(x.size, np.float32), np.empty(12), np.empty(12)
        plan.forward_kernel(x.ravel(), weight, weight, y, mean, rstd, params)
        dx, dweight, dbias = np.empty(x.size, np.float32), np.empty(8, np.float32), np.empty(8, np.float32)
        plan.backward_kernel(dy.ravel(), x.ravel(), weight, mean, rstd, dx, dweight, dbias, params)
        results.append([y, mean, rstd, dx, dweight, dbias])
    for split, fused in zip(*results, strict=True):
        assert split.tobytes() == fused.tobytes()
    numba.set_num_threads(1)
    assert _training_params(plan) is plan.fused_params  # 6 sets >= 4 per thread
    if numba.config.NUMBA_NUM_THREADS >= 2:
        numba.set_num_threads(2)
        assert _training_params(plan) is plan.kernel_params


def test_only_parallel_channels_last_plans_with_few_sets_can_fuse():
    def fused(shape, spec):
        return _plan(np.empty(shape, np.float32), spec, True).fused_params is not None

    gn_cl = fastnorm.NormSpec.group_norm(2, channels_last=True)
    assert fused((6, 3000, 8), gn_cl)
    assert not fused((6, 30, 8), gn_cl)  # serial build
    assert not fused((40, 300, 8), gn_cl)  # >= FUSE_MIN_GROUPS sets: always fused
    assert not fused((6, 8, 3000), fastnorm.NormSpec.group_norm(2))  # channels-first
    assert not fused((6, 3000, 8), fastnorm.NormSpec.batch_norm(channels_last=True))  # one set
