"""Token identifiability across hidden states [BRU] (SPEC section 5).

Hidden token ``h^l_i`` is mapped back to input space by ``g`` and called *identified* when the
nearest candidate input to ``g(h^l_i)`` is its own input ``x_i = hidden[0]_i``. Candidates: the
inputs of the same sequence (default, as in the paper) or every vocabulary item's input at that
position (``candidates="vocabulary"``). Ties count as identified (rotary models have no position
in ``x``, so a repeated token has the same input twice). ``g``: identity; linear (least squares
with bias, closed form, float64, fitted on the training sequences); MLP with one hidden layer
(Adam on mini-batches, MSE on standardised inputs and targets, early stopping on the validation
sequences). Sequences are split 70/15/15 with a
seed; rates are measured on the test sequences only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tgeom.capture import iter_captures
from tgeom.errors import TgeomError, check_index
from tgeom.results import results_frame
from tgeom.runtime import Runtime

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class IdentifiabilityResult:
    """``rows``: one ``{hidden, g, distance, rate, n_tokens}`` per hidden state (0..L, 0 = the
    embedding output), g and distance (rates on the test sequences); ``options``: candidates,
    seed, split, sequence counts, ``n_blocks`` and ``n_hidden``; ``warnings``: one line per way
    the rates cannot mean what they say (a test split of fewer than
    :data:`MIN_TEST_SEQUENCES` sequences; an underdetermined linear g)."""

    rows: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def by_hidden(self) -> list[dict[str, Any]]:
        return self.rows

    def rate(self, hidden: int, g: str, distance: str) -> float:
        for row in self.rows:
            if (row["hidden"], row["g"], row["distance"]) == (hidden, g, distance):
                return float(row["rate"])
        raise KeyError((hidden, g, distance))

    def to_json(self) -> dict[str, Any]:
        return {"by_hidden": self.rows, **self.options}

    def to_frame(self) -> pd.DataFrame:
        """One row per hidden state, g and distance: hidden, g, distance, rate, n_tokens."""
        return results_frame(self.to_json(), "by_hidden", ("by_hidden",))


MIN_TEST_SEQUENCES = 10
"""Fewer test sequences than this and the rates come with a warning: they are tokens of a few
passages (the tokens of one sequence are not independent), so one odd passage moves them."""


def split_sizes(n: int, split: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/validation/test counts for ``n`` sequences (floors; the rest goes to test)."""
    n_train, n_val = int(split[0] * n + 1e-9), int(split[1] * n + 1e-9)
    return n_train, n_val, n - n_train - n_val


def min_sequences(split: tuple[float, float, float], test: int = 1) -> int:
    """Smallest number of sequences giving every part of the split at least one sequence and
    the test part at least ``test``."""
    n = 3
    while min(split_sizes(n, split)) < 1 or split_sizes(n, split)[2] < test:
        n += 1
    return n


