"""One training step, as the trainer takes it: the public building block that the training loop
and the benchmarks share, so a benchmark times exactly what ``synrep train`` runs.

    method = build_method(cfg)                      # synrep.factory
    optimizer = build_optimizer(cfg, method)
    for step in range(steps):
        set_schedule(optimizer, cfg, step)          # warm-up + cosine lr, cosine weight decay
        method.set_step(step)
        g = torch.Generator().manual_seed(step_seed(cfg.run.seed, step, rank))
        result = train_step(method, method, optimizer, batch, g, grad_clip=cfg.optim.grad_clip)
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from synrep import dist
from synrep.config import Config
from synrep.errors import SynrepError
from synrep.factory import peak_lr
from synrep.methods import Method
from synrep.schedule import warmup_cosine


class TrainingDiverged(SynrepError):
    """The loss became NaN or infinite."""


@dataclass
class StepResult:
    out: dict[str, torch.Tensor]  # the method's outputs: "loss" and its logged terms
    grad_norm: torch.Tensor  # total gradient norm before clipping


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step on one rank: batches, augmentations and dropout are pure functions
    of ``(run.seed, step, rank)``, so a resumed run replays an uninterrupted one exactly."""
    return (seed * 1_000_003 + step) * 1024 + rank


def set_schedule(optimizer: torch.optim.Optimizer, cfg: Config, step: int) -> tuple[float, float]:
    """Set ``step``'s learning rate (linear warm-up, then cosine to ``optim.min_lr_ratio`` of the
    peak) and weight decay (cosine to ``optim.weight_decay_end`` when given) on every parameter
    group; weight decay only on groups marked ``decay`` (:func:`synrep.factory.param_groups`).
    Returns ``(lr, weight_decay)``."""
    lr_peak = peak_lr(cfg)
    lr = warmup_cosine(step, cfg.train.steps, lr_peak, cfg.optim.warmup_steps,
                       lr_peak * cfg.optim.min_lr_ratio)
    wd = cfg.optim.weight_decay
    if cfg.optim.weight_decay_end is not None:  # cosine from weight_decay to weight_decay_end
        wd = warmup_cosine(step, cfg.train.steps, cfg.optim.weight_decay, 0,
                           cfg.optim.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay", True):
            group["weight_decay"] = wd
    return lr, wd


def micro_batches(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Split a batch into ``n`` equal micro-batches along the sample axis: every tensor and list
    whose length is the batch size is cut, anything else (the step number) is shared."""
    if n == 1:
        return [batch]
    size = len(batch["images"])
    if size % n:
        raise ValueError(f"a batch of {size} samples does not split into {n} micro-batches")
    per = size // n
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in batch.items():
        cut = (torch.is_tensor(value) and value.ndim > 0 and len(value) == size) or (
            isinstance(value, list) and len(value) == size)
        for i in range(n):
            out[i][key] = value[i * per : (i + 1) * per] if cut else value
    return out


def train_step(model: torch.nn.Module, method: Method, optimizer: torch.optim.Optimizer,
               batch: dict[str, Any], g: torch.Generator, *,
               autocast: AbstractContextManager | None = None,
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0,
               counter: AbstractContextManager | None = None,
               accum_steps: int = 1) -> StepResult:
    """Forward ``batch`` through ``model`` (the method, or its DDP / compiled wrapper) under
    ``autocast``, check the loss on every rank, backpropagate, clip the gradient norm at
    ``grad_clip`` (0: measured, not clipped), step the optimizer and update the method's frozen
    parts (``method.after_step()``, an EMA teacher).

    ``accum_steps`` > 1 splits the batch into that many micro-batches (:func:`micro_batches`)
    taken one after another, each loss scaled by ``1 / accum_steps``, gradients summed (DDP
    synchronises on the last one only), then one optimizer step: the gradient of the mean of
    the micro-batch losses. A contrastive loss sees the negatives of its micro-batch only.

    ``scaler``: fp16 loss scaling (None: none). ``counter``: a context around forward and
    backward, such as torch's ``FlopCounterMode``. Raises :class:`TrainingDiverged` when the
    loss is not finite on any rank, before any weight changes.
    """
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    parts = micro_batches(batch, accum_steps)
    outs: list[dict[str, torch.Tensor]] = []
    with counter or nullcontext():  # one context over forward and backward: a whole step
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            no_sync = getattr(model, "no_sync", None)
            with (no_sync() if no_sync is not None and not last else nullcontext()):
                with autocast or nullcontext():
                    out = model(part, g)
                loss = out["loss"]
                if not math.isfinite(float(dist.all_reduce_mean(loss.detach().float()))):
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingDiverged(f"training loss became {float(loss.detach())}")
                if i == 0:  # after the forward: the freed gradients' memory serves backward
                    optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss / len(parts) if len(parts) > 1 else loss).backward()
            outs.append({k: v.detach() for k, v in out.items()})
    if len(outs) > 1:
        out = {k: torch.stack([o[k].float() for o in outs]).mean() for k in outs[0]}
    scaler.unscale_(optimizer)  # a no-op unless fp16 loss scaling is on
    # The norm is logged either way. Gradients are scaled only when it exceeds the limit, which
    # is what clip_grad_norm_ computes (it multiplies by exactly 1 otherwise), without a pass
    # over every gradient on the steps that need none.
    params = [p for p in method.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if grad_clip > 0 and float(grad_norm) + 1e-6 > grad_clip:  # clip_grad_norm_'s coefficient < 1
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    method.after_step()
    return StepResult(out, grad_norm)
