"""Non-temporal (streaming) stores of the normalize pass: the same bits, chosen by size only.

``plan_schedule`` sets ``Schedule.stream`` for float32 and float64 forward and
inference outputs of at least ``STREAM_MIN_BYTES`` (x86-64); the planes and channels-last
normalize passes then store each span's 64-byte-aligned middle with
``storage.stream_affine``.  The kernels are called here directly with
``stream`` forced on and off, on small tensors whose spans start at every
alignment (odd spatial sizes, views one element into an allocation), for
every storage type: the outputs must be bitwise equal, and equal to the
public API's.  The machine code must hold the non-temporal stores.
"""

from __future__ import annotations

import platform

import numba
import numpy as np
import pytest

import fastnorm
import fastnorm._kernels as K
from fastnorm import _plan
from fastnorm._kernels import channels_last, planes
from fastnorm._kernels import rows as rows_kernels

pytestmark = pytest.mark.jit  # the streaming stores are LLVM IR; pure Python has none

DTYPES = ["float32", "float64", "bfloat16", "float16"]
SPECS = {
    "batch": fastnorm.NormSpec.batch_norm(),
    "instance": fastnorm.NormSpec.instance_norm(),
    "group": fastnorm.NormSpec.group_norm(4),
}


def _data(shape, dtype, layout, offset, rng):
    """``x`` of ``shape`` and ``dtype`` (16-bit as its kernel view), starting ``offset`` elements in."""
    values = (rng.standard_normal(int(np.prod(shape))) * 3 + 1).astype(np.float32)
    storage = {"bfloat16": np.uint16, "float16": np.int16}.get(dtype, dtype)
    if dtype == "bfloat16":
        bits = K.bfloat16_bits(values)
    elif dtype == "float16":
        bits = values.astype(np.float16).view(np.int16)
    else:
        bits = values.astype(dtype)
    buffer = np.empty(bits.size + offset, storage)[offset:]
    buffer[:] = bits
    logical = (shape[0], *shape[2:], shape[1]) if layout == "nhwc" else shape
    return buffer.reshape(logical)


def _run(kernel_pass, kind, layout, shape, dtype, offset, stream):
    rng = np.random.default_rng(7)
    x = _data(shape, dtype, layout, offset, rng)
    logical = x if layout == "nchw" else np.moveaxis(x, -1, 1)
    spec = SPECS[kind]
    channels = shape[1]
    compute = np.float64 if dtype == "float64" else np.float32
    weight = rng.standard_normal(channels).astype(compute)
    bias = rng.standard_normal(channels).astype(compute)
    param = weight.astype(x.dtype) if dtype in ("float32", "float64") else weight
    # statistics of the float64 view of the data: any statistics will do for the elementwise pass
    plan = _plan._prepare_input(logical.astype(np.float64), spec, training=True)[1]
    params = tuple(plan.kernel_params)
    nstats = K.num_stats(K.KernelSpec(*params))
    mean = rng.standard_normal(nstats) + 1
    rstd = rng.uniform(0.2, 2.0, nstats)
    schedule = K.Schedule(*K.plan_schedule(params, kernel_pass, 2, x.itemsize, True, True, False))
    schedule = schedule._replace(stream=stream)  # forced on or off, by name
    flat = x.reshape(-1)
    out = np.full(flat.size + offset, 7, flat.dtype)[offset:]
    weight_arg = param if dtype in ("float32", "float64") else weight.astype(np.float32)
    bias_arg = bias.astype(weight_arg.dtype)
    empty = flat[:0]
    full = params + tuple(schedule)
    if kernel_pass == K.INFERENCE:
        kernel = planes.planes_inference if layout == "nchw" else channels_last.channels_last_inference
        kernel(flat, weight_arg, bias_arg, empty, empty, out, mean, rstd, full)
    else:
        kernel = planes.planes_forward if layout == "nchw" else channels_last.channels_last_forward
        kernel(flat, weight_arg, bias_arg, empty, out, mean, rstd, full)
    assert K.schedule_of(full).stream == stream
    return out, schedule


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("kernel_pass", [K.INFERENCE, K.FORWARD], ids=["inference", "forward"])
def test_streamed_normalize_is_bitwise_the_plain_one(kernel_pass, kind, layout, dtype):
    for shape in ((2, 8, 37, 41), (3, 64, 9, 11), (2, 16, 130, 3)):
        for offset in (0, 1, 5):
            plain, schedule = _run(kernel_pass, kind, layout, shape, dtype, offset, 0)
            streamed, _ = _run(kernel_pass, kind, layout, shape, dtype, offset, 1)
            assert plain.tobytes() == streamed.tobytes(), (shape, offset, schedule)
            assert not np.array_equal(plain, np.full_like(plain, 7))


