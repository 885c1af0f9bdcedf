"""The streaming data path at scale: memory that does not grow with the set, and loader speed.

1. **Memory.** Caption-group shards of 20,000 real Fashion-MNIST images (5,000 groups x 4, the
   quickstart's shape) are written once; a second folder replicates them to 1,000,000 images
   (50 copies, as symbolic links to the same shards, markers and indexes). A 50-step quickstart
   training (``data.loader=stream``) runs on each in a fresh process; its peak RSS is compared.
   Target: within 15 % of each other.
2. **Loader speed at 224 px.** Plain WebDataset shards of Fashion-MNIST images upscaled to 224 px
   (RGB, JPEG quality 90, written by webdataset's ``TarWriter``) are decoded and random-resized-
   cropped to 224 x 224 uint8 by synrep's store (random access through the index) and by a plain
   ``webdataset`` + torchvision pipeline doing the same work (sequential read, PIL decode,
   ``RandomResizedCrop(224)``, ``PILToTensor``), side by side in one process on one thread,
   alternating, median of ``--repeats``. Targets: >= 400 images/s per core, and >= 0.9 x the plain
   pipeline. The rate through a ``DataLoader`` with 2 workers is printed too (not a target).
3. **No regression.** The quickstart's training (in-memory data, as the demo runs it) with this
   code and with ``--baseline`` (a git worktree of an older revision), alternating ABBA, on the same
   20,000 images: median images/s ratio >= 0.97, and bit-identical final weights.

    python benchmarks/data_scale.py [--work DIR] [--replicate 50] [--repeats 5] [--quick]

Writes benchmarks/results/data_scale.json; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synrep.data.fashion_mnist import load_fashion_mnist
from synrep.data.index import index_path, resolve_shards
from synrep.data.shards import CaptionGroup, marker_path, write_shard
from synrep.data.sources import Planner, ShardStore, Source

ROOT = Path(__file__).resolve().parents[1]
RSS_TOLERANCE = 0.15
RATE_TARGET = 400.0
RATIO_TARGET = 0.9
REGRESSION_TARGET = 0.97


def cpu_class() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                 if line.startswith("model name")), platform.processor())
    isa = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else "other"
    return f"{name} ({isa}, {os.cpu_count()} cores)"


def write_group_shards(folder: Path, groups: int = 5000, k: int = 4, per_shard: int = 1000) -> None:
    """Caption groups of k real Fashion-MNIST train images of one class each."""
    if len(list(folder.glob("*_stats.json"))) == groups // per_shard:
        return
    images, labels = load_fashion_mnist("train", None)
    order = np.argsort(labels, kind="stable")  # k images of one class a group
    for s in range(groups // per_shard):
        batch = []
        for g in range(s * per_shard, (s + 1) * per_shard):
            idx = order[(g * k) % len(order) : (g * k) % len(order) + k]
            batch.append(CaptionGroup(f"{g:06d}", f"a photo of class {int(labels[idx[0]])}",
                                      {"label": int(labels[idx[0]]), "caption_id": g},
                                      [images[i] for i in idx]))
        write_shard(folder / f"{s:06d}.tar", batch)


def replicate(src: Path, dst: Path, copies: int) -> None:
    """``copies`` x the shards of ``src`` in ``dst``, as symbolic links (tar, marker, index)."""
    dst.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        for shard in sorted(src.glob("*.tar")):
            name = f"{c:03d}{shard.stem}"
            for a, b in ((shard, dst / f"{name}.tar"),
                         (marker_path(shard), marker_path(dst / f"{name}.tar")),
                         (index_path(shard), index_path(dst / f"{name}.tar"))):
                if not b.exists():
                    b.symlink_to(a.resolve())


def peak_rss_mb(shards: Path, run_dir: Path, steps: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a fresh-process quickstart training on ``shards``."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(p.stderr[-3000:] if p.returncode else '')\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
        "time.perf_counter() - t, p.returncode)\n")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "synrep", "train",
           "configs/quickstart.yaml", f"data.shards={shards}", "data.loader=stream",
           f"train.steps={steps}", f"run.dir={run_dir}", "train.ckpt_every=1000",
           "train.log_every=10"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    rss, seconds, rc = out.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"training on {shards} failed:\n{out.stderr}")
    return float(rss), float(seconds)


def baseline_tree(work: Path, rev: str) -> Path:
    """A checkout of ``rev`` (a git worktree of this repository) to run the old code from."""
    tree = work / f"baseline_{rev}"
    if not (tree / "synrep").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), rev],
                       cwd=ROOT, check=True, capture_output=True)
    return tree


def quickstart_run(tree: Path, shards: Path, run_dir: Path, steps: int) -> tuple[float, str]:
    """(images/s, weight hash) of a quickstart training of ``steps`` on ``shards`` with the code
    in ``tree`` (in-memory data: the quickstart's path)."""
    import hashlib

    from synrep.checkpoint import Checkpoint
    from synrep.layout import RunLayout

    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import synrep; print(synrep.__file__)"],
                           cwd=tree, env=env, capture_output=True, text=True, check=True)
    if not Path(where.stdout.strip()).is_relative_to(tree.resolve()):
        raise SystemExit(f"the code in {tree} is not the synrep that runs there ({where.stdout})")
    cmd = [sys.executable, "-m", "synrep", "train", "configs/quickstart.yaml",
           f"data.shards={shards}", f"train.steps={steps}", f"run.dir={run_dir}",
           "train.ckpt_every=1000"]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"quickstart training in {tree} failed:\n{proc.stderr[-3000:]}")
    lay = RunLayout(run_dir)
    rate = json.loads(lay.train_summary.read_text())["samples_per_s"]
    h = hashlib.sha256()
    state = Checkpoint(lay.final_checkpoint).model_state
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return float(rate), h.hexdigest()[:16]


