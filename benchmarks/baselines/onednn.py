"""oneDNN's normalization primitives through ctypes: the oneDNN baseline of :mod:`benchmarks`.

oneDNN (``libdnnl``) is Intel's CPU kernel library behind PyTorch's and
TensorFlow's optimized CPU paths.  This module binds the few C API calls that
build and run its batch and layer normalization primitives on caller-owned
NumPy buffers, so that the benchmark can time oneDNN's kernels with
preallocated outputs, exactly like fastnorm's ``out=`` calls.  It is a
benchmark baseline, not a dependency: fastnorm itself never loads oneDNN.

The library comes from the ``onednn-cpu-gomp`` wheel (oneDNN 3.2 with the
GNU OpenMP runtime; part of the ``bench`` extra), which installs
``libdnnl.so.3`` into ``<sys.prefix>/lib``.  ``FASTNORM_ONEDNN_LIBRARY``
names another copy.

What oneDNN 3.2 offers on the CPU, and therefore what is compared:

* BatchNorm, float32, NCHW (``nchw``) and channels-last (``nhwc``) memory;
* InstanceNorm, float32, NCHW only: BatchNorm over the ``(1, N*C, H, W)``
  view of the same memory (how PyTorch runs it too), with the affine
  parameters repeated per sample and ``dweight``/``dbias`` left per
  ``(n, c)`` (their sum over ``n``, ``N*C`` additions, is not timed);
* LayerNorm over the last dimension of a 2-D float32 array.

The same three with bfloat16 data (``src``, ``dst``, ``diff_src``,
``diff_dst``; scale, shift and statistics stay float32, as oneDNN requires):
oneDNN 3.2 implements them on AVX-512 CPUs (``avx512_core`` and up).  float16
data needs ``avx512_core_fp16`` (Sapphire Rapids); elsewhere oneDNN answers
"unimplemented" when the primitive is built (:class:`OneDNNError` with
``status == UNIMPLEMENTED``), which the benchmark treats as "no baseline".
GroupNorm (oneDNN 3.3+) and RMSNorm (3.5+) are not in this version; float64
is not supported by these primitives.  :func:`supports` says which cases
may have a baseline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

from . import dtype_name as _dtype_name

__all__ = ["OneDNNError", "UNIMPLEMENTED", "load", "supports", "normalization"]

# Values from oneDNN 3.2's dnnl_common_types.h / dnnl_types.h.
_SUCCESS = 0
_ENGINE_CPU = 1
_STREAM_IN_ORDER = 1
#: oneDNN data types (``dnnl_data_type_t``) of the NumPy dtype names the binding accepts.
_DATA_TYPES = {"float16": 1, "bfloat16": 2, "float32": 3}
#: ``dnnl_status_t`` of a primitive oneDNN has no implementation of (on this CPU).
UNIMPLEMENTED = 3
_TAG = {"a": 2, "ab": 3, "nchw": 5, "nhwc": 22}
_FORWARD_TRAINING = 64
_FORWARD_INFERENCE = 96
_BACKWARD = 128
_USE_GLOBAL_STATS = 0x1
_USE_SCALE = 0x2
_USE_SHIFT = 0x4
_ARG = {
    "src": 1,
    "dst": 17,
    "mean": 49,
    "variance": 50,
    "scale": 51,
    "shift": 52,
    "diff_src": 129,
    "diff_dst": 145,
    "diff_scale": 255,
    "diff_shift": 256,
}
_STATUS = {
    1: "out of memory",
    2: "invalid arguments",
    3: "unimplemented",
    5: "runtime error",
    6: "not required",
}

#: Environment variable naming the ``libdnnl`` shared library to load.
LIBRARY_ENV = "FASTNORM_ONEDNN_LIBRARY"


class OneDNNError(RuntimeError):
    """A oneDNN call failed, or the library cannot be loaded.

    Parameters
    ----------
    message : str
    status : int, optional
        The ``dnnl_status_t`` of the failed call (:data:`UNIMPLEMENTED`: no
        implementation on this CPU); ``None`` when no call failed.
    """

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_int),
        ("minor", ctypes.c_int),
        ("patch", ctypes.c_int),
        ("hash", ctypes.c_char_p),
        ("cpu_runtime", ctypes.c_uint),
        ("gpu_runtime", ctypes.c_uint),
    ]


def _desc_args(memory_descs, hint):
    """Argument types of a normalization primitive-descriptor constructor of oneDNN's C API."""
    vp = ctypes.c_void_p
    head = [ctypes.POINTER(vp), vp, ctypes.c_int] + [vp] * memory_descs
    return head + [ctypes.c_float, ctypes.c_uint] + ([vp] if hint else []) + [vp]


