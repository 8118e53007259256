"""Wiki markup cleaning keeps the prose and drops templates, tables, refs, files and categories."""

from __future__ import annotations

from tgeom.corpus.wikitext import clean_wikitext, strip_templates_and_tables

ARTICLE = "\n".join(
    [
        "{{Infobox person",
        "| name = Ada {{small|Lovelace}}",
        "| image = [[File:Ada.jpg|thumb]]",
        "}}",
        "'''Ada Lovelace''' (1815&ndash;1852) was an [[England|English]] [[mathematician]]."
        '<ref name="a">{{cite book|title=T}}</ref>'
        " She wrote ''notes''.<ref name=b/>",
        "<!-- a hidden comment -->",
        "[[File:Engine.png|thumb|The [[Analytical Engine|engine]] she described]]",
        "== Early life ==",
        "Her father was [[Lord Byron]].{{citation needed|date=2016}}",
        '{| class="wikitable"',
        "|-",
        "| cell {{flag|UK}} || [[Link]]",
        "|}",
        "* She met [[Charles Babbage]] &amp; others.<br />",
        "=== Work ===",
        "Her <b>program</b> ran on [http://example.org the engine].",
        "== References ==",
        "{{reflist}}",
        "* Some book.",
        "[[Category:Mathematicians]]",
        "[[de:Ada Lovelace]]",
        "",
    ]
)

# Headings become paragraphs of their own; paragraphs are separated by one blank line.
EXPECTED = """Ada Lovelace (1815\u20131852) was an English mathematician. She wrote notes.

Early life

Her father was Lord Byron.

She met Charles Babbage & others.

Work

Her program ran on the engine."""


def test_clean_wikitext_keeps_prose_only() -> None:
    assert clean_wikitext(ARTICLE) == EXPECTED


def test_nested_templates_and_tables_are_removed_whole() -> None:
    text = "a{{x|{{y|{{z}}}}|}}b\n{|\n| {{t}}\n {|\n|inner\n|}\n|}\nc"
    assert strip_templates_and_tables(text) == "ab\n\nc"


def test_a_template_ending_in_pipe_brace_is_not_a_table_end() -> None:
    assert strip_templates_and_tables("a{{x|\n|}}b") == "ab"


def test_an_unclosed_template_does_not_swallow_the_rest() -> None:
    assert strip_templates_and_tables("keep {{broken and the rest") == "keep broken and the rest"
    assert clean_wikitext("keep {{broken and [[the|rest]]") == "keep broken and rest"


def test_cleaned_text_has_no_markup_left() -> None:
    for bad in ("[[", "]]", "{{", "}}", "<ref", "<!--", "'''", "==", "&ndash;", "<b>"):
        assert bad not in clean_wikitext(ARTICLE)
