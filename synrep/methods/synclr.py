"""SynCLR (Tian et al. 2023, arXiv 2312.17742): multi-positive contrastive learning on caption
groups, with an EMA teacher, multi-crop and iBOT masked image modelling.

Each batch holds G captions x m generated images. Every image gets ``global_crops`` global views
and ``local_crops`` small views. Loss, with a weight per term (a weight of 0 removes the term and
its parts):

- **contrastive**: queries are the student's projections of every view; keys are the teacher's
  projections of the global views (the student's own, with ``teacher: false``, which is StableRep).
  A query's positives are the keys of every view of every image of its caption, except the key of
  the very same crop; local views are queries only (SynCLR multi-crop).
- **ibot**: ``ibot_mask_prob`` of the global views have some patch embeddings replaced by a
  learned mask token; at masked positions the student predicts the teacher's Sinkhorn-Knopp
  assignment of the unmasked view's tokens to prototypes.

The teacher is an exponential moving average of the student (momentum cosine-annealed from
``ema_momentum`` to ``ema_momentum_end``); its weights never get gradients, so DDP leaves them
alone, and every rank applies the same update to the same weights. The paper's code is not
public; where it is silent this follows DINOv2 (Sinkhorn-Knopp targets, block masks, teacher
temperature warm-up from 0.04 to 0.07) and MoCo v3 (teacher keys, batch-statistics heads).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.layers import HybridEmbed
from torch import nn

from synrep.config import Config
from synrep.data.augment import MultiCrop, resize
from synrep.data.masks import patch_masks
from synrep.errors import ConfigError
from synrep.losses import ibot_loss, multipos_query_key_loss, sinkhorn_knopp
from synrep.methods.base import METHODS, GroupOptions, Method
from synrep.models import Encoder, ProjectionHead, PrototypeHead


@dataclass
class SynCLROptions(GroupOptions):
    """``method.synclr``: SynCLR's terms (docs/methods.md section 1): EMA teacher keys,
    multi-crop queries, iBOT masked modelling; and Flexi-JEST's mixed resolution."""

    local_crops: int = 0  # multi-crop: extra small views per image (all positives)
    local_size: int = 14  # side in pixels of each local crop
    local_scale: tuple[float, float] = (0.1, 0.4)  # local crops' area range, share of image
    global_crops: int = 1  # global views per image (queries and keys)
    teacher: bool = True  # keys from an EMA teacher; False = keys are the student's own features
    # with teacher=false: keep an EMA of the encoder anyway (same momentum schedule), with no
    # keys and no extra forward pass; evaluation and export read it as the teacher's weights
    # (eval.weights=teacher, the default). Weight averaging for a few ms a step
    eval_ema: bool = False
    ema_momentum: float = 0.994  # teacher momentum at step 0, cosine-annealed to ema_momentum_end
    ema_momentum_end: float = 1.0  # teacher momentum at the last step
    contrastive_weight: float = 1.0  # multi-positive contrastive term; 0 removes it
    ibot_weight: float = 1.0  # iBOT masked-token term; 0 removes it (and the iBOT head)
    ibot_prototypes: int = 1024  # prototypes of the iBOT head (the paper: 65,536)
    ibot_hidden_dim: int = 512  # hidden width of the iBOT head's MLP
    ibot_bottleneck_dim: int = 128  # L2-normalised width compared with the prototypes
    ibot_mask: Literal["block", "random"] = "block"  # block-wise (BEiT) or uniformly random
    ibot_mask_prob: float = 0.5  # share of global crops that are masked
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)  # share of tokens masked, uniform per crop
    ibot_student_temp: float = 0.1  # softmax temperature of the student's prototype scores
    ibot_teacher_temp: float = 0.07  # teacher temperature after warm-up
    ibot_teacher_temp_start: float = 0.04  # teacher temperature at step 0, where the warm-up starts
    ibot_teacher_temp_warmup: int = 0  # steps of linear teacher-temperature warm-up
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations for the teacher's token targets
    # Flexi-JEST's mixed-resolution training (docs/methods.md section 5): this share of each
    # batch's caption groups is trained at low_res_size (global crops downsampled,
    # antialiased), so the learner also knows the low resolution it scores at
    # (selection.score_size) and steps cost less.
    low_res_share: float = 0.0  # in [0, 1); 0 trains every group at aug.size
    low_res_size: int = 14  # side of the low-res groups' crops: a patch multiple below aug.size

    rules = {"local_crops": ">= 0", "local_size": ">= 1", "local_scale": "pair in (0, 1]",
             "global_crops": ">= 1", "ema_momentum": "in [0, 1]", "ema_momentum_end": "in [0, 1]",
             "contrastive_weight": ">= 0", "ibot_weight": ">= 0", "ibot_prototypes": ">= 1",
             "ibot_hidden_dim": ">= 1", "ibot_bottleneck_dim": ">= 1",
             "ibot_mask_prob": "in [0, 1]", "ibot_mask_ratio": "pair in [0, 1)",
             "ibot_student_temp": "> 0", "ibot_teacher_temp": "> 0",
             "ibot_teacher_temp_start": "> 0", "ibot_teacher_temp_warmup": ">= 0",
             "sinkhorn_iters": ">= 1", "low_res_share": "in [0, 1)", "low_res_size": ">= 1"}


