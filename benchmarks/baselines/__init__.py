"""The baselines fastnorm is timed against, besides ``np.copyto`` (:mod:`benchmarks.workloads`).

:mod:`.torch` (the same pass in ``torch.nn.functional``), :mod:`.onednn`
(oneDNN's primitives through ctypes) and :mod:`.floor` (the pass's memory
traffic floor, as parallel Numba kernels).
"""
