"""The images stage: caption shards -> k images per caption -> WebDataset shards.

The unit of work is an image shard: ``images.shard_size`` consecutive captions of one caption
shard, a pure function of those captions and the config, written atomically with its completion
marker (:func:`synrep.data.shards.write_shard`). Executors (:mod:`synrep.images.executors`) only
decide which process renders which shard, so every executor writes the same bytes. A rerun
skips complete shards and redoes partial ones; ``sizes.json`` and ``stats.json`` are written once
every shard is complete.

Each sample holds ``{key}.txt`` (the caption), ``{key}.json`` (the caption row's provenance, the
per-image seeds and the generator settings) and ``{key}.0.png ... {key}.{k-1}.png``; the key is
the caption id, zero-padded to 9 digits.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from synrep.captions.stage import caption_shards, read_caption_shard
from synrep.config import Config
from synrep.data.shards import complete_shards, marker_path, read_marker, write_sizes
from synrep.errors import ConfigError
from synrep.images.executors import EXECUTORS, own_jobs
from synrep.images.jobs import Job
from synrep.layout import layout
from synrep.utils import (
    check_same_settings,
    ensure_writable_dir,
    remove_stale_temps,
    write_json_atomic,
)

CONFIG_FILE = "config.json"
STATS_FILE = "stats.json"
# settings that do not change a shard's bytes (executors write identical shards)
_NOT_IN_FINGERPRINT = ("executor", "devices")


def _fingerprint(cfg: Config) -> dict[str, Any]:
    d = {k: v for k, v in asdict(cfg.images).items() if k not in _NOT_IN_FINGERPRINT}
    return {"seed": cfg.run.seed, **d}


def _check_config(cfg: Config) -> None:
    c = cfg.images
    if (c.images_per_caption < 1 or (c.steps is not None and c.steps < 1) or c.batch_size < 1
            or c.shard_size < 1):
        raise ConfigError("images.images_per_caption, steps, batch_size and shard_size must be "
                          ">= 1")
    for key in ("resolution", "output_size"):
        v = getattr(c, key)
        if v is not None and v < 8:
            raise ConfigError(f"images.{key} must be >= 8 pixels or null, got {v}")
    if c.max_retries < 0:
        raise ConfigError(f"images.max_retries must be >= 0, got {c.max_retries}")


def plan_jobs(cfg: Config) -> list[Job]:
    """Image shards over the complete caption set, in caption order. Every caption shard is read
    and validated first (a small cost next to rendering), so a malformed one stops the stage
    before any image is drawn."""
    src = Path(cfg.images.captions) if cfg.images.captions else layout(cfg).captions
    jobs: list[Job] = []
    for shard in caption_shards(src):
        n = len(read_caption_shard(shard))
        for start in range(0, n, cfg.images.shard_size):
            jobs.append(Job(len(jobs), str(shard), start, min(n, start + cfg.images.shard_size)))
    return jobs


def check_images(cfg: Config) -> None:
    """The images stage's checks that need no write: its settings, and that the shards already in
    RUN/images were made with them."""
    _check_config(cfg)
    out = layout(cfg).images
    path = out / CONFIG_FILE
    if path.exists():
        check_same_settings(json.loads(path.read_text()), _fingerprint(cfg),
                            f"{str(out)!r} holds images made", prefix="images.")


def check_same_config(cfg: Config, out: Path) -> None:
    """Refuse to add shards to an images folder made with another config."""
    path = out / CONFIG_FILE
    current = _fingerprint(cfg)
    if path.exists():
        check_same_settings(json.loads(path.read_text()), current,
                            f"{str(out)!r} holds images made", prefix="images.")
    else:
        write_json_atomic(path, current)


def images_complete(cfg: Config) -> bool:
    out = layout(cfg).images
    if not (out / STATS_FILE).exists() or not (out / CONFIG_FILE).exists():
        return False
    if json.loads((out / CONFIG_FILE).read_text()) != _fingerprint(cfg):
        return False  # the stage reports which keys changed
    stats = json.loads((out / STATS_FILE).read_text())
    return all(marker_path(out / name).exists() for name in stats.get("shards", []))


def run_images(cfg: Config) -> dict[str, Any] | None:
    """Render every caption of the run (or of ``images.captions``); resumable.

    Returns the stage's stats once every shard is complete (None on a rank that finished its
    own shards while others still work)."""
    _check_config(cfg)
    out = ensure_writable_dir(layout(cfg).images, "run.dir")
    check_same_config(cfg, out)
    jobs = plan_jobs(cfg)
    done = {p.name for p in complete_shards(out)}
    pending = [j for j in jobs if j.name not in done]
    for j in own_jobs(cfg, pending):  # a killed writer's leftovers: only a dead pid's temp file
        remove_stale_temps(out / j.name)
    threads = torch.get_num_threads()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    t0 = time.perf_counter()
    try:
        EXECUTORS.get(cfg.images.executor)(cfg, pending)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    done = {p.name for p in complete_shards(out)}
    if any(j.name not in done for j in jobs):
        return None  # other ranks still rendering; their last one writes the stats
    return finish(cfg, jobs, seconds, {j.name for j in pending})


def finish(cfg: Config, jobs: list[Job], seconds: float, rendered: set[str]) -> dict[str, Any]:
    out = layout(cfg).images
    sizes = write_sizes(out)
    markers = {j.name: read_marker(out / j.name) or {} for j in jobs}
    n_images = sum(m["images"] for m in markers.values())
    new_images = sum(markers[name]["images"] for name in rendered)
    stats = {"shards": [j.name for j in jobs], "samples": sum(sizes.values()),
             "images": n_images, "retried": sum(m.get("retried", 0) for m in markers.values()),
             "render_seconds": round(sum(m.get("render_seconds", 0.0)
                                         for m in markers.values()), 3),
             "config": _fingerprint(cfg)}
    write_json_atomic(out / STATS_FILE, stats)
    rate = f"; {new_images / seconds:,.1f} images/s" if rendered and seconds > 0 else ""
    print(f"images: {stats['samples']:,} captions x {cfg.images.images_per_caption} = "
          f"{n_images:,} images in {len(jobs)} shards, {stats['retried']} re-drawn{rate} -> "
          f"{out}")
    return stats
