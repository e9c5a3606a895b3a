"""The benchmark process: thread counts, OpenMP spinning, the allocator, loading torch and oneDNN."""

from __future__ import annotations

import os
import sys

#: ``GOMP_SPINCOUNT`` the bench gives torch's OpenMP runtime (libgomp) unless
#: the environment sets one.  With libgomp's default, torch's idle workers
#: busy-wait for milliseconds after every torch call and take a core from
#: whatever runs next -- in an interleaved round, fastnorm's turn: measured on
#: ``ln-fwd-nchw-f32-4096x768``, fastnorm 0.80-1.01 ms after torch with the
#: default and 0.46-0.48 ms with 10000 spins, torch's own times unchanged
#: (``docs/benchmarks.md``).  10000 spins (tens of microseconds) still cover
#: the gap between torch's back-to-back calls inside its timed block.
TORCH_SPINCOUNT = "10000"


def _short_openmp_spin():
    """Set ``GOMP_SPINCOUNT`` to :data:`TORCH_SPINCOUNT` unless the environment sets it.

    libgomp reads it once, when it is loaded: call this before importing torch
    or loading oneDNN (which links its own libgomp).
    """
    os.environ.setdefault("GOMP_SPINCOUNT", TORCH_SPINCOUNT)


def optional_torch():
    """Return the ``torch`` module, or ``None`` when it is not importable.

    Sets ``GOMP_SPINCOUNT`` to :data:`TORCH_SPINCOUNT` before the import when
    the environment does not set it (:func:`_short_openmp_spin`); it has no
    effect if torch was imported before.
    """
    if "torch" not in sys.modules:
        _short_openmp_spin()
    try:
        import torch
    except ImportError:
        return None
    return torch


def load_onednn():
    """Load oneDNN (:func:`benchmarks.baselines.onednn.load`) with the same short OpenMP spin as torch.

    Returns
    -------
    The loaded library.

    Raises
    ------
    benchmarks.baselines.onednn.OneDNNError
        oneDNN cannot be loaded (``pip install onednn-cpu-gomp``).
    """
    from .baselines import onednn

    if onednn._LIBRARY is None:
        _short_openmp_spin()
    return onednn.load()


def _loaded_onednn():
    """Return the oneDNN library loaded in this process, or ``None`` (never loads it)."""
    module = sys.modules.get(__package__ + ".baselines.onednn")
    return None if module is None else module._LIBRARY


def set_threads(threads):
    """Use ``threads`` threads in Numba and, when they are loaded, torch and oneDNN.

    With torch loaded and Numba's pool not yet started, the pool starts on
    torch's OpenMP runtime first (:func:`fastnorm._threading.share_torch_openmp`).

    Parameters
    ----------
    threads : int
        At most ``numba.config.NUMBA_NUM_THREADS``.
    """
    import numba

    from fastnorm import _threading

    # Setting Numba's thread count starts its pool: with torch loaded, on torch's OpenMP
    # runtime, as for a user of both (docs/perf-notes/threading-with-torch.md).
    _threading.share_torch_openmp_before_start()
    numba.set_num_threads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    onednn = _loaded_onednn()
    if onednn is not None:
        onednn.set_threads(threads)


def reuse_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    Sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB with
    ``mallopt``: large allocations then come from the heap, and a freed
    output's pages, already touched, serve the next call's output.  Without
    it, torch pays first-touch page faults on every output above glibc's
    mmap threshold (at most 32 MiB), which fastnorm's ``out=`` calls do not.

    Returns
    -------
    bool
        Whether the setting took effect (``False`` off glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def max_threads():
    """Largest thread count Numba can use in this process (``NUMBA_NUM_THREADS``)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def start_baselines(with_torch, with_onednn, threads=None):
    """Set up a comparison's process: torch, oneDNN, the allocator and the thread count, in that order.

    torch is imported first (it sets ``GOMP_SPINCOUNT``); oneDNN is loaded with
    the same short spin (a note is printed when it cannot be); freed memory is
    reused (:func:`reuse_freed_memory`); Numba, torch and oneDNN get ``threads``.

    Parameters
    ----------
    with_torch, with_onednn : bool
    threads : int, optional
        Default: all (:func:`max_threads`).

    Returns
    -------
    torch : module or None
    onednn_version : str or None
        ``None`` when oneDNN was not asked for or cannot be loaded.
    reused : bool
        Whether freed memory is reused.
    threads : int
    """
    torch = optional_torch() if with_torch else None
    onednn_version = None
    if with_onednn:
        from .baselines import onednn

        try:
            onednn_version = ".".join(map(str, load_onednn().version))
        except onednn.OneDNNError as exc:
            print(f"note: oneDNN not timed: {exc}")
    reused = reuse_freed_memory()
    threads = threads or max_threads()
    set_threads(threads)
    return torch, onednn_version, reused, threads


def add_comparison_options(parser, unit):
    """Add ``--rounds``, ``--threads``, ``--no-torch``, ``--no-onednn`` (``unit``: what a round times)."""
    parser.add_argument("--rounds", type=int, default=11, help=f"interleaved rounds per {unit} (default 11)")
    parser.add_argument("--threads", type=int, help="Numba, torch and oneDNN threads (default all)")
    parser.add_argument("--no-torch", action="store_true", help="do not time torch")
    parser.add_argument("--no-onednn", action="store_true", help="do not time oneDNN")


def check_comparison_options(parser, args):
    """Refuse (``parser.error``) the options of :func:`add_comparison_options` out of range."""
    if args.rounds < 1 or (args.threads is not None and not 1 <= args.threads <= max_threads()):
        parser.error(f"--rounds must be >= 1 and --threads within 1..{max_threads()}")
