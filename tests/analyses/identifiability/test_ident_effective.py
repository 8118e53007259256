"""Effective attention [BRU]: preserves head outputs, null dimension, padding invariance."""

from __future__ import annotations

import pytest
import torch

from tgeom.analyses.identifiability import effective_attention, null_space_dims
from tgeom.analyses.identifiability.effective import effective_attention_batch
from tgeom.capture import capture
from tgeom.linalg.nullspace import default_rtol, left_null_space
from tgeom.models.weights import attention_window


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize(
    "family",
    [
        "bert",
        "llama",
        "gpt2",
        "opt",
        "opt_post_ln",
        "distilbert",
        "gptj",
        "phi",
        "qwen3",
        "olmo2",
        "gemma",
        "gemma2",
        "gemma3_text",
        "bloom",
    ],
)
def test_effective_attention_preserves_head_output(tiny_model, family):
    lm = tiny_model(family)
    # No token twice in a sequence: a RoPE model's layer-0 values repeat with their tokens, which
    # would make a short window's rows rank deficient.
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(92, generator=g)[:20] + 4 for _ in range(2)])
    seqs = effective_attention_batch(lm, ids)
    cw = lm.weights()
    cap = capture(lm, ids, values=True)
    for b, seq in enumerate(seqs):
        for layer, lw in enumerate(cw.layers):
            T = cap.values[layer, b].double() @ lw.W_O.double()  # [H, n, d]
            raw, eff = seq.raw[layer].double() @ T, seq.effective[layer] @ T
            assert (raw - eff).norm() <= 1e-6 * raw.norm()
        # generic random heads: null dim = keys seen - d_head when more keys than d_head (a
        # windowed layer's queries see at most its window: Qwen3's layer 1)
        for layer in range(len(cw.layers)):
            seen = attention_window(lm.summary, layer) or 20
            assert (seq.null_dim[layer] == max(0, seen - lm.summary.d_head)).all()


def test_short_sequences_have_trivial_null_space(tiny_model):
    lm = tiny_model("bert")
    ids = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(1))  # 6 <= d_head 8
    (seq,) = effective_attention_batch(lm, ids)
    assert (seq.null_dim == 0).all()
    assert torch.equal(seq.raw.double(), seq.effective)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_padding_never_changes_results(tiny_model, family):
    lm = tiny_model(family)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(4, 96, (1, 16), generator=g), torch.randint(4, 96, (1, 11), generator=g)
    padded = torch.zeros(2, 16, dtype=torch.long)
    padded[0], padded[1, :11] = a[0], b[0]
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0], mask[1, :11] = 1, 1
    batch = effective_attention_batch(lm, padded, mask)
    single = effective_attention_batch(lm, a) + effective_attention_batch(lm, b)
    for x, y in zip(batch, single, strict=True):
        assert x.raw.shape == y.raw.shape
        assert torch.allclose(x.raw, y.raw, atol=1e-6)
        assert torch.allclose(x.effective, y.effective, atol=1e-5)
        assert torch.equal(x.null_dim, y.null_dim)


def test_summaries_and_null_dims(tiny_model):
    lm = tiny_model("bert")
    ids = torch.randint(4, 96, (3, 14), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, -1] = lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id
    result = effective_attention(lm, ids)
    data = result.to_json()
    assert len(data["heads"]) == lm.summary.n_layers * lm.summary.n_heads
    types = result.token_type_attention
    # Raw attention rows sum to one, so the signed type shares sum to one.
    assert torch.allclose(types["raw_signed"].sum(-1), torch.ones(2, 4, dtype=torch.float64))
    nulls = null_space_dims(lm, ids)
    assert (nulls.null_dim == 14 - 8).all()
    assert result.pearson.shape == (3, 2, 4)


