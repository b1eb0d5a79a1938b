"""Small LLaMA models as GGUF files (llama.cpp's format), written from the HF directories of tests/models.py."""

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer

from speft_ds.config import EMBEDDED_DATASET

END_OF_TEXT = "<|endoftext|>"


def byte_level_tokenizer(vocab_size: int = 300) -> GPT2Tokenizer:
    """A GPT-2-style byte-level BPE trained on the embedded dataset: <|endoftext|> (id 0, the BOS, EOS and
    padding token), the 256 byte tokens, then merges. BPE training is deterministic.

    A GGUF file stores a tokenizer as a vocabulary and merges only; transformers rebuilds the normalizer and
    pre-tokenizer from the tokenizer family. The embedded tokenizer (NFKC, digit splitting, Metaspace) is no such
    family, so a model meant to round-trip through GGUF uses this one, built as the GPT2Tokenizer transformers
    rebuilds a "gpt2" GGUF vocabulary into. That rebuild adds <|endoftext|> to a vocabulary lacking it, one token
    more than the embedding has rows, hence GPT-2's special token rather than the embedded <pad>, <s>, </s>."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    examples = [json.loads(line) for line in EMBEDDED_DATASET.read_text().splitlines()]
    trained.train_from_iterator((example["prompt"] + example["response"] for example in examples), trainer=trainer)
    bpe = json.loads(trained.to_str())["model"]
    return GPT2Tokenizer(vocab=bpe["vocab"], merges=[tuple(merge) for merge in bpe["merges"]],
                         unk_token=None, pad_token=END_OF_TEXT)  # no unknowns in a byte-level BPE


def _llama_cpp_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp rotates interleaved pairs of a head's dimensions, HF rotates its two halves: convert_hf_to_gguf.py
    reorders the q and k projection rows to match, and transformers' GGUF loader undoes exactly this."""
    return weight.reshape(n_heads, 2, -1, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(hf_model_dir: Path, gguf_path: Path) -> Path:
    """The model of `hf_model_dir` (a LlamaForCausalLM directory with a byte-level BPE tokenizer, e.g.
    `write_tiny_llama(path, tokenizer=byte_level_tokenizer())`) as an unquantized F32 GGUF file at `gguf_path`,
    with llama.cpp's tensor names and metadata keys and its tokenizer embedded.

    Give `gguf_path` a directory of its own, so that loading it tests the file alone: `from_pretrained(directory,
    gguf_file=...)` also reads a tokenizer_config.json found in that directory."""
    config = AutoConfig.from_pretrained(hf_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_model_dir)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["pre_tokenizer"]["type"] != "ByteLevel":
        raise ValueError(f"{hf_model_dir}: a GGUF file carries a byte-level BPE tokenizer faithfully, not this one")
    tokens = sorted(backend["model"]["vocab"], key=backend["model"]["vocab"].get)
    if len(tokens) != config.vocab_size:
        raise ValueError(f"{hf_model_dir}: {len(tokens)} tokens for {config.vocab_size} embedding rows")

    writer = gguf.GGUFWriter(gguf_path, arch="llama")
    writer.add_name(hf_model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)  # transformers reads head_dim from this key
    writer.add_key_length(config.head_dim)  # llama.cpp reads it from these, needed where head_dim * heads != hidden
    writer.add_value_length(config.head_dim)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in tokenizer.all_special_tokens else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_token_merges([" ".join(merge) for merge in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)

    gguf_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state_dict = AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).state_dict()
    for name, tensor in state_dict.items():
        weight = tensor.numpy()
        if name.endswith("q_proj.weight"):
            weight = _llama_cpp_rotary_rows(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _llama_cpp_rotary_rows(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_names.get_name(name, try_suffixes=(".weight",)), weight)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path
