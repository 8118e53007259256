"""Exact attribution restricted to some input tokens: the same columns as the full computation."""

from __future__ import annotations

import torch

from tgeom.analyses.identifiability.attribution import squared_norms_estimate, squared_norms_exact
from tgeom.models.reference import embed


def test_exact_norms_for_a_subset_of_input_tokens_equal_those_columns(tiny_model):
    cw = tiny_model("llama").weights()
    ids = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(7))
    x0 = embed(cw, ids).detach()
    full = squared_norms_exact(cw, x0)
    part = squared_norms_exact(cw, x0, chunk=5, inputs=[4, 1])
    assert part.shape == (full.shape[0], 6, 2)
    assert torch.allclose(part, full[..., [4, 1]], rtol=1e-6, atol=1e-12)


def test_estimate_for_a_subset_of_input_tokens_uses_the_same_draws(tiny_model):
    cw = tiny_model("bert").weights()
    ids = torch.randint(4, 96, (1, 5), generator=torch.Generator().manual_seed(8))
    x0 = embed(cw, ids).detach()
    full, full_se = squared_norms_estimate(cw, x0, 6, seed=2)
    part, part_se = squared_norms_estimate(cw, x0, 6, seed=2, chunk=7, inputs=[3, 0])
    assert torch.allclose(part, full[..., [3, 0]], rtol=1e-6, atol=1e-12)
    assert torch.allclose(part_se, full_se[..., [3, 0]], rtol=1e-6, atol=1e-12)
