"""Sphinx extension: a C API reference generated from a C header's own comments.

``c-header`` reads a header (``capi/include/fastnorm.h``) as text and emits its
public declarations as Sphinx C-domain objects, each with the comment written
above it, so that the reference cannot drift from the header and needs no
Doxygen::

    ```{c-header} ../capi/include/fastnorm.h
    :part: functions
    ```

The argument is relative to the page; ``:part:`` is one of ``overview`` (the
file's leading comment), ``macros``, ``types`` (enums and structs) or
``functions`` (the default: all four, in that order).

The header conventions it understands (and it warns, so that ``-W`` fails the
build, about anything it does not):

* a comment documents the declaration that starts on the line after it ends;
* ``#define NAME``: a documented macro; object-like macros without a comment of
  their own right after it share its comment (``FASTNORM_VERSION_MAJOR``,
  ``_MINOR``, ``_PATCH``); undocumented function-like helper macros
  (``FASTNORM_QUOTE``) and the include guard are left out; a comment followed
  by ``#if`` documents the macros defined in that conditional block;
* ``typedef enum NAME { ... } NAME;`` with one enumerator per line and its
  trailing ``/* comment */`` (which may continue on the following lines);
* ``typedef struct NAME { ... } NAME;`` whose comment lists the fields as
  ``name    description`` lines (continuations indented), plus the trailing
  comment of each field;
* ``FASTNORM_API <prototype>;`` (the macro is the ``c_header_api_macro``
  setting) with a ``/** ... */`` comment using
  ``@param name(s) text`` and ``@returns text`` (continuation lines indented).

Comment text is rendered as plain text (never parsed as markup): flowing
lines become paragraphs, ``- `` lines bullet lists, lines indented by four or
more spaces a C code block, other irregularly laid out paragraphs a literal
block; names declared by the header become cross-references.

A Markdown link to the header itself (MyST makes it a download link) is
pointed at the page that documents it with ``c-header``.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

PARTS = ("overview", "macros", "types", "functions")
#: C-domain role that refers to each kind of declaration.
ROLES = {"macro": "macro", "enum": "enum", "enumerator": "enumerator", "struct": "struct", "function": "func"}
_IDENT = re.compile(r"\b[A-Za-z_]\w*\b")
_DEFINE = re.compile(r"#\s*define\s+(\w+)(\()?")
_TYPEDEF = re.compile(r"typedef\s+(enum|struct)\s+(\w+)\s*\{")
_ENUMERATOR = re.compile(r"\s*(\w+)\s*(?:=\s*([^,/]+?))?\s*,?\s*(?:/\*(.*))?$")
_MEMBER = re.compile(r"\s*([^;/]+?)\s*;\s*(?:/\*(.*?)\*/)?\s*$")
_FIELD_TAG = re.compile(r"@(param|returns?)\b\s*(.*)")
_PARAM = re.compile(r"(\w+(?:\s*,\s*\w+)*)\s+(.*)")
_HEADING_RULE = re.compile(r"[-=]{3,}$")
_LABEL_LINE = re.compile(r"[A-Z]\w*:\s")


@dataclass
class Member:
    """An enumerator or a struct field."""

    declaration: str
    name: str
    comment: str = ""


@dataclass
class Declaration:
    """One documented declaration of the header."""

    kind: str  # "macro", "enum", "struct" or "function"
    names: list[str]
    signature: str
    comment: str
    line: int
    source: str = ""
    members: list[Member] = field(default_factory=list)


@dataclass
class Header:
    """What :func:`parse_header` finds: the leading comment and the declarations, in order."""

    overview: str
    declarations: list[Declaration]
    problems: list[tuple[int, str]]

    def kinds(self):
        """Map every declared name (enumerators included) to its kind."""
        kinds = {}
        for decl in self.declarations:
            for name in decl.names:
                kinds[name] = decl.kind
            if decl.kind == "enum":
                kinds.update((member.name, "enumerator") for member in decl.members)
        return kinds


def clean_comment(text):
    """Return the text of a ``/* ... */`` or ``/** ... */`` comment, its relative indentation kept."""
    lines = text.strip().splitlines()
    lines[0] = re.sub(r"^/\*+", lambda m: " " * len(m.group()), lines[0])
    lines[-1] = re.sub(r"\s*\*/$", "", lines[-1])
    if len(lines) > 1 and all(re.match(r"\s*\*", line) for line in lines[1:] if line.strip()):
        # star style: " * text" -> "text", the first line being "/**" (or text after it)
        body = [re.sub(r"^\s*\*( |$)", "", line) for line in lines[1:]]
        first = lines[0].strip()
        lines = ([first] if first else []) + body
    return textwrap.dedent("\n".join(lines)).strip("\n")


def _comment_at(lines, start):
    """Return the comment starting at ``lines[start]``: ``(text, index of its last line)``."""
    end = start
    while "*/" not in lines[end]:
        end += 1
    return "\n".join(lines[start : end + 1]), end


def _logical_define(lines, start):
    """Return a ``#define`` and its continuation lines: ``(source, index of its last line)``."""
    end = start
    while lines[end].rstrip().endswith("\\"):
        end += 1
    return "\n".join(lines[start : end + 1]), end


