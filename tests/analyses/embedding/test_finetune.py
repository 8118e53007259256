"""Fine-tuning a classifier deterministically, saving it, reading fine-tuning diffs in tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tgeom.analyses.embedding.classifier import (
    TENSOR_FILE,
    load_classifier,
    map_weights,
    save_classifier,
)
from tgeom.analyses.embedding.finetune import finetune_classifier, finetuning_diff
from tgeom.errors import TgeomError


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP overhead on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def two_topic_windows(n: int = 80, T: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Topic 0 windows use characters 4..49, topic 1 characters 50..95 (tiny tokenizer ids)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    low = torch.randint(4, 50, (n, T), generator=gen)
    high = torch.randint(50, 96, (n, T), generator=gen)
    return torch.where(labels[:, None] == 0, low, high), labels


def train(lm, seed: int = 0, steps: int = 25):  # type: ignore[no-untyped-def]
    ids, labels = two_topic_windows()
    return finetune_classifier(
        lm, ids, labels, ["low", "high"], steps=steps, lr=1e-3, head_lr=3e-2, seed=seed
    )


def test_finetuned_classifier_beats_majority_on_held_out_windows(tiny_model) -> None:  # type: ignore[no-untyped-def]
    _, report = train(tiny_model("gpt2"))
    assert report.n_eval == 16 and report.n_train == 64
    assert report.losses[-1] < report.losses[0]
    assert report.train_accuracy >= 0.9
    assert report.eval_accuracy > report.majority_rate


def test_finetuning_is_deterministic_for_a_seed(tiny_model) -> None:  # type: ignore[no-untyped-def]
    first, r1 = train(tiny_model("llama"), seed=3, steps=6)
    again, r2 = train(tiny_model("llama"), seed=3, steps=6)
    _, r3 = train(tiny_model("llama"), seed=4, steps=6)
    assert r1.losses == r2.losses
    torch.testing.assert_close(first.head_weight, again.head_weight, rtol=0, atol=0)
    assert r1.losses != r3.losses


def test_finetuning_leaves_the_base_model_untouched(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    before = {n: t.clone() for n, t in lm.weights().named_tensors()}
    train(lm, steps=3)
    for name, t in lm.weights().named_tensors():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0)


def test_saved_classifier_reloads_with_identical_predictions(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    clf, _ = train(lm, steps=5)
    save_classifier(clf, lm.weights(), tmp_path / "clf")
    loaded, _ = load_classifier(tmp_path / "clf", base=lm)
    ids, _ = two_topic_windows(n=20, seed=9)
    torch.testing.assert_close(loaded.logits(ids), clf.logits(ids))
    assert loaded.config == clf.config
    stored = load_file(str(tmp_path / "clf" / TENSOR_FILE))
    assert "body.layers.0.W_Q" in stored and "body.W_E" not in stored  # embeddings were frozen
    torch.testing.assert_close(stored["eval.labels"], clf.eval_labels)


def test_loading_a_folder_that_is_not_a_classifier_is_a_one_line_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TgeomError, match="not a tgeom classifier folder"):
        load_classifier(tmp_path)


def token_strings(ids: list[int]) -> list[str]:
    return [f"t{i}" for i in ids]


def test_diff_of_an_unmodified_copy_is_all_zeros(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("neox").weights()
    copy = map_weights(cw, lambda _n, t: t.clone())
    diff = finetuning_diff(cw, copy, token_strings)
    assert diff.rows == []
    assert all(v == 0.0 for norms in diff.group_norms.values() for v in norms)


def test_map_weights_reaches_the_qk_norm_gains(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """QK-norm gains are named tensors like any other: mapped, and the forward sees the change."""
    from tgeom.models.reference import reference_forward

    cw = tiny_model("qwen3").weights()
    names = dict(cw.named_tensors())
    assert torch.equal(names["layers.1.k_norm.weight"], cw.layers[1].k_norm.weight)
    ids = torch.randint(4, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    same = map_weights(cw, lambda _n, t: t.clone())
    assert torch.equal(reference_forward(same, ids)[-1], reference_forward(cw, ids)[-1])
    doubled = map_weights(cw, lambda n, t: 2 * t if n.endswith("q_norm.weight") else t)
    assert torch.equal(doubled.layers[0].q_norm.weight, 2 * cw.layers[0].q_norm.weight)
    assert not torch.allclose(reference_forward(doubled, ids)[-1], reference_forward(cw, ids)[-1])


def self_dominant_token(E: torch.Tensor) -> int:
    """A token t whose embedding scores highest on itself (checked with numpy)."""
    scores = E.double().numpy() @ E.double().numpy().T
    winners = np.flatnonzero(scores.argmax(1) == np.arange(len(scores)))
    assert winners.size > 0
    return int(winners[0])


def test_planted_change_comes_back_as_its_token(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("gpt2").weights()
    E = cw.W_U
    t = self_dominant_token(E)
    dh = cw.layers[0].W_O.shape[1]
    ft_layers = [dataclasses.replace(lw) for lw in cw.layers]
    ft_layers[1] = dataclasses.replace(
        cw.layers[1],
        W_out=cw.layers[1].W_out.clone().index_add_(0, torch.tensor([7]), 3.0 * E[t][None]),
        W_O=cw.layers[1].W_O.clone(),
    )
    ft_layers[1].W_O[2, 5] -= 2.0 * E[t]  # a subhead row that now demotes token t
    finetuned = dataclasses.replace(cw, layers=ft_layers)
    diff = finetuning_diff(cw, finetuned, token_strings, k=3)
    by_group = {(r.group, r.block, r.index): r for r in diff.rows}
    assert set(by_group) == {("ffn_value", 1, 7), ("W_O", 1, 2 * dh + 5)}
    value_row = by_group[("ffn_value", 1, 7)]
    assert value_row.top_ids[0] == t and value_row.top_tokens[0] == f"t{t}"
    assert value_row.norm == pytest.approx(3.0 * float(E[t].norm()), rel=1e-5)
    o_row = by_group[("W_O", 1, 2 * dh + 5)]
    assert o_row.label == "head 2 dim 5"
    expected = np.argsort(-(-2.0 * E.double().numpy() @ E[t].double().numpy()), kind="stable")[:3]
    assert o_row.top_ids == expected.tolist()
    # the demoted token shows at the -delta end only, the promoted one at the +delta end only
    assert o_row.bottom_ids[0] == t and o_row.bottom_tokens[0] == f"t{t}" and t not in o_row.top_ids
    assert value_row.bottom_ids[0] != t and t not in value_row.bottom_ids
    assert diff.group_norms["ffn_key"] == [0.0, 0.0]


def test_both_ends_equal_sorting_every_score(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("llama").weights()
    gen = torch.Generator().manual_seed(2)
    ft_layers = [
        dataclasses.replace(lw, W_in=lw.W_in + 0.1 * torch.randn(lw.W_in.shape, generator=gen))
        for lw in cw.layers
    ]
    finetuned = dataclasses.replace(cw, layers=ft_layers)
    diff = finetuning_diff(cw, finetuned, token_strings, k=4, top_n=5, groups=["ffn_key"])
    assert len(diff.rows) == 5
    E = cw.W_U.double().numpy()
    for row in diff.rows:
        change = (ft_layers[row.block].W_in - cw.layers[row.block].W_in)[:, row.index]
        scores = change.double().numpy() @ E.T
        assert row.top_ids == np.argsort(-scores, kind="stable")[:4].tolist()
        assert row.bottom_ids == np.argsort(scores, kind="stable")[:4].tolist()
        np.testing.assert_allclose(row.bottom_scores, scores[row.bottom_ids], rtol=1e-4)
        assert row.bottom_tokens == [f"t{i}" for i in row.bottom_ids]
        assert row.bottom_scores == sorted(row.bottom_scores)  # most negative first
    assert "-delta" in diff.options["tokens"]


def test_head_rows_are_projected_to_tokens(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    clf, _ = train(lm, steps=3)
    diff = finetuning_diff(lm.weights(), clf.weights, token_strings, k=4, head=clf)
    head_rows = [r for r in diff.rows if r.group == "head"]
    assert [r.label for r in head_rows] == ["low", "high"]
    scores = clf.head_weight.double().numpy() @ lm.weights().W_U.double().numpy().T
    for row in head_rows:
        assert row.top_ids == np.argsort(-scores[row.index], kind="stable")[:4].tolist()
        assert row.bottom_ids == np.argsort(scores[row.index], kind="stable")[:4].tolist()
    assert "group" in diff.columns() and len(diff.columns()["norm"]) == len(diff.rows)
