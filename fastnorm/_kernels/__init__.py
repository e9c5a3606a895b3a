"""The one parameterized normalization kernel family, laid out by data view.

Every norm views ``x`` as ``(N, G, C/G, S)`` and takes statistics over
``(C/G, S)`` for each ``(n, g)`` (and over ``N`` too with ``BATCH``):

=============  ======================  ===================================
norm           kernel view             flags
=============  ======================  ===================================
BatchNorm      (N, C, S), G = C        BATCH | CENTERED
InstanceNorm   (N, C, S), G = C        CENTERED
GroupNorm      (N, C, S), G groups     CENTERED
LayerNorm      (R, 1, K), G = 1        CENTERED | PER_ELEMENT
RMSNorm        (R, 1, K), G = 1        PER_ELEMENT
=============  ======================  ===================================

(add ``CHANNELS_LAST`` for an (N, S, C) buffer).  Modules, in the order data
flows through them:

* :mod:`.schedule` -- :class:`KernelSpec` (what), :class:`Schedule` (how) and
  :func:`plan_schedule`, the one place a schedule is chosen;
* :mod:`.dispatch` -- the table from (pass, view, parallel) to a kernel build;
* :mod:`.rows`, :mod:`.planes`, :mod:`.channels_last` -- the three kernel
  families, one per data view, each a forward, inference and backward kernel
  made of named strategy helpers;
* :mod:`.epilogue` -- what happens to a normalized value before it is stored
  (affine transform, residual add, activation) and its backward;
* :mod:`.numerics` -- moments, Chan merges, dot products, group geometry;
* :mod:`.storage` -- how a data element is loaded and stored (float32,
  float64, and bfloat16 / float16 through 16-bit integer views).

The kernels validate nothing: :mod:`fastnorm.core` checks every argument
before calling them.  Results depend only on the shape, never on the thread
count (fixed blocks merged in a fixed order).
"""

from .dispatch import (
    KERNELS,
    run_backward,
    run_backward_apply,
    run_backward_epilogue,
    run_backward_reduce,
    run_batch_stats,
    run_forward,
    run_skip_bias_backward,
    run_skip_forward,
    select,
    select_epilogue_backward,
)
from .epilogue import ACTIVATIONS
from .numerics import CANCELLATION_LIMIT, merge_rank_moments, update_running_from_rstd, update_running_stats
from .schedule import *  # noqa: F403 -- the constants, KernelSpec, Schedule, plan_schedule
from .schedule import __all__ as _schedule_names
from .storage import VIEWS, bfloat16_bits

__all__ = [
    "ACTIVATIONS",
    "CANCELLATION_LIMIT",
    "KERNELS",
    "merge_rank_moments",
    "update_running_from_rstd",
    "update_running_stats",
    "run_backward",
    "run_backward_apply",
    "run_backward_epilogue",
    "run_backward_reduce",
    "run_batch_stats",
    "run_forward",
    "run_skip_bias_backward",
    "run_skip_forward",
    "select",
    "select_epilogue_backward",
    "VIEWS",
    "bfloat16_bits",
    *_schedule_names,
]
