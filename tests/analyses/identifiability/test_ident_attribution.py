"""Hidden token attribution [BRU]: exact JVP mode vs autograd Jacobians, estimate convergence."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.identifiability import token_attribution
from tgeom.analyses.identifiability.attribution import (
    squared_norms_estimate,
    squared_norms_exact,
)
from tgeom.errors import TgeomError
from tgeom.models.reference import embed, run_blocks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def jacobian_reference(cw, x0):
    """||d h^l_i / d x_j||_F^2 from the full reverse-mode Jacobian, float64 sums."""
    f = lambda x: torch.stack(run_blocks(cw, x))[:, 0]  # noqa: E731
    J = torch.autograd.functional.jacobian(f, x0).double()  # [L+1, T, d, 1, T, d]
    return (J[:, :, :, 0] ** 2).sum(dim=(2, 4))  # [L+1, T(i), T(j)]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_exact_attribution_equals_autograd_jacobian(tiny_model, family):
    lm = tiny_model(family)
    cw = lm.weights()
    ids = torch.randint(4, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    x0 = embed(cw, ids).detach()
    reference = jacobian_reference(cw, x0)
    G = squared_norms_exact(cw, x0, chunk=17)  # a chunk that does not divide T*d
    assert torch.allclose(G, reference, rtol=1e-4, atol=1e-8)
    result = token_attribution(lm, ids, mode="exact")
    norms = reference.sqrt()
    assert torch.allclose(result.contributions, norms / norms.sum(-1, keepdim=True), atol=1e-5)
    if lm.summary.is_causal:  # no attribution to later tokens
        assert result.contributions[-1].triu(1).abs().max() == 0


def test_contributions_of_real_tokens_sum_to_one_and_layer_zero_is_own(tiny_model):
    lm = tiny_model("gpt2")
    ids = torch.randint(4, 96, (9,), generator=torch.Generator().manual_seed(6))
    result = token_attribution(lm, ids)
    L1 = lm.summary.n_layers + 1
    assert result.contributions.shape == (L1, 9, 9)
    assert torch.allclose(result.contributions.sum(-1), torch.ones(L1, 9, dtype=torch.float64))
    assert torch.allclose(result.contributions[0], torch.eye(9, dtype=torch.float64))
    assert result.own_contribution[0] == 1 and result.top_contributor_not_own[0] == 0
    rows = result.to_json()["by_hidden"]
    assert [r["hidden"] for r in rows] == list(range(L1))
    assert len(rows[1]["by_relative_position"]) == 2 * 9 - 1


def test_estimate_error_shrinks_with_samples(tiny_model):
    lm = tiny_model("bert")
    cw = lm.weights()
    ids = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    x0 = embed(cw, ids).detach()
    exact = jacobian_reference(cw, x0)[1:]
    errors = []
    for samples in (4, 64, 1024):
        estimate, se = squared_norms_estimate(cw, x0, samples, seed=5)
        errors.append(float(((estimate[1:] - exact) / exact).abs().mean()))
        assert (se[1:] > 0).all()
        # the stated standard errors are honest: most entries within 3 SE of the truth
        assert ((estimate[1:] - exact).abs() <= 3 * se[1:]).double().mean() > 0.9
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1  # ~ sqrt(2 / (d * 1024)) relative for Gaussian tangents


def test_estimate_mode_reports_standard_errors(tiny_model):
    result = token_attribution(
        tiny_model("llama"), torch.arange(4, 12), mode="estimate", samples=8, seed=1
    )
    assert result.samples == 8 and result.contribution_se is not None
    assert result.contribution_se.shape == result.contributions.shape
    assert torch.allclose(result.contributions.sum(-1), torch.ones(3, 8, dtype=torch.float64))
    again = token_attribution(
        tiny_model("llama"), torch.arange(4, 12), mode="estimate", samples=8, seed=1
    )
    assert torch.equal(result.contributions, again.contributions)  # seeded


def test_attribution_rejects_bad_input(tiny_model):
    lm = tiny_model("gpt2")
    with pytest.raises(TgeomError, match="fewer than 2 tokens"):
        token_attribution(lm, torch.tensor([5]))
    with pytest.raises(TgeomError, match="model context"):
        token_attribution(lm, torch.full((lm.summary.n_ctx + 1,), 5))
    with pytest.raises(TgeomError, match="exact or estimate"):
        token_attribution(lm, torch.tensor([5, 6]), mode="fast")