def parse_header(text, api_macro="FASTNORM_API"):
    """Parse the header's text into a :class:`Header`; ``api_macro`` marks the exported functions."""
    lines = text.splitlines()
    declarations: list[Declaration] = []
    problems: list[tuple[int, str]] = []
    overview = ""
    comment, comment_end = None, -2  # the last comment and the index of its last line
    group = None  # the macro declaration that undocumented object-like macros may join
    depth = 0  # #if nesting
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        documented = comment if comment_end == i - 1 else None
        if not stripped:
            group = None
            i += 1
            continue
        if stripped.startswith("/*"):
            raw, end = _comment_at(lines, i)
            if not overview and not declarations and i == _first_code_line(lines):
                overview = clean_comment(raw)
            else:
                comment, comment_end = clean_comment(raw), end
            i = end + 1
            continue
        if re.match(r"#\s*if", stripped):
            if documented is not None and depth == 0:
                i = _conditional_macros(lines, i, documented, declarations)
                group = None
                continue
            depth += 1
        elif re.match(r"#\s*endif", stripped):
            depth -= 1
        elif m := _DEFINE.match(stripped):
            source, end = _logical_define(lines, i)
            name, function_like = m.group(1), bool(m.group(2))
            if documented is not None:
                group = Declaration("macro", [name], name, documented, i + 1, source)
                declarations.append(group)
            elif group is not None and not function_like:
                group.names.append(name)
                group.source += "\n" + source
            else:
                group = None  # the include guard, stringizing helpers: not part of the API
            i = end + 1
            continue
        elif m := _TYPEDEF.match(stripped):
            i = _typedef(lines, i, m.group(1), m.group(2), documented, declarations, problems)
            group = None
            continue
        elif stripped.startswith(api_macro + " "):
            end = i
            while ";" not in lines[end]:
                end += 1
            prototype = " ".join(part.strip() for part in lines[i : end + 1])
            signature = prototype.removeprefix(api_macro + " ").rstrip(";").strip()
            name = re.search(r"(\w+)\s*\(", signature)
            if documented is None:
                problems.append((i + 1, f"no doc comment above {prototype!r}"))
            elif name is None:
                problems.append((i + 1, f"cannot find the function name in {prototype!r}"))
            else:
                declarations.append(Declaration("function", [name.group(1)], signature, documented, i + 1))
            i = end + 1
            group = None
            continue
        elif not re.match(r"#\s*(include|else|elif)|extern \"C\" \{|\}", stripped):
            problems.append((i + 1, f"not understood: {stripped!r}"))
        group = None
        i += 1
    return Header(overview, declarations, problems)


def _first_code_line(lines):
    return next(i for i, line in enumerate(lines) if line.strip())