def _check(cfg: Config, encoder: Encoder) -> None:
    m = cfg.method.options
    s = m.section  # method.synclr
    if m.contrastive_weight < 0 or m.ibot_weight < 0:
        raise ConfigError(f"{s}.contrastive_weight and {s}.ibot_weight must be >= 0")
    if m.contrastive_weight == 0 and m.ibot_weight == 0:
        raise ConfigError(f"{s}.contrastive_weight and {s}.ibot_weight are both 0: "
                          "nothing to train")
    if m.global_crops < 1:
        raise ConfigError(f"{s}.global_crops must be >= 1, got {m.global_crops}")
    if m.ibot_weight > 0 and not m.teacher:
        raise ConfigError(f"iBOT targets come from the EMA teacher: set {s}.teacher=true or "
                          f"{s}.ibot_weight=0")
    if m.ibot_weight > 0 and not encoder.is_vit:
        raise ConfigError("iBOT masks patch tokens and needs a ViT backbone: set "
                          f"{s}.ibot_weight=0 for CNN backbones")
    if m.contrastive_weight > 0 and m.images_per_caption * m.global_crops < 2 \
            and m.local_crops == 0:
        raise ConfigError("the contrastive term needs two views of a caption: raise "
                          f"{s}.images_per_caption, {s}.global_crops or {s}.local_crops")
    if m.contrastive_weight == 0 and m.local_crops:
        raise ConfigError(f"local crops only feed the contrastive term: set {s}.local_crops=0")
    if not 0 <= m.ema_momentum <= m.ema_momentum_end <= 1:
        raise ConfigError(f"need 0 <= {s}.ema_momentum <= {s}.ema_momentum_end <= 1")
    if not 0 <= m.low_res_share < 1:
        raise ConfigError(f"{s}.low_res_share must be in [0, 1), got {m.low_res_share}")
    if m.low_res_share > 0:
        if not encoder.is_vit:
            raise ConfigError(f"{s}.low_res_share needs a ViT backbone: a CNN's batch-norm "
                              "statistics would mix the two resolutions; set it to 0")
        p = encoder.backbone.patch_embed.patch_size[0]
        if not (p <= m.low_res_size < cfg.aug.size and m.low_res_size % p == 0):
            raise ConfigError(
                f"{s}.low_res_size={m.low_res_size} must be a multiple of the patch size {p} "
                f"below aug.size={cfg.aug.size} (e.g. {max(p, cfg.aug.size // 2 // p * p)})")
        if m.ibot_weight > 0:
            raise ConfigError(f"{s}.low_res_share needs {s}.ibot_weight=0: iBOT masks are "
                              "drawn on the full-resolution patch grid")
    if m.ibot_weight > 0 and isinstance(getattr(encoder.backbone, "patch_embed", None),
                                        HybridEmbed):
        raise ConfigError(
            f"iBOT masks patch tokens, but the convolutional stem of model.backbone="
            f"{cfg.model.backbone!r} lets visible tokens see across patch borders: set "
            f"{s}.ibot_weight=0 or use a plain patch embedding (e.g. vit_tiny_p7_28)")


