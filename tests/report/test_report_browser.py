"""The report opened in a real headless browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from json_keys import keys_saying_layer
from tgeom.report.build import ReportOptions, build_report
from tiny_models import XSS_TOKENS, save_tiny_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SECTIONS = ("model-card", "weights", "geometry", "identifiability")

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
    options = ReportOptions(
        seq_len=32,
        windows_per_topic=8,
        atlas_k=8,
        lens_text=f"{XSS_TOKENS[0]} {XSS_TOKENS[1]}",  # 64 characters: the tiny context
        identify_sequences=20,
        attribution_tokens=12,
    )
    return build_report(str(model), str(corpus), root / "out", options=options)


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
