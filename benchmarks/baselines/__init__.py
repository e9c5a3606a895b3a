"""The baselines fastnorm is timed against, besides ``np.copyto`` (:mod:`benchmarks.workloads`).

:mod:`.torch` (the same pass in ``torch.nn.functional``), :mod:`.onednn`
(oneDNN's primitives through ctypes), :mod:`.onnxruntime` (one-node ONNX
models) and :mod:`.floor` (the pass's memory traffic floor, as parallel Numba
kernels).
"""

from __future__ import annotations

import numpy as np


def dtype_name(dtype):
    """``np.dtype(dtype).name``; a name NumPy does not know (``"bfloat16"`` without ml_dtypes) as is."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)
