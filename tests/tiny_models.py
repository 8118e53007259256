"""Tiny random models of every supported family, built from transformers configs in-process."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 96  # tokens 0..95; the tiny tokenizer maps characters to ids

TINY_CONFIGS = {
    "gpt2": (
        "GPT2LMHeadModel",
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=48,
            bos_token_id=1,
            eos_token_id=2,  # the tiny tokenizer's <s> and </s>
        ),
    ),
    "bert": (
        "BertModel",
        transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
        ),
    ),
    "roberta": (
        "RobertaForMaskedLM",
        transformers.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=66,
            pad_token_id=1,
        ),
    ),
    "distilbert": (
        "DistilBertForMaskedLM",
        transformers.DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=48,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    "llama": (
        "LlamaForCausalLM",
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=48,
            max_position_embeddings=64,
            use_sliding_window=True,  # layers >= max_window_layers see their last 3 keys
            sliding_window=3,
            max_window_layers=1,
        ),
    ),
    "mistral": (  # every layer windowed over 4 keys; d_head 16 > 4: no window has a null space
        "MistralForCausalLM",
        transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=48,
            max_position_embeddings=64,
            sliding_window=4,
        ),
    ),
    "qwen3": (  # QK-norm per head (random gains), d_head 16 != hidden / heads, grouped KV;
        # layer 1 windowed over 4 keys (QK-norm and windows together)
        "Qwen3ForCausalLM",
        transformers.Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=48,
            max_position_embeddings=64,
            initializer_range=0.2,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "olmo2": (  # QK-norm over all heads at once (random gains), norms on sublayer outputs
        "Olmo2ForCausalLM",
        transformers.Olmo2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            initializer_range=0.2,
            attention_bias=True,  # QK-norm acts on the projection plus its bias
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "neox": (
        "GPTNeoXForCausalLM",
        transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            rotary_pct=0.5,
            use_parallel_residual=True,
        ),
    ),
    "neox_sequential": (
        "GPTNeoXForCausalLM",
        transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            rotary_pct=0.25,
            use_parallel_residual=False,
        ),
    ),
    "opt": (  # OPT-125m's layout: pre-LN, no embedding projection
        "OPTForCausalLM",
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            max_position_embeddings=64,
            init_std=0.2,  # attention far from uniform, so position and layout errors show
            do_layer_norm_before=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "opt_post_ln": (  # OPT-350m's layout: post-LN, project_in/out around a smaller embedding
        "OPTForCausalLM",
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            word_embed_proj_dim=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            max_position_embeddings=64,
            init_std=0.2,  # attention far from uniform, so position and layout errors show
            do_layer_norm_before=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gptj": (  # rotary on 4 of each head's 8 coordinates, interleaved pairs
        "GPTJForCausalLM",
        transformers.GPTJConfig(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=48,
            n_positions=64,
            rotary_dim=4,
            initializer_range=0.2,  # scores large enough that a wrong rotary pairing shows
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "phi": (  # partial rotary (half of each head), grouped KV heads, biases everywhere
        "PhiForCausalLM",
        transformers.PhiConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            partial_rotary_factor=0.5,
            initializer_range=0.2,  # scores large enough that a wrong rotary layout shows
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gpt_neo": (  # layer 0 global, layer 1 local over 10 keys (> d_head 8); no 1/sqrt(dh)
        "GPTNeoForCausalLM",
        transformers.GPTNeoConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 1]],
            window_size=10,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "phi3": (  # fused qkv/gate_up, partial rotary, grouped KV heads, every layer windowed (5)
        "Phi3ForCausalLM",
        transformers.Phi3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            original_max_position_embeddings=64,
            partial_rotary_factor=0.5,
            sliding_window=5,
            initializer_range=0.2,  # scores large enough that a wrong rotary layout shows
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gemma": (  # embeddings times sqrt(d), RMSNorm gains 1 + w, GeGLU, one KV head
        "GemmaForCausalLM",
        transformers.GemmaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_size=48,
            max_position_embeddings=64,
            initializer_range=0.2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gemma2": (  # sandwich norms; layer 0 windowed over 4 keys; scores capped at 2, logits at 3
        "Gemma2ForCausalLM",
        transformers.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            max_position_embeddings=64,
            initializer_range=0.2,  # scores and logits well beyond their caps
            query_pre_attn_scalar=16,  # scale 1/4, not 1/sqrt(d_head)
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gemma3_text": (  # Gemma 2's layout + QK-norm per head; local RoPE base 100, global 10^4
        "Gemma3ForCausalLM",
        transformers.Gemma3TextConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            max_position_embeddings=64,
            initializer_range=0.2,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            final_logit_softcapping=3.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "bloom": (  # ALiBi (6 heads: the slopes of 4, then 2 of 8's), LN after the embeddings
        "BloomForCausalLM",
        transformers.BloomConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            n_layer=2,
            n_head=6,  # d_head 8
            seq_length=64,
            initializer_range=0.2,  # scores large enough that a wrong bias shows
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}

FAMILIES = tuple(TINY_CONFIGS)

XSS_TOKENS = ("<script>alert(1)</script>", '"><img src=x onerror="window.__xss=1">')


def build_tiny_tokenizer(folder: Path, hostile: bool = False) -> None:
    """A character-level tokenizer over printable ASCII (ids 4..95), saved into ``folder``.

    ``hostile``: the last two ids become HTML/script injection strings (for report tests).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    chars = [chr(c) for c in range(32, 32 + VOCAB - len(specials))]
    if hostile:
        chars[-len(XSS_TOKENS) :] = XSS_TOKENS
    vocab = {**specials, **{ch: i + len(specials) for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(folder)


def windowed_mistral(window: int, head_dim: int) -> tuple[str, transformers.PretrainedConfig]:
    """A tiny Mistral (``save_tiny_model(..., spec=)``) windowing both layers over ``window`` keys,
    with ``head_dim`` per head (small: windows longer than ``head_dim`` have null spaces)."""
    return (
        "MistralForCausalLM",
        transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            intermediate_size=48,
            max_position_embeddings=64,
            sliding_window=window,
        ),
    )


def save_tiny_model(
    family: str,
    folder: Path,
    seed: int = 0,
    hostile: bool = False,
    spec: tuple[str, transformers.PretrainedConfig] | None = None,
) -> Path:
    """Build the tiny ``family`` model with random weights (seeded) and save it to ``folder``.

    ``hostile``: the two injection tokens get large embeddings, so they top the QK/OV atlas.
    ``spec``: ``(class name, config)`` to build instead of the family's (e.g.
    :func:`windowed_mistral`).
    """
    class_name, config = spec or TINY_CONFIGS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config)
    # Non-trivial norm parameters and biases so that adapters that forget them are caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name.lower() or ".ln_" in f".{name}"  # GPT-2/J/Neo: ln_1, ln_f
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
        if hostile:
            model.get_input_embeddings().weight[-len(XSS_TOKENS) :] *= 8.0
    model.save_pretrained(folder, safe_serialization=True)
    build_tiny_tokenizer(folder, hostile=hostile)
    return folder


