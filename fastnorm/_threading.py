"""Numba's threading layer for fastnorm: TBB when installed, and forked children of OpenMP.

Imported first by the package (and so by the C ABI's embedded runtime), before
any kernel runs.

TBB
---
:mod:`fastnorm._config` asks Numba for its ``'threadsafe'`` layer: TBB when
Numba can load it, otherwise GNU OpenMP.  The ``tbb`` wheel puts
``libtbb.so.12`` into ``<prefix>/lib`` (its RECORD lists it as
``../../libtbb.so.12`` from site-packages), which is not on the dynamic
loader's path of a virtual environment, so ``numba.np.ufunc.tbbpool`` fails to
import and Numba silently falls back to OpenMP.  :func:`load_tbb` loads the
library from where the ``tbb`` distribution's own file list says it is (with
``RTLD_GLOBAL``, before Numba starts its pool); Numba's own
``CDLL("libtbb.so.12")`` and the import of ``tbbpool`` then find it.  Nothing
is loaded when ``NUMBA_THREADING_LAYER`` names a layer without TBB (``omp``,
``workqueue``), when Numba's pool already runs, or when no ``tbb``
distribution is installed.

Forked children
---------------
Numba's GNU OpenMP layer cannot run a parallel region in a process forked
from one that started it: it prints ``Terminating: fork() called from a
process already using GNU OpenMP, this is unsafe.`` and kills the child
(SIGTERM).  TBB and workqueue keep working in a child.  A handler registered
with :func:`os.register_at_fork` marks such a child (:func:`serial_after_fork`);
:mod:`fastnorm.core` then runs the serial build of every kernel there, which
does the same arithmetic in the same order (results stay bitwise identical),
and warns once (:func:`warn_serial_fallback`).  The C ABI does the same with
``pthread_atfork`` (see :mod:`fastnorm.capi._runtime`).

With PyTorch: torch's OpenMP threads
------------------------------------
When torch is imported before Numba's pool starts (before fastnorm's first
multithreaded call, in any order of the imports), :func:`share_torch_openmp`
starts Numba's OpenMP layer
on the GNU OpenMP runtime bundled with torch, so that fastnorm's parallel
regions run on torch's own worker threads.  Two pools on the same cores
contend: torch's idle OpenMP workers busy-wait after every torch operation
(libgomp's default spin), and a TBB pool's workers then wait for a core.
ResNet-18 training steps took 1.05-1.08x torch's with fastnorm's norms on
TBB and 1.00-1.01x on the shared runtime
(docs/perf-notes/threading-with-torch.md).  Numba's OpenMP start sets the
runtime's thread count, so torch's count is put back after it.  An explicit
``NUMBA_THREADING_LAYER`` wins.  A child forked from such a process runs the
serial builds, as above; it warns only if torch would run more than one
thread there (a DataLoader worker runs one).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
import warnings

import numba
from numba.np.ufunc import parallel

from . import _config  # noqa: F401  (sets the 'threadsafe' default this module reads)

__all__ = [
    "TBB_LIBRARY",
    "TBB_STATUS",
    "fork_unsafe",
    "gnu_openmp",
    "layer_status",
    "load_tbb",
    "share_torch_openmp",
    "share_torch_openmp_before_start",
    "serial_after_fork",
    "warn_serial_fallback",
]

#: Soname of the TBB runtime Numba's ``tbbpool`` links to (as Numba spells it, by platform).
_TBB_SONAME = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib"}.get(sys.platform)

#: Values of ``numba.config.THREADING_LAYER`` under which Numba may pick TBB.
_LAYERS_WITH_TBB = frozenset({"tbb", "threadsafe", "safe", "forksafe", "default"})

#: Path of the ``libtbb`` this module loaded, or ``None`` (not needed, not found or not wanted).
TBB_LIBRARY: str | None = None

#: Why :data:`TBB_LIBRARY` is what it is (shown by :func:`fastnorm.show_config`).
TBB_STATUS = "not attempted"

#: What :func:`share_torch_openmp` did (shown by :func:`fastnorm.show_config`).
OPENMP_STATUS = "not shared: torch was not imported"

#: How :data:`OPENMP_STATUS` starts once the pool runs on torch's runtime (then the path).
_SHARED = "shared with torch: "

_serial_after_fork = False
_warned = False

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _tbb_from_distribution():
    """Path of ``libtbb`` listed in the installed ``tbb`` distribution's files, or ``None``."""
    try:
        files = importlib.metadata.files("tbb")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files or ():
        if file.name == _TBB_SONAME:
            path = os.path.abspath(file.locate())
            if os.path.isfile(path):
                return path
    return None


