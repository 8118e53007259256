"""Every tiny family through the CLI: weights topk, geometry collect + measure, attention
effective (A_eff T = A T, and every row equal to the per-query SVD definition on the keys the
query sees: windowed layers their window's) and identify tokens, each checked against a property
or a brute force (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tgeom.analyses.embedding.filters import token_mask
from tgeom.capture import capture
from tgeom.cli import app
from tgeom.linalg.nullspace import default_rtol, left_null_space
from tgeom.models.weights import attention_window
from tiny_models import FAMILIES

runner = CliRunner()
TEXT = "Tokens read in context, long enough to pass d_head."


def invoke(out: Path, *args: str, out_flag: bool = True) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, [*args, "--out", str(out)] if out_flag else list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads((out / "results.json").read_text())


def dense_qk(lw, head: int, E: torch.Tensor) -> torch.Tensor:
    """``[V, V]`` float64: ``F_Q F_K^T`` with ``F = E W[head]``, or under QK-norm each token's
    projection over the RMS of its head (scope 'head') or of all heads (scope 'all'), times
    the gain (written out here, not through QKNorm)."""

    def factor(W: torch.Tensor, norm) -> torch.Tensor:  # type: ignore[no-untyped-def]
        x = torch.einsum("vd,hde->vhe", E, W.double())
        if norm is not None:
            dims = (-1,) if norm.scope == "head" else (1, 2)
            x = norm.weight.double() * x / (x.pow(2).mean(dims, keepdim=True) + norm.eps).sqrt()
        return x[:, head]

    return factor(lw.W_Q, lw.q_norm) @ factor(lw.W_K, lw.k_norm).T


def per_query_definition(
    A: torch.Tensor, T: torch.Tensor, causal: bool, window: int
) -> torch.Tensor:
    """[BRU]'s effective attention, slowly: each query's row minus its part in the left null
    space (float64 SVD) of the rows of ``T`` it sees: every key (encoders), keys ``0..i``
    (decoders) or the last ``window`` of them (sliding-window layers); zero elsewhere."""
    n, d = T.shape
    expected = torch.zeros_like(A)
    for i in range(n):
        lo = max(0, i - window + 1) if window else 0
        hi = i + 1 if causal else n
        N = left_null_space(T[lo:hi], rtol=default_rtol(hi - lo, d, torch.float32))
        expected[i, lo:hi] = A[i, lo:hi] - A[i, lo:hi] @ N @ N.T
    return expected


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one thread avoids OpenMP overhead on a shared machine (identify tokens'
    MLP fits took 84 s with the default threads, 3 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("smoke-corpus")
    for topic, text in {"a": "apples and pears, ", "b": "0123 + 4567 = 9 "}.items():
        (root / topic).mkdir()
        (root / topic / "t.txt").write_text(text * 60)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_main_commands(tiny_model, tiny_model_dir, corpus, tmp_path, family):
    lm, model = tiny_model(family), str(tiny_model_dir(family))
    cw = lm.weights()

    topk = invoke(
        tmp_path / "topk", "weights", "topk", model, "--block", "1", "--head", "2",
        "--circuit", "qk", "--k", "10",
    )  # fmt: skip
    dense = dense_qk(cw.layers[1], 2, cw.W_U.double())
    mask = token_mask(lm)
    dense[~mask] = -torch.inf
    dense[:, ~mask] = -torch.inf
    order = sorted(
        ((-float(dense[i, j]), i, j) for i in range(len(dense)) for j in range(len(dense))),
    )[:10]
    assert [(p["row"], p["col"]) for p in topk["pairs"]] == [(i, j) for _, i, j in order]
    assert (topk["qk_norm_note"] is None) == (cw.layers[1].q_norm is None)

    geometry = tmp_path / "geometry"
    collect = ["geometry", "collect", model, str(corpus), "--seq-len", "12"]
    invoke(geometry, *collect, "--max-windows-per-topic", "4")
    measured = invoke(geometry, "geometry", "measure", str(geometry), out_flag=False)
    for row in measured["by_hidden"]:
        shares = row["var_share_pos"] + row["var_share_ctx"] + row["var_share_resid"]
        assert shares == pytest.approx(1.0, abs=1e-9)

    effective = invoke(tmp_path / "eff", "attention", "effective", model, "--text", TEXT)
    ids = lm.encode_text(TEXT, min_tokens=2)
    values = capture(lm, ids, values=True).values  # [L, 1, H, n, dh]
    assert len(effective["heads"]) == lm.summary.n_layers * lm.summary.n_heads
    for entry in effective["heads"]:
        layer, h = entry["block"], entry["head"]
        T = values[layer, 0, h].double() @ cw.layers[layer].W_O[h].double()  # [n, d]
        A = torch.tensor(entry["raw"], dtype=torch.float64)
        A_eff = torch.tensor(entry["effective"], dtype=torch.float64)
        assert float((A_eff @ T - A @ T).norm()) <= 1e-6 * float((A @ T).norm())
        expected = per_query_definition(
            A, T, lm.summary.is_causal, attention_window(cw.summary, layer)
        )
        assert float((A_eff - expected).abs().max()) <= 1e-8, (layer, h)

    tokens = invoke(
        tmp_path / "tokens", "identify", "tokens", model, "--corpus", str(corpus),
        "--seq-len", "12", "--max-windows-per-topic", "6",
    )  # fmt: skip
    rates = tokens["by_hidden"]
    assert {r["hidden"] for r in rates} == set(range(lm.summary.n_layers + 1))
    assert all(0.0 <= r["rate"] <= 1.0 for r in rates)
    assert [r["rate"] for r in rates if r["hidden"] == 0 and r["g"] == "identity"] == [1.0, 1.0]