def full_svd_reference(lm, ids, layer, head):
    """A - A N N^T with N from a full float64 SVD of T = V W_O[h] (the definition, slowly).
    Causal heads: row i uses the left null space of the prefix T[:i+1] (keys 0..i)."""
    cap = capture(lm, ids, attentions=True, values=True)
    T = cap.values[layer, 0, head].double() @ lm.weights().layers[layer].W_O[head].double()
    N = left_null_space(T, rtol=default_rtol(*T.shape, torch.float32))  # data stored in float32
    A = cap.attentions[layer, 0, head].double()
    if not lm.summary.is_causal:
        return A - A @ N @ N.T, N.shape[1]
    expected = torch.zeros_like(A)
    for i in range(A.shape[0]):
        Ni = left_null_space(T[: i + 1], rtol=default_rtol(i + 1, T.shape[1], torch.float32))
        a = A[i, : i + 1]
        expected[i, : i + 1] = a - a @ Ni @ Ni.T
    return expected, N.shape[1]


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_effective_attention_equals_full_svd_reference(tiny_model, family):
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (1, 13), generator=torch.Generator().manual_seed(4))
    (seq,) = effective_attention_batch(lm, ids)
    for layer in range(lm.summary.n_layers):
        for head in range(lm.summary.n_heads):
            expected, null_dim = full_svd_reference(lm, ids, layer, head)
            assert torch.allclose(seq.effective[layer, head], expected, atol=1e-9)
            assert int(seq.null_dim[layer, head]) == null_dim


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_effective_attention_is_causal_and_ignores_later_tokens(tiny_model, family):
    """A decoder query sees keys 0..i only: its effective attention puts no weight on later tokens
    and is the same whether or not text follows it (prefix null spaces, not the whole T's)."""
    lm = tiny_model(family)
    ids = torch.randint(4, 96, (1, 21), generator=torch.Generator().manual_seed(6))
    (full,) = effective_attention_batch(lm, ids)
    (prefix,) = effective_attention_batch(lm, ids[:, :13])
    assert full.effective.triu(1).abs().max() == 0
    assert torch.allclose(full.effective[..., :13, :13], prefix.effective, atol=1e-9)
    assert not torch.equal(full.effective, full.raw.double())  # 21 > d_head: something was removed
    d_head = lm.summary.d_head
    assert torch.equal(full.effective[..., :d_head, :], full.raw[..., :d_head, :].double())


def test_rank_deficient_head_has_larger_null_space(tiny_model):
    """A head whose W_O has rank 3 < d_head: null dim = d_s - 3, still matching the reference."""
    lm = tiny_model("roberta")
    cw = lm.weights()
    W = cw.layers[1].W_O
    original = W[2].clone()
    U, s, Vh = torch.linalg.svd(original, full_matrices=False)
    try:
        W[2] = (U[:, :3] * s[:3]) @ Vh[:3]
        ids = torch.randint(4, 96, (1, 12), generator=torch.Generator().manual_seed(5))
        (seq,) = effective_attention_batch(lm, ids)
        assert int(seq.null_dim[1, 2]) == 12 - 3
        expected, _ = full_svd_reference(lm, ids, 1, 2)
        assert torch.allclose(seq.effective[1, 2], expected, atol=1e-9)
    finally:
        W[2] = original


@pytest.mark.slow
def test_effective_attention_equals_full_svd_reference_on_minilm(minilm):
    texts = [
        "The cat sat on the mat while the dog slept near the warm fire in the old house.",
        "Short one.",
        "Rivers carry water from the mountains to the sea, shaping valleys, deltas and plains "
        "over thousands of years, and people have settled along them since the first farms.",
    ]
    batch = minilm.tokenizer(texts, return_tensors="pt", padding=True)
    seqs = effective_attention_batch(minilm, batch["input_ids"], batch["attention_mask"])
    for s, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        ids = batch["input_ids"][s : s + 1, :n]
        for layer in (0, minilm.summary.n_layers - 1):
            for head in (0, minilm.summary.n_heads - 1):
                expected, null_dim = full_svd_reference(minilm, ids, layer, head)
                assert torch.allclose(seqs[s].effective[layer, head], expected, atol=1e-6)
                assert int(seqs[s].null_dim[layer, head]) == null_dim == max(0, n - 32)


