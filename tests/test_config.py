"""Config loading: defaults <- YAML <- overrides; unknown keys and wrong types are errors."""

from __future__ import annotations

import pytest
import yaml

from synrep.cli import main
from synrep.config import Config, config_from_dict, load_config, parse_overrides
from synrep.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 7\naug:\n  scale: [0.3, 1]\n")
    cfg = load_config(path, ["train.batch_size=64", "eval.root=null", "run.stages=[train]"])
    assert cfg.train.steps == 7 and cfg.train.batch_size == 64
    assert cfg.aug.scale == (0.3, 1.0)  # ints widen to float, lists become tuples
    assert cfg.eval.root is None and cfg.run.stages == ["train"]
    assert cfg.run.name == "exp" and cfg.run.dir == "runs/exp"


def test_round_trip_through_dict():
    cfg = load_config(None, ["method.temperature=0.3"])
    again = config_from_dict(cfg.to_dict(), "test")
    assert again == cfg


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match=r"train\.stepz.*bad\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load_config(None, ["nope=1"])


@pytest.mark.parametrize("override, pattern", [
    ("train.steps=ten", "expected an integer"),
    ("train.steps=1.5", "expected an integer"),
    ("method.temperature=[1]", "expected a number"),
    ("train.compile=1", "expected true or false"),
    ("train.precision=fp8", "expected one of"),
    ("aug.scale=[0.2]", "list of 2"),
    ("train=3", "must be a mapping"),
])
def test_wrong_types(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_malformed_yaml_and_overrides(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_bad_config_with_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbonez: vit\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.backbonez" in err and "bad.yaml" in err and "Traceback" not in err


def test_cli_prints_resolved_config(capsys):
    assert main(["config", "configs/fashion_simclr.yaml", "train.steps=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3
    assert set(printed) == set(Config().to_dict())


def test_overrides_may_follow_options(tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    code = main(["eval", "configs/fashion_simclr.yaml", "--checkpoint", str(missing),
                 f"run.dir={tmp_path / 'run'}", "eval.pool=cls"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "configs/fashion_simclr.yaml", "--checkpoint", str(missing), "stray"])