def _conditional_macros(lines, start, comment, declarations):
    """Add one declaration of the macros a documented ``#if ... #endif`` block defines."""
    depth, end, names = 0, start, []
    while True:
        stripped = lines[end].strip()
        if re.match(r"#\s*if", stripped):
            depth += 1
        elif re.match(r"#\s*endif", stripped):
            depth -= 1
        elif (m := _DEFINE.match(stripped)) and m.group(1) not in names:
            names.append(m.group(1))
        if depth == 0:
            break
        end += 1
    source = "\n".join(lines[start : end + 1])
    declarations.append(Declaration("macro", names, names[0], comment, start + 1, source))
    return end + 1


def _typedef(lines, start, kind, tag, comment, declarations, problems):
    """``typedef enum|struct TAG { ... } TAG;``: its members and their trailing comments."""
    end = start + 1
    while not lines[end].strip().startswith("}"):
        end += 1
    closing = re.match(r"\}\s*(\w+)\s*;", lines[end].strip())
    if closing is None or closing.group(1) != tag:
        problems.append((end + 1, f"typedef {kind} {tag}: expected '}} {tag};'"))
    if comment is None:
        problems.append((start + 1, f"no comment above typedef {kind} {tag}"))
        return end + 1
    members: list[Member] = []
    open_comment = False
    for number, line in enumerate(lines[start + 1 : end], start + 2):
        if not line.strip():
            continue
        if open_comment:  # a trailing comment continued on this line
            members[-1].comment += " " + line.strip().removesuffix("*/").strip()
            open_comment = "*/" not in line
            continue
        if kind == "enum" and (m := _ENUMERATOR.match(line)):
            text = (m.group(3) or "").strip()
            open_comment = bool(m.group(3)) and "*/" not in text
            value = f" = {m.group(2).strip()}" if m.group(2) else ""
            members.append(Member(m.group(1) + value, m.group(1), text.removesuffix("*/").strip()))
        elif kind == "struct" and (m := _MEMBER.match(line)):
            name = re.search(r"(\w+)\s*(\[[^\]]*\])?$", m.group(1))
            members.append(
                Member(m.group(1), name.group(1) if name else m.group(1), (m.group(2) or "").strip())
            )
        else:
            problems.append((number, f"typedef {kind} {tag}: member not understood: {line.strip()!r}"))
    declarations.append(Declaration(kind, [tag], tag, comment, start + 1, members=members))
    return end + 1


def split_struct_comment(comment, fields):
    """Split a struct comment into its general text and each field's text from its field table.

    A table entry starts with the field names (``rank, dims``) at the left margin,
    then the text, aligned in one column (the first entry has two or more spaces
    before it); its continuation lines are indented.
    """
    general: list[str] = []
    texts: dict[str, list[str]] = {}
    current = None
    column = None  # where the table's text starts: a name as long as the gap is followed by one space
    for line in comment.splitlines():
        entry = re.match(r"(\w+(?:, \w+)*)\s+(\S.*)", line)
        if (
            entry
            and all(name in fields for name in entry.group(1).split(", "))
            and entry.start(2) == (column or max(entry.start(2), entry.end(1) + 2))
        ):
            column = entry.start(2)
            current = [entry.group(2)]
            for name in entry.group(1).split(", "):
                texts[name] = current
            continue
        if current is not None and line.startswith(" ") and line.strip():
            current.append(line.strip())
            continue
        current = None
        general.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(general)).strip("\n")
    return text, {name: " ".join(parts) for name, parts in texts.items()}


