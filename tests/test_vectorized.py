"""The kernels' inner loops compile to SIMD code: LLVM's loop vectorizer takes every one of them.

Each loop helper of ``fastnorm._kernels`` (most are inlined into the kernels at
Numba IR level, see :func:`fastnorm._config.glue`) is compiled on its own (same
options as the package, no cache, so that its LLVM IR is available) for float32 and float64
data, and the vectorized loops of its optimized IR are counted: LLVM names the
body of every loop it vectorizes ``vector.body``.  Loops of helpers that LLVM
inlines (``_moments_two_pass`` into ``_moments`` and ``_cl_block_moments``)
count too.  ``VECTOR_LOOPS`` holds the counts of Numba 0.68 (LLVM 20) on
x86-64; a change that turns one of these loops scalar (a branch in the loop
body, an integer division, a lost ``reassoc`` flag on a reduction) lowers the
count and fails here, naming the helper.  ``docs/benchmarks.md`` ("Vectorized
inner loops") lists the loops and their vector widths.
"""

from __future__ import annotations

import inspect
import re

import numba
import pytest
from numba import types
from numba.core.registry import cpu_target

from fastnorm import _kernels as K
from fastnorm._config import JIT_OPTIONS
from fastnorm._kernels import channels_last, epilogue, numerics, planes, rows, storage

# C ABI / LLVM IR: needs the compiled kernels (skipped under NUMBA_DISABLE_JIT=1, see conftest.py).
pytestmark = pytest.mark.jit

#: helper -> vectorized loops (``vector.body`` blocks) in its optimized IR, both dtypes.
VECTOR_LOOPS = {
    # shifted one-pass sums, uncentered sum of squares, the inlined two-pass fallback (2)
    "_moments": 4,
    "_moments_two_pass": 2,
    "_dots": 1,
    "_dots_weighted": 1,
    # the residual's loop (rectified or not) and the rectified one in a compiled call; the
    # plain one is affine_span's explicit vector code (counted)
    "_normalize_fused": 3,
    # with a residual or a rectifier, a compiled call (its loops, plus the versions LLVM makes
    # of the generic ones); the plain case is affine_rows' explicit vector code (counted)
    "_normalize_per_element_rectified": 5,
    # (the four source loops, the generic rectified one in three versions)
    "_normalize_per_element_residual": 6,
    # the activations' loops for a code known only at run time
    "_act_loop": 6,
    # LayerNorm's pipelined forward: one row normalized while the next one's moments are summed
    # (8 lanes: the float64 sums set the width), with and without the residual, rectified or
    # not (flags not constant here: LLVM versions the loop for them)
    "_normalize_row_sum_next": 4,
    # the rows loop: first moments (shifted sums, two-pass fallback), the pipelined loops and
    # the last row's normalize (_pipelined_task runs it once per constant pair of flags; its
    # loops count in rows_forward_with_skip)
    "_pipelined_rows": 16,
    # the pre-norm skip add, with and without the skip bias; its gradient's column sums
    "_add_skip_span": 2,
    "_add_row": 1,
    "_dx_span": 1,
    "_dx_per_element_span": 1,
    # with and without weight
    "_row_dots_and_partials": 2,
    "_param_partials": 1,
    # the row loops over channels (four rows per step, consecutive or from the
    # block's quarters, then one row per step for the rows left over), each
    # versioned by LLVM for centered and uncentered sums (the shift is a select on
    # CENTERED), and the inlined two-pass fallback (2).  With two rows per step
    # LLVM unrolled the outer loop into 8 vectorized copies (12 loops); four rows
    # per step are one vectorized loop of 4 x 8 lanes.  The block's finish: the count of
    # channels that need the two-pass fallback, and the finish without it (2).
    "_cl_block_moments": 8,
    "_cl_merge_set": 1,
    # _cl_merge_set's loop, then the finish of one channel per group (BatchNorm,
    # InstanceNorm), centered or not (2)
    "_cl_set_stats": 3,
    # the rows of a block, with and without the residual, rectified or not, or the rectifier's
    # gradient (flags not constant: LLVM versions the step loop for some of them)
    "_cl_store_rows": 4,
    # the plain store: affine_coefs' explicit loop per chunk and step
    "_cl_store_rows_plain": 1,
    # four rows from the block's quarters per step, one row per step (the rows left over)
    "_cl_block_dots": 2,
    "_cl_sum_set": 1,
    # the dx coefficients of one channel per group, with and without weight
    "_cl_set_dx_coefs": 2,
    # affine_dx_coefs' explicit loop per chunk and step
    "_cl_dx_block": 1,
}

