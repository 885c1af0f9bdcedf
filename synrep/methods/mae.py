"""MAE (He et al. 2022, arXiv 2111.06377): reconstruct the pixels of randomly masked patches.

Each image gets one augmented view (``aug``: crop + flip in MAE). Its patches are embedded and
given the encoder's position embedding, a random ``method.mae.mask_ratio`` of them is dropped per
image, and the ViT encoder runs on the visible patches (plus its class/register tokens) only. A
light decoder maps the encoded tokens to ``decoder_dim``, fills the dropped positions with a learned
mask token, restores the patch order, adds a fixed 2-D sin-cos position embedding and predicts the
pixels of every patch. The loss (:class:`~synrep.losses.mae.MaskedReconstructionLoss`) is the
mean squared error over the masked patches only, against the view's patches after the encoder's
input normalisation, each patch normalised by its own mean and variance when ``norm_pix`` is on.

The encoder stays the :class:`~synrep.models.Encoder` in ``self.encoder`` (the decoder lives in
other attributes), so evaluation reads an MAE checkpoint like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer import Block
from torch import nn

from synrep.config import Config, MethodOptions
from synrep.data.augment import BatchAugment
from synrep.errors import ConfigError
from synrep.losses.mae import MaskedReconstructionLoss
from synrep.methods.base import METHODS, Method
from synrep.models import Encoder


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Images (B, C, H, W) -> patches (B, L, p*p*C), L = (H/p)*(W/p) in row-major grid order.

    Each patch is flattened as (row in patch, column in patch, channel), as in MAE; the grid
    order matches the order of a ViT's patch tokens.
    """
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = x.reshape(b, c, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int, grid: tuple[int, int] | None = None
               ) -> torch.Tensor:
    """Patches (B, L, p*p*C) -> images (B, C, h*p, w*p); the inverse of :func:`patchify`.

    ``grid`` = (h, w) patches; ``None`` means a square grid (L must be a square).
    """
    b, n, d = patches.shape
    if d != p * p * c:
        raise ValueError(f"patches of width {d} do not hold {p}x{p} pixels of {c} channels")
    if grid is None:
        side = round(n ** 0.5)
        if side * side != n:
            raise ValueError(f"{n} patches are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


def random_masking(x: torch.Tensor, ratio: float, g: torch.Generator | None,
                   noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - ratio`` of the tokens of each sequence, as MAE's ``random_masking``.

    ``x`` (B, L, D) -> ``visible`` (B, K, D) with K = max(1, round(L * (1 - ratio))), the kept
    tokens in shuffled order; ``mask`` (B, L) float, 1 = masked (dropped), 0 = kept, in the
    original order; ``ids_restore`` (B, L) long, the inverse permutation:
    ``shuffled.gather(1, ids_restore)`` puts a shuffled sequence back in the original order.
    The noise comes from ``g`` (a generator on ``x``'s device), so the masks are a pure function
    of the generator's state; or pass ``noise`` (B, L) yourself (the lowest ``K`` of each row are
    kept), for masks chosen by another rule.
    """
    b, n, d = x.shape
    keep = max(1, int(round(n * (1 - ratio))))
    if noise is None:
        noise = torch.rand(b, n, generator=g, device=x.device)
    elif noise.shape != (b, n):
        raise ValueError(f"noise must have shape {(b, n)} (batch, tokens), got "
                         f"{tuple(noise.shape)}")
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)  # back to the original token order
    return visible, mask, ids_restore


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (h*w, dim), rows in row-major grid order.

    The first half of the channels encodes the row index, the second half the column index; each
    half is [sin(pos * f_k), cos(pos * f_k)] for frequencies f_k = 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(pos: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, dim/2)
        angles = pos[:, None] * freq[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    return torch.cat([axis(rows), axis(cols)], dim=1).float()


@dataclass
class MAEDecoderOptions(MethodOptions):
    """The lightweight decoder of the MAE family and its pixel targets."""

    decoder_dim: int = 128  # width of the decoder (divisible by its heads)
    decoder_depth: int = 2  # transformer blocks of the decoder
    decoder_heads: int = 4  # attention heads of each decoder block
    norm_pix: bool = True  # targets: each patch normalised by its own mean and variance

    rules = {"decoder_dim": ">= 4", "decoder_depth": ">= 0", "decoder_heads": ">= 1"}


@dataclass
class MAEOptions(MAEDecoderOptions):
    """``method.mae``: reconstruct the pixels of randomly masked patches (He et al. 2022)."""

    mask_ratio: float = 0.75  # share of patches hidden from the encoder, in (0, 1)

    rules = {"mask_ratio": "in (0, 1)"}


@METHODS.register("mae")
class MAE(Method):
    Options = MAEOptions
    batch_kind = "images"
    each_image = True  # on caption-group shards every image is a sample

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        m = cfg.method.options
        s = m.section  # method.mae, or a subclass's section, in error messages
        self.name = cfg.method.name
        if not encoder.is_vit:
            raise ConfigError(
                f"method {self.name!r} masks patch tokens and needs a ViT backbone, but "
                f"model.backbone={cfg.model.backbone!r} is not one; use e.g. "
                "model.backbone=vit_tiny_p7_28")
        if hasattr(m, "mask_ratio") and not 0.0 < m.mask_ratio < 1.0:
            raise ConfigError(
                f"{s}.mask_ratio={m.mask_ratio} must lie strictly between 0 and 1 "
                f"(MAE uses 0.75); set e.g. {s}.mask_ratio=0.75")
        if m.decoder_heads < 1 or m.decoder_dim % m.decoder_heads:
            raise ConfigError(
                f"{s}.decoder_dim={m.decoder_dim} must be divisible by "
                f"{s}.decoder_heads={m.decoder_heads}; change either (e.g. 128 and 4)")
        if m.decoder_dim < 4 or m.decoder_dim % 4:
            raise ConfigError(
                f"{s}.decoder_dim={m.decoder_dim} must be a positive multiple of 4 "
                f"(the decoder's 2-D sin-cos position embedding); e.g. {s}.decoder_dim=128")
        if m.decoder_depth < 0:
            raise ConfigError(f"{s}.decoder_depth={m.decoder_depth} must be >= 0 (MAE here: 2)")
        vit = encoder.backbone
        if isinstance(vit.patch_embed, HybridEmbed):
            raise ConfigError(
                f"method {self.name!r} hides patches from the encoder, but the convolutional stem "
                "of "
                f"model.backbone={cfg.model.backbone!r} lets visible tokens see across patch "
                "borders; use a plain patch embedding (e.g. model.backbone=vit_tiny_p7_28)")
        ph, pw = vit.patch_embed.patch_size
        if ph != pw:
            raise ConfigError(
                f"method {self.name!r} needs square patches, the backbone has {ph}x{pw}")
        self.patch = ph
        self.img_size = tuple(vit.patch_embed.img_size)  # the backbone's model.img_size
        if (cfg.aug.size, cfg.aug.size) != self.img_size:
            raise ConfigError(
                f"method {self.name!r} trains at the backbone's image size {self.img_size[0]}, but "
                f"aug.size={cfg.aug.size}; set aug.size={self.img_size[0]} (or change "
                "model.img_size)")
        self.grid = (self.img_size[0] // ph, self.img_size[1] // pw)
        self.in_chans = cfg.model.in_chans
        if m.norm_pix and ph * pw * self.in_chans < 2:
            raise ConfigError(f"{s}.norm_pix=true needs patches of more than one value")
        self.mask_ratio = getattr(m, "mask_ratio", None)  # MixedAE mixes instead of masking
        self.norm_pix = m.norm_pix
        self.recon_loss = MaskedReconstructionLoss(m.norm_pix)  # synrep.losses.mae
        self.augment = BatchAugment(cfg.aug)

        # Decoder: Linear(D -> Dd), mask token, fixed sin-cos positions, blocks, norm, Linear.
        dd = m.decoder_dim
        self.num_prefix = encoder.num_prefix_tokens  # class + register tokens kept by the decoder
        self.decoder_embed = nn.Linear(encoder.embed_dim, dd)
        # 1-D, so it is exempt from weight decay like the encoder's cls token and pos embedding.
        self.mask_token = nn.Parameter(torch.zeros(dd))
        pos = sincos_pos_embed_2d(dd, *self.grid)
        pos = torch.cat([torch.zeros(self.num_prefix, dd), pos])  # prefix tokens: zero slot
        # Fixed (not trained) and rebuilt from the config: kept out of checkpoints.
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(dd, m.decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
            for _ in range(m.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, ph * pw * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's initialisation for the decoder: Xavier-uniform linears, zero biases, unit norms,
        a N(0, 0.02) mask token. The encoder keeps timm's initialisation."""
        nn.init.normal_(self.mask_token, std=0.02)
        for mod in [self.decoder_embed, self.decoder_blocks, self.decoder_norm,
                    self.decoder_pred]:
            for sub in mod.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, C, H, W) -> prefix tokens (B, P, D) (class/register) and patch
        tokens (B, L, D), each with timm's absolute position embedding where it has slots."""
        vit = self.encoder.backbone
        if tuple(x.shape[-2:]) != self.img_size:
            raise ConfigError(
                f"method {self.name!r} got {x.shape[-2]}x{x.shape[-1]} inputs but the backbone's "
                f"image size is {self.img_size[0]}x{self.img_size[1]}; set aug.size to "
                "model.img_size")
        t = vit.patch_embed(x)  # (B, h, w, D) with dynamic_img_size, else (B, L, D)
        t = t.flatten(1, 2) if t.ndim == 4 else t
        b, n, _ = t.shape
        prefix = [tok.expand(b, -1, -1) for tok in (vit.cls_token, vit.reg_token)
                  if tok is not None]
        prefix = torch.cat(prefix, dim=1) if prefix else t[:, :0]  # (B, P, D)
        pos = vit.pos_embed  # (1, [P +] L, D), or None without absolute positions
        if pos is not None:
            slots = 0 if vit.no_embed_class else vit.num_prefix_tokens
            if pos.shape[1] != slots + n:
                raise ConfigError(
                    f"the backbone's position embedding has {pos.shape[1] - slots} patch slots "
                    f"but the input has {n} patches; train at model.img_size")
            t = t + pos[:, slots:]
            if slots:  # timm/JAX layout: pos_embed has slots for the class/register tokens
                prefix = prefix + pos[:, :slots]
        return prefix, t

    def run_blocks(self, tokens: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's transformer blocks; ``route`` is for subclasses with routed blocks."""
        return self.encoder.backbone.blocks(tokens)

    def forward_encoder(self, x: torch.Tensor, g: torch.Generator,
                        route: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches of normalised images ``x`` (B, C, H, W).

        Returns ``latent`` (B, P + K, D): the P prefix tokens (class/register) then the K visible
        patch tokens in shuffled order, after the blocks and the final norm; ``mask`` (B, L) with
        1 = masked; ``ids_restore`` (B, L). Patch tokens get their position embedding before
        masking; prefix tokens get theirs only when timm's ``pos_embed`` has slots for them
        (``no_embed_class`` false).
        """
        prefix, t = self.embed_tokens(x)
        visible, mask, ids_restore = random_masking(t, self.mask_ratio, g)
        tokens = torch.cat([prefix, visible], dim=1)
        vit = self.encoder.backbone
        tokens = vit.norm_pre(vit.pos_drop(tokens))
        tokens = self.run_blocks(tokens, route)
        # timm puts the final norm in `norm`, or in `fc_norm` (pooled) when global_pool=avg;
        # either way the decoder gets layer-normalised tokens, as in MAE.
        norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
        return norm(tokens), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded tokens (B, P + K, D) -> pixel predictions (B, L, p*p*C) for every patch.

        Masked positions are filled with the mask token, the sequence is put back in patch order
        with ``ids_restore`` (B, L); the prefix tokens go through the decoder and are dropped.
        """
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        p = self.num_prefix
        b, n = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - p), -1)
        shuffled = torch.cat([x[:, p:], fill], dim=1)  # (B, L, Dd) in shuffled order
        patches = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :p], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, p:])

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim == 5:  # caption groups (G, m, C, H, W): every image is a sample
            x = x.flatten(0, 1)
        view = self.encoder.normalize(self.augment(x, g))  # (B, C, S, S)
        latent, mask, ids_restore = self.forward_encoder(view, g)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.recon_loss(patchify(view, self.patch), pred, mask)
        return {"loss": loss, "mask_ratio": mask.mean().detach()}
