"""Zero-shot stitching through the embedding space [DAR] 5.2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgeom.analyses.embedding.finetune import accuracy, finetune_classifier
from tgeom.analyses.embedding.stitching import stitch, stitching_map
from tgeom.errors import TgeomError
from tgeom.models.reference import embed, run_blocks


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP overhead on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def two_topic_windows(n: int = 80, T: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    low = torch.randint(4, 50, (n, T), generator=gen)
    high = torch.randint(50, 96, (n, T), generator=gen)
    return torch.where(labels[:, None] == 0, low, high), labels


@pytest.fixture(scope="module")
def classifier(tiny_model):  # type: ignore[no-untyped-def]
    ids, labels = two_topic_windows()
    clf, _ = finetune_classifier(
        tiny_model("gpt2"), ids, labels, ["low", "high"], steps=25, lr=1e-3, head_lr=3e-2
    )
    return clf


def test_stitching_map_is_the_least_squares_solution_in_vocabulary_space() -> None:
    gen = torch.Generator().manual_seed(0)
    E_A = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    E_B = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    h = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    M = stitching_map(E_A, E_B)
    assert M.shape == (6, 4)
    # x minimising ||h E_A.T - x E_B.T|| for each row h, by numpy's least squares.
    expected = np.linalg.lstsq(E_B.numpy(), (h @ E_A.T).numpy().T, rcond=None)[0].T
    np.testing.assert_allclose((h @ M).numpy(), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stitching_map(E_A, E_A), torch.eye(6, dtype=torch.float64))


def test_stitching_a_classifier_to_itself_gives_its_own_accuracy_at_every_layer(classifier) -> None:  # type: ignore[no-untyped-def]
    clf = classifier
    result = stitch(clf.weights, [clf])
    (run,) = result.runs
    assert run.hidden == list(range(clf.n_blocks + 1))
    own = accuracy(clf, clf.eval_ids, clf.eval_labels)
    assert run.own_accuracy == own
    assert run.accuracy == [own] * len(run.hidden)
    # And the stitched logits are the classifier's own logits.
    ids = clf.eval_ids[:4]
    hidden = run_blocks(clf.weights, embed(clf.weights, ids))
    for layer, h in enumerate(hidden):
        torch.testing.assert_close(
            clf.logits_from_hidden(h, layer), clf.logits(ids), atol=1e-5, rtol=1e-5
        )


def test_stitching_between_different_random_models_reports_chance(classifier, tiny_model) -> None:  # type: ignore[no-untyped-def]
    ids, labels = two_topic_windows(n=40, seed=7)
    result = stitch(tiny_model("llama").weights(), [classifier], ids, labels, hidden=[0, 1, 2])
    (run,) = result.runs
    assert result.chance == pytest.approx(0.5) and result.uniform_chance == 0.5
    assert result.n_eval == 40 and len(run.accuracy) == 3
    assert all(0.0 <= a <= 1.0 for a in run.accuracy)
    assert all(0.0 <= p <= 1.0 for p in run.p_value)
    assert run.own_accuracy > result.chance
    name, layer, best = result.best()
    assert name == "seed 0" and best == max(run.accuracy) and layer in run.hidden


def test_stitching_rejects_out_of_range_split_hidden_states(classifier) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TgeomError, match=r"valid split hidden states are 0\.\.2"):
        stitch(classifier.weights, [classifier], hidden=[3])


def test_stitching_map_rejects_different_vocabularies() -> None:
    with pytest.raises(TgeomError, match="share a vocabulary"):
        stitching_map(torch.randn(10, 3), torch.randn(11, 3))


@pytest.mark.slow
def test_minilm_topic_classifier_stitched_with_itself_keeps_its_accuracy(minilm) -> None:  # type: ignore[no-untyped-def]
    from tgeom.corpus import load_corpus, make_windows

    windows = make_windows(load_corpus("builtin"), minilm.tokenizer, 32, max_windows_per_topic=24)
    clf, report = finetune_classifier(
        minilm,
        windows.token_ids,
        windows.topic_ids,
        windows.topics,
        steps=12,
        batch_size=16,
        lr=1e-4,
        head_lr=1e-2,
        seed=0,
    )
    print(f"MiniLM topic classifier: {report}")
    assert report.losses[-1] < report.losses[0]
    assert report.eval_accuracy > report.majority_rate
    result = stitch(clf.weights, [clf], hidden=[0, 3, 6])
    (run,) = result.runs
    print(f"self-stitching accuracy per l: {run.accuracy} (own {run.own_accuracy})")
    assert run.accuracy == [run.own_accuracy] * 3
