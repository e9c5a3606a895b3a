"""The benchmark cases (norm kind x pass x memory layout x dtype x shape) and their selection.

See the "Cases" section of the :mod:`benchmarks` docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Short kind names and the :class:`fastnorm.NormSpec` kinds they stand for.
KINDS = {
    "bn": "batch_norm",
    "in": "instance_norm",
    "gn": "group_norm",
    "ln": "layer_norm",
    "rms": "rms_norm",
}
#: ``fwd``: :func:`fastnorm.forward`, ``inf``: :func:`fastnorm.forward_inference`,
#: ``bwd``: :func:`fastnorm.backward`.
PASSES = ("fwd", "inf", "bwd")
#: ``nchw``: channels-first memory; ``nhwc``: channels-last (BN/IN/GN only).
LAYOUTS = ("nchw", "nhwc")
#: Every data dtype.  ``bfloat16`` (``ml_dtypes.bfloat16``) and ``float16`` are the
#: 16-bit storage types (:data:`HALF_DTYPES`): data in 16 bits, float32 arithmetic,
#: float32 weight and bias (docs/api.md, "16-bit storage").
DTYPES = ("float32", "float64", "bfloat16", "float16")
#: The 16-bit data dtypes.  They are opt-in: selected only by ``dtypes`` (``--dtypes``),
#: ``ids`` (``--cases``) or ``half_set`` (``--half``), never by the default full sweep.
HALF_DTYPES = ("bfloat16", "float16")
#: The dtypes of a selection that names none: the full sweep and the gates stay at
#: their 180 float32/float64 cases (each 16-bit kernel compiles on its first use, for
#: seconds to minutes, and the full sweep would take twice as long).
DEFAULT_DTYPES = ("float32", "float64")
SIZES = ("tiny", "mid", "large")
_DTYPE_SHORT = {"float32": "f32", "float64": "f64", "bfloat16": "bf16", "float16": "f16"}
_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
_ROW_KINDS = ("ln", "rms")

#: Shapes per size: ``conv`` for BN/IN/GN (logical NCHW), ``rows`` for LN/RMS.
SHAPES = {
    "conv": {
        "tiny": [(1, 64, 8, 8)],
        "mid": [(8, 64, 32, 32)],
        "large": [(32, 64, 56, 56), (8, 256, 64, 64)],
    },
    "rows": {"tiny": [(1, 768)], "mid": [(512, 768)], "large": [(4096, 768)]},
}
#: The fused epilogue's passes, each on the network layers that use it (float32, large):
#: ``resrelu``: ``relu(norm(x) * w + b + residual)`` (a ResNet block's tail, BatchNorm);
#: ``silu``: ``silu(norm(x) * w + b)`` (a Stable-Diffusion UNet GroupNorm);
#: ``skip``: ``norm(x + skip + skip_bias)``, returning the sum too (pre-LN transformer
#: LayerNorm, LLaMA RMSNorm).  ``_fwd``: the training forward; ``_fb``: forward then
#: backward with every gradient, against torch's unfused composite under autograd.
EPILOGUE_PASSES = ("resrelu_fwd", "resrelu_fb", "silu_fwd", "silu_fb", "skip_fwd", "skip_fb")
#: ``(kind, epilogue, layouts, shape)`` of the epilogue cases.
EPILOGUE_CASES = (
    ("bn", "resrelu", ("nchw", "nhwc"), (32, 64, 56, 56)),
    ("gn", "silu", ("nchw",), (2, 320, 64, 64)),
    ("ln", "skip", ("nchw",), (4096, 768)),
    ("rms", "skip", ("nchw",), (2048, 4096)),
)
#: The 16-bit comparison set (``--half``, :mod:`benchmarks.half`): ``(kind, layouts, shape)``
#: at a ResNet stage (BN/IN/GN, both layouts) and BERT-base rows (LN/RMS), each case in
#: :data:`HALF_SET_DTYPES` so that a 16-bit time can be divided by its float32 twin's.
HALF_SET = (
    ("bn", ("nchw", "nhwc"), (32, 64, 56, 56)),
    ("in", ("nchw", "nhwc"), (32, 64, 56, 56)),
    ("gn", ("nchw", "nhwc"), (32, 64, 56, 56)),
    ("ln", ("nchw",), (4096, 768)),
    ("rms", ("nchw",), (4096, 768)),
)
HALF_SET_PASSES = ("fwd", "bwd")
HALF_SET_DTYPES = ("float32", "bfloat16", "float16")
#: Layers of real networks (``--networks``, :func:`select_cases`'s ``networks``), every
#: pass: ``(kind, layouts, shape, where the layer is from)``.  Opt-in like the 16-bit
#: dtypes (float32 unless ``dtypes`` is given): the default sweep and the gates keep
#: their cases.  LayerNorm over the channels of a channels-last tensor (ConvNeXt) is
#: rows of ``C``: ``(N*H*W, C)``.
NETWORK_CASES = (
    ("bn", LAYOUTS, (8, 256, 56, 56), "ResNet-50 stage 1, batch 8"),
    ("bn", LAYOUTS, (8, 512, 28, 28), "ResNet-50 stage 2"),
    ("bn", LAYOUTS, (8, 1024, 14, 14), "ResNet-50 stage 3"),
    ("bn", LAYOUTS, (8, 2048, 7, 7), "ResNet-50 stage 4"),
    ("gn", LAYOUTS, (2, 320, 64, 64), "Stable Diffusion UNet, 64x64 latents"),
    ("gn", LAYOUTS, (2, 640, 32, 32), "Stable Diffusion UNet"),
    ("gn", LAYOUTS, (2, 1280, 16, 16), "Stable Diffusion UNet"),
    ("gn", LAYOUTS, (2, 1280, 8, 8), "Stable Diffusion UNet, middle block"),
    ("in", LAYOUTS, (4, 64, 128, 128), "style transfer, 256x256 images"),
    ("in", LAYOUTS, (4, 128, 64, 64), "style transfer"),
    ("ln", ("nchw",), (25088, 96), "ConvNeXt-T stage 1 (channels-last 8x56x56x96)"),
    ("ln", ("nchw",), (6272, 192), "ConvNeXt-T stage 2"),
    ("ln", ("nchw",), (1568, 384), "ConvNeXt-T stage 3"),
    ("ln", ("nchw",), (392, 768), "ConvNeXt-T stage 4"),
    ("ln", ("nchw",), (12608, 768), "ViT-B/16, batch 64 (64x197 tokens)"),
    ("ln", ("nchw",), (6304, 1024), "ViT-L/16, batch 32"),
    ("rms", ("nchw",), (4096, 2048), "LLaMA-style rows of 2048"),
    ("rms", ("nchw",), (2048, 4096), "LLaMA-7B rows"),
    ("rms", ("nchw",), (1024, 8192), "LLaMA-70B rows"),
)
#: The size label of the network cases.
NETWORK_SIZE = "net"
#: Shapes of the ``--quick`` subset (with float32 only unless ``--dtypes`` is given).
QUICK_SHAPES = frozenset({(8, 64, 32, 32), (32, 64, 56, 56), (512, 768), (4096, 768)})
#: Minimum tensor size of the ``--scaling`` report.
SCALING_MIN_BYTES = 4 * 2**20
EPS = 1e-5
RMS_EPS = 1e-6


def group_count(channels):
    """Return the number of GroupNorm groups the benchmarks use for ``channels`` channels.

    Parameters
    ----------
    channels : int
        ``C``.

    Returns
    -------
    int
        32 if it divides ``channels`` (the usual GroupNorm setting), else 8 if
        it divides, else 1.
    """
    for groups in (32, 8):
        if channels % groups == 0:
            return groups
    return 1


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes
    ----------
    kind : str
        Short kind name, a key of :data:`KINDS`.
    pass_ : str
        One of :data:`PASSES` or :data:`EPILOGUE_PASSES`.
    layout : str
        ``"nchw"`` or ``"nhwc"`` (always ``"nchw"`` for LN/RMS).
    dtype : str
        One of :data:`DTYPES`.
    size : str
        One of :data:`SIZES`.
    shape : tuple of int
        Logical shape: ``(N, C, H, W)`` for BN/IN/GN whatever the layout,
        ``(rows, width)`` for LN/RMS.
    """

    kind: str
    pass_: str
    layout: str
    dtype: str
    size: str
    shape: tuple

    @property
    def id(self):
        """Stable identifier, e.g. ``"gn-bwd-nhwc-f32-8x64x32x32"``."""
        dims = "x".join(str(d) for d in self.shape)
        return f"{self.kind}-{self.pass_}-{self.layout}-{_DTYPE_SHORT[self.dtype]}-{dims}"

    @property
    def nbytes(self):
        """Size of the input tensor in bytes."""
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]

    @property
    def half(self):
        """Whether the data are 16-bit (:data:`HALF_DTYPES`: float32 weight and bias)."""
        return self.dtype in HALF_DTYPES

    @property
    def numpy_dtype(self):
        """The NumPy dtype of the data (``bfloat16`` imports ``ml_dtypes``)."""
        return numpy_dtype(self.dtype)

    @property
    def memory_shape(self):
        """Shape of the array fastnorm is given (``(N, H, W, C)`` for ``nhwc``)."""
        if self.layout == "nhwc":
            return (self.shape[0], *self.shape[2:], self.shape[1])
        return self.shape


