"""The head atlas (SPEC section 7) against the separate analyses on the same inputs, and against
brute force: survey columns, top pairs, the first-token columns, the layer atlas readings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tgeom.analyses.embedding.filters import token_mask
from tgeom.analyses.embedding.interaction import head_top_pairs
from tgeom.analyses.heads import heads
from tgeom.analyses.heads.atlas import columns_of, pair_text
from tgeom.analyses.identifiability.survey import attention_survey
from tgeom.capture import capture
from tgeom.capture.distributed import Shard
from tgeom.corpus import load_corpus, make_windows
from tgeom.errors import TgeomError
from tgeom.runtime import Runtime

TEXTS = {
    "sea": "waves roll over the grey sea while gulls cry above the boats. ",
    "code": "for item in items: total = total + item * 2 # accumulate. ",
    "math": "a prime number has exactly two divisors, one and itself. ",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heads-corpus")
    for topic, text in TEXTS.items():
        (root / topic).mkdir()
        (root / topic / "t.txt").write_text(text * 30)
    return root


def windows_of(lm, corpus: Path, seq_len: int = 20, per_topic: int = 3):
    docs = load_corpus(str(corpus))
    return make_windows(
        docs, lm.tokenizer, seq_len, prepend_special=True, max_windows_per_topic=per_topic
    )


RUNTIME = Runtime(torch.device("cpu"), batch_size=4)


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def atlas(request, tiny_model, corpus):
    lm = tiny_model(request.param)
    result = heads(
        lm,
        str(corpus),
        seq_len=20,
        max_windows_per_topic=3,
        frequent=None,
        runtime=RUNTIME,
        shard=Shard(),
    )
    return lm, result


def test_one_row_per_head_with_the_spec_columns(atlas):
    lm, result = atlas
    L, H = lm.summary.n_layers, lm.summary.n_heads
    assert result.columns == list(columns_of(False))
    frame = result.to_frame()
    assert list(frame.columns) == result.columns
    assert [(r["layer"], r["head"]) for r in result.rows] == [
        (b, h) for b in range(L) for h in range(H)
    ]
    assert len(frame) == L * H


def test_survey_columns_equal_the_survey_on_the_same_windows(atlas, corpus):
    """null_dim, pearson_raw_effective: the mean over windows of attention nullspace's tables;
    first_token_raw / _effective: its mean attention to the BOS type (each window's first
    token, and its only BOS), raw and effective (signed)."""
    lm, result = atlas
    windows = windows_of(lm, corpus)
    nulls, summary = attention_survey(lm, windows.token_ids, None, RUNTIME, Shard())
    bos = summary.token_type_attention
    for row in result.rows:
        b, h = row["layer"], row["head"]
        assert row["null_dim"] == pytest.approx(float(nulls.null_dim[:, b, h].double().mean()))
        assert row["pearson_raw_effective"] == pytest.approx(
            float(summary.pearson.values[:, b, h].nanmean()), rel=1e-12
        )
        assert row["first_token_raw"] == pytest.approx(float(bos["raw_signed"][b, h, 0]), abs=1e-12)
        assert row["first_token_effective"] == pytest.approx(
            float(bos["effective_signed"][b, h, 0]), abs=1e-12
        )
    assert max(r["null_dim"] for r in result.rows) > 0  # 20 tokens > d_head: null spaces exist


def test_first_token_raw_equals_the_captured_attention(atlas, corpus):
    """Brute force: every window's attention probabilities held at once, mean of A[t, 0]."""
    lm, result = atlas
    ids = windows_of(lm, corpus).token_ids
    A = capture(lm, ids, attentions=True).attentions.double()  # [L, S, H, T, T]
    mean = A[..., 0].mean(dim=(1, 3))  # [L, H]
    for row in result.rows:
        assert row["first_token_raw"] == pytest.approx(
            float(mean[row["layer"], row["head"]]), abs=1e-6
        )


