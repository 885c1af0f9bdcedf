"""The fashion bank: the 10 Fashion-MNIST classes and the attribute vocabulary of the mini
text-to-image model.

This module is the one place where the embedded default's vocabulary is defined: the caption
stage writes captions from it, and the mini text-to-image model is trained on captions built from
the same class names and attribute words, so every word the captioner writes is one the generator
has seen. Attribute values are ordered from low to high measured value (darker to lighter, slimmer
to wider, plainer to busier), which is what attribute-adherence checks compare against.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from synrep.concepts.banks import BANKS, Concept, ConceptBank, vocab

# Fashion-MNIST label order. Names are what prompts use; synonyms are what captions may say.
CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("t-shirt", ("top", "tee")),
    ("trousers", ("pants", "slacks")),
    ("pullover", ("sweater", "jumper")),
    ("dress", ("frock", "gown")),
    ("coat", ("jacket", "overcoat")),
    ("sandal", ("strappy sandal", "summer sandal")),
    ("shirt", ("blouse", "button-up shirt")),
    ("sneaker", ("trainer", "running shoe")),
    ("bag", ("handbag", "purse")),
    ("ankle boot", ("boot", "bootie")),
)
CLASS_NAMES = tuple(name for name, _ in CLASSES)
# Phrases that may follow a class name in a caption ("a dark coat with a hood").
DETAILS: tuple[tuple[str, ...], ...] = (
    ("with short sleeves", "with a round neck", "with a v-neck", "with a logo print",
     "with a small chest print", "cut straight at the hem", "in soft jersey"),
    ("with a straight leg", "with flared legs", "with side pockets", "with a belt loop waist",
     "with sharp creases", "cropped at the ankle", "in washed denim"),
    ("with long sleeves", "with a crew neck", "with ribbed cuffs", "with a cable knit",
     "with a high collar", "in chunky wool", "with dropped shoulders"),
    ("with a flared skirt", "with thin straps", "without sleeves", "cut at the knee",
     "with a fitted waist", "with a long hem", "with cap sleeves"),
    ("with a hood", "with big buttons", "with a full zip", "with a broad collar",
     "with deep pockets", "with a tied belt", "cut below the hip"),
    ("with thin straps", "with a flat sole", "with a low heel", "with a side buckle",
     "with crossed straps", "with an open toe", "with a cork sole"),
    ("with a pointed collar", "with a button front", "with rolled sleeves",
     "with a chest pocket", "with long cuffs", "with a loose fit", "with a curved hem"),
    ("with white laces", "with a thick sole", "with a side logo", "with a low top",
     "with mesh panels", "with a padded collar", "with a rubber toe cap"),
    ("with a shoulder strap", "with two handles", "with a zip top", "with a front flap",
     "with a metal clasp", "with a boxy shape", "with a long chain strap"),
    ("with a block heel", "with front laces", "with a side zip", "with a chunky sole",
     "with an elastic side panel", "with a pull tab", "with a low stacked heel"),
)

# attribute -> values, low to high: tone = brightness of the garment's pixels, fill = share of
# the frame the garment covers, texture = high-frequency energy inside the garment.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tone": ("dark", "grey", "light"),
    "fill": ("slim", "regular", "wide"),
    "texture": ("plain", "textured", "patterned"),
}


# The grammar captioner's phrases for this bank: catalogue photography, since Fashion-MNIST
# images are centred product shots on a black background.
PHRASES: dict[str, list[str]] = {
    "leads": ["a product photo of", "a catalogue photo of", "a studio shot of", "a flat lay of",
              "a close-up of", "an online store photo of", "a low-resolution photo of",
              "a grayscale photo of", "a picture of", "a thumbnail of", "a front view of",
              "a simple photo of", "a small photo of", "a centred photo of", "a packshot of",
              "an e-commerce image of", "a black and white photo of", "a cropped photo of"],
    "modifiers": ["casual", "classic", "simple", "vintage", "modern", "sporty", "elegant",
                  "everyday", "minimalist", "stylish", "basic", "trendy", "retro", "timeless",
                  "comfortable", "lightweight", "brand-new", "second-hand", "designer",
                  "budget", "women's", "men's", "unisex", "kids'", "summer", "winter"],
    "tails": ["on an empty background", "against a black background", "centred in the frame",
              "photographed from the front", "laid flat", "in grayscale", "at low resolution",
              "isolated on black", "shot from above", "for an online shop", "in a catalogue",
              "with nothing else in view", "in soft studio lighting", "under bright studio lights",
              "seen straight on", "filling the frame", "in a small square image",
              "on a black backdrop"],
}


def measure_attributes(images: torch.Tensor) -> torch.Tensor:
    """Measured tone, fill and texture of garment images, batched.

    Args:
        images: (N, H, W) or (N, 1, H, W), uint8 or float in [0, 1]; garment bright on black,
            as in Fashion-MNIST.

    Returns:
        (N, 3) float: tone = mean brightness of the garment's pixels, fill = share of the frame
        they cover, texture = mean absolute difference from a 3x3 local mean inside the garment,
        relative to its tone (so dark and light garments compare).
    """
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.dim() == 4:
        x = x[:, 0]
    fg = (x > 0.1).float()
    n = fg.sum((1, 2)).clamp(min=1.0)
    tone = (x * fg).sum((1, 2)) / n
    fill = fg.mean((1, 2))
    local = F.avg_pool2d(x[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    texture = ((x - local).abs() * fg).sum((1, 2)) / n / tone.clamp(min=0.05)
    return torch.stack([tone, fill, texture], 1)


def attribute_thresholds(measures: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class tertiles of each measure: (10, 3 attributes, 2 cut points). Cutting per class
    gives every class all three values of every attribute."""
    cuts = torch.zeros(len(CLASSES), len(ATTRIBUTES), 2)
    q = torch.tensor([1 / 3, 2 / 3])
    for c in range(len(CLASSES)):
        m = measures[labels == c]
        if len(m):
            cuts[c] = torch.quantile(m, q, dim=0).T
    return cuts


def attribute_levels(measures: torch.Tensor, labels: torch.Tensor,
                     thresholds: torch.Tensor) -> torch.Tensor:
    """(N, 3) value index of each attribute (0 = first word of ``ATTRIBUTES[attr]``)."""
    cuts = thresholds[labels]  # (N, 3, 2)
    return (measures[:, :, None] > cuts).sum(-1)


def _mentions_any(text: str, names: list[str]) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text) for n in names)


@BANKS.register("fashion")
def fashion_bank() -> ConceptBank:
    """The ``fashion`` bank. Relation objects that name a class (say, "a tote bag") are left out
    so that every caption names exactly one Fashion-MNIST class, and phrases that use an
    attribute word (say, "a dark hallway") so that attribute words only ever mean attributes."""
    concepts = [Concept(name=name, synonyms=syn, cid=name, label=i, plural=name == "trousers",
                        details=DETAILS[i])
                for i, (name, syn) in enumerate(CLASSES)]
    banned = [n for c in concepts for n in c.names] + ["shoe", "sweaters", "t-shirts"]
    banned += [v for values in ATTRIBUTES.values() for v in values]
    objects = [o for o in vocab()["fashion_objects"] if not _mentions_any(o, banned)]
    backgrounds = [b for b in vocab()["fashion_backgrounds"] if not _mentions_any(b, banned)]
    return ConceptBank("fashion", concepts, backgrounds, objects, dict(ATTRIBUTES),
                       {k: list(v) for k, v in PHRASES.items()})
