"""kill -9 torture: a run SIGKILLed at random moments and rerun ends with the same outputs.

Runs a small end-to-end ``synrep run`` (configs/quickstart.yaml at toy scale: captions, images,
train, eval, report) once uninterrupted, then ``--kills`` times in a fresh directory: starts it,
SIGKILLs it (the whole process group, as an OOM killer or a lost node would) after a random delay
drawn over the uninterrupted run's duration, so kills land in captions, images and training, and
reruns the same command until it completes (with probability ``--rekill`` killing a rerun again,
at most twice). Every output file is then compared with the uninterrupted run's:

- byte for byte (sha256), except for the files and keys that legitimately hold wall-clock times
  or timestamps, listed in ``EXCLUDED_FILES`` and ``WALL_CLOCK_KEYS`` (JSON / JSONL files are
  compared with those keys removed, ``.npz`` feature caches array by array since numpy's zip
  members carry the time of writing);
- the final checkpoint's weights tensor by tensor.

Every run uses the same directory (moved aside when it is done), so paths written into outputs
(config.yaml, checkpoint metadata) are equal.

    python benchmarks/kill_torture.py [--kills 20] [--seed 0] [--rekill 0.3] [--work DIR]

Target: 0 differences in every killed run. Exits 1 on any difference (or a rerun that fails).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch

from synrep.checkpoint import Checkpoint
from synrep.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"
OVERRIDES = [
    "captions.num=64", "captions.shard_size=32", "images.shard_size=16", "images.steps=2",
    "train.steps=20", "train.ckpt_every=5", "train.log_every=1", "train.batch_size=16",
    "eval.protocols=[knn]", "eval.limit_train=500", "eval.limit_test=200", "run.threads=1",
]
# Files compared by nothing but their presence: they hold wall-clock times or timestamps.
EXCLUDED_FILES = {
    "train/tb/events.out.tfevents.*": "tensorboard events: wall time per scalar, host in the name",
    "report.html": "the HTML report prints timings and dates",
    "eval/*.source": "feature-cache stamps: the checkpoint's mtime",
}
# Keys removed from every JSON / JSONL file before comparing (at any depth).
# Keys removed from every JSON / JSONL file before comparing (at any depth); so is any key that
# ends in one of WALL_CLOCK_SUFFIXES (samples_per_s, captions_per_s, render_seconds, ...).
WALL_CLOCK_KEYS = {"seconds", "timings", "wall_minutes", "elapsed", "mtime", "mtime_ns", "time",
                   "timestamp", "started", "finished", "date", "created"}
WALL_CLOCK_SUFFIXES = ("_per_s", "_seconds", "_minutes", "_time", "_mtime_ns")
# Keys of one file that describe the last invocation, not the run: RUN/train/summary.json's
# "steps" counts the steps that invocation trained (a resumed one trains fewer), as "seconds".
PER_INVOCATION_KEYS = {"train/summary.json": {"steps"}}
MAX_REKILLS = 2


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "synrep", "run", CONFIG, *OVERRIDES, f"run.dir={run_dir}"]


def start(run_dir: Path, log: Path) -> subprocess.Popen:
    f = open(log, "a")
    return subprocess.Popen(command(run_dir), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_once(run_dir: Path, log: Path, kill_after: float | None) -> tuple[int, str | None]:
    """Run the command; SIGKILL its process group after ``kill_after`` s. Returns the exit code
    and the stage that was running when it was killed (None when it was not)."""
    offset = log.stat().st_size if log.exists() else 0
    proc = start(run_dir, log)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode, None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.returncode, current_stage(log, offset)


def current_stage(log: Path, offset: int) -> str:
    """The stage the last ``[stage] running into`` line this attempt wrote to the log (from
    byte ``offset``) names, or ``startup``."""
    stage = "startup"
    for line in log.read_bytes()[offset:].decode(errors="replace").splitlines():
        if "] running into " in line and line.startswith("["):
            stage = line[1:line.index("]")]
    return stage


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if k not in WALL_CLOCK_KEYS and not k.endswith(WALL_CLOCK_SUFFIXES)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def fingerprint(path: Path, rel: str = "") -> str:
    """sha256 of a file's content, wall-clock keys and zip timestamps left out."""
    data = path.read_bytes()
    if path.suffix == ".json":
        obj = _strip(json.loads(data))
        for k in PER_INVOCATION_KEYS.get(rel, ()):
            obj.pop(k, None)
        data = json.dumps(obj, sort_keys=True).encode()
    elif path.suffix == ".jsonl":
        data = "\n".join(json.dumps(_strip(json.loads(x)), sort_keys=True)
                         for x in data.decode().splitlines()).encode()
    elif path.suffix == ".npz":
        h = hashlib.sha256()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for k in sorted(z.files):
                value = z[k]
                if path.name.endswith(".idx.npz") and k == "meta":  # a shard index's header:
                    meta = json.loads(value.tobytes())  # its shard's modification time is
                    value = np.frombuffer(json.dumps(_strip(meta), sort_keys=True).encode(),
                                          np.uint8)  # wall clock
                h.update(k.encode() + value.tobytes() + str(value.dtype).encode())
        return h.hexdigest()
    elif zipfile.is_zipfile(io.BytesIO(data)) and path.suffix not in (".tar",):
        h = hashlib.sha256()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in sorted(z.namelist()):
                h.update(name.encode() + z.read(name))
        return h.hexdigest()
    return hashlib.sha256(data).hexdigest()


