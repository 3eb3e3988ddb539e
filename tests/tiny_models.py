"""Small randomly initialised models built from configs (nothing is downloaded)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(hidden=64, layers=2, vocab=128, intermediate=160, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()
