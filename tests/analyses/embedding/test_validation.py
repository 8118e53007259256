"""Validation experiments R_k and Sim_k [DAR] 4, against slow obvious references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tgeom.analyses.embedding.validation import (
    RK_GROUPS,
    SIM_PAIRS,
    jaccard,
    mlp_input,
    other_positions,
    r_k,
    sim_k,
    topk_tokens,
)
from tgeom.capture import capture
from tgeom.errors import TgeomError
from tgeom.models.reference import attention_bias
from tgeom.runtime import Runtime

CPU = Runtime(torch.device("cpu"), batch_size=3)
# Where each family's MLP starts (its input) and where its neuron activations enter W_out.
MLP_MODULES = {
    "gpt2": ("mlp", "mlp.c_proj"),
    "llama": ("mlp", "mlp.down_proj"),
    "olmo2": ("mlp", "mlp.down_proj"),  # norms on sublayer outputs: the MLP reads h + norm(attn)
    "bert": ("intermediate", "output.dense"),
    "neox": ("mlp", "mlp.dense_4h_to_h"),
    "distilbert": ("ffn", "ffn.lin2"),
    "opt_post_ln": ("fc1", "fc2"),
    "gptj": ("mlp", "mlp.fc_out"),
    "phi": ("mlp", "mlp.fc2"),
    "mistral": ("mlp", "mlp.down_proj"),  # windows of 4 keys act on the 9 tokens below
    "gpt_neo": ("mlp", "mlp.c_proj"),
    "phi3": ("mlp", "mlp.down_proj"),  # gate_up_proj fused: act(gate) * up enters down_proj
    "gemma": ("mlp", "mlp.down_proj"),
    "gemma2": ("mlp", "mlp.down_proj"),  # sandwich: the MLP reads norm(h + norm(attn(norm(h))))
    "gemma3_text": ("mlp", "mlp.down_proj"),
    "bloom": ("mlp", "mlp.dense_4h_to_h"),  # ALiBi acts on the attention before it
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP overhead on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def numpy_topk(scores: np.ndarray, k: int) -> list[set[int]]:
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in scores]


@pytest.mark.parametrize("largest", [True, False])
def test_topk_tokens_equals_sorting_every_score(largest: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    E, X = torch.randn(50, 6, generator=gen), torch.randn(7, 6, generator=gen)
    ids, scores = topk_tokens(X, E, 5, largest=largest, exclude_ids=[3, 4])
    dense = (X.double() @ E.double().T).numpy() * (1 if largest else -1)
    dense[:, [3, 4]] = -np.inf
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(ids.numpy(), expected)
    np.testing.assert_allclose(
        scores.numpy(), (X @ E.T).numpy()[np.arange(7)[:, None], expected], rtol=1e-5
    )


def test_topk_tokens_rejects_k_beyond_the_allowed_vocabulary() -> None:
    with pytest.raises(TgeomError, match=r"valid k are 1..8"):
        topk_tokens(torch.randn(2, 3), torch.randn(10, 3), 9, exclude_ids=[0, 1])


def test_jaccard_equals_set_arithmetic() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(20)])
    b = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(20)])
    expected = [
        len(set(x) & set(y)) / len(set(x) | set(y))
        for x, y in zip(a.tolist(), b.tolist(), strict=True)
    ]
    np.testing.assert_allclose(jaccard(a, b).numpy(), expected)


def test_sim_k_tgeom_equals_set_overlaps_of_each_pair(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("llama").weights()
    result = sim_k(cw, k=6, definition="tgeom")
    E = cw.W_U.double().numpy()
    for layer, lw in enumerate(cw.layers):
        H, d, dh = lw.W_Q.shape
        halves = {
            "ffn_key_value": (lw.W_in.T, lw.W_out),
            "W_V_W_O": (lw.W_V.permute(0, 2, 1).reshape(H * dh, d), lw.W_O.reshape(H * dh, d)),
            "W_Q_W_K": (
                lw.W_Q.permute(0, 2, 1).reshape(H * dh, d),
                lw.W_K.permute(0, 2, 1).reshape(H * dh, d),
            ),
        }
        for pair, (x, y) in halves.items():
            tx, ty = (
                numpy_topk(x.double().numpy() @ E.T, 6),
                numpy_topk(y.double().numpy() @ E.T, 6),
            )
            expected = np.mean([len(s & t) / len(s | t) for s, t in zip(tx, ty, strict=True)])
            assert result.similarity[pair][layer] == pytest.approx(expected, abs=1e-12)
    assert set(result.shuffled) == set(SIM_PAIRS)
    assert result.definition == "tgeom"


@pytest.mark.parametrize("definition", ["paper", "tgeom"])
def test_sim_k_of_identical_halves_is_one_and_beats_shuffled(tiny_model, definition: str) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("gpt2").weights()
    same = dataclasses.replace(cw, layers=[dataclasses.replace(lw, W_K=lw.W_Q) for lw in cw.layers])
    result = sim_k(same, k=5, pairs=["W_Q_W_K"], definition=definition)
    assert result.similarity["W_Q_W_K"] == [1.0, 1.0]
    assert all(s < 0.9 for s in result.shuffled["W_Q_W_K"])


@pytest.mark.parametrize("family", list(MLP_MODULES))
def test_mlp_input_equals_the_hf_mlp_input(tiny_model, family: str) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model(family)
    cw = lm.weights()
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(lm.blocks()):
        module = block.get_submodule(MLP_MODULES[family][0])
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, a, layer=layer: seen.__setitem__(layer, a[0])
            )
        )
    try:
        hidden = capture(lm, ids).hidden
    finally:
        for h in handles:
            h.remove()
    bias = attention_bias(cw, None, 2, 9)
    for layer in range(len(cw.layers)):
        torch.testing.assert_close(
            # OPT's block flattens [B, T, d] to [B T, d] before its MLP
            mlp_input(cw, layer, hidden[layer], bias).reshape(seen[layer].shape),
            seen[layer],
            atol=1e-5,
            rtol=1e-4,
        )


def brute_force_r_k(lm, ids: torch.Tensor, k: int, n: int, rank_by: str) -> list[float]:  # type: ignore[no-untyped-def]
    """Per position, per neuron: overlap of python sets; activations read from HF's W_out input."""
    cw = lm.weights()
    acts: dict[int, torch.Tensor] = {}
    handles = [
        block.get_submodule(MLP_MODULES[lm.family][1]).register_forward_pre_hook(
            lambda _m, a, layer=layer: acts.__setitem__(layer, a[0])
        )
        for layer, block in enumerate(lm.blocks())
    ]
    try:
        hidden = capture(lm, ids).hidden.double()
    finally:
        for h in handles:
            h.remove()
    E = cw.W_U.double().numpy()
    out = []
    for layer, lw in enumerate(cw.layers):
        h = hidden[layer + 1]
        normed = cw.final_norm(h.float()).double() if cw.final_norm is not None else h
        lens = numpy_topk(normed.reshape(-1, h.shape[-1]).numpy() @ E.T, k)
        a = acts[layer].double().reshape(-1, acts[layer].shape[-1]).numpy()
        W_out = lw.W_out.double().numpy()
        norms = np.linalg.norm(W_out, axis=1)
        overlaps = []
        for p in range(a.shape[0]):
            score = np.abs(a[p]) * norms if rank_by == "contribution" else a[p]
            for j in np.argsort(-score, kind="stable")[:n]:
                sign = np.sign(a[p, j]) if rank_by == "contribution" else 1.0
                tokens = numpy_topk((sign * W_out[j] @ E.T)[None], k)[0]
                overlaps.append(len(tokens & lens[p]))
        out.append(float(np.mean(overlaps)))
    return out


