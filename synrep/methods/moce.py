"""MoCE (Liu et al., ICLR 2023): MAE with mixture-of-cluster-conditional-experts blocks.

docs/methods.md section 6. Three steps:

1. The ``cluster`` stage (:mod:`synrep.stages.moce`) runs k-means on a pretrained MAE's features of
   the pretraining images and keeps the centroids and every image's cluster.
2. ``method.name=moce`` trains an MAE whose last ``method.moce.blocks`` encoder blocks replace
   their MLP by ``experts`` expert MLPs (:class:`MoEMlp`). The gate of each MoE block reads the
   **centroid of the image's cluster**, not the token, so every token of an image takes the same
   route and each expert trains on semantically similar images (the centroids are standardised
   over the clusters first, :meth:`MoCE.route_inputs`). Two regularisers keep the gates
   balanced (*check* in the paper; here the V-MoE pair): the importance loss CV(Imp)^2 with
   Imp_e = sum_i p_ie, and the load loss E * sum_e f_e * mean_i p_ie with f_e the share of images
   whose top expert is e (Switch Transformer's differentiable form; both in
   :mod:`synrep.losses.moe_balance`). Both are computed on the batch gathered from all ranks, so
   N processes train exactly as one. ``init`` optionally
   starts the model from a dense MAE checkpoint, every expert a copy of its block's MLP
   (sparse upcycling, :meth:`MoCE.upcycle_from`); the default trains from scratch.
3. Expert search (:func:`search_experts`, the ``search`` stage) assigns a downstream dataset's
   images to the nearest centroids, keeps the route through the MoE blocks that most of them take
   (one expert per block) and exports a dense, normal-size ViT (:func:`export_expert`): an
   ordinary MAE checkpoint that every evaluation protocol reads.

Expert outputs are combined with the top-k gate probabilities renormalised to sum to 1 (*check*).
For top-1 the weight is ``p / p.detach()``: exactly 1 in the forward pass, so the exported dense
ViT reproduces the routed model bit for bit, while the gate still gets the gradient of ``p``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from timm.layers import Mlp
from torch import nn

from synrep import dist
from synrep.checkpoint import Checkpoint, save_checkpoint
from synrep.cluster import load_clusters, nearest
from synrep.config import Config, config_from_dict
from synrep.errors import CheckpointError, ConfigError
from synrep.layout import layout
from synrep.losses.moe_balance import ImportanceLoss, LoadLoss, importance_loss, load_loss
from synrep.methods.base import METHODS
from synrep.methods.mae import MAE, MAEOptions, patchify
from synrep.models import Encoder, build_encoder

__all__ = ["MoCE", "MoEMlp", "cluster_path", "importance_loss", "load_loss", "search_experts",
           "export_expert", "load_moce"]


def route_weights(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts (N, k) and their combination weights (N, k), renormalised to sum to 1.

    For k = 1 the weight is p / p.detach(): exactly 1, with the gradient of p.
    """
    p, idx = probs.topk(top_k, dim=1)
    if top_k == 1:
        return idx, p / p.detach()
    return idx, p / p.sum(1, keepdim=True)


