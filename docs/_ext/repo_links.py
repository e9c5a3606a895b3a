"""Sphinx extension: Markdown links from the docs to the rest of the repository.

The Markdown pages link to files next to the docs tree, as they should read on
GitHub (``[capi/tests/fuzz.c](../capi/tests/fuzz.c)``).  In the site:

* a link to a file outside ``docs/`` is MyST's download link: Sphinx copies the
  file into ``_downloads/`` and the link serves it (a link to
  ``capi/include/fastnorm.h`` goes to the C API reference instead: ``c_header``);
* a link to a directory of the repository outside ``docs/`` (``../tests/``),
  which MyST cannot resolve and warns about, becomes its text without a link
  (this extension): the site has no page for a directory;
* a link to a path that does not exist still warns, so ``-W`` fails the build.
"""

from __future__ import annotations

import os
from pathlib import Path

from sphinx import addnodes
from sphinx.transforms.post_transforms import SphinxPostTransform


class RepositoryDirectoryLinks(SphinxPostTransform):
    """Turn MyST links to repository directories outside the docs into plain text."""

    default_priority = 5  # before MyST's resolver (9), which would warn about them

    def run(self, **kwargs):
        """Replace each such link by its content."""
        srcdir = Path(os.path.normpath(self.env.srcdir))  # normpath, not resolve: symlinks are not followed
        root = srcdir.parent
        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") != "myst" or node.get("refdomain"):
                continue
            target = node["reftarget"].split("#", 1)[0]
            if not target or "://" in target:
                continue
            page_dir = os.path.dirname(node.get("refdoc", self.env.docname))
            base = srcdir if target.startswith("/") else srcdir / page_dir
            path = Path(os.path.normpath(base / target.lstrip("/")))
            if path.is_dir() and path.is_relative_to(root) and not path.is_relative_to(srcdir):
                node.replace_self(node.children[0].deepcopy() if node.children else [])


def setup(app):
    """Register the post-transform."""
    app.add_post_transform(RepositoryDirectoryLinks)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
