"""Shared by the benchmarks that train and evaluate synrep runs: run one, read its results."""

from __future__ import annotations

import json
import time
from pathlib import Path

from synrep.cli import main as synrep
from synrep.layout import RunLayout


def run(config: str, run_dir: Path, overrides: list[str]) -> dict:
    """``synrep run config run.dir=run_dir *overrides``; returns the eval entry plus timings.

    Completed stages are skipped, so a benchmark killed half-way resumes where it stopped.
    """
    t = time.perf_counter()
    code = synrep(["run", config, f"run.dir={run_dir}", *overrides])
    if code != 0:
        raise SystemExit(f"synrep run {config} {' '.join(overrides)} failed with exit code {code}")
    res = json.loads(RunLayout(run_dir).results.read_text())["fashion-mnist"]
    res = dict(res, wall_minutes=(time.perf_counter() - t) / 60)
    metrics = RunLayout(run_dir).metrics
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            res["train_samples_per_s"] = rows[-1].get("samples_per_s")
    summary = RunLayout(run_dir).train_summary
    res["train_minutes"] = (json.loads(summary.read_text())["seconds"] / 60
                            if summary.exists() else float("nan"))
    return res


QUICK_EVAL_LIMITS = (2000, 1000)  # --quick: seeded subsets of the real train / test images


def run_options(args) -> list[str]:
    """The overrides that ``--quick`` (a smoke test: small evaluation subsets) and ``--threads``
    add to every run of a benchmark."""
    over = []
    if args.quick:
        over += [f"eval.limit_train={QUICK_EVAL_LIMITS[0]}",
                 f"eval.limit_test={QUICK_EVAL_LIMITS[1]}"]
    if args.threads > 0:
        over.append(f"run.threads={args.threads}")
    return over


def write_results(path: Path, results: dict) -> None:
    """Write a benchmark's results as indented JSON (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def verdict(fails: list[str]) -> int:
    """Print the missed targets, if any; the benchmark's exit status (1 when one is missed)."""
    if fails:
        print("missed: " + "; ".join(fails))
        return 1
    return 0


def table(rows: list[tuple[str, dict]], extra: tuple[str, ...] = ()) -> str:
    """A Markdown table of linear-probe and kNN top-1 per named run."""
    head = "| run | linear probe top-1 | kNN top-1 |" + "".join(f" {e} |" for e in extra)
    sep = "|---|---|---|" + "---|" * len(extra)
    lines = [head, sep]
    for name, r in rows:
        cells = "".join(f" {r.get(e, '')} |" for e in extra)
        lines.append(f"| {name} | {r['linear_probe_top1']:.2f} % | {r['knn_top1']:.2f} % |{cells}")
    return "\n".join(lines)
