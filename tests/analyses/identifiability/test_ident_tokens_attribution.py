"""Token identifiability and hidden token attribution [BRU]."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.identifiability import token_attribution, token_identifiability
from tgeom.analyses.identifiability.attribution import (
    squared_norms_estimate,
    squared_norms_exact,
)
from tgeom.analyses.identifiability.identify import (
    apply_linear,
    fit_linear,
    identified_in_sequence,
)
from tgeom.errors import TgeomError
from tgeom.models.reference import embed, run_blocks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_layer_zero_is_fully_identified_with_identity(tiny_model):
    lm = tiny_model("bert")
    ids = torch.randint(4, 96, (10, 12), generator=torch.Generator().manual_seed(0))
    result = token_identifiability(lm, ids, g=("identity", "linear"), seed=0)
    rows = {(r["layer"], r["g"], r["distance"]): r for r in result.rows}
    for kind in ("cosine", "l2"):
        assert rows[(0, "identity", kind)]["rate"] == 1.0
        assert rows[(0, "identity", kind)]["n_tokens"] == 2 * 12  # 15% of 10 sequences -> 2 test
    assert {r["g"] for r in result.rows} == {"identity", "linear"}


def test_orthogonal_layers_are_identified_by_a_linear_map():
    """Synthetic 'model': hidden^l = x Q_l (+ shift) with Q_l orthogonal: linear g recovers x."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 16, dtype=torch.float64, generator=g)
    for layer in range(4):
        Q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=g)).Q
        H = X @ Q + 0.3 * layer
        W = fit_linear(H[:40], X[:40])
        for kind in ("cosine", "l2"):
            ok = identified_in_sequence(apply_linear(W, H[40:]), X[40:], kind)
            assert bool(ok.all())


def test_too_few_sequences_is_a_one_line_error(tiny_model):
    ids = torch.randint(4, 96, (5, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(TgeomError, match=r"at least 7 sequences.*gave 5"):
        token_identifiability(tiny_model("gpt2"), ids)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_exact_attribution_equals_autograd_jacobian(tiny_model, family):
    lm = tiny_model(family)
    cw = lm.weights()
    ids = torch.randint(4, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    x0 = embed(cw, ids).detach()
    G = squared_norms_exact(cw, x0, chunk=17)
    f = lambda x: torch.stack(run_blocks(cw, x))[:, 0]  # noqa: E731
    J = torch.autograd.functional.jacobian(f, x0)  # [L+1, T, d, 1, T, d]
    reference = (J[:, :, :, 0] ** 2).sum(dim=(2, 4))  # [L+1, T(i), T(j)]
    assert torch.allclose(G, reference, rtol=1e-4, atol=1e-8)
    result = token_attribution(lm, ids, mode="exact")
    assert torch.allclose(result.contributions.sum(-1), torch.ones(3, 7, dtype=torch.float64))
    assert torch.allclose(result.contributions[0], torch.eye(7, dtype=torch.float64))
    if lm.summary.is_causal:  # no attribution to later tokens
        assert result.contributions[-1].triu(1).abs().max() == 0


def test_estimate_converges_to_exact(tiny_model):
    lm = tiny_model("bert")
    cw = lm.weights()
    ids = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    x0 = embed(cw, ids).detach()
    exact = squared_norms_exact(cw, x0)[1:]
    errors = []
    for samples in (4, 64, 1024):
        estimate, se = squared_norms_estimate(cw, x0, samples, seed=5)
        errors.append(float(((estimate[1:] - exact) / exact).abs().mean()))
        assert (se[1:] > 0).all()
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1  # ~ sqrt(2 / 1024) relative for Gaussian tangents


def test_attribution_rejects_short_text(tiny_model):
    with pytest.raises(TgeomError, match="fewer than 2 tokens"):
        token_attribution(tiny_model("gpt2"), torch.tensor([5]))
