"""The training loop: one code path for a CPU process and for ``torchrun`` DDP.

Reads like nanoGPT: build the data source, the encoder and the method, then step. Batches and
augmentations are pure functions of (seed, step, rank), so resuming from a checkpoint replays the
exact trajectory of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from synrep.config import Config
from synrep.data.sources import ArraySource, group_texts
from synrep.errors import CheckpointError, ConfigError, SynrepError
from synrep.methods import METHODS, Method
from synrep.models import build_encoder
from synrep.train import dist
from synrep.train.checkpoint import Checkpoint, save_checkpoint
from synrep.train.schedule import warmup_cosine
from synrep.utils import ensure_writable_dir, write_json_atomic

# Config sections that define the weights' shapes and the trajectory: a checkpoint is resumed
# only into a run whose sections match.
_RESUME_SECTIONS = ("model", "method", "data", "aug", "optim", "train", "selection")


class TrainingDiverged(SynrepError):
    """The loss became NaN or infinite."""


def resolve_device(cfg: Config) -> torch.device:
    dev = cfg.run.device
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={dev!r} but no CUDA device is available; use cpu")
        if dist.world_size() > 1 or "WORLD_SIZE" in os.environ:
            dev = f"cuda:{dist.local_rank()}"
            torch.cuda.set_device(dev)
    return torch.device(dev)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX (on other CPUs bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as the loop runs it: ``auto`` is bf16 autocast where the device
    computes bf16 natively (:func:`native_bf16`) and fp32 elsewhere; other values pass through.
    On the quickstart's tiny ViT, bf16 autocast on an AVX512-BF16 CPU ran 1.5x the fp32 step rate.
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def choose_attention(model: torch.nn.Module, device: torch.device, precision: str) -> str:
    """Pick timm's attention path for training: fused (``scaled_dot_product_attention``) or
    explicit (``softmax(q k^T) v`` as matmuls). Returns ``"fused"`` or ``"explicit"``.

    On a CPU under bf16 autocast the fused kernel's backward is slow: fused against explicit, one
    attention layer forward and backward in bf16 took 26.3 / 8.7 ms at 17 tokens (the quickstart
    ViT, batch 256), 25.6 / 10.5 ms at 65 and 63.1 / 52.1 ms at 197 tokens; a whole quickstart
    training step 299 / 175 ms (in fp32 both paths took 411 ms). So bf16 on a CPU trains with
    the explicit path; everything else keeps the fused one. Both compute the same attention.
    """
    fused = not (device.type == "cpu" and precision == "bf16")
    for m in model.modules():
        if hasattr(m, "fused_attn"):  # timm's Attention and the blocks built on it
            m.fused_attn = fused
    return "fused" if fused else "explicit"


def autocast_for(precision: str, device: torch.device):
    """The autocast context of a resolved precision (fp32: none). Reusable across steps."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def shards_dir(cfg: Config, after_select: bool = True) -> str:
    """The caption-group shards a run trains on: ``data.shards``, else the ``select`` stage's
    output when the run has that stage (``after_select``), else the images stage's output."""
    if cfg.data.shards:
        return cfg.data.shards
    if after_select and "select" in cfg.run.stages:
        from synrep.selection.online import select_dir

        shards = select_dir(cfg) / "shards"
        if not shards.is_dir():
            raise ConfigError(f"no selected shards at {str(shards)!r}: run the select stage "
                              "first, or set data.shards=<folder of shards>")
        return str(shards)
    from synrep.images.stage import images_dir

    shards = str(images_dir(cfg))
    if not Path(shards).is_dir():
        raise ConfigError(
            f"data.source=shards: no images at {shards!r}; run the images stage first "
            "(add it to run.stages) or set data.shards=<folder of shards>")
    return shards