def numpy_dtype(name):
    """Return the NumPy dtype of a dtype name of :data:`DTYPES`.

    Parameters
    ----------
    name : str

    Returns
    -------
    numpy.dtype

    Raises
    ------
    ImportError
        ``"bfloat16"`` without ``ml_dtypes`` (``pip install ml-dtypes``, in the
        ``bench`` and ``bf16`` extras).
    """
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def all_cases(half=False, networks=False):
    """Every benchmark case, in a fixed order.

    Parameters
    ----------
    half : bool
        Also the plain passes in the 16-bit dtypes (:data:`HALF_DTYPES`), after
        their float32/float64 twins; the epilogue cases stay float32.
    networks : bool
        Also the network layers of :data:`NETWORK_CASES` (size ``"net"``), at
        the end, in every dtype of the selection (16-bit ones with ``half``).

    Returns
    -------
    list of Case
    """
    cases = []
    dtypes = DTYPES if half else DEFAULT_DTYPES
    for kind in KINDS:
        family = "rows" if kind in _ROW_KINDS else "conv"
        layouts = ("nchw",) if kind in _ROW_KINDS else LAYOUTS
        for pass_ in PASSES:
            for layout in layouts:
                for dtype in dtypes:
                    for size in SIZES:
                        for shape in SHAPES[family][size]:
                            cases.append(Case(kind, pass_, layout, dtype, size, shape))
    for kind, epilogue, layouts, shape in EPILOGUE_CASES:
        for suffix in ("fwd", "fb"):
            for layout in layouts:
                cases.append(Case(kind, f"{epilogue}_{suffix}", layout, "float32", "large", shape))
    if networks:
        for kind, layouts, shape, _ in NETWORK_CASES:
            for pass_ in PASSES:
                for layout in layouts:
                    for dtype in dtypes:
                        cases.append(Case(kind, pass_, layout, dtype, NETWORK_SIZE, shape))
    return cases


