"""Backbones: a registry over timm models, and the :class:`Encoder` that wraps them.

Small ViTs for 28 px inputs (the embedded default), the paper's ViT-B/16 and ViT-L/14 at 224 px,
a CIFAR-style ResNet-18 for small images, and any timm model by name as ``timm:<name>``. All
weights start random: synrep pretrains them, nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed, PatchDropout
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from synrep.errors import ConfigError
from synrep.registry import Registry

BACKBONES: Registry = Registry("backbone")


def _small_vit(patch: int, dim: int, depth: int, heads: int):
    def build(in_chans: int, img_size: int, drop_path: float, global_pool: str) -> nn.Module:
        if img_size % patch:
            raise ConfigError(f"model.img_size={img_size} is not a multiple of the patch {patch}")
        return VisionTransformer(
            img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=0,
            embed_dim=dim, depth=depth, num_heads=heads, drop_path_rate=drop_path,
            global_pool=global_pool, dynamic_img_size=True,  # multi-crop feeds smaller crops
        )

    return build


#: How each registered backbone is built by plain timm: ``name -> spec(in_chans, img_size,
#: global_pool) -> (timm architecture, model_args)``; what ``synrep export`` writes to
#: config.json. Backbones that timm cannot build from arguments alone are absent.
TIMM_SPECS: dict[str, Callable[[int, int, str], tuple[str, dict[str, Any]]]] = {}


def _small_vit_spec(base: str, patch: int, dim: int, depth: int, heads: int):
    def spec(in_chans: int, img_size: int, global_pool: str) -> tuple[str, dict[str, Any]]:
        return base, {"img_size": img_size, "patch_size": patch, "in_chans": in_chans,
                      "embed_dim": dim, "depth": depth, "num_heads": heads,
                      "global_pool": global_pool, "dynamic_img_size": True}

    return spec


# 28 px ViTs: patch 7 gives 16 tokens (fast), patch 4 gives 49 (finer, ~3x the compute).
BACKBONES.register("vit_tiny_p7_28")(_small_vit(7, 192, 6, 3))
BACKBONES.register("vit_small_p7_28")(_small_vit(7, 384, 6, 6))
BACKBONES.register("vit_tiny_p4_28")(_small_vit(4, 192, 6, 3))
TIMM_SPECS["vit_tiny_p7_28"] = _small_vit_spec("vit_tiny_patch16_224", 7, 192, 6, 3)
TIMM_SPECS["vit_small_p7_28"] = _small_vit_spec("vit_small_patch16_224", 7, 384, 6, 6)
TIMM_SPECS["vit_tiny_p4_28"] = _small_vit_spec("vit_tiny_patch16_224", 4, 192, 6, 3)


class PatchProjection(nn.Conv2d):
    """A ViT's patch projection (a convolution whose stride equals its kernel) computed on a CPU
    as one matrix product over the flattened patches: the same weights, state dict and result,
    2.7x faster there forward and backward (the quickstart's 256 28 px images: oneDNN's
    convolution backward alone cost ~7 ms a training step). Elsewhere, or on inputs the patches
    do not tile, it is the convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.kernel_size
        b, c, h, w = x.shape
        if x.device.type != "cpu" or h % ph or w % pw:
            return super().forward(x)
        gh, gw = h // ph, w // pw
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(b * gh * gw, c * ph * pw),
                       self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(b, gh, gw, -1).permute(0, 3, 1, 2)  # (B, D, gh, gw), as the convolution

    @classmethod
    def replace(cls, vit: nn.Module) -> None:
        """Swap ``vit.patch_embed.proj`` for this class when it is a plain patch convolution."""
        proj = getattr(getattr(vit, "patch_embed", None), "proj", None)
        if type(proj) is not nn.Conv2d or proj.stride != proj.kernel_size or \
                proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1 or \
                proj.padding_mode != "zeros":
            return
        new = cls(proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride,
                  bias=proj.bias is not None, device=proj.weight.device, dtype=proj.weight.dtype)
        new.load_state_dict(proj.state_dict())
        vit.patch_embed.proj = new


