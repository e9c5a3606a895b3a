"""Sphinx configuration of the fastnorm documentation site (``make docs``).

The pages are the Markdown files of ``docs/`` (MyST), the Python API reference
is generated from the numpydoc docstrings of ``fastnorm.__all__`` (autodoc,
autosummary, numpydoc), and the C API reference from
``capi/include/fastnorm.h`` (``_ext/c_header.py``); links from the pages to files
outside ``docs/`` are handled by MyST and ``_ext/repo_links.py``.  ``make docs``
builds with ``-W --keep-going``: every warning fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sphinx.util import logging

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))

import fastnorm  # noqa: E402  (after the path set-up: the API reference documents this checkout)

logger = logging.getLogger("fastnorm.docs")

project = "fastnorm"
author = "the fastnorm developers"
copyright = "the fastnorm developers"  # noqa: A001  (Sphinx's name)
release = version = fastnorm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
    "c_header",
    "repo_links",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# Every cross-reference must resolve (with -W: a broken one fails the build), except the C
# standard types of the header's signatures, which no page documents.
nitpicky = True
nitpick_ignore = [("c:identifier", name) for name in ("size_t", "int32_t", "int64_t", "uint64_t")]

# Unlabelled ``` blocks (the formulas of math.md, tables of figures) are plain text, not Python.
highlight_language = "none"
pygments_style = "sphinx"

# -- MyST: the existing Markdown pages, rendered as they are -----------------------------------------
# Pipe tables are built in; "colon_fence" allows ::: directives in the new pages.  No dollarmath:
# math.md writes its formulas in code blocks, and "$" appears in the shell snippets.
myst_enable_extensions = ["colon_fence", "attrs_inline"]
# GitHub-style anchors for headings up to ###, so that links like c-api.md#fuzzing resolve.
myst_heading_anchors = 3

# -- autodoc / autosummary / numpydoc ---------------------------------------------------------------
autodoc_typehints = "none"  # numpydoc's Parameters sections give the types
autodoc_member_order = "bysource"
autosummary_generate = False  # the reference page lists the objects itself (no generated stubs)
numpydoc_show_class_members = False  # members are documented by autodoc's :members: below them
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- HTML ---------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"fastnorm {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}


def _check_api_coverage(app, env):
    """Warn (an error under -W) about a name of ``fastnorm.__all__`` the reference does not document."""
    documented = env.get_domain("py").objects
    for name in fastnorm.__all__:
        if f"fastnorm.{name}" not in documented:
            logger.warning("fastnorm.%s is exported but not documented in python-reference.rst", name)


def setup(app):
    """Project-specific checks of the build."""
    app.connect("env-check-consistency", _check_api_coverage)
