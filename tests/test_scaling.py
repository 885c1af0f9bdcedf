"""``synrep scale`` end to end on tiny shards: sizes, fit, plot, resume and bad settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from synrep.cli import main
from synrep.data.shards import CaptionGroup, write_shard, write_sizes
from synrep.scaling import fit_power_law
from tests.conftest import TINY, needs_fashion

CONFIG = "configs/fashion_simclr.yaml"


def _shards(tmp_path):
    rng = np.random.default_rng(0)
    shard_dir = tmp_path / "shards"
    groups = [CaptionGroup(key=f"{i:06d}", caption=f"caption {i}", meta={"label": i % 10},
                           images=[rng.integers(0, 256, (28, 28), dtype=np.uint8)
                                   for _ in range(3)])
              for i in range(16)]
    write_shard(shard_dir / "00000.tar", groups)
    write_sizes(shard_dir)
    return shard_dir


@needs_fashion
def test_scale_trains_every_size_fits_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["scale", CONFIG, *TINY, "train.batch_size=4", "method.name=stablerep",
            "method.stablerep.images_per_caption=2", "data.source=shards",
            f"data.shards={_shards(tmp_path)}", f"run.dir={run}", "scale.captions=[4,16]",
            "scale.images_per_caption=[1,3]", "scale.steps=2"]
    assert main(args) == 0
    res = json.loads((run / "scale/results.json").read_text())
    sizes = [(p["captions"], p["images_per_caption"]) for p in res["points"]]
    assert sizes == [(4, 1), (4, 3), (16, 1), (16, 3)]
    for p in res["points"]:
        sub = json.loads((run / "scale" / f"c{p['captions']}_k{p['images_per_caption']}" /
                          "eval/results.json").read_text())["fashion-mnist"]
        assert p["top1"] == sub["linear_probe_top1"] and p["error"] == 100.0 - p["top1"]
        assert p["images"] == p["captions"] * p["images_per_caption"]
    ref = fit_power_law([p["images"] for p in res["points"]], [p["error"] for p in res["points"]])
    assert res["fit"] == pytest.approx(ref)
    assert Image.open(run / "scale/fit.png").size[0] > 300
    out = capsys.readouterr().out
    assert "fit: error =" in out and "[scale 4/4]" in out

    # every size is an ordinary run: a second call finds them complete and only refits
    assert main(args) == 0
    assert "[train] complete, skipped" in capsys.readouterr().out


def test_scale_rejects_bad_settings(tmp_path, capsys):
    base = ["scale", CONFIG, *TINY, f"run.dir={tmp_path / 'run'}", "method.name=stablerep",
            "data.source=shards"]
    assert main([*base, "scale.captions=[10]", "scale.images_per_caption=[4]"]) == 2
    assert "too few for a power fit" in capsys.readouterr().err
    assert main([*base, "scale.captions=[10,20]", "captions.num=15"]) == 2
    assert "scale.captions goes up to 20 but captions.num is 15" in capsys.readouterr().err
    assert main([*base, "scale.captions=[0,20]"]) == 2
    assert "scale.captions=[0, 20] is out of range: every value >= 1" in capsys.readouterr().err
