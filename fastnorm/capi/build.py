"""Build ``libfastnorm.so``: the C ABI as a cffi embedding-mode shared library.

The library contains ``capi/src/fastnorm_capi.c`` (validation, runtime start,
dispatch through C function pointers) and a few lines of Python init code that
cffi runs inside the embedded interpreter on the first call.  The Python
environment of the build (``sys.executable``, ``sys.prefix``, the
site-packages directories and the directory holding the ``fastnorm`` package)
is baked into the library, so a C program needs neither ``PYTHONHOME`` nor
``PYTHONPATH``; ``FASTNORM_PYTHONHOME`` overrides the baked home at run time.

Constants the C source shares with Python are not copied by hand: the build
writes ``fastnorm_generated.h`` (see :func:`generated_header`) with the kernel
flags of :mod:`fastnorm._kernels`, the function-table slots in the order of
:data:`fastnorm.capi._runtime.TABLE_ORDER` and the baked environment, and
``fastnorm_capi.c`` includes it.  The public header is
``capi/include/fastnorm.h``; ``fastnorm.pc`` takes its version from it.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import site
import sys
import sysconfig
import tempfile

__all__ = [
    "LIBRARY_NAME",
    "build",
    "cflags",
    "default_build_dir",
    "generated_constants",
    "generated_header",
    "header_version",
    "libs",
    "source_dir",
]

#: File name of the shared library.
LIBRARY_NAME = "libfastnorm.so"

#: Name of the header the build generates for ``fastnorm_capi.c`` (never installed).
GENERATED_HEADER = "fastnorm_generated.h"

#: Kernel flags of :mod:`fastnorm._kernels` exported to C as ``K_<name>``.
_KERNEL_FLAGS = ("BATCH", "CENTERED", "PER_ELEMENT", "CHANNELS_LAST")

#: Values of the ``AFTER_FORK`` slot, exported to C under the same names.
_AFTER_FORK_VALUES = ("AFTER_FORK_PARALLEL", "AFTER_FORK_SERIAL")

_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent  # .../fastnorm
_REPO_ROOT = _PACKAGE_ROOT.parent

_EMBEDDING_API = (
    "int _fastnorm_py_init(int64_t *table, int64_t table_len, int32_t owns_interpreter, "
    "char *message, int64_t message_len);\n"
    "int _fastnorm_py_load(int32_t slot, int64_t *address, char *message, int64_t message_len);"
)

_INIT_CODE = """
import os
import site
import sys

# Environment baked in at build time: make the build's packages importable even
# when the interpreter was started with another home (FASTNORM_PYTHONHOME).
for _path in {site_dirs!r}:
    if os.path.isdir(_path) and _path not in sys.path:
        site.addsitedir(_path)
if {package_parent!r} not in sys.path:
    sys.path.insert(0, {package_parent!r})

from _fastnorm_capi import ffi


def _reply(text, message, message_len):
    data = text.encode("utf-8", "replace")[: max(0, message_len - 1)]
    ffi.memmove(message, data, len(data))
    message[len(data)] = b"\\0"


@ffi.def_extern()
def _fastnorm_py_init(table, table_len, owns_interpreter, message, message_len):
    try:
        from fastnorm.capi import _runtime

        _reply(_runtime.fill_table(table, table_len, bool(owns_interpreter)), message, message_len)
        return 1
    except BaseException:
        import traceback

        _reply(traceback.format_exc(), message, message_len)
        return 0


@ffi.def_extern()
def _fastnorm_py_load(slot, address, message, message_len):
    try:
        from fastnorm.capi import _runtime

        address[0] = _runtime.load_slot(slot)
        return 1
    except BaseException:
        import traceback

        _reply(traceback.format_exc(), message, message_len)
        return 0