@pytest.mark.slow
def test_causal_effective_attention_equals_per_prefix_svd_reference_on_smollm2(smollm2):
    """A decoder with RoPE and GQA; a repeated phrase makes layer-0 values repeat (x carries no
    position), so short prefixes are rank deficient too; 80 tokens exceed d_head = 64."""
    text = "the cat and the dog and the cat " * 4 + "sat on the mat while the rain fell " * 6
    ids = smollm2.tokenizer(text, return_tensors="pt")["input_ids"][:, :80]
    (seq,) = effective_attention_batch(smollm2, ids)
    L, H = smollm2.summary.n_layers, smollm2.summary.n_heads
    for layer, head in ((0, 0), (0, H - 1), (L // 2, 4), (L - 1, 1)):
        expected, null_dim = full_svd_reference(smollm2, ids, layer, head)
        assert torch.allclose(seq.effective[layer, head], expected, atol=1e-6)
        assert int(seq.null_dim[layer, head]) == null_dim
    assert seq.effective.triu(1).abs().max() == 0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_survey_equals_the_whole_effective_attention_result(tiny_model, family):
    """Batch by batch (matrices dropped as it goes) the survey gives the same per-sequence tables
    and token-type sums as one EffectiveAttentionResult over every sequence."""
    from tgeom.analyses.identifiability import effective_attention
    from tgeom.analyses.identifiability.survey import attention_survey
    from tgeom.capture.distributed import Shard
    from tgeom.runtime import Runtime

    lm = tiny_model(family)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(4, 96, (5, 17), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate([17, 9, 12, 17, 5]):
        mask[row, n:] = 0
    whole = effective_attention(lm, ids, mask, Runtime(torch.device("cpu"), batch_size=5))
    nulls, summary = attention_survey(
        lm, ids, mask, Runtime(torch.device("cpu"), batch_size=2), Shard()
    )
    assert torch.equal(nulls.null_dim, torch.stack([s.null_dim for s in whole.sequences]))
    assert nulls.lengths == whole.lengths == [17, 9, 12, 17, 5]
    torch.testing.assert_close(
        summary.pearson.values, whole.pearson.values, rtol=0, atol=1e-9, equal_nan=True
    )
    for name, value in whole.token_type_attention.items():
        torch.testing.assert_close(summary.token_type_attention[name], value, rtol=0, atol=1e-9)
    assert summary.to_json().keys() == whole.to_json(matrices_of=None).keys()


@pytest.mark.slow
def test_causal_effective_attention_on_real_windows_equals_the_reference_in_layers_0_and_1(
    smollm2,
):
    """Two 128-token windows of the built-in corpus in one batch: every head of layers 0 (values
    repeat with the tokens) and 1 (heads whose long prefixes lose rank at the tolerance, so the
    eigendecomposition fallback runs) equals the per-prefix SVD definition."""
    from tgeom.corpus import load_corpus, make_windows

    windows = make_windows(load_corpus("builtin"), smollm2.tokenizer, 128, max_windows_per_topic=1)
    ids = windows.token_ids[:2]
    seqs = effective_attention_batch(smollm2, ids)
    for b, seq in enumerate(seqs):
        for layer in (0, 1):
            for head in range(smollm2.summary.n_heads) if b == 0 else (0, 8):
                expected, null_dim = full_svd_reference(smollm2, ids[b : b + 1], layer, head)
                assert torch.allclose(seq.effective[layer, head], expected, atol=1e-6)
                assert int(seq.null_dim[layer, head]) == null_dim


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_an_error_inside_a_layer_reaches_the_caller(tiny_model, family):
    """On the CPU causal layers are projected on worker threads: an error there (here NaN
    values from a corrupted W_V) still reaches the caller as the one-line error, and the next
    call works again."""
    from tgeom.errors import TgeomError

    lm = tiny_model(family)
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(12))
    module = lm.adapter.value_projection(list(lm.blocks())[1], lm.summary)[0]
    saved = module.weight.detach().clone()
    try:
        with torch.no_grad():
            module.weight[0, 0] = float("nan")
        with pytest.raises(TgeomError, match="NaN or inf"):
            effective_attention_batch(lm, ids)
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)
    (seq, _) = effective_attention_batch(lm, ids)
    assert torch.isfinite(seq.effective).all()


def test_effective_attention_under_inference_mode_equals_the_default(tiny_model):
    """Callers may run under torch.inference_mode; the layers projected on the worker threads
    must run there too (in-place work on inference tensors is refused outside it)."""
    lm = tiny_model("llama")
    ids = torch.randint(4, 96, (2, 15), generator=torch.Generator().manual_seed(13))
    expected = effective_attention_batch(lm, ids)
    with torch.inference_mode():
        got = effective_attention_batch(lm, ids)
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(x.effective, y.effective) and torch.equal(x.null_dim, y.null_dim)


def test_the_callers_threads_are_restored_after_a_causal_run(tiny_model):
    """The workers run one intra-op thread each; the caller keeps its own number, after a run
    and after an error on a worker."""
    from tgeom.errors import TgeomError

    lm = tiny_model("llama")
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(14))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    module = lm.adapter.value_projection(next(iter(lm.blocks())), lm.summary)[0]
    saved = module.weight.detach().clone()
    try:
        effective_attention_batch(lm, ids)
        assert torch.get_num_threads() == 2
        with torch.no_grad():
            module.weight[0, 0] = float("nan")
        with pytest.raises(TgeomError, match="NaN or inf"):
            effective_attention_batch(lm, ids)
        assert torch.get_num_threads() == 2
    finally:
        with torch.no_grad():
            module.weight.copy_(saved)
        torch.set_num_threads(threads)


