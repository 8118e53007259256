"""QK/OV top pairs of a bfloat16 / float16 model: screened in that dtype, rescored in float64,
they are the pairs of the dense float64 product of the same (rounded) weights."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.embedding.filters import token_mask
from tgeom.analyses.embedding.interaction import head_top_pairs
from tgeom.models import load_model


def dense_top(matrix, k, largest, mask):
    V = matrix.shape[0]
    entries = [
        (-float(matrix[i, j]) if largest else float(matrix[i, j]), i, j)
        for i in range(V)
        for j in range(V)
        if mask[i] and mask[j]
    ]
    return [(i, j) for _, i, j in sorted(entries)[:k]]


def reference_qk_factor(E, W, norm, head):
    """``[V, d_head]`` float64, written out: ``E W[head]``, under QK-norm each token's
    projection times the gain over the RMS of its head's (``head``) or all heads' (``all``)
    coordinates."""
    E, W = E.double(), W.double()
    x = E @ W[head]
    if norm is None:
        return x
    if norm.scope == "head":
        ms = x.pow(2).mean(dim=1, keepdim=True)
    else:
        ms = torch.stack([E @ W[h] for h in range(W.shape[0])]).pow(2).mean(dim=(0, 2))[:, None]
    return norm.weight[head].double() * x / torch.sqrt(ms + norm.eps)


@pytest.fixture(scope="module")
def low_models(tiny_model_dir):
    cache = {}

    def get(family, dtype):
        if (family, dtype) not in cache:
            folder = str(tiny_model_dir(family))
            cache[family, dtype] = load_model(folder, dtype=dtype, device="cpu")
        return cache[family, dtype]

    return get


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "olmo2"])
@pytest.mark.parametrize("largest", [True, False])
def test_low_precision_pairs_equal_the_float64_dense_product_of_the_same_weights(
    low_models, family, dtype, largest
):
    lm = low_models(family, dtype)
    cw = lm.weights()
    assert cw.W_U.dtype == dtype
    E = cw.W_U
    mask = token_mask(lm)
    for block, head in ((0, 1), (1, 3)):
        lw = cw.layers[block]
        F_Q = reference_qk_factor(E, lw.W_Q, lw.q_norm, head)
        F_K = reference_qk_factor(E, lw.W_K, lw.k_norm, head)
        dense = {
            "qk": F_Q @ F_K.T,
            "ov": E.double() @ lw.W_V[head].double() @ lw.W_O[head].double() @ E.double().T,
        }
        for circuit, matrix in dense.items():
            # 3 rows per tile: every tile after the first is screened in `dtype`
            got = head_top_pairs(
                cw, block, head, circuit, 40, largest=largest, row_mask=mask, col_mask=mask,
                chunk_size=3,
            )  # fmt: skip
            pairs = list(zip(got.rows.tolist(), got.cols.tolist(), strict=True))
            assert pairs == dense_top(matrix, 40, largest, mask), (circuit, block, head)
            want = torch.stack([matrix[i, j] for i, j in pairs])
            assert got.values.dtype == torch.float64
            torch.testing.assert_close(got.values, want, rtol=1e-12, atol=1e-12)
