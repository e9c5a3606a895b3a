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
DTYPES = ("float32", "float64")
SIZES = ("tiny", "mid", "large")
_DTYPE_SHORT = {"float32": "f32", "float64": "f64"}
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
        ``"float32"`` or ``"float64"``.
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
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def memory_shape(self):
        """Shape of the array fastnorm is given (``(N, H, W, C)`` for ``nhwc``)."""
        if self.layout == "nhwc":
            return (self.shape[0], *self.shape[2:], self.shape[1])
        return self.shape


def all_cases():
    """Every benchmark case, in a fixed order.

    Returns
    -------
    list of Case
    """
    cases = []
    for kind in KINDS:
        family = "rows" if kind in _ROW_KINDS else "conv"
        layouts = ("nchw",) if kind in _ROW_KINDS else LAYOUTS
        for pass_ in PASSES:
            for layout in layouts:
                for dtype in DTYPES:
                    for size in SIZES:
                        for shape in SHAPES[family][size]:
                            cases.append(Case(kind, pass_, layout, dtype, size, shape))
    for kind, epilogue, layouts, shape in EPILOGUE_CASES:
        for suffix in ("fwd", "fb"):
            for layout in layouts:
                cases.append(Case(kind, f"{epilogue}_{suffix}", layout, "float32", "large", shape))
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


def _check_choices(values, allowed, what):
    if values is None:
        return None
    values = set(values)
    unknown = values - set(allowed)
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(sorted(unknown))}; choose from {', '.join(allowed)}")
    return values


def select_cases(kinds=None, passes=None, layouts=None, dtypes=None, sizes=None, quick=False, ids=None):
    """Filter :func:`all_cases`; ``None`` means no restriction.

    Parameters
    ----------
    kinds : iterable of str, optional
        Short (``"bn"``) or full (``"batch_norm"``) kind names.
    passes, layouts, dtypes, sizes : iterable of str, optional
        Values from :data:`PASSES`, :data:`LAYOUTS`, :data:`DTYPES`, :data:`SIZES`.
    quick : bool
        Keep only the shapes of :data:`QUICK_SHAPES`, and float32 unless
        ``dtypes`` is given.
    ids : iterable of str, optional
        Keep only these case ids (unknown ids raise ``ValueError``).

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
    dtypes = _check_choices(dtypes, DTYPES, "dtype")
    sizes = _check_choices(sizes, SIZES, "size")
    if quick and dtypes is None:
        dtypes = {"float32"}
    cases = all_cases()
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
        selected.append(case)
    return selected
