"""Hidden states read as vocabulary scores: the logit lens [DAR] (SPEC section 3).

For a text, every hidden state ``hidden[h] [T, d]`` (``h = 0`` the embedding output, ``h`` the
output of block ``h - 1`` (0-based blocks), before the final norm) is read as
``final_norm(hidden[l]) @ W_U.T (+ b_U)`` and summarised by its top-k tokens per position. For
post-LN encoders (BERT) there is no final norm: the hidden states are already normalised. Where
the model soft-caps its logits (Gemma 2, 3: ``cap * tanh(logits / cap)``) the lens does too, so
the last hidden state reads as the model's own logits; the cap is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tgeom.analyses.embedding.projection import embedding_name
from tgeom.errors import TgeomError
from tgeom.models.reference import logits
from tgeom.models.weights import CanonicalWeights
from tgeom.results import results_frame

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class LogitLens:
    """``token_ids [T]`` and ``tokens`` of the text; ``top_ids, top_scores [L+1, T, k]`` and
    ``top_tokens [L+1][T][k]`` per hidden state (0 = embeddings) and position, best first."""

    text: str
    token_ids: Tensor
    tokens: list[str]
    top_ids: Tensor
    top_scores: Tensor
    top_tokens: list[list[list[str]]]
    final_norm: bool
    has_unembedding_bias: bool
    embedding: str = "W_U"  # the matrix read: "W_E" for a model without an LM head
    final_logit_softcap: float | None = None  # the cap applied to the scores, None: none

    @property
    def n_hidden(self) -> int:
        """Hidden states read: the embedding output and each block's output (L + 1)."""
        return int(self.top_ids.shape[0])

    @property
    def n_blocks(self) -> int:
        return self.n_hidden - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "embedding": self.embedding,
            "final_norm_applied": self.final_norm,
            "unembedding_bias_added": self.has_unembedding_bias,
            "final_logit_softcap": self.final_logit_softcap,
            "n_blocks": self.n_blocks,
            "n_hidden": self.n_hidden,
            "by_hidden": [
                {
                    "hidden": hidden,
                    "positions": [
                        {
                            "position": t,
                            "input_token": self.tokens[t],
                            "top_ids": self.top_ids[hidden, t],
                            "top_tokens": self.top_tokens[hidden][t],
                            "top_scores": self.top_scores[hidden, t],
                        }
                        for t in range(len(self.tokens))
                    ],
                }
                for hidden in range(self.n_hidden)
            ],
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per hidden state and position: hidden, position, input_token and the lists
        top_ids, top_tokens, top_scores (best first; ``.explode`` them for one row per token)."""
        return results_frame(self.to_json(), "by_hidden.positions", ("by_hidden.positions",))


def lens_logits(cw: CanonicalWeights, hidden: Tensor) -> Tensor:
    """``final_norm(hidden) @ W_U.T (+ b_U)`` for ``hidden [..., d]`` -> ``[..., V]``, soft-capped
    where the model caps its logits (:func:`tgeom.models.reference.logits`)."""
    return logits(cw, hidden)


@torch.no_grad()
def logit_lens(lm: Any, text: str, k: int = 5, *, mask: Tensor | None = None) -> LogitLens:
    """Top-k tokens of every hidden state (0..L) at every position of ``text``.

    ``mask [V]`` bool: tokens allowed in the top-k (excluded ones are set to -inf first).
    The text is tokenised with the tokenizer's defaults (BOS/CLS added when it adds them).
    """
    from tgeom.capture import capture

    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise TgeomError(f"k must be a positive integer, got {k!r}; pass k >= 1.")
    input_ids = lm.encode_text(text)  # [1, T]: refuses an empty text or one beyond the context
    cw = lm.weights()
    hidden = capture(lm, input_ids).hidden[:, 0]  # [L+1, T, d]
    V = cw.W_U.shape[0]
    kk = min(k, V if mask is None else int(mask.sum()))
    if kk == 0:
        raise TgeomError("the token filters leave no token; relax them.")
    top_ids, top_scores = [], []
    for index in range(hidden.shape[0]):
        scores = lens_logits(cw, hidden[index].to(cw.W_U.device))
        if mask is not None:
            scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :kk]
        top_ids.append(order.cpu())
        top_scores.append(torch.gather(scores, 1, order).cpu())
    ids = torch.stack(top_ids)
    vocab = lm.vocab_strings
    return LogitLens(
        text=text,
        token_ids=input_ids[0],
        tokens=lm.token_strings(input_ids[0]),
        top_ids=ids,
        top_scores=torch.stack(top_scores),
        top_tokens=[[[vocab[i] for i in pos] for pos in state] for state in ids.tolist()],
        final_norm=cw.final_norm is not None,
        has_unembedding_bias=cw.b_U is not None,
        embedding=embedding_name(cw, "out"),
        final_logit_softcap=cw.summary.final_logit_softcap,
    )