def load_tbb():
    """Load the ``tbb`` package's ``libtbb`` globally so that Numba's TBB layer can start.

    Called once at import.  Does nothing when the configured threading layer
    cannot be TBB (an explicit ``NUMBA_THREADING_LAYER=omp`` or ``workqueue``
    is respected), when Numba's pool already runs (its layer is chosen), or
    when no ``tbb`` distribution lists the library.

    Returns
    -------
    str or None
        The path loaded, or ``None``.
    """
    global TBB_LIBRARY, TBB_STATUS
    if _TBB_SONAME is None:
        TBB_STATUS = f"not supported on {sys.platform}"
        return None
    layer = str(numba.config.THREADING_LAYER).lower()
    if layer not in _LAYERS_WITH_TBB:
        TBB_STATUS = f"not loaded: the threading layer is set to {layer!r}"
        return None
    if parallel._is_initialized:
        TBB_STATUS = "not loaded: Numba's threading layer had already started"
        return None
    path = _tbb_from_distribution()
    if path is None:
        TBB_STATUS = "no tbb distribution installed (pip install 'fastnorm[tbb]')"
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        TBB_STATUS = f"cannot load {path}: {error}"
        return None
    TBB_LIBRARY = path
    TBB_STATUS = f"loaded {path}"
    return path


def _torch_openmp_library(torch):
    """Path of the GNU OpenMP runtime in torch's ``lib`` folder, or ``None``."""
    folder = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for name in names:
        if name.startswith("libgomp") and ".so" in name:
            return os.path.join(folder, name)
    return None


def share_torch_openmp():
    """Start Numba's pool on torch's OpenMP runtime, if torch is loaded and the pool has not started.

    Called at import of :mod:`fastnorm` and of :mod:`fastnorm.torch`.  Does
    nothing when torch is not imported, when ``NUMBA_THREADING_LAYER`` is set,
    when Numba's pool already runs (its layer is chosen; shared by an earlier
    call, it stays so), or when torch bundles no GNU OpenMP runtime.  torch's
    thread count (``torch.get_num_threads()``) is the same before and after.

    Returns
    -------
    bool
        Whether the pool now runs on torch's OpenMP runtime.
    """
    global OPENMP_STATUS, TBB_STATUS
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "get_num_threads"):
        OPENMP_STATUS = "not shared: torch was not imported"
        return False
    if "NUMBA_THREADING_LAYER" in os.environ:
        OPENMP_STATUS = f"not shared: NUMBA_THREADING_LAYER={os.environ['NUMBA_THREADING_LAYER']!r}"
        return False
    if parallel._is_initialized:
        if OPENMP_STATUS.startswith(_SHARED):
            return True  # started here by an earlier call (import fastnorm, then fastnorm.torch)
        OPENMP_STATUS = f"not shared: Numba's pool had already started ({numba.threading_layer()})"
        return False
    path = _torch_openmp_library(torch)
    if path is None:
        OPENMP_STATUS = "not shared: torch bundles no GNU OpenMP runtime (libgomp)"
        return False
    requested = numba.config.THREADING_LAYER
    torch_threads = torch.get_num_threads()
    try:
        # Global, so that Numba's omppool binds its GOMP_* and omp_* symbols to it.
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        numba.config.THREADING_LAYER = "omp"
        parallel._launch_threads()
    except (OSError, ValueError) as error:
        numba.config.THREADING_LAYER = requested
        OPENMP_STATUS = f"not shared: {error}"
        return False
    finally:
        torch.set_num_threads(torch_threads)  # omppool's start sets the runtime's count
    OPENMP_STATUS = _SHARED + path
    TBB_STATUS = "not loaded: the kernels run on torch's OpenMP runtime"
    return True


