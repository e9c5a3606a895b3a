"""The kernels keep their inner loops vectorized once the loop helpers are inlined into them.

Each kernel of ``fastnorm._kernels`` is compiled afresh (its single-threaded
build, no cache) for float32 data and for the two 16-bit storage views, and the
vectorized loops of its optimized IR are counted as in ``tests/test_vectorized.py``
(which checks the loop helpers one by one).  The compilation takes minutes, in one
subprocess for one CPU model: this module is one unit of work for a pytest-xdist
worker (``tests/conftest.py``), so that it runs once per session, not once per worker.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numba
import pytest
from numba import types
from test_vectorized import _compiled, _vector_loops

from fastnorm import _kernels as K
from fastnorm._config import JIT_OPTIONS

pytestmark = pytest.mark.jit


#: kernel -> vectorized loops of its single-threaded build (every inlined block loop counts;
#: not Numba's own functions, such as its string concatenation, see ``_vector_loops``).
#: The activations' loops are not among them: they run in the epilogue's compiled store
#: helpers (``_normalize_fused``, ``_normalize_per_element_fused``, counted in test_vectorized.py).
KERNEL_VECTOR_LOOPS = {
    # rows_forward and rows_skip_forward call it.  Both count the explicit vector loops of
    # the rows' plain normalize (storage.affine_rows: four per inlined call, one per
    # weight/bias case; see test_vectorized.py)
    "rows_forward_with_skip": 90,
    "rows_inference": 34,
    "rows_backward": 24,
    # counting affine_span's explicit loop per inlined call of _normalize, and affine_dx_span's
    # per inlined call of _cf_dx_block_k
    "planes_forward": 30,
    "planes_inference": 19,
    "planes_backward": 18,
    # the backward through an activation: also the inference kernel's store helper
    # (_normalize_fused, a compiled call) for each plane's or block's dz
    "planes_backward_epilogue": 36,
    # one build of _cl_normalize_block (the fused forward passes tile_rows, no literal 1)
    # and tile copies by memmove (_cl_tile_into): no loop of a compiled function is lost
    "channels_last_forward": 34,
    "channels_last_inference": 22,
    # the dx coefficients of one channel per group are a compiled call (_cl_set_dx_coefs,
    # counted in test_vectorized.py); LLVM no longer makes a vectorized version of
    # _cl_param_grads' loop for an empty range of sets, which never runs (13 until then)
    "channels_last_backward": 12,
    # the backward through an activation: also the inference kernel's block code
    # (_cl_normalize_block, a compiled call) for each block's dz
    "channels_last_backward_epilogue": 44,
    "rows_skip_bias_backward": 3,
    # BatchNorm split across processes
    "planes_batch_stats": 4,
    "channels_last_batch_stats": 12,
    "planes_backward_reduce": 8,
    "channels_last_backward_reduce": 9,
    "planes_backward_apply": 5,
    "channels_last_backward_apply": 1,
}

#: The 16-bit builds whose count differs from KERNEL_VECTOR_LOOPS: their block moments and
#: dot products are explicit loops of steps (``storage.step_sums`` / ``step_dots``, counted),
#: which LLVM merges where the float32 build keeps two vectorized loops (the centered and
#: uncentered sums of ``_moments`` differ only by the shift; read off the loop labels).
KERNEL_VECTOR_LOOPS_16BIT = {
    "rows_forward_with_skip": 89,  # 11 loops of steps for 12 of LLVM's
    "planes_forward": 28,  # 4 for 6
    "planes_backward": 16,  # 1 for 3
    "planes_backward_epilogue": 32,  # bfloat16 (float16: 34)
    # 16-bit blocks keep z stored, then dz over the block: no rectifier-gradient store loops
    "channels_last_backward_epilogue": 41,
}


#: The CPU model (LLVM's ``-mcpu``, Numba's ``NUMBA_CPU_NAME``) the kernels' counts are
#: pinned to.  LLVM's cost model depends on it: compiled for Intel AVX-512 models
#: (skylake-avx512, icelake-server, rocketlake), ``rows_backward`` has one vectorized loop
#: fewer (the float64 partials of ``_param_partials``, COLUMN_TILES path).  So the kernels
#: are compiled for this model and its own features (AVX-512) in a subprocess, whatever the
#: host (compiled, never run): with an AVX2 host's features, LLVM keeps float64 loops at 4
#: lanes and every backward kernel counts 1-6 loops fewer.  A count changes only when the
#: code does.
PINNED_CPU = "znver4"

#: The storage types of the kernels' data, by dtype name (16-bit floats as their integer views).
STORAGE_TYPES = {"float32": types.float32, "bfloat16": types.uint16, "float16": types.int16}


def _kernel_signature(name, storage_type):
    """Numba signature of kernel ``name`` for data of ``storage_type`` (float32 parameters)."""
    data = types.Array(storage_type, 1, "C")
    par = types.Array(types.float32, 1, "C")  # weight, bias, skip_bias and their gradients
    stats = types.Array(types.float64, 1, "C")
    spec = (types.int64,) * 5 + (types.float64, types.int64, types.float64)  # KernelSpec fields
    params = types.Tuple(spec + (types.int64,) * len(K.Schedule._fields))
    if name == "rows_forward_with_skip":  # x, skip, skip_bias, weight, bias, residual, h, y
        return (data, data, par, par, par, data, data, data, stats, stats, params)
    if name == "rows_skip_bias_backward":  # dh, dskip_bias
        return (data, par, params)
    if name.endswith("batch_stats"):  # x, mean, m2
        return (data, stats, stats, params)
    if name.endswith("backward_reduce"):  # dy, x, mean, rstd, sum_dy, sum_dy_xhat
        return (data, data, stats, stats, stats, stats, params)
    if name.endswith("backward_apply"):  # dy, x, weight, mean, rstd, sum_dy, sum_dy_xhat, count, dx
        return (data, data, par, stats, stats, stats, stats, types.float64, data, params)
    if name.endswith("backward_epilogue"):  # grad, x, weight, bias, residual, dz, mean, rstd, dx, dw, db
        return (data, data, par, par, data, data, stats, stats, data, par, par, params)
    if name.endswith("backward"):  # dy, x, weight, mean, rstd, dx, dweight, dbias
        return (data, data, par, stats, stats, data, par, par, params)
    if name.endswith("inference"):  # x, weight, bias, residual, grad, y
        return (data, par, par, data, data, data, stats, stats, params)
    return (data, par, par, data, data, stats, stats, params)  # x, weight, bias, residual, y


def kernel_loop_counts():
    """``{"kernel/dtype": (vectorized loops, widths)}`` of the kernels of KERNEL_VECTOR_LOOPS, this CPU."""
    counts = {}
    for name in KERNEL_VECTOR_LOOPS:
        for dtype, storage_type in STORAGE_TYPES.items():
            dispatcher = numba.njit(**{**JIT_OPTIONS, "cache": False})(_compiled(name).py_func)
            signature = _kernel_signature(name, storage_type)
            dispatcher.compile(signature)
            counts[f"{name}/{dtype}"] = _vector_loops(dispatcher.inspect_llvm(signature))
    return counts


@pytest.fixture(scope="module")
def pinned_kernel_loops():
    """:func:`kernel_loop_counts` compiled for :data:`PINNED_CPU`, in a subprocess."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_vectorized_kernels as t; "
        "print(json.dumps(t.kernel_loop_counts()))"
    )
    tests = pathlib.Path(__file__).resolve().parent
    env = {**os.environ, "NUMBA_CPU_NAME": PINNED_CPU, "NUMBA_CPU_FEATURES": ""}  # "": the model's
    result = subprocess.run(
        [sys.executable, "-c", code, str(tests)], capture_output=True, text=True, env=env, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("dtype", sorted(STORAGE_TYPES))
@pytest.mark.parametrize("name", sorted(KERNEL_VECTOR_LOOPS))
def test_kernels_keep_their_vectorized_loops(pinned_kernel_loops, name, dtype):
    """The loops stay vectorized once inlined into the kernels (float64 counts as float32).

    Also with 16-bit data (the integer views of ``_kernels/storage.py``, float32 parameters):
    the conversions are in the loops, which keep at least float32's count, or
    :data:`KERNEL_VECTOR_LOOPS_16BIT`'s.  Compiled for :data:`PINNED_CPU`.
    """
    loops, widths = pinned_kernel_loops[f"{name}/{dtype}"]
    expected = KERNEL_VECTOR_LOOPS[name]
    if dtype != "float32":
        expected = KERNEL_VECTOR_LOOPS_16BIT.get(name, expected)
    assert loops >= expected, (
        f"{name} ({dtype}, -mcpu={PINNED_CPU}): {loops} vectorized loops, expected "
        f"{expected}; vector widths {widths}"
    )