def pool_groups(cfg: Config, after_select: bool = True):
    """(shard folder, :class:`~synrep.data.shards.GroupArray`) of the first
    ``data.max_captions`` caption groups of :func:`shards_dir`."""
    from synrep.data.shards import load_groups

    d = cfg.data
    for key in ("max_captions", "max_images_per_caption"):
        if getattr(d, key) is not None and getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1 or null, got {getattr(d, key)}")
    shards = shards_dir(cfg, after_select)
    groups = load_groups(shards, max_groups=d.max_captions)
    if d.max_captions is not None and len(groups) < d.max_captions:
        raise ConfigError(
            f"data.max_captions={d.max_captions} but {shards!r} holds only {len(groups)} "
            "caption groups; render more images or lower it")
    return shards, groups


def _class_mask(labels: torch.Tensor, classes: list[int], where: str) -> torch.Tensor:
    """Boolean mask of the samples whose label is in ``data.classes`` (an error if none are)."""
    keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    if not keep.any():
        raise ConfigError(f"data.classes={classes}: {where} has no samples with these labels "
                          f"(its labels are {sorted(set(labels.tolist()))[:20]})")
    return keep


def build_source(cfg: Config, batch_kind: str, batch_size: int | None = None,
                 texts: bool = False, each_image: bool = False) -> ArraySource:
    """The training batches described by ``cfg.data`` (``batch_size`` overrides
    ``train.batch_size``, for the super-batches of online selection; ``texts`` adds each caption
    group's caption, or a LaCLIP rewrite of it, to every batch for text-tower methods;
    ``each_image`` makes every image of a caption group its own sample, for methods that learn
    from single images)."""
    d = cfg.data
    if cfg.method.rewrites and not texts:
        raise ConfigError(f"method.rewrites=true (LaCLIP) rewrites the captions of a text tower; "
                          f"method {cfg.method.name!r} has none: use clip or stablerep_pp")
    captions = None
    if d.source == "dataset":
        from synrep.data.datasets import load_dataset

        ds = load_dataset(d.dataset, d.split, root=d.root, image_size=d.image_size)
        if batch_kind == "groups" or texts:
            raise ConfigError(f"method {cfg.method.name!r} trains on caption groups"
                              f"{' and their captions' if texts else ''}: set data.source=shards")
        images, labels = ds.images, ds.labels
        if d.classes is not None:
            keep = _class_mask(labels, d.classes, f"{d.dataset}/{d.split}")
            images, labels = images[keep], labels[keep]
        m = None
    else:
        shards, groups = pool_groups(cfg)
        images = groups.images  # (G, k, C, H, W)
        if d.max_images_per_caption is not None:
            if images.shape[1] < d.max_images_per_caption:
                raise ConfigError(
                    f"data.max_images_per_caption={d.max_images_per_caption} but {shards!r} has "
                    f"{images.shape[1]} images per caption")
            images = images[:, : d.max_images_per_caption]
        labels = None
        if all("label" in meta for meta in groups.metas):
            labels = torch.tensor([int(meta["label"]) for meta in groups.metas])
        if texts:  # language supervision: each group's caption, with its LaCLIP rewrites
            from synrep.captions.stage import read_rewrites, rewrites_dir

            rewrites = read_rewrites(rewrites_dir(cfg)) if cfg.method.rewrites else None
            captions = group_texts(groups.captions, groups.keys, groups.metas, rewrites,
                                   repr(shards))
        if d.classes is not None:
            if labels is None:
                raise ConfigError(
                    f"data.classes={d.classes} needs a label in every caption group's metadata, "
                    f"but {shards!r} has groups without one; remove data.classes")
            keep = _class_mask(labels, d.classes, shards)
            images, labels = images[keep], labels[keep]
            if captions is not None:
                captions = [c for c, k in zip(captions, keep.tolist()) if k]
        m = cfg.method.images_per_caption if batch_kind == "groups" else 1
        if each_image and batch_kind != "groups":  # (G, k, ...) -> G * k single images
            k = images.shape[1]
            images = images.flatten(0, 1)
            labels = labels.repeat_interleave(k) if labels is not None else None
            captions = [c for c in captions for _ in range(k)] if captions is not None else None
            m = None
    return ArraySource(images, labels, batch_size or cfg.train.batch_size, cfg.run.seed,
                       dist.rank(), dist.world_size(), images_per_group=m, texts=captions)


