"""Tiny random models built offline and saved like hub checkpoints, for tests, benchmarks and
smoke tests of the real loading code (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Write an image description that contains the given object category.",
    "tabby cat => a tabby cat asleep on a sunny windowsill",
    "ankle boot => a dark leather ankle boot on a wooden floor",
    "a photo of a red coat on a hanger next to a mirror",
    "sneaker, next to => a white sneaker next to a shoe box",
]


def build_tiny_lm(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer GPT-2 with random weights and a byte-level BPE tokenizer to ``path``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