class MoEMlp(nn.Module):
    """``num_experts`` MLPs of the dense block's shape and a linear gate on a per-image input.

    ``forward(x, probs)`` takes tokens (B, L, D) and gate probabilities (B, E) (from
    :meth:`gate_probs` of each image's route input); every token of image b goes to the same
    top-k experts. Experts run on the images routed to them only (a gather per expert, never
    per sample); an expert no image chose still runs on an empty batch, so DDP sees a gradient
    (of zeros) for all parameters.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, gate_dim: int, top_k: int = 1,
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            Mlp(dim, hidden, act_layer=act_layer) for _ in range(num_experts))
        self.gate = nn.Linear(gate_dim, num_experts, bias=False)
        # Unit-variance logits on standardised inputs: diverse routes from the first step.
        nn.init.normal_(self.gate.weight, std=gate_dim ** -0.5)
        self.top_k = top_k

    def gate_probs(self, route: torch.Tensor) -> torch.Tensor:
        """Route inputs (N, gate_dim), e.g. cluster centroids -> probabilities (N, E)."""
        return self.gate(route.to(self.gate.weight.dtype)).float().softmax(dim=1)

    def forward(self, x: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        if probs is None:
            raise ConfigError(
                "a MoCE block needs each image's route (its cluster centroid); evaluate a MoCE "
                "model through expert search, which exports a dense ViT (`synrep search CONFIG`)")
        idx, w = route_weights(probs, self.top_k)  # (B, k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            y = expert(x.index_select(0, rows))
            # Under autocast the experts compute in bf16/fp16; the sum keeps the tokens' dtype.
            out = out.index_add(0, rows, (y * w[rows, slot].to(y.dtype)[:, None, None]).to(
                out.dtype))
        return out


def moe_block(blk: nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """A timm ``Block`` whose ``mlp`` is a :class:`MoEMlp`, routed by ``probs`` (B, E)."""
    x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x), probs)))


@dataclass
class MoCEOptions(MAEOptions):
    """``method.moce``: MAE whose last blocks hold cluster-conditional experts (Liu et al. 2023);
    the clusters come from the `cluster` stage (k-means on ``features``)."""

    features: str = ""  # checkpoint whose encoder features cluster the images (an MAE)
    clusters: int = 16  # k-means clusters of the pretraining images
    kmeans_iters: int = 50  # Lloyd iterations (k-means++ seeding, run.seed)
    cluster_file: str = ""  # clusters.safetensors to train with; "" = RUN/cluster's
    experts: int = 4  # experts in each MoE block
    blocks: int = 2  # the last n encoder blocks get MoE MLPs
    top_k: int = 1  # experts per image (all its tokens share the route); search needs 1
    importance_weight: float = 0.01  # V-MoE importance loss (CV^2 of summed gate probs)
    load_weight: float = 0.01  # load loss E * sum_e f_e * P_e (fraction routed x mean prob)
    # "" trains from scratch; an MAE checkpoint of the same shape starts every weight from it and
    # every expert from its block's dense MLP (sparse upcycling); gates start fresh
    init: str = ""

    rules = {"clusters": ">= 1", "kmeans_iters": ">= 1", "experts": ">= 2", "blocks": ">= 1",
             "top_k": ">= 1", "importance_weight": ">= 0", "load_weight": ">= 0"}


@METHODS.register("moce")
class MoCE(MAE):
    Options = MoCEOptions
    batch_kind = "images"
    # The MoE blocks need a route per image, so evaluation reads the dense ViT that expert search
    # exports for the downstream dataset (the `search` stage, synrep.stages.moce).
    eval_after = "search"
    no_plain_encoder = (
        "a MoCE checkpoint: its MoE blocks need a route per image. Run expert search (`synrep "
        "search CONFIG`) and evaluate the dense ViT it exports (RUN/search/expert.safetensors)")

    @classmethod
    def eval_checkpoint(cls, cfg: Config) -> Path:
        return layout(cfg).expert_checkpoint

    def __init__(self, cfg: Config, encoder: Encoder, gate_dim: int | None = None,
                 upcycle: bool = True) -> None:
        super().__init__(cfg, encoder)
        m = cfg.method.options
        s = m.section
        vit = encoder.backbone
        depth = len(vit.blocks)
        if not 1 <= m.blocks <= depth:
            raise ConfigError(f"{s}.blocks={m.blocks} must lie in 1..{depth} (the "
                              "encoder's blocks); MoE MLPs replace those of the last n blocks")
        if m.experts < 2:
            raise ConfigError(f"{s}.experts={m.experts}: a mixture needs >= 2 experts")
        if not 1 <= m.top_k <= m.experts:
            raise ConfigError(f"{s}.top_k={m.top_k} must lie in 1..{m.experts} ({s}.experts)")
        for key in ("importance_weight", "load_weight"):
            if getattr(m, key) < 0:
                raise ConfigError(f"{s}.{key} must be >= 0, got {getattr(m, key)}")
        centroids = None
        if gate_dim is None:
            centroids, gate_dim = _centroids_for(cfg)
        self.moe_indices = list(range(depth - m.blocks, depth))
        for i in self.moe_indices:
            blk = vit.blocks[i]
            dense = blk.mlp
            if not (hasattr(dense, "fc1") and hasattr(dense, "fc2")):
                raise ConfigError(f"method 'moce' needs timm Mlp blocks; block {i} has "
                                  f"{type(dense).__name__}")
            blk.mlp = MoEMlp(dense.fc1.in_features, dense.fc1.out_features, m.experts,
                             gate_dim, m.top_k, act_layer=type(dense.act))
        # Saved with the weights: expert search assigns downstream images to these centroids.
        self.register_buffer(
            "centroids", centroids if centroids is not None
            else torch.zeros(m.clusters, gate_dim))
        if m.init and upcycle:  # not when a trained MoCE checkpoint is loaded next
            self.upcycle_from(m.init)
        self.importance_weight = m.importance_weight
        self.load_weight = m.load_weight
        # synrep.losses.moe_balance: each on the gate probabilities gathered from every rank
        self.importance_loss = ImportanceLoss()
        self.load_loss = LoadLoss()
        self.cfg = cfg
        self._assign: torch.Tensor | None = None

    def upcycle_from(self, path: str | Path) -> None:
        """Start from a dense MAE checkpoint (``method.moce.init``): every shared weight is
        copied, and each MoE block's experts all start as that block's dense MLP (sparse
        upcycling). The gates keep their fresh initialisation; the cluster routing then makes the
        experts diverge, each on its clusters' images."""
        ck = Checkpoint(path)
        if ck.config.get("method", {}).get("name") != "mae":
            raise CheckpointError(
                f"method.moce.init={str(path)!r} is a {ck.config.get('method', {}).get('name')!r} "
                "checkpoint; MoCE upcycles a dense MAE one (method.name=mae, same model and "
                "decoder settings)")
        dense = ck.model_state
        own = self.state_dict()
        state, used = {}, set()
        for name, value in own.items():
            expert = _expert_param(name)
            src = expert[2] if expert else name
            if not expert and (name == "centroids" or ".mlp.gate." in name):
                state[name] = value
                continue
            if src not in dense or dense[src].shape != value.shape:
                found = "missing" if src not in dense else f"of shape {tuple(dense[src].shape)}"
                raise CheckpointError(
                    f"method.moce.init={str(path)!r} does not fit this model: {src!r} is {found}, "
                    f"the model needs {tuple(value.shape)}; upcycle an MAE trained with the same "
                    "model.* and method.mae_* settings")
            state[name] = dense[src]
            used.add(src)
        extra = sorted(set(dense) - used)
        if extra:
            raise CheckpointError(
                f"method.moce.init={str(path)!r} holds weights this model lacks ({extra[:3]}); "
                "upcycle an MAE trained with the same model.* and method.mae_* settings")
        self.load_state_dict(state, strict=True)

    @property
    def moe_layers(self) -> list[MoEMlp]:
        return [self.encoder.backbone.blocks[i].mlp for i in self.moe_indices]

    def bind_data(self, source) -> None:
        """Take every training image's cluster from the clusters file, checked against the
        source (the same data config and shape as the cluster stage saw)."""
        path = cluster_path(self.cfg)
        centroids, assign, meta = load_clusters(path)
        lead = tuple(source.images.shape[:-3])
        data = json.loads(self.cfg.to_json())["data"]
        key = meta.get("key", {})
        if tuple(assign.shape) != lead or key.get("data") != data:
            raise ConfigError(
                f"{str(path)!r} clusters other data ({tuple(assign.shape)} images, data config "
                f"{key.get('data')}) than this run trains on ({lead}); rerun the cluster stage "
                "(`synrep cluster CONFIG`) for this data")
        if not torch.equal(centroids.to(self.centroids.device), self.centroids):
            raise CheckpointError(
                f"{str(path)!r} holds other centroids than the model was built with (the "
                "clusters changed during the run); start a new run with run.dir=<new folder>")
        self._assign = assign

    def cluster_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cluster of every image of the batch (MAE-family sources are single images)."""
        if self._assign is None:
            raise ConfigError("MoCE needs the training images' clusters: train it with "
                              "`synrep train` (which binds the run's clusters file)")
        return self._assign[batch["index"].cpu()]

    def route_inputs(self) -> torch.Tensor:
        """The gate input of each cluster (K, D): its centroid, standardised over the K
        centroids (zero mean, unit variance per dimension). Features of one encoder share a
        large common direction; standardising lets the gate see what tells clusters apart."""
        c = self.centroids.float()
        return (c - c.mean(0)) / c.std(0, unbiased=False).clamp_min(1e-6)

    def gate_probs(self, clusters: torch.Tensor) -> list[torch.Tensor]:
        """Gate probabilities (N, E) of each MoE block for images in ``clusters`` (N,)."""
        route = self.route_inputs()[clusters.to(self.centroids.device)]
        return [layer.gate_probs(route) for layer in self.moe_layers]

    def run_blocks(self, tokens: torch.Tensor, route: list[torch.Tensor] | None = None
                   ) -> torch.Tensor:
        probs = iter(route) if route is not None else None
        moe = set(self.moe_indices)
        for i, blk in enumerate(self.encoder.backbone.blocks):
            if i in moe:
                tokens = moe_block(blk, tokens, next(probs) if probs is not None else None)
            else:
                tokens = blk(tokens)
        return tokens

    def encode_tokens(self, x: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """Full token sequences (B, P + L, D) of images in [0, 1], after the final norm, with
        every image routed by its cluster (B,): the routed model that expert search exports."""
        vit = self.encoder.backbone
        prefix, t = self.embed_tokens(self.encoder.normalize(x))
        tokens = vit.norm_pre(vit.pos_drop(torch.cat([prefix, t], dim=1)))
        return vit.norm(self.run_blocks(tokens, self.gate_probs(clusters)))

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim == 5:
            x = x.flatten(0, 1)
        probs = self.gate_probs(self.cluster_ids(batch))
        view = self.encoder.normalize(self.augment(x, g))
        latent, mask, ids_restore = self.forward_encoder(view, g, route=probs)
        pred = self.forward_decoder(latent, ids_restore)
        recon = self.recon_loss(patchify(view, self.patch), pred, mask)
        # Balance terms on the global batch (identical on every rank).
        imp = torch.stack([self.importance_loss(p) for p in probs]).mean()
        load = torch.stack([self.load_loss(p) for p in probs]).mean()
        loss = recon + self.importance_weight * imp + self.load_weight * load
        with torch.no_grad():
            # experts that received at least one image, averaged over the MoE blocks
            used = torch.tensor(
                [float(dist.gather_no_grad(p.argmax(1)).unique().numel()) for p in probs])
        return {"loss": loss, "recon": recon.detach(), "importance": imp.detach(),
                "load": load.detach(), "experts_used": used.mean()}


def cluster_path(cfg: Config) -> Path:
    """The clusters file a MoCE run trains with: ``method.moce.cluster_file`` or RUN/cluster's."""
    if cfg.method.moce.cluster_file:
        return Path(cfg.method.moce.cluster_file)
    return layout(cfg).clusters


