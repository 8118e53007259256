"""Wiki markup to plain prose, for the Wikipedia part of the built-in corpus (SPEC section 2).

The cleaner keeps the running text of an article and drops what is not prose: templates
``{{...}}`` (infoboxes, citations, navigation boxes), tables ``{|...|}``, references
``<ref>...</ref>``, HTML comments, files, images, categories and interlanguage links, and the
trailing reference sections ("See also", "References", "External links"...). Links keep their
label (``[[target|label]]`` -> ``label``), headings keep their text, bold/italic quotes, HTML tags
and list markers go, and HTML entities are decoded.
"""

from __future__ import annotations

import html
import re

# Sections after which an article holds lists of links and citations rather than prose.
TRAILING_SECTIONS = (
    "see also",
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "further reading",
    "external links",
)

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*?/>", re.I)
_REF_PAIRED = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|\Z)", re.I | re.S)
_DROPPED_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem)\b[^>]*>.*?</\1\s*>",
    re.I | re.S,
)
_TEMPLATE_OR_TABLE = re.compile(r"\{\{|\}\}|^[ \t]*\{\||^[ \t]*\|\}(?!\})", re.M)
_CLOSER = {"{{": "}}", "{|": "|}"}
_NON_PROSE_LINK = re.compile(
    r"\[\[\s*:?\s*(?:file|image|media|category|[a-z]{2,3}(?:-[a-z]+)?)\s*:", re.I
)
_DOUBLE_BRACKET = re.compile(r"\[\[|\]\]")
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def clean_wikitext(text: str) -> str:
    """The prose of one article's wiki markup, paragraphs separated by blank lines."""
    text = _COMMENT.sub("", text)
    text = _REF_SELF_CLOSING.sub("", text)
    text = _REF_PAIRED.sub("", text)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = strip_templates_and_tables(text)
    text = _drop_non_prose_links(text)
    text = _LINK.sub(lambda m: m.group(2) if m.group(2) is not None else m.group(1), text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1), text)
    text = _cut_trailing_sections(text)
    text = _HEADING.sub(lambda m: f"\n{m.group(2)}\n", text)
    text = _QUOTES.sub("", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _MAGIC_WORD.sub("", text)
    text = _LIST_MARKER.sub("", text)
    # Whatever markup survived unbalanced is dropped rather than fed to a tokenizer.
    for leftover in ("[[", "]]", "{{", "}}", "{|", "|}"):
        text = text.replace(leftover, "")
    text = _SPACES.sub(" ", text)
    lines = [line.strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def strip_templates_and_tables(text: str) -> str:
    """``text`` without its templates ``{{...}}`` and tables ``{|...|}``, nested in any way.

    Table markers count only at the start of a line (as MediaWiki reads them), so a template
    ending in ``|}}`` is not taken for a table end. An opener that is never closed is dropped on
    its own (not the rest of the text); a stray closer outside any span is kept.
    """
    out: list[str] = []
    start = 0  # start of the pending top-level text
    while True:
        stack: list[tuple[str, int]] = []  # (closer expected, end of the opener)
        for match in _TEMPLATE_OR_TABLE.finditer(text, start):
            token = match.group().strip()
            if token in _CLOSER:
                if not stack:
                    out.append(text[start : match.start()])
                stack.append((_CLOSER[token], match.end()))
            elif stack and token == stack[-1][0]:
                stack.pop()
                if not stack:
                    start = match.end()
        if not stack:
            out.append(text[start:])
            return "".join(out)
        # Unbalanced: drop the outermost unmatched opener alone and rescan after it.
        start = stack[0][1]


def _drop_non_prose_links(text: str) -> str:
    """Remove ``[[File:...]]``, ``[[Category:...]]`` and ``[[de:...]]`` with nested links."""
    out: list[str] = []
    pos = 0
    for match in _NON_PROSE_LINK.finditer(text):
        if match.start() < pos:
            continue
        depth = 0
        end = len(text)
        for bracket in _DOUBLE_BRACKET.finditer(text, match.start()):
            depth += 1 if bracket.group() == "[[" else -1
            if depth == 0:
                end = bracket.end()
                break
        out.append(text[pos : match.start()])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _cut_trailing_sections(text: str) -> str:
    """Cut the article at its first trailing section heading (See also, References...)."""
    for match in _HEADING.finditer(text):
        if match.group(2).strip().lower() in TRAILING_SECTIONS:
            return text[: match.start()]
    return text
