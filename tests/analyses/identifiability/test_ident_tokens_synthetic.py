"""Token identifiability [BRU] end to end on a synthetic "model" whose layers are orthogonal maps:
the whole pipeline (seeded 70/15/15 split, g fitted on training sequences only, rates on test
sequences) must identify every token at every layer with a linear g."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import tgeom.analyses.identifiability.identify as identify
from tgeom.analyses.identifiability import token_identifiability
from tgeom.runtime import Runtime


def orthogonal_layers_hidden(token_ids: torch.Tensor, d: int, n_layers: int) -> torch.Tensor:
    """``[L+1, N, T, d]``: x = a random embedding of each (token, position); layer l applies an
    orthogonal map and a shift to layer l-1."""
    g = torch.Generator().manual_seed(11)
    E = torch.randn(int(token_ids.max()) + 1, d, generator=g)
    P = 0.5 * torch.randn(token_ids.shape[1], d, generator=g)
    hidden = [E[token_ids] + P]
    for _ in range(n_layers):
        Q = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
        hidden.append(hidden[-1] @ Q + torch.randn(d, generator=g))
    return torch.stack(hidden)


def test_orthogonal_layers_are_fully_identified_by_linear_g_end_to_end(monkeypatch):
    ids = torch.randint(0, 50, (20, 12), generator=torch.Generator().manual_seed(12))
    hidden = orthogonal_layers_hidden(ids, d=16, n_layers=3)
    seen: list[torch.Tensor] = []

    def fake_iter_captures(lm, token_ids, runtime):
        seen.append(token_ids)
        yield 0, SimpleNamespace(hidden=hidden)

    monkeypatch.setattr(identify, "iter_captures", fake_iter_captures)
    result = token_identifiability(
        SimpleNamespace(), ids, g=("identity", "linear"), seed=3, runtime=Runtime.auto()
    )
    assert torch.equal(seen[0], ids)
    for layer in range(4):
        for kind in ("cosine", "l2"):
            assert result.rate(layer, "linear", kind) == 1.0
    assert result.rate(0, "identity", "cosine") == 1.0 == result.rate(0, "identity", "l2")
    # rotations hide the tokens from the identity map: the test can tell the two apart
    assert result.rate(3, "identity", "l2") < 0.5
    n_test = result.options["n_sequences"]["test"]
    assert n_test == 20 - 14 - 3 and all(r["n_tokens"] == n_test * 12 for r in result.rows)


def test_underdetermined_linear_g_is_flagged(monkeypatch):
    ids = torch.randint(0, 50, (10, 3), generator=torch.Generator().manual_seed(13))
    hidden = orthogonal_layers_hidden(ids, d=32, n_layers=1)  # 7 x 3 = 21 tokens < 33
    monkeypatch.setattr(
        identify, "iter_captures", lambda *a: iter([(0, SimpleNamespace(hidden=hidden))])
    )
    result = token_identifiability(SimpleNamespace(), ids, g=("linear",), runtime=Runtime.auto())
    assert result.options["n_train_tokens"] == 21
    assert any("underdetermined" in w for w in result.warnings)
