"""The head atlas: one exact top-pairs table over every head and both circuits."""

from __future__ import annotations

import csv

import pytest

from tgeom.analyses.embedding.atlas import COLUMNS, head_atlas
from tgeom.analyses.embedding.interaction import head_top_pairs
from tgeom.errors import TgeomError


def test_atlas_rows_are_each_heads_top_pairs(tiny_model, tmp_path):
    lm = tiny_model("llama")
    cw = lm.weights()
    atlas = head_atlas(cw, 3, vocab=lm.vocab_strings, quiet=True)
    L, H = cw.summary.n_layers, cw.summary.n_heads
    assert len(atlas.rows) == L * H * 2 * 3
    assert atlas.rope_note is not None
    for layer in range(L):
        for head in range(H):
            for circuit in ("qk", "ov"):
                rows = [
                    r for r in atlas.rows if (r.block, r.head, r.circuit) == (layer, head, circuit)
                ]
                pairs = head_top_pairs(cw, layer, head, circuit, 3)
                assert [r.rank for r in rows] == [0, 1, 2]
                assert [(r.row, r.col) for r in rows] == list(
                    zip(pairs.rows.tolist(), pairs.cols.tolist(), strict=True)
                )
                assert [r.row_token for r in rows] == lm.token_strings(pairs.rows)
    path = tmp_path / "atlas.csv"
    atlas.to_csv(path)
    with path.open(newline="", encoding="utf-8") as handle:
        read = list(csv.DictReader(handle))
    assert tuple(read[0]) == COLUMNS and len(read) == len(atlas.rows)
    assert float(read[0]["value"]) == pytest.approx(atlas.rows[0].value, rel=1e-6)


def test_atlas_on_chosen_blocks_and_one_circuit(tiny_model):
    cw = tiny_model("gpt2").weights()
    atlas = head_atlas(cw, 2, blocks=[1], circuits=["ov"], largest=False, quiet=True)
    assert {(r.block, r.circuit) for r in atlas.rows} == {(1, "ov")}
    assert atlas.rope_note is None
    assert atlas.rows[0].row_token.startswith("<id:")
    assert atlas.to_json()["n_rows"] == len(atlas.rows) == 4 * 2
    assert all(r.value <= 0 or r.rank > 0 for r in atlas.rows[:1])


def test_atlas_on_chosen_heads_equals_the_full_atlas_restricted(tiny_model):
    cw = tiny_model("llama").weights()
    full = head_atlas(cw, 2, quiet=True)
    some = head_atlas(cw, 2, blocks=[1, 0, 1], heads=[3, 1], circuits=["qk"], quiet=True)
    assert (some.blocks, some.heads, some.circuits) == ([0, 1], [1, 3], ["qk"])
    want = [r for r in full.rows if r.head in (1, 3) and r.circuit == "qk"]
    assert some.rows == want and len(want) == 2 * 2 * 2
    assert some.to_json()["heads"] == [1, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"heads": [4]}, r"head 4 is out of range: valid heads are 0\.\.3"),
        ({"heads": []}, "no head chosen"),
        ({"circuits": []}, "no circuit chosen"),
        ({"circuits": ["vo"]}, "circuit must be qk or ov"),
    ],
)
def test_atlas_rejects_bad_heads_and_circuits(tiny_model, kwargs, match):
    with pytest.raises(TgeomError, match=match):
        head_atlas(tiny_model("gpt2").weights(), 2, quiet=True, **kwargs)


def test_atlas_rejects_a_block_out_of_range(tiny_model):
    with pytest.raises(TgeomError, match=r"valid blocks are 0\.\.1"):
        head_atlas(tiny_model("gpt2").weights(), 2, blocks=[3], quiet=True)


def test_atlas_tl_convention_records_each_circuits_sides(tiny_model):
    cw = tiny_model("llama").weights()
    atlas = head_atlas(cw, 2, blocks=[1], E="tl", quiet=True)
    assert atlas.convention == "tl"
    assert atlas.sides == {
        "qk": {"rows": "W_E", "cols": "W_E"},
        "ov": {"rows": "W_E", "cols": "W_U"},
    }
    assert atlas.to_json()["embedding_sides"] == atlas.sides
    for row in atlas.rows[::2]:
        pairs = head_top_pairs(cw, 1, row.head, row.circuit, 2, E="tl")
        assert (row.row, row.col) == (int(pairs.rows[0]), int(pairs.cols[0]))
    plain = head_atlas(cw, 2, blocks=[1], quiet=True)
    assert plain.convention == "dar" and plain.embedding == "W_U"
