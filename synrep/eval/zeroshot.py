"""Zero-shot classification with a text tower (CLIP, Radford et al. 2021, section 3.1.4).

For models trained with language supervision (CLIP, StableRep++, LaCLIP; docs/methods.md section 4):
each class name is written into prompt templates ("a photo of a {}."), the text tower embeds every
prompt, the L2-normalised embeddings of one class are averaged and renormalised (prompt ensembling,
CLIP section 3.1.4), and each image goes to the class whose embedding is most cosine-similar to the
image embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FASHION_TEMPLATES", "class_embeddings", "zero_shot_classify"]

#: Prompt templates for Fashion-MNIST-like product photos ("{}" is the class name).
FASHION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a product photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}, a type of clothing.",
)


def class_embeddings(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = FASHION_TEMPLATES,
) -> Tensor:
    """Prompt-ensembled class embeddings ``[K, D]`` (unit norm).

    Args:
        encode_text: maps ``T`` prompts to text embeddings ``[T, D]`` (any norm).
        classnames: the K class names.
        templates: prompt templates, each with one ``{}`` for the class name.
    """
    if not classnames:
        raise ValueError("classnames is empty")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"every template needs exactly one '{{}}', got {list(templates)}")
    prompts = [t.format(c) for c in classnames for t in templates]  # class-major
    emb = encode_text(prompts)
    if not isinstance(emb, Tensor) or emb.ndim != 2 or len(emb) != len(prompts):
        got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb)
        raise ValueError(f"encode_text must return [{len(prompts)}, D] embeddings, got {got}")
    emb = F.normalize(emb.float(), dim=1).view(len(classnames), len(templates), -1)  # (K, T, D)
    return F.normalize(emb.mean(dim=1), dim=1)


def zero_shot_classify(image_features: Tensor, class_features: Tensor, labels: Tensor) -> dict:
    """Top-1 of assigning each image to its most cosine-similar class embedding.

    Args:
        image_features: ``[N, D]`` image embeddings (any norm).
        class_features: ``[K, D]`` class embeddings, e.g. from :func:`class_embeddings`.
        labels: ``[N]`` true classes in ``0..K-1``.

    Returns:
        ``{"top1": %, "predictions": int64 [N]}``.
    """
    if image_features.ndim != 2 or class_features.ndim != 2:
        raise ValueError(
            f"need image features [N, D] and class features [K, D], got "
            f"{tuple(image_features.shape)} and {tuple(class_features.shape)}"
        )
    if image_features.shape[1] != class_features.shape[1]:
        raise ValueError(
            f"image features have {image_features.shape[1]} dims but class features "
            f"{class_features.shape[1]}: the image and text towers must share an embedding space"
        )
    if labels.shape != (len(image_features),):
        raise ValueError(f"labels must be [{len(image_features)}], got {tuple(labels.shape)}")
    sims = F.normalize(image_features.float(), dim=1) @ F.normalize(class_features.float(), dim=1).T
    pred = sims.argmax(1).cpu()
    top1 = 100.0 * float((pred == labels.cpu()).float().mean())
    return {"top1": top1, "predictions": pred}


def encode_text_batched(encode_text: Callable[[list[str]], Tensor], texts: list[str],
                        batch_size: int = 256) -> Tensor:
    """``encode_text`` over ``texts`` in batches, under inference mode, concatenated on the CPU."""
    outs = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            outs.append(encode_text(texts[s : s + batch_size]).float().cpu())
    return torch.cat(outs).clone()
