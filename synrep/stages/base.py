"""The stage interface: a named step of ``synrep run`` over a run directory.

A :class:`Stage` knows how to run, when its outputs are complete (so a finished stage is skipped
and a killed run resumes by running the same command), which processes of a ``torchrun`` job run
it, and what it reads. Stages are looked up by name in :data:`STAGES`; a method that brings its
own stages (MoCE's ``cluster`` and ``search``) registers them in its own module under
``synrep/stages/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from synrep import dist
from synrep.config import Config
from synrep.registry import Registry

Ranks = Literal["main", "all"]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    ``run(cfg)`` does the work; ``done(cfg)`` is True when the outputs for ``cfg`` are complete.
    ``ranks(cfg)``: ``"main"`` when rank 0 runs it while the other ranks wait (work that is
    global, such as caption dedup), ``"all"`` when every rank runs it (DDP training, rank-sharded
    rendering). ``needs``: the stages whose outputs it reads, when they are in the run.
    ``check(cfg)``, when given, validates the config before any stage of the run starts, so a
    mistake is found before hours of earlier stages. ``order`` places it in ``synrep run``'s
    canonical sequence. ``reruns``: a cheap stage whose inputs change whenever another stage
    runs (the report) is never complete and always runs again.
    """

    name: str
    run: Callable[[Config], object]
    done: Callable[[Config], bool]
    order: int
    ranks: Callable[[Config], Ranks] = lambda cfg: "main"
    needs: tuple[str, ...] = ()
    check: Callable[[Config], None] | None = None
    reruns: bool = False
    help: str = ""

    def execute(self, cfg: Config) -> None:
        """Run on the ranks this stage runs on; every rank leaves together."""
        if self.ranks(cfg) == "all" or dist.is_main():
            self.run(cfg)
        dist.barrier()


STAGES: Registry[Stage] = Registry("stage")


def register_stage(stage: Stage) -> Stage:
    return STAGES.add(stage.name, stage)


def stage_names() -> list[str]:
    """Every registered stage, in ``synrep run``'s canonical order."""
    return sorted(STAGES, key=lambda name: STAGES.get(name).order)
