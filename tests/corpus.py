"""A fixed corpus of kernel calls whose outputs are pinned bitwise by their SHA-256 digests.

Every kind x layout x dtype, odd shapes, every schedule the kernels can take
(the cases of ``test_kernel_paths.py``), and every pass: training forward,
inference, backward with and without the parameter gradients, in-place
outputs.  ``tests/data/corpus.json`` holds one digest per case and host CPU,
written (for this host's CPU, keeping the others) by::

    python tests/corpus.py --write

A refactor of the kernels, the planner or the dispatch must leave every
digest unchanged (``tests/test_corpus.py``); the C ABI must produce the same
bytes (``tests/test_capi.py``).  The digests depend on the machine code, so
they are kept per CPU they were written on (the LLVM host CPU name keys
them in the file): LLVM vectorizes reductions for the host's vector width,
and a different width sums in a different order.  A CPU's digests are only
ever written from code that reproduces the other CPUs' pinned digests.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cases import Case, arrange, rng_for  # noqa: E402

import fastnorm  # noqa: E402
from fastnorm._plan import _plan  # noqa: E402

DIGEST_FILE = HERE / "data" / "corpus.json"
DTYPES = (np.float32, np.float64)

#: One case per schedule of the kernels (``test_kernel_paths.py`` checks which each takes):
#: name -> (kind, shape, groups or normalized_ndim, channels_last).
PATH_CASES = {
    # name: (kind, shape, groups/normalized_ndim, channels_last)
    # BatchNorm training passes fused in tiles of channels (5 channels, 8 tiles)
    "bn-fused-cf-channel-tiles": ("batch_norm", (3, 40, 5, 7), None, False),
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

#: Parameters of a call: (weight, bias) present?
AFFINE = {"wb": (True, True), "w": (True, False), "none": (False, False)}


def _odd_cases():
    """Odd shapes of every kind, spatial rank 0..3 (logical channels-first shapes)."""
    return [
        Case("batch_norm", (3, 5, 7, 3)),
        Case("batch_norm", (5, 6)),
        Case("batch_norm", (2, 3, 70, 70)),
        Case("batch_norm", (2, 40, 4100)),
        Case("batch_norm", (2, 17, 3, 5, 7)),
        Case("instance_norm", (3, 5, 7, 3)),
        Case("instance_norm", (33, 3, 1500)),
        Case("instance_norm", (2, 7, 2, 3, 5)),
        Case("group_norm", (3, 6, 5, 7), num_groups=3),
        Case("group_norm", (2, 4, 5003), num_groups=2),
        Case("group_norm", (4, 32, 8, 1100), num_groups=8),
        Case("group_norm", (6, 8, 3000), num_groups=2),
        Case("group_norm", (1, 320, 9, 11), num_groups=32),
        Case("layer_norm", (7, 33), normalized_ndim=1),
        Case("layer_norm", (3, 5, 6), normalized_ndim=2),
        Case("layer_norm", (3, 9001), normalized_ndim=1),
        Case("layer_norm", (40, 5000), normalized_ndim=1),
        Case("layer_norm", (70, 300), normalized_ndim=1),
        Case("rms_norm", (200, 300), normalized_ndim=1, eps=None),
        Case("rms_norm", (5, 4, 7), normalized_ndim=2, eps=1e-6),
    ]


def _path_cases():
    """The cases of ``test_kernel_paths.py``, one per schedule, as :class:`Case` values."""
    cases = []
    for name in sorted(PATH_CASES):
        kind, shape, arg, channels_last = PATH_CASES[name]
        if channels_last:  # given as (N, *spatial, C): back to the logical (N, C, *spatial)
            shape = (shape[0], shape[-1], *shape[1:-1])
        cases.append(
            Case(
                kind,
                tuple(shape),
                num_groups=arg if kind == "group_norm" else None,
                normalized_ndim=arg if kind in ("layer_norm", "rms_norm") else None,
                eps=None if kind == "rms_norm" else 1e-5,
            )
        )
    return cases


def corpus():
    """Return ``{name: (case, layout, dtype, affine)}`` of every corpus entry."""
    entries = {}
    for case in [*_odd_cases(), *_path_cases()]:
        layouts = ("cf", "cl", "cl_memory") if case.per_channel else ("cf",)
        for layout in layouts:
            for dtype in DTYPES:
                for affine in AFFINE:
                    if affine == "w" and layout == "cl_memory":
                        continue  # the same kernel call as "cl"
                    if case.kind == "rms_norm" and affine == "wb":
                        continue
                    name = f"{case}-{layout}-{np.dtype(dtype).name}-{affine}"
                    entries[name] = (case, layout, dtype, affine)
    return entries


def inputs(case, layout, dtype, affine):
    """The inputs of one corpus entry: ``(x, dy, weight, bias, given_stats, spec)``.

    ``x`` and ``dy`` in the entry's layout; ``given_stats`` are the statistics
    of the inference pass; ``weight``/``bias`` are None when absent.
    """
    rng = rng_for("corpus", case, layout, np.dtype(dtype).name, affine)
    x_cf = (rng.standard_normal(case.shape) * 2.0 + 3.0).astype(dtype)
    dy_cf = rng.standard_normal(case.shape).astype(dtype)
    has_weight, has_bias = AFFINE[affine]
    weight = rng.uniform(0.5, 1.5, case.param_shape).astype(dtype) if has_weight else None
    bias = rng.standard_normal(case.param_shape).astype(dtype) if has_bias else None
    x, channels_last = arrange(x_cf, layout, case)
    dy, _ = arrange(dy_cf, layout, case)
    spec = case.spec(channels_last)
    stats_shape = _plan(x, spec, True).stats_shape
    given = fastnorm.Stats(rng.standard_normal(stats_shape), rng.uniform(0.5, 2.0, stats_shape), has_bias)
    return x, dy, weight, bias, given, spec


def outputs(case, layout, dtype, affine):
    """Run every pass of one corpus entry; return the list of output arrays, in a fixed order.

    ``[y, mean, rstd, y_inference, dx, dweight, dbias, dx_alone, y_inplace,
    dx_inplace]`` without the absent ``dweight``/``dbias``.
    """
    x, dy, weight, bias, given, spec = inputs(case, layout, dtype, affine)
    y, stats = fastnorm.forward(x, spec, weight, bias)
    y_inference = fastnorm.forward_inference(x, given, spec, weight, bias)
    dx, dweight, dbias = fastnorm.backward(dy, x, stats, spec, weight)
    dx_alone, _, _ = fastnorm.backward(dy, x, stats, spec, None, with_bias=False)
    x_inplace = x.copy(order="K")
    y_inplace, _ = fastnorm.forward(x_inplace, spec, weight, bias, out=x_inplace)
    dy_inplace = dy.copy(order="K")
    dx_inplace, _, _ = fastnorm.backward(dy_inplace, x, stats, spec, weight, out=dy_inplace)
    arrays = [y, stats.mean, stats.rstd, y_inference, dx, dweight, dbias, dx_alone, y_inplace, dx_inplace]
    return [a for a in arrays if a is not None]


def digest(arrays):
    """SHA-256 (first 16 hex digits) of the arrays' bytes, each in its own memory order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode())
        h.update(np.ascontiguousarray(a.reshape(-1, order="A")).tobytes())
    return h.hexdigest()[:16]


def host_cpu():
    """The LLVM name of the host CPU the machine code is compiled for."""
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_name()


def pinned_digests():
    """The pinned digests: ``{host CPU name: {case name: digest}}``."""
    if not DIGEST_FILE.exists():
        return {}
    return json.loads(DIGEST_FILE.read_text())["by_cpu"]


def compute():
    """Digests of the whole corpus: ``{name: digest}``."""
    return {name: digest(outputs(*entry)) for name, entry in corpus().items()}


def main(argv):
    """Write ``tests/data/corpus.json`` (``--write``) or print mismatches against it."""
    digests = compute()
    by_cpu = pinned_digests()
    if "--write" in argv:
        DIGEST_FILE.parent.mkdir(exist_ok=True)
        by_cpu[host_cpu()] = digests
        DIGEST_FILE.write_text(json.dumps({"by_cpu": by_cpu}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(digests)} digests for {host_cpu()} to {DIGEST_FILE}")
        return 0
    pinned = by_cpu[host_cpu()]
    bad = sorted(n for n in digests if pinned.get(n) != digests[n])
    print(f"{len(digests)} cases, {len(bad)} differ" + "".join(f"\n  {n}" for n in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
