"""End-to-end fine-tuning with layer-wise learning-rate decay (the BEiT / MAE protocol).

docs/methods.md section 1, "Evaluation protocols": SynCLR fine-tunes on ImageNet "MAE/BEiT style,
layer decay 0.65". The recipe (BEiT, Bao et al. 2021, arXiv 2106.08254; MAE, He et al. 2021,
arXiv 2111.06377, appendix: end-to-end fine-tuning):

- a linear head on the encoder's pooled feature, its weight drawn from N(0, 2e-5^2) (MAE);
- AdamW on every parameter; block ``i`` (0-based) of a depth-``L`` ViT gets the learning rate
  scaled by ``layer_decay ** (L - i)``, the stem (patch embedding, CLS token, position embedding)
  ``layer_decay ** (L + 1)``, the head 1, so the pretrained lower layers move least;
- no weight decay on biases, norms, the position embedding and the CLS token;
- a per-step linear warm-up followed by a cosine decay; label smoothing.

The grouping is timm's own (:func:`timm.optim.param_groups_layer_decay`, the port of BEiT's
optimizer factory), driven by each backbone's ``group_matcher``. One deviation comes with it: timm
groups a ViT's final norm with the last block (scale ``layer_decay``), where BEiT and MAE give it
the head's scale 1. Mixup, CutMix and RandAugment of the full MAE recipe are not implemented:
training images get the project's batch augmentation (:class:`synrep.data.augment.BatchAugment`)
when given one, else a random horizontal flip.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from tqdm.auto import tqdm

from synrep.config import AugConfig
from synrep.data.augment import BatchAugment
from synrep.data.datasets import ImageArray
from synrep.eval.linear import flush_denormals, stratified_split
from synrep.models import Encoder
from synrep.schedule import warmup_cosine

__all__ = ["finetune", "layer_decay_param_groups"]

log = logging.getLogger(__name__)

_HEAD_INIT_STD = 2e-5  # MAE's fine-tuning head init (after MoCo v3)
_EVAL_BATCH = 1024


def layer_decay_param_groups(
    model: nn.Module, *, weight_decay: float, layer_decay: float
) -> list[dict]:
    """AdamW parameter groups with BEiT's layer-wise lr scales, from timm's helper.

    Each group holds ``params``, ``weight_decay`` and ``lr_scale``. The layer ids come from the
    model's ``group_matcher``; for a ViT of depth L: stem (patch embedding, CLS token, position
    embedding) 0, block i -> i + 1, the final norm with the last block (L), everything else, the
    head included, L + 1. A parameter of layer ``j`` gets ``layer_decay ** (L + 1 - j)``.
    1-d parameters (biases, norm weights) and the names in the model's ``no_weight_decay()`` (ViT:
    ``pos_embed``, ``cls_token``, ...) get no weight decay.

    Args:
        model: a timm model (any ``nn.Module`` with ``group_matcher``; others get one layer).
        weight_decay: AdamW's decoupled weight decay for the decayed groups.
        layer_decay: the per-layer lr factor, in (0, 1].
    """
    no_weight_decay = getattr(model, "no_weight_decay", None)  # timm models name theirs
    no_decay = no_weight_decay() if no_weight_decay is not None else set()
    return param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        no_weight_decay_list=sorted(no_decay),
        layer_decay=layer_decay,
    )


def _with_head(encoder: Encoder, num_classes: int, generator: torch.Generator) -> Encoder:
    """A deep copy of ``encoder`` whose backbone ends in a fresh ``num_classes`` linear head.

    timm's ``reset_classifier`` puts the head where the backbone's ``forward_head`` applies it to
    the pooled feature (the feature :meth:`Encoder.forward` returns), and where the backbone's
    ``group_matcher`` assigns it to the top layer.
    """
    net = copy.deepcopy(encoder)
    backbone: Any = net.backbone  # a timm model: its classifier methods are not in nn.Module
    backbone.reset_classifier(num_classes)
    head = backbone.get_classifier()
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            w = torch.randn(head.weight.shape, generator=generator) * _HEAD_INIT_STD
            head.weight.copy_(w)
            if head.bias is not None:
                head.bias.zero_()
    return net


def _check_args(
    encoder: Encoder,
    train: ImageArray,
    test: ImageArray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    min_lr: float,
    layer_decay: float,
    weight_decay: float,
    warmup_epochs: float,
    label_smoothing: float,
    aug: AugConfig | None,
    val_fraction: float,
) -> None:
    if not isinstance(encoder, Encoder):
        raise ValueError(f"encoder must be a synrep Encoder, got {type(encoder).__name__}")
    if not hasattr(encoder.backbone, "reset_classifier"):
        raise ValueError(
            f"the encoder's backbone {type(encoder.backbone).__name__} is not a timm model "
            "(no reset_classifier), so no classification head can be attached"
        )
    for name, data in (("train", train), ("test", test)):
        if not isinstance(data, ImageArray):
            raise ValueError(f"{name} must be an ImageArray, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError(f"{name} is empty")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(
            f"train images are {tuple(train.images.shape[1:])} but test images are "
            f"{tuple(test.images.shape[1:])} (C, H, W); they must match"
        )
    if train.classes != test.classes:
        raise ValueError(
            f"train and test have different classes ({len(train.classes)} vs "
            f"{len(test.classes)}: {train.classes[:3]}... vs {test.classes[:3]}...)"
        )
    k = len(train.classes)
    for name, data in (("train", train), ("test", test)):
        lo, hi = int(data.labels.min()), int(data.labels.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"{name} labels span {lo}..{hi}, outside 0..{k - 1} ({k} classes)")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = no decay), got {layer_decay}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1) (0 = no validation), got {val_fraction}")
    size = tuple(train.images.shape[2:])
    if aug is not None and (aug.size, aug.size) != size:
        raise ValueError(
            f"aug.size={aug.size} but the images are {size[0]}x{size[1]}; fine-tuning trains and "
            "tests at the image size, so set aug.size to it"
        )


@torch.no_grad()
def _top1(net: Encoder, images: Tensor, labels: Tensor, device: torch.device) -> float:
    """Top-1 % of ``net``'s logits on uint8 ``images [N, C, H, W]`` (eval mode)."""
    net.eval()
    correct = 0
    for s in range(0, len(images), _EVAL_BATCH):
        x = images[s : s + _EVAL_BATCH].to(device).float() / 255.0
        logits = net.backbone(net.normalize(x))  # (B, K)
        correct += int((logits.argmax(1).cpu() == labels[s : s + _EVAL_BATCH]).sum())
    return 100.0 * correct / len(images)