class ConvStem(nn.Sequential):
    """Two 3x3 stride-1 convolutions with GELU before the patch projection ("early convolutions",
    Xiao et al. 2021): each token sees a little past its patch, at full resolution."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__(nn.Conv2d(in_chans, width, 3, padding=1), nn.GELU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.GELU())


def _conv_vit(patch: int, dim: int, depth: int, heads: int, width: int):
    def build(in_chans: int, img_size: int, drop_path: float, global_pool: str) -> nn.Module:
        if img_size % patch:
            raise ConfigError(f"model.img_size={img_size} is not a multiple of the patch {patch}")
        embed = partial(HybridEmbed, backbone=ConvStem(in_chans, width))  # sizes by a forward
        return VisionTransformer(
            img_size=img_size, patch_size=patch, in_chans=in_chans, num_classes=0,
            embed_dim=dim, depth=depth, num_heads=heads, drop_path_rate=drop_path,
            global_pool=global_pool, dynamic_img_size=True, embed_layer=embed,
        )

    return build


# The tiny ViT with a convolutional stem (32 channels) before its 7 px patch projection.
BACKBONES.register("vit_tiny_c7_28")(_conv_vit(7, 192, 6, 3, 32))


def _timm_vit(name: str):
    def build(in_chans: int, img_size: int, drop_path: float, global_pool: str) -> nn.Module:
        return timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size,
            drop_path_rate=drop_path, global_pool=global_pool, dynamic_img_size=True,
        )

    return build


def _timm_vit_spec(name: str):
    def spec(in_chans: int, img_size: int, global_pool: str) -> tuple[str, dict[str, Any]]:
        return name, {"img_size": img_size, "in_chans": in_chans, "global_pool": global_pool,
                      "dynamic_img_size": True}

    return spec


# The SynCLR paper's encoders (docs/methods.md section 1).
for _name in ("vit_base_patch16_224", "vit_large_patch14_224", "vit_small_patch16_224"):
    BACKBONES.register(_name)(_timm_vit(_name))
    TIMM_SPECS[_name] = _timm_vit_spec(_name)


def timm_spec(cfg) -> tuple[str, dict[str, Any]]:
    """(timm architecture, model_args) that build the backbone of a
    :class:`synrep.config.ModelConfig` with plain ``timm.create_model`` (``num_classes=0``).

    Raises:
        ConfigError: the backbone has no plain-timm equivalent (a convolutional stem, the
            28 px ResNet's modified stem).
    """
    if cfg.backbone.startswith("timm:"):
        return cfg.backbone[len("timm:"):], {"in_chans": cfg.in_chans}
    if cfg.backbone not in TIMM_SPECS:
        raise ConfigError(
            f"backbone {cfg.backbone!r} has no plain-timm equivalent, so it cannot be exported "
            f"for timm; exportable backbones: {', '.join(sorted(TIMM_SPECS))} and timm:<name>")
    return TIMM_SPECS[cfg.backbone](cfg.in_chans, cfg.img_size, cfg.global_pool)


@BACKBONES.register("resnet18_28")
def resnet18_28(in_chans: int, img_size: int, drop_path: float, global_pool: str) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, so 28 px inputs keep 4x4 at the end."""
    m = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=in_chans,
                          drop_path_rate=drop_path)
    m.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def build_backbone(name: str, in_chans: int, img_size: int, drop_path: float = 0.0,
                   global_pool: str = "token") -> nn.Module:
    if name.startswith("timm:"):
        timm_name = name[len("timm:"):]
        if not timm.is_model(timm_name):
            raise ConfigError(f"model.backbone={name!r}: timm has no model {timm_name!r}")
        kwargs = dict(pretrained=False, num_classes=0, in_chans=in_chans)
        if drop_path:
            kwargs["drop_path_rate"] = drop_path
        backbone = timm.create_model(timm_name, **kwargs)
    else:
        backbone = BACKBONES.get(name)(in_chans, img_size, drop_path, global_pool)
    PatchProjection.replace(backbone)
    return backbone


