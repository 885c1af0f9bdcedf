"""The images stage's unit of work: one image shard, rendered from a slice of a caption shard.

A :class:`Job` is a pure function of its captions and the config, so any executor
(:mod:`synrep.images.executors`) that runs it writes the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from synrep.captions.stage import read_caption_shard
from synrep.config import Config
from synrep.data.shards import CaptionGroup, write_shard
from synrep.errors import DataError
from synrep.layout import layout


@dataclass(frozen=True)
class Job:
    """Image shard ``index``: captions ``[start, stop)`` of the caption shard ``source``."""

    index: int
    source: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.index:06d}.tar"


def render_job(cfg: Config, job: Job, renderer) -> dict[str, Any]:
    """Render and write one image shard; return its marker."""
    rows = read_caption_shard(job.source)[job.start:job.stop]
    if len(rows) != job.stop - job.start:
        raise DataError(f"caption shard {job.source!r} has {len(rows)} rows in [{job.start}, "
                        f"{job.stop}); it changed after it was marked complete: regenerate it")
    k = cfg.images.images_per_caption
    prompts = [r["caption"] for r in rows for _ in range(k)]
    ids = [r["caption_id"] for r in rows for _ in range(k)]
    ks = [j for _ in rows for j in range(k)]
    t0 = time.perf_counter()
    out = renderer.render(prompts, ids, ks, cfg.run.seed)
    seconds = time.perf_counter() - t0
    groups = []
    for i, row in enumerate(rows):
        meta = {**{key: v for key, v in row.items() if key != "caption"},
                "image_seeds": out.seeds[i * k:(i + 1) * k], "generator": renderer.provenance}
        groups.append(CaptionGroup(f"{row['caption_id']:09d}", row["caption"], meta,
                                   list(out.images[i * k:(i + 1) * k])))
    return write_shard(layout(cfg).images / job.name, groups, {
        "render_seconds": round(seconds, 3), "retried": out.retried, "source": job.source,
        "captions": [job.start, job.stop]}, image_format=cfg.images.format)