def build_method(cfg: Config) -> Method:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    if cfg.method.low_res_share and cfg.method.name != "synclr":
        raise ConfigError(f"method.low_res_share is a synclr option; method "
                          f"{cfg.method.name!r} trains at aug.size: set method.low_res_share=0")
    encoder = build_encoder(cfg.model)
    return METHODS.get(cfg.method.name)(cfg, encoder)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on biases, norms, position embeddings and class tokens (as in timm/DeiT).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1024 + rank


def check_same_run(ck: Checkpoint, cfg: Config) -> None:
    """Refuse to resume or reuse a checkpoint trained with a different config."""
    stored, current = ck.config, json.loads(cfg.to_json())
    defaults = json.loads(Config().to_json())
    for section in _RESUME_SECTIONS:
        # Keys (or sections) missing from an older checkpoint had their defaults then.
        then = {**defaults[section], **stored.get(section, {})}
        if then != current[section]:
            changed = sorted(k for k in set(current[section]) | set(then)
                             if then.get(k) != current[section].get(k))
            raise CheckpointError(
                f"{str(ck.path)!r} was written with a different {section!r} config (changed: "
                f"{', '.join(f'{section}.{k}' for k in changed)}); use the same config, or "
                "start a new run with run.dir=<new folder>")


def checkpoint_dir(cfg: Config) -> Path:
    return cfg.run_dir / "train" / "checkpoints"


def final_checkpoint(cfg: Config) -> Path:
    return checkpoint_dir(cfg) / "final.safetensors"


class _Accounting:
    """What a run spends: examples read, FLOPs of training and of scoring, and seconds of each.

    FLOPs per step are counted once, on the first step this process runs (torch's
    ``FlopCounterMode``: forward and backward matmuls and convolutions); step shapes are fixed,
    so totals are per-step counts times steps, which stay right across resumes. The reference
    model's one pass over the pool (cached) is reported on its own.
    """

    def __init__(self, cfg: Config, source: ArraySource, selector) -> None:
        self.selector = selector
        groups_read = source.batch_size
        per = source.m or 1
        self.images_per_step = groups_read * per
        self.train_flops: float | None = None
        self.enabled = not cfg.train.compile  # the counter does not see inside compiled graphs
        self.score_seconds = self.train_seconds = 0.0

    def train_counter(self):
        if self.train_flops is None and self.enabled:
            from torch.utils.flop_counter import FlopCounterMode

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
    path = cfg.run_dir / "train" / "selected.jsonl"
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


