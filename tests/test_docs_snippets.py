"""The Python example of README.md runs as written (each ```python block in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    return [(f"{name}:{text[: m.start()].count(chr(10)) + 1}", m.group(1)) for m in _BLOCK.finditer(text)]


SNIPPETS = _blocks("README.md")


def test_readme_has_an_example():
    assert SNIPPETS, "README.md lost its ```python example"


@pytest.mark.parametrize(("where", "code"), SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_snippet_runs(where, code):
    exec(compile(code, where, "exec"), {"__name__": "__snippet__"})