def split_sequences(n: int, seed: int, split: tuple[float, float, float]) -> tuple[Tensor, ...]:
    """Seeded random split of ``n`` sequences into train/validation/test index tensors."""
    if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
        raise TgeomError(f"split must be three positive shares summing to 1, got {split}.")
    needed = min_sequences(split)
    if n < needed:
        raise TgeomError(
            f"token identifiability needs at least {needed} sequences for a "
            f"{'/'.join(str(round(100 * s)) for s in split)} split, but the corpus gave {n}; "
            "pass more text, more windows per topic or a smaller --seq-len."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val, _ = split_sizes(n, split)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def fit_linear(H: Tensor, X: Tensor) -> Tensor:
    """Least squares ``[H, 1] W ~ X`` in float64; returns ``W [d_h + 1, d_x]``."""
    A = torch.cat([H.double(), torch.ones(H.shape[0], 1, dtype=torch.float64)], dim=1)
    return torch.linalg.lstsq(A, X.double(), driver="gelsd").solution


def apply_linear(W: Tensor, H: Tensor) -> Tensor:
    return torch.cat([H.double(), torch.ones(H.shape[0], 1, dtype=torch.float64)], 1) @ W


MLP_BATCH = 128
"""Tokens per Adam step of the MLP g."""
MLP_EPOCHS = 100
"""Most passes over the training tokens."""
MLP_PATIENCE = 5
"""Epochs without a better validation MSE before the MLP fit stops."""


def fit_mlp(
    H: Tensor,
    X: Tensor,
    H_val: Tensor,
    X_val: Tensor,
    seed: int,
    epochs: int = MLP_EPOCHS,
    batch_size: int = MLP_BATCH,
    patience: int = MLP_PATIENCE,
) -> torch.nn.Module:
    """One hidden layer (width d) from ``H [n, d_h]`` to ``X [n, d_x]``: inputs and targets
    standardised on the training tokens, Adam (lr 1e-3) on seeded shuffled mini-batches of
    ``batch_size`` tokens, early stopping once the validation MSE has not improved for
    ``patience`` epochs; keeps the best validation state. Deterministic for a seed (the global
    RNG is left untouched).

    Mini-batches, not full-batch steps: an epoch costs the same ``6 n d^2`` flops either way,
    but gives ``n / batch_size`` Adam steps instead of one, so the fit converges in far fewer
    epochs (full-batch Adam ran all of its 300 epochs, and on targets at Gemma's scale ended
    worse than predicting the mean).
    Standardised targets keep the learning rate meaningful whatever the model's input scale
    (Gemma's inputs are scaled by sqrt(d))."""
    d_in, d_out = H.shape[1], X.shape[1]
    mean, std = H.mean(0), H.std(0).clamp_min(1e-6)
    x_mean, x_std = X.mean(0), X.std(0).clamp_min(1e-6)
    Hs, Xs = (H - mean) / std, (X - x_mean) / x_std
    Hs_val, Xs_val = (H_val - mean) / std, (X_val - x_mean) / x_std
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(d_in, d_in), torch.nn.GELU(), torch.nn.Linear(d_in, d_out)
        )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state, waited = float("inf"), None, 0
    for _ in range(epochs):
        for batch in torch.randperm(len(Hs), generator=generator).split(batch_size):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(Hs[batch]), Xs[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(net(Hs_val), Xs_val))
        if val < best - 1e-9:
            best, best_state, waited = val, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return _Standardised(net, mean, std, x_mean, x_std)


class _Standardised(torch.nn.Module):
    """``net`` between standardised inputs and targets, mapping raw ``h`` to raw ``x``."""

    def __init__(
        self, net: torch.nn.Module, mean: Tensor, std: Tensor, x_mean: Tensor, x_std: Tensor
    ) -> None:
        super().__init__()
        self.net, self.mean, self.std = net, mean, std
        self.x_mean, self.x_std = x_mean, x_std

    def forward(self, h: Tensor) -> Tensor:
        return self.net((h - self.mean) / self.std) * self.x_std + self.x_mean


def pairwise_distances(pred: Tensor, candidates: Tensor, kind: str) -> Tensor:
    """``[n, m]`` distances between predictions ``[n, d]`` and candidates ``[m, d]``."""
    pred, candidates = pred.double(), candidates.double()
    if kind == "cosine":
        p = pred / pred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        c = candidates / candidates.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return 1 - p @ c.T
    if kind == "l2":
        return torch.cdist(pred, candidates)
    raise TgeomError(f"distance must be cosine or l2, got {kind!r}.")


def identified_in_sequence(pred: Tensor, X: Tensor, kind: str) -> Tensor:
    """``[n]`` bool: token i's own input is (one of) the nearest among the sequence's inputs."""
    D = pairwise_distances(pred, X, kind)
    own = D.diagonal()
    return own <= D.min(dim=1).values + 1e-12