def write_jpeg_shards(folder: Path, n: int, per_shard: int = 500) -> None:
    import webdataset as wds

    if len(list(folder.glob("*.tar"))) == n // per_shard:
        return
    images, labels = load_fashion_mnist("test", None)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n // per_shard):
        with wds.TarWriter(str(folder / f"jpeg-{s:06d}.tar")) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                img = Image.fromarray(images[i % len(images)]).convert("RGB")
                img = img.resize((224, 224), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(),
                            "cls": str(int(labels[i % len(labels)])), "txt": "a photo"})


def synrep_rate(folder: Path, n: int, batch: int = 50) -> float:
    store = ShardStore(resolve_shards(folder), "plain", image_size=224, channels=3,
                       crop="random")
    src = Source(store, Planner(len(store), batch, 0))
    t = time.perf_counter()
    got = 0
    for step in range(n // batch):
        got += len(src.batch(step)["images"])
    return got / (time.perf_counter() - t)


def webdataset_rate(folder: Path, n: int) -> float:
    import webdataset as wds
    from torchvision import transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.PILToTensor()])
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil") \
        .to_tuple("jpg").map_tuple(tf)
    t = time.perf_counter()
    got = 0
    for (x,) in ds:
        assert x.dtype == torch.uint8 and x.shape == (3, 224, 224)
        got += 1
        if got >= n:
            break
    return got / (time.perf_counter() - t)


