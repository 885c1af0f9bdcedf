"""Executors: which process renders which image shard. Each shard is a pure function of its
captions and the config, so all executors write the same bytes.

- ``local``: this process, one shard after another.
- ``pool``: a local process pool, one worker per entry of ``images.devices`` (one per GPU).
- ``ranks``: rank ``r`` of ``W`` renders the shards whose index is ``r`` modulo ``W``;
  ``RANK``/``WORLD_SIZE`` come from ``torchrun`` or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``). No
  process group is needed: ranks that start at different times (one may already have finished a
  shard when another lists what is left) still agree on who renders what, because the share is a
  function of the shard's index alone; the rank that completes the last shard writes the stats.
- ``ray``: Ray actors, one per device, on a local or existing cluster (``pip install
  'synrep[ray]'``; ``RAY_ADDRESS`` picks the cluster).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import torch
from tqdm import tqdm

from synrep.config import Config, config_from_dict
from synrep.errors import ConfigError
from synrep.images.jobs import render_job
from synrep.images.render import Renderer
from synrep.registry import Registry

EXECUTORS: Registry = Registry("images executor")


def _renderer(cfg: Config, device: str):
    return Renderer(cfg.images, device)


def _devices(cfg: Config) -> list[str]:
    return list(cfg.images.devices) or [cfg.run.device]


def _bar(n: int) -> tqdm:
    return tqdm(total=n, unit="shard", desc="images", dynamic_ncols=True)


@EXECUTORS.register("local")
def run_local(cfg: Config, jobs: list) -> None:
    if not jobs:
        return
    renderer = _renderer(cfg, cfg.run.device)
    with _bar(len(jobs)) as bar:
        for job in jobs:
            render_job(cfg, job, renderer)
            bar.update()


# pool workers: the renderer is built once per process, on the device it takes from the queue
_WORKER: dict = {}


def _init_worker(cfg_json: str, devices, threads: int) -> None:
    cfg = config_from_dict(json.loads(cfg_json), "images worker")
    device = devices.get()
    torch.set_num_threads(threads)
    _WORKER.update(cfg=cfg, renderer=_renderer(cfg, device))


def _work(job) -> str:
    render_job(_WORKER["cfg"], job, _WORKER["renderer"])
    return job.name


@EXECUTORS.register("pool")
def run_pool(cfg: Config, jobs: list) -> None:
    if not jobs:
        return
    devices = _devices(cfg)
    ctx = mp.get_context("spawn")  # CUDA and threads do not survive fork
    queue = ctx.Manager().Queue()
    for d in devices:
        queue.put(d)
    # CPU workers share the cores unless run.threads says otherwise
    threads = cfg.run.threads or max(1, (os.cpu_count() or 1) // len(devices))
    with ctx.Pool(len(devices), initializer=_init_worker,
                  initargs=(cfg.to_json(), queue, threads)) as pool, _bar(len(jobs)) as bar:
        for _ in pool.imap_unordered(_work, jobs):
            bar.update()


def rank_and_world() -> tuple[int, int]:
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside a world of {world} processes; check RANK and "
                          "WORLD_SIZE (or SLURM_PROCID and SLURM_NTASKS)")
    return rank, world


def own_jobs(cfg: Config, jobs: list) -> list:
    """The jobs of ``jobs`` this process renders: all of them, except under ``ranks``, where
    rank ``r`` of ``W`` owns the shards with ``index % W == r``."""
    if cfg.images.executor != "ranks":
        return jobs
    rank, world = rank_and_world()
    return [j for j in jobs if j.index % world == rank]


@EXECUTORS.register("ranks")
def run_ranks(cfg: Config, jobs: list) -> None:
    device = cfg.run.device
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0))}"
    mine = own_jobs(cfg, jobs)
    if not mine:
        return
    renderer = _renderer(cfg, device)
    with _bar(len(mine)) as bar:
        for job in mine:
            render_job(cfg, job, renderer)
            bar.update()


@EXECUTORS.register("ray")
def run_ray(cfg: Config, jobs: list) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("images.executor=ray needs Ray: pip install 'synrep[ray]'") from None
    if not jobs:
        return
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
             log_to_driver=False)
    devices = _devices(cfg)

    @ray.remote
    class Worker:
        def __init__(self, cfg_json: str, device: str) -> None:
            self.cfg = config_from_dict(json.loads(cfg_json), "ray worker")
            if self.cfg.run.threads > 0:
                torch.set_num_threads(self.cfg.run.threads)
            self.renderer = _renderer(self.cfg, "cuda" if device.startswith("cuda") else device)

        def run(self, job) -> str:
            render_job(self.cfg, job, self.renderer)
            return job.name

    workers = [Worker.options(num_gpus=1 if d.startswith("cuda") else 0).remote(cfg.to_json(), d)
               for d in devices]
    refs = [workers[i % len(workers)].run.remote(job) for i, job in enumerate(jobs)]
    with _bar(len(jobs)) as bar:
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)  # raises the worker's error here
            bar.update()