def train(cfg: Config) -> Path:
    """Train ``cfg``'s method; return the final checkpoint path. Resumes from ``last``."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    dist.init_from_env(cfg.run.device)
    device = resolve_device(cfg)
    is_main = dist.is_main()
    run_dir = cfg.run_dir
    ckpt_dir = checkpoint_dir(cfg)
    if is_main:
        ensure_writable_dir(ckpt_dir, "run.dir")
    dist.barrier()

    method = build_method(cfg)
    method.to(device)
    selector = None
    if cfg.selection.online:
        from synrep.selection.online import OnlineSelector, check_selection

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
    lr_peak = cfg.optim.lr * cfg.train.batch_size / 256
    optimizer = torch.optim.AdamW(_param_groups(method, cfg.optim.weight_decay), lr=lr_peak,
                                  betas=cfg.optim.betas)

    start = 0
    last = ckpt_dir / "last.safetensors"
    if last.exists():
        ck = Checkpoint(last)
        check_same_run(ck, cfg)
        ck.load_model(method)
        optimizer.load_state_dict(ck.optimizer_state())
        start = ck.step
    if start >= cfg.train.steps and final_checkpoint(cfg).exists():
        return final_checkpoint(cfg)

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
        write_json_atomic(run_dir / "train" / "env.json", {
            "precision": precision, "precision_config": cfg.train.precision,
            "attention": attention,
            "device": str(device), "threads": torch.get_num_threads(),
            "world_size": dist.world_size(), "torch": torch.__version__})

    writer = None
    metrics_path = run_dir / "train" / "metrics.jsonl"
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "train" / "tb"), purge_step=start)
    kill_at = int(os.environ.get("SYNREP_DEBUG_KILL_AT_STEP", "-1"))  # for the resume test
    final_lr = lr_peak * cfg.optim.min_lr_ratio
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", disable=not is_main,
               dynamic_ncols=True)
    model.train()
    t0, seen = time.perf_counter(), 0
    step = start
    acct = _Accounting(cfg, source, selector)
    ids_file = _open_ids_file(cfg, start) if is_main and selector and cfg.selection.log_ids \
        else None
    for step in range(start, cfg.train.steps):
        lr = warmup_cosine(step, cfg.train.steps, lr_peak, cfg.optim.warmup_steps, final_lr)
        wd = cfg.optim.weight_decay
        if cfg.optim.weight_decay_end is not None:  # cosine from weight_decay to weight_decay_end
            wd = warmup_cosine(step, cfg.train.steps, cfg.optim.weight_decay, 0,
                               cfg.optim.weight_decay_end)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group["decay"]:
                group["weight_decay"] = wd
        method.set_step(step)
        seed = _step_seed(cfg.run.seed, step, dist.rank())
        torch.manual_seed(seed)  # dropout / drop-path
        g = torch.Generator(device=device).manual_seed(seed)
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v  # texts: list
                 for k, v in source.batch(step).items()}
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
        with counter:  # one context over forward and backward: FLOPs of the whole step
            with autocast:
                out = model(batch, g)
            loss = out["loss"]
            if not math.isfinite(float(dist.all_reduce_mean(loss.detach().float()))):
                bar.close()
                where = (f"the last good checkpoint is {str(last)!r}" if last.exists()
                         else "no checkpoint was written yet")
                raise TrainingDiverged(
                    f"training loss became {float(loss.detach())} at step {step}; {where}. "
                    "Lower optim.lr, lengthen optim.warmup_steps, or use train.precision=fp32")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        acct.counted(counter)
        scaler.unscale_(optimizer)  # a no-op unless fp16 loss scaling is on
        # The norm is logged either way; an infinite limit measures it without clipping.
        limit = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(method.parameters(), limit)
        scaler.step(optimizer)
        scaler.update()
        method.after_step()
        acct.train_seconds += time.perf_counter() - t_train
        seen += batch["images"].shape[:-3].numel() * dist.world_size()  # images, not groups
        done = step + 1

        if is_main and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
            rate = seen / (time.perf_counter() - t0)
            row = {"step": done, "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": rate}
            row.update({k: float(v.detach()) for k, v in out.items()})
            row.update(sel_stats)
            row.update(acct.at(done))
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, done)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
        bar.update(1)
        if is_main and (done % cfg.train.ckpt_every == 0 or done == cfg.train.steps):
            save_checkpoint(last, method, cfg.to_dict(), done, optimizer)
            if ids_file is not None:
                ids_file.flush()
        if is_main and cfg.train.keep_every > 0 and done % cfg.train.keep_every == 0:
            save_checkpoint(ckpt_dir / f"step_{done:06d}.safetensors", method, cfg.to_dict(), done)
        if done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if ids_file is not None:
        ids_file.close()
    if is_main:
        save_checkpoint(final_checkpoint(cfg), method, cfg.to_dict(), cfg.train.steps)
        writer.close()
        elapsed = time.perf_counter() - t0
        write_json_atomic(run_dir / "train" / "summary.json", {
            "steps": cfg.train.steps - start, "seconds": elapsed,
            "samples_per_s": seen / max(elapsed, 1e-9),
            "accounting": acct.summary(cfg.train.steps)})
        print(f"trained {cfg.train.steps - start} steps in {elapsed:.0f}s "
              f"({seen / max(elapsed, 1e-9):.0f} images/s); checkpoint: {final_checkpoint(cfg)}")
    dist.barrier()
    return final_checkpoint(cfg)
