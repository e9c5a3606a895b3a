"""Every schedule of the kernels, against the float64 reference.

:func:`fastnorm._kernels.plan_schedule` chooses, from the shape alone (and
the thread count for channels-last training passes): the serial or parallel
build; fused per group, one block per group, software-pipelined rows, or split
into block / group / block phases; one or many blocks per plane or row; the
channels-last moments' four rows per step, consecutive or from the quarters of
a block; the row backward's chunks of whole rows (chunks longer than
``ROW_CHUNK`` beyond ``ROW_CHUNK * ROW_TASKS`` rows) or column tiles.  Each
case of ``corpus.PATH_CASES`` is built to land on one of them (the test reads
the plan's schedule), then checked forward and backward, including in-place
outputs, and the one-pass block moments' fallback to two passes is forced.
"""

from __future__ import annotations

import naive
import numba
import numpy as np
import pytest
from corpus import PATH_CASES

import fastnorm
from fastnorm import _kernels as K
from fastnorm._kernels import channels_last, planes
from fastnorm._plan import _kernel_call, _plan

CASES = PATH_CASES


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


def _path(plan, in_place=False):
    """Read the schedules the plan gives a call with weight and bias on this thread count."""
    forward = K.schedule_of(_kernel_call(plan, K.FORWARD, 6 + in_place)[1])
    backward = K.schedule_of(_kernel_call(plan, K.BACKWARD, 4)[1])
    return {
        "serial": not forward.parallel,
        "fused": forward.strategy in (K.FUSED, K.ONE_BLOCK, K.PIPELINED),
        "multiblock": forward.nblocks > 1,
        "rowchunk": backward.strategy == K.ROW_CHUNKS,
        "longchunks": backward.chunk > K.ROW_CHUNK,
        "groupblock": forward.view == K.PLANES
        and forward.strategy == K.ONE_BLOCK
        and plan.kspec.channels > plan.kspec.groups,
        "pipelined": forward.strategy == K.PIPELINED,
        "quarters": bool(forward.quarters),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_lands_on_its_path(name):
    kind, shape, arg, cl = CASES[name]
    spec = _spec(kind, arg, cl)
    path = _path(_plan(np.empty(shape, np.float32), spec, True))
    assert path["fused"] == ("fused" in name or "rowchunk" in name)
    assert path["multiblock"] == ("multiblock" in name)
    assert path["rowchunk"] == ("rowchunk" in name)
    assert path["longchunks"] == ("longchunks" in name)
    assert path["groupblock"] == ("groupblock" in name)
    assert path["pipelined"] == ("pipelined" in name and K.PIPELINE_HOST)  # AVX-512 hosts only
    assert path["quarters"] == ("quarters" in name)


@pytest.mark.parametrize("name", sorted(name for name in CASES if "pipelined" in name))
def test_16bit_rows_run_the_two_loops(name):
    """The pipelined forward is for 4- and 8-byte data: 16-bit rows take the moments and normalize loops.

    ``PIPELINE_MIN_ITEMSIZE``: two loops take 0.73-0.88x the pipelined time on
    16-bit rows (docs/perf-notes/layernorm-pipelined-forward.md).  Both give the same bits.
    """
    kind, shape, arg, cl = CASES[name]
    spec = _spec(kind, arg, cl)
    assert _path(_plan(np.empty(shape, np.float32), spec, True))["pipelined"] == K.PIPELINE_HOST
    for x in (np.empty(shape, np.float16), np.empty(shape, np.uint16)):  # float16; bfloat16 bits
        forward = K.schedule_of(_kernel_call(_plan(x, spec, True), K.FORWARD, 6)[1])
        assert forward.strategy == K.ONE_BLOCK, (name, x.dtype)


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
    # float64 rows of 512: 4 KB; pipelined on AVX-512 hosts (K.PIPELINE_HOST), else two loops
    assert _path(_plan(x, spec, True))["pipelined"] == K.PIPELINE_HOST
    assert not _path(_plan(x, spec, True), in_place=True)["pipelined"]
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


def _schedule(kspec, pass_id, threads=1, itemsize=4):
    params = tuple(kspec)
    return K.Schedule(*K.plan_schedule(params, pass_id, threads, itemsize, True, True, False))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [3, 16, 32, 64])
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
    schedule = _schedule(spec, K.INFERENCE, itemsize=x.itemsize)
    rows_per_block, nblocks, tile_rows = schedule.block, schedule.nblocks, schedule.tile_rows
    assert nblocks > 1 and rows_per_block == max(4096 // channels, K.CL_MIN_ROWS)
    assert tile_rows == K.CL_TILE_BYTES // x.itemsize // channels > 1
    assert rows_per_block % tile_rows != 0 or (spatial - rows_per_block) % tile_rows != 0
    for vectors, run in ((3, channels_last._cl_normalize_block), (4, channels_last._cl_dx_block)):
        coef = rng.standard_normal(vectors * channels).astype(dtype)
        tiled = channels_last._cl_tile(coef, channels, tile_rows)
        assert tiled.size == vectors * channels * tile_rows
        outs = []
        for c, rows in ((coef, 1), (tiled, tile_rows)):
            out = np.full_like(x, np.nan)
            for blk in range(n * nblocks):
                if vectors == 3:  # no residual, no gradient
                    run(x, x[:0], x[:0], out, c, spec, schedule, blk, rows)
                else:
                    run(dy, x, out, c, spec, schedule, blk, rows)
            outs.append(out)
        assert not np.isnan(outs[0]).any()
        assert outs[0].tobytes() == outs[1].tobytes()


@pytest.mark.parametrize("pass_id", [K.FORWARD, K.INFERENCE, K.BACKWARD])
def test_channels_last_tiles_by_channels_and_tensor_bytes(pass_id):
    """BatchNorm channels-last passes tile rows up to 32 channels, and up to 64 below CL_TILE_CACHE_BYTES."""
    flags = K.CENTERED | K.BATCH | K.CHANNELS_LAST
    cached_rows = K.CL_TILE_CACHE_BYTES // 4 // 8 - 1  # float32, N = 8: just below the bound
    cases = ((32, False, True), (64, True, True), (64, False, False), (128, True, False))
    for channels, cached, tiled in cases:
        spatial = cached_rows // channels if cached else 2 * cached_rows // channels
        spec = K.KernelSpec(8, channels, spatial, channels, flags, 1e-5)
        assert (8 * spatial * channels * 4 < K.CL_TILE_CACHE_BYTES) == cached
        tile_rows = _schedule(spec, pass_id, threads=2).tile_rows
        assert tile_rows == (K.CL_TILE_BYTES // 4 // channels if tiled else 1), (channels, cached, tile_rows)
    # InstanceNorm: 8 statistics sets, one row per step
    instance = K.KernelSpec(8, 64, 64, 64, K.CENTERED | K.CHANNELS_LAST, 1e-5)
    assert _schedule(instance, pass_id, threads=2).tile_rows == 1


@pytest.mark.parametrize("activation", [K.epilogue.IDENTITY, K.epilogue.RELU])
@pytest.mark.parametrize("storage, channels", [("float32", 32), ("bfloat16", 64)])
@pytest.mark.parametrize("groups", [8, None])  # GroupNorm(8), InstanceNorm
def test_channels_last_fused_forward_tiles_each_set_bitwise(storage, channels, groups, activation):
    """The fused channels-last forward over rows of <= 128 bytes tiles each set's vectors.

    Same bits as one row per step: ``y``, ``mean`` and ``rstd``.
    """
    rng = np.random.default_rng(5)
    n, spatial = 32, 301 + 4096 // channels  # 32 sets: FUSED; a partial last block and step
    groups = groups or channels
    spec = K.KernelSpec(n, channels, spatial, groups, K.CENTERED | K.CHANNELS_LAST, 1e-5, activation)
    values = 3.0 + rng.standard_normal(n * spatial * channels)
    if storage == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        x = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    else:
        x = values.astype(np.float32)
    weight = rng.standard_normal(channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    if storage == "bfloat16":
        weight, bias = (
            weight.astype(ml_dtypes.bfloat16).view(np.uint16),
            bias.astype(ml_dtypes.bfloat16).view(np.uint16),
        )
    schedule = _schedule(spec, K.FORWARD, threads=2, itemsize=x.itemsize)
    assert schedule.strategy == K.FUSED
    assert schedule.tile_rows == K.CL_TILE_BYTES // x.itemsize // channels > 1
    unwritten = 0x7FC0 if storage == "bfloat16" else np.nan
    outs = []
    for tiles in (schedule, schedule._replace(tile_rows=1)):
        y = np.full_like(x, unwritten)
        mean, rstd = np.empty(n * groups), np.empty(n * groups)
        channels_last.channels_last_forward(x, weight, bias, x[:0], y, mean, rstd, tuple(spec) + tuple(tiles))
        outs.append((y, mean, rstd))
    assert not np.isnan(outs[0][1]).any()
    y = outs[0][0]
    assert (y != unwritten).all() if storage == "bfloat16" else not np.isnan(y).any()
    for tiled, one_row in zip(*outs, strict=True):
        assert tiled.tobytes() == one_row.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_builds_agree(dtype):
    """Same source, two builds: results agree to rounding (each shape always uses one)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(2 * 6 * 50).astype(dtype)
    y1, y2 = np.empty_like(x), np.empty_like(x)
    kspec = K.KernelSpec(2, 6, 50, 3, K.CENTERED, 1e-5)
    params = tuple(kspec) + tuple(_schedule(kspec, K.FORWARD, itemsize=x.itemsize))
    stats = [np.empty(6) for _ in range(4)]
    empty = np.empty(0, dtype)
    planes.planes_forward(x, empty, empty, empty, y1, stats[0], stats[1], params)
    K.dispatch.planes_forward_serial(x, empty, empty, empty, y2, stats[2], stats[3], params)
    naive.assert_close(y2, y1, dtype=dtype, k=4)
    assert K.select(K.FORWARD, params) is K.dispatch.planes_forward_serial
    big = K.KernelSpec(64, 64, 64, 32, K.CENTERED | K.CHANNELS_LAST, 1e-5)
    big_params = tuple(big) + tuple(_schedule(big, K.BACKWARD))
    assert K.select(K.BACKWARD, big_params) is channels_last.channels_last_backward


def test_dispatch_table_covers_every_pass_view_and_build():
    """Every (pass, view, parallel) has a kernel, and each kernel serves exactly one of them."""
    keys = {
        (p, v, b)
        for p in (K.FORWARD, K.INFERENCE, K.BACKWARD)
        for v in (K.ROWS, K.PLANES, K.CHANNELS_LAST_VIEW)
        for b in (0, 1)
    }
    # the pre-norm skip add's passes exist for LayerNorm / RMSNorm rows only
    keys |= {(p, K.ROWS, b) for p in (K.SKIP_FORWARD, K.SKIP_BIAS_BACKWARD) for b in (0, 1)}
    # BatchNorm split around a collective: the two BatchNorm views only
    split_passes = (K.BATCH_STATS, K.BACKWARD_REDUCE, K.BACKWARD_APPLY)
    keys |= {(p, v, b) for p in split_passes for v in (K.PLANES, K.CHANNELS_LAST_VIEW) for b in (0, 1)}
    assert set(K.KERNELS) == keys
    assert len(set(map(id, K.KERNELS.values()))) == len(keys)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_dispatch_runs_the_kernel_of_the_table(name):
    """``run_forward`` / ``run_backward`` (the C ABI's dispatch) give the table's kernels' bits."""
    kind, shape, arg, cl = CASES[name]
    spec = _spec(kind, arg, cl)
    x, dy, weight, bias = _data(kind, shape, arg, cl, np.float64, seed=4)
    plan = _plan(x, spec, True)
    for pass_id in (K.FORWARD, K.INFERENCE):
        kernel, params = _kernel_call(plan, pass_id, 4 + 2 * (bias is not None))
        outputs = []
        none = np.empty(0)
        # run_forward takes a gradient after the residual for both passes; the forward kernels none
        grad = (none,) if pass_id == K.FORWARD else ()
        for run in (kernel, lambda *a, p=pass_id, g=grad: K.run_forward(p, *a[:4], *g, *a[4:])):
            y, mean, rstd = np.empty(x.size), np.empty(plan.stats_size), np.empty(plan.stats_size)
            if pass_id == K.INFERENCE:
                mean[:], rstd[:] = 0.25, 1.5
            inputs = (x.ravel(), weight, weight if bias is None else bias, none)
            if pass_id == K.INFERENCE:
                inputs += (none,)
            run(*inputs, y, mean, rstd, params)
            outputs.append(np.concatenate([y, mean, rstd]))
        assert outputs[0].tobytes() == outputs[1].tobytes()
    kernel, params = _kernel_call(plan, K.BACKWARD, 4)
    mean, rstd = np.full(plan.stats_size, 0.25), np.full(plan.stats_size, 1.5)
    outputs = []
    for run in (kernel, K.run_backward):
        dx, dweight, dbias = np.empty(x.size), np.empty(weight.size), np.empty(weight.size)
        run(dy.ravel(), x.ravel(), weight.ravel(), mean, rstd, dx, dweight.ravel(), dbias.ravel(), params)
        outputs.append(np.concatenate([dx, dweight.ravel(), dbias.ravel()]))
    assert outputs[0].tobytes() == outputs[1].tobytes()


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
    """The thread count picks FUSED or SPLIT for few channels-last sets: another schedule, the same bits."""
    spec = fastnorm.NormSpec.group_norm(2, channels_last=True)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 3000, 8)) * 3 + 5).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    weight = rng.standard_normal(8).astype(np.float32)
    plan = _plan(x, spec, True)
    assert plan.thread_dependent == (True, False, True)
    results = []
    for threads, strategy in ((1, K.FUSED), (2, K.SPLIT)):  # 6 sets: fused from 4 sets per thread
        params = {}
        for pass_id in (K.FORWARD, K.BACKWARD):
            schedule = _schedule(plan.kspec, pass_id, threads)
            assert schedule.strategy == strategy
            params[pass_id] = plan.kernel_params + tuple(schedule)
        y, mean, rstd = np.empty(x.size, np.float32), np.empty(12), np.empty(12)
        empty = np.empty(0, np.float32)
        forward = K.select(K.FORWARD, params[K.FORWARD])
        forward(x.ravel(), weight, weight, empty, y, mean, rstd, params[K.FORWARD])
        dx, dweight, dbias = np.empty(x.size, np.float32), np.empty(8, np.float32), np.empty(8, np.float32)
        backward = K.select(K.BACKWARD, params[K.BACKWARD])
        backward(dy.ravel(), x.ravel(), weight, mean, rstd, dx, dweight, dbias, params[K.BACKWARD])
        results.append([y, mean, rstd, dx, dweight, dbias])
    for split, fused in zip(*results, strict=True):
        assert split.tobytes() == fused.tobytes()
    numba.set_num_threads(1)
    assert K.schedule_of(_kernel_call(plan, K.FORWARD, 6)[1]).strategy == K.FUSED
    if numba.config.NUMBA_NUM_THREADS >= 2:
        numba.set_num_threads(2)
        assert K.schedule_of(_kernel_call(plan, K.FORWARD, 6)[1]).strategy == K.SPLIT


def test_only_parallel_split_plans_depend_on_threads():
    """Thread-dependent plans: parallel split training passes below ``STREAM_MIN_BYTES`` (one share
    of blocks per thread), and channels-last training passes with a few sets (fused or split)."""

    def thread_dependent(shape, spec):
        return _plan(np.empty(shape, np.float32), spec, True).thread_dependent

    split = (True, False, True)
    none = (False, False, False)
    gn_cl = fastnorm.NormSpec.group_norm(2, channels_last=True)
    assert thread_dependent((6, 3000, 8), gn_cl) == split
    assert thread_dependent((6, 30, 8), gn_cl) == none  # serial build
    assert thread_dependent((40, 300, 8), gn_cl) == none  # >= FUSE_MIN_GROUPS sets: always fused
    assert thread_dependent((6, 8, 3000), fastnorm.NormSpec.group_norm(2)) == split  # channels-first split
    assert thread_dependent((6, 64, 3000), fastnorm.NormSpec.group_norm(32)) == none  # channels-first fused
    assert thread_dependent((6, 3000, 8), fastnorm.NormSpec.batch_norm(channels_last=True)) == split
    big = K.STREAM_MIN_BYTES // 4  # elements of a float32 tensor at the streaming size: no shares
    assert thread_dependent((4, big // 8, 2), fastnorm.NormSpec.batch_norm(channels_last=True)) == none
    assert thread_dependent((4, 2, big // 8), fastnorm.NormSpec.batch_norm()) == none


@pytest.mark.parametrize("name", sorted(CASES))
def test_thread_dependence_does_not_vary_with_the_call_variant(name):
    """The plan probes the thread dependence with weight, bias and out of place; no variant differs."""
    kind, shape, arg, cl = CASES[name]
    plan = _plan(np.empty(shape, np.float32), _spec(kind, arg, cl), True)
    for pass_id in (K.FORWARD, K.INFERENCE, K.BACKWARD):
        for variant in [(w, b, p) for w in (False, True) for b in (False, True) for p in (False, True)]:
            at = [K.plan_schedule(plan.kernel_params, pass_id, t, 4, *variant) for t in (1, 2, 3, 64)]
            assert (len(set(at)) > 1) == plan.thread_dependent[pass_id], (pass_id, variant)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("kind", "shape", "arg"), [("batch_norm", (6, 24, 13, 11), 0), ("group_norm", (3, 8, 33, 40), 4)]
)
def test_split_passes_give_the_same_bits_for_any_number_of_shares(kind, shape, arg, channels_last):
    """``Schedule.shares`` (a share of blocks per thread, walked backwards by a second pass) changes no bit.

    The split forward, inference and backward kernels run with 0 (one block
    per task, in order), 1, 2, 3 and 64 shares; every output equals the
    0-shares run's bitwise.  The planner sets one share per thread for
    parallel split passes below ``STREAM_MIN_BYTES`` and none otherwise.
    """
    if channels_last:
        shape = (shape[0], *shape[2:], shape[1])
    x, dy, weight, bias = _data(kind, shape, arg, channels_last, np.float32)
    spec = _spec(kind, arg, channels_last)
    plan = _plan(x, spec, True)
    k = plan.kernel_params
    outs = {}
    for pass_id in (K.FORWARD, K.BACKWARD):
        schedule = K.Schedule(*K.plan_schedule(k, pass_id, 2, 4, True, True, False))
        assert schedule.strategy == K.SPLIT and schedule.shares == 2
        for threads in (1, 3):
            assert _schedule(plan.kspec, pass_id, threads).shares == threads
        big = K.KernelSpec(*k)._replace(batch=K.STREAM_MIN_BYTES // 4 // (k[1] * k[2]) + 1)
        assert _schedule(big, pass_id, 2).shares == 0
    assert _schedule(plan.kspec, K.INFERENCE, 2).shares == 0
    xf, dyf = x.ravel(), dy.ravel()
    nstats = plan.stats_size
    forward = K.select(K.FORWARD, k + tuple(_schedule(plan.kspec, K.FORWARD, 2)))
    backward = K.select(K.BACKWARD, k + tuple(_schedule(plan.kspec, K.BACKWARD, 2)))
    for shares in (0, 1, 2, 3, 64):
        fwd = k + tuple(_schedule(plan.kspec, K.FORWARD, 2)._replace(shares=shares))
        bwd = k + tuple(_schedule(plan.kspec, K.BACKWARD, 2)._replace(shares=shares))
        y, mean, rstd = np.empty_like(xf), np.empty(nstats), np.empty(nstats)
        forward(xf, weight, bias, xf[:0], y, mean, rstd, fwd)
        dx, dweight, dbias = np.empty_like(xf), np.empty_like(weight), np.empty_like(bias)
        backward(dyf, xf, weight, mean, rstd, dx, dweight, dbias, bwd)
        outs[shares] = [a.tobytes() for a in (y, mean, rstd, dx, dweight, dbias)]
    assert not np.isnan(np.frombuffer(outs[0][0], np.float32)).any()
    for shares in (1, 2, 3, 64):
        assert outs[shares] == outs[0], f"shares={shares}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["batch_norm", "instance_norm"])
def test_inference_over_one_block_planes_runs_tasks_of_channels(kind, dtype, restore_threads):
    """BN/IN inference over one-block planes, in tasks of 64 channels of a sample, is the reference's.

    130 channels: two whole tasks and a partial one per sample.  The serial
    build and the parallel one on 1 and 2 threads give the same bits.
    """
    shape = (3, 130, 7, 7)
    spec = _spec(kind, None, False)
    x, _, weight, bias = _data(kind, shape, None, False, dtype)
    _, stats = fastnorm.forward(x, spec, weight, bias)
    plan = _plan(x, spec, True)
    schedule = _schedule(plan.kspec, K.INFERENCE, itemsize=x.itemsize)
    assert schedule.strategy == K.ELEMENTWISE and schedule.nblocks == 1
    mean = np.broadcast_to(stats.mean.reshape(-1, 130)[..., None, None], shape)
    rstd = np.broadcast_to(stats.rstd.reshape(-1, 130)[..., None, None], shape)
    per_channel = (1, 130, 1, 1)
    y_ref = (x.astype(np.float64) - mean) * rstd * weight.reshape(per_channel) + bias.reshape(per_channel)
    outputs = []
    for parallel, threads in ((0, 1), (1, 1), (1, 2)):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        params = plan.kernel_params + tuple(schedule._replace(parallel=parallel))
        y = np.empty(x.size, dtype)
        empty = np.empty(0, dtype)
        kernel = K.select(K.INFERENCE, params)
        kernel(x.ravel(), weight, bias, empty, empty, y, stats.mean.ravel(), stats.rstd.ravel(), params)
        naive.assert_close(y.reshape(shape), y_ref, dtype=dtype, k=64, err_msg=f"{kind} parallel={parallel}")
        outputs.append(y)
    assert all(y.tobytes() == outputs[0].tobytes() for y in outputs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "tile", "nblocks"),
    [((3, 42, 5, 7), 5, 1), ((2, 40, 70, 70), 1, 2), ((4, 64, 4, 4), 8, 1)],
    ids=["partial-tile", "multiblock", "small-planes"],
)
def test_batch_norm_channel_tiles_give_the_split_passes_bits(shape, tile, nblocks, dtype, restore_threads):
    """BatchNorm's fused channels-first passes, in tiles of channels, equal the split passes bitwise.

    The planner fuses BatchNorm training passes in tiles of channels walked
    sample by sample (``CHANNEL_TILE_BYTES``, ``MIN_CHANNEL_TILES``); the
    same kernels run with the split schedule must give the same ``y``,
    ``mean``, ``rstd``, ``dx``, ``dweight`` and ``dbias``, serial and parallel
    on 1 and 2 threads.  (3, 42, 5, 7) ends with a partial tile of 2
    channels; (2, 40, 70, 70) has two blocks per plane.  The outputs are also
    checked against the float64 reference.
    """
    spec = _spec("batch_norm", None, False)
    x, dy, weight, bias = _data("batch_norm", shape, None, False, dtype)
    plan = _plan(x, spec, True)
    k = plan.kernel_params
    fused = {p: _schedule(plan.kspec, p, 2, x.itemsize) for p in (K.FORWARD, K.BACKWARD)}
    for schedule in fused.values():
        assert (schedule.strategy, schedule.chunk, schedule.nblocks) == (K.FUSED, tile, nblocks)
    split = {p: s._replace(strategy=K.SPLIT, chunk=0, shares=2) for p, s in fused.items()}
    xf, dyf = x.ravel(), dy.ravel()
    outputs = {}
    for name, schedules in (("fused", fused), ("split", split)):
        for parallel, threads in ((0, 1), (1, 1), (1, 2)):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            fwd = k + tuple(schedules[K.FORWARD]._replace(parallel=parallel))
            bwd = k + tuple(schedules[K.BACKWARD]._replace(parallel=parallel))
            y, mean, rstd = np.empty_like(xf), np.empty(shape[1]), np.empty(shape[1])
            K.select(K.FORWARD, fwd)(xf, weight, bias, xf[:0], y, mean, rstd, fwd)
            dx, dweight, dbias = np.empty_like(xf), np.empty_like(weight), np.empty_like(bias)
            K.select(K.BACKWARD, bwd)(dyf, xf, weight, mean, rstd, dx, dweight, dbias, bwd)
            outputs[name, parallel, threads] = [a.tobytes() for a in (y, mean, rstd, dx, dweight, dbias)]
    first = outputs["fused", 0, 1]
    for key, got in outputs.items():
        assert got == first, key
    y_ref, _, _ = naive.forward(x, "batch_norm", weight, bias)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, "batch_norm", weight)
    y, _, _, dx, dweight, dbias = (
        np.frombuffer(b, dtype if i in (0, 3, 4, 5) else np.float64) for i, b in enumerate(first)
    )
    naive.assert_close(y.reshape(shape), y_ref, dtype=dtype, k=64, err_msg="y")
    naive.assert_close(dx.reshape(shape), dx_ref, dtype=dtype, k=64, err_msg="dx")
    naive.assert_close(dweight, dweight_ref, dtype=dtype, k=64, err_msg="dweight")
    naive.assert_close(dbias, dbias_ref, dtype=dtype, k=64, err_msg="dbias")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["batch_norm", "group_norm"])
def test_channels_last_channel_chunks_equal_whole_rows(kind, dtype, restore_threads):
    """Channels-last rows walked in chunks of channels give each channel the bits of whole rows.

    Rows of 1100 channels exceed ``CL_CHUNK_BYTES`` per coefficient vector
    (float32 and float64), so the normalize and ``dx`` passes walk them in
    chunks of channels.  BatchNorm's channels, and GroupNorm's groups of 100
    channels, are independent: a call over a slice of at most 500 channels
    (whole rows, one chunk) must give those channels' ``y``, statistics,
    inference output, ``dx``, ``dweight`` and ``dbias`` bit for bit, on 1
    and 2 threads.  299 rows per sample: blocks of 256 and 43 rows (a
    leftover past the four-row steps).
    """
    assert 1100 * np.dtype(dtype).itemsize > K.CL_CHUNK_BYTES
    groups = 11 if kind == "group_norm" else None
    spec = _spec(kind, groups, True)
    x, dy, weight, bias = _data(kind, (2, 13, 23, 1100), None, True, dtype)
    parts = [(0, 500), (500, 1000), (1000, 1100)]

    def run(xs, dys, w, b, s):
        y, stats = fastnorm.forward(xs, s, w, b)
        inf = fastnorm.forward_inference(xs, stats, s, w, b)
        grads = fastnorm.backward(dys, xs, stats, s, w, bias=b)
        return y, stats.mean, stats.rstd, inf, grads.dx, grads.dweight, grads.dbias

    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        whole = run(x, dy, weight, bias, spec)
        for a, b in parts:
            part_spec = _spec(kind, (b - a) // 100 if groups else None, True)
            sl = np.s_[..., a:b]
            got = run(
                np.ascontiguousarray(x[sl]), np.ascontiguousarray(dy[sl]), weight[a:b], bias[a:b], part_spec
            )
            for name, w_arr, p_arr in zip(
                ("y", "mean", "rstd", "inference", "dx", "dweight", "dbias"), whole, got, strict=True
            ):
                if name in ("mean", "rstd"):
                    w_arr = w_arr[..., a // 100 : b // 100] if groups else w_arr[a:b]
                else:
                    w_arr = w_arr[..., a:b]
                assert np.array_equal(w_arr, p_arr, equal_nan=True), (name, a, b, threads)
    y_ref, _, _ = naive.forward(x, kind, weight, bias, **_ref_kwargs(kind, groups, True))
    naive.assert_close(whole[0], y_ref, dtype=dtype, k=64, err_msg="y")
