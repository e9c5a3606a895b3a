"""fastnorm: fast, exact, deterministic CPU normalization kernels (BN, LN, IN, GN, RMSNorm).

One parameterized Numba kernel family computes the forward and backward pass
of every norm; see ``docs/math.md`` for the shared formula.

Public API
----------
Functional (``torch.nn.functional`` names and semantics, NumPy arrays):
:func:`batch_norm`, :func:`instance_norm`, :func:`layer_norm`,
:func:`group_norm`, :func:`rms_norm`; the pre-norm skip add fused with LN/RMS:
:func:`skip_layer_norm`, :func:`skip_rms_norm`.

Explicit passes: :class:`NormSpec`, :func:`forward`, :func:`forward_inference`,
:func:`backward`, :class:`Stats`, :class:`Gradients`; :func:`prepare` checks one of
these calls once and returns a callable that repeats it on the same memory.

BatchNorm over a batch split across processes (the passes around a collective;
:mod:`fastnorm.distributed`, :mod:`fastnorm.mpi`): :func:`batch_stats`,
:func:`merge_stats`, :func:`batch_norm_backward_reduce`,
:func:`batch_norm_backward_apply`, :func:`update_running_stats`.

Folding an inference BatchNorm into the layer before it: :func:`fold_batch_norm`.

Configuration: :func:`show_config` (versions, threading layer, CPU, cache).

PyTorch (CPU tensors, autograd, ``torch.nn`` modules): ``fastnorm.torch``, which
``import fastnorm`` does not import.
"""

# First: loads the tbb package's library before anything can start Numba's pool.
from . import _threading  # noqa: F401
from ._info import show_config
from .core import Gradients, Stats, backward, forward, forward_inference, prepare
from .distributed import (
    batch_norm_backward_apply,
    batch_norm_backward_reduce,
    batch_stats,
    merge_stats,
    update_running_stats,
)
from .folding import fold_batch_norm
from .functional import (
    batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
    skip_layer_norm,
    skip_rms_norm,
)
from .spec import NormSpec

__version__ = "0.1.0"

__all__ = [
    "Gradients",
    "NormSpec",
    "Stats",
    "forward",
    "forward_inference",
    "backward",
    "prepare",
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "skip_layer_norm",
    "skip_rms_norm",
    "batch_stats",
    "merge_stats",
    "batch_norm_backward_reduce",
    "batch_norm_backward_apply",
    "update_running_stats",
    "fold_batch_norm",
    "show_config",
    "__version__",
]
