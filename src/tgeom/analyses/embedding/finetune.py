"""Fine-tuning a classifier deterministically, and reading the fine-tuning in tokens [DAR] 5.3.

:func:`finetune_classifier` trains a
:class:`~tgeom.analyses.embedding.classifier.SequenceClassifier` on windows with topic labels
(cross-entropy, AdamW, fixed number of steps, seeded split and batch order, head initialised at
zero; CPU seconds to minutes).

:func:`finetuning_diff` projects ``theta_finetuned - theta_pretrained`` of every parameter
vector (FFN keys and values, W_Q/W_K/W_V columns, W_O rows; SPEC section 3) to tokens,
``diff @ E.T``, with ``E`` the pretrained model's vocabulary matrix, and a classifier head's rows
``W_head[c] @ E.T``. Both ends are reported: the top tokens (largest scores: the direction the
change added, +delta) and the bottom tokens (most negative scores: the direction it removed,
-delta); the two sets are in general unrelated, so neither stands for the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tgeom.analyses.embedding.alignment import (
    PARAMETER_GROUPS,
    Embedding,
    group_vectors,
    vocabulary_matrix,
)
from tgeom.analyses.embedding.classifier import (
    ClassifierConfig,
    SequenceClassifier,
    map_weights,
    unique_named_tensors,
)
from tgeom.analyses.embedding.validation import topk_tokens
from tgeom.errors import TgeomError
from tgeom.models.load import LoadedModel
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class TrainingReport:
    """How training went: losses every step, accuracies on the train and held-out windows."""

    losses: list[float]
    train_accuracy: float
    eval_accuracy: float
    majority_rate: float  # share of the most frequent class among the held-out windows
    n_train: int
    n_eval: int


def split_windows(n: int, eval_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded ``(train_indices, eval_indices)`` of ``n`` windows."""
    if not 0.0 < eval_fraction < 1.0:
        raise TgeomError(f"eval fraction {eval_fraction} must be strictly between 0 and 1.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise TgeomError(f"only {n} windows: need at least 2 to train and hold out; add text.")
    return order[n_eval:].sort().values, order[:n_eval].sort().values


def finetune_classifier(
    lm: LoadedModel,
    token_ids: Tensor,
    labels: Tensor,
    topics: Sequence[str],
    *,
    steps: int = 60,
    batch_size: int = 16,
    lr: float = 5e-5,
    head_lr: float = 5e-3,
    seed: int = 0,
    pooling: str | None = None,
    train_embeddings: bool = False,
    eval_fraction: float = 0.2,
) -> tuple[SequenceClassifier, TrainingReport]:
    """Fine-tune ``lm`` as a classifier of windows ``token_ids [N, T]`` into ``labels [N]``.

    ``pooling``: 'mean' or 'last' (default: 'last' for causal models, 'mean' for encoders).
    ``train_embeddings``: also update ``W_E``/``W_pos``/``W_U`` (off: the vocabulary matrices
    stay the pretrained ones). Deterministic for a given ``seed`` on a given device.
    """
    if token_ids.ndim != 2 or labels.shape != (token_ids.shape[0],):
        raise TgeomError("fine-tuning needs windows [N, T] and one label per window.")
    if steps < 1 or batch_size < 1:
        raise TgeomError("steps and batch size must be at least 1.")
    n_classes = len(topics)
    if n_classes < 2 or int(labels.max()) >= n_classes or int(labels.min()) < 0:
        raise TgeomError(f"need labels in 0..{n_classes - 1} and at least two topics.")
    pooling = pooling or ("last" if lm.summary.is_causal else "mean")
    if pooling not in ("mean", "last"):
        raise TgeomError(f"unknown pooling '{pooling}'; choose mean or last.")
    device = lm.device
    frozen = {"W_E", "W_U", "b_U", "W_pos", "W_type"} if not train_embeddings else set()

    def trainable(name: str, t: Tensor) -> Tensor:
        copy = t.detach().clone().to(device)
        return copy.requires_grad_(name not in frozen and t.is_floating_point())

    weights = map_weights(lm.weights(), trainable)
    d = weights.W_E.shape[1]
    head_weight = torch.zeros(n_classes, d, device=device, requires_grad=True)
    head_bias = torch.zeros(n_classes, device=device, requires_grad=True)
    train_idx, eval_idx = split_windows(token_ids.shape[0], eval_fraction, seed)
    config = ClassifierConfig(
        base=lm.source,
        pooling=pooling,
        topics=list(topics),
        seq_len=int(token_ids.shape[1]),
        seed=seed,
        training={
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "head_lr": head_lr,
            "train_embeddings": train_embeddings,
            "eval_fraction": eval_fraction,
        },
    )
    clf = SequenceClassifier(
        weights, head_weight, head_bias, config, token_ids[eval_idx], labels[eval_idx]
    )
    body = [t for t in unique_named_tensors(weights)[0].values() if t.requires_grad]
    optimiser = torch.optim.AdamW(
        [{"params": body, "lr": lr}, {"params": [head_weight, head_bias], "lr": head_lr}],
        weight_decay=0.0,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    order = train_idx[torch.randperm(len(train_idx), generator=gen)]
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > len(order) and cursor > 0:
            order, cursor = train_idx[torch.randperm(len(train_idx), generator=gen)], 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        loss = torch.nn.functional.cross_entropy(
            clf.logits(token_ids[batch].to(device)), labels[batch].to(device)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.item()))
    for t in [*body, head_weight, head_bias]:
        t.requires_grad_(False)
    report = TrainingReport(
        losses=losses,
        train_accuracy=accuracy(clf, token_ids[train_idx], labels[train_idx]),
        eval_accuracy=accuracy(clf, token_ids[eval_idx], labels[eval_idx]),
        majority_rate=majority_rate(labels[eval_idx], n_classes),
        n_train=len(train_idx),
        n_eval=len(eval_idx),
    )
    config.training["report"] = {k: v for k, v in report.__dict__.items() if k != "losses"} | {
        "final_loss": losses[-1]
    }
    return clf, report


def accuracy(clf: SequenceClassifier, token_ids: Tensor, labels: Tensor) -> float:
    """Share of windows classified correctly."""
    return float((clf.predict(token_ids) == labels.cpu()).double().mean().item())


def majority_rate(labels: Tensor, n_classes: int) -> float:
    """Accuracy of always answering the most frequent class (the chance baseline)."""
    counts = torch.bincount(labels.cpu(), minlength=n_classes)
    return float(counts.max().item() / max(1, labels.numel()))


@dataclass
class DiffRow:
    """One changed parameter vector (or one head row) read in tokens."""

    group: str
    block: int | None  # None for the classifier head
    index: int  # neuron, subhead row (head * d_head + j) or class
    label: str  # 'neuron 12', 'head 3 dim 5' or the class's topic
    norm: float  # ||diff|| (head rows: ||W_head[c]||)
    top_ids: list[int]  # largest diff @ E.T first (+delta)
    top_tokens: list[str]
    top_scores: list[float]
    bottom_ids: list[int]  # most negative diff @ E.T first (-delta)
    bottom_tokens: list[str]
    bottom_scores: list[float]


@dataclass
class FinetuningDiff:
    """Rows (most changed vectors of each group, largest first) and per-block diff norms."""

    rows: list[DiffRow]
    group_norms: dict[str, list[float]]  # Frobenius norm of the diff per block
    options: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, list[Any]]:
        """Column-wise table (``pandas.DataFrame(diff.columns())`` gives a DataFrame)."""
        names = list(DiffRow.__dataclass_fields__)
        return {n: [getattr(r, n) for r in self.rows] for n in names}

    def to_frame(self) -> pd.DataFrame:
        """``rows`` as a DataFrame: one row per changed vector, the fields of :class:`DiffRow`."""
        return results_frame(self, "rows", ("rows",))


