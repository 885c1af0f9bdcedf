"""Data: real datasets (Fashion-MNIST, image folders, torchvision) and synthetic-image shards."""

from __future__ import annotations

from synrep.data.datasets import DATASETS, ImageArray, load_dataset, resize_center_crop
from synrep.data.fashion_mnist import CLASSES, DEFAULT_ROOT, load_fashion_mnist, read_idx
from synrep.data.shards import (
    CaptionGroup,
    GroupArray,
    complete_shards,
    flatten_wds,
    iter_flat,
    iter_groups,
    load_groups,
    marker_path,
    read_shard,
    write_shard,
    write_sizes,
)

__all__ = [
    "CLASSES",
    "DATASETS",
    "DEFAULT_ROOT",
    "CaptionGroup",
    "GroupArray",
    "ImageArray",
    "complete_shards",
    "flatten_wds",
    "iter_flat",
    "iter_groups",
    "load_dataset",
    "load_fashion_mnist",
    "load_groups",
    "marker_path",
    "read_idx",
    "read_shard",
    "resize_center_crop",
    "write_shard",
    "write_sizes",
]
