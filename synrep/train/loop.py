"""The training loop: one code path for a CPU process and for ``torchrun`` DDP.

Reads like nanoGPT: build the data source, the encoder and the method, then step. Batches and
augmentations are pure functions of (seed, step, rank), so resuming from a checkpoint replays the
exact trajectory of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from synrep import dist
from synrep.checkpoint import Checkpoint, save_checkpoint
from synrep.config import Config
from synrep.data.sources import Source
from synrep.device import autocast_for, choose_attention, resolve_device, resolve_precision
from synrep.errors import CheckpointError, ConfigError
from synrep.factory import build_method, build_optimizer, build_source, checkpoint_config
from synrep.layout import layout
from synrep.selection.online import OnlineSelector, check_selection
from synrep.tracking import open_tracker
from synrep.train.step import TrainingDiverged, set_schedule, step_seed, train_step
from synrep.utils import ensure_writable_dir, write_json_atomic

# Config sections that define the weights' shapes and the trajectory: a checkpoint is resumed
# only into a run whose sections match.
_RESUME_SECTIONS = ("model", "method", "data", "aug", "optim", "train", "selection")
# Keys that change how batches are fetched, never which: a run may resume with other values
# (the streamed and the in-memory loader give the same batches, whatever the workers).
_RESUME_FREE = {"data.workers", "data.loader"}


def check_same_run(ck: Checkpoint, cfg: Config) -> None:
    """Refuse to resume or reuse a checkpoint trained with a different config."""
    # Read as any stored config: keys missing from an older checkpoint had their defaults then,
    # and a flat method section is an older synrep's.
    stored = json.loads(checkpoint_config(ck).to_json())
    current = json.loads(cfg.to_json())
    then_steps, now_steps = stored["train"]["steps"], current["train"]["steps"]
    if now_steps < then_steps:
        raise CheckpointError(
            f"{str(ck.path)!r} belongs to a run of train.steps={then_steps}; it can be extended "
            f"(a larger train.steps), not shortened to {now_steps}: use train.steps>={then_steps}"
            ", or start a new run with run.dir=<new folder>")
    for section in _RESUME_SECTIONS:
        then, now = _flat(stored[section]), _flat(current[section])
        if section == "train":  # raising train.steps extends the run (docs/scale.md)
            then.pop("steps", None)
            now.pop("steps", None)
        for key in [k for k in _RESUME_FREE if k.startswith(f"{section}.")]:
            then.pop(key.split(".", 1)[1], None)
            now.pop(key.split(".", 1)[1], None)
        if then != now:
            changed = sorted(k for k in set(now) | set(then) if then.get(k) != now.get(k))
            raise CheckpointError(
                f"{str(ck.path)!r} was written with a different {section!r} config (changed: "
                f"{', '.join(f'{section}.{k}' for k in changed)}); use the same config, or "
                "start a new run with run.dir=<new folder>")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"name": "mae", "mae": {"mask_ratio": 0.75}} ->
    {"name": "mae", "mae.mask_ratio": 0.75}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class _Accounting:
    """What a run spends: examples read, FLOPs of training and of scoring, and seconds of each.

    FLOPs per step are counted once, on the run's first step (torch's ``FlopCounterMode``:
    forward and backward matmuls and convolutions), and kept in the ``last`` checkpoint, so a
    resumed run reuses the count instead of running a step under the counter; step shapes are
    fixed, so totals are per-step counts times steps, which stay right across resumes. The reference
    model's one pass over the pool (cached) is reported on its own.
    """

    def __init__(self, cfg: Config, source: Source, selector) -> None:
        self.selector = selector
        groups_read = source.batch_size
        per = source.m or 1
        self.images_per_step = groups_read * per
        self.train_flops: float | None = None
        self.enabled = not cfg.train.compile  # the counter does not see inside compiled graphs
        self.score_seconds = self.train_seconds = 0.0

    def train_counter(self):
        if self.train_flops is None and self.enabled:
            return FlopCounterMode(display=False)
        return nullcontext()

    def counted(self, counter) -> None:
        if self.train_flops is None and hasattr(counter, "get_total_flops"):
            self.train_flops = float(counter.get_total_flops()) * dist.world_size()

    @property
    def score_flops(self) -> float:
        return 0.0 if self.selector is None else (self.selector.score_flops or 0.0)

    def at(self, steps: int) -> dict[str, float]:
        row = {"examples_read": float(steps * self.images_per_step),
               "score_seconds": self.score_seconds, "train_seconds": self.train_seconds}
        if self.train_flops is not None:
            row["flops"] = steps * (self.train_flops + self.score_flops)
        return row

    def summary(self, steps: int) -> dict[str, float | None]:
        return {"images_read_per_step": self.images_per_step,
                "images_read": steps * self.images_per_step,
                "train_flops_per_step": self.train_flops,
                "score_flops_per_step": self.score_flops,
                "reference_pool_flops": 0.0 if self.selector is None
                else self.selector.reference_flops,
                "total_flops": None if self.train_flops is None
                else steps * (self.train_flops + self.score_flops),
                "score_seconds": self.score_seconds, "train_seconds": self.train_seconds}


def _open_ids_file(cfg: Config, start: int):
    """RUN/train/selected.jsonl, cut back to the steps before ``start`` (a resumed run)."""
    path = layout(cfg).selected_ids
    keep = []
    if path.exists() and start > 0:
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < start:
                    keep.append(line)
            except (ValueError, KeyError):
                break  # a line cut short by a kill: everything after it is redone
    path.write_text("".join(k + "\n" for k in keep))
    return open(path, "a")


def _cut_metrics(path: Path, start: int) -> None:
    """RUN/train/metrics.jsonl, cut back to the rows of steps ``<= start`` (the checkpoint a run
    resumes from; 0 for a fresh start), so a resumed run logs each step once, as an uninterrupted
    one does. A line cut short by a kill ends what is kept: everything after it is redone. The
    file is truncated in place (one call: a kill leaves it cut or not, never half-written)."""
    if not path.exists():
        return
    keep = 0
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            if not line.endswith(b"\n") or json.loads(line)["step"] > start:
                break
        except (ValueError, KeyError, TypeError):
            break
        keep += len(line)
    os.truncate(path, keep)


def check_accumulation(cfg: Config, per_rank: int) -> None:
    """``train.accum_steps`` must split each rank's batch (of the selected samples, with online
    selection) into equal micro-batches."""
    n = cfg.train.accum_steps
    if cfg.selection.online:
        per_rank = cfg.train.batch_size // dist.world_size()
    if per_rank % n:
        raise ConfigError(f"train.accum_steps={n} must divide each rank's batch of {per_rank} "
                          f"samples (train.batch_size={cfg.train.batch_size} over "
                          f"{dist.world_size()} ranks)")


def train(cfg: Config) -> Path:
    """Train ``cfg``'s method; return the final checkpoint path. Resumes from ``last``."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    dist.init_from_env(cfg.run.device)
    device = resolve_device(cfg)
    is_main = dist.is_main()
    paths = layout(cfg)
    if is_main:
        ensure_writable_dir(paths.checkpoints, "run.dir")
    dist.barrier()

    method = build_method(cfg)
    method.to(device)
    selector = None
    if cfg.selection.online:
        if method.batch_kind != "groups" or cfg.data.source != "shards":
            raise ConfigError("selection.online selects caption groups: it needs a caption-group "
                              "method (synclr, stablerep) and data.source=shards")
        big = check_selection(cfg, cfg.train.batch_size)
        source = build_source(cfg, method.batch_kind, batch_size=big,
                              texts=method.has_text_tower)
        selector = OnlineSelector(cfg, method, source.images, device)
    else:
        source = build_source(cfg, method.batch_kind, texts=method.has_text_tower,
                              each_image=method.each_image)
    method.bind_data(source)
    check_accumulation(cfg, source.batch_size // dist.world_size())
    if cfg.train.grad_checkpointing:
        method.encoder.set_grad_checkpointing(True)
    optimizer = build_optimizer(cfg, method)

    start = 0
    counted_flops = None
    last = paths.last_checkpoint
    if last.exists():
        ck = Checkpoint(last)
        check_same_run(ck, cfg)
        ck.load_model(method)
        optimizer.load_state_dict(ck.optimizer_state())
        start = ck.step
        counted_flops = ck.extra.get("train_flops_per_step")
    if start >= cfg.train.steps and paths.final_checkpoint.exists():
        return paths.final_checkpoint

    model: torch.nn.Module = method
    if dist.world_size() > 1:
        model = DDP(method, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)

    # Autocast is chosen once: bf16/fp16 when asked (or by `auto`), full fp32 otherwise. The
    # losses compute their logits in float32 either way.
    precision = resolve_precision(cfg.train.precision, device)
    autocast = autocast_for(precision, device)
    attention = choose_attention(method, device, precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
    if is_main:
        write_json_atomic(paths.train_env, {
            "precision": precision, "precision_config": cfg.train.precision,
            "attention": attention, "kernels": torch.backends.cpu.get_cpu_capability(),
            "device": str(device), "threads": torch.get_num_threads(),
            "world_size": dist.world_size(), "torch": torch.__version__})

    tracker = None
    metrics_path = paths.metrics
    if is_main:
        tracker = open_tracker(cfg, "train", purge_step=start)
        _cut_metrics(metrics_path, start)
    drop = getattr(method.encoder.backbone, "patch_drop", None) \
        if cfg.model.patch_drop > 0 else None
    unmasked_from = cfg.train.steps - cfg.model.patch_drop_unmasked_steps
    kill_at = int(os.environ.get("SYNREP_DEBUG_KILL_AT_STEP", "-1"))  # for the resume test
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", disable=not is_main,
               dynamic_ncols=True)
    model.train()
    t0, seen = time.perf_counter(), 0
    step = start
    acct = _Accounting(cfg, source, selector)
    if counted_flops is not None:
        # counted before the kill: counting again would run this step under the FLOP counter,
        # whose dispatch changes bf16 rounding, so the resumed trajectory would leave the
        # uninterrupted one's
        acct.train_flops = float(counted_flops)
    ids_file = _open_ids_file(cfg, start) if is_main and selector and cfg.selection.log_ids \
        else None
    batches = source.batches(start, cfg.train.steps, workers=cfg.data.workers,
                             pin_memory=device.type == "cuda")
    try:
        for step, host_batch in zip(range(start, cfg.train.steps), batches):
            lr, _ = set_schedule(optimizer, cfg, step)
            method.set_step(step)
            if drop is not None:  # FLIP's unmasked tuning: the last steps see every token
                drop.prob = 0.0 if step >= unmasked_from else cfg.model.patch_drop
            seed = step_seed(cfg.run.seed, step, dist.rank())
            torch.manual_seed(seed)  # dropout / drop-path
            g = torch.Generator(device=device).manual_seed(seed)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v  # texts: list
                     for k, v in host_batch.items()}
            sel_stats: dict[str, float] = {}
            if selector is not None:
                t_sel = time.perf_counter()
                chosen = selector.select(method, batch, step)
                batch, sel_stats = chosen.batch, chosen.stats
                acct.score_seconds += time.perf_counter() - t_sel
                if ids_file is not None:
                    ids_file.write(json.dumps({"step": step, "ids": chosen.ids.tolist()}) + "\n")
            t_train = time.perf_counter()
            counter = acct.train_counter()
            try:
                result = train_step(model, method, optimizer, batch, g, autocast=autocast,
                                    scaler=scaler, grad_clip=cfg.optim.grad_clip, counter=counter,
                                    accum_steps=cfg.train.accum_steps)
            except TrainingDiverged as e:
                bar.close()
                where = (f"the last good checkpoint is {str(last)!r}" if last.exists()
                         else "no checkpoint was written yet")
                raise TrainingDiverged(
                    f"{e} at step {step}; {where}. Lower optim.lr, lengthen optim.warmup_steps, or "
                    "use train.precision=fp32") from None
            out, grad_norm = result.out, result.grad_norm
            acct.counted(counter)
            acct.train_seconds += time.perf_counter() - t_train
            seen += batch["images"].shape[:-3].numel() * dist.world_size()  # images, not groups
            done = step + 1

            if is_main and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
                rate = seen / (time.perf_counter() - t0)
                row = {"step": done, "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": rate}
                row.update({k: float(v.detach()) for k, v in out.items()})
                row.update(sel_stats)
                row.update(acct.at(done))
                tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"}, done)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
            bar.update(1)
            if is_main and (done % cfg.train.ckpt_every == 0 or done == cfg.train.steps):
                save_checkpoint(last, method, cfg.to_dict(), done, optimizer,
                                extra={"train_flops_per_step": acct.train_flops})
                if ids_file is not None:
                    ids_file.flush()
            if is_main and cfg.train.keep_every > 0 and done % cfg.train.keep_every == 0:
                save_checkpoint(paths.step_checkpoint(done), method, cfg.to_dict(), done)
            if done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    except BaseException:  # Ctrl-C, SIGTERM, a diverged loss: end the bar before the message
        bar.close()
        if tracker is not None:
            tracker.close()
        raise
    bar.close()
    if ids_file is not None:
        ids_file.close()
    if is_main:
        save_checkpoint(paths.final_checkpoint, method, cfg.to_dict(), cfg.train.steps)
        tracker.close()
        elapsed = time.perf_counter() - t0
        write_json_atomic(paths.train_summary, {
            "steps": cfg.train.steps - start, "seconds": elapsed,
            "samples_per_s": seen / max(elapsed, 1e-9),
            "accounting": acct.summary(cfg.train.steps)})
        print(f"trained {cfg.train.steps - start} steps in {elapsed:.0f}s "
              f"({seen / max(elapsed, 1e-9):.0f} images/s); checkpoint: {paths.final_checkpoint}")
    dist.barrier()
    return paths.final_checkpoint
