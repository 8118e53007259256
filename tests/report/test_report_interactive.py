"""The report's DataFrame views (sortable, filterable table; scatter with column pickers) in a
real headless browser, on a real frame: the weights head atlas of a tiny model whose vocabulary
holds script-injection strings."""

from __future__ import annotations

import pytest
from test_report_browser import CHROMIUM, open_page

from tgeom.analyses.embedding.atlas import head_atlas
from tgeom.models import load_model
from tgeom.report import html as H
from tgeom.report.interactive import frame_scatter, frame_table, script_json
from tiny_models import XSS_TOKENS, save_tiny_model


@pytest.fixture(scope="module")
def atlas_page(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("frames")
    lm = load_model(str(save_tiny_model("gpt2", root / "model", hostile=True)), device="cpu")
    frame = head_atlas(lm.weights(), 6, vocab=lm.vocab_strings, quiet=True).to_frame()
    body = frame_table(frame, "frame", token_columns=("row_token", "col_token")) + frame_scatter(
        frame,
        "fig-frame",
        "Each point is one atlas entry.",
        labels=frame["row_token"].tolist(),
        x="value",
        y="rank",
        color="block",
    )
    index = root / "index.html"
    index.write_text(H.page("frames", [("frames", "Frames", body)], with_plotly=True), "utf-8")
    return index, frame


@pytest.fixture(scope="module")
def browser(atlas_page):
    manager, _ = open_page(atlas_page[0])
    with manager as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, atlas_page):
    """The page freshly loaded; after the test, no console error or dialog was raised."""
    tab = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.on("dialog", lambda d: (errors.append("dialog " + d.message), d.dismiss()))
    tab.goto(atlas_page[0].as_uri())
    tab.wait_for_load_state("load")
    yield tab
    tab.close()
    assert errors == []


def column_values(page, table: str, column: str, visible_only: bool = False) -> list[float]:
    """The ``data-v`` values of one column of the table's rows, in their shown order."""
    return page.evaluate(
        """([table, column, visibleOnly]) => {
          const t = document.getElementById(table);
          const i = [...t.tHead.rows[0].cells].findIndex(c => c.dataset.col === column);
          return [...t.tBodies[0].rows]
            .filter(r => !visibleOnly || r.style.display !== 'none')
            .map(r => parseFloat(r.cells[i].dataset.v));
        }""",
        [table, column, visible_only],
    )


def test_clicking_a_header_sorts_rows_by_that_column_both_ways(atlas_page, page):
    frame = atlas_page[1]
    assert column_values(page, "frame", "value") == pytest.approx(frame["value"].tolist())
    for column in ("value", "row"):
        header = page.locator(f'#frame th[data-col="{column}"]')
        header.click()
        assert header.get_attribute("aria-sort") == "ascending"
        assert column_values(page, "frame", column) == sorted(frame[column].tolist())
        header.click()
        assert header.get_attribute("aria-sort") == "descending"
        assert column_values(page, "frame", column) == sorted(frame[column], reverse=True)


def test_typing_in_the_filter_box_keeps_only_matching_rows(atlas_page, page):
    frame = atlas_page[1]
    box = page.locator('input[data-table="frame"]')
    visible = page.locator("#frame tbody tr:visible")
    assert visible.count() == len(frame)
    box.fill("block=1")  # a numeric column term
    assert visible.count() == int((frame["block"] == 1).sum()) > 0
    assert set(column_values(page, "frame", "block", visible_only=True)) == {1.0}
    cut = float(frame["value"].median())
    box.fill(f"value>{cut} ov")  # terms combine: a column term and a word
    expected = int(((frame["value"] > cut) & (frame["circuit"] == "ov")).sum())
    assert visible.count() == expected > 0
    box.fill("ov")  # a word: the rows whose text holds it
    texts = visible.all_inner_texts()
    assert len(texts) == int((frame["circuit"] == "ov").sum())
    assert all("ov" in t.lower() for t in texts)
    assert page.locator('.shown[data-table="frame"]').inner_text().startswith(f"{len(texts)} of")
    box.fill(f'"{XSS_TOKENS[0]}"')  # a hostile token string, quoted, is matched as text
    hostile = (frame[["row_token", "col_token"]] == XSS_TOKENS[0]).any(axis=1)
    assert visible.count() == int(hostile.sum()) > 0
    box.fill("no-such-token-anywhere")
    assert visible.count() == 0


def test_scatter_pickers_change_the_plotted_columns(atlas_page, page):
    frame = atlas_page[1]

    def plotted() -> dict:
        return page.evaluate(
            """() => { const d = document.getElementById('fig-frame-plot').data[0];
                       return {x: d.x, y: d.y, color: d.marker.color ?? null, text: d.text}; }"""
        )

    shown = plotted()
    assert shown["x"] == pytest.approx(frame["value"].tolist())
    assert shown["y"] == frame["rank"].tolist()
    assert shown["color"] == frame["block"].tolist()
    assert shown["text"] == frame["row_token"].tolist()  # the hostile strings survive as text
    page.select_option("#fig-frame select.scatter-x", "col")
    page.select_option("#fig-frame select.scatter-y", "head")
    page.select_option("#fig-frame select.scatter-color", "value")
    shown = plotted()
    assert shown["x"] == frame["col"].tolist()
    assert shown["y"] == frame["head"].tolist()
    assert shown["color"] == pytest.approx(frame["value"].tolist())
    assert page.locator("#fig-frame-plot .xtitle").text_content() == "col"
    page.select_option("#fig-frame select.scatter-color", "")
    assert plotted()["color"] is None


def test_frame_views_escape_hostile_token_strings(atlas_page):
    index, frame = atlas_page
    assert set(XSS_TOKENS) & (set(frame["row_token"]) | set(frame["col_token"]))
    page = index.read_text(encoding="utf-8")
    assert XSS_TOKENS[0] not in page and XSS_TOKENS[1] not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown in the table, escaped
    text = script_json({"labels": [XSS_TOKENS[0], "</script><!--", "&amp;"]})
    assert "<" not in text and ">" not in text and "&" not in text