def _centroids_for(cfg: Config) -> tuple[torch.Tensor, int]:
    """The centroids (K, D) a new MoCE model is built with: those of the run's clusters file."""
    centroids, _, _ = load_clusters(cluster_path(cfg))
    if len(centroids) != cfg.method.moce.clusters:
        raise ConfigError(
            f"{str(cluster_path(cfg))!r} holds {len(centroids)} clusters but "
            f"method.moce.clusters={cfg.method.moce.clusters}; rerun the cluster stage")
    return centroids.float(), centroids.shape[1]


def load_moce(path: str | Path, device: torch.device | str = "cpu") -> MoCE:
    """A trained MoCE model (eval mode) from its checkpoint, centroids included."""
    ck = Checkpoint(path)
    cfg = config_from_dict(ck.config, f"checkpoint {str(path)!r}")
    if cfg.method.name != "moce" or "centroids" not in ck.model_state:
        raise CheckpointError(f"{str(path)!r} is not a MoCE checkpoint (method "
                              f"{cfg.method.name!r}); expert search needs a method.name=moce one")
    torch.manual_seed(cfg.run.seed)
    model = MoCE(cfg, build_encoder(cfg.model), gate_dim=ck.model_state["centroids"].shape[1],
                 upcycle=False)
    ck.load_model(model)
    return model.to(device).eval()