class _Renderer:
    """Comment text to docutils nodes: plain text, cross-references to the header's names."""

    def __init__(self, kinds):
        self.kinds = kinds

    def inline(self, text):
        """Text with each declared name as a C-domain cross-reference."""
        result: list[nodes.Node] = []
        last = 0
        for m in _IDENT.finditer(text):
            kind = self.kinds.get(m.group())
            if kind is None:
                continue
            result.append(nodes.Text(text[last : m.start()]))
            ref = addnodes.pending_xref(
                "", refdomain="c", reftype=ROLES[kind], reftarget=m.group(), refexplicit=False
            )
            ref += nodes.literal(m.group(), m.group())
            result.append(ref)
            last = m.end()
        result.append(nodes.Text(text[last:]))
        return result

    def paragraph(self, text):
        para = nodes.paragraph(support_smartquotes=False)  # C text: "..." stays as written
        para.extend(self.inline(text))
        return para

    def blocks(self, text):
        """Paragraphs, bullet lists, code and literal blocks of a comment."""
        result: list[nodes.Node] = []
        for chunk in re.split(r"\n\s*\n", text.strip("\n")):
            lines = chunk.splitlines()
            if not lines:
                continue
            if len(lines) >= 2 and _HEADING_RULE.match(lines[1].strip()):  # an underlined heading
                result.append(nodes.rubric(lines[0].strip(), lines[0].strip()))
                result.extend(self.blocks("\n".join(lines[2:])))
                continue
            indents = {len(line) - len(line.lstrip()) for line in lines}
            if min(indents) >= 4:
                code = textwrap.dedent(chunk)
                result.append(nodes.literal_block(code, code, language="c"))
            elif lines[0].startswith("- "):
                result.append(self.bullets(lines))
            elif len(indents) == 1 and not (len(lines) > 1 and all(_LABEL_LINE.match(x) for x in lines)):
                result.append(self.paragraph(" ".join(line.strip() for line in lines)))
            else:
                result.append(nodes.literal_block(chunk, chunk))
        return result

    def bullets(self, lines):
        items: list[list[str]] = []
        for line in lines:
            if line.startswith("- "):
                items.append([line[2:].strip()])
            else:
                items[-1].append(line.strip())
        bullet_list = nodes.bullet_list(bullet="-")
        for item in items:
            list_item = nodes.list_item()
            list_item += self.paragraph(" ".join(item))
            bullet_list += list_item
        return bullet_list

    def function_doc(self, comment):
        """Render a function's comment: text blocks, and ``@param`` / ``@returns`` as field lists."""
        result: list[nodes.Node] = []
        text: list[str] = []
        fields: list[list[str]] = []  # [label, text...] of the current run of fields
        in_field = False

        def flush_text():
            if text:
                result.extend(self.blocks("\n".join(text)))
                text.clear()

        def flush_fields():
            if fields:
                result.append(self.field_list(fields))
                fields.clear()

        for line in comment.splitlines():
            tag = _FIELD_TAG.match(line)
            if tag:
                flush_text()
                if tag.group(1) == "param":
                    param = _PARAM.match(tag.group(2))
                    label, rest = (param.group(1), param.group(2)) if param else (tag.group(2), "")
                    fields.append([label, rest])
                else:
                    fields.append(["Returns", tag.group(2)])
                in_field = True
            elif in_field and line.startswith(" ") and line.strip():
                fields[-1].append(line.strip())
            else:
                in_field = False
                flush_fields()
                text.append(line)
        flush_text()
        flush_fields()
        return result

    def field_list(self, entries):
        field_list = nodes.field_list()
        for label, *parts in entries:
            name = nodes.field_name()
            if label == "Returns":
                name += nodes.Text(label)
            else:
                name += nodes.literal(label, label)
            body = nodes.field_body()
            body += self.paragraph(" ".join(part for part in parts if part))
            field_list += nodes.field("", name, body)
        return field_list


