"""The noisy pool of benchmarks/jest.py: kinds, corruptions and the redundant and collapsed
variants."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from synrep.data.shards import CaptionGroup, iter_groups, write_shard, write_sizes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_jest", ROOT / "benchmarks" / "jest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    groups = [CaptionGroup(key=f"{i:06d}", caption=f"caption {i}", meta={},
                           images=[rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(2)])
              for i in range(3000)]
    write_shard(root / "00000.tar", groups)
    write_sizes(root)
    return root, groups


def test_redundant_pool_copies_curated_groups(bench, pool, tmp_path):
    src, groups = pool
    kinds = bench.corrupt_pool(src, tmp_path / "noisy", redundant=0.1)
    assert Counter(kinds) == {"clean": 1200, "swap": 750, "noise": 750, "dup": 300}
    out = list(iter_groups(tmp_path / "noisy" / "shards"))
    curated = list(iter_groups(tmp_path / "noisy" / "curated"))
    assert len(curated) == 1000
    sources = {g.images[0].tobytes(): g for g in curated[:bench.DUP_SOURCES]}
    for g, orig, kind in zip(out, groups, kinds):
        assert g.key == orig.key and g.meta["corrupt"] == kind
        same = all(np.array_equal(a, b) for a, b in zip(g.images, orig.images))
        if kind == "clean":
            assert same
        elif kind == "dup":  # every image and the caption of one curated source group
            s = sources[g.images[0].tobytes()]
            assert g.caption == s.caption
            assert all(np.array_equal(a, b) for a, b in zip(g.images, s.images))
        else:
            assert not same
    # curated groups are clean ones, and none of them is a copy
    clean_keys = {g.key for g, k in zip(groups, kinds) if k == "clean"}
    assert all(g.key in clean_keys for g in curated)
    with pytest.raises(SystemExit, match="at most"):
        bench.corrupt_pool(src, tmp_path / "too_many", redundant=0.4)


def test_collapsed_pool_repeats_one_image(bench, pool, tmp_path):
    src, groups = pool
    kinds = bench.corrupt_pool(src, tmp_path / "noisy", collapsed=0.1)
    assert Counter(kinds) == {"clean": 1200, "swap": 750, "noise": 750, "collapsed": 300}
    out = list(iter_groups(tmp_path / "noisy" / "shards"))
    for g, orig, kind in zip(out, groups, kinds):
        assert g.key == orig.key and g.caption == orig.caption and g.meta["corrupt"] == kind
        if kind == "collapsed":  # the group's own first image, drawn for every seed
            assert len(g.images) == len(orig.images)
            assert all(np.array_equal(im, orig.images[0]) for im in g.images)
        elif kind == "clean":
            assert all(np.array_equal(a, b) for a, b in zip(g.images, orig.images))
    # the same draw of swapped and noisy groups as without collapsed groups
    plain = bench.corrupt_pool(src, tmp_path / "plain")
    assert [k if k != "collapsed" else "clean" for k in kinds] == plain
    clean_keys = {g.key for g, k in zip(groups, kinds) if k == "clean"}
    assert all(g.key in clean_keys for g in iter_groups(tmp_path / "noisy" / "curated"))
    with pytest.raises(SystemExit, match="at most"):
        bench.corrupt_pool(src, tmp_path / "too_many", redundant=0.1, collapsed=0.1)


def _seed_result(steps: dict[str, int | None], finals: dict[str, float], run_steps: int = 400,
                 every: int = 25) -> dict:
    return {"steps": run_steps, "every": every,
            "policies": {n: {"steps_to_target": steps[n], "final_top1": finals[n],
                             "flops_per_step": 100.0 if n == "uniform" else 150.0,
                             "reference_pool_flops": 0.0} for n in steps}}


def _summary_args(bench, tmp_path):
    return bench.argparse.Namespace(steps=400, every=25, redundant=0.0, collapsed=0.0,
                                    ref_steps=bench.REF_STEPS, json=str(tmp_path / "r.json"))


def test_seed_summary_reads_stored_seeds_and_judges_the_means(bench, tmp_path):
    args = _summary_args(bench, tmp_path)
    results = {
        "selection_every25": _seed_result(
            {"uniform": 300, "learnability": 100, "easy_reference": 200, "hard_learner": None},
            {"uniform": 82.0, "learnability": 83.0, "easy_reference": 82.5, "hard_learner": 81.0}),
        "selection_every25_seed3": _seed_result(
            {"uniform": 200, "learnability": 150, "easy_reference": 150},
            {"uniform": 81.0, "learnability": 82.0, "easy_reference": 81.5}),
    }
    fails = bench.seed_summary(args, results, [0, 3])
    out = results["selection_every25_seeds03"]
    assert out["seeds"] == [0, 3]
    assert out["left_out"] == ["hard_learner"]  # not run in seed 3: not averaged over one seed
    lr = out["policies"]["learnability"]
    assert lr["mean_steps"] == 125.0 and lr["steps_ratio"] == 250.0 / 125.0
    assert lr["flops_ratio"] == (250.0 * 100.0) / (125.0 * 150.0)  # 1.33x
    assert out["policies"]["easy_reference"]["mean_steps"] == 175.0
    assert fails == []  # 2.0x steps, 1.33x FLOPs, beats easy reference (125 < 175)

    # a learner slower than easy reference on the means is a miss
    results["selection_every25_seed3"]["policies"]["learnability"]["steps_to_target"] = 300
    assert "mean learnability vs easy_reference" in bench.seed_summary(args, results, [0, 3])

    # never reaching the target counts as --steps + --every
    results["selection_every25_seed3"]["policies"]["learnability"]["steps_to_target"] = None
    bench.seed_summary(args, results, [0, 3])
    assert results["selection_every25_seeds03"]["policies"]["learnability"]["mean_steps"] == (
        100 + 425) / 2


def test_seed_summary_refuses_missing_or_other_runs(bench, tmp_path):
    args = _summary_args(bench, tmp_path)
    one = _seed_result({"uniform": 300, "learnability": 100},
                       {"uniform": 82.0, "learnability": 83.0})
    with pytest.raises(SystemExit, match="no results for seed 1"):
        bench.seed_summary(args, {"selection_every25": one}, [0, 1])
    other = _seed_result({"uniform": 300, "learnability": 100},
                         {"uniform": 82.0, "learnability": 83.0}, run_steps=200)
    with pytest.raises(SystemExit, match="--steps 200"):
        bench.seed_summary(args, {"selection_every25": one, "selection_every25_seed1": other},
                           [0, 1])


def test_seed_summary_of_uniform_alone_checks_no_target(bench, tmp_path):
    args = _summary_args(bench, tmp_path)
    results = {k: _seed_result({"uniform": s}, {"uniform": 82.0})
               for k, s in (("selection_every25", 300), ("selection_every25_seed1", 200))}
    assert bench.seed_summary(args, results, [0, 1]) == []
    assert results["selection_every25_seeds01"]["policies"]["uniform"]["mean_steps"] == 250.0
    assert results["selection_every25_seeds01"]["checked"] == {}
