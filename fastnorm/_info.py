"""``fastnorm.show_config()``: versions, threading layer, CPU and cache of this process."""

from __future__ import annotations

import platform
from typing import Any

import llvmlite
import llvmlite.binding as llvm
import numba
import numpy as np

from . import _threading

__all__ = ["show_config"]

#: CPU features worth naming: the vector extensions the kernels' code can use.
_SIMD_FEATURES = (
    "sse2", "sse4.1", "sse4.2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl",
    "avx512vnni", "avx512bf16", "avx512fp16", "neon", "sve", "sve2", "altivec", "vsx",
)  # fmt: skip


def _target_cpu():
    """Numba's target CPU: its name, the host's name and the enabled vector features."""
    host = llvm.get_host_cpu_name()
    name = numba.config.CPU_NAME or host
    if numba.config.CPU_FEATURES:  # NUMBA_CPU_FEATURES, e.g. "+avx,+sse2,-avx512f"
        enabled = {f[1:] for f in str(numba.config.CPU_FEATURES).split(",") if f.startswith("+")}
    else:
        enabled = {feature for feature, on in llvm.get_host_cpu_features().items() if on}
    return {
        "name": name,
        "host": host,
        "machine": platform.machine(),
        "simd": [feature for feature in _SIMD_FEATURES if feature in enabled],
    }


def _threading_info():
    layer, active = _threading.layer_status()
    if active:
        fork_safe = not _threading.fork_unsafe()
        threads = numba.get_num_threads()
    else:
        fork_safe = not (layer == "omp" and _threading.gnu_openmp())
        threads = int(numba.config.NUMBA_NUM_THREADS)
    return {
        "layer": layer,
        "active": active,
        "requested": str(numba.config.THREADING_LAYER),
        "num_threads": threads,
        "max_threads": int(numba.config.NUMBA_NUM_THREADS),
        "tbb": _threading.TBB_STATUS,
        "torch_openmp": _threading.OPENMP_STATUS,
        "fork_safe": fork_safe,
        "serial_after_fork": _threading.serial_after_fork(),
    }


def _cache_info():
    from . import _kernels as K

    kernel = next(iter(K.KERNELS.values()))
    cache = getattr(kernel, "_cache", None)
    path = getattr(cache, "cache_path", None)
    return {
        "dir": str(path) if path is not None else None,
        "NUMBA_CACHE_DIR": numba.config.CACHE_DIR or None,
        "jit_disabled": bool(numba.config.DISABLE_JIT),
    }


def _config():
    from . import __version__

    return {
        "versions": {
            "fastnorm": __version__,
            "numpy": np.__version__,
            "numba": numba.__version__,
            "llvmlite": llvmlite.__version__,
            "python": platform.python_version(),
        },
        "threading": _threading_info(),
        "cpu": _target_cpu(),
        "cache": _cache_info(),
    }


def _format(config):
    lines = []
    for section, values in config.items():
        lines.append(f"{section}:")
        width = max(len(key) for key in values)
        for key, value in values.items():
            if isinstance(value, list):
                value = " ".join(value) or "-"
            lines.append(f"  {key:<{width}} : {value}")
    return "\n".join(lines)


def show_config(as_dict: bool = False) -> dict[str, dict[str, Any]] | None:
    """Print (or return) how fastnorm runs in this process: versions, threads, CPU, cache.

    Parameters
    ----------
    as_dict : bool, optional
        Return the information as a dict instead of printing it.

    Returns
    -------
    dict or None
        ``None`` when printing.  With ``as_dict=True``, a dict of dicts:

        ``versions``
            ``fastnorm``, ``numpy``, ``numba``, ``llvmlite``, ``python``.
        ``threading``
            ``layer``: Numba's threading layer, ``"tbb"``, ``"omp"`` or
            ``"workqueue"`` (``"none"`` if none can load); ``active``: whether
            its pool runs already (otherwise ``layer`` is the one the first
            parallel call will start; finding it starts no threads);
            ``requested``: ``numba.config.THREADING_LAYER``; ``num_threads``:
            threads of the calling thread's parallel calls
            (``numba.get_num_threads()``, or ``NUMBA_NUM_THREADS`` before the
            pool starts); ``max_threads``: the pool size; ``tbb``: whether
            fastnorm loaded the ``tbb`` package's library, and why not;
            ``torch_openmp``: ``"shared with torch: <path>"`` when the kernels
            run on torch's OpenMP runtime, or why not (``docs/api.md``, Threads);
            ``fork_safe``: whether a forked child can run the parallel
            kernels; ``serial_after_fork``: whether this process is such a
            child of a GNU OpenMP process and runs the serial builds instead
            (see ``docs/guarantees.md``, Fork safety).
        ``cpu``
            ``name``: Numba's target CPU (``NUMBA_CPU_NAME`` or the host's);
            ``host``: the host CPU as LLVM names it; ``machine``: the
            architecture; ``simd``: the enabled vector extensions (``avx2``,
            ``avx512f``, ...), which decide the width of the vectorized sums.
        ``cache``
            ``dir``: where Numba caches fastnorm's compiled kernels;
            ``NUMBA_CACHE_DIR``: the setting, or ``None``; ``jit_disabled``:
            ``NUMBA_DISABLE_JIT``.

    Notes
    -----
    Nothing is compiled and no thread pool is started.  Results are bitwise
    reproducible only with the same CPU features and Numba/LLVM versions
    (``docs/guarantees.md``), so these are the facts to give with a report.

    Examples
    --------
    >>> import fastnorm
    >>> fastnorm.show_config()  # doctest: +SKIP
    versions:
      fastnorm : 0.1.0
      ...
    >>> fastnorm.show_config(as_dict=True)["threading"]["layer"]  # doctest: +SKIP
    'tbb'
    """
    config = _config()
    if as_dict:
        return config
    print(_format(config))
    return None