@dataclass
class Search:
    """Expert search's outcome for one downstream dataset."""

    chosen: list[int]  # the kept expert of each MoE block: the downstream set's most common route
    counts: torch.Tensor  # (blocks, E) downstream images routed to each expert (top-1)
    cluster_hist: torch.Tensor  # (K,) downstream images nearest to each centroid
    route_share: float  # share of the downstream images whose route is ``chosen`` in every block


@torch.no_grad()
def search_experts(model: MoCE, features: torch.Tensor) -> Search:
    """Assign downstream features (N, D) (of the clustering model) to the nearest centroids and
    keep the route (one expert per MoE block, top-1) that most of the images take.

    The route is chosen whole, not block by block: every cluster has one route through all MoE
    blocks, so the kept experts are a combination that pretraining images actually passed through
    in sequence (each expert trained on the outputs of the one before it), and the dense ViT is
    exactly the MoCE model on those images. Keeping each block's most used expert separately can
    join experts that no cluster ever chained. Ties go to the route of the lowest cluster index.
    """
    centroids = model.centroids.float().cpu()
    if features.shape[1] != centroids.shape[1]:
        raise ConfigError(f"downstream features have {features.shape[1]} dimensions but the "
                          f"centroids {centroids.shape[1]}; use the model's method.moce.features")
    clusters = nearest(features.float(), centroids)
    hist = torch.bincount(clusters, minlength=len(centroids))
    route = torch.stack([p.argmax(1).cpu() for p in model.gate_probs(
        torch.arange(len(centroids)))])  # (blocks, K): each cluster's top expert
    e = model.moe_layers[0].gate.out_features
    counts = torch.stack([torch.bincount(r, weights=hist.double(), minlength=e)
                          for r in route]).long()
    _, same = torch.unique(route.T, dim=0, return_inverse=True)  # (K,) one id per distinct route
    images = torch.zeros(len(centroids), dtype=torch.long).index_add_(0, same, hist)[same]
    best = int(torch.nonzero(images == images.max())[0])  # the lowest cluster on a top route
    share = float(images[best]) / max(int(hist.sum()), 1)
    return Search(chosen=route[:, best].tolist(), counts=counts, cluster_hist=hist,
                  route_share=share)


