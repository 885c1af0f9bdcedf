"""Text towers for language supervision (CLIP, StableRep++, LaCLIP; docs/methods.md sections 2, 4).

A text tower maps captions into the embedding space it shares with the image tower: tokenizer ->
transformer -> the feature at the end-of-text token (CLIP, Radford et al. 2021, arXiv 2103.00020,
section 2.4) -> a linear projection without bias to ``method.proj_dim``.

``method.text_model`` is either a built-in tower, built from config with random weights (nothing
is downloaded), or a local folder written by transformers' ``save_pretrained`` that holds a
tokenizer and a text model: a ``CLIPTextModel`` (or a whole CLIP model, whose text half is
loaded), any other transformers model through ``AutoModel`` (pooled by its pooler output, else the
masked mean of its last hidden states), or a diffusers text-to-image pipeline folder (its
``tokenizer/`` and ``text_encoder/``; ``synrep/images/fashion_mini`` starts the tower from the
mini generator's trained text encoder).

Built-in towers:

- ``fashion-text``: a CLIP text transformer (``method.text_width`` wide, ``text_layers`` layers of
  ``text_heads`` heads, ``text_context`` tokens, causal attention) over the word-level tokenizer
  shipped with the fashion-mini text-to-image model, whose vocabulary is every word the fashion
  caption grammar writes. The tokenizer is read from that folder by the same
  ``AutoTokenizer.from_pretrained`` call as any saved tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from synrep.errors import ConfigError
from synrep.registry import Registry
from synrep.shipped import SHIPPED

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TEXT_MODELS: Registry = Registry("text model")


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer saved with ``save_pretrained`` in ``path`` (never downloaded)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {str(path)!r} ({str(e).splitlines()[0]}); "
                          "give a folder written by save_pretrained") from None
    if tok.pad_token_id is None:
        raise ConfigError(f"the tokenizer in {str(path)!r} has no padding token; save it with one "
                          "(CLIP's tokenizer pads with its end-of-text token)")
    return tok


@TEXT_MODELS.register("fashion-text")
def fashion_text(m) -> tuple[PreTrainedModel, Any]:
    """A random CLIP text transformer over the shipped fashion caption vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    for key in ("text_width", "text_layers", "text_heads", "text_context"):
        if getattr(m, key) < 1:
            raise ConfigError(f"{m.section}.{key} must be >= 1, got {getattr(m, key)}")
    if m.text_width % m.text_heads:
        raise ConfigError(f"{m.section}.text_width={m.text_width} must be divisible by "
                          f"{m.section}.text_heads={m.text_heads}")
    tok = load_tokenizer(SHIPPED["fashion-mini"] / "tokenizer")
    # eos_token_id != 2 makes CLIPTextModel pool at the first end-of-text token (not argmax id).
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=m.text_width, intermediate_size=4 * m.text_width,
        num_attention_heads=m.text_heads, num_hidden_layers=m.text_layers,
        max_position_embeddings=m.text_context, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return CLIPTextModel(config), tok


def _load_folder(path: Path) -> tuple[PreTrainedModel, Any]:
    """Text model and tokenizer saved in ``path`` (or a diffusers pipeline's subfolders)."""
    from transformers import AutoConfig, AutoModel, CLIPTextModel

    model_dir = tok_dir = path
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        model_dir, tok_dir = path / "text_encoder", path / "tokenizer"
    tok = load_tokenizer(tok_dir)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        cls = CLIPTextModel if config.model_type in ("clip", "clip_text_model") else AutoModel
        # float32 weights whatever the saved dtype: the trainer chooses autocast itself
        model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a text model from {str(model_dir)!r} "
                          f"({str(e).splitlines()[0]}); give a folder written by "
                          "save_pretrained with a config.json and weights") from None
    return model, tok


class TextTower(nn.Module):
    """Texts -> (T, out_dim) embeddings: tokenizer, transformer, pooled feature, projection.

    Args:
        model: a transformers text model (``CLIPTextModel`` pools at the end-of-text token).
        tokenizer: its tokenizer (with a padding token); not part of the state dict.
        out_dim: the shared embedding size (``method.proj_dim``).
        context: texts are truncated to this many tokens (special tokens included).

    Example:
        >>> tower = build_text_tower(cfg.method.options)
        >>> tower(["a dark coat", "a sandal on a bench"]).shape
        torch.Size([2, 128])
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any, out_dim: int,
                 context: int) -> None:
        super().__init__()
        if out_dim < 1 or context < 2:
            raise ValueError(f"need out_dim >= 1 and context >= 2, got {out_dim}, {context}")
        self.model = model
        self.tokenizer = tokenizer
        self.context = context
        self.width: int = int(model.config.hidden_size)
        self.proj = nn.Linear(self.width, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.width**-0.5)  # CLIP's text_projection init

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, (T, L) each, padded to the longest text (L <= context)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str) or not len(texts):
            raise ValueError("TextTower takes a non-empty list of strings")
        ids, mask = self.tokenize(texts)
        dev = self.proj.weight.device
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # models without a pooler: mean of the non-padding tokens
            m = mask.to(dev, out.last_hidden_state.dtype)[..., None]  # (T, L, 1)
            pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)
        return self.proj(pooled)  # (T, out_dim)


def build_text_tower(m) -> TextTower:
    """The text tower of a text-tower method's options (``text_model``, ``proj_dim``, ...)."""
    name = m.text_model
    if name in TEXT_MODELS:
        model, tok = TEXT_MODELS.get(name)(m)
        context = m.text_context
    else:
        path = Path(name).expanduser()
        if not name or not path.is_dir():
            raise ConfigError(
                f"{m.section}.text_model={name!r} is neither a built-in text model "
                f"({', '.join(TEXT_MODELS.names())}) nor a folder; give a folder written by "
                "save_pretrained (a hub model: download it first, e.g. `huggingface-cli download "
                "ID --local-dir DIR`)")
        model, tok = _load_folder(path)
        limit = getattr(model.config, "max_position_embeddings", None) or m.text_context
        context = min(m.text_context, limit)
    return TextTower(model, tok, m.proj_dim, context)