def test_top_pairs_equal_weights_topk(atlas):
    lm, result = atlas
    mask = token_mask(lm)
    cw = lm.weights()
    vocab = lm.vocab_strings
    for row in result.rows[:: max(1, len(result.rows) // 3)]:
        for circuit in ("qk", "ov"):
            pairs = head_top_pairs(
                cw, row["layer"], row["head"], circuit, 5, row_mask=mask, col_mask=mask
            )
            want = pair_text(pairs.pairs(vocab))
            assert row[f"top_{circuit}"] == want
            assert want.count("→") == 5


def test_layer_atlas_reads_topic_directions_like_a_dense_brute_force(atlas, corpus):
    """Each topic's mean context vector from hidden states held in memory (float64), read
    through the linearised final norm and the whole unembedding: the same top tokens."""
    lm, result = atlas
    windows = windows_of(lm, corpus)
    hidden = capture(lm, windows.token_ids).hidden[:, :, 1:].double()  # position 0 dropped
    cw = lm.weights()
    mask = token_mask(lm)
    for entry in result.layer_atlas:
        h = hidden[entry["hidden"]]  # [C, T', d]
        mu = h.mean(dim=(0, 1))
        rms = float(h.pow(2).mean()) ** 0.5
        for topic in entry["topics"]:
            index = windows.topics.index(topic["topic"])
            chosen = windows.topic_ids == index
            v = h[chosen].mean(dim=(0, 1)) - mu
            if cw.final_norm is not None:
                centred = v - v.mean() if cw.final_norm.kind == "layernorm" else v
                v = cw.final_norm.weight.double() * centred / rms
            scores = (v @ cw.W_U.double().T).masked_fill(~mask, float("-inf"))
            top = torch.sort(scores, descending=True, stable=True).indices[:10].tolist()
            got = [p["token_id"] for p in topic["promotes"]]
            assert got == top
            assert topic["promotes"][0]["score"] == pytest.approx(float(scores[top[0]]), rel=1e-6)
        assert len(entry["topics"]) == 3 and len(entry["positional"]) == 2


def test_blocks_pick_the_rows(tiny_model, corpus):
    lm = tiny_model("gpt2")
    result = heads(
        lm,
        str(corpus),
        seq_len=20,
        max_windows_per_topic=2,
        frequent=None,
        blocks=[1],
        runtime=RUNTIME,
        shard=Shard(),
    )
    assert {r["layer"] for r in result.rows} == {1}
    assert [e["layer"] for e in result.layer_atlas] == [1]


def test_one_topic_warns_and_still_gives_the_table(tiny_model, tmp_path):
    lm = tiny_model("gpt2")
    (tmp_path / "only.txt").write_text(TEXTS["sea"] * 30)
    result = heads(
        lm,
        str(tmp_path / "only.txt"),
        seq_len=20,
        max_windows_per_topic=3,
        frequent=None,
        runtime=RUNTIME,
        shard=Shard(),
    )
    assert any("has 1 topic" in w for w in result.warnings)
    assert len(result.rows) == lm.summary.n_layers * lm.summary.n_heads
    assert all(e["topics"] == [] and len(e["positional"]) == 2 for e in result.layer_atlas)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"induction_length": 1}, "at least 2"),
        ({"induction_length": 40}, "beyond the context"),
        ({"max_windows_per_topic": 1, "seq_len": 60}, "at least 2"),
        ({"blocks": [7]}, "block"),
    ],
)
def test_bad_input_is_one_line(tiny_model, tmp_path, kwargs, message):
    lm = tiny_model("gpt2")
    (tmp_path / "only.txt").write_text(TEXTS["sea"] * 2)
    options = {"seq_len": 20, "max_windows_per_topic": 3, "frequent": None, **kwargs}
    with pytest.raises(TgeomError, match=message) as info:
        heads(lm, str(tmp_path / "only.txt"), runtime=RUNTIME, shard=Shard(), **options)
    assert "\n" not in str(info.value)