#: LLVM's vectorized loops, and the explicit vector loops of ``storage``'s ``affine_*``
#: intrinsics (vector code by construction; test_affine_loops_are_explicit_vector_code),
#: also where LLVM unswitched a loop around one (``.us``; not its unrolling remainder,
#: ``.epil``, nor its preheaders).
_EXPLICIT_LOOP = r"\.loop(?:\.us\d*)?[\d.]*:"
_VECTOR_BODY = re.compile(rf"^(?:vector\.body[\d.]*:|(?:affine_\w+|step_sums){_EXPLICIT_LOOP})", re.MULTILINE)
_VECTOR_OP = re.compile(r"= (?:fadd|fsub|fmul|fdiv|fpext|fptrunc|call)[^=\n]*?<(\d+) x (float|double)>")


def _signature(name, dtype):
    data = types.Array(dtype, 1, "C")
    compute = types.Array(types.float32 if dtype in (types.uint16, types.int16) else dtype, 1, "C")
    work = types.Array(types.float64, 1, "C")
    i64, f64 = types.int64, types.float64
    spec = numba.typeof(K.KernelSpec(1, 1, 1, 1, 0, 1e-5))
    schedule = numba.typeof(K.Schedule(0, 0, 0, 1, 1, 1, 0, 0, 0, 0))
    return {
        "_moments": (data, i64, i64, i64),
        "_moments_two_pass": (data, i64),
        "_dots": (data, data, i64, i64, f64),
        "_dots_weighted": (data, data, data, i64, i64, i64, f64),
        "_normalize": (data, data, i64, i64, f64, f64, f64),
        "_normalize_fused": (data, data, data, data, i64, i64, f64, f64, f64, spec),
        "_normalize_per_element": (data, data, data, data, i64, i64, i64, f64, f64),
        "_normalize_per_element_fused": (data, data, data, data, data, data, i64, i64, i64, f64, f64, spec),
        "_normalize_per_element_rectified": (data, data, data, data, dtype, dtype, dtype, dtype),
        "_normalize_per_element_residual": (
            data,
            data,
            data,
            data,
            data,
            dtype,
            dtype,
            dtype,
            types.boolean,
            dtype,
        ),
        "_normalize_row_sum_next": (
            data,
            data,
            data,
            data,
            data,
            f64,
            f64,
            data,
            f64,
            types.boolean,
            types.boolean,
            dtype,
        ),
        "_pipelined_rows": (
            data,
            data,
            data,
            data,
            data,
            spec,
            work,
            work,
            i64,
            i64,
            types.boolean,
            types.boolean,
            dtype,
        ),
        "_cl_store_rows": (
            data,
            data,
            data,
            data,
            compute,
            i64,
            i64,
            i64,
            i64,
            i64,
            spec,
            types.boolean,
            types.boolean,
            types.boolean,
        ),
        "_cl_store_rows_plain": (data, data, compute, i64, i64, i64, i64, i64, i64),
        "_pipelined_task": (data, data, data, data, data, spec, work, work, i64, i64),
        "_act_loop": (data, data, i64, f64),
        "_add_skip_span": (data, data, data, data, i64, i64, i64),
        "_add_row": (data, work),
        "_dx_span": (data, data, data, f64, f64, f64, f64),
        "_dx_per_element_span": (data, data, data, data, f64, f64, f64, f64),
        "_row_dots_and_partials": (data, data, data, work, work, f64, f64),
        "_param_partials": (data, data, f64, f64, work, work),
        "_cl_block_moments": (data, work, spec, schedule, i64),
        "_cl_merge_set": (work, work, spec, schedule, i64),
        "_cl_set_stats": (work, work, work, spec, schedule, i64),
        "_cl_set_dx_coefs": (compute, work, work, work, compute, spec, i64),
        "_cl_normalize_block": (data, data, data, data, data, spec, schedule, i64, i64),
        "_cl_block_dots": (data, data, work, work, spec, schedule, i64),
        "_cl_sum_set": (work, work, spec, schedule, i64),
        "_cl_dx_block": (data, data, data, data, spec, schedule, i64, i64),
    }[name]