"""


def _checkout():
    """Whether the package runs from a source checkout (``capi/`` of the repository beside it)."""
    repo = _REPO_ROOT
    return (repo / "capi" / "include" / "fastnorm.h").is_file() and (repo / "pyproject.toml").is_file()


def source_dir():
    """Return the directory holding ``include/fastnorm.h`` and ``src/fastnorm_capi.c``.

    ``capi/`` of a source checkout (or editable install); in an installed
    wheel, the data package ``fastnorm.capi.sources`` that ships the same two
    files (``pyproject.toml``).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If the C sources are in neither place.
    """
    path = _REPO_ROOT / "capi" if _checkout() else _PACKAGE_ROOT / "capi" / "sources"
    if not (path / "include" / "fastnorm.h").is_file() or not (path / "src" / "fastnorm_capi.c").is_file():
        raise FileNotFoundError(
            f"the C API sources are not at {path} (include/fastnorm.h, src/fastnorm_capi.c): reinstall "
            "fastnorm, or build from a source checkout"
        )
    return path


def default_build_dir():
    """Return the default output directory.

    ``capi/build/`` of a source checkout; ``fastnorm/capi/build/`` inside an
    installed package (beside Numba's cache of the kernels, which is also
    written into the package).
    """
    return (_REPO_ROOT / "capi" if _checkout() else _PACKAGE_ROOT / "capi") / "build"


def _c_string(text):
    """Quote ``text`` as a C string literal (JSON escapes are valid C escapes for ASCII)."""
    return json.dumps(text, ensure_ascii=True)


def generated_constants():
    """Collect the integer constants that :func:`generated_header` gives the C source.

    Returns
    -------
    dict
        ``{"K_BATCH": 1, ..., "SLOT_FORWARD_TRAINING_FLOAT32": 0, ..., "SLOT_COUNT": 10, ...}``:
        ``K_<flag>`` from :mod:`fastnorm._kernels` (imported by name), and one
        ``SLOT_<OP>_<DTYPE>`` per entry of
        :data:`fastnorm.capi._runtime.TABLE_ORDER` in its order, followed by the
        threading slots that :func:`fastnorm.capi._runtime.fill_table` appends
        and ``SLOT_COUNT``; then the values of the ``AFTER_FORK`` slot,
        ``AFTER_FORK_PARALLEL`` and ``AFTER_FORK_SERIAL``, from
        :mod:`fastnorm.capi._runtime`; then ``K_ACTIVATION_<NAME>``, the
        epilogue's activation codes (:data:`fastnorm._kernels.ACTIVATIONS`),
        which ``fastnorm_activation`` must equal (checked when it compiles).
    """
    from fastnorm import _kernels

    from . import _runtime

    constants = {f"K_{name}": int(getattr(_kernels, name)) for name in _KERNEL_FLAGS}
    slots = [f"{op}_{dtype}".upper() for op, dtype in _runtime.TABLE_ORDER] + list(_runtime.THREADING_SLOTS)
    if len(set(slots)) != len(slots):
        raise RuntimeError(f"duplicate table slots: {slots}")
    constants.update({f"SLOT_{name}": index for index, name in enumerate(slots)})
    constants["SLOT_COUNT"] = len(slots)
    constants.update({name: int(getattr(_runtime, name)) for name in _AFTER_FORK_VALUES})
    activations = {name: code for name, code in _kernels.ACTIVATIONS.items() if name is not None}
    constants.update({f"K_ACTIVATION_{name.upper()}": code for name, code in activations.items()})
    return constants


def generated_header():
    """Text of ``fastnorm_generated.h``, the header the build writes for ``fastnorm_capi.c``.

    Returns
    -------
    str
        C declarations: the kernel flags and table slots of
        :func:`generated_constants` as enums, and the baked Python environment
        (``FASTNORM_BAKED_EXECUTABLE``, ``FASTNORM_BAKED_PY_VERSION``) as
        static strings.
    """
    constants = generated_constants()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"

    flags = ", ".join(_KERNEL_FLAGS)

    def enum(prefix):
        items = [f"    {name} = {value}," for name, value in constants.items() if name.startswith(prefix)]
        return "enum {\n" + "\n".join(items) + "\n};\n"

    return (
        f"/* {GENERATED_HEADER} -- written by fastnorm/capi/build.py for capi/src/fastnorm_capi.c.\n"
        " * Generated at build time: do not edit, do not install. */\n"
        "#ifndef FASTNORM_GENERATED_H\n#define FASTNORM_GENERATED_H\n\n"
        f"/* Kernel flags: fastnorm._kernels.{{{flags}}}. */\n"
        + enum("K_")
        + "\n/* Slots of the function table: the cfuncs of fastnorm.capi._runtime.TABLE_ORDER\n"
        " * (each written at its first use, from _runtime.load_slot), then what\n"
        " * _runtime.fill_table writes at the start: the threading layer's set/get_num_threads,\n"
        " * the pool size and what a forked child runs (one of the AFTER_FORK_* values below). */\n"
        + enum("SLOT_")
        + "\n/* Values of the SLOT_AFTER_FORK slot (fastnorm.capi._runtime). */\n"
        + enum("AFTER_FORK_")
        + "\n/* The Python environment of the build (see fastnorm/capi/build.py). */\n"
        f"static const char FASTNORM_BAKED_EXECUTABLE[] = {_c_string(sys.executable)};\n"
        f"static const char FASTNORM_BAKED_PY_VERSION[] = {_c_string(version)};\n\n"
        "#endif /* FASTNORM_GENERATED_H */\n"
    )


def header_version(header=None):
    """Read the version ``MAJOR.MINOR.PATCH`` from the C header's ``FASTNORM_VERSION_*`` macros.

    Parameters
    ----------
    header : path-like, optional
        Header to read (default ``include/fastnorm.h`` of :func:`source_dir`).

    Returns
    -------
    str
        E.g. ``"0.2.0"``.

    Raises
    ------
    ValueError
        If a ``FASTNORM_VERSION_MAJOR/MINOR/PATCH`` macro is missing.
    """
    text = pathlib.Path(header or source_dir() / "include" / "fastnorm.h").read_text()
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        match = re.search(rf"^#define FASTNORM_VERSION_{part} (\d+)$", text, re.MULTILINE)
        if match is None:
            raise ValueError(f"FASTNORM_VERSION_{part} is not defined in {header}")
        parts.append(match.group(1))
    return ".".join(parts)


def _site_dirs():
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages()
    if site.ENABLE_USER_SITE and user:
        dirs.append(user)
    return [d for d in dirs if pathlib.Path(d).is_dir()]


def cflags(out_dir=None):
    """Compiler flags for a C program using ``fastnorm.h``.

    Parameters
    ----------
    out_dir : path-like, optional
        Build directory (default :func:`default_build_dir`).

    Returns
    -------
    str
    """
    out = pathlib.Path(out_dir or default_build_dir()).resolve()
    return f"-I{out / 'include'}"


def libs(out_dir=None):
    """Linker flags for a C program using ``libfastnorm.so`` (with an rpath to it).

    Parameters
    ----------
    out_dir : path-like, optional
        Build directory (default :func:`default_build_dir`).

    Returns
    -------
    str
    """
    out = pathlib.Path(out_dir or default_build_dir()).resolve()
    return f"-L{out} -Wl,-rpath,{out} -lfastnorm"


def _write_pkgconfig(out, version):
    text = (
        f"prefix={out}\n"
        "libdir=${prefix}\n"
        "includedir=${prefix}/include\n\n"
        "Name: fastnorm\n"
        "Description: BatchNorm/InstanceNorm/GroupNorm/LayerNorm/RMSNorm forward and backward "
        "(C ABI of the fastnorm Numba kernels)\n"
        f"Version: {version}\n"
        "Cflags: -I${includedir}\n"
        "Libs: -L${libdir} -Wl,-rpath,${libdir} -lfastnorm\n"
    )
    (out / "fastnorm.pc").write_text(text)


def build(out_dir=None, verbose=False, extra_cflags=(), extra_ldflags=()):
    """Compile ``libfastnorm.so`` and install it with its header and ``fastnorm.pc``.

    Parameters
    ----------
    out_dir : path-like, optional
        Output directory (default :func:`default_build_dir`).  Receives
        ``libfastnorm.so``, ``include/fastnorm.h`` and ``fastnorm.pc`` (the
        generated ``fastnorm_generated.h`` stays in the temporary build
        directory).
    verbose : bool, optional
        Show the compiler command lines.
    extra_cflags, extra_ldflags : sequence of str, optional
        Additional compiler / linker flags (e.g. ``-fsanitize=address``).

    Returns
    -------
    pathlib.Path
        Path of the built library.

    Raises
    ------
    ImportError
        If cffi is not installed.
    RuntimeError
        If the interpreter has no shared ``libpython`` to embed.
    """
    import cffi

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise RuntimeError(
            f"{sys.executable} was built without a shared libpython (Py_ENABLE_SHARED=0); embedding needs one"
        )
    src = source_dir()
    out = pathlib.Path(out_dir or default_build_dir()).resolve()
    (out / "include").mkdir(parents=True, exist_ok=True)
    libdir = sysconfig.get_config_var("LIBDIR")
    init_code = _INIT_CODE.format(site_dirs=_site_dirs(), package_parent=str(_PACKAGE_ROOT.parent))

    ffi = cffi.FFI()
    ffi.embedding_api(_EMBEDDING_API)
    generated = generated_header()
    with tempfile.TemporaryDirectory(prefix="fastnorm-capi-") as tmp:
        version_script = pathlib.Path(tmp) / "exports.map"
        version_script.write_text("{ global: fastnorm_*; local: *; };\n")
        (pathlib.Path(tmp) / GENERATED_HEADER).write_text(generated)
        ffi.set_source(
            "_fastnorm_capi",
            '#include "fastnorm_capi.c"\n',
            include_dirs=[str(src / "include"), str(src / "src"), tmp],
            extra_compile_args=["-O2", "-fvisibility=hidden", *extra_cflags],
            extra_link_args=[
                f"-Wl,--version-script={version_script}",
                f"-Wl,-soname,{LIBRARY_NAME}",
                f"-Wl,-rpath,{libdir}",
                "-pthread",
                *extra_ldflags,
            ],
        )
        ffi.embedding_init_code(init_code)
        built = ffi.compile(tmpdir=tmp, target=LIBRARY_NAME, verbose=verbose)
        target = out / LIBRARY_NAME
        tmp_target = out / (LIBRARY_NAME + ".tmp")
        shutil.copyfile(built, tmp_target)
        tmp_target.chmod(0o755)
        tmp_target.replace(target)  # atomic: running programs keep the old inode
    shutil.copyfile(src / "include" / "fastnorm.h", out / "include" / "fastnorm.h")
    _write_pkgconfig(out, header_version(src / "include" / "fastnorm.h"))
    return target
