"""Tests generated from the registries, as timm's model tests loop over its model registry.

- Every registered method, on a tiny batch from real caption-group shards built the way the
  trainer builds them: the loss is finite, every trainable parameter gets a finite gradient, and
  no frozen module (an EMA teacher, a reference model) gets one.
- Every registered stage: not complete on an empty run directory, complete after it ran.
- A new method is one file: this module registers a toy method the way CONTRIBUTING.md shows,
  without editing any other module, and ``synrep train``/``eval`` run it end to end.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from synrep.cli import main
from synrep.cluster import save_clusters
from synrep.config import Config, MethodOptions, load_config
from synrep.data.augment import BatchAugment
from synrep.data.shards import CaptionGroup, write_shard, write_sizes
from synrep.factory import build_method, build_source
from synrep.layout import layout
from synrep.losses import MultiPosConLoss
from synrep.methods import METHODS, Method
from synrep.models import Encoder
from synrep.stages import STAGES, stage_names
from tests.conftest import needs_fashion

pytestmark = pytest.mark.usefixtures("one_thread")


# --- a new method in one file: options, class, registry entry -------------------------------

@dataclass
class ToyOptions(MethodOptions):
    """``method.toy_linear``: a linear projection and the temperature of its contrastive loss."""

    dim: int = 16
    temperature: float = 0.5


@METHODS.register("toy_linear")
class ToyLinear(Method):
    """Two augmented views of each image are positives (SimCLR's loss), through a linear head."""

    Options = ToyOptions

    def __init__(self, cfg: Config, encoder: Encoder) -> None:
        super().__init__(encoder)
        opts = cfg.method.options
        self.head = nn.Linear(encoder.embed_dim, opts.dim)
        self.augment = BatchAugment(cfg.aug)
        self.loss_fn = MultiPosConLoss(opts.temperature)

    def forward(self, batch, g: torch.Generator) -> dict[str, torch.Tensor]:
        x = batch["images"]
        if x.ndim == 5:  # caption groups: one image per caption
            x = x[:, 0]
        views = torch.cat([self.augment(x, g), self.augment(x, g)])  # (2B, C, S, S)
        z = self.head(self.encoder(views))
        labels = torch.arange(x.shape[0], device=z.device).repeat(2)
        return {"loss": self.loss_fn(z, labels)}


# --- every method --------------------------------------------------------------------------

# Options that make any method tiny, applied where a method has them.
SMALL = {"proj_hidden_dim": 64, "ibot_prototypes": 32, "ibot_hidden_dim": 32,
         "ibot_bottleneck_dim": 16, "decoder_dim": 32, "decoder_heads": 2, "decoder_depth": 1,
         "text_width": 32, "text_layers": 1, "text_heads": 2, "clusters": 4, "experts": 2,
         "dim": 8}
CAPTIONS = ["a dark coat", "a sandal on a bench", "a bag next to a chair", "a pale dress",
            "a sneaker", "a shirt with a collar", "a trouser", "a pullover at dusk"]


def tiny_shards(out: Path, n: int = 8, k: int = 2, seed: int = 0) -> Path:
    """``n`` caption groups of ``k`` random 28 px images, labelled, as the images stage writes."""
    rng = np.random.default_rng(seed)
    groups = [CaptionGroup(key=f"{i:09d}", caption=CAPTIONS[i % len(CAPTIONS)],
                           meta={"caption_id": i, "label": i % 10},
                           images=[rng.integers(0, 256, (28, 28), dtype=np.uint8)
                                   for _ in range(k)])
              for i in range(n)]
    write_shard(out / "00000.tar", groups)
    write_sizes(out)
    return out


def tiny_config(name: str, shards: Path, run: Path, batch: int = 4) -> Config:
    cfg = load_config(None, [f"method.name={name}", "data.source=shards", f"data.shards={shards}",
                             f"train.batch_size={batch}", f"run.dir={run}"])
    opts = cfg.method.options
    for field in dataclasses.fields(opts):
        if field.name in SMALL:
            setattr(opts, field.name, SMALL[field.name])
    return cfg


def bind_clusters(cfg: Config, source_images: torch.Tensor, tmp: Path) -> None:
    """Methods conditioned on clusters of the training images (``cluster_file``) get a clusters
    file that fits the source, as the cluster stage would write it."""
    opts = cfg.method.options
    lead = tuple(source_images.shape[:-3])
    g = torch.Generator().manual_seed(0)
    assign = torch.randint(opts.clusters, lead, generator=g)
    meta = {"key": {"data": json.loads(cfg.to_json())["data"]}, "sizes": []}
    opts.cluster_file = str(save_clusters(tmp / "clusters.safetensors",
                                          torch.randn(opts.clusters, 8, generator=g), assign,
                                          meta))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_every_trainable_part_and_no_frozen_one(name, shards, tmp_path):
    cfg = tiny_config(name, shards, tmp_path / "run")
    kind = METHODS.get(name)
    if "cluster_file" in {f.name for f in dataclasses.fields(cfg.method.options)}:
        probe = build_source(cfg, kind.batch_kind, texts=kind.has_text_tower,
                             each_image=kind.each_image)
        bind_clusters(cfg, probe.images, tmp_path)
    method = build_method(cfg)
    source = build_source(cfg, method.batch_kind, texts=method.has_text_tower,
                          each_image=method.each_image)
    method.bind_data(source)
    method.train()
    out = method(source.batch(0), torch.Generator().manual_seed(0))
    loss = out["loss"]
    assert loss.ndim == 0 and math.isfinite(float(loss.detach())), out
    loss.backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in method.named_parameters() if not p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: trainable parameters without a gradient: {missing[:5]}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients: {bad[:5]}"
    leaked = [n for n, p in frozen if p.grad is not None]
    assert not leaked, f"{name}: frozen parameters with a gradient: {leaked[:5]}"
    # the optimizer step and the frozen parts' update (an EMA teacher) run too
    method.after_step()


def test_frozen_parts_are_tested_where_a_method_has_them(shards, tmp_path):
    # SynCLR's default EMA teacher is a frozen copy of the student: the loop above must see it
    cfg = tiny_config("synclr", shards, tmp_path)
    method = build_method(cfg)
    assert any(not p.requires_grad for p in method.parameters())


# --- every stage ---------------------------------------------------------------------------

def _mae_features(tmp_path: Path, shards: Path) -> Path:
    """A tiny MAE checkpoint whose features the cluster stage uses (a real 2-step run)."""
    run = tmp_path / "mae"
    cfg = tiny_config("mae", shards, run)
    args = ["train", "configs/mae_fashion.yaml", f"run.dir={run}", "data.source=shards",
            f"data.shards={shards}", "train.steps=2", "train.batch_size=4", "run.threads=1",
            *[f"method.mae.{k}={v}" for k, v in dataclasses.asdict(cfg.method.mae).items()]]
    assert main(args) == 0
    return layout(cfg).final_checkpoint


@needs_fashion
def test_every_stage_is_incomplete_before_and_complete_after_it_runs(tmp_path):
    """Two tiny runs cover every registered stage: the main job (captions to report, with
    offline selection) and MoCE's own stages (cluster, train, search, eval)."""
    from synrep.pipeline import run_stages

    common = ["run.threads=1", "train.steps=2", "train.ckpt_every=2", "train.log_every=1",
              "optim.warmup_steps=1", "eval.protocols=[knn]", "eval.limit_train=300",
              "eval.limit_test=100", "eval.pca_images=0"]
    main_run = tmp_path / "main"
    main_cfg = load_config("configs/quickstart.yaml", [
        *common, f"run.dir={main_run}", "captions.num=16", "captions.shard_size=16",
        "captions.rewrite.k=1", "images.images_per_caption=2", "images.steps=2",
        "images.shard_size=8", "train.batch_size=4", "method.synclr.images_per_caption=2",
        "method.synclr.proj_hidden_dim=64"])
    shards = tiny_shards(tmp_path / "pool", n=16)
    moce_run = tmp_path / "moce"
    moce_cfg = load_config("configs/moce_fashion.yaml", [
        *common, f"run.dir={moce_run}", "data.source=shards", f"data.shards={shards}",
        "train.batch_size=8", f"method.moce.features={_mae_features(tmp_path, shards)}",
        "method.moce.clusters=4", "method.moce.experts=2", "method.moce.decoder_dim=32",
        "method.moce.decoder_heads=2", "method.moce.decoder_depth=1"])
    # The order each run takes its stages in; select scores the pool with the run's own
    # trained learner, so it runs after train here.
    plan = [(main_cfg, "captions"), (main_cfg, "rewrites"), (main_cfg, "images"),
            (main_cfg, "train"), (main_cfg, "select"), (main_cfg, "eval"),
            (main_cfg, "report"), (moce_cfg, "cluster"), (moce_cfg, "train"),
            (moce_cfg, "search"), (moce_cfg, "eval")]
    assert {name for _, name in plan} == set(STAGES), "a registered stage is not covered"
    for cfg, name in plan:
        stage = STAGES.get(name)
        empty = dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, dir=str(tmp_path / "empty" / name)))
        assert not stage.done(empty), f"{name} is complete on an empty run directory"
        if name == "select":
            cfg.selection.score = "hard_learner"
            cfg.selection.learner = str(layout(cfg).final_checkpoint)
            cfg.selection.filter_ratio = 0.5
            cfg.selection.chunks = 2
        assert not stage.done(cfg), f"{name} is complete before it ran"
        run_stages(cfg, [name])
        if stage.reruns:  # always rewritten: never "complete", but it wrote its output
            assert not stage.done(cfg)
        else:
            assert stage.done(cfg), f"{name} is not complete after it ran"
    assert layout(main_cfg).report.is_file() and layout(moce_cfg).results.is_file()
    assert stage_names()[0] == "captions" and stage_names()[-1] == "report"


# --- the toy method, end to end -------------------------------------------------------------

@needs_fashion
def test_a_method_registered_in_one_file_trains_and_evaluates(tmp_path, capsys):
    run = tmp_path / "toy"
    args = ["run", "configs/fashion_simclr.yaml", "method.name=toy_linear",
            "method.toy_linear.dim=8", "train.steps=3", "train.batch_size=16",
            "train.ckpt_every=3", "run.threads=1", "eval.protocols=[knn]",
            "eval.limit_train=300", "eval.limit_test=100", "eval.pca_images=0", f"run.dir={run}"]
    assert main(args) == 0
    results = json.loads(layout(load_config(None, [f"run.dir={run}"])).results.read_text())
    assert 0 <= results["fashion-mnist"]["knn_top1"] <= 100
    stored = yaml_method(run)
    assert stored == {"name": "toy_linear", "toy_linear": {"dim": 8, "temperature": 0.5}}
    # another method's option is refused, naming the owner
    assert main([*args[:3], "method.toy_linear.mask_ratio=0.5", f"run.dir={tmp_path / 'x'}"]) == 2
    assert "mask_ratio is an option of method(s) mae, moce" in capsys.readouterr().err


def yaml_method(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["method"]
