"""Style rules: fastmath flags live in fastnorm/_config.py only; public functions have numpydoc docstrings."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastnorm

PACKAGE_DIR = Path(fastnorm.__file__).parent


def _package_sources():
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_fastmath_only_in_config():
    offenders = []
    for path in _package_sources():
        if path == PACKAGE_DIR / "_config.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "fastmath=" in line.replace(" ", ""):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "fastmath= outside fastnorm/_config.py:\n" + "\n".join(offenders)


def test_config_defines_fastmath():
    """The rule above is only meaningful if _config.py is where the flags are."""
    assert "fastmath" in (PACKAGE_DIR / "_config.py").read_text()


def _public_modules():
    """fastnorm and every submodule whose dotted name has no ``_``-prefixed part."""
    names = ["fastnorm"] + [
        m.name
        for m in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="fastnorm.")
        if not any(part.startswith("_") for part in m.name.split("."))
    ]
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:  # an optional extra (e.g. cffi) is missing: nothing to inspect there
            if "fastnorm" in str(exc):
                raise
    return modules


def _public_functions():
    """Public functions, classes and their public methods: ``__all__`` if defined, else non-``_`` names."""
    seen = {}
    for module in _public_modules():
        exported = getattr(module, "__all__", None)
        for name, obj in vars(module).items():
            if name.startswith("_") or (exported is not None and name not in exported):
                continue
            if not (getattr(obj, "__module__", None) or "").startswith("fastnorm"):
                continue  # imported from elsewhere
            if inspect.isfunction(obj) or inspect.isclass(obj):
                seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if not attr.startswith("_") and inspect.isfunction(func):
                        seen[f"{obj.__module__}.{obj.__qualname__}.{attr}"] = func
    return sorted(seen.items())


def _documented_parameters(doc):
    """Names listed in the numpydoc ``Parameters`` section (``a, b : type`` lines count every name)."""
    match = re.search(r"^Parameters\n-{3,}\n(.*?)(?=^\w[\w ]*\n-{3,}$|\Z)", doc, re.M | re.S)
    if not match:
        return None
    names = set()
    for line in match.group(1).splitlines():
        if line and not line[0].isspace():
            names.update(n.strip().lstrip("*") for n in line.split(":")[0].split(","))
    return names


PUBLIC = _public_functions()
DEFERS = re.compile(r"(parameters (and \w+ )?(are )?(those of|as (in )?)|see) :(func|class):", re.I)


def test_public_api_is_covered():
    names = {name.rsplit(".", 1)[-1] for name, _ in PUBLIC}
    assert set(fastnorm.__all__) - {"__version__"} <= names


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_function_has_numpydoc_docstring(name, obj):
    """A summary line, and a ``Parameters`` section naming every argument (or an explicit deferral)."""
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0].strip()
    assert summary.endswith("."), f"{name}: the summary line {summary!r} is not a sentence"
    lines = doc.splitlines()
    assert len(lines) == 1 or not lines[1].strip(), f"{name}: no blank line after the summary"
    if inspect.isclass(obj):
        return
    params = [
        p.name
        for p in inspect.signature(obj).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if not params:
        return
    documented = _documented_parameters(doc)
    if documented is None:
        assert DEFERS.search(doc), f"{name}: takes {params} but has no numpydoc Parameters section"
        return
    missing = [p for p in params if p not in documented]
    assert not missing, f"{name}: parameters {missing} are not in its Parameters section"


#: The modules of the public API, whose type hints mypy checks (fastnorm ships py.typed).
TYPED_MODULES = ("__init__.py", "_info.py", "core.py", "distributed.py", "functional.py", "mpi.py", "spec.py")


def test_public_api_type_checks():
    pytest.importorskip("mypy")
    assert (PACKAGE_DIR / "py.typed").is_file()
    paths = [str(PACKAGE_DIR / name) for name in TYPED_MODULES]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", *paths],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
