"""Benchmark fastnorm against torch and a memcpy, and gate regressions on the ratios.

Run ``python -m benchmarks --help`` from the repository root.  For every case (norm kind x pass x
memory layout x dtype x shape) the command times three things *interleaved in
rounds within one process*: the fastnorm call, the same work in
``torch.nn.functional`` (when torch is importable) and ``np.copyto`` of the
same tensor into a preallocated buffer (the physical floor: one read and one
write of the tensor).  It reports the medians and two ratios per case:

* ``fastnorm/torch`` -- the median over rounds of the per-round ratio;
* ``fastnorm/memcpy`` -- likewise against the copy.

With ``--floor`` it also times the pass's *traffic floor*: a parallel Numba
kernel, on the same threads, that reads every input of the pass once and
writes its output once and does nothing else (forward and inference: ``y =
x``; backward: ``dx = x + dy``), and reports ``fastnorm/floor``.  No schedule
of the pass moves less memory, so this ratio says how far a case is from the
memory-bandwidth floor of this machine.  ``--scaling`` reports the floor's own
1 -> N thread speed-up beside fastnorm's: the speed-up the memory system
allows.

In each round, each implementation's time is the fastest of 3 short blocks of
calls (about 1 ms each, at least one call): preemption by other processes
only ever adds time, so this keeps a shared machine's noise out of the rounds,
and the median over rounds discards the rounds it still reaches.

Ratios of times measured side by side cancel most of the machine and load
dependence of absolute times, so the regression gate (``--check``) compares
ratios only, never absolute times, against the committed thresholds in
``benchmarks/thresholds.toml``.  See ``docs/benchmarks.md``.

Cases
-----
``bn``/``in``/``gn`` (BatchNorm, InstanceNorm, GroupNorm) run on
``(N, C, H, W)`` tensors in NCHW or channels-last (``nhwc``) memory;
``ln``/``rms`` (LayerNorm, RMSNorm) normalize the last dim of ``(rows, 768)``
and have no channels-last variant.  GroupNorm uses 32 groups when 32 divides
``C`` (every shape here), else 8, else 1 (:func:`group_count`).  Passes:
``fwd`` (:func:`fastnorm.forward`, training statistics), ``inf``
(:func:`fastnorm.forward_inference`) and ``bwd`` (:func:`fastnorm.backward`,
``dx``, ``dweight`` and ``dbias``).  Every fastnorm call writes into a
preallocated ``out=``.

The epilogue passes (:data:`EPILOGUE_CASES`, float32, on the layers that use
them) time the fused paths against torch's unfused composites: ``resrelu_fwd``
/ ``resrelu_fb`` (``relu(bn(x) + residual)``, a ResNet block's tail),
``silu_fwd`` / ``silu_fb`` (``silu(group_norm(x))``, a UNet layer) and
``skip_fwd`` / ``skip_fb`` (``norm(x + skip + skip_bias)`` with the sum
returned, LayerNorm and RMSNorm rows); ``_fwd`` is the training forward,
``_fb`` the forward then the backward of every input.

The dtypes are float32 and float64, and the 16-bit storage types bfloat16
(``ml_dtypes.bfloat16``, ids ``bf16``) and float16 (``f16``) with float32
weight and bias.  The 16-bit cases (plain passes only) are opt-in: ``--dtypes``,
``--cases`` or ``--half`` select them, the default sweep and ``--quick`` do not
(:data:`DEFAULT_DTYPES`).  ``--half`` is the 16-bit comparison set
(:data:`HALF_SET`: BN/IN/GN at ``(32, 64, 56, 56)`` in both layouts and LN/RMS
at ``(4096, 768)``, forward and backward, each in float32, bfloat16 and
float16); ``python -m benchmarks.half`` (:mod:`.half`) times it and prints the
16-bit/float32 and fastnorm/torch ratios.  torch runs its own 16-bit CPU kernels
in "mixed" mode (float32 weight and bias), oneDNN its bfloat16 primitives.

``--networks`` selects the layers of real networks instead (:data:`NETWORK_CASES`,
size ``net``, every pass, float32 unless ``--dtypes``): ResNet-50's BatchNorm stages at
batch 8, Stable Diffusion's UNet GroupNorm (C = 320, 640, 1280), style-transfer
InstanceNorm, ConvNeXt-T's channels-last LayerNorm as rows of C, ViT LayerNorm rows and
LLaMA RMSNorm rows of 2048-8192.  They are opt-in like the 16-bit dtypes.

With ``--onednn`` it also times oneDNN's primitives (``libdnnl`` from the
``onednn-cpu-gomp`` wheel, through :mod:`benchmarks.baselines.onednn`) on preallocated
buffers, where oneDNN 3.2 has one: BatchNorm (both layouts), InstanceNorm
(NCHW) and LayerNorm, float32 and bfloat16 (float16 only on CPUs with
``avx512_core_fp16``); it reports ``fastnorm/onednn``.

With ``--onnxruntime`` it also times ONNX Runtime's CPU operators
(:mod:`benchmarks.baselines.onnxruntime`: a one-node ONNX model per case,
``intra_op_num_threads`` = the bench's threads, inputs and outputs bound to
preallocated buffers through an IOBinding) in the same interleaved rounds,
where ONNX Runtime has the case: the forward passes only (``fwd``, ``inf``,
``skip_fwd``) of BatchNorm (both layouts; channels-last as the ``(N*H*W, C)``
view), InstanceNorm (NCHW, float32), GroupNorm (NCHW; ONNX Runtime runs the
operator's function body), LayerNorm and RMSNorm, float32 and float64; it
reports ``fastnorm/onnxruntime``.

torch's functional calls allocate their outputs.  glibc serves an
allocation above its mmap threshold (at most 32 MiB) with fresh pages, and
first-touching them costs more than the kernel (about 10 ms for 33.5 MB
here), a cost fastnorm's ``out=`` calls never pay.  So that the benchmark
compares kernels and not page faults, the CLI first asks glibc to keep freed
memory for reuse (:func:`reuse_freed_memory`; ``--fresh-pages`` leaves the
allocator alone); the JSON records which was used.

The torch baseline of ``inf`` is ``F.batch_norm(training=False)`` for
BatchNorm; torch has no given-statistics path for the other norms, whose
inference is the same call as training, so their ``inf`` baseline is the
ordinary forward.  The torch ``bwd`` baseline is ``torch.autograd.grad`` of a
graph built once (``retain_graph=True``), so only the backward is timed.

Modules
-------
:mod:`.cases` (the case matrix and its selection), :mod:`.runtime` (threads,
OpenMP spinning, the allocator, loading torch and oneDNN), :mod:`.workloads`
(the data and callables of a case), :mod:`.baselines` (torch, oneDNN, ONNX Runtime, the
traffic floor), :mod:`.timing` (interleaved rounds, ratios), :mod:`.gate`
(thresholds files and the regression gate), :mod:`.report` (tables, JSON,
Markdown, plot), :mod:`.cli` (the command line); the scripts :mod:`.fused`
(the fused epilogues) and :mod:`.half` (16-bit data).  This package is not part of
the installed library: ``fastnorm`` never imports it.
"""