def finetuning_diff(
    pretrained: Any,
    finetuned: Any,
    token_strings: Callable[[list[int]], list[str]],
    *,
    k: int = 10,
    top_n: int = 20,
    groups: Sequence[str] = PARAMETER_GROUPS,
    embedding: Embedding = "out",
    head: SequenceClassifier | None = None,
) -> FinetuningDiff:
    """Top and bottom tokens of ``theta_ft - theta_pt`` for the ``top_n`` most changed vectors
    per group (``k`` of each).

    ``pretrained``, ``finetuned``: CanonicalWeights of the same architecture. Zero diffs are
    left out of ``rows`` (their tokens mean nothing) but counted in ``group_norms``.
    """
    if k < 1 or top_n < 1:
        raise TgeomError("k and top-n must be at least 1.")
    if len(pretrained.layers) != len(finetuned.layers) or (
        pretrained.W_E.shape != finetuned.W_E.shape
    ):
        raise TgeomError(
            "the fine-tuned model does not have the pretrained model's shapes: pass the "
            "checkpoint it was fine-tuned from."
        )
    E = vocabulary_matrix(pretrained, embedding)
    rows: list[DiffRow] = []
    group_norms: dict[str, list[float]] = {}
    for group in groups:
        diffs = [
            (group_vectors(ft, group).to(E.device) - group_vectors(pt, group).to(E.device))
            for pt, ft in zip(pretrained.layers, finetuned.layers, strict=True)
        ]
        group_norms[group] = [float(dv.double().norm()) for dv in diffs]
        norms = torch.cat([dv.double().norm(dim=-1) for dv in diffs])
        n_per = diffs[0].shape[0]
        best = norms.argsort(descending=True, stable=True)[:top_n]
        best = best[norms[best] > 0]
        if best.numel() == 0:
            continue
        vectors = torch.stack([diffs[int(i) // n_per][int(i) % n_per] for i in best])
        ends = _ends(vectors, E, k)
        for row, flat in enumerate(best.tolist()):
            block, index = divmod(flat, n_per)
            label, norm = _label(group, index, pretrained), float(norms[flat])
            ends_of_row = [t[row] for t in ends]
            rows.append(_row(group, block, index, label, norm, ends_of_row, token_strings))
    if head is not None:
        ends = _ends(head.head_weight.to(E.device), E, k)
        for c, topic in enumerate(head.config.topics):
            norm = float(head.head_weight[c].double().norm())
            rows.append(_row("head", None, c, topic, norm, [t[c] for t in ends], token_strings))
    options = {
        "k": k,
        "top_n": top_n,
        "embedding": embedding,
        "groups": list(groups),
        "tokens": "top: largest diff @ E.T (+delta); bottom: most negative diff @ E.T (-delta)",
    }
    return FinetuningDiff(rows=rows, group_norms=group_norms, options=options)


def _label(group: str, index: int, cw: Any) -> str:
    if group.startswith("ffn"):
        return f"neuron {index}"
    dh = cw.layers[0].W_Q.shape[2]
    return f"head {index // dh} dim {index % dh}"


def _ends(vectors: Tensor, E: Tensor, k: int) -> list[Tensor]:
    """``[top ids, top scores, bottom ids, bottom scores]`` (each ``[n, k]``) of
    ``vectors @ E.T``; bottom = most negative first."""
    return [*topk_tokens(vectors, E, k), *topk_tokens(vectors, E, k, largest=False)]


def _row(
    group: str,
    block: int | None,
    index: int,
    label: str,
    norm: float,
    ends: list[Tensor],
    token_strings: Callable[[list[int]], list[str]],
) -> DiffRow:
    top, top_scores, bottom, bottom_scores = ends
    top_ids, bottom_ids = [int(i) for i in top.tolist()], [int(i) for i in bottom.tolist()]
    return DiffRow(
        group,
        block,
        index,
        label,
        norm,
        top_ids,
        token_strings(top_ids),
        [float(s) for s in top_scores.tolist()],
        bottom_ids,
        token_strings(bottom_ids),
        [float(s) for s in bottom_scores.tolist()],
    )
