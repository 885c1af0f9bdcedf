"""Tiny random models built offline and saved like hub checkpoints, for tests, benchmarks and
smoke tests of the real loading code (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "Write an image description that contains the given object category.",
    "tabby cat => a tabby cat asleep on a sunny windowsill",
    "ankle boot => a dark leather ankle boot on a wooden floor",
    "a photo of a red coat on a hanger next to a mirror",
    "sneaker, next to => a white sneaker next to a shoe box",
]


def build_tiny_lm(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer GPT-2 with random weights and a byte-level BPE tokenizer to ``path``."""
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


def _byte_symbols() -> list[str]:
    """One printable symbol per byte value, as byte-level BPE vocabularies (GPT-2, CLIP) use:
    printable Latin-1 bytes stand for themselves, the others map to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_clip_tokenizer(path: Path | None = None, max_length: int = 32):
    """A real CLIPTokenizer with a character-level byte vocabulary (no merges); saved to
    ``path`` when given."""
    from transformers import CLIPTokenizer

    chars = _byte_symbols()
    vocab = {tok: i for i, tok in enumerate(
        ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    if path is not None:
        tok.save_pretrained(path)
    return tok


def build_tiny_sd(path: Path, seed: int = 0, image_size: int = 32, channels: int = 3) -> Path:
    """Save a tiny random Stable-Diffusion-style pipeline (UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, CLIPTokenizer, DDIM scheduler) in diffusers format to ``path``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=4,
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=image_size)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=2 + 2 * 256, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    tokenizer = build_clip_tokenizer()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def build_tiny_clip_text(path: Path, seed: int = 0, width: int = 32, max_length: int = 16) -> Path:
    """Save a 2-layer random ``CLIPTextModel`` and a real ``CLIPTokenizer`` (character-level) to
    ``path``, as a hub CLIP text tower would be saved: a ``method.text_model`` folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_clip_tokenizer(max_length=max_length)
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=max_length, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