def test_the_worker_threads_leave_the_callers_threads_alone(monkeypatch):
    """Each worker runs one intra-op thread; the caller and threads started later keep the
    caller's setting (a worker with its own multi-threaded OpenMP team slowed the caller's later
    forward passes by a quarter). Two fresh workers, with the caller at 2 threads."""
    import threading

    from tgeom.analyses.identifiability import effective

    monkeypatch.setattr(effective, "_WORKERS", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    workers = None
    try:
        workers = effective._workers(2)
        both = threading.Barrier(2, timeout=10)  # one task on each thread

        def report() -> tuple[str, int]:
            both.wait()
            return threading.current_thread().name, torch.get_num_threads()

        seen_by_workers = [job.result() for job in [workers.submit(report) for _ in range(2)]]
        assert len({name for name, _ in seen_by_workers}) == 2
        assert [count for _, count in seen_by_workers] == [1, 1]
        assert torch.get_num_threads() == 2
        seen = []

        def fresh() -> None:
            torch.ones(8).add_(1)  # a thread's first op sets its intra-op threads to the default
            seen.append(torch.get_num_threads())

        thread = threading.Thread(target=fresh)
        thread.start()
        thread.join()
        assert seen == [2]
    finally:
        if workers is not None:
            workers.shutdown()
        torch.set_num_threads(threads)


def test_a_fresh_process_keeps_its_threads_after_the_worker_starts():
    """The worker may start before the caller's first op (a fresh CLI run): the caller still
    gets its own default, not the worker's one thread."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from tgeom.analyses.identifiability.effective import _workers\n"
        "workers = _workers(1)\n"
        "print(torch.get_num_threads(), workers.submit(torch.get_num_threads).result())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["2", "1"]


def test_the_layers_run_at_once_one_worker_per_thread():
    """With the caller at 4 threads, 4 jobs run at once on 4 workers of one intra-op thread
    each (a barrier only all 4 together pass); the caller's own setting is left alone, and the
    first job's error is raised once every job is done."""
    import threading

    from tgeom.analyses.identifiability.effective import _project_on_workers

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        together = threading.Barrier(4, timeout=10)
        seen: list[tuple[str, int]] = []

        def job() -> None:
            together.wait()
            seen.append((threading.current_thread().name, torch.get_num_threads()))

        _project_on_workers([job] * 4)
        assert len({name for name, _ in seen}) == 4 and {count for _, count in seen} == {1}
        assert torch.get_num_threads() == 4
        done: list[int] = []

        def fails(k: int) -> None:
            if k in (1, 2):
                raise ValueError(f"job {k}")
            done.append(k)

        with pytest.raises(ValueError, match="job 1"):
            _project_on_workers([lambda k=k: fails(k) for k in range(4)])
        assert sorted(done) == [0, 3]
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_two_workers_give_the_results_of_one(tiny_model):
    """With the caller at 4 threads four workers project layers at once; every result equals
    the one-worker run (caller at 1 thread)."""
    lm = tiny_model("llama")
    ids = torch.randint(4, 96, (3, 16), generator=torch.Generator().manual_seed(15))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = effective_attention_batch(lm, ids)
        torch.set_num_threads(4)
        two = effective_attention_batch(lm, ids)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(two, one, strict=True):
        assert torch.allclose(x.effective, y.effective, rtol=0, atol=1e-12)
        assert torch.equal(x.raw, y.raw) and torch.equal(x.null_dim, y.null_dim)


def test_a_forked_child_gets_workers_of_its_own():
    """A child forked after the workers started has none of their threads: it must start its
    own instead of queueing work for threads that do not exist (which would wait forever)."""
    import multiprocessing

    from tgeom.analyses.identifiability.effective import _workers

    assert _workers(1).submit(lambda: 1).result() == 1  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(_one_job_on_fresh_workers).get(timeout=60) == 2


def _one_job_on_fresh_workers() -> int:
    from tgeom.analyses.identifiability.effective import _workers

    return _workers(1).submit(lambda: 2).result(timeout=30)
