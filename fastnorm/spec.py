"""`NormSpec`: which normalization to compute, as an immutable value."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields

from ._kernels.epilogue import ACTIVATIONS

KINDS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")
#: Names of the epilogue's activations (``None`` for none): torch's ``F.relu``,
#: ``F.leaky_relu``, ``torch.sigmoid``, ``torch.tanh``, ``F.silu``,
#: ``F.gelu(approximate="none")`` and ``F.gelu(approximate="tanh")``.
ACTIVATION_NAMES = tuple(name for name in ACTIVATIONS if name is not None)


def check_eps(eps, *, allow_none=False):
    """Return ``eps`` as a float, or raise ``ValueError``/``TypeError`` naming it.

    Parameters
    ----------
    eps : real number or None
        The value to check: finite and ``>= 0``.
    allow_none : bool
        Accept ``None`` (returned as is).

    Returns
    -------
    float or None
    """
    if eps is None and allow_none:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r} ({type(eps).__name__})")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0.0:
        raise ValueError(f"eps={eps!r} must be finite and >= 0 (it is added to the variance)")
    return eps


def check_epilogue(activation, negative_slope):
    """Check the fused epilogue's arguments; return ``negative_slope`` as a float.

    Parameters
    ----------
    activation : str or None
        ``None`` or one of :data:`ACTIVATION_NAMES`.
    negative_slope : real number
        Finite.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        Naming the argument.
    """
    if activation is not None and activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation={activation!r} is not None or one of {ACTIVATION_NAMES}")
    slope = negative_slope
    if isinstance(slope, bool) or not isinstance(slope, numbers.Real) or not math.isfinite(slope):
        raise ValueError(f"negative_slope={slope!r} must be a finite real number")
    return float(slope)


def check_positive_int(value, name):
    """Return ``value`` as an int >= 1, or raise naming ``name``.

    Parameters
    ----------
    value : integer
        The value to check (``bool`` is refused).
    name : str
        Its name, for the error message.

    Returns
    -------
    int
    """
    # an exact int skips the (slow) abstract-class check
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")
    return int(value)


@dataclass(frozen=True)
class NormSpec:
    """Which normalization to compute; build it with one of the constructors.

    All five norms view ``x`` of shape ``(N, C, *spatial)`` as ``(N, G, C/G, S)``
    and normalize over ``(C/G, S)`` for each ``(n, g)`` (and over ``N`` too for
    BatchNorm).  LayerNorm and RMSNorm normalize the trailing
    ``normalized_ndim`` dims of any input.

    Attributes
    ----------
    kind : str
        One of ``"batch_norm"``, ``"instance_norm"``, ``"group_norm"``,
        ``"layer_norm"``, ``"rms_norm"``.
    eps : float or None
        Added to the variance (the mean square for RMSNorm).  ``None`` (RMSNorm
        only) means ``numpy.finfo(x.dtype).eps``, as torch does.
    num_groups : int or None
        ``G`` for GroupNorm; ``None`` otherwise.
    normalized_ndim : int or None
        Number of trailing dims normalized by LayerNorm / RMSNorm.
    channels_last : bool
        BN/IN/GN only: ``x`` has shape ``(N, *spatial, C)``.  A logically
        ``(N, C, *spatial)`` array whose *memory* is channels-last (for example
        ``np.moveaxis(nhwc, -1, 1)``) needs ``channels_last=False``: fastnorm
        detects its strides and runs the channels-last kernel without a copy.
    activation : str or None
        The fused epilogue's activation, applied after the affine transform
        and the optional residual add: one of :data:`~fastnorm.spec.ACTIVATION_NAMES`
        (``"relu"``, ``"leaky_relu"``, ``"sigmoid"``, ``"tanh"``, ``"silu"``,
        ``"gelu"``, ``"gelu_tanh"``) or ``None``.  Part of the spec because
        the kernels are specialized for it.
    negative_slope : float
        The slope of ``"leaky_relu"`` for negative inputs (torch's default
        0.01); ignored by the other activations.

    Examples
    --------
    >>> import fastnorm
    >>> fastnorm.NormSpec.group_norm(4)
    NormSpec(kind='group_norm', eps=1e-05, num_groups=4, normalized_ndim=None, channels_last=False, \
activation=None, negative_slope=0.01)
    """

    kind: str
    eps: float | None = 1e-5
    num_groups: int | None = None
    normalized_ndim: int | None = None
    channels_last: bool = False
    activation: str | None = None
    negative_slope: float = 0.01

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "eps", check_eps(self.eps, allow_none=self.kind == "rms_norm"))
        if not isinstance(self.channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {self.channels_last!r}")
        if self.kind == "group_norm":
            object.__setattr__(self, "num_groups", check_positive_int(self.num_groups, "num_groups"))
        elif self.num_groups is not None:
            raise ValueError(f"num_groups is only meaningful for group_norm, not {self.kind}")
        if self.kind in ("layer_norm", "rms_norm"):
            ndim = check_positive_int(self.normalized_ndim, "normalized_ndim")
            object.__setattr__(self, "normalized_ndim", ndim)
            if self.channels_last:
                raise ValueError(
                    f"channels_last does not apply to {self.kind}: it normalizes the trailing dims"
                )
        elif self.normalized_ndim is not None:
            raise ValueError(f"normalized_ndim is only meaningful for layer_norm/rms_norm, not {self.kind}")
        object.__setattr__(self, "negative_slope", check_epilogue(self.activation, self.negative_slope))
        # Specs key the plan cache on every call: hash the fields once (0.18 us a call otherwise).
        object.__setattr__(self, "_hash", hash(self._fields()))

    def _fields(self):
        """Return the field values in declaration order (what the generated ``__eq__`` compares)."""
        return tuple(getattr(self, field.name) for field in fields(self))

    def __hash__(self):
        return self._hash

    def __reduce__(self):
        # Rebuilt from the fields, so that the cached hash is recomputed in the new process.
        return (type(self), self._fields())

    @classmethod
    def batch_norm(cls, eps=1e-5, channels_last=False, *, activation=None, negative_slope=0.01):
        """BatchNorm (Ioffe & Szegedy 2015): per channel, across the batch.

        Parameters
        ----------
        eps : float
            Added to the variance.
        channels_last : bool
            ``x`` has shape ``(N, *spatial, C)``.
        activation, negative_slope
            The fused epilogue (see the class's Attributes).
        """
        return _make(cls, "batch_norm", eps, None, None, channels_last, activation, negative_slope)

    @classmethod
    def instance_norm(cls, eps=1e-5, channels_last=False, *, activation=None, negative_slope=0.01):
        """InstanceNorm (Ulyanov et al. 2016): per sample and channel.

        Parameters
        ----------
        eps : float
            Added to the variance.
        channels_last : bool
            ``x`` has shape ``(N, *spatial, C)``.
        activation, negative_slope
            The fused epilogue (see the class's Attributes).
        """
        return _make(cls, "instance_norm", eps, None, None, channels_last, activation, negative_slope)

    @classmethod
    def group_norm(cls, num_groups, eps=1e-5, channels_last=False, *, activation=None, negative_slope=0.01):
        """GroupNorm (Wu & He 2018): per sample and group of ``C/num_groups`` channels.

        Parameters
        ----------
        num_groups : int
            ``G``, must divide the number of channels of ``x``.
        eps : float
            Added to the variance.
        channels_last : bool
            ``x`` has shape ``(N, *spatial, C)``.
        activation, negative_slope
            The fused epilogue (see the class's Attributes).
        """
        return _make(cls, "group_norm", eps, num_groups, None, channels_last, activation, negative_slope)

    @classmethod
    def layer_norm(cls, normalized_ndim, eps=1e-5, *, activation=None, negative_slope=0.01):
        """LayerNorm (Ba et al. 2016) over the trailing ``normalized_ndim`` dims.

        Parameters
        ----------
        normalized_ndim : int
            Number of trailing dims normalized together (>= 1).
        eps : float
            Added to the variance.
        activation, negative_slope
            The fused epilogue (see the class's Attributes).
        """
        return _make(cls, "layer_norm", eps, None, normalized_ndim, False, activation, negative_slope)

    @classmethod
    def rms_norm(cls, normalized_ndim, eps=None, *, activation=None, negative_slope=0.01):
        """RMSNorm (Zhang & Sennrich 2019): LayerNorm without centering or bias.

        Parameters
        ----------
        normalized_ndim : int
            Number of trailing dims normalized together (>= 1).
        eps : float or None
            Added to the mean square; ``None`` means ``numpy.finfo(x.dtype).eps``.
        activation, negative_slope
            The fused epilogue (see the class's Attributes).
        """
        return _make(cls, "rms_norm", eps, None, normalized_ndim, False, activation, negative_slope)

    @property
    def centered(self):
        """Whether the mean is subtracted (every kind but RMSNorm)."""
        return self.kind != "rms_norm"


@functools.lru_cache(maxsize=256, typed=True)
def _cached(cls, *fields):
    return cls(*fields)


def _make(cls, *fields):
    """Build (or reuse: specs are immutable) a validated spec from its fields in order."""
    try:
        return _cached(cls, *fields)
    except TypeError:  # unhashable arguments: let the constructor name the problem
        return cls(*fields)