#: The modules of the kernel family, in which the helpers and kernels are looked up by name.
MODULES = (numerics, epilogue, rows, planes, channels_last, K.dispatch)


def _compiled(name):
    """The compiled function ``name`` of the kernel family."""
    for module in MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def _optimized_ir(name, dtype, **overrides):
    dispatcher = numba.njit(**{**JIT_OPTIONS, "cache": False, **overrides})(_compiled(name).py_func)
    signature = _signature(name, dtype)
    dispatcher.compile(signature)
    return dispatcher.inspect_llvm(signature)


#: A function definition of the LLVM module, up to the next one.
_FUNCTION = re.compile(r"^define [^\n]*?@\"?([^\"(\s]+)[^\n]*\n(?:(?!define ).*\n?)*", re.MULTILINE)


def _vector_loops(ir):
    """Return (number of vectorized loops, widest vector per element type) of an LLVM module.

    Numba's own functions do not count: the module also holds them, and their loops
    (string concatenation for error messages) come and go with unrelated edits.
    """
    ours = "".join(m.group(0) for m in _FUNCTION.finditer(ir) if not m.group(1).startswith("_ZN5numba"))
    widths = {}
    for lanes, element in _VECTOR_OP.findall(ours):
        widths[element] = max(widths.get(element, 0), int(lanes))
    return len(_VECTOR_BODY.findall(ours)), widths


def test_every_loop_helper_is_listed():
    """A new loop helper (inlined or not) must be added to VECTOR_LOOPS.

    Strategy helpers (with a ``prange`` loop) are parts of a kernel: their
    loops count in KERNEL_VECTOR_LOOPS.
    """
    helpers = set()
    for module in MODULES:
        for name, obj in vars(module).items():
            func = getattr(obj, "py_func", None)
            if func is None or name.endswith("_serial") or obj.targetoptions.get("parallel"):
                continue
            source = inspect.getsource(func)
            if "prange(" not in source and re.search(r"^\s+for .+ in range\(", source, re.MULTILINE):
                helpers.add(name)
    assert set(VECTOR_LOOPS) <= helpers, sorted(set(VECTOR_LOOPS) - helpers)
    # the group merges loop over a handful of channels or blocks, not over data
    assert helpers - set(VECTOR_LOOPS) <= {
        "_cf_merge_group",
        "_cf_group_coefs",
        "_cl_group_stats",
        "_cl_set_coefs",
        "_cl_given_coefs",  # the sets' coefficient vectors of given statistics, once per call
        "_cl_set_means",
        "_cl_group_coefs",
        "_cl_tile_into",  # repeats a few per-channel vectors, once per call or fused task
        "_cf_group_statistics",  # calls _moments over a group's blocks
        "_group_coef_table",
        "_row_chunk",  # calls the row loops of _row_dots_and_partials and _dx_*_span
        "_add_skip_rows",  # calls _add_skip_span per row
        "_cl_forward_split",  # its loop sets up coefficients per statistics set (the phases are helpers)
        "_cl_store_dx_coefs",  # over the channels of one group
        "_finish_channel_dots_loop",  # a correction per channel of a block, 16-bit data only
        # the head and tail of a streamed block (under one vector each); the middle is a vector-IR loop
        "_cl_stream_block",
        "merge_rank_moments",  # over channels and ranks: a few numbers per rank (split BatchNorm)
        "update_running_stats",  # over channels, once per training step
        "update_running_from_rstd",  # the same, from rstd
        "_update_running",  # their loop
        # per plane, over its blocks (one call of the block loop each)
        "_cf_dots_plane",
        "_cf_dx_plane",
        "_channel_param_grads",  # one channel's block partials over the batch
    }, sorted(helpers - set(VECTOR_LOOPS))