from .baselines.floor import floor_add, floor_add_stream, floor_copy, floor_copy_stream
from .cases import (
    DEFAULT_DTYPES,
    DTYPES,
    EPILOGUE_CASES,
    EPILOGUE_PASSES,
    HALF_DTYPES,
    HALF_SET,
    KINDS,
    LAYOUTS,
    NETWORK_CASES,
    PASSES,
    QUICK_SHAPES,
    SIZES,
    Case,
    all_cases,
    group_count,
    numpy_dtype,
    select_cases,
)
from .cli import build_parser, main
from .gate import (
    CheckResult,
    Threshold,
    Violation,
    evaluate,
    format_thresholds,
    load_thresholds,
    run_check,
    worst_ratios,
)
from .report import (
    Progress,
    environment,
    format_table,
    format_time,
    summarize,
    summarize_scaling,
    write_json,
    write_markdown,
    write_plot,
)
from .runtime import (
    TORCH_SPINCOUNT,
    load_onednn,
    max_threads,
    optional_torch,
    reuse_freed_memory,
    set_threads,
)
from .timing import Measurement, interleaved, measure_case, measure_scaling
from .workloads import Workload, make_workload

__all__ = [
    "Case",
    "Measurement",
    "Threshold",
    "Violation",
    "CheckResult",
    "Workload",
    "Progress",
    "KINDS",
    "PASSES",
    "EPILOGUE_CASES",
    "EPILOGUE_PASSES",
    "LAYOUTS",
    "DTYPES",
    "DEFAULT_DTYPES",
    "HALF_DTYPES",
    "HALF_SET",
    "NETWORK_CASES",
    "SIZES",
    "QUICK_SHAPES",
    "TORCH_SPINCOUNT",
    "group_count",
    "numpy_dtype",
    "all_cases",
    "select_cases",
    "make_workload",
    "floor_copy",
    "floor_copy_stream",
    "floor_add",
    "floor_add_stream",
    "optional_torch",
    "load_onednn",
    "set_threads",
    "max_threads",
    "reuse_freed_memory",
    "interleaved",
    "measure_case",
    "measure_scaling",
    "summarize",
    "summarize_scaling",
    "load_thresholds",
    "evaluate",
    "run_check",
    "format_time",
    "format_table",
    "environment",
    "write_json",
    "write_markdown",
    "write_plot",
    "format_thresholds",
    "worst_ratios",
    "build_parser",
    "main",
]