class Encoder(nn.Module):
    """A backbone that takes pixels in [0, 1] and returns one feature vector per image.

    ``forward`` gives the pooled feature used by training objectives (the CLS token, or the mean
    of patch tokens, for ViTs; the global pool for CNNs). ``probe_features`` gives the frozen
    features evaluation uses (DINOv2-style: CLS and/or mean patch tokens of the last blocks).
    """

    def __init__(self, backbone: nn.Module, mean: float | Sequence[float] = 0.5,
                 std: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.is_vit = isinstance(backbone, VisionTransformer)
        self.embed_dim: int = backbone.num_features
        self.mean = mean
        self.std = std

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them
        (timm's gradient checkpointing): activation memory falls to one block's inputs per
        block, for about a third more compute."""
        if not hasattr(self.backbone, "set_grad_checkpointing"):
            raise ConfigError(f"train.grad_checkpointing: the backbone "
                              f"{type(self.backbone).__name__} does not support it")
        self.backbone.set_grad_checkpointing(enable)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mean, (int, float)) and isinstance(self.std, (int, float)):
            return (x - self.mean) / self.std
        # per-channel statistics (timm's pretrained_cfg); grayscale input to an RGB model
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if x.shape[1] == 1 and mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1] -> (B, D)
        feats = self.backbone.forward_features(self.normalize(x))
        return self.backbone.forward_head(feats, pre_logits=True)

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """ViT token sequence after the final norm: (B, prefix + patches, D).

        With ``mask`` (B, h, w) bool over the patch grid, the embeddings of masked patches are
        replaced by ``mask_token`` (D,) before the position embedding is added (BEiT / iBOT).
        """
        if not self.is_vit:
            raise ConfigError("patch tokens need a ViT backbone")
        if mask is None:
            return self.backbone.forward_features(self.normalize(x))
        vit = self.backbone
        t = vit.patch_embed(self.normalize(x))  # (B, h, w, D) with dynamic_img_size, else (B, L, D)
        m = mask if t.ndim == 4 else mask.flatten(1)
        if m.shape != t.shape[:-1]:
            raise ValueError(
                f"mask {tuple(mask.shape)} does not fit the patch grid {tuple(t.shape[:-1])}")
        t = torch.where(m.unsqueeze(-1), mask_token.to(t.dtype), t)
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(t)))
        if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
            return vit.norm(checkpoint_seq(vit.blocks, t))
        return vit.norm(vit.blocks(t))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled feature of :meth:`tokens`' output (CLS or mean of patches): (B, D)."""
        return self.backbone.forward_head(tokens, pre_logits=True)

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens if self.is_vit else 0

    def grid(self, size: int) -> tuple[int, int]:
        """The patch grid (h, w) of a ``size`` x ``size`` input."""
        p = self.backbone.patch_embed.patch_size
        return size // p[0], size // p[1]

    def probe_dim(self, pool: Literal["cls", "avg", "cls+avg"], n_last_blocks: int) -> int:
        if not self.is_vit:
            return self.embed_dim
        return self.embed_dim * n_last_blocks * (2 if pool == "cls+avg" else 1)

    def probe_features(self, x: torch.Tensor, pool: Literal["cls", "avg", "cls+avg"] = "cls",
                       n_last_blocks: int = 1) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, probe_dim)."""
        if not self.is_vit:
            return self.forward(x)
        outs = self.backbone.forward_intermediates(
            self.normalize(x), indices=n_last_blocks, norm=True, return_prefix_tokens=True,
            intermediates_only=True, output_fmt="NLC",
        )
        parts = []
        for patches, prefix in outs:  # (B, L, D), (B, P, D)
            if pool in ("cls", "cls+avg"):
                parts.append(prefix[:, 0])
            if pool in ("avg", "cls+avg"):
                parts.append(patches.mean(dim=1))
        return torch.cat(parts, dim=1)


def build_encoder(cfg) -> Encoder:
    """Build the encoder described by a :class:`synrep.config.ModelConfig`."""
    backbone = build_backbone(cfg.backbone, cfg.in_chans, cfg.img_size, cfg.drop_path,
                              cfg.global_pool)
    if cfg.patch_drop > 0:
        if not isinstance(getattr(backbone, "patch_drop", None), (nn.Identity, PatchDropout)):
            raise ConfigError(f"model.patch_drop={cfg.patch_drop} drops ViT patch tokens; "
                              f"{cfg.backbone!r} is not a ViT: set model.patch_drop=0")
        # timm's own token dropout, active in training mode only (prefix tokens are kept)
        backbone.patch_drop = PatchDropout(cfg.patch_drop,
                                           num_prefix_tokens=backbone.num_prefix_tokens)
    return Encoder(backbone, cfg.mean, cfg.std)
