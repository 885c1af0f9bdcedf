"""Fine-tuning with layer-wise lr decay: group scales and schedule against hand-written formulas,
a real Fashion-MNIST run, determinism, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from synrep.config import AugConfig, ModelConfig
from synrep.data.datasets import ImageArray, load_dataset
from synrep.eval.finetune import finetune, layer_decay_param_groups
from synrep.models import Encoder, build_encoder

from .conftest import needs_fashion

CLASSES = [str(i) for i in range(10)]


def _small_vit(dim: int = 48, depth: int = 2, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=0, embed_dim=dim, depth=depth,
        num_heads=2, global_pool="avg", dynamic_img_size=True,
    )  # fmt: skip
    return Encoder(vit)


def _random_images(n: int, seed: int) -> ImageArray:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return ImageArray(images, torch.arange(n) % 10, list(CLASSES), "random")


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def _expected_layer(name: str, depth: int) -> int:
    """BEiT's layer id, written out: stem 0, block i -> i + 1, head depth + 1. The final norm goes
    with the last block (timm's grouping; BEiT and MAE put it with the head)."""
    top = name.split(".")[0]
    if top in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if top == "blocks":
        return int(name.split(".")[1]) + 1
    if top == "norm":
        return depth
    assert top == "head", name
    return depth + 1


def test_layer_decay_groups_match_beit_formula():
    enc = build_encoder(ModelConfig(backbone="vit_tiny_p7_28"))
    enc.backbone.reset_classifier(10)
    depth, decay, wd = 6, 0.7, 0.05
    groups = layer_decay_param_groups(enc.backbone, weight_decay=wd, layer_decay=decay)
    where = {id(p): g for g in groups for p in g["params"]}
    names = dict(enc.backbone.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter, once
    scales = set()
    for name, p in names.items():
        g = where[id(p)]
        assert g["lr_scale"] == decay ** (depth + 1 - _expected_layer(name, depth)), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert g["weight_decay"] == (0.0 if no_decay else wd), name
        scales.add(g["lr_scale"])
    assert scales == {decay**k for k in range(depth + 2)}
    assert where[id(names["head.weight"])]["lr_scale"] == 1.0
    assert where[id(names["norm.weight"])]["lr_scale"] == decay
    assert where[id(names["patch_embed.proj.weight"])]["lr_scale"] == decay**7


@pytest.fixture
def optimizer_steps():
    """Record (lr, lr_scale, weight_decay) of every param group at every optimizer step."""
    steps: list[list[tuple[float, float, float]]] = []

    def hook(opt, args, kwargs):
        steps.append([(g["lr"], g["lr_scale"], g["weight_decay"]) for g in opt.param_groups])

    handle = register_optimizer_step_pre_hook(hook)
    yield steps
    handle.remove()


def test_schedule_warmup_then_cosine(optimizer_steps):
    data = _random_images(40, seed=0)
    lr, min_lr, decay = 2e-3, 1e-5, 0.5
    out = finetune(
        _small_vit(dim=16, depth=1), data, data, epochs=3, batch_size=8, lr=lr, min_lr=min_lr,
        layer_decay=decay, warmup_epochs=1.0,
    )  # fmt: skip
    total, warmup = 15, 5  # 40 / 8 = 5 steps per epoch
    assert out["steps"] == total and len(optimizer_steps) == total
    for t, groups in enumerate(optimizer_steps):
        if t < warmup:
            want = lr * (t + 1) / warmup
        else:
            want = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - warmup) / 10))
        for group_lr, scale, _ in groups:
            assert group_lr == pytest.approx(want * scale, rel=1e-12, abs=0), (t, scale)
        # Depth 1: stem, block (+ final norm), head -> three scales.
        assert sorted({s for _, s, _ in groups}) == [decay**2, decay, 1.0]
    assert {wd for _, _, wd in optimizer_steps[0]} == {0.0, 0.05}


def test_deterministic_and_leaves_the_caller_alone():
    enc = _small_vit(dim=16, depth=1)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.train()
    data, test = _random_images(48, seed=1), _random_images(20, seed=2)
    kw = dict(epochs=2, batch_size=16, aug=AugConfig(size=28), val_fraction=0.25)
    rng = torch.get_rng_state()
    a = finetune(enc, data, test, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is forked, not consumed
    b = finetune(enc, data, test, seed=3, **kw)
    c = finetune(enc, data, test, seed=4, **kw)
    assert a == b
    assert a["train_loss"] != c["train_loss"]
    assert set(a) == {"top1", "train_loss", "epochs", "steps", "val_top1"}
    assert a["epochs"] == 2 and a["steps"] == 6 and len(a["train_loss"]) == 2  # 38 fit images
    assert enc.training
    after = enc.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_fashion
def test_finetune_learns_fashion_mnist():
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:12800]
    train, test = train.subset(idx), test.subset(slice(0, 1000))
    enc = _small_vit()
    before = [p.detach().clone() for p in enc.parameters()]
    # Random init, 400 steps: a tiny ViT trained end to end, with the MAE head init and decay.
    out = finetune(
        enc, train, test, epochs=2, batch_size=64, lr=5e-3, layer_decay=0.75,
        warmup_epochs=0.5, seed=0,
    )  # fmt: skip
    assert out["steps"] == 400
    assert out["train_loss"][1] < out["train_loss"][0] < math.log(10)
    assert out["top1"] > 70.0  # chance is 10 %; a 2-epoch run reaches ~77 %
    assert all(torch.equal(p, q) for p, q in zip(before, enc.parameters(), strict=True))


def test_bad_arguments():
    enc, data = _small_vit(dim=16, depth=1), _random_images(10, seed=0)
    cases = [
        (dict(epochs=0), "epochs"),
        (dict(epochs=1.5), "epochs"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(min_lr=1.0), "min_lr"),
        (dict(layer_decay=0.0), "layer_decay"),
        (dict(layer_decay=1.5), "layer_decay"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(warmup_epochs=2.0), "warmup_epochs"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(aug=AugConfig(size=32)), "aug.size=32"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            finetune(enc, data, data, **kwargs)
    with pytest.raises(ValueError, match="Encoder"):
        finetune(enc.backbone, data, data)
    plain = torch.nn.Flatten()
    plain.num_features = 784
    with pytest.raises(ValueError, match="not a timm model"):
        finetune(Encoder(plain), data, data)
    with pytest.raises(ValueError, match="train is empty"):
        finetune(enc, data.subset(slice(0, 0)), data)
    small = ImageArray(torch.zeros(2, 1, 14, 14, dtype=torch.uint8), data.labels[:2], CLASSES, "x")
    with pytest.raises(ValueError, match="must match"):
        finetune(enc, data, small)
    other = ImageArray(data.images, data.labels, CLASSES[:9] + ["z"], "x")
    with pytest.raises(ValueError, match="different classes"):
        finetune(enc, data, other)
    bad = ImageArray(data.images, data.labels + 5, CLASSES, "x")
    with pytest.raises(ValueError, match="labels span"):
        finetune(enc, bad, data)