class CHeaderDirective(SphinxDirective):
    """``c-header PATH`` with ``:part:``: see the module docstring."""

    required_arguments = 1
    has_content = False
    option_spec = {"part": lambda arg: directives.choice(arg, PARTS)}

    def run(self):
        """Parse the header and return the nodes of the requested parts."""
        relative, path = self.env.relfn2path(self.arguments[0], self.env.docname)
        header_path = Path(path)
        if not header_path.is_file():
            logger.warning("c-header: no such file: %s", header_path, location=self.get_location())
            return []
        self.env.note_dependency(relative)
        _pages(self.env)[str(header_path.resolve())] = self.env.docname
        header = parse_header(header_path.read_text(encoding="utf-8"), self.config.c_header_api_macro)
        parts = [self.options["part"]] if "part" in self.options else list(PARTS)
        document = self.state.document  # report the header's problems once per page
        reported = document.__dict__.setdefault("c_header_reported", set())
        if str(header_path) not in reported:
            reported.add(str(header_path))
            for line, problem in header.problems:
                logger.warning("c-header: %s", problem, location=f"{header_path}:{line}")
        renderer = _Renderer(header.kinds())
        result: list[nodes.Node] = []
        for part in parts:
            if part == "overview":
                result.extend(renderer.blocks(header.overview))
                continue
            wanted = {"macros": ("macro",), "types": ("enum", "struct"), "functions": ("function",)}[part]
            for decl in header.declarations:
                if decl.kind in wanted:
                    result.extend(self.declaration(decl, renderer))
        return result

    def c_object(self, objtype, signatures, fill):
        """Run the C domain's ``c:<objtype>`` directive; ``fill(content)`` adds its description.

        ``fill`` runs after the domain's own content handling (so its field lists
        are left as they are) and while the object is the current C scope (so the
        enumerators and fields it declares are the enum's and the struct's).
        """
        base = self.env.get_domain("c").directive(objtype)

        class Described(base):
            def transform_content(self, content_node):
                super().transform_content(content_node)
                self.content_node = content_node

            def after_content(self):
                fill(self.content_node)
                super().after_content()

        directive = Described(
            f"c:{objtype}",
            ["\n".join(signatures)],
            {},
            StringList(),
            self.lineno,
            self.content_offset,
            self.block_text,
            self.state,
            self.state_machine,
        )
        return directive.run()

    def declaration(self, decl, renderer):
        """Return the nodes of one declaration: a C-domain object and its description."""
        if decl.kind == "macro":

            def fill(content):
                content.extend(renderer.blocks(decl.comment))
                content += nodes.literal_block(decl.source, decl.source, language="c")

            return self.c_object("macro", decl.names, fill)
        if decl.kind == "function":
            return self.c_object(
                "function",
                [decl.signature],
                lambda content: content.extend(renderer.function_doc(decl.comment)),
            )
        if decl.kind == "struct":
            general, texts = split_struct_comment(decl.comment, {m.name for m in decl.members})
        else:
            general, texts = decl.comment, {}

        def fill_member(member):
            def fill(content):
                if member.name in texts:
                    content += renderer.paragraph(texts[member.name])
                if member.comment and decl.kind == "struct":  # a note on the field's line: "0.3"
                    note = f"/* {member.comment} */"
                    content += nodes.paragraph("", "", nodes.literal(note, note))
                elif member.comment:
                    content += renderer.paragraph(member.comment)

            return fill

        def fill(content):
            content.extend(renderer.blocks(general))
            role = "enumerator" if decl.kind == "enum" else "member"
            for member in decl.members:
                content.extend(self.c_object(role, [member.declaration], fill_member(member)))

        return self.c_object(decl.kind, [decl.signature], fill)


class HeaderLinks(SphinxPostTransform):
    """A link to a header documented by ``c-header`` goes to its reference page, not to a download."""

    default_priority = 5

    def run(self, **kwargs):
        """Replace the download links to a documented header with links to its page."""
        documented = _pages(self.env)
        for node in list(self.document.findall(addnodes.download_reference)):
            _, path = self.env.relfn2path(node["reftarget"], node.get("refdoc", self.env.docname))
            target = documented.get(str(Path(path).resolve()))
            if target is None or target == self.env.docname:  # the reference page offers the download
                continue
            uri = self.app.builder.get_relative_uri(self.env.docname, target)
            reference = nodes.reference("", "", internal=True, refuri=uri)
            reference.extend(node.children)
            node.replace_self(reference)


def _pages(env):
    """Which page documents each header (absolute path -> docname), kept in the pickled environment."""
    if not hasattr(env, "c_header_pages"):
        env.c_header_pages = {}
    return env.c_header_pages


def _purge(app, env, docname):
    pages = _pages(env)
    for path in [path for path, page in pages.items() if page == docname]:
        del pages[path]


def _merge(app, env, docnames, other):
    _pages(env).update((path, page) for path, page in _pages(other).items() if page in docnames)


def setup(app):
    """Register the ``c-header`` directive and the header link post-transform."""
    app.add_config_value("c_header_api_macro", "FASTNORM_API", "env", types=[str])
    app.add_directive("c-header", CHeaderDirective)
    app.add_post_transform(HeaderLinks)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