def _run_rows(kernel_pass, rows, width, dtype, offset, with_bias, centered, stream):
    rng = np.random.default_rng(11)
    x = _data((rows, width), dtype, "nchw", offset, rng).reshape(-1)
    compute = np.float64 if dtype == "float64" else np.float32
    weight = rng.standard_normal(width).astype(compute)
    bias = rng.standard_normal(width).astype(compute) if with_bias else np.empty(0, compute)
    flags = K.PER_ELEMENT | (K.CENTERED if centered else 0)
    params = tuple(K.KernelSpec(rows, 1, width, 1, flags, 1e-5))
    schedule = K.Schedule(*K.plan_schedule(params, kernel_pass, 2, x.itemsize, True, with_bias, False))
    schedule = schedule._replace(stream=stream)  # forced on or off, by name
    mean = rng.standard_normal(rows) + 1 if centered else np.zeros(rows)
    rstd = rng.uniform(0.2, 2.0, rows)
    out = np.full(x.size + offset, 7, x.dtype)[offset:]
    empty = x[:0]
    full = params + tuple(schedule)
    if kernel_pass == K.INFERENCE:
        rows_kernels.rows_inference(x, weight, bias, empty, empty, out, mean, rstd, full)
    else:
        rows_kernels.rows_forward(x, weight, bias, empty, out, np.empty(rows), np.empty(rows), full)
    assert K.schedule_of(full).stream == stream
    return out, schedule


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel_pass", [K.INFERENCE, K.FORWARD], ids=["inference", "forward"])
def test_streamed_rows_are_bitwise_the_plain_ones(kernel_pass, dtype):
    """LayerNorm (weight and bias) and RMSNorm (weight only) rows, every non-pipelined strategy."""
    strategies = set()
    # 40 rows: one block each; 5000 wide: fused (several blocks); 6 rows: split
    for rows, width in ((40, 1500), (40, 5000), (6, 700), (6, 9000)):
        for with_bias, centered in ((True, True), (False, False)):
            for offset in (0, 3):
                plain, schedule = _run_rows(kernel_pass, rows, width, dtype, offset, with_bias, centered, 0)
                streamed, _ = _run_rows(kernel_pass, rows, width, dtype, offset, with_bias, centered, 1)
                assert plain.tobytes() == streamed.tobytes(), (rows, width, with_bias, offset, schedule)
                assert not np.array_equal(plain, np.full_like(plain, 7))
                strategies.add(schedule.strategy)
    if kernel_pass == K.FORWARD:
        assert strategies >= {K.ONE_BLOCK, K.FUSED, K.SPLIT}, strategies


@pytest.mark.parametrize("pass_id", [K.FORWARD, K.INFERENCE, K.BACKWARD])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_streaming_is_chosen_by_output_size_only(pass_id, itemsize):
    """From STREAM_MIN_BYTES of output, forward and inference stream; not a backward or a fused CL pass.

    Nor 16-bit data (not measured), nor the pipelined row forward. The thread
    count changes nothing.
    """
    elements = K.STREAM_MIN_BYTES // itemsize
    x86 = platform.machine() in ("x86_64", "AMD64")
    for flags, n, c, s, g in (
        (K.CENTERED | K.BATCH, 8, 64, elements // 512, 64),  # planes BatchNorm
        (K.CENTERED, 8, 64, elements // 512, 64),  # planes InstanceNorm
        (K.CENTERED | K.BATCH | K.CHANNELS_LAST, 8, 64, elements // 512, 64),  # channels-last split
        (K.CENTERED | K.PER_ELEMENT, elements // 1024, 1, 1024, 1),  # LayerNorm rows
    ):
        at = K.KernelSpec(n, c, s, g, flags, 1e-5)
        below = K.KernelSpec(n, c, s - 1, g, flags, 1e-5)
        for threads in (1, 2, 64):
            schedule_at, schedule_below = (
                K.Schedule(*K.plan_schedule(tuple(k), pass_id, threads, itemsize, True, True, False))
                for k in (at, below)
            )
            # the pipelined row forward normalizes inside its moments loop: never streamed
            expected = x86 and itemsize >= 4 and pass_id != K.BACKWARD and schedule_at.strategy != K.PIPELINED
            assert schedule_at.stream == int(expected), (flags, pass_id, threads)
            assert schedule_below.stream == 0
    fused = K.KernelSpec(64, 64, elements // 4096, 64, K.CENTERED | K.CHANNELS_LAST, 1e-5)
    schedule = K.Schedule(*K.plan_schedule(tuple(fused), K.FORWARD, 2, itemsize, True, True, False))
    assert schedule.strategy == K.FUSED and schedule.stream == 0


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction names")
def test_the_streaming_loop_emits_non_temporal_stores():
    """``stream_affine``'s loop: aligned ``vmovnt*`` stores and an ``sfence`` (float32, float64, bfloat16).

    For float16 data LLVM lowers the loop's half-precision vector store to
    ordinary stores: still the same values (the tests above), without the
    streaming.
    """
    from fastnorm._config import JIT_OPTIONS
    from fastnorm._kernels.storage import stream_affine

    def scalar(ys, xs, mean, scale, shift):
        stream_affine(ys, xs, mean, scale, shift, 0, 1)

    compiled = numba.njit(**{**JIT_OPTIONS, "cache": False})(scalar)
    for data, value in (
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.uint16, np.float32),
    ):
        raw = np.zeros(128, data)  # the loop's contract: 64-byte-aligned output, whole vectors
        start = (-raw.ctypes.data % 64) // raw.itemsize
        ys = raw[start : start + 64]
        compiled(ys, ys.copy(), value(0), value(1), value(0))
        asm = compiled.inspect_asm(compiled.signatures[-1])
        assert "vmovnt" in asm and "sfence" in asm, data
