"""The stage graph over a run directory.

``synrep run CONFIG`` runs ``run.stages`` in order into ``RUN = run.dir``. Each stage knows when its
outputs are complete and is skipped then, so a killed run resumes by running the same command.
Stages are registered objects (:mod:`synrep.stages`); nothing here knows any method by name.

One command at a time per run directory: :func:`run_stages` holds the directory's lock
(:func:`synrep.lock.run_lock`, ``RUN/.lock``) from before it writes the config until its last
stage ends, so a second command on the same directory fails at once, naming the holder. Under
torchrun only rank 0 takes it; the job's other ranks share it.
"""

from __future__ import annotations

from synrep import dist
from synrep.config import Config, save_config
from synrep.errors import ConfigError
from synrep.layout import layout
from synrep.lock import run_lock
from synrep.stages import STAGES, stage_names
from synrep.stages.core import print_summary
from synrep.utils import ensure_writable_dir
from synrep.validate import validate

__all__ = ["print_summary", "run_stages"]


def run_stages(cfg: Config, stages: list[str] | None = None, force: bool = False) -> None:
    """Run ``stages`` (default ``run.stages``) in order, skipping complete ones unless
    ``force``. Every stage's ``check`` runs first, before any stage writes anything."""
    stages = stages if stages is not None else cfg.run.stages
    validate(cfg)  # every registry name and cross-field rule, before any stage
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {unknown}; choose from {stage_names()}")
    if dist.is_main():
        ensure_writable_dir(cfg.run_dir, "run.dir")  # its probe file is named after this pid
    # Held from before the first write (the config) until the last stage ends; rank 0 only.
    with run_lock(cfg.run_dir, enabled=dist.is_main()):
        # Every stage's checks run before anything is written: a refused command changes no
        # byte, and a later stage's mistake does not waste the earlier stages' time.
        for name in stages:
            check = STAGES.get(name).check
            if check is not None:
                check(cfg)
        if dist.is_main():
            save_config(cfg, layout(cfg).config)
        for name in stages:
            stage = STAGES.get(name)
            if not force and stage.done(cfg):
                if dist.is_main():
                    print(f"[{name}] complete, skipped ({cfg.run_dir})")
                continue
            if dist.is_main():
                print(f"[{name}] running into {cfg.run_dir}")
            stage.execute(cfg)
