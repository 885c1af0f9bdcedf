"""Config loading: defaults <- YAML <- overrides; unknown keys and wrong types are errors."""

from __future__ import annotations

from pathlib import Path

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
    cfg = load_config(None, ["method.simclr.temperature=0.3"])
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
    ("method.simclr.temperature=[1]", "expected a number"),
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


# --- per-method sections -------------------------------------------------------------------

def test_each_method_reads_its_own_section(tmp_path):
    path = tmp_path / "mae.yaml"
    path.write_text("method:\n  name: mae\n  mae:\n    mask_ratio: 0.6\n    decoder_dim: 64\n")
    cfg = load_config(path, ["method.mae.decoder_depth=3"])
    opts = cfg.method.options
    assert opts is cfg.method.mae and type(opts).__name__ == "MAEOptions"
    assert (opts.mask_ratio, opts.decoder_dim, opts.decoder_depth) == (0.6, 64, 3)
    assert opts.decoder_heads == 4  # untouched options keep their defaults
    assert cfg.to_dict()["method"] == {"name": "mae", "mae": {
        "decoder_dim": 64, "decoder_depth": 3, "decoder_heads": 4, "norm_pix": True,
        "mask_ratio": 0.6}}
    again = config_from_dict(cfg.to_dict(), "test")
    assert again == cfg and again.method.mae.decoder_depth == 3


@pytest.mark.parametrize("overrides, pattern", [
    # an option of another method, in the active method's section
    (["method.name=simclr", "method.simclr.mask_ratio=0.5"],
     r"mask_ratio is an option of method\(s\) mae, moce, not of 'simclr'"),
    # another method's whole section
    (["method.name=simclr", "method.moce.clusters=4"],
     r"'method.moce' in command-line overrides configures method 'moce', but method.name is "
     r"'simclr'"),
    # a flat option, as configs were written before sections
    (["method.name=synclr", "method.teacher=false"],
     r"teacher is an option of method\(s\) synclr; write method.synclr.teacher"),
    (["method.name=mae", "method.teacher=false"],
     r"teacher is an option of method\(s\) synclr; not of method 'mae'"),
    # an option no method has
    (["method.name=synclr", "method.synclr.temprature=0.1"], r"valid keys under 'method.synclr'"),
    (["method.name=nope"], r"'method.name' in command-line overrides: unknown method 'nope'"),
])
def test_options_of_other_methods_are_errors_naming_the_owner(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_a_file_may_switch_method_by_override(tmp_path):
    # the file's section configures its own method; an override trains another one instead
    cfg = load_config("configs/fashion_simclr.yaml", ["method.name=supervised"])
    assert cfg.method.name == "supervised" and cfg.method.options.num_classes == 10
    assert cfg.to_dict()["method"] == {"name": "supervised", "supervised": {
        "num_classes": 10, "label_smoothing": 0.0}}


def test_a_misspelt_option_set_in_code_is_an_error():
    cfg = Config()
    cfg.method.simclr.temperature = 0.1
    with pytest.raises(AttributeError, match="method.simclr has no option 'temprature'"):
        cfg.method.simclr.temprature = 0.1
    with pytest.raises(AttributeError, match="cfg.method.simclr.temperature"):
        cfg.method.temperature = 0.1


def test_a_flat_method_section_of_an_older_synrep_is_read_with_its_prefixes():
    # as checkpoints written before method sections store it: every method's options, flat
    stored = {"method": {"name": "moce", "temperature": 0.5, "mae_decoder_dim": 64,
                         "mae_mask_ratio": 0.6, "moce_clusters": 8, "moce_top_k": 1,
                         "mixedae_temperature": 0.3, "proj_dim": 32}}
    cfg = config_from_dict(stored, "checkpoint 'old.safetensors'")
    m = cfg.method.moce
    assert (m.decoder_dim, m.mask_ratio, m.clusters, m.top_k) == (64, 0.6, 8, 1)
    stored["method"]["name"] = "mixedae"
    assert config_from_dict(stored, "checkpoint 'old'").method.mixedae.temperature == 0.3
    stored["method"]["name"] = "synclr"
    assert config_from_dict(stored, "checkpoint 'old'").method.synclr.temperature == 0.5
    # the same flat keys written by a user are refused, naming the section to use
    with pytest.raises(ConfigError, match="write method.synclr.temperature"):
        load_config(None, ["method.name=synclr", "method.temperature=0.5"])


def test_the_configuration_reference_is_current():
    """docs/config.md is what `synrep config --reference` prints (in a fresh process: methods
    that tests register are not synrep's): every section and every method's options."""
    import subprocess
    import sys

    from synrep.methods import METHODS

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "synrep", "config", "--reference"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert (root / "docs/config.md").read_text() == text, \
        "regenerate it: synrep config --reference > docs/config.md"
    for section in ("run", "data", "train", "eval", "log"):
        assert f"## `{section}`" in text
    for name in [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("synrep.")]:
        assert f"### `method.{name}`" in text
    assert "| `train.accum_steps` | `int` | `1` |" in text
    assert "|  |\n" not in text  # every option says what it does
