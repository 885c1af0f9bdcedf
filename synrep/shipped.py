"""Models that ship inside the package, by name (no download needed)."""

from __future__ import annotations

from pathlib import Path

#: Shipped diffusers pipelines: the mini text-to-image model trained on Fashion-MNIST.
SHIPPED = {"fashion-mini": Path(__file__).parent / "images" / "fashion_mini"}