@METHODS.register("synclr")
class SynCLR(Method):
    Options = SynCLROptions
    batch_kind = "groups"

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        _check(cfg, encoder)
        m = cfg.method.options
        self.cfg = m
        self.total_steps = cfg.train.steps
        self.step = 0
        d = encoder.embed_dim
        self.head = (ProjectionHead(d, m.proj_hidden_dim, m.proj_dim, m.proj_layers)
                     if m.contrastive_weight > 0 else None)
        self.ibot_head = (PrototypeHead(d, m.ibot_prototypes, m.ibot_hidden_dim,
                                        m.ibot_bottleneck_dim) if m.ibot_weight > 0 else None)
        if self.ibot_head is not None:
            self.mask_token = nn.Parameter(torch.zeros(d))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        local = dataclasses.replace(cfg.aug, size=m.local_size, scale=m.local_scale)
        self.crops = MultiCrop(cfg.aug, local, n_global=m.global_crops, n_local=m.local_crops)
        self.teacher: nn.ModuleDict | None = None
        if m.teacher or m.eval_ema:
            # eval_ema alone: an average of the encoder for evaluation, nothing else
            parts = ({"encoder": encoder, "head": self.head, "ibot_head": self.ibot_head}
                     if m.teacher else {"encoder": encoder})
            self.teacher = nn.ModuleDict(
                {k: copy.deepcopy(v) for k, v in parts.items() if v is not None})
            self.teacher.requires_grad_(False)

    # -- schedules ---------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        self.step = step

    def momentum(self) -> float:
        """Teacher momentum at the current step: cosine from ema_momentum to ema_momentum_end."""
        m0, m1 = self.cfg.ema_momentum, self.cfg.ema_momentum_end
        t = min(1.0, self.step / max(1, self.total_steps))
        return m1 - (m1 - m0) * (math.cos(math.pi * t) + 1) / 2

    def teacher_temp(self) -> float:
        c = self.cfg
        if self.step >= c.ibot_teacher_temp_warmup:
            return c.ibot_teacher_temp
        f = self.step / c.ibot_teacher_temp_warmup
        return c.ibot_teacher_temp_start + f * (c.ibot_teacher_temp - c.ibot_teacher_temp_start)

    @torch.no_grad()
    def after_step(self) -> None:
        """Move the teacher towards the student (call after every optimizer step)."""
        if self.teacher is None:
            return
        mom = self.momentum()
        for name, t_mod in self.teacher.items():
            s_mod = getattr(self, name)
            t_params = list(t_mod.parameters())
            torch._foreach_lerp_(t_params, [p.detach() for p in s_mod.parameters()], 1 - mom)

    # -- views -------------------------------------------------------------------------------
    def views(self, x: torch.Tensor, g: torch.Generator) -> dict[str, Any]:
        """Crops and masks of a (G, m, C, H, W) caption-group batch.

        Returns ``global`` (Vg*N, C, S, S), ``local`` (Vl*N, C, s, s) or None, ``masks``
        (Vg*N, h, w) bool or None, ``low`` None or the (full-resolution, low-resolution) row
        indices of ``global`` (rows the encoders see at ``low_res_size``), and ``groups`` G,
        ``m``; N = G*m, views are view-major.
        """
        if x.ndim != 5:
            raise ConfigError("method 'synclr' needs caption-group batches: set data.source=shards")
        n_groups, m = x.shape[:2]
        crops = self.crops(x.flatten(0, 1), g)
        glob = torch.cat(crops[: self.cfg.global_crops])
        loc = torch.cat(crops[self.cfg.global_crops:]) if self.cfg.local_crops else None
        low = None
        k = self.low_res_groups(n_groups)
        if k:  # Flexi: whole caption groups at low resolution, as (full-res, low-res) row indices
            perm = torch.randperm(n_groups, generator=g, device=g.device).to(x.device)
            rows = torch.arange(m, device=x.device)
            crops = torch.arange(self.cfg.global_crops, device=x.device)[:, None] * (n_groups * m)
            hi, lo = ((crops + (grp[:, None] * m + rows).flatten()).flatten()
                      for grp in (perm[k:], perm[:k]))  # view-major rows of every global crop
            low = (hi, lo)
        masks = None
        if self.ibot_head is not None:
            h, w = self.encoder.grid(glob.shape[-1])
            masks = patch_masks(glob.shape[0], h, w, g, self.cfg.ibot_mask_prob,
                                self.cfg.ibot_mask_ratio, self.cfg.ibot_mask, device=x.device)
        return {"global": glob, "local": loc, "masks": masks, "low": low, "groups": n_groups,
                "m": m}

    # -- losses ------------------------------------------------------------------------------
    def low_res_groups(self, n_groups: int) -> int:
        """How many of ``n_groups`` caption groups train at low_res_size: the share rounded half
        up, and at least one group at each resolution when there are two or more groups."""
        share = self.cfg.low_res_share
        if share <= 0:
            return 0
        k = math.floor(share * n_groups + 0.5)
        return min(max(k, 1), n_groups - 1) if n_groups >= 2 else k

    def _encode(self, enc: Encoder, glob: torch.Tensor,
                low: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Pooled features of the global views; the rows ``low[1]`` downsampled to low_res_size
        (``low[0]`` the rows kept at full resolution)."""
        if low is None:
            return enc(glob)
        hi, lo = low
        small = enc(resize(glob[lo], self.cfg.low_res_size))
        if hi.numel() == 0:
            return small
        return torch.cat([enc(glob[hi]), small])[torch.cat([hi, lo]).argsort()]

    def losses(self, v: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weighted loss of precomputed :meth:`views` (split out so tests can feed the same
        global batch to one process and to N ranks)."""
        c, enc = self.cfg, self.encoder
        glob, loc, masks = v["global"], v["local"], v["masks"]
        caption = torch.arange(v["groups"], device=glob.device).repeat_interleave(v["m"])
        n_glob = glob.shape[0]
        lab_g = caption.repeat(n_glob // caption.shape[0])
        out: dict[str, torch.Tensor] = {}

        if masks is not None:
            s_tok = enc.tokens(glob, masks, self.mask_token)
            s_feat = enc.pool(s_tok)
        else:
            s_feat = self._encode(enc, glob, v.get("low"))
        t_tok = None
        if c.teacher:
            with torch.no_grad():
                t_tok = self.teacher["encoder"].tokens(glob) if masks is not None else None
                t_feat = (self.teacher["encoder"].pool(t_tok) if t_tok is not None
                          else self._encode(self.teacher["encoder"], glob, v.get("low")))

        loss = glob.new_zeros(())
        if self.head is not None:
            feats, labels = [s_feat], [lab_g]
            if loc is not None:
                feats.append(enc(loc))
                labels.append(caption.repeat(loc.shape[0] // caption.shape[0]))
            q = self.head(torch.cat(feats))
            q_lab = torch.cat(labels)
            exclude = torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
            exclude[:n_glob] = torch.arange(n_glob, device=q.device)  # a crop is not its own key
            if c.teacher:
                with torch.no_grad():
                    keys = self.teacher["head"](t_feat)
            else:
                keys = q[:n_glob]
            con = multipos_query_key_loss(q, q_lab, keys, lab_g, exclude, c.temperature)
            loss = loss + c.contrastive_weight * con
            out["contrastive"] = con.detach()

        if self.ibot_head is not None:
            p = enc.num_prefix_tokens
            flat = masks.flatten(1)  # (Vg*N, L)
            s_scores = self.ibot_head(s_tok[:, p:][flat])  # (n_masked, K)
            with torch.no_grad():
                t_scores = self.teacher["ibot_head"](t_tok[:, p:][flat])
                targets = sinkhorn_knopp(t_scores, self.teacher_temp(), c.sinkhorn_iters)
            image_of_token = flat.nonzero()[:, 0]
            mim = ibot_loss(s_scores, targets, image_of_token, n_glob, c.ibot_student_temp)
            loss = loss + c.ibot_weight * mim
            out["ibot"] = mim.detach()
            out["teacher_temp"] = torch.tensor(self.teacher_temp())
        if self.teacher is not None:
            out["ema_momentum"] = torch.tensor(self.momentum())
        out["loss"] = loss
        return out

    def forward(self, batch: dict[str, Any], g: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch["images"]`` (G, m, C, H, W) uint8, or ``batch["views"]`` from :meth:`views`."""
        v = batch["views"] if "views" in batch else self.views(batch["images"], g)
        return self.losses(v)