class _Library:
    """A loaded ``libdnnl`` with one CPU engine and one in-order stream."""

    def __init__(self, path):
        self.path = path
        self.dll = ctypes.CDLL(path)
        dll = self.dll
        vp, pvp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        signatures = {
            "dnnl_engine_create": [pvp, ctypes.c_int, ctypes.c_size_t],
            "dnnl_stream_create": [pvp, vp, ctypes.c_uint],
            "dnnl_stream_wait": [vp],
            "dnnl_memory_desc_create_with_tag": [
                pvp,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_int64),
                ctypes.c_int,
                ctypes.c_int,
            ],
            "dnnl_memory_create": [pvp, vp, vp, vp],
            # (descriptor*, engine, prop_kind, memory descriptors..., epsilon, flags, [hint], attr)
            "dnnl_batch_normalization_forward_primitive_desc_create": _desc_args(2, hint=False),
            "dnnl_batch_normalization_backward_primitive_desc_create": _desc_args(3, hint=True),
            "dnnl_layer_normalization_forward_primitive_desc_create": _desc_args(3, hint=False),
            "dnnl_layer_normalization_backward_primitive_desc_create": _desc_args(4, hint=True),
            "dnnl_primitive_create": [pvp, vp],
            "dnnl_primitive_execute": [vp, vp, ctypes.c_int, ctypes.POINTER(_ExecArg)],
        }
        for name, argtypes in signatures.items():
            fn = getattr(dll, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        dll.dnnl_version.restype = ctypes.POINTER(_Version)
        dll.dnnl_version.argtypes = []
        version = dll.dnnl_version().contents
        self.version = (version.major, version.minor, version.patch)
        self.engine = self._create("dnnl_engine_create", _ENGINE_CPU, 0)
        self.stream = self._create("dnnl_stream_create", self.engine, _STREAM_IN_ORDER)
        self._omp = _openmp_runtime()

    def call(self, name, *args):
        status = getattr(self.dll, name)(*args)
        if status != _SUCCESS:
            raise OneDNNError(f"{name} failed: {_STATUS.get(status, 'status')} ({status})", status)

    def _create(self, name, *args):
        handle = ctypes.c_void_p()
        self.call(name, ctypes.byref(handle), *args)
        return handle

    def memory_desc(self, dims, tag, dtype="float32"):
        array = (ctypes.c_int64 * len(dims))(*dims)
        data_type = _DATA_TYPES[_dtype_name(dtype)]
        return self._create("dnnl_memory_desc_create_with_tag", len(dims), array, data_type, _TAG[tag])

    def memory(self, desc, array):
        return self._create("dnnl_memory_create", desc, self.engine, ctypes.c_void_p(array.ctypes.data))

    def set_threads(self, threads):
        """Set the OpenMP thread count of the calling thread, which oneDNN's parallel regions use."""
        if self._omp is not None:
            self._omp.omp_set_num_threads(int(threads))


def _openmp_runtime():
    """Return the GNU OpenMP runtime ``libdnnl`` links to (loaded with it), or ``None``."""
    try:
        omp = ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None
    omp.omp_set_num_threads.argtypes = [ctypes.c_int]
    omp.omp_set_num_threads.restype = None
    return omp


def _candidates():
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return [env]
    paths = [str(Path(sys.prefix) / "lib" / "libdnnl.so.3")]
    found = ctypes.util.find_library("dnnl")
    if found:
        paths.append(found)
    return paths


_LIBRARY = None


def load():
    """Load ``libdnnl`` once and return it.

    Returns
    -------
    _Library
        The library with a CPU engine and stream; ``.version`` is its
        ``(major, minor, patch)``.

    Raises
    ------
    OneDNNError
        When no library loads (install ``onednn-cpu-gomp``, or set
        ``FASTNORM_ONEDNN_LIBRARY``) or its version is not 3.x.

    Notes
    -----
    oneDNN's OpenMP threads spin after each parallel region for
    ``GOMP_SPINCOUNT`` iterations; the benchmark loads oneDNN through
    :func:`benchmarks.runtime.load_onednn`, which sets that variable first, so
    idle oneDNN threads do not steal the cores of the next timed call.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    errors = []
    for path in _candidates():
        try:
            library = _Library(path)
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        if library.version[0] != 3:
            raise OneDNNError(f"{path} is oneDNN {library.version}; the binding needs 3.x")
        _LIBRARY = library
        return library
    raise OneDNNError(
        "cannot load oneDNN (pip install onednn-cpu-gomp, or set "
        f"{LIBRARY_ENV}=/path/to/libdnnl.so.3): " + "; ".join(errors)
    )


def supports(kind, layout, dtype):
    """Whether oneDNN 3.2 has a primitive for this benchmark case.

    Parameters
    ----------
    kind : str
        ``"batch_norm"``, ``"instance_norm"``, ``"group_norm"``,
        ``"layer_norm"`` or ``"rms_norm"``.
    layout : str
        ``"nchw"`` or ``"nhwc"``.
    dtype : numpy dtype-like
        ``float32``, or the 16-bit ``bfloat16`` (``ml_dtypes``) or ``float16``
        (whether this CPU runs those is known only when the primitive is built:
        :func:`normalization` then raises :class:`OneDNNError` with ``status ==
        UNIMPLEMENTED``).

    Returns
    -------
    bool
    """
    if _dtype_name(dtype) not in _DATA_TYPES:
        return False
    if kind == "batch_norm" or kind == "layer_norm":
        return True
    return kind == "instance_norm" and layout == "nchw"


def _checked(array, dtype_name):
    if array.dtype.name != dtype_name or not array.flags.c_contiguous:
        raise ValueError(
            f"oneDNN buffers must be C-contiguous float32 arrays (data may be bfloat16 or float16, "
            f"then x, out and dy alike); got {array.dtype.name}, expected {dtype_name}"
        )
    return array


class _Primitive:
    """A oneDNN primitive bound to its buffers: calling it runs it once and waits."""

    def __init__(self, library, primitive_desc, arguments):
        self._library = library
        self._keep = dict(arguments)  # the NumPy arrays must outlive the memories
        self._primitive = library._create("dnnl_primitive_create", primitive_desc)
        memories = []
        for name, (desc, array) in arguments.items():
            memories.append(_ExecArg(_ARG[name], library.memory(desc, array).value))
        self._args = (_ExecArg * len(memories))(*memories)
        self._nargs = len(memories)

    def __call__(self):
        library = self._library
        library.call("dnnl_primitive_execute", self._primitive, library.stream, self._nargs, self._args)
        library.call("dnnl_stream_wait", library.stream)


def normalization(kind, pass_, layout, x, out, weight, bias, mean, variance, eps, dy=None, grads=None):
    """Build a oneDNN primitive that runs one normalization pass on the given buffers.

    Parameters
    ----------
    kind : str
        ``"batch_norm"``, ``"instance_norm"`` (``nchw`` only) or ``"layer_norm"``.
    pass_ : str
        ``"fwd"`` (training: computes ``mean`` and ``variance``), ``"inf"``
        (uses the given ``mean`` and ``variance``) or ``"bwd"`` (computes
        ``out`` = dx and ``grads`` from ``dy`` and the given statistics).
    layout : str
        Memory of ``x``: ``"nchw"`` or ``"nhwc"`` (an ``(N, H, W, C)`` array)
        for BatchNorm; ignored for LayerNorm (a ``(rows, width)`` array).
    x, out : numpy.ndarray
        Input and output (``y`` or ``dx``), C-contiguous, same shape, float32
        or both bfloat16 or both float16 (see :func:`supports`).
    weight, bias : numpy.ndarray
        float32, per channel (per element of a row for LayerNorm); for
        InstanceNorm per ``(n, c)`` (``N*C`` values).
    mean, variance : numpy.ndarray
        float32, one per statistic (channel, ``(n, c)`` or row): written by ``fwd``,
        read by ``inf`` and ``bwd``.  ``variance`` is the biased variance
        (``1 / rstd**2 - eps``).
    eps : float
    dy : numpy.ndarray, optional
        Upstream gradient, like ``x`` (``bwd`` only).
    grads : tuple of numpy.ndarray, optional
        ``(dweight, dbias)`` outputs, float32 like ``weight`` (``bwd`` only).

    Returns
    -------
    callable
        Zero-argument callable running the pass; every buffer stays owned by
        the caller and must outlive it.  Not thread-safe (one stream).

    Raises
    ------
    OneDNNError
        When oneDNN cannot build the primitive (``status == UNIMPLEMENTED``:
        not on this CPU, e.g. float16 data without ``avx512_core_fp16``).
    ValueError
        For a case oneDNN 3.2 does not cover, or a buffer of the wrong dtype
        (data not float32, bfloat16 or float16; parameters and statistics not
        float32) or not C-contiguous.
    """
    library = load()
    if kind == "layer_norm":
        dims, tag, stat_dims = list(x.shape), "ab", [x.shape[0]]
        channels = x.shape[1]
    elif kind in ("batch_norm", "instance_norm"):
        if layout == "nhwc":
            if kind == "instance_norm":
                raise ValueError("oneDNN has no channels-last InstanceNorm (BatchNorm view needs NCHW)")
            n, h, w, c = x.shape
            dims, tag = [n, c, h, w], "nhwc"
        else:
            n, c, h, w = x.shape
            dims, tag = ([1, n * c, h, w] if kind == "instance_norm" else [n, c, h, w]), "nchw"
        channels = dims[1]
        stat_dims = [channels]
    else:
        raise ValueError(f"oneDNN 3.2 has no {kind} primitive")
    sizes = {"weight": channels, "bias": channels, "mean": stat_dims[0], "variance": stat_dims[0]}
    for name, array in (("weight", weight), ("bias", bias), ("mean", mean), ("variance", variance)):
        if array.size != sizes[name]:
            raise ValueError(f"{name} has {array.size} values; this oneDNN primitive needs {sizes[name]}")
    data_dtype = x.dtype.name if x.dtype.name in _DATA_TYPES else "float32"
    buffers = [(x, data_dtype), (out, data_dtype), (weight, "float32"), (bias, "float32")]
    buffers += [(mean, "float32"), (variance, "float32")]
    if dy is not None:
        buffers.append((dy, data_dtype))
    for array, dtype_name in buffers + [(g, "float32") for g in grads or ()]:
        _checked(array, dtype_name)
    data = library.memory_desc(dims, tag, data_dtype)
    stats = library.memory_desc(stat_dims, "a")
    params = library.memory_desc([channels], "a")
    flags = _USE_SCALE | _USE_SHIFT
    prefix = "dnnl_layer_normalization" if kind == "layer_norm" else "dnnl_batch_normalization"
    stat_args = (stats,) if kind == "layer_norm" else ()

    def forward_desc(prop, forward_flags):
        return library._create(
            prefix + "_forward_primitive_desc_create",
            library.engine,
            prop,
            data,
            data,
            *stat_args,
            ctypes.c_float(eps),
            forward_flags,
            None,
        )

    arguments = {
        "src": (data, x),
        "mean": (stats, mean),
        "variance": (stats, variance),
        "scale": (params, weight),
    }
    if pass_ == "bwd":
        if dy is None or grads is None:
            raise ValueError("the backward pass needs dy and grads=(dweight, dbias)")
        hint = forward_desc(_FORWARD_TRAINING, flags)
        desc = library._create(
            prefix + "_backward_primitive_desc_create",
            library.engine,
            _BACKWARD,
            data,
            data,
            data,
            *stat_args,
            ctypes.c_float(eps),
            flags,
            hint,
            None,
        )
        arguments.update(
            {
                "diff_dst": (data, dy),
                "diff_src": (data, out),
                "diff_scale": (params, grads[0]),
                "diff_shift": (params, grads[1]),
            }
        )
        if kind == "layer_norm":  # oneDNN's LayerNorm backward also takes the shift as an input
            arguments["shift"] = (params, bias)
    else:
        prop = _FORWARD_TRAINING if pass_ == "fwd" else _FORWARD_INFERENCE
        desc = forward_desc(prop, flags | (_USE_GLOBAL_STATS if pass_ == "inf" else 0))
        arguments.update({"shift": (params, bias), "dst": (data, out)})
    return _Primitive(library, desc, arguments)
