"""MixedAE (Chen et al., CVPR 2023): pretrain by un-mixing patch-wise mixed images.

There is no official code; every choice the paper leaves open is stated here and in the functions.

**Mixing.** With ratio ``r = method.mixedae.ratio`` (e.g. 0.25) the batch is cut into groups
of ``n = 1/r`` consecutive images (the batch order is already random). Each group becomes one mixed
image of N patches: a seeded random permutation of the N positions per group gives positions
``perm[s*K:(s+1)*K]`` to source slot ``s``, ``K = r*N``, and the mixed patch at position ``j`` is
patch ``j`` of its owner (patches keep their grid position; our reading of the paper). Mixing is
done on the embedded patch tokens (after timm's patch embedding and absolute position embedding),
which equals mixing the pixels since the patch embedding acts on each patch alone. A learned
*segment embedding*, one per source slot (``n`` of them), is added to each patch token according to
its slot.

**Homologous attention.** During MixedAE pretraining only, every block of the encoder runs with
:func:`homologous_attention`: each patch query keeps its top-``K`` patch keys by logit (K = the
patch count of one source), softmax over those. Choice: prefix tokens (class/register) are always
kept as keys, in addition to the K patch keys, and prefix queries attend to every key normally. The
blocks are run by hand with their own ``qkv``/``proj`` weights (:func:`homologous_block`), so
``self.encoder`` keeps timm's ordinary ``Attention`` modules: the state dict, fine-tuning and probes
are unchanged and use ordinary attention. ``method.mixedae.homologous=false`` runs the blocks as
they are (ordinary attention) for ablation. The top-K selection is not differentiable; gradients
flow through the kept logits.

**Homologous contrastive loss.** Paper: features of patches from the same source are pulled
together, other sources pushed apart. Implemented (using the *true* source assignment): the K
positions of each source in a mixed image are split in two halves in a random order (drawn from the
step's generator; sizes floor(K/2) and ceil(K/2), hence K >= 2), the encoder's normalised output
patch tokens of each half are averaged, and each average goes through an MLP head
(Linear(D, proj_hidden_dim), GELU, Linear(proj_dim)) and is L2-normalised. This gives two
embeddings per source image, i.e. 2B in the batch; the loss is the symmetric InfoNCE
(NT-Xent, :class:`~synrep.losses.ntxent.NTXentLoss`, temperature
``method.mixedae.temperature``): the positive of a half is the other half of the same source,
negatives are the other 2B - 2 halves of the global batch (all ranks), including the other
sources of the same mixed image (the hard negatives).

**Reconstruction.** The encoded mixed sequence (G, P + N, D) goes through MAE's ``decoder_embed``.
For each source slot ``s`` a decoder input is built: positions owned by ``s`` keep their encoded
value, the others get MAE's mask token; the prefix tokens are kept; then the decoder's own segment
embedding of ``s`` is added to the patch positions and the fixed sin-cos position embedding to all.
So every image of the batch gets one decoder sequence (B in all) and MAE's loss is applied on its
positions *not* owned by ``s`` against its own (augmented, normalised) view: an MAE with mask ratio
``1 - r`` whose visible tokens were encoded inside the mixture. Loss = recon +
``contrastive_weight`` * contrastive.

Segment embeddings are stored flat (1-D parameters, like MAE's mask token) so the training loop
exempts them from weight decay like position embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from synrep.config import Config
from synrep.errors import ConfigError
from synrep.losses.ntxent import NTXentLoss
from synrep.methods.base import METHODS
from synrep.methods.mae import MAE, MAEDecoderOptions, patchify
from synrep.models import Encoder


def _group_size(ratio: float) -> int:
    """``1/ratio`` as an int, or ValueError when it is not (close to) an integer >= 2."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio {ratio} must lie strictly between 0 and 1")
    n = round(1.0 / ratio)
    if n < 2 or abs(n * ratio - 1.0) > 1e-6:
        raise ValueError(f"ratio {ratio} is not 1/integer (e.g. 0.5, 0.25)")
    return n