def _expert_param(name: str) -> tuple[int, int, str] | None:
    """For an expert's parameter ``...blocks.B.mlp.experts.E.sub``: (B, E, the dense block's
    name ``...blocks.B.mlp.sub``); None for any other parameter."""
    if ".mlp.experts." not in name:
        return None
    head, rest = name.split(".mlp.experts.", 1)
    index, sub = rest.split(".", 1)
    return int(head.rsplit(".", 1)[1]), int(index), f"{head}.mlp.{sub}"


def dense_state(model: MoCE, chosen: list[int]) -> dict[str, torch.Tensor]:
    """The MoCE model's weights with each MoE block's MLP replaced by its chosen expert: the
    state dict of a plain MAE with the same config (gates and centroids dropped)."""
    if len(chosen) != len(model.moe_indices):
        raise ValueError(f"one expert per MoE block: {len(model.moe_indices)}, got {chosen}")
    state = {}
    experts = {i: e for i, e in zip(model.moe_indices, chosen)}
    for name, v in model.state_dict().items():
        if name == "centroids" or ".mlp.gate." in name:
            continue
        expert = _expert_param(name)
        if expert:
            block, index, name = expert
            if index != experts[block]:
                continue
        state[name] = v
    return state


def export_expert(model: MoCE, chosen: list[int], path: str | Path,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write a dense ViT built from the chosen experts as an ordinary MAE checkpoint."""
    cfg = json.loads(model.cfg.to_json())
    moce = cfg["method"]["moce"]  # the dense ViT is an MAE with the same decoder and masking
    cfg["method"] = {"name": "mae", "mae": {f.name: moce[f.name] for f in fields(MAEOptions)}}
    return save_checkpoint(path, dense_state(model, chosen), cfg, step=0,
                           extra={"moce_expert": {"chosen": chosen, **(extra or {})}})
