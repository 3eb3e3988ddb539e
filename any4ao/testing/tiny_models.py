"""Small randomly initialised models built from configs (nothing is downloaded)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(hidden=64, layers=2, vocab=128, intermediate=160, seed=0, dtype=torch.float32, tie=False):
    """tie: share lm_head's weight with the embedding (tie_word_embeddings, as SmolLM2 does)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_tokenizer(text: str, vocab: int = 128):
    """A word-level tokenizer over the most frequent words of `text` (the rest map to <unk>),
    built offline with the `tokenizers` library."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ("<unk>", "</s>")  # WikiText has a literal <unk> word: it must not get a second id
    counts = Counter(w for w in text.split() if w not in special)
    words = [w for w, _ in counts.most_common(vocab - len(special))]
    table = {**{w: i for i, w in enumerate(special)}, **{w: i + len(special) for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
