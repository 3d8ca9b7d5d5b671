"""Write a small GGUF file from a transformers model folder, the way llama.cpp's converter lays one
out (tensor names, Q/K row order, Gemma's norms stored as w + 1, tokenizer metadata), so the GGUF
path is tested on files of the real architectures without a download."""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURES = {"llama": "LLAMA", "gemma3_text": "GEMMA3"}


def _llama_permute(weights, n_head: int):
    """llama.cpp's row order for q/k (interleaved rotary halves); transformers' loader undoes it."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gemma_tokenizer(texts, vocab_size: int = 320):
    """A Gemma-style tokenizer (BPE over "▁"-joined text, <pad> <eos> <bos> <unk> <mask> first, BOS
    added) fitted on `texts`: what a real Gemma GGUF file describes, at toy size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             show_progress=False))
    merges = json.loads(tok.to_str())["model"]["merges"]
    return GemmaTokenizer(vocab=tok.get_vocab(), merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges],
                          add_bos_token=True)


def write_gguf(model_dir: str | Path, out: str | Path) -> Path:
    """Convert the causal LM + byte-level BPE tokenizer in `model_dir` into the GGUF file `out` (F32)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.model_type])
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3: the file holds the global layers' theta
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch_name == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    if type(tokenizer).__name__ == "GemmaTokenizer":
        # Sentencepiece-style, as in real Gemma files: no merges; their order is the vocabulary's.
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_token_types([gguf.TokenType.UNKNOWN if t == tokenizer.unk_token else
                                gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        writer.add_unk_token_id(tokenizer.unk_token_id)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
        merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(base)
        assert name is not None, hf_name
        data = tensor.detach().float()
        if arch_name == "llama" and base.endswith("self_attn.q_proj"):
            data = _llama_permute(data, config.num_attention_heads)
        elif arch_name == "llama" and base.endswith("self_attn.k_proj"):
            data = _llama_permute(data, config.num_key_value_heads)
        elif arch_name == "gemma3" and base.endswith("norm"):
            data = data + 1  # ggml's RMSNorm multiplies by w; Gemma's by (1 + w)
        writer.add_tensor(f"{name}.{suffix}", data.numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)
