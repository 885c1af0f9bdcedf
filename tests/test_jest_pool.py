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
