"""Zero-shot stitching through the embedding space, [DAR] section 5.2 (SPEC section 3).

Model A (pretrained) runs its first ``l`` blocks; its hidden state ``h_A [.., d_A]`` is read in
vocabulary space (``h_A @ E_A.T``) and written back in B's residual basis by least squares,
``h_B = h_A @ M`` with ``M = E_A.T @ pinv(E_B.T)  [d_A, d_B]`` (true pseudo-inverse, float64);
classifier B (fine-tuned) then runs its remaining blocks ``l..L-1`` and its head. Nothing is
trained. Accuracy is reported per split hidden state ``l`` (0..L: B continues from A's hidden
``l``) and per classifier run (seed), against the majority-class rate of the evaluation
windows, with a one-sided binomial p-value. When ``E_A = E_B`` (full column rank) ``M`` is the
identity, so stitching a classifier to its own body reproduces its accuracy at every ``l``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from scipy.stats import binomtest
from torch import Tensor

from tgeom.analyses.embedding.alignment import Embedding, vocabulary_matrix
from tgeom.analyses.embedding.classifier import SequenceClassifier
from tgeom.analyses.embedding.finetune import majority_rate
from tgeom.errors import TgeomError
from tgeom.models.reference import embed, run_blocks
from tgeom.models.weights import CanonicalWeights
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd


def stitching_map(E_A: Tensor, E_B: Tensor) -> Tensor:
    """``M = E_A.T @ pinv(E_B.T)`` ``[d_A, d_B]`` (float64); ``E_A [V, d_A]``, ``E_B [V, d_B]``."""
    if E_A.shape[0] != E_B.shape[0]:
        raise TgeomError(
            f"the two models have {E_A.shape[0]} and {E_B.shape[0]} vocabulary rows: stitching "
            "needs models that share a vocabulary."
        )
    E_B64 = E_B.to(E_A.device).double()
    return E_A.double().T @ torch.linalg.pinv(E_B64.T)


@dataclass
class StitchingRun:
    """One classifier (one fine-tuning seed): accuracy per split hidden state ``hidden`` (A's
    first ``h`` blocks, then B's blocks ``h..``), and its own accuracy."""

    name: str
    seed: int
    hidden: list[int]
    accuracy: list[float]
    p_value: list[float]  # one-sided binomial test of accuracy > majority rate
    own_accuracy: float
    chance: float  # majority-class rate of this run's evaluation windows


@dataclass
class StitchingResult:
    """Stitching of model A into one or more classifiers B ([DAR] 5.2)."""

    runs: list[StitchingRun]
    chance: float  # majority-class rate of the evaluation windows
    uniform_chance: float  # 1 / number of classes
    n_eval: int
    topics: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def best(self) -> tuple[str, int, float]:
        """``(run name, split hidden state, accuracy)`` of the best stitched accuracy."""
        return max(
            ((r.name, h, a) for r in self.runs for h, a in zip(r.hidden, r.accuracy, strict=True)),
            key=lambda t: t[2],
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per run and split: name, seed, hidden (the split hidden state), accuracy,
        p_value, own_accuracy, chance (the fields of :class:`StitchingRun`)."""
        return results_frame(self, "runs", ("runs",), explode=("hidden", "accuracy", "p_value"))


@torch.no_grad()
def stitch_run(
    cw_A: CanonicalWeights,
    clf: SequenceClassifier,
    token_ids: Tensor,
    labels: Tensor,
    *,
    hidden: Sequence[int] | None = None,
    embedding: Embedding = "out",
    batch_size: int = 16,
    name: str = "classifier",
) -> StitchingRun:
    """Accuracy of A's first ``l`` blocks -> ``M`` -> B's blocks ``l..`` + head, for each l.

    ``hidden``: split hidden states (default ``0..min(L_A, L_B)``); ``token_ids [N, T]``,
    ``labels [N]``.
    """
    L_max = min(len(cw_A.layers), clf.n_blocks)
    splits = list(range(L_max + 1)) if hidden is None else [int(x) for x in hidden]
    for split in splits:
        if not 0 <= split <= L_max:
            raise TgeomError(
                f"split hidden state {split} is out of range: valid split hidden states are "
                f"0..{L_max}."
            )
    cw_B = clf.weights
    device = cw_B.W_E.device
    M = stitching_map(vocabulary_matrix(cw_A, embedding), vocabulary_matrix(cw_B, embedding))
    M = M.to(device, cw_B.W_E.dtype)
    correct = torch.zeros(len(splits), dtype=torch.long)
    own = 0
    stop = max(splits) if splits else 0
    for start in range(0, token_ids.shape[0], batch_size):
        ids = token_ids[start : start + batch_size].to(cw_A.W_E.device)
        gold = labels[start : start + batch_size].to(device)
        hidden_A = run_blocks(cw_A, embed(cw_A, ids), None, stop=stop)
        for i, split in enumerate(splits):
            h_B = hidden_A[split].to(device) @ M
            correct[i] += int((clf.logits_from_hidden(h_B, split).argmax(-1) == gold).sum())
        own += int((clf.logits(ids.to(device)).argmax(-1) == gold).sum())
    n = int(token_ids.shape[0])
    p0 = majority_rate(labels, len(clf.config.topics))
    return StitchingRun(
        name=name,
        seed=clf.config.seed,
        hidden=splits,
        accuracy=[int(c) / n for c in correct],
        p_value=[_p_value(int(c), n, p0) for c in correct],
        own_accuracy=own / n,
        chance=p0,
    )


def _p_value(successes: int, n: int, p0: float) -> float:
    if n == 0 or p0 >= 1.0:
        return 1.0
    return float(binomtest(successes, n, p0, alternative="greater").pvalue)


def stitch(
    cw_A: CanonicalWeights,
    classifiers: Sequence[SequenceClassifier],
    token_ids: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    hidden: Sequence[int] | None = None,
    embedding: Embedding = "out",
    batch_size: int = 16,
) -> StitchingResult:
    """Stitch A into every classifier (one per fine-tuning seed) on the same windows.

    Default windows: each classifier's own held-out windows (the same for classifiers trained
    with the same seed and corpus).
    """
    if not classifiers:
        raise TgeomError("stitching needs at least one classifier.")
    topics = classifiers[0].config.topics
    runs = []
    n_eval, chance = 0, 0.0
    for i, clf in enumerate(classifiers):
        if clf.config.topics != topics:
            raise TgeomError("the classifiers were trained on different topics: stitch them apart.")
        ids, gold = token_ids, labels
        if ids is None or gold is None:
            if clf.eval_ids is None or clf.eval_labels is None:
                raise TgeomError("the classifier has no held-out windows; pass --corpus.")
            ids, gold = clf.eval_ids, clf.eval_labels
        name = names[i] if names is not None else f"seed {clf.config.seed}"
        runs.append(
            stitch_run(
                cw_A,
                clf,
                ids,
                gold,
                hidden=hidden,
                embedding=embedding,
                batch_size=batch_size,
                name=name,
            )
        )
        n_eval, chance = int(ids.shape[0]), majority_rate(gold, len(topics))
    options = {
        "embedding": embedding,
        "map": "M = E_A.T @ pinv(E_B.T), float64",
        "chance": "majority-class rate of the evaluation windows",
    }
    return StitchingResult(runs, chance, 1.0 / len(topics), n_eval, list(topics), options)