def loader_rate(folder: Path, n: int, workers: int, batch: int = 50) -> float:
    store = ShardStore(resolve_shards(folder), "plain", image_size=224, channels=3,
                       crop="random")
    src = Source(store, Planner(len(store), batch, 0))
    it = src.batches(0, n // batch, workers=workers)
    first = next(it)  # start-up (forking the workers) is not decoding
    t = time.perf_counter()
    got = sum(len(b["images"]) for b in it)
    del first
    return got / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "synrep_data_scale")
    ap.add_argument("--replicate", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--jpeg-images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", default="fcf982d",
                    help="git revision to compare the quickstart's speed and weights with, side "
                         "by side (default: the last commit before the streaming data path; "
                         "'' skips it)")
    ap.add_argument("--quickstart-steps", type=int, default=150)
    ap.add_argument("--parts", default="memory,regression,loader",
                    help="which measurements to run (comma-separated); results of the others "
                         "are kept from the last results file")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and images (a smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.jpeg_images, args.steps = 1, 500, 10
    torch.set_num_threads(1)
    out = ROOT / "benchmarks/results/data_scale.json"
    parts = set(args.parts.split(","))
    results: dict = json.loads(out.read_text()) if out.exists() and parts != {
        "memory", "regression", "loader"} else {}
    results.update({"cpu": cpu_class(), "torch": torch.__version__})
    ok = True

    small, big = args.work / "groups_20k", args.work / f"groups_x{args.replicate}"
    print("writing 20,000-image caption-group shards ...", flush=True)
    write_group_shards(small)
    replicate(small, big, args.replicate)
    n_small = 20_000
    n_big = n_small * args.replicate
    rss = {}
    runs = (("20k", small, n_small), ("replicated", big, n_big)) if "memory" in parts else ()
    for name, folder, n in runs:
        mb, sec = peak_rss_mb(folder, args.work / f"run_{name}_{time.time_ns()}", args.steps)
        rss[name] = {"images": n, "peak_rss_mib": round(mb, 1), "seconds": round(sec, 1)}
        print(f"  {args.steps}-step training on {n:>9,} images: peak RSS {mb:7.1f} MiB "
              f"({sec:.0f} s)", flush=True)
    if "memory" in parts:
        growth = rss["replicated"]["peak_rss_mib"] / rss["20k"]["peak_rss_mib"] - 1
        mem_ok = abs(growth) <= RSS_TOLERANCE
        ok &= mem_ok
        results["memory"] = {**rss, "growth": round(growth, 4),
                             "target": f"<= {RSS_TOLERANCE:.0%}", "ok": mem_ok}
        print(f"memory: {n_big:,} vs {n_small:,} images: {growth:+.1%} peak RSS "
              f"(target within {RSS_TOLERANCE:.0%}) {'OK' if mem_ok else 'MISSED'}")

    if args.baseline and "regression" in parts:
        old_tree = baseline_tree(args.work, args.baseline)
        rates: dict[str, list[float]] = {"baseline": [], "now": []}
        hashes: dict[str, set[str]] = {"baseline": set(), "now": set()}
        for r in range(args.repeats if not args.quick else 1):
            pair = [("baseline", old_tree), ("now", ROOT)]
            for name, tree in pair if r % 2 == 0 else pair[::-1]:  # ABBA: no order bias
                rate, digest = quickstart_run(tree, small, args.work / f"q_{name}_{r}_"
                                              f"{time.time_ns()}", args.quickstart_steps)
                rates[name].append(rate)
                hashes[name].add(digest)
                print(f"  quickstart {args.quickstart_steps} steps, {name:8s}: {rate:6.0f} "
                      f"images/s, weights {digest}", flush=True)
        ratio_q = statistics.median(a / b for a, b in zip(rates["now"], rates["baseline"]))
        same = hashes["now"] == hashes["baseline"] and len(hashes["now"]) == 1
        reg_ok = ratio_q >= REGRESSION_TARGET and same
        ok &= reg_ok
        results["no_regression"] = {
            "baseline": args.baseline, "steps": args.quickstart_steps,
            "baseline_images_per_s": [round(x, 1) for x in rates["baseline"]],
            "now_images_per_s": [round(x, 1) for x in rates["now"]],
            "median_ratio": round(ratio_q, 3), "weights_identical": same,
            "weights": sorted(hashes["now"] | hashes["baseline"]),
            "target": f">= {REGRESSION_TARGET} x, identical weights", "ok": reg_ok}
        print(f"no regression: quickstart at {ratio_q:.3f} x the images/s of {args.baseline} "
              f"(target >= {REGRESSION_TARGET}), weights "
              f"{'identical' if same else 'DIFFERENT'} {'OK' if reg_ok else 'MISSED'}")

    if "loader" in parts:
        ok &= loader_speed(args, results)
    results["cpu_note"] = results["cpu"]
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"on {results['cpu']}; wrote {out}")
    return 0 if ok else 1


def loader_speed(args, results: dict) -> bool:
    jpeg = args.work / "jpeg224"
    print(f"writing {args.jpeg_images} JPEG (q90) 224 px images ...", flush=True)
    write_jpeg_shards(jpeg, args.jpeg_images)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(synrep_rate(jpeg, args.jpeg_images))
        theirs.append(webdataset_rate(jpeg, args.jpeg_images))
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    ratio = statistics.median(a / b for a, b in zip(ours, theirs))
    workers = loader_rate(jpeg, args.jpeg_images, 2)
    rate_ok, ratio_ok = med_ours >= RATE_TARGET, ratio >= RATIO_TARGET
    results["loader"] = {
        "images": args.jpeg_images, "repeats": args.repeats,
        "synrep_images_per_s_per_core": round(med_ours, 1),
        "webdataset_torchvision_images_per_s_per_core": round(med_theirs, 1),
        "ratio": round(ratio, 3), "dataloader_2_workers_images_per_s": round(workers, 1),
        "targets": {"per_core": RATE_TARGET, "ratio": RATIO_TARGET},
        "ok": rate_ok and ratio_ok}
    print(f"decode + random resized crop to 224 px, one core: synrep {med_ours:.0f} images/s "
          f"(target >= {RATE_TARGET:.0f}) {'OK' if rate_ok else 'MISSED'}; webdataset + "
          f"torchvision {med_theirs:.0f}; ratio {ratio:.2f} (target >= {RATIO_TARGET}) "
          f"{'OK' if ratio_ok else 'MISSED'}")
    print(f"through a DataLoader with 2 workers: {workers:.0f} images/s")
    return rate_ok and ratio_ok


if __name__ == "__main__":
    sys.exit(main())