def token_identifiability(
    lm: Any,
    token_ids: Tensor,
    *,
    g: tuple[str, ...] = ("identity", "linear", "mlp"),
    distances: tuple[str, ...] = ("cosine", "l2"),
    candidates: str = "sequence",
    seed: int = 0,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    runtime: Runtime | None = None,
    hidden: list[int] | None = None,
) -> IdentifiabilityResult:
    """Rate of identified tokens per hidden state, for each ``g`` and distance (test split only).

    ``token_ids [N, T]``: N sequences of T real tokens (windows of a corpus). ``hidden``: the
    hidden states evaluated, 0..L (default all; the report spreads a few over depth on CPU)."""
    for kind in distances:
        if kind not in ("cosine", "l2"):
            raise TgeomError(f"distance must be cosine or l2, got {kind!r}.")
    if candidates not in ("sequence", "vocabulary"):
        raise TgeomError(f"candidates must be sequence or vocabulary, got {candidates!r}.")
    train, val, test = split_sequences(int(token_ids.shape[0]), seed, split)
    runtime = runtime or Runtime.auto()
    states = torch.cat(
        [c.hidden.cpu() for _, c in iter_captures(lm, token_ids, runtime)], dim=1
    )  # [L+1, N, T, d]
    X = states[0]
    rows = []
    chosen = range(states.shape[0]) if hidden is None else hidden
    for index in chosen:
        check_index("hidden state", index, states.shape[0])
        H = states[index]
        maps: dict[str, Any] = {}
        for name in g:
            if name == "identity":
                maps[name] = lambda h: h.double()
            elif name == "linear":
                W = fit_linear(H[train].flatten(0, 1), X[train].flatten(0, 1))
                maps[name] = lambda h, W=W: apply_linear(W, h)
            elif name == "mlp":
                net = fit_mlp(
                    H[train].flatten(0, 1),
                    X[train].flatten(0, 1),
                    H[val].flatten(0, 1),
                    X[val].flatten(0, 1),
                    seed,
                )
                maps[name] = lambda h, net=net: net(h).detach().double()
            else:
                raise TgeomError(f"g must be identity, linear or mlp, got {name!r}.")
        for name, fn in maps.items():
            for kind in distances:
                hits, total = 0, 0
                for s in test.tolist():
                    pred = fn(H[s])
                    if candidates == "sequence":
                        ok = identified_in_sequence(pred, X[s], kind)
                    else:
                        ok = _identified_in_vocabulary(lm, pred, token_ids[s], kind)
                    hits += int(ok.sum())
                    total += int(ok.numel())
                rows.append(
                    {
                        "hidden": index,
                        "g": name,
                        "distance": kind,
                        "rate": hits / total,
                        "n_tokens": total,
                    }
                )
    n_train_tokens = len(train) * int(token_ids.shape[1])
    options: dict[str, Any] = {
        "candidates": candidates,
        "seed": seed,
        "split": list(split),
        "n_sequences": {"train": len(train), "validation": len(val), "test": len(test)},
        "n_train_tokens": n_train_tokens,
        "ties": "a tie with the own input counts as identified",
        "n_blocks": int(states.shape[0]) - 1,
        "n_hidden": int(states.shape[0]),
    }
    warnings = []
    if len(test) < MIN_TEST_SEQUENCES:
        warnings.append(
            f"the rates are measured on a test split of {len(test)} sequences (fewer than "
            f"{MIN_TEST_SEQUENCES}): they read a handful of passages, not the model; pass "
            f"at least {min_sequences(split, MIN_TEST_SEQUENCES)} sequences (more windows)"
        )
    if "linear" in g and n_train_tokens < states.shape[-1] + 1:
        warnings.append(
            f"linear g is underdetermined: {n_train_tokens} training tokens for "
            f"{states.shape[-1] + 1} coefficients per input coordinate (minimum-norm fit); "
            "use more sequences"
        )
    return IdentifiabilityResult(rows, options, warnings)


@torch.no_grad()
def _identified_in_vocabulary(lm: Any, pred: Tensor, ids: Tensor, kind: str) -> Tensor:
    """Nearest vocabulary item's input at each position is the token's own id (ties allowed)."""
    cw = lm.weights()
    out = torch.zeros(len(ids), dtype=torch.bool)
    for t in range(len(ids)):
        cand = cw.W_E * cw.embed_scale  # every vocabulary item's input at position t: [V, d]
        if cw.W_pos is not None:
            cand = cand + cw.W_pos[t]
        if cw.W_type is not None:
            cand = cand + cw.W_type[0]
        if cw.embed_norm is not None:
            cand = cw.embed_norm(cand)
        D = pairwise_distances(pred[t : t + 1], cand, kind)[0]
        out[t] = D[int(ids[t])] <= D.min() + 1e-12
    return out