def _normalize_kinds(kinds):
    if kinds is None:
        return None
    full_to_short = {v: k for k, v in KINDS.items()}
    out = set()
    for kind in kinds:
        kind = full_to_short.get(kind, kind)
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        out.add(kind)
    return out


def _normalize_dtypes(dtypes):
    """Full dtype names of ``dtypes``, which may use the short names of case ids (``bf16``)."""
    if dtypes is None:
        return None
    short_to_full = {v: k for k, v in _DTYPE_SHORT.items()}
    return [short_to_full.get(d, d) for d in dtypes]


def half_set_keys():
    """Return the ``(kind, layout, shape)`` of every entry of :data:`HALF_SET`, in order.

    Returns
    -------
    list of tuple
    """
    return [(kind, layout, shape) for kind, layouts, shape in HALF_SET for layout in layouts]


def _check_choices(values, allowed, what):
    if values is None:
        return None
    values = set(values)
    unknown = values - set(allowed)
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    return values


def select_cases(
    kinds=None,
    passes=None,
    layouts=None,
    dtypes=None,
    sizes=None,
    quick=False,
    ids=None,
    half_set=False,
    networks=False,
):
    """Filter :func:`all_cases`; ``None`` means no restriction.

    Parameters
    ----------
    kinds : iterable of str, optional
        Short (``"bn"``) or full (``"batch_norm"``) kind names.
    passes, layouts, dtypes, sizes : iterable of str, optional
        Values from :data:`PASSES`, :data:`LAYOUTS`, :data:`DTYPES` (or their
        short names, ``"bf16"``), :data:`SIZES`.  Without ``dtypes`` (nor
        ``ids`` or ``half_set``) the 16-bit dtypes are left out
        (:data:`DEFAULT_DTYPES`).
    quick : bool
        Keep only the shapes of :data:`QUICK_SHAPES`, and float32 unless
        ``dtypes`` is given.
    ids : iterable of str, optional
        Keep only these case ids (unknown ids raise ``ValueError``); 16-bit
        ids are known.
    half_set : bool
        Keep only the cases of :data:`HALF_SET`, in :data:`HALF_SET_DTYPES`
        unless ``dtypes`` is given and :data:`HALF_SET_PASSES` unless
        ``passes`` is given.
    networks : bool
        Keep only the network layers (:data:`NETWORK_CASES`), float32 unless
        ``dtypes`` is given.  Their ids are known to ``ids`` too.

    Returns
    -------
    list of Case

    Raises
    ------
    ValueError
        An unknown kind, pass, layout, dtype, size or case id.
    """
    kinds = _normalize_kinds(kinds)
    passes = _check_choices(passes, PASSES + EPILOGUE_PASSES, "pass")
    layouts = _check_choices(layouts, LAYOUTS, "layout")
    dtypes = _check_choices(_normalize_dtypes(dtypes), DTYPES, "dtype")
    sizes = _check_choices(sizes, (*SIZES, NETWORK_SIZE), "size")
    half_keys = set(half_set_keys()) if half_set else None
    if half_set:
        dtypes = set(HALF_SET_DTYPES) if dtypes is None else dtypes
        passes = set(HALF_SET_PASSES) if passes is None else passes
    if (quick or networks) and dtypes is None:
        dtypes = {"float32"}
    if networks:
        sizes = {NETWORK_SIZE}
    cases = all_cases(half=dtypes is not None or ids is not None, networks=networks or ids is not None)
    if ids is not None:
        ids = set(ids)
        unknown = ids - {c.id for c in cases}
        if unknown:
            raise ValueError(f"unknown case id(s): {', '.join(sorted(unknown))} (list them with --list)")
    selected = []
    for case in cases:
        if kinds is not None and case.kind not in kinds:
            continue
        if passes is not None and case.pass_ not in passes:
            continue
        if layouts is not None and case.layout not in layouts:
            continue
        if dtypes is not None and case.dtype not in dtypes:
            continue
        if sizes is not None and case.size not in sizes:
            continue
        if quick and case.shape not in QUICK_SHAPES:
            continue
        if ids is not None and case.id not in ids:
            continue
        if half_keys is not None and (case.kind, case.layout, case.shape) not in half_keys:
            continue
        selected.append(case)
    return selected