# llama.cpp's names for the tiny llama's tensors (its converter's table, one layer's worth)
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _rotary_halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's order of a Q or K projection's rows: per head, the rotary halves
    interleaved into pairs (transformers undoes it when it reads a GGUF)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape_as(weight)


def save_tiny_gguf(folder: Path, seed: int = 0) -> Path:
    """The tiny llama (:func:`save_tiny_model`, saved to ``folder / "hf"``) written as a float32
    GGUF file ``folder / "tiny-llama.gguf"``, as llama.cpp's converter lays it out: metadata,
    tokenizer (the character vocabulary, no merges) and tensors. Converting it back must give
    the Hugging Face model again."""
    import json

    import gguf
    from safetensors.torch import load_file

    hf = save_tiny_model("llama", folder / "hf", seed=seed)
    config = TINY_CONFIGS["llama"][1]
    vocab = json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer = gguf.GGUFWriter(str(folder / "tiny-llama.gguf"), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([control if i < 4 else normal for i in range(len(tokens))])
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for layer in range(config.num_hidden_layers):
        for ours, theirs in _GGUF_LAYER_NAMES.items():
            names[f"model.layers.{layer}.{ours}.weight"] = f"blk.{layer}.{theirs}.weight"
    weights = load_file(str(hf / "model.safetensors"))
    for ours, theirs in names.items():
        weight = weights[ours]
        if theirs.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in theirs else config.num_key_value_heads
            weight = _rotary_halves_to_pairs(weight, heads)
        writer.add_tensor(theirs, weight.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "tiny-llama.gguf"
