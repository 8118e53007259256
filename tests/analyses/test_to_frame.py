"""Every result with tabular content has ``to_frame()``: a tidy DataFrame whose columns are the
names of its rows in ``results.json`` and whose cells are the values written there."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from tgeom.analyses.embedding.atlas import head_atlas
from tgeom.analyses.embedding.finetune import finetune_classifier, finetuning_diff
from tgeom.analyses.embedding.interaction import head_top_pairs
from tgeom.analyses.embedding.lens import logit_lens
from tgeom.analyses.embedding.projection import project_parameter
from tgeom.analyses.embedding.stitching import stitch
from tgeom.analyses.geometry import collect_statistics
from tgeom.analyses.geometry.measure import measure
from tgeom.analyses.geometry.qk import qk_split
from tgeom.analyses.identifiability import (
    effective_attention,
    token_attribution,
    token_identifiability,
)
from tgeom.analyses.identifiability.survey import attention_survey
from tgeom.corpus import Windows, load_corpus, make_windows
from tgeom.errors import TgeomError
from tgeom.results import read_results, write_results
from tgeom.runtime import Runtime

Rows = list[dict[str, Any]]
# One case: (payload as the CLI writes it, [(frame from to_frame, rows read back from the file)]).
Case = tuple[dict[str, Any], list[tuple[pd.DataFrame, Callable[[dict[str, Any]], Rows]]]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def windows_of(n: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 90, (n, T), generator=torch.Generator().manual_seed(seed))


def projection_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("llama")
    result = project_parameter(lm, block=1, neuron=3, side="value", k=5)
    return {"model": lm.source, **result.to_json()}, [
        (result.to_frame(), lambda doc: doc["top"]),
        (result.to_frame("bottom"), lambda doc: doc["bottom"]),
        (result.top.to_frame(), lambda doc: doc["top"]),
    ]


def pairs_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("gpt2")
    result = head_top_pairs(lm.weights(), 1, 2, "ov", 6)
    vocab = lm.vocab_strings
    return {"model": lm.source, **result.to_json(vocab)}, [
        (result.to_frame(vocab), lambda doc: doc["pairs"])
    ]


def atlas_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("bert")
    result = head_atlas(lm.weights(), 3, vocab=lm.vocab_strings, quiet=True)
    return {"model": lm.source, **result.to_json()}, [(result.to_frame(), lambda d: d["rows"])]


def lens_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("gpt2")
    result = logit_lens(lm, "Hello, world!", k=3)

    def rows(doc: dict[str, Any]) -> Rows:
        return [{"hidden": e["hidden"], **p} for e in doc["by_hidden"] for p in e["positions"]]

    return {"model": lm.source, **result.to_json()}, [(result.to_frame(), rows)]


def geometry_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("gpt2")
    for topic, letters in (("a", "abcdef "), ("b", "uvwxyz "), ("c", "0123456789 ")):
        (tmp_path / "corpus" / topic).mkdir(parents=True)
        text = "".join(letters[(7 * i * i + i) % len(letters)] for i in range(160))
        (tmp_path / "corpus" / topic / "doc.txt").write_text(text, encoding="utf-8")
    windows = make_windows(load_corpus(str(tmp_path / "corpus")), lm.tokenizer, 10)
    stats = collect_statistics(lm, windows, Runtime(torch.device("cpu"), 8), progress=False)
    result = measure(stats)
    return result.to_json(), [
        (result.to_frame(), lambda doc: doc["by_hidden"]),
        (result.to_frame("massive_channels"), lambda doc: doc["massive_channels"]),
    ]


def qk_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("bloom")  # ALiBi: the split has its own alibi column
    ids = windows_of(6, 10)
    windows = Windows(ids, torch.arange(6) % 2, ["a", "b"], [str(i) for i in range(6)], 10, 0)
    stats = collect_statistics(lm, windows, Runtime(torch.device("cpu"), 8), progress=False)
    result = qk_split(lm, stats, ids, [0, 1], Runtime(torch.device("cpu"), 8))

    def heads(doc: dict[str, Any]) -> Rows:
        return [{"block": e["block"], **h} for e in doc["by_block"] for h in e["heads"]]

    def picture(doc: dict[str, Any]) -> Rows:
        return [h for e in doc["by_block"] for h in e["four_part_picture"]["heads"]]

    return result.to_json(), [
        (result.to_frame(), heads),
        (result.to_frame("four_part_picture"), picture),
    ]


def tokens_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("llama")
    result = token_identifiability(lm, windows_of(14, 8), g=("identity", "linear"))
    return {"model": lm.source, **result.to_json()}, [(result.to_frame(), lambda d: d["by_hidden"])]


def survey_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("bert")
    ids = windows_of(5, 12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = mask[3, 10:] = 0  # shorter sequences, so lengths differ
    nulls, effective = attention_survey(lm, ids, mask, Runtime(torch.device("cpu"), 2))
    payload = {"model": lm.source, "null_space": nulls.to_json(), "effective": effective.to_json()}
    tables = [
        (nulls.to_frame(), lambda doc: doc["null_space"]["heads"]),
        (nulls.to_frame("by_length"), lambda doc: doc["null_space"]["by_length"]),
    ]
    for name in ("pearson", "pearson_by_block", "pearson_by_length"):
        tables.append((effective.to_frame(name), lambda doc, n=name: doc["effective"][n]))
    for name in ("raw_signed", "effective_abs"):
        tables.append(
            (
                effective.to_frame(f"token_type_attention.{name}"),
                lambda doc, n=name: doc["effective"]["token_type_attention"][n],
            )
        )
    return payload, tables


def effective_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("gpt2")
    result = effective_attention(lm, windows_of(1, 14))
    return {"model": lm.source, **result.to_json()}, [
        (result.to_frame(), lambda doc: doc["pearson"]),
        (result.to_frame("heads"), lambda doc: doc["heads"]),
        (
            result.to_frame("token_type_attention.raw_abs"),
            lambda doc: doc["token_type_attention"]["raw_abs"],
        ),
    ]


def attribution_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("bert")
    result = token_attribution(lm, windows_of(1, 5))

    def by_offset(doc: dict[str, Any]) -> Rows:
        return [
            {k: v for k, v in e.items() if k != "by_relative_position"} | r
            for e in doc["by_hidden"]
            for r in e["by_relative_position"]
        ]

    return {"model": lm.source, **result.to_json()}, [
        (result.to_frame(), lambda doc: doc["by_hidden"]),
        (result.to_frame("by_hidden.by_relative_position"), by_offset),
    ]


def classifier_case(tiny_model: Any, tmp_path: Path) -> Case:
    lm = tiny_model("gpt2")
    ids = windows_of(24, 8)
    labels = (ids[:, 0] > 47).long()
    clf, _ = finetune_classifier(lm, ids, labels, ["low", "high"], steps=3, batch_size=8)
    diff = finetuning_diff(lm.weights(), clf.weights, lm.token_strings, k=3, top_n=2, head=clf)
    stitched = stitch(lm.weights(), [clf, clf], names=["one", "two"])

    def runs(doc: dict[str, Any]) -> Rows:
        return [
            run | {"hidden": hidden, "accuracy": accuracy, "p_value": p}
            for run in doc["stitching"]["runs"]
            for hidden, accuracy, p in zip(
                run["hidden"], run["accuracy"], run["p_value"], strict=True
            )
        ]

    return {"diff": diff, "stitching": stitched}, [
        (diff.to_frame(), lambda doc: doc["diff"]["rows"]),
        (stitched.to_frame(), runs),
    ]


CASES = {
    "ParameterProjection": projection_case,
    "InteractionPairs": pairs_case,
    "HeadAtlas": atlas_case,
    "LogitLens": lens_case,
    "GeometryResult": geometry_case,
    "QKResult": qk_case,
    "IdentifiabilityResult": tokens_case,
    "NullSpaceResult+EffectiveSummary": survey_case,
    "EffectiveAttentionResult": effective_case,
    "AttributionResult": attribution_case,
    "FinetuningDiff+StitchingResult": classifier_case,
}


def plain(value: Any) -> Any:
    """A frame cell as JSON holds it (NaN is written as null)."""
    return None if isinstance(value, float) and math.isnan(value) else value


@pytest.mark.parametrize("name", list(CASES))
def test_to_frame_has_the_columns_and_values_of_results_json(name, tiny_model, tmp_path):  # type: ignore[no-untyped-def]
    payload, tables = CASES[name](tiny_model, tmp_path)
    write_results(tmp_path / "out", "test", payload)
    document = read_results(tmp_path / "out")
    for frame, rows_of in tables:
        rows = rows_of(document)
        assert rows, "an empty table proves nothing"
        assert all(list(row) == list(rows[0]) for row in rows)
        assert list(frame.columns) == list(rows[0])
        cells = [{k: plain(v) for k, v in r.items()} for r in frame.to_dict("records")]
        assert cells == rows


def test_to_frame_names_the_tables_it_has(tiny_model):  # type: ignore[no-untyped-def]
    result = project_parameter(tiny_model("llama"), block=0, neuron=1, k=2)
    with pytest.raises(TgeomError, match="unknown table 'middle'; choose one of top, bottom"):
        result.to_frame("middle")


def test_project_parameter_takes_arguments(tiny_model):  # type: ignore[no-untyped-def]
    lm = tiny_model("llama")
    cw = lm.weights()
    neuron = project_parameter(lm, block=1, neuron=4, side="value", k=3)
    scores = cw.W_U.double() @ cw.layers[1].W_out[4].double()
    assert neuron.top.token_ids[0].tolist() == scores.argsort(descending=True)[:3].tolist()
    assert neuron.parameter == {"kind": "neuron", "block": 1, "neuron": 4, "side": "value"}
    sub = project_parameter(lm, block=0, head=1, subhead="o", index=2, k=3)
    assert sub.parameter == {"kind": "subhead", "block": 0, "head": 1, "subhead": "o", "index": 2}
    scores = cw.W_U.double() @ cw.layers[0].W_O[1, 2].double()
    assert sub.bottom.token_ids[0].tolist() == scores.argsort()[:3].tolist()
    for bad in ({}, {"neuron": 1, "head": 0}):
        with pytest.raises(TgeomError, match=r"exactly one of neuron= .* or head="):
            project_parameter(lm, block=0, **bad)


def test_cli_results_json_rows_are_the_frame_of_the_same_call(tiny_model_dir, tmp_path):  # type: ignore[no-untyped-def]
    folder = tiny_model_dir("llama")
    args = ["weights", "project", str(folder), "--neuron", "1:3", "--side", "value", "--k", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "tgeom", *args, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    from tgeom.analyses.embedding.filters import token_mask
    from tgeom.models import load_model

    lm = load_model(str(folder), device="cpu")
    result = project_parameter(
        lm, block=1, neuron=3, side="value", k=4, mask=token_mask(lm, drop_special=True)
    )
    rows = read_results(tmp_path / "o")["bottom"]
    assert result.to_frame("bottom").to_dict("records") == rows


def test_per_block_results_have_tidy_frames_of_their_results_json(tiny_model, tmp_path):  # type: ignore[no-untyped-def]
    """R_k, Sim_k and alignment store per-block lists (and [L_A, L_B] matrices) by name and
    group in results.json; their frames hold one row per (group, block) with those very cells."""
    from tgeom.analyses.embedding.alignment import align_models
    from tgeom.analyses.embedding.validation import r_k, sim_k

    lm = tiny_model("gpt2")
    cw = lm.weights()
    ids = torch.randint(
        3, lm.summary.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0)
    )
    rk = r_k(lm, ids, Runtime(torch.device("cpu"), 2), k=5, max_positions=20)
    sk = sim_k(cw, k=10, max_pairs=8)
    al = align_models(cw, cw, per_block=8, match_heads=False)
    write_results(tmp_path, "test", {"r_k": rk, "sim_k": sk, "alignment": al})
    saved = read_results(tmp_path)
    L = lm.summary.n_blocks
    for result, key, label, names in [
        (rk, "r_k", "group", ("overlap", "shuffled")),
        (sk, "sim_k", "pair", ("similarity", "shuffled")),
    ]:
        frame = result.to_frame()
        assert list(frame.columns) == [label, "block", *names]
        assert len(frame) == len(saved[key][names[0]]) * L
        for row in frame.itertuples(index=False):
            for name in names:
                assert getattr(row, name) == saved[key][name][getattr(row, label)][row.block]
    frame = al.to_frame()
    assert list(frame.columns) == ["group", "block_a", "block_b", "similarity", "raw_similarity"]
    assert len(frame) == len(saved["alignment"]["similarity"]) * L * L
    for row in frame.itertuples(index=False):
        stored = saved["alignment"]
        assert row.similarity == stored["similarity"][row.group][row.block_a][row.block_b]
        assert row.raw_similarity == stored["raw_similarity"][row.group][row.block_a][row.block_b]