def mix_patches(patches: torch.Tensor, ratio: float, g: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix groups of ``n = 1/ratio`` consecutive images patch-wise.

    ``patches`` (B, N, D), B divisible by n and ``K = ratio * N`` an integer. Returns

    - ``mixed`` (B/n, N, D): ``mixed[b, j] = patches[owner_image[b, source[b, j]], j]``;
    - ``source`` (B/n, N) long, the slot in 0..n-1 that owns each position; each slot owns exactly
      K positions: those at ``perm[s*K:(s+1)*K]`` of a random permutation ``perm`` of the group;
    - ``owner_image`` (B/n, n) long, the batch index of each slot's image: ``b*n + s``.

    The permutations come from ``g`` (on ``patches``' device): a pure function of its state.
    """
    b, n_pos, d = patches.shape
    n = _group_size(ratio)
    if b % n:
        raise ValueError(f"a batch of {b} images does not split into groups of {n}")
    k = n_pos // n
    if k * n != n_pos:
        raise ValueError(f"{n_pos} patches do not split into {n} sources of equal size")
    groups = b // n
    dev = patches.device
    perm = torch.rand(groups, n_pos, generator=g, device=dev).argsort(dim=1)
    slot_of_rank = (torch.arange(n_pos, device=dev) // k).expand(groups, -1)
    source = torch.empty(groups, n_pos, dtype=torch.long, device=dev)
    source.scatter_(1, perm, slot_of_rank)
    owner_image = torch.arange(b, device=dev).view(groups, n)
    src_image = owner_image.gather(1, source)  # (G, N) batch index of each position
    mixed = patches[src_image, torch.arange(n_pos, device=dev).expand(groups, -1)]
    return mixed, source, owner_image


def homologous_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int,
                         keep_prefix: int = 0, scale: float | None = None,
                         attn_drop: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         return_weights: bool = False):
    """Top-K attention: each query keeps only its ``top_k`` largest-logit keys.

    ``q``, ``k``, ``v`` (B, H, L, d); the first ``keep_prefix`` tokens are prefix tokens (class /
    register): as keys they are always kept (on top of the ``top_k`` patch keys chosen among the
    ``L - keep_prefix`` others), as queries they attend to every key. Logits are
    ``scale * q @ k^T`` (``scale`` defaults to ``d ** -0.5``); discarded keys get weight exactly 0;
    the softmax runs over the kept keys. Exactly ``top_k`` patch keys are kept (ties broken by
    ``torch.topk``). ``top_k >= L - keep_prefix`` is ordinary softmax attention. ``attn_drop``, if
    given, is applied to the weights. Returns ``out`` (B, H, L, d), and the weights (B, H, L, L)
    too with ``return_weights``.
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, H, L, L)
    n_keys = logits.shape[-1] - keep_prefix
    if top_k < n_keys:
        patch_logits = logits[..., keep_prefix:]
        idx = patch_logits.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(patch_logits, dtype=torch.bool).scatter_(-1, idx, True)
        keep[..., :keep_prefix, :] = True  # prefix queries attend normally
        prefix_keys = torch.ones_like(logits[..., :keep_prefix], dtype=torch.bool)
        keep = torch.cat([prefix_keys, keep], dim=-1)
        logits = logits.masked_fill(~keep, float("-inf"))
    weights = logits.softmax(dim=-1)
    if attn_drop is not None:
        weights = attn_drop(weights)
    out = weights @ v
    return (out, weights) if return_weights else out


def homologous_block(blk: Block, x: torch.Tensor, top_k: int, keep_prefix: int) -> torch.Tensor:
    """Run timm ``Block`` ``blk`` on ``x`` (B, L, D) with its attention replaced by
    :func:`homologous_attention`, using the block's own weights (qkv, q/k norms, proj, layer
    scales, drop paths, MLP). With ``top_k >= L - keep_prefix`` it equals ``blk(x)``."""
    a = blk.attn
    b, n, _ = x.shape
    h = blk.norm1(x)
    qkv = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    o = homologous_attention(q, k, v, top_k, keep_prefix, scale=a.scale, attn_drop=a.attn_drop)
    o = a.norm(o.transpose(1, 2).reshape(b, n, a.attn_dim))
    if getattr(a, "gate", None) is not None:
        o = o * a.gate(h).sigmoid()
    o = a.proj_drop(a.proj(o))
    x = x + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


@dataclass
class MixedAEOptions(MAEDecoderOptions):
    """``method.mixedae``: mix groups of 1/ratio images patch-wise instead of masking (Chen et
    al. 2023), with MAE's decoder and a homologous contrastive MLP head."""

    # share r of a mixed image's patches from each source: 1/r images per group, 1/r an
    # integer >= 2, r * (patches per image) an integer >= 2, and the batch (per rank)
    # divisible by 1/r
    ratio: float = 0.25
    contrastive_weight: float = 0.1  # weight of the homologous contrastive term; 0 = off
    temperature: float = 0.2  # InfoNCE temperature of the homologous contrastive term
    homologous: bool = True  # top-K homologous attention in pretraining; False = ordinary
    proj_hidden_dim: int = 1024  # the contrastive MLP head
    proj_dim: int = 128  # output width of the contrastive MLP head

    rules = {"ratio": "in (0, 0.5]", "contrastive_weight": ">= 0", "temperature": "> 0",
             "proj_hidden_dim": ">= 1", "proj_dim": ">= 1"}


@METHODS.register("mixedae")
class MixedAE(MAE):
    Options = MixedAEOptions
    batch_kind = "images"

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(cfg, encoder)  # MAE's checks (ViT, decoder keys, image size), decoder
        m = cfg.method.options
        s = m.section
        n_pos = self.grid[0] * self.grid[1]
        try:
            n = _group_size(m.ratio)
        except ValueError:
            raise ConfigError(
                f"{s}.ratio={m.ratio} must be 1/n for an integer n >= 2 (each mixed image takes "
                f"its patches from n images); set e.g. {s}.ratio=0.25") from None
        if n_pos % n or n_pos // n < 2:
            raise ConfigError(
                f"{s}.ratio={m.ratio} must give each of the {n} sources an integer number >= 2 "
                f"of the {n_pos} patches (r*N = {m.ratio * n_pos:g}); use a ratio 1/n with n "
                f"dividing {n_pos} and n <= {n_pos // 2}")
        if cfg.train.batch_size % n:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} must be divisible by 1/{s}.ratio = "
                f"{n} (groups of {n} images are mixed); e.g. train.batch_size="
                f"{max(n, cfg.train.batch_size // n * n)}")
        if m.temperature <= 0:
            raise ConfigError(f"{s}.temperature={m.temperature} must be > 0 (e.g. 0.2)")
        if m.contrastive_weight < 0:
            raise ConfigError(
                f"{s}.contrastive_weight={m.contrastive_weight} must be >= 0")
        vit = encoder.backbone
        if m.homologous and not all(
                type(blk) is Block and type(blk.attn) is Attention for blk in vit.blocks):
            raise ConfigError(
                f"{s}.homologous=true runs timm's plain Block/Attention by hand, but the "
                f"backbone {cfg.model.backbone!r} has other blocks; set {s}.homologous=false")
        self.n_src, self.k_src, self.n_pos = n, n_pos // n, n_pos
        self.homologous = m.homologous
        self.contrastive_weight = m.contrastive_weight
        self.temperature = m.temperature
        d, dd = encoder.embed_dim, m.decoder_dim
        # Flat (n*D,) so the loop's "ndim <= 1" rule keeps them out of weight decay.
        self.segment_embed = nn.Parameter(torch.randn(n * d) * 0.02)
        self.decoder_segment_embed = nn.Parameter(torch.randn(n * dd) * 0.02)
        self.contrastive_head = nn.Sequential(
            nn.Linear(d, m.proj_hidden_dim), nn.GELU(), nn.Linear(m.proj_hidden_dim, m.proj_dim))
        self.ntxent = NTXentLoss(m.temperature)  # synrep.losses.ntxent, across ranks

    def forward_mixed_encoder(self, x: torch.Tensor, g: torch.Generator
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images (B, C, H, W) -> ``latent`` (B/n, P + N, D) of the mixed images after
        the blocks and final norm, ``source`` (B/n, N) and ``owner_image`` (B/n, n)."""
        vit = self.encoder.backbone
        prefix, t = self.embed_tokens(x)
        if t.shape[0] % self.n_src:
            raise ConfigError(
                f"method 'mixedae' mixes groups of {self.n_src} images but got a batch of "
                f"{t.shape[0]} (per rank); make the per-rank batch divisible by {self.n_src}")
        mixed, source, owner = mix_patches(t, 1.0 / self.n_src, g)
        seg = self.segment_embed.view(self.n_src, -1).to(mixed.dtype)
        # seg[source] as a one-hot product: indexing's backward accumulates (G*N -> n rows) in a
        # thread-dependent order on a CPU, so two runs of one seed drifted apart; a matmul's
        # reduction order is fixed. The forward is exact (one 1 and zeros per row).
        mixed = mixed + F.one_hot(source, self.n_src).to(mixed.dtype) @ seg
        p = self.num_prefix
        tokens = torch.cat([prefix[owner[:, 0]], mixed], dim=1)  # prefix tokens are shared
        tokens = vit.norm_pre(vit.pos_drop(tokens))
        if self.homologous:
            for blk in vit.blocks:
                tokens = homologous_block(blk, tokens, self.k_src, p)
        else:
            tokens = vit.blocks(tokens)
        norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
        return norm(tokens), source, owner

    def forward_mixed_decoder(self, latent: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``latent`` (G, P + N, D), ``source`` (G, N) -> predictions (G*n, N, p*p*C); row
        ``g*n + s`` reconstructs source ``s`` of group ``g`` (= batch image ``g*n + s``)."""
        x = self.decoder_embed(latent)  # (G, P + N, Dd)
        p, n = self.num_prefix, self.n_src
        grp, n_pos, dd = x.shape[0], source.shape[1], x.shape[-1]
        own = source.unsqueeze(1) == torch.arange(n, device=x.device).view(1, n, 1)  # (G, n, N)
        patches = torch.where(own.unsqueeze(-1), x[:, None, p:], self.mask_token.to(x.dtype))
        seg = self.decoder_segment_embed.view(n, dd).to(x.dtype)
        patches = patches + seg.view(1, n, 1, dd)
        prefix = x[:, None, :p].expand(-1, n, -1, -1)
        x = torch.cat([prefix, patches], dim=2).reshape(grp * n, p + n_pos, dd)
        x = x + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, p:])

    def contrastive_loss(self, latent: torch.Tensor, source: torch.Tensor, g: torch.Generator
                         ) -> torch.Tensor:
        """The homologous contrastive term (module docstring): two half-source averages per source,
        projected, NT-Xent across the batch. ``latent`` (G, P + N, D), ``source`` (G, N); the K
        positions of each source are split into halves in a random order drawn from ``g``."""
        tok = latent[:, self.num_prefix:]  # (G, N, D)
        grp, n_pos, d = tok.shape
        n, k = self.n_src, self.k_src
        # sort positions by source, randomly within a source (the key's fraction is in [0, 1))
        key = source.to(torch.float64) + torch.rand(grp, n_pos, generator=g, device=tok.device,
                                                   dtype=torch.float64)
        order = key.argsort(dim=1)
        grouped = tok.gather(1, order.unsqueeze(-1).expand(-1, -1, d)).view(grp, n, k, d)
        half = k // 2
        a = grouped[:, :, :half].mean(dim=2).reshape(grp * n, d)
        b = grouped[:, :, half:].mean(dim=2).reshape(grp * n, d)
        z1 = F.normalize(self.contrastive_head(a), dim=-1)
        z2 = F.normalize(self.contrastive_head(b), dim=-1)
        return self.ntxent(z1, z2)

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim == 5:
            x = x.flatten(0, 1)
        view = self.encoder.normalize(self.augment(x, g))
        latent, source, owner = self.forward_mixed_encoder(view, g)
        pred = self.forward_mixed_decoder(latent, source)  # (B, N, P), row b = image b
        mask = (source.unsqueeze(1) != torch.arange(self.n_src, device=source.device)
                .view(1, -1, 1)).reshape(-1, self.n_pos).float()  # 1 = not owned = reconstruct
        recon = self.recon_loss(patchify(view, self.patch), pred, mask)
        out = {"recon": recon.detach()}
        loss = recon
        if self.contrastive_weight > 0:
            con = self.contrastive_loss(latent, source, g)
            loss = loss + self.contrastive_weight * con
            out["contrastive"] = con.detach()
        out["loss"] = loss
        return out
