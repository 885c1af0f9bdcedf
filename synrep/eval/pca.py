"""PCA maps of ViT patch features: the qualitative evaluation of SynCLR and DINOv2.

docs/methods.md section 1, "Evaluation protocols" (Visual): patch features of a set of images are
reduced by one PCA fitted over all their patches together, and the first three components are
shown as RGB next to the images, so parts that the encoder represents alike get the same colour
across images. With a foreground threshold (DINOv2, Oquab et al. 2023, arXiv 2304.07193, figure 1
and its PCA visualisations) the first component separates the object from the background first,
and the PCA is refitted on the foreground patches only.

Typical use::

    maps = pca_maps(encoder, images[:16])  # (16, h, w, 3) in [0, 1]
    save_pca_figure(images[:16], maps, "pca.png")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from synrep.models import Encoder
from synrep.utils import atomic_output

__all__ = ["patch_features", "pca_maps", "pca_rgb", "save_pca_figure"]

# Background between the (image, map) pairs of a figure, in image pixels before scaling.
_FIGURE_GAP = 2


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = (
            f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images)
        )
        raise ValueError(f"{name} must be a uint8 tensor [N, C, H, W], got {got}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty; give at least one image")


def patch_features(
    encoder: Encoder,
    images: Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> Tensor:
    """The last block's patch tokens (after the final norm) laid out on the patch grid.

    The encoder runs in eval mode under :func:`torch.inference_mode` (its training flag is put
    back afterwards); it must already live on ``device``. Prefix tokens (CLS, registers) are
    dropped.

    Args:
        encoder: a ViT :class:`~synrep.models.Encoder`.
        images: uint8 ``[N, C, H, W]``; H and W multiples of the patch size.
        batch_size: images per forward pass.
        device: where the forward passes run.

    Returns:
        float32 ``[N, h, w, D]`` on the CPU, ``(h, w)`` the patch grid.
    """
    if not encoder.is_vit:
        raise ValueError(
            f"patch_features needs a ViT encoder with patch tokens, got a "
            f"{type(encoder.backbone).__name__} backbone; use a vit_* backbone"
        )
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, _, height, width = images.shape
    vit: Any = encoder.backbone  # timm VisionTransformer
    p: tuple[int, int] = vit.patch_embed.patch_size
    if height % p[0] or width % p[1]:
        raise ValueError(
            f"images are {height}x{width} px, not a multiple of the patch size {p[0]}x{p[1]}"
        )
    h, w = height // p[0], width // p[1]
    param = next(encoder.parameters())
    want = torch.device(device)
    # "cuda" names the current GPU: it matches an encoder on cuda:0 when that is the current one
    if want.type == "cuda" and want.index is None and torch.cuda.is_available():
        want = torch.device("cuda", torch.cuda.current_device())
    if param.device != want:
        raise ValueError(
            f"the encoder is on {param.device} but device={str(device)!r}; move it there first"
        )

    prefix = encoder.num_prefix_tokens
    out = torch.empty(n, h, w, encoder.embed_dim)  # outside inference mode: an ordinary tensor
    was_training = encoder.training
    encoder.eval()
    try:
        for start in range(0, n, batch_size):
            batch = images[start : start + batch_size].to(device)
            with torch.inference_mode():
                tokens = encoder.tokens(batch.float() / 255.0)  # (B, prefix + h*w, D)
                patches = tokens[:, prefix:]
                if patches.shape[1] != h * w:
                    raise ValueError(
                        f"the encoder returned {patches.shape[1]} patch tokens for {height}x"
                        f"{width} px images, expected the {h}x{w} grid"
                    )
                out[start : start + len(batch)] = patches.reshape(len(batch), h, w, -1).float()
    finally:
        encoder.train(was_training)
    return out


def _principal_axes(x: Tensor, k: int) -> Tensor:
    """The top-``k`` principal axes ``[D, k]`` of centred rows ``x [M, D]`` (float64).

    Eigenvectors of the scatter matrix ``x^T x`` (the right singular vectors of ``x``), which is
    exact and needs D^2 memory instead of the M x D of a thin SVD. Each axis is signed so that its
    entry of largest absolute value (its largest loading) is positive.
    """
    _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    axes = vecs[:, -k:].flip(1)  # (D, k), largest variance first
    top = axes.abs().argmax(dim=0)  # (k,) row of each axis' largest |loading|
    sign = torch.sign(axes[top, torch.arange(k)])
    return axes * torch.where(sign == 0, 1.0, sign).to(axes.dtype)


def _min_max(z: Tensor, tol: float) -> Tensor:
    """Scale each column of ``z [M, k]`` to [0, 1]; a column spanning ``tol`` or less becomes 0.

    The tolerance keeps rounding noise (the projections on a direction the data does not span)
    from being blown up to full-range colours.
    """
    lo, hi = z.min(dim=0).values, z.max(dim=0).values
    span = hi - lo
    flat = span <= tol
    return torch.where(flat, 0.0, (z - lo) / torch.where(flat, 1.0, span))


def _pca_scaled(x: Tensor, k: int, eps: float) -> Tensor:
    """Project rows ``x [M, D]`` (float64) on their top-``k`` principal axes, min-max scaled.

    ``eps`` is the resolution of the dtype the features came in: a component whose range is
    within the rounding error of a projection (``8 sqrt(D) eps max|x|``) is taken as flat.
    """
    centred = x - x.mean(dim=0)
    tol = 8 * x.shape[1] ** 0.5 * eps * float(centred.abs().max())
    return _min_max(centred @ _principal_axes(centred, k), tol)


def pca_rgb(features: Tensor, *, foreground_threshold: float | None = None) -> Tensor:
    """The first three principal components of patch features as RGB maps.

    One PCA is fitted on all ``N * h * w`` patch vectors together (centred, computed in float64):
    each patch is projected on the top three principal axes, and each component is min-max scaled
    over all patches to [0, 1] (a component that is constant up to the features' float rounding, as
    when they span fewer than three directions, becomes 0 rather than amplified noise).

    Sign convention: an axis and its negation explain the same variance, so each axis is flipped
    to make its largest-magnitude loading (entry of the axis vector) positive; the maps are then
    a deterministic function of the features.

    With ``foreground_threshold`` (DINOv2's two-step maps): after the first fit, patches whose
    scaled first component is below the threshold are background and are set to 0 (black); the
    three components are refitted, and min-max scaled, on the foreground patches only. Which side
    of the first component is "foreground" follows the sign convention above.

    Args:
        features: float ``[N, h, w, D]``, D >= 3, finite.
        foreground_threshold: in [0, 1]; None maps every patch.

    Returns:
        float32 ``[N, h, w, 3]`` in [0, 1], on the CPU.
    """
    if not isinstance(features, Tensor) or features.ndim != 4 or not features.is_floating_point():
        got = (
            f"{features.dtype} {tuple(features.shape)}"
            if isinstance(features, Tensor)
            else type(features)
        )
        raise ValueError(f"features must be a float tensor [N, h, w, D], got {got}")
    if features.numel() == 0:
        raise ValueError(f"features {tuple(features.shape)} is empty")
    if features.shape[-1] < 3:
        raise ValueError(
            f"features need D >= 3 dimensions for 3 components, got D={features.shape[-1]}"
        )
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf")
    if foreground_threshold is not None and not 0.0 <= foreground_threshold <= 1.0:
        raise ValueError(
            f"foreground_threshold must be in [0, 1] or None, got {foreground_threshold}"
        )

    x = features.detach().cpu().double().reshape(-1, features.shape[-1])  # (M, D) patches
    eps = torch.finfo(features.dtype).eps
    rgb = _pca_scaled(x, 3, eps)  # (M, 3)
    if foreground_threshold is not None:
        fg = rgb[:, 0] >= foreground_threshold  # (M,) never empty: the maximum scales to 1
        rgb = torch.zeros_like(rgb)
        rgb[fg] = _pca_scaled(x[fg], 3, eps)
    return rgb.float().reshape(*features.shape[:-1], 3)


def pca_maps(
    encoder: Encoder,
    images: Tensor,
    *,
    foreground_threshold: float | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> Tensor:
    """:func:`pca_rgb` of :func:`patch_features`: ``[N, h, w, 3]`` in [0, 1]."""
    feats = patch_features(encoder, images, batch_size=batch_size, device=device)
    return pca_rgb(feats, foreground_threshold=foreground_threshold)


def save_pca_figure(
    images: Tensor,
    maps: Tensor,
    path: str | os.PathLike[str],
    *,
    columns: int = 8,
    scale: int = 4,
) -> Path:
    """Write a PNG with each image next to its PCA map, the pairs in a grid.

    Each map is upsampled (nearest neighbour) to its image's size; the pairs are laid out
    ``columns`` per row (fewer if there are fewer images) with a white gap of 2 px between them,
    and the whole figure is enlarged ``scale`` times (nearest neighbour) so small images stay
    visible. Grayscale images are shown as gray RGB. The file is written under a temporary name
    and renamed, so a crash never leaves a truncated PNG.

    Args:
        images: uint8 ``[N, C, H, W]``, C = 1 or 3.
        maps: ``[N, h, w, 3]`` in [0, 1] (from :func:`pca_rgb`).
        path: the ``.png`` file; its folder is created if needed.
        columns: pairs per row.
        scale: integer enlargement.

    Returns:
        the path written. The figure is ``rows * H + (rows - 1) * 2`` by
        ``cols * 2W + (cols - 1) * 2`` px before scaling, ``rows = ceil(N / cols)``.
    """
    _check_images(images)
    n, c, height, width = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    if not isinstance(maps, Tensor) or maps.ndim != 4 or maps.shape[0] != n or maps.shape[3] != 3:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps)
        raise ValueError(f"maps must be [{n}, h, w, 3] (one per image), got {got}")
    if not bool(((maps >= 0) & (maps <= 1)).all()):  # also False for NaN
        raise ValueError("maps must lie in [0, 1] (the output of pca_rgb)")
    if columns < 1 or scale < 1:
        raise ValueError(f"columns and scale must be >= 1, got {columns} and {scale}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")

    # Upsample the maps to the image size: (N, 3, H, W) uint8.
    up = torch.nn.functional.interpolate(
        maps.detach().cpu().float().permute(0, 3, 1, 2), size=(height, width), mode="nearest"
    )
    up = (up * 255).round().to(torch.uint8)
    pics = images.detach().cpu().expand(-1, 3, -1, -1)  # gray -> gray RGB
    pairs = torch.cat([pics, up], dim=3).permute(0, 2, 3, 1).numpy()  # (N, H, 2W, 3)

    cols = min(columns, n)
    rows = -(-n // cols)
    gap = _FIGURE_GAP
    canvas = np.full(
        (rows * height + (rows - 1) * gap, cols * 2 * width + (cols - 1) * gap, 3),
        255,
        dtype=np.uint8,
    )
    for i, pair in enumerate(pairs):
        top, left = (i // cols) * (height + gap), (i % cols) * (2 * width + gap)
        canvas[top : top + height, left : left + 2 * width] = pair
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as f:
        Image.fromarray(canvas).save(f, format="PNG")
    return path
