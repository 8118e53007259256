"""The report opened in a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import pytest

from json_keys import keys_saying_layer
from tgeom.report.build import ReportOptions, build_report
from tiny_models import XSS_TOKENS, save_tiny_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SECTIONS = ("model-card", "weights", "geometry", "identifiability", "heads")

TOPICS = {
    "sea": "The boat left the harbour at dawn; waves rolled over the grey sea and gulls cried. ",
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n",
    "math": "Let x be a real number such that x squared equals two; then x is irrational. ",
}


def write_corpus(folder: Path) -> Path:
    for topic, text in TOPICS.items():
        (folder / topic).mkdir(parents=True)
        for i in range(3):
            (folder / topic / f"doc{i}.txt").write_text(text * (12 + i), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    model = save_tiny_model("gpt2", root / "model", hostile=True)
    corpus = write_corpus(root / "corpus")
    return build_report(str(model), str(corpus), root / "out", options=hostile_options())


def hostile_options() -> ReportOptions:
    return ReportOptions(
        seq_len=32,
        windows_per_topic=8,
        atlas_k=8,
        atlas_vocab=None,  # every token, the hostile ones too, in the atlases and head cards
        lens_text=f"{XSS_TOKENS[0]} {XSS_TOKENS[1]}",  # 64 characters: the tiny context
        identify_sequences=20,
        attribution_tokens=12,
    )


def json_section(index: Path, anchor: str) -> dict:
    import json

    return json.loads((index.parent / "results.json").read_text())["sections"][anchor]


def open_page(index: Path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `make test` (it installs Debian's chromium)")
    return playwright.sync_playwright(), index.as_uri()


def test_report_renders_offline_without_errors(hostile_report: Path):
    manager, url = open_page(hostile_report)
    console_errors: list[str] = []
    foreign_requests: list[str] = []
    dialogs: list[str] = []
    with manager as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console_errors.append(str(e)))
        page.on(
            "request",
            lambda r: (
                None if r.url.startswith(("file://", "data:")) else foreign_requests.append(r.url)
            ),
        )
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url)
        page.wait_for_load_state("load")
        for anchor in SECTIONS:
            assert page.locator(f"section#{anchor}").is_visible(), anchor
        figures = page.locator("figure")
        assert figures.count() >= 8
        for i in range(figures.count()):
            figures.nth(i).scroll_into_view_if_needed()
            assert figures.nth(i).is_visible()
        # The atlas search filters rows.
        rows = page.locator("#atlas tbody tr")
        total = rows.count()
        assert total > 0
        token = page.locator("#atlas tbody tr td .tok").first.inner_text()
        page.fill('input[data-table="atlas"]', "qk")
        shown_qk = page.locator("#atlas tbody tr:visible").count()
        assert 0 < shown_qk < total
        page.fill('input[data-table="atlas"]', token.strip() or token)
        assert page.locator("#atlas tbody tr:visible").count() >= 1
        page.fill('input[data-table="atlas"]', "no-such-token-anywhere")
        assert page.locator("#atlas tbody tr:visible").count() == 0
        page.fill('input[data-table="atlas"]', "")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-tiny-gpt2.png"), full_page=True)
        injected = page.evaluate("() => window.__xss === undefined")
        body_text = page.locator("body").inner_text()
        browser.close()
    assert console_errors == []
    assert foreign_requests == []
    assert dialogs == []  # <script>alert(1)</script> did not run
    assert injected  # the onerror handler did not run
    assert XSS_TOKENS[0] in body_text  # ...and the strings are shown as text
    assert "onerror" in body_text


def test_report_escapes_hostile_tokens_in_html(hostile_report: Path):
    page = hostile_report.read_text(encoding="utf-8")
    assert XSS_TOKENS[0] not in page and XSS_TOKENS[1] not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_results_hold_every_section(hostile_report: Path):
    import json

    results = json.loads((hostile_report.parent / "results.json").read_text())
    assert results["command"] == "report"
    assert set(results["sections"]) == set(SECTIONS)
    assert keys_saying_layer(results) == []  # 'hidden' (0..L) or 'block' (0..L-1), never 'layer'
    assert list((hostile_report.parent / "figures").glob("*.png"))


def test_report_shows_and_records_the_analyses_warnings(hostile_report: Path):
    """The tiny corpus is too small for what its sections measure: each analysis' own warnings
    appear, escaped, at the top of its section and under ``warnings`` in results.json."""
    import html
    import json
    import re

    results = json.loads((hostile_report.parent / "results.json").read_text())
    warnings = results["warnings"]
    assert any(w.startswith("identifiability: ") and "test split" in w for w in warnings)
    assert any(w.startswith("geometry: ") for w in warnings)
    page = hostile_report.read_text(encoding="utf-8")
    for anchor in ("geometry", "identifiability"):
        section = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
        assert section is not None
        shown = re.findall(r"<li>(.*?)</li>", section.group(1).split("</ul>")[0])
        expected = [w.split(": ", 1)[1] for w in warnings if w.startswith(f"{anchor}: ")]
        assert [html.unescape(line) for line in shown] == expected
        assert section.group(1).startswith("<h2>") and '<div class="warnings"' in section.group(1)


def heads_rows(index: Path) -> list[dict]:
    return json_section(index, "heads")["rows"]


def visible_values(page, column: str) -> list[float | None]:
    """The heads table's ``column`` over its shown rows, in their order (None: missing)."""
    return page.evaluate(
        """(column) => {
          const t = document.getElementById('heads-table');
          const i = [...t.tHead.rows[0].cells].findIndex(c => c.dataset.col === column);
          return [...t.tBodies[0].rows].filter(r => r.style.display !== 'none')
            .map(r => { const v = parseFloat(r.cells[i].dataset.v); return isNaN(v) ? null : v; });
        }""",
        column,
    )