def excluded(rel: str) -> str | None:
    """The EXCLUDED_FILES pattern ``rel`` matches, if any."""
    return next((pat for pat in EXCLUDED_FILES if fnmatch(rel, pat)), None)


def outputs(run_dir: Path) -> dict[str, str | None]:
    """{relative path: fingerprint} of every file under run_dir; excluded files as {their
    pattern: None} (their names hold times too, and a resumed training writes one tensorboard
    file per process: only that some exist is compared)."""
    out: dict[str, str | None] = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(run_dir).as_posix()
            pat = excluded(rel)
            if pat is not None:
                out[pat] = None
            else:
                out[rel] = fingerprint(p, rel)
    return out


def differences(base_dir: Path, base: dict, run_dir: Path) -> list[str]:
    got = outputs(run_dir)
    diffs = [f"missing {k}" for k in base if k not in got]
    diffs += [f"extra {k}" for k in got if k not in base]
    diffs += [f"content {k}" for k in base if k in got and base[k] != got[k]]
    fa, fb = RunLayout(base_dir).final_checkpoint, RunLayout(run_dir).final_checkpoint
    if fa.exists() and fb.exists():
        a, b = Checkpoint(fa).model_state, Checkpoint(fb).model_state
        if a.keys() != b.keys():
            diffs.append("final weights: different tensor names")
        else:
            diffs += [f"final weight {k}" for k in a if not torch.equal(a[k], b[k])]
    elif fa.exists():
        diffs.append("final weights: no final checkpoint")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="killed runs (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--rekill", type=float, default=0.3,
                    help="probability that a rerun is killed again (at most twice)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="synrep-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir, base_dir = work / "run", work / "baseline"
    for d in (run_dir, base_dir):
        shutil.rmtree(d, ignore_errors=True)

    t = time.perf_counter()
    code, _ = run_once(run_dir, work / "baseline.log", None)
    duration = time.perf_counter() - t
    if code != 0:
        print(f"the uninterrupted run failed (exit {code}); see {work / 'baseline.log'}")
        return 1
    run_dir.rename(base_dir)
    base = outputs(base_dir)
    print(f"uninterrupted run: {duration:.0f}s, {len(base)} outputs compared "
          f"({sum(v is None for v in base.values())} of them by presence only: wall-clock)")

    rows, failed = [], 0
    for i in range(args.kills):
        log = work / f"kill-{i:03d}.log"
        log.unlink(missing_ok=True)
        moments, stages, attempts = [], [], 0
        delay: float | None = rng.uniform(0, duration)
        code = None
        while True:
            attempts += 1
            code, stage = run_once(run_dir, log, delay)
            if stage is not None:
                moments.append(delay)
                stages.append(stage)
            if stage is None and code == 0:
                break
            if stage is None:  # a rerun that failed on its own
                break
            delay = (rng.uniform(0, duration) if len(moments) <= MAX_REKILLS
                     and rng.random() < args.rekill else None)
        diffs = differences(base_dir, base, run_dir) if code == 0 else \
            [f"rerun failed with exit {code} (see {log})"]
        failed += bool(diffs)
        rows.append((i, moments, stages, attempts, diffs))
        print(f"  kill {i:3d}: at {', '.join(f'{m:5.1f}s' for m in moments):<16} "
              f"in {', '.join(stages):<22} runs {attempts}  differences {len(diffs)}"
              + (f"  ({'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''})" if diffs else ""),
              flush=True)
        if diffs:
            kept = work / f"failed-{i:03d}"
            shutil.rmtree(kept, ignore_errors=True)
            run_dir.rename(kept)
        else:
            shutil.rmtree(run_dir)

    print()
    print(f"{'kill':>4}  {'moment (s)':<16}  {'stage killed':<22}  {'runs':>4}  "
          f"{'differences':>11}  {'target':>6}")
    for i, moments, stages, attempts, diffs in rows:
        print(f"{i:>4}  {', '.join(f'{m:.1f}' for m in moments):<16}  "
              f"{', '.join(stages):<22}  {attempts:>4}  {len(diffs):>11}  {0:>6}")
    print(f"\n{args.kills - failed}/{args.kills} killed runs ended with the uninterrupted run's "
          f"outputs (excluded as wall-clock: {', '.join(EXCLUDED_FILES)}; JSON keys: "
          f"{', '.join(sorted(WALL_CLOCK_KEYS))}, *{', *'.join(WALL_CLOCK_SUFFIXES)}; "
          f"per invocation: {PER_INVOCATION_KEYS}); "
          f"work folder: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
