"""Projections, filters and the logit lens, against brute force and the model's own outputs."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from tgeom.analyses.embedding.filters import (
    ASCII_TEST,
    corpus_frequent_ids,
    frequent_token_ids,
    mask_from_strings,
    token_mask,
    vocabulary_subset,
)
from tgeom.analyses.embedding.interaction import head_top_pairs
from tgeom.analyses.embedding.lens import lens_logits, logit_lens
from tgeom.analyses.embedding.projection import (
    neuron_vector,
    preceding_norm,
    project_parameter,
    project_vector,
    subhead_vector,
)
from tgeom.capture import capture
from tgeom.corpus import load_corpus
from tgeom.errors import TgeomError


def brute_force(x, E, k, mask=None, bottom=False):
    scores = (x.double() @ E.double().T).tolist()
    ids = [i for i in range(E.shape[0]) if mask is None or mask[i]]
    ids.sort(key=lambda i: (scores[i] if bottom else -scores[i], i))
    return ids[:k], [scores[i] for i in ids[:k]]


@pytest.mark.parametrize("bottom", [False, True])
@pytest.mark.parametrize("k", [1, 7, 500])
def test_projection_equals_brute_force_sort_with_mask(bottom, k):
    g = torch.Generator().manual_seed(k)
    E, x = torch.randn(60, 8, generator=g), torch.randn(8, generator=g)
    mask = torch.rand(60, generator=g) < 0.5
    got = project_vector(x, E, k, mask=mask, bottom=bottom)
    want_ids, want_scores = brute_force(x, E, k, mask, bottom)
    assert got.token_ids[0].tolist() == want_ids
    assert got.scores[0].double().tolist() == pytest.approx(want_scores, rel=1e-5)


def test_projection_ties_go_to_the_smaller_id_and_batches_match_rows():
    E = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    xs = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    got = project_vector(xs, E, 3, vocab=["a", "b", "c", "d", "e"])
    assert got.token_ids.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert got.tokens[0] == ["b", "d", "a"]
    assert got.records(0)[0] == {"rank": 0, "token_id": 1, "token": "b", "score": 2.0}


def test_projection_returns_every_allowed_token_when_k_exceeds_them():
    E, x = torch.randn(10, 3), torch.randn(3)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5]] = True
    got = project_vector(x, E, 5, mask=mask)
    assert sorted(got.token_ids[0].tolist()) == [2, 5]


def test_filters_mask_the_requested_tokens():
    vocab = ["<s>", " the", "##ing", "é", "42", " $", "Cat", "a b"]
    mask = mask_from_strings(vocab, special=[0])
    assert mask.tolist() == [False] + [True] * 7
    assert mask_from_strings(vocab, ascii_only=True).tolist() == [
        True, True, True, False, True, True, True, True,
    ]  # fmt: skip
    assert mask_from_strings(vocab, special=[0], alpha_only=True).tolist() == [
        False, True, True, True, False, False, True, False,
    ]  # fmt: skip
    mask = mask_from_strings(vocab, exclude_ids=[1], include_ids=[1, 2, 6])
    assert mask.nonzero().squeeze(1).tolist() == [2, 6]


def test_filters_raise_when_nothing_survives_or_ids_are_out_of_range():
    with pytest.raises(TgeomError, match="leave no token"):
        mask_from_strings(["é", "ü"], ascii_only=True)
    with pytest.raises(TgeomError, match="out of range"):
        mask_from_strings(["a", "b"], exclude_ids=[5])


def test_token_mask_drops_the_tokenizer_special_tokens(tiny_model):
    lm = tiny_model("gpt2")
    mask = token_mask(lm)
    assert mask.shape == (lm.summary.vocab_size,)
    assert not mask[lm.special_token_ids()].any()
    assert int(mask.sum()) == lm.summary.vocab_size - len(lm.special_token_ids())


@pytest.mark.slow
def test_every_token_the_tokenizer_flags_special_is_dropped_on_real_models(smollm2, minilm):
    # SmolLM2's all_special_ids is [0, 1, 2]; ids 3-16 (<repo_name>, <filename>, <jupyter_*>...)
    # are flagged special only in the added-tokens table.
    added = smollm2.tokenizer.added_tokens_decoder
    assert smollm2.special_token_ids() == sorted(i for i, t in added.items() if t.special)
    assert smollm2.special_token_ids() == list(range(17))
    mask = token_mask(smollm2)
    assert not mask[:17].any() and bool(mask[17:].all())
    assert minilm.special_token_ids() == [0, 100, 101, 102, 103]  # [PAD] [UNK] [CLS] [SEP] [MASK]
    assert int(token_mask(minilm).sum()) == 30522 - 5
    # <filename> (id 6) was the top OV pair of layer 20, head 3 with the special tokens kept.
    pairs = head_top_pairs(smollm2.weights(), 20, 3, "ov", 3, row_mask=mask, col_mask=mask)
    assert smollm2.vocab_strings[int(pairs.rows[0])] != "<filename>"
    assert int(pairs.rows.min()) >= 17 and int(pairs.cols.min()) >= 17


@pytest.mark.slow
def test_ascii_only_tests_the_decoded_text_not_the_raw_vocabulary_entry(smollm2):
    assert ASCII_TEST == "decoded text"
    tok = smollm2.tokenizer
    raw = tok.convert_ids_to_tokens(list(range(len(tok))))
    decoded = smollm2.vocab_strings
    mask = token_mask(smollm2, ascii_only=True, drop_special=False)
    assert mask[: len(tok)].tolist() == [text.isascii() for text in decoded[: len(tok)]]
    newline = tok.convert_tokens_to_ids("Ċ")
    assert decoded[newline] == "\n" and bool(mask[newline])  # raw entry 'Ċ' is not ASCII
    # the official code's raw test (entry.strip('Ġ').isascii()) would drop these kept tokens
    differ = [i for i, entry in enumerate(raw) if bool(mask[i]) != entry.strip("Ġ").isascii()]
    assert newline in differ and all(bool(mask[i]) for i in differ)


def test_frequent_token_ids_counts_the_windows():
    windows = SimpleNamespace(token_ids=torch.tensor([[5, 3, 3, 9], [3, 5, 7, 7]]))
    assert frequent_token_ids(windows, 3).tolist() == [3, 5, 7]  # 7 and 5 tie: smaller id first
    assert frequent_token_ids(windows, 10).tolist() == [3, 5, 7, 9]
    with pytest.raises(TgeomError):
        frequent_token_ids(windows, 0)


TEXTS = [f"doc {i}: " + "the cat sat on the mat; " * (i % 3) + "zzz!" * i for i in range(20)]


def write_corpus(folder):
    """A JSONL corpus of 20 short documents (more than one tokenising batch)."""
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return path


def char_ranking(texts):
    """Brute force for the tiny character-level tokenizer: id = code point - 32 + 4, ranked by
    count (descending), then id."""
    counts = Counter(ord(ch) - 32 + 4 for text in texts for ch in text)
    return sorted(counts, key=lambda i: (-counts[i], i))


def test_corpus_frequent_ids_count_every_token_of_every_document(tiny_model, tmp_path):
    lm = tiny_model("gpt2")
    path = write_corpus(tmp_path)
    want = char_ranking(TEXTS)
    assert corpus_frequent_ids(lm, str(path), 7).tolist() == want[:7]
    assert corpus_frequent_ids(lm.tokenizer, load_corpus(str(path)), 500).tolist() == want
    with pytest.raises(TgeomError, match="positive integer"):
        corpus_frequent_ids(lm, str(path), 0)


def test_vocabulary_subset_is_the_frequent_tokens_minus_the_filtered(tiny_model, tmp_path):
    lm = tiny_model("gpt2")
    path = write_corpus(tmp_path)
    subset = vocabulary_subset(lm, frequent=10, corpus=str(path), alpha_only=True)
    want = [i for i in char_ranking(TEXTS)[:10] if lm.vocab_strings[i].isalpha()]
    assert subset.mask.nonzero().squeeze(1).tolist() == sorted(want)
    assert subset.description == (
        f"10 most frequent tokens of corpus {str(path)!r} (of 96), special tokens dropped, "
        f"alphabetic only: {len(want)} tokens"
    )
    record = subset.to_json()
    assert (record["frequent"], record["n_frequent"], record["n_tokens"]) == (10, 10, len(want))
    full = vocabulary_subset(lm)
    assert full.description == "full vocabulary (96) minus 4 special: 92 tokens"
    assert bool(torch.equal(full.mask, token_mask(lm))) and full.to_json()["frequent"] is None
    few = vocabulary_subset(lm, frequent=1000, corpus=str(path), drop_special=False)
    n = len(char_ranking(TEXTS))
    assert few.description.startswith(f"all {n} (< 1000) frequent tokens of corpus")


def test_neuron_and_subhead_vectors_are_the_canonical_columns_and_rows(tiny_model):
    cw = tiny_model("gpt2").weights()
    lw = cw.layers[1]
    assert torch.equal(neuron_vector(cw, 1, 4, "key"), lw.W_in[:, 4])
    assert torch.equal(neuron_vector(cw, 1, 4, "value"), lw.W_out[4])
    folded = neuron_vector(cw, 1, 4, "key", fold_norm=True)
    assert torch.allclose(folded, lw.W_in[:, 4] * lw.ln_mlp.weight)
    assert torch.equal(subhead_vector(cw, 1, 2, "k", 3), lw.W_K[2, :, 3])
    assert torch.equal(subhead_vector(cw, 1, 2, "o", 3), lw.W_O[2, 3])
    # Writing vectors ignore fold_norm.
    assert torch.equal(subhead_vector(cw, 1, 2, "o", 3, fold_norm=True), lw.W_O[2, 3])
    with pytest.raises(TgeomError, match="valid neurons are"):
        neuron_vector(cw, 1, 10_000, "key")


def test_post_ln_attention_reads_the_previous_layers_norm(tiny_model):
    cw = tiny_model("bert").weights()
    assert preceding_norm(cw, 0, "attn") is cw.embed_norm
    assert preceding_norm(cw, 1, "attn") is cw.layers[0].ln_mlp
    assert preceding_norm(cw, 1, "mlp") is cw.layers[1].ln_attn


def test_project_parameter_matches_projecting_the_vector(tiny_model):
    lm = tiny_model("llama")
    cw = lm.weights()
    result = project_parameter(lm, block=0, head=1, subhead="v", index=2, k=6, embedding="in")
    want, _ = brute_force(cw.layers[0].W_V[1, :, 2], cw.W_E, 6)
    assert result.embedding == "W_E"
    assert result.top.token_ids[0].tolist() == want
    assert result.top.tokens[0] == lm.token_strings(want)
    assert result.to_json()["bottom"][0]["score"] <= result.to_json()["top"][-1]["score"]


def test_logit_lens_of_the_last_layer_is_the_models_own_logits(tiny_model):
    lm = tiny_model("gpt2")
    result = logit_lens(lm, "Hello, world!", k=3)
    ids = result.token_ids[None]
    logits = lm.hf(input_ids=ids).logits[0]
    assert result.top_ids.shape == (lm.summary.n_layers + 1, ids.shape[1], 3)
    assert torch.equal(result.top_ids[-1, :, 0], logits.argmax(-1))
    torch.testing.assert_close(result.top_scores[-1, :, 0], logits.max(-1).values)


def test_logit_lens_soft_caps_where_the_model_does(tiny_model):
    """Tiny Gemma 2 caps its logits at 3 (uncapped they reach ~8): the last hidden state's lens
    scores are the model's own capped logits, every score lies within the cap, and results
    record it; a model without a cap records None."""
    lm = tiny_model("gemma2")
    result = logit_lens(lm, "Hello, world!", k=5)
    ids = result.token_ids[None]
    logits = lm.hf(input_ids=ids).logits[0]
    top = logits.topk(5, dim=-1)
    assert torch.equal(result.top_ids[-1], top.indices)
    torch.testing.assert_close(result.top_scores[-1], top.values)
    assert float(result.top_scores.abs().max()) < 3.0 == result.to_json()["final_logit_softcap"]
    uncapped = lens_logits(
        dataclasses.replace(
            lm.weights(), summary=dataclasses.replace(lm.summary, final_logit_softcap=None)
        ),
        capture(lm, ids).hidden[-1, 0],
    )
    assert float(uncapped.max()) > 3.0  # the cap acts
    assert torch.equal(uncapped.topk(5, dim=-1).indices, top.indices)  # monotone: same ranking
    assert logit_lens(tiny_model("gpt2"), "Hi", k=1).to_json()["final_logit_softcap"] is None


def test_lens_logits_apply_the_final_norm(tiny_model):
    cw = tiny_model("llama").weights()
    h = torch.randn(3, cw.W_U.shape[1])
    torch.testing.assert_close(lens_logits(cw, h), cw.final_norm(h) @ cw.W_U.T)


@pytest.mark.slow
def test_smollm2_logit_lens_last_layer_reproduces_next_token_predictions(smollm2):
    result = logit_lens(smollm2, "The capital of France is Paris, and the capital of Italy is")
    ids = result.token_ids[None].to(smollm2.device)
    with torch.no_grad():
        predicted = smollm2.hf(input_ids=ids).logits[0].argmax(-1).cpu()
    agreement = (result.top_ids[-1, :, 0] == predicted).float().mean()
    assert float(agreement) == 1.0
