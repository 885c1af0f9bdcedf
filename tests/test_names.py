"""The start-up name check (synrep/names.py): its lists equal the registries, it accepts every
shipped config, it agrees with the full validation, and a typo fails in well under 2 seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from synrep import names
from synrep.config import load_config, shipped_configs
from synrep.errors import ConfigError
from synrep.validate import validate

# Run in a fresh process: tests register toy methods, backends and stages for the session.
REGISTRIES = """
import json, sys
from synrep.captions.base import BACKENDS
from synrep.concepts.banks import BANKS
from synrep.config import load_config
from synrep.data.datasets import DATASETS
from synrep.errors import ConfigError
from synrep.eval.stage import PROTOCOLS
from synrep.methods import METHODS
from synrep.models.backbones import BACKBONES
from synrep.models.text import TEXT_MODELS
from synrep.stages import stage_names
from synrep.validate import validate
errors = {}
for override in sys.argv[1:]:
    try:
        validate(load_config("quickstart", [override]))
    except ConfigError as e:
        errors[override] = str(e)
print(json.dumps({"METHODS": METHODS.names(), "BACKBONES": BACKBONES.names(),
                  "DATASETS": DATASETS.names(), "PROTOCOLS": sorted(PROTOCOLS),
                  "STAGES": stage_names(), "BACKENDS": BACKENDS.names(),
                  "TEXT_MODELS": TEXT_MODELS.names(), "BANKS": BANKS.names(),
                  "errors": errors}))
"""
TYPOS = ["model.backbone=vit_tinyy", "eval.protocols=[linear,knnn]", "run.stages=[captions,trainn]",
         "captions.backend=grammer", "eval.dataset=fashion", "captions.banks={fashon: 1.0}"]


@pytest.fixture(scope="module")
def fresh() -> dict:
    proc = subprocess.run([sys.executable, "-c", REGISTRIES, *TYPOS], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_lists_equal_the_registries(fresh):
    for name in ("METHODS", "BACKBONES", "DATASETS", "PROTOCOLS", "BANKS", "BACKENDS",
                 "TEXT_MODELS"):
        assert sorted(getattr(names, name)) == fresh[name], name
    assert list(names.PROTOCOLS) == fresh["PROTOCOLS"]
    assert list(names.STAGES) == fresh["STAGES"]  # pipeline order


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_passes_both_checks(name):
    names.prescreen(name, [])
    validate(load_config(name))


@pytest.mark.parametrize("override", TYPOS)
def test_the_quick_check_says_what_the_full_validation_says(override, fresh):
    with pytest.raises(ConfigError) as quick:
        names.prescreen("quickstart", [override])
    assert str(quick.value) == fresh["errors"][override]


def test_the_training_dataset_is_checked_when_it_is_read():
    with pytest.raises(ConfigError, match="data.dataset='mnist' is unknown"):
        names.prescreen("fashion_simclr", ["data.dataset=mnist"])
    names.prescreen("quickstart", ["data.dataset=mnist"])  # trains on shards: not read


def test_open_names_and_folders_are_left_to_the_full_check(tmp_path):
    names.prescreen("quickstart", ["model.backbone=timm:resnet18",
                                   "eval.dataset=torchvision:MNIST",
                                   f"captions.banks={{{tmp_path / 'mine.yaml'}: 1.0}}"])
    names.prescreen("clip_fashion", [f"method.clip.text_model={tmp_path}"])
    with pytest.raises(ConfigError, match="text_model='tower' is neither a built-in"):
        names.prescreen("clip_fashion", ["method.clip.text_model=tower"])
    # what does not parse is reported by the full load, not here
    names.prescreen("no-such-config", ["method.name=nope"])
    names.prescreen("quickstart", ["not an override"])


@pytest.mark.parametrize("override, expected", [
    ("method.name=simclrr", "method.name='simclrr' is unknown; choose one of: clip, mae,"),
    ("model.backbone=vit_tiny_p7", "choose one of: resnet18_28, vit_base_patch16_224"),
    ("eval.protocols=[linear,knnn]", "eval.protocols='knnn' is unknown; choose one of: fewshot"),
])
def test_a_typo_fails_in_under_two_seconds_before_torch_loads(override, expected, tmp_path):
    """The best of three runs of the real entry point, in a fresh interpreter, from another
    folder, on a shipped config by name; nothing is written."""
    cmd = [sys.executable, "-m", "synrep", "run", "quickstart", f"run.dir={tmp_path / 'run'}",
           override]
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        walls.append(time.perf_counter() - t0)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"synrep: error: {proc.stderr[15:].strip()}"]
        assert expected in proc.stderr, proc.stderr
    assert min(walls) < 2.0, walls
    assert not (tmp_path / "run").exists()