@pytest.mark.parametrize(
    ("family", "rank_by"),
    [("gpt2", "contribution"), ("llama", "activation"), ("llama", "contribution")],
)
def test_r_k_equals_brute_force_overlaps(tiny_model, family: str, rank_by: str) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (5, 8), generator=torch.Generator().manual_seed(4))
    result = r_k(
        lm, ids, CPU, k=7, n_neurons=4, definition="tgeom", max_positions=None, rank_by=rank_by
    )
    assert result.n_positions == 40 and result.definition == "tgeom"
    expected = brute_force_r_k(lm, ids, 7, 4, rank_by)
    np.testing.assert_allclose(result.overlap["ffn_value"], expected, atol=1e-9)
    assert len(result.shuffled["ffn_value"]) == len(lm.weights().layers)


def test_r_k_shuffle_changes_nothing_when_every_neuron_is_selected(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    ids = torch.randint(4, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    d_mlp = lm.weights().layers[0].W_out.shape[0]
    result = r_k(lm, ids, CPU, k=5, n_neurons=d_mlp, definition="tgeom", rank_by="activation")
    np.testing.assert_allclose(result.shuffled["ffn_value"], result.overlap["ffn_value"])


def test_r_k_rejects_bad_options(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    ids = torch.randint(4, 96, (1, 4))
    with pytest.raises(TgeomError, match=r"valid k are 1\.\.96"):
        r_k(lm, ids, CPU, k=97)
    with pytest.raises(TgeomError, match="rank-by"):
        r_k(lm, ids, CPU, definition="tgeom", rank_by="loudest")
    with pytest.raises(TgeomError, match="tgeom definition of R_k only"):
        r_k(lm, ids, CPU, k=5, rank_by="activation")
    with pytest.raises(TgeomError, match="n-neurons"):
        r_k(lm, ids, CPU, n_neurons=0)
    with pytest.raises(TgeomError, match="32 subheads"):
        r_k(lm, ids, CPU, k=5, n_neurons=40)
    with pytest.raises(TgeomError, match="choose paper or tgeom"):
        r_k(lm, ids, CPU, k=5, definition="official")
    with pytest.raises(TgeomError, match="at least 2"):
        r_k(lm, ids, CPU, k=5, max_positions=1)
    with pytest.raises(TgeomError, match="choose paper or tgeom"):
        sim_k(lm.weights(), k=5, definition="abs")
    with pytest.raises(TgeomError, match="max-pairs = 0"):
        sim_k(lm.weights(), k=5, max_pairs=0)


def test_sim_k_subsamples_pairs_with_a_seed(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("gpt2").weights()
    first = sim_k(cw, k=5, max_pairs=10, seed=2)
    again = sim_k(cw, k=5, max_pairs=10, seed=2)
    assert first.n_pairs == {"ffn_key_value": 10, "W_V_W_O": 10, "W_Q_W_K": 10}
    assert first.similarity == again.similarity and first.shuffled == again.shuffled


# ---------------------------------------------------------------------------------------------
# The official code's definitions ([DAR] repository, SPEC section 3), written as slow obvious
# loops over Hugging Face modules: activations from hooks where the official code took them
# (the output of the key projection; the input of the attention's output projection), block
# outputs from hooks on the blocks, parameters sliced from the HF weight matrices, float64.


def hf_parts(lm):  # type: ignore[no-untyped-def]
    """Per layer: {group: [n, d] float64 rows} from the HF weights, plus E, the final norm,
    and the names of the modules whose output (pre-activations) / input (subhead outputs) the
    official code hooks."""
    hf, c = lm.hf, lm.hf.config
    layers = []
    if lm.family == "gpt2":
        d = c.n_embd
        for block in hf.transformer.h:
            qkv = block.attn.c_attn.weight  # Conv1D [d, 3d]: x @ W
            layers.append(
                {
                    "ffn_key": block.mlp.c_fc.weight.T,
                    "ffn_value": block.mlp.c_proj.weight,
                    "W_Q": qkv[:, :d].T,
                    "W_K": qkv[:, d : 2 * d].T,
                    "W_V": qkv[:, 2 * d :].T,
                    "W_O": block.attn.c_proj.weight,
                }
            )
        return layers, hf.lm_head.weight, hf.transformer.ln_f, ("mlp.c_fc", "attn.c_proj")
    H, KV = c.num_attention_heads, c.num_key_value_heads
    dh = c.hidden_size // H
    for block in hf.model.layers:
        att = block.self_attn

        def per_query_head(w: torch.Tensor) -> torch.Tensor:  # [KV*dh, d] -> [H*dh, d]
            return torch.stack([w[(h // (H // KV)) * dh + j] for h in range(H) for j in range(dh)])

        layers.append(
            {
                "ffn_key": block.mlp.up_proj.weight,
                "ffn_value": block.mlp.down_proj.weight.T,
                "W_Q": att.q_proj.weight,
                "W_K": per_query_head(att.k_proj.weight),
                "W_V": per_query_head(att.v_proj.weight),
                "W_O": att.o_proj.weight.T,
            }
        )
    return layers, hf.lm_head.weight, hf.model.norm, ("mlp.up_proj", "self_attn.o_proj")


def top_set(scores: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def official_r_k(lm, ids, k: int, n: int, max_positions: int, seed: int):  # type: ignore[no-untyped-def]
    """R_k as the official code computes it, position by position with python sets."""
    layers, E, final_norm, (pre_name, attn_name) = hf_parts(lm)
    E64 = E.detach().double().numpy()
    seen: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(lm.blocks()):
        handles += [
            block.get_submodule(pre_name).register_forward_hook(
                lambda _m, _a, out, layer=layer: seen.__setitem__(("pre", layer), out)
            ),
            block.get_submodule(attn_name).register_forward_pre_hook(
                lambda _m, a, layer=layer: seen.__setitem__(("z", layer), a[0])
            ),
            block.register_forward_hook(
                lambda _m, _a, out, layer=layer: seen.__setitem__(
                    ("h", layer), out[0] if isinstance(out, tuple) else out
                )
            ),
        ]
    try:
        with torch.no_grad():
            lm.hf(ids)
    finally:
        for handle in handles:
            handle.remove()
    P = max_positions
    other = other_positions(P, seed).tolist()
    real = {g: [] for g in RK_GROUPS}  # type: ignore[var-annotated]
    base = {g: [] for g in RK_GROUPS}  # type: ignore[var-annotated]
    for layer, parts in enumerate(layers):
        with torch.no_grad():
            normed = final_norm(seen[("h", layer)]).reshape(ids.numel(), -1)[:P]
        B = [top_set(normed[p].double().numpy() @ E64.T, k) for p in range(P)]
        for group in RK_GROUPS:
            act = seen[("pre" if group.startswith("ffn") else "z", layer)]
            act = act.detach().double().reshape(ids.numel(), -1)[:P].numpy()
            vectors = parts[group].detach().double().numpy()

            def union_of_top_tokens(q: int) -> set[int]:
                A: set[int] = set()
                for i in np.argsort(-act[q], kind="stable")[:n]:  # noqa: B023
                    A |= top_set(vectors[i] @ E64.T, k)  # noqa: B023
                return A

            real[group].append(np.mean([len(union_of_top_tokens(p) & B[p]) / k for p in range(P)]))
            base[group].append(
                np.mean([len(union_of_top_tokens(other[p]) & B[p]) / k for p in range(P)])
            )
    return real, base


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_r_k_paper_equals_the_official_formula(tiny_model, family: str) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (4, 8), generator=torch.Generator().manual_seed(6))
    runtime = Runtime(torch.device("cpu"), batch_size=2)  # 20 positions: 2 batches, the 2nd cut
    result = r_k(lm, ids, runtime, k=7, n_neurons=3, max_positions=20, seed=3)
    assert result.definition == "paper" and result.n_positions == 20
    real, base = official_r_k(lm, ids, 7, 3, 20, seed=3)
    for group in RK_GROUPS:
        np.testing.assert_allclose(result.overlap[group], real[group], atol=1e-12)
        np.testing.assert_allclose(result.shuffled[group], base[group], atol=1e-12)
    values = [v for d in (result.overlap, result.shuffled) for vs in d.values() for v in vs]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert "formula" in result.options and result.options["baseline"].startswith("neurons")


def test_r_k_paper_baseline_equals_real_when_every_subhead_is_chosen(tiny_model) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model("gpt2")
    ids = torch.randint(4, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    result = r_k(lm, ids, CPU, k=5, n_neurons=32)  # 4 heads x 8 dims: every subhead
    for group in ("W_V", "W_O"):
        np.testing.assert_allclose(result.shuffled[group], result.overlap[group], atol=1e-12)


def test_other_positions_is_a_seeded_derangement() -> None:
    for n in (2, 3, 17):
        other = other_positions(n, seed=n)
        assert sorted(other.tolist()) == list(range(n))
        assert all(o != p for p, o in enumerate(other.tolist()))
        assert other.tolist() == other_positions(n, seed=n).tolist()


def official_sim_k(pairs_of, E: torch.Tensor, k: int, seed: int) -> tuple[dict, dict]:  # type: ignore[no-untyped-def, type-arg]
    """Sim_k as the official code computes it: sets of the top-k of |x @ E.T|, Jaccard per
    pair; the shuffled baseline with the permutation the module draws (same generator)."""
    E64 = E.detach().double().numpy()
    gen = torch.Generator().manual_seed(seed)
    similarity, shuffled = {}, {}
    for pair, per_layer in pairs_of.items():
        similarity[pair], shuffled[pair] = [], []
        for x, y in per_layer:
            sx = [top_set(np.abs(v @ E64.T), k) for v in x.detach().double().numpy()]
            sy = [top_set(np.abs(v @ E64.T), k) for v in y.detach().double().numpy()]
            perm = torch.randperm(len(sy), generator=gen).tolist()
            jac = [len(a & b) / len(a | b) for a, b in zip(sx, sy, strict=True)]
            similarity[pair].append(np.mean(jac))
            shuffled[pair].append(
                np.mean([len(a & sy[j]) / len(a | sy[j]) for a, j in zip(sx, perm, strict=True)])
            )
    return similarity, shuffled


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sim_k_paper_equals_the_official_formula(tiny_model, family: str) -> None:  # type: ignore[no-untyped-def]
    lm = tiny_model(family)
    layers, E, _, _ = hf_parts(lm)
    result = sim_k(lm.weights(), k=6, seed=4)
    assert result.definition == "paper" and "|x @ E.T|" in result.options["formula"]
    pairs_of = {p: [(parts[a], parts[b]) for parts in layers] for p, (a, b) in SIM_PAIRS.items()}
    similarity, shuffled = official_sim_k(pairs_of, E, 6, seed=4)
    for pair in SIM_PAIRS:
        np.testing.assert_allclose(result.similarity[pair], similarity[pair], atol=1e-12)
        np.testing.assert_allclose(result.shuffled[pair], shuffled[pair], atol=1e-12)


def test_sim_k_paper_is_invariant_to_flipping_the_sign_of_a_vector(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cw = tiny_model("gpt2").weights()
    flipped = dataclasses.replace(
        cw, layers=[dataclasses.replace(lw, W_K=-lw.W_K, W_out=-lw.W_out) for lw in cw.layers]
    )
    pairs = ["W_Q_W_K", "ffn_key_value"]
    a, b = sim_k(cw, k=6, pairs=pairs), sim_k(flipped, k=6, pairs=pairs)
    assert a.similarity == b.similarity and a.shuffled == b.shuffled
    signed = sim_k(flipped, k=6, pairs=pairs, definition="tgeom")
    assert signed.similarity != sim_k(cw, k=6, pairs=pairs, definition="tgeom").similarity
    X, E = torch.randn(5, 32, generator=torch.Generator().manual_seed(8)), cw.W_U
    for exclude in (None, [0, 3]):
        up = topk_tokens(X, E, 7, absolute=True, exclude_ids=exclude)
        down = topk_tokens(-X, E, 7, absolute=True, exclude_ids=exclude)
        assert torch.equal(up[0], down[0]) and torch.equal(up[1], down[1])
        dense = np.abs(X.double().numpy() @ E.double().numpy().T)
        if exclude:
            dense[:, exclude] = -np.inf
        np.testing.assert_array_equal(
            up[0].numpy(), np.argsort(-dense, axis=1, kind="stable")[:, :7]
        )