def test_heads_section_sorts_filters_plots_and_opens_cards(hostile_report: Path):
    """The head atlas section in a real browser: a header click sorts its rows by that column
    (both ways, missing values last), the filter box keeps the matching rows, the scatter's
    pickers change the plotted columns, and a row's first cell opens the head's card."""
    rows = heads_rows(hostile_report)
    manager, url = open_page(hostile_report)
    errors: list[str] = []
    with manager as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        page.wait_for_load_state("load")
        section = page.locator("section#heads")
        assert section.is_visible()
        numeric = [c for c in rows[0] if c not in ("block", "head", "top_qk", "top_ov")]
        present = [c for c in numeric if any(r[c] is not None for r in rows)]
        assert len(present) >= 4, present
        column = present[1]
        values = [r[column] for r in rows]
        assert visible_values(page, column) == values
        header = page.locator(f'#heads-table th[data-col="{column}"]')
        header.click()
        known = sorted(v for v in values if v is not None)
        missing = [None] * (len(values) - len(known))
        assert visible_values(page, column) == known + missing
        header.click()
        assert visible_values(page, column) == known[::-1] + missing
        box = page.locator('input[data-table="heads-table"]')
        box.fill("block=1")
        assert visible_values(page, "block") == [1.0] * sum(r["block"] == 1 for r in rows)
        cut = sorted(known)[len(known) // 2]
        box.fill(f"{column}>{cut!r} block!=0")
        expected = [
            r for r in rows if r[column] is not None and r[column] > cut and r["block"] != 0
        ]
        assert len(visible_values(page, "block")) == len(expected)
        box.fill("")
        assert len(visible_values(page, "block")) == len(rows)

        def plotted() -> dict:
            return page.evaluate(
                """() => { const d = document.getElementById('fig-heads-scatter-plot').data[0];
                           return {x: d.x, y: d.y, color: d.marker.color ?? null}; }"""
            )

        x, y, c = present[0], present[1], present[2]
        page.select_option("#fig-heads-scatter select.scatter-x", x)
        page.select_option("#fig-heads-scatter select.scatter-y", y)
        page.select_option("#fig-heads-scatter select.scatter-color", c)
        assert plotted() == {k: [r[n] for r in rows] for k, n in (("x", x), ("y", y), ("color", c))}
        page.select_option("#fig-heads-scatter select.scatter-x", y)
        assert plotted()["x"] == [r[y] for r in rows]

        last = rows[-1]
        card = page.locator(f"details#head-{last['block']}-{last['head']}")
        assert card.get_attribute("open") is None
        page.locator(f'#heads-table td a[href="#head-{last["block"]}-{last["head"]}"]').click()
        assert card.get_attribute("open") is not None and card.is_visible()
        dangling = page.evaluate(
            """() => [...document.querySelectorAll('section#heads a[href^="#"]')]
                 .map(a => a.getAttribute('href').slice(1))
                 .filter(id => !document.getElementById(id))"""
        )
        assert dangling == []
        atlas_link = card.locator('a[href="#atlas"]')
        if atlas_link.count():
            atlas_link.click()
            shown = page.locator("#atlas tbody tr:visible")
            assert shown.count() > 0
            assert all(
                t.split("\t")[:2] == [str(last["block"]), str(last["head"])]
                for t in shown.all_inner_texts()
            )
        ARTIFACTS.mkdir(exist_ok=True)
        page.goto(url + f"#head-{last['block']}-{last['head']}")
        section.screenshot(path=str(ARTIFACTS / "report-heads-tiny-gpt2.png"))
        browser.close()
    assert errors == []


def test_heads_section_numbers_equal_the_heads_result(hostile_report: Path):
    """Every cell of the section (results.json and the page's table) equals ``tgeom.heads`` run
    on its own (no statistics or top pairs handed over) on the report's model and windows."""
    import math
    import re

    from tgeom.analyses.heads.atlas import heads
    from tgeom.report.build import ReportContext
    from tgeom.report.heads_section import block_named
    from tgeom.report.progress import Progress
    from tgeom.results import to_jsonable

    root = hostile_report.parent.parent
    (root / "check").mkdir(exist_ok=True)
    ctx = ReportContext(
        str(root / "model"), str(root / "corpus"), hostile_options(), root / "check", Progress(True)
    )
    options = hostile_options()
    alone = heads(
        ctx.lm,
        ctx.windows,
        k=5,
        frequent=options.atlas_vocab,
        pass_windows=options.heads_windows,
        seed=options.seed,
    )
    expected = to_jsonable(block_named(alone.to_json()))
    rows = heads_rows(hostile_report)
    assert rows == expected["rows"]
    section = json_section(hostile_report, "heads")
    assert section["atlas_by_block"] == expected["atlas_by_block"]
    page = hostile_report.read_text(encoding="utf-8")
    table = re.search(r'<table class="sortable" id="heads-table">(.*?)</table>', page, re.S)
    assert table is not None
    header = re.findall(r'<th data-col="(.*?)">', table.group(1))
    assert header == list(rows[0])
    shown = re.findall(r"<tr>(.*?)</tr>", table.group(1).split("<tbody>")[1])
    assert len(shown) == len(rows)
    for row, html_row in zip(rows, shown, strict=True):
        cells = re.findall(r"<td(?: class=\"num\" data-v=\"(.*?)\")?>(.*?)</td>", html_row)
        for name, (value, text) in zip(header, cells, strict=True):
            if name in ("top_qk", "top_ov"):
                assert html.unescape(re.sub(r"<.*?>", "", text)) == row[name]
            elif row[name] is None:
                assert math.isnan(float(value))
            else:
                assert float(value) == row[name]


def test_heads_section_escapes_hostile_token_strings(hostile_report: Path):
    """The tiny model's script-injection tokens reach the head atlas (top pairs over every
    token) and are written there as text, never as markup."""
    import re

    rows = heads_rows(hostile_report)
    assert any(XSS_TOKENS[0] in r["top_qk"] + r["top_ov"] for r in rows)
    page = hostile_report.read_text(encoding="utf-8")
    section = re.search(r'<section id="heads">(.*?)</section>', page, re.S)
    assert section is not None
    assert XSS_TOKENS[0] not in section.group(1) and XSS_TOKENS[1] not in section.group(1)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section.group(1)