def finetune(
    encoder: Encoder,
    train: ImageArray,
    test: ImageArray,
    *,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 1e-3,
    min_lr: float = 1e-6,
    layer_decay: float = 0.75,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0.0,
    label_smoothing: float = 0.1,
    aug: AugConfig | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Fine-tune a copy of ``encoder`` with a linear head end to end; report test top-1.

    The caller's encoder is never modified. Every parameter group of
    :func:`layer_decay_param_groups` runs AdamW (betas 0.9, 0.999) with learning rate
    ``lr_scale * s(t)`` at step ``t``, where ``s`` warms up linearly over ``warmup_epochs`` and
    then decays to ``min_lr`` along a cosine (:func:`synrep.schedule.warmup_cosine`); ``lr``
    is used as given (no batch-size scaling). Each epoch is one seeded permutation of the training
    images in batches of ``batch_size`` (the last one smaller). With the same seed the run is
    deterministic on the CPU: one generator draws the head init, the permutations and the
    augmentations, and the global RNG (dropout, drop path) is reseeded inside a fork.

    Args:
        encoder: the (pretrained) encoder; its backbone must be a timm model.
        train: labelled training images; test: the images top-1 is measured on.
        epochs: passes over the training images.
        batch_size: images per step.
        lr: peak learning rate of the top layer.
        min_lr: the learning rate the cosine ends at (MAE: 1e-6).
        layer_decay: per-layer lr factor (BEiT/MAE: 0.65 for ViT-B, 0.75 for ViT-L; 1 = none).
        weight_decay: AdamW decoupled weight decay on weight matrices.
        warmup_epochs: length of the linear warm-up (may be fractional).
        label_smoothing: of the cross-entropy.
        aug: batch augmentation of the training images (``aug.size`` = the image size); None
            means a random horizontal flip only.
        val_fraction: share of each training class held out (stratified, seeded) to report
            ``val_top1`` on; 0 trains on all of ``train``.
        seed: seed of everything random.
        device: where the model trains.

    Returns:
        ``{"top1": test top-1 %, "train_loss": [mean loss of each epoch], "epochs": epochs,
        "steps": optimizer steps}``, plus ``"val_top1"`` (%) when ``val_fraction > 0``.
    """
    # fine-tuning revisits every image each epoch: a set read from disk is decoded once
    train, test = (x.in_memory() if isinstance(x, ImageArray) else x for x in (train, test))
    _check_args(
        encoder,
        train,
        test,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        min_lr=min_lr,
        layer_decay=layer_decay,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        aug=aug,
        val_fraction=val_fraction,
    )
    dev = torch.device(device)
    t0 = time.perf_counter()
    if val_fraction > 0:
        fit_idx, val_idx = stratified_split(train.labels, val_fraction, seed)
        fit, val = train.subset(fit_idx), train.subset(val_idx)
    else:
        fit, val = train, None

    gen = torch.Generator().manual_seed(seed)  # head init, permutations; CPU
    # BatchAugment draws on the images' device, which needs a generator living there.
    aug_gen = gen if dev.type == "cpu" else torch.Generator(dev).manual_seed(seed)
    augment = BatchAugment(aug) if aug is not None else None
    images, labels = fit.images.to(dev), fit.labels.to(dev)  # uint8: 4x smaller than float
    n = len(images)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)

    fork_devices: list[int] = []
    if dev.type == "cuda":
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices), flush_denormals():
        torch.manual_seed(seed)  # dropout / drop path, without touching the caller's RNG state
        net = _with_head(encoder, len(train.classes), gen).to(dev)
        groups = layer_decay_param_groups(
            net.backbone, weight_decay=weight_decay, layer_decay=layer_decay
        )
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))

        epoch_loss: list[float] = []
        step = 0
        bar = tqdm(total=total, desc="fine-tune", unit="step")
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(n, generator=gen).to(dev)
            loss_sum = 0.0
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size]
                x, y = images[idx], labels[idx]  # (B, C, H, W) uint8, (B,)
                if augment is not None:
                    x = augment(x, aug_gen)
                else:
                    x = x.float() / 255.0
                    flip = torch.rand(len(x), 1, 1, 1, generator=aug_gen, device=dev) < 0.5
                    x = torch.where(flip, x.flip(3), x)
                base = warmup_cosine(step, total, lr, warmup, min_lr)
                for g in opt.param_groups:
                    g["lr"] = base * g["lr_scale"]
                logits = net.backbone(net.normalize(x))  # (B, K)
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"fine-tuning diverged at step {step} (loss {value}, lr {base:.3g}); "
                        "lower lr or add warmup_epochs"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += value * len(idx)
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", lr=f"{base:.2e}")
            epoch_loss.append(loss_sum / n)
        bar.close()

        out: dict = {
            "top1": _top1(net, test.images, test.labels, dev),
            "train_loss": epoch_loss,
            "epochs": epochs,
            "steps": step,
        }
        if val is not None:
            out["val_top1"] = _top1(net, val.images, val.labels, dev)
    log.info(
        "fine-tune: %d epochs, %d steps, final train loss %.4f, test top-1 %.2f%%%s in %.1fs",
        epochs,
        step,
        epoch_loss[-1],
        out["top1"],
        f", val top-1 {out['val_top1']:.2f}%" if val is not None else "",
        time.perf_counter() - t0,
    )
    return out