def test_behaviour_and_spectral_columns_equal_their_own_passes(atlas, corpus):
    """The shared pass gives what text_behaviour's own forward passes give on the same windows;
    the spectral and induction columns are those of spectral_scores and induction_scores."""
    from tgeom.analyses.embedding.filters import token_mask
    from tgeom.analyses.heads import (
        induction_batch,
        induction_scores,
        spectral_scores,
        text_behaviour,
    )

    lm, result = atlas
    behaviour = text_behaviour(lm, windows_of(lm, corpus).token_ids, runtime=RUNTIME).scores()
    spectral = spectral_scores(lm.weights(), mask=token_mask(lm))  # frequent=None: all kept
    R = result.options["induction_length"]
    induction = induction_scores(lm, induction_batch(lm, R, 8, 0), RUNTIME).scores()
    for row in result.rows:
        b, h = row["layer"], row["head"]
        for name, value in behaviour.items():
            assert row[name] == pytest.approx(float(value[b, h]), abs=1e-12), name
        assert row["ov_copying"] == pytest.approx(float(spectral.ov_copying[b, h]), abs=1e-12)
        assert row["qk_same_token"] == pytest.approx(float(spectral.qk_same_token[b, h]), abs=1e-12)
        assert row["induction"] == pytest.approx(float(induction[b, h]), abs=1e-12)
    assert all(r["prev_token"] == r["prev_token"] for r in result.rows)  # no NaN left


def test_top_heads_and_correlations_across_heads(atlas):
    import numpy as np

    _, result = atlas
    values = [r["first_token_raw"] for r in result.rows]
    best = max(range(len(values)), key=lambda i: values[i])
    top = result.top_heads("first_token_raw", 2)
    assert (top[0]["layer"], top[0]["head"]) == (
        result.rows[best]["layer"],
        result.rows[best]["head"],
    )
    assert top[0]["value"] >= top[1]["value"]
    corr = result.correlations("pearson")
    x = np.array([r["first_token_raw"] for r in result.rows])
    y = np.array([r["pearson_raw_effective"] for r in result.rows])
    assert x.std() > 0
    want = float(np.corrcoef(x, y)[0, 1])
    assert corr.loc["first_token_raw", "pearson_raw_effective"] == pytest.approx(want, abs=1e-12)
    assert list(corr.columns) == result.scores()


def test_frequent_tokens_of_the_windows_limit_the_top_pairs(tiny_model, corpus):
    from tgeom.analyses.embedding.filters import frequent_token_ids

    lm = tiny_model("gpt2")
    result = heads(
        lm,
        str(corpus),
        seq_len=20,
        max_windows_per_topic=2,
        frequent=12,
        blocks=[0],
        runtime=RUNTIME,
        shard=Shard(),
    )
    kept = frequent_token_ids(windows_of(lm, corpus, per_topic=2), 12).tolist()
    mask = token_mask(lm, include_ids=kept)
    for row in result.rows:
        pairs = head_top_pairs(lm.weights(), 0, row["head"], "ov", 5, row_mask=mask, col_mask=mask)
        assert row["top_ov"] == pair_text(pairs.pairs(lm.vocab_strings))
    assert result.meta["vocabulary"]["n_frequent"] == 12


def test_key_side_split_columns_equal_geometry_qk_on_the_same_windows(atlas, corpus):
    """geometry qk's split (its own second pass over the windows that collected the
    statistics) gives the shared pass' positional, content, scale and cross (1e-12)."""
    from tgeom.analyses.geometry.collect import collect_statistics
    from tgeom.analyses.geometry.qk import qk_split

    lm, result = atlas
    windows = windows_of(lm, corpus)
    stats = collect_statistics(
        lm, windows, RUNTIME, progress=False, shard=Shard(), second_moment=False
    )
    qk = qk_split(lm, stats, windows.token_ids, runtime=RUNTIME)
    by = {(e["block"], h["head"]): h for e in qk.by_block for h in e["heads"]}
    for row in result.rows:
        want = by[(row["layer"], row["head"])]
        for part in ("positional", "content", "scale", "cross"):
            assert row[part] == pytest.approx(want[part], abs=1e-12), part
    assert all(r["positional"] == r["positional"] for r in result.rows)  # no NaN


def test_alibi_models_get_an_alibi_column(tiny_model, corpus):
    lm = tiny_model("bloom")
    result = heads(
        lm,
        str(corpus),
        seq_len=20,
        max_windows_per_topic=2,
        frequent=None,
        runtime=RUNTIME,
        shard=Shard(),
    )
    assert result.columns == list(columns_of(True))
    assert result.columns.index("alibi") == result.columns.index("cross") + 1
    assert all(0 <= r["alibi"] <= 1 for r in result.rows)
