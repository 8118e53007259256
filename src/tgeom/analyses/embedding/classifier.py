"""A minimal sequence classifier on a model's canonical weights, for stitching [DAR] 5.2 and
fine-tuning diffs [DAR] 5.3.

No fine-tuned classifier ships offline, so tgeom builds one: the canonical weights of a
:class:`~tgeom.models.load.LoadedModel` run by the reference forward
(:mod:`tgeom.models.reference`), the final hidden state normalised (final norm when the model
has one), pooled over the window (mean for encoders, last token for causal models), and a linear
head ``[n_classes, d]``. Training (see :func:`finetune_classifier`) is deterministic: the head
starts at zero and the only randomness, the train/held-out split and the batch order, comes from
one seeded generator. A classifier is saved as ``classifier.json`` (options, topics, base model)
plus ``classifier.safetensors`` (the head, the held-out windows, and the canonical tensors that
fine-tuning changed; the others are re-read from the base model on load).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.models.load import LoadedModel, load_model
from tgeom.models.reference import embed, run_blocks
from tgeom.models.weights import CanonicalWeights, LayerWeights, Norm, QKNorm, Rotary
from tgeom.results import atomic_replace, atomic_write_text, prepare_out_dir

CONFIG_FILE = "classifier.json"
TENSOR_FILE = "classifier.safetensors"


@dataclass
class ClassifierConfig:
    """What a classifier is: base model identity, pooling, labels, and how it was trained."""

    base: str
    pooling: str  # 'mean' | 'last'
    topics: list[str]
    seq_len: int
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class SequenceClassifier:
    """Fine-tuned canonical weights + linear head ``W [n_classes, d]``, ``b [n_classes]``.

    ``eval_ids [N, T]`` / ``eval_labels [N]``: the held-out windows it was not trained on.
    """

    weights: CanonicalWeights
    head_weight: Tensor
    head_bias: Tensor
    config: ClassifierConfig
    eval_ids: Tensor | None = None
    eval_labels: Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.weights.layers)

    def pooled(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Features ``[B, d]`` from the last hidden state ``[B, T, d]`` (before the final norm)."""
        cw = self.weights
        h = cw.final_norm(hidden) if cw.final_norm is not None else hidden
        if self.config.pooling == "last":
            if attention_mask is None:
                return h[:, -1]
            last = attention_mask.long().sum(1).clamp(min=1) - 1
            return h[torch.arange(h.shape[0], device=h.device), last]
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask.to(h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def logits_from_hidden(self, hidden: Tensor, index: int) -> Tensor:
        """Class scores ``[B, C]`` when ``hidden [B, T, d]`` is fed in as hidden state ``index``
        (0..L: the input of block ``index``)."""
        last = run_blocks(self.weights, hidden, None, start=index)[-1]
        return self.pooled(last) @ self.head_weight.T + self.head_bias

    def logits(self, input_ids: Tensor) -> Tensor:
        """Class scores ``[B, C]`` of windows ``input_ids [B, T]``."""
        return self.logits_from_hidden(embed(self.weights, input_ids), 0)

    @torch.no_grad()
    def predict(self, input_ids: Tensor, batch_size: int = 16) -> Tensor:
        """Predicted class ids ``[N]`` (int64, CPU)."""
        device = self.head_weight.device
        out = [
            self.logits(input_ids[s : s + batch_size].to(device)).argmax(-1).cpu()
            for s in range(0, input_ids.shape[0], batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def map_weights(cw: CanonicalWeights, fn: Callable[[str, Tensor], Tensor]) -> CanonicalWeights:
    """A copy of ``cw`` whose tensors are ``fn(name, tensor)`` (names as in ``named_tensors``).

    Tensors shared inside ``cw`` (tied ``W_E``/``W_U``, even as distinct views of one storage)
    stay shared in the copy.
    """
    memo: dict[tuple[Any, ...], Tensor] = {}

    def one(name: str, t: Any) -> Any:
        if t is None:
            return None
        key = storage_key(t)
        if key not in memo:
            memo[key] = fn(name, t)
        return memo[key]

    def norm(prefix: str, n: Norm | None) -> Norm | None:
        if n is None:
            return None
        return dataclasses.replace(
            n, weight=one(f"{prefix}.weight", n.weight), bias=one(f"{prefix}.bias", n.bias)
        )

    def layer(index: int, lw: LayerWeights) -> LayerWeights:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(lw):
            value = getattr(lw, f.name)
            name = f"layers.{index}.{f.name}"
            if isinstance(value, Norm):
                changes[f.name] = norm(name, value)
            elif isinstance(value, QKNorm):
                changes[f.name] = dataclasses.replace(
                    value, weight=one(f"{name}.weight", value.weight)
                )
            elif isinstance(value, Rotary):
                changes[f.name] = value  # fixed frequencies, not parameters
            else:
                changes[f.name] = one(name, value)
        return LayerWeights(**changes)

    top: dict[str, Any] = {
        name: one(name, getattr(cw, name)) for name in ("W_E", "W_U", "b_U", "W_pos", "W_type")
    }
    return dataclasses.replace(
        cw,
        **top,
        embed_norm=norm("embed_norm", cw.embed_norm),
        final_norm=norm("final_norm", cw.final_norm),
        layers=[layer(i, lw) for i, lw in enumerate(cw.layers)],
    )


def unique_named_tensors(cw: CanonicalWeights) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, aliases)``: each distinct tensor once under its first name, and
    ``alias name -> first name`` for the shared ones (tied embeddings)."""
    first: dict[tuple[Any, ...], str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in cw.named_tensors():
        key = storage_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t
    return tensors, aliases


def storage_key(t: Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's memory view: equal for two detached views of one parameter."""
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def save_classifier(clf: SequenceClassifier, base: CanonicalWeights, out: str | Path) -> Path:
    """Write ``out/classifier.json`` and ``out/classifier.safetensors``; returns the folder."""
    from safetensors.torch import save_file

    folder = prepare_out_dir(out)
    tuned, _ = unique_named_tensors(clf.weights)
    base_tensors = dict(base.named_tensors())
    tensors = {
        f"body.{name}": t.detach().cpu().contiguous()
        for name, t in tuned.items()
        if name not in base_tensors or not torch.equal(t.detach().cpu(), base_tensors[name].cpu())
    }
    tensors["head.weight"] = clf.head_weight.detach().cpu().contiguous()
    tensors["head.bias"] = clf.head_bias.detach().cpu().contiguous()
    if clf.eval_ids is not None and clf.eval_labels is not None:
        tensors["eval.token_ids"] = clf.eval_ids.cpu().contiguous()
        tensors["eval.labels"] = clf.eval_labels.cpu().contiguous()
    with atomic_replace(folder / TENSOR_FILE) as tmp:
        save_file(tensors, str(tmp))
    config = dataclasses.asdict(clf.config)
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    return folder


def is_classifier_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_classifier_config(folder: str | Path) -> ClassifierConfig:
    """The ``classifier.json`` of a classifier folder (cheap: no weights are read)."""
    path = Path(folder)
    if not is_classifier_dir(path) or not (path / TENSOR_FILE).is_file():
        raise TgeomError(
            f"{path} is not a tgeom classifier folder (no {CONFIG_FILE} / {TENSOR_FILE}); "
            "create one with `tgeom weights finetune MODEL --corpus C --out DIR`."
        )
    return ClassifierConfig(**json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))


def load_classifier(
    folder: str | Path, *, base: LoadedModel | None = None, device: str | None = "cpu"
) -> tuple[SequenceClassifier, LoadedModel]:
    """Read a classifier saved by :func:`save_classifier`; returns it with its base model.

    ``base``: the already-loaded base model (else it is loaded from the recorded source).
    """
    from safetensors.torch import load_file

    path = Path(folder)
    config = read_classifier_config(path)
    lm = base if base is not None else load_model(config.base, device=device)
    tensors = load_file(str(path / TENSOR_FILE), device=str(lm.device))
    body = {k.removeprefix("body."): v for k, v in tensors.items() if k.startswith("body.")}
    weights = map_weights(lm.weights(), lambda name, t: body.get(name, t))
    clf = SequenceClassifier(
        weights=weights,
        head_weight=tensors["head.weight"],
        head_bias=tensors["head.bias"],
        config=config,
        eval_ids=tensors.get("eval.token_ids"),
        eval_labels=tensors.get("eval.labels"),
    )
    return clf, lm