def share_torch_openmp_before_start():
    """Run :func:`share_torch_openmp` if torch is loaded and Numba's pool has not started.

    Called whenever a plan is made (:func:`fastnorm._plan._new_plan`), so that
    torch imported after fastnorm, but before its first kernel ran, still gets
    its runtime shared.  Once the pool runs this is one attribute test.
    """
    if not parallel._is_initialized and "torch" in sys.modules:
        share_torch_openmp()


def layer_status():
    """Return ``(layer, active)``: the threading layer in use, or the one Numba would pick now.

    Returns
    -------
    layer : str
        ``"tbb"``, ``"omp"`` or ``"workqueue"``; ``"none"`` if no layer can load.
    active : bool
        Whether Numba's pool runs already (otherwise ``layer`` is what its
        first parallel call will start, found by importing the candidate
        layers in Numba's order without starting a pool).
    """
    if parallel._is_initialized:
        return numba.threading_layer(), True
    layer = str(numba.config.THREADING_LAYER).lower()
    candidates = {
        "threadsafe": ["tbb", "omp"],
        "safe": ["tbb"],
        "forksafe": ["tbb", "workqueue"] if sys.platform.startswith("linux") else ["tbb", "omp", "workqueue"],
        "default": list(numba.config.THREADING_LAYER_PRIORITY),
    }.get(layer, [layer])
    for name in candidates:
        try:
            if name == "tbb":
                parallel._check_tbb_version_compatible()
                from numba.np.ufunc import tbbpool  # noqa: F401
            elif name == "omp":
                from numba.np.ufunc import omppool  # noqa: F401
            elif name != "workqueue":
                continue
        except ImportError:
            continue
        return name, False
    return "none", False


def fork_unsafe():
    """Whether a child forked from this process cannot run Numba's parallel regions.

    True when Numba's pool runs on GNU OpenMP: its ``parallel_for`` kills a
    forked child.  TBB (which re-creates its workers in the child) and
    workqueue are fork-safe; a pool that has not started yet starts afresh in
    the child.

    Returns
    -------
    bool
    """
    return parallel._is_initialized and numba.threading_layer() == "omp" and gnu_openmp()


def gnu_openmp():
    """Whether Numba's OpenMP layer is GNU OpenMP (not fork-safe) rather than Intel's or LLVM's.

    Returns
    -------
    bool
        Also ``False`` when the OpenMP layer cannot load.
    """
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return False
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"


def serial_after_fork():
    """Whether this process is a forked child that must run the kernels' serial builds.

    Returns
    -------
    bool
    """
    return _serial_after_fork


def _after_fork_in_child():
    global _serial_after_fork, _warned
    try:
        unsafe = fork_unsafe()
    except Exception:  # never let a fork fail here; serial builds are always safe
        unsafe = True
    if unsafe and not _serial_after_fork:
        _serial_after_fork = True
        _warned = False


def warn_serial_fallback():
    """Warn once per process that the kernels run single-threaded (forked child of OpenMP).

    No warning where torch runs one thread too (``torch.get_num_threads() == 1``,
    as in a DataLoader worker): the serial builds are then what was asked for.
    """
    global _warned
    if _warned:
        return
    _warned = True
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads") and torch.get_num_threads() == 1:
        return
    # Point the warning at the first frame outside the fastnorm package.
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        "fastnorm: this process was forked from one that ran Numba's GNU OpenMP threading layer, "
        "which cannot run in a forked child; fastnorm runs its kernels single-threaded here "
        "(same results, bitwise). For multithreaded kernels in forked processes, install the "
        "'tbb' extra (pip install 'fastnorm[tbb]'); in a process that imports torch, also set "
        "NUMBA_THREADING_LAYER=tbb (fastnorm otherwise shares torch's OpenMP runtime).",
        RuntimeWarning,
        stacklevel=level,
    )


if not share_torch_openmp():
    load_tbb()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