@pytest.mark.parametrize("dtype", [types.float32, types.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(VECTOR_LOOPS))
def test_inner_loops_are_vectorized(name, dtype):
    loops, widths = _vector_loops(_optimized_ir(name, dtype))
    assert loops >= VECTOR_LOOPS[name], (
        f"{name} ({dtype}): {loops} vectorized loops, expected {VECTOR_LOOPS[name]}; vector widths {widths}"
    )
    # at least 256-bit vectors: 8 float32 or 4 float64 lanes (x86-64 with AVX or better)
    assert widths.get("float", 0) >= 8 or widths.get("double", 0) >= 4, f"{name} ({dtype}): {widths}"


def _dx_block(dx, dy, x, off, count, a, kx, mean, k0):
    storage.affine_dx_span(dx, dy, x, off, count, a, kx, mean, k0)


@pytest.mark.parametrize(
    "storage_type, lanes",
    [
        (types.float32, "16 x float"),
        (types.float64, "8 x double"),
        (types.uint16, "16 x i16"),
        (types.int16, "16 x half"),
    ],
    ids=["float32", "float64", "bfloat16", "float16"],
)
@pytest.mark.parametrize(
    "name, loops, label",
    [
        ("_normalize_per_element", 4, "affine_rows"),
        ("_normalize", 1, "affine_span"),
        ("_dx_block", 1, "affine_dx_span"),
        ("_cl_store_rows_plain", 1, "affine_coefs"),
        ("_cl_dx_block", 1, "affine_dx_coefs"),
    ],
)
def test_affine_loops_are_explicit_vector_code(name, loops, label, storage_type, lanes):
    """The plain normalize loops and the channels-first ``dx`` block are ``storage.affine_*``'s vector IR.

    LayerNorm's normalize (``_normalize_per_element``): one loop of whole
    512-bit vectors and one masked vector for the rest per combination of
    weight and bias present or absent (four); the channels-first one
    (``_normalize``), the ``dx`` of a channels-first block (``affine_dx_span``,
    as ``planes._cf_dx_block_k`` calls it), the plain store of a
    channels-last block (``affine_coefs``) and its ``dx`` (``affine_dx_coefs``):
    one.  No loop
    is left to LLVM's vectorizer, whose alias checks and remainder loops these
    replace.
    """
    data = types.Array(storage_type, 1, "C")
    param = types.Array(types.float64 if storage_type == types.float64 else types.float32, 1, "C")
    i64, f64 = types.int64, types.float64
    function = _dx_block if name == "_dx_block" else _compiled(name).py_func
    dispatcher = numba.njit(**{**JIT_OPTIONS, "cache": False})(function)
    compute = types.float64 if storage_type == types.float64 else types.float32
    if name == "_normalize":  # x, y, off, count, mean, scale, shift
        signature = (data, data, i64, i64, f64, f64, f64)
    elif name == "_dx_block":  # dx, dy, x, off, count, a, kx, mean_hi, k0
        signature = (data, data, data, i64, i64, compute, compute, compute, compute)
    elif name == "_cl_store_rows_plain":  # x, y, coef, base, span, off, rows, nc, tile_rows
        signature = (data, data, types.Array(compute, 1, "C"), i64, i64, i64, i64, i64, i64)
    elif name == "_cl_dx_block":  # dy, x, dx, coef, spec, schedule, blk, tile_rows
        spec = numba.typeof(K.KernelSpec(1, 1, 1, 1, 0, 1e-5))
        schedule = numba.typeof(K.Schedule(0, 0, 0, 1, 1, 1, 0, 0, 0, 0))
        signature = (data, data, data, types.Array(compute, 1, "C"), spec, schedule, i64, i64)
    else:  # x, y, weight, bias, off, count, s0, mean, rstd
        signature = (data, data, param, param, i64, i64, i64, f64, f64)
    dispatcher.compile(signature)
    ir = dispatcher.inspect_llvm(signature)
    assert len(re.findall(rf"^{label}{_EXPLICIT_LOOP}", ir, re.MULTILINE)) == loops
    # LLVM merges the four cases' masked stores into one; a 16-bit one only with AVX-512BW
    # (vmovdqu16): on an AVX2 host LLVM expands it into scalar stores
    if storage_type not in (types.uint16, types.int16) or _host_features().get("avx512bw"):
        assert "call void @llvm.masked.store" in ir
    assert f"store <{lanes}>" in ir
    assert not re.search(r"^vector\.body", ir, re.MULTILINE)
    # bfloat16 on a CPU with AVX512-BF16: vcvtneps2bf16 (LLVM's fptrunc to bfloat), the
    # integer rounding behind the subnormal check (tests/test_storage.py checks the bits)
    if storage_type == types.uint16 and storage._has_bf16_instructions(cpu_target.target_context):
        assert "to <16 x bfloat>" in ir and "@llvm.x86.avx512.fpclass.ps.512" in ir


def _host_features():
    from llvmlite import binding

    return binding.get_host_cpu_features()


def _convert(src, dst):
    for i in range(src.size):
        storage.store(dst, i, storage.load(src, i))


@pytest.mark.parametrize(
    "src, dst, instruction",
    [
        (types.uint16, types.float32, "vpslld"),  # bfloat16 -> float32: a shift
        (types.float32, types.uint16, "vpsrld"),  # float32 -> bfloat16: integer rounding
        (types.int16, types.float32, "vcvtph2ps"),  # float16 <-> float32: F16C
        (types.float32, types.int16, "vcvtps2ph"),
    ],
    ids=["bf16-load", "bf16-store", "f16-load", "f16-store"],
)
def test_16bit_conversion_loops_are_vectorized(src, dst, instruction):
    """The load / store loops of the 16-bit storage formats compile to SIMD code (_kernels/storage.py)."""
    signature = (types.Array(src, 1, "C"), types.Array(dst, 1, "C"))
    dispatcher = numba.njit(**{**JIT_OPTIONS, "cache": False})(_convert)
    dispatcher.compile(signature)
    loops, widths = _vector_loops(dispatcher.inspect_llvm(signature))
    assert loops == 1, (loops, widths)  # bfloat16's loops are integer vectors: no float widths
    assert instruction in dispatcher.inspect_asm(signature)


def test_the_check_sees_a_scalar_loop():
    """Control: without reassociation a float64 reduction cannot vectorize, and the count shows it."""
    assert _vector_loops(_optimized_ir("_dots", types.float32))[0] == 1
    assert _vector_loops(_optimized_ir("_dots", types.float32, fastmath=set()))[0] == 0


@pytest.mark.parametrize("storage_type", [types.uint16, types.int16], ids=["bfloat16", "float16"])
def test_16bit_moments_sum_in_explicit_steps(storage_type):
    """16-bit block moments and dot products are ``storage.step_sums`` / ``step_dots``' vector IR.

    Four vectors' deviations and squares summed in float32 per step, chained in
    float64 (docs/perf-notes/16-bit-float32-accumulation.md); the two-pass
    fallback is LLVM's vectorized float64 loop, as for float32 data.
    """
    ir = _optimized_ir("_moments", storage_type)
    assert len(re.findall(rf"^step_sums{_EXPLICIT_LOOP}", ir, re.MULTILINE)) == 2
    # bfloat16 with AVX512-BF16 first tries the plain sums by vdpbf16ps: one explicit loop
    # (not counted among the pinned vector loops, which float16 shares)
    dot = storage_type == types.uint16 and storage._host_has_bf16_dot()
    assert len(re.findall(rf"^dot_sums{_EXPLICIT_LOOP}", ir, re.MULTILINE)) == (1 if dot else 0)
    assert ("llvm.x86.avx512bf16.dpbf16ps.512" in ir) == dot
    assert "fadd arcp <16 x float>" in ir and "fpext <16 x float>" in ir
    assert _vector_loops(ir)[0] == VECTOR_LOOPS["_moments"]
    # the channels-first dot products: one loop of steps, no loop left to LLVM
    ir = _optimized_ir("_dots", storage_type)
    assert len(re.findall(rf"^step_sums{_EXPLICIT_LOOP}", ir, re.MULTILINE)) == 1
    assert not re.search(r"^vector\.body", ir, re.MULTILINE)
