"""Bad input, table-driven: every row is a command a user could type against a finished run.

For each row: exit code 2, one line on stderr (``synrep: error: ...``) that names the problem,
no traceback, and not one byte of the run directory changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from synrep.cli import main
from tests.conftest import needs_fashion

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_fashion]

CONFIG = "configs/fashion_simclr.yaml"
TINY = ["train.steps=2", "train.batch_size=16", "train.ckpt_every=2", "run.threads=1",
        "eval.protocols=[knn]", "eval.limit_train=200", "eval.limit_test=100",
        "eval.pca_images=0", "method.simclr.proj_hidden_dim=32"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run: captions (grammar) and a 2-step SimCLR trained and evaluated."""
    run = tmp_path_factory.mktemp("bad") / "run"
    assert main(["run", CONFIG, *TINY, f"run.dir={run}", "run.stages=[captions,train,eval]",
                 "captions.num=16", "captions.shard_size=16"]) == 0
    return run


def _digest(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


# (name, command after `synrep`, words the one-line error must contain). "{run}" is the
# finished run's folder, "{tmp}" a scratch folder for bad files.
ROWS: list[tuple[str, list[str], str]] = [
    # numbers out of range, NaN, infinity
    ("negative steps", ["train", CONFIG, "train.steps=-1"], "train.steps=-1 is out of range"),
    ("zero steps", ["train", CONFIG, "train.steps=0"], "train.steps=0 is out of range"),
    ("zero batch", ["train", CONFIG, "train.batch_size=0"], "train.batch_size=0"),
    ("negative batch", ["train", CONFIG, "train.batch_size=-4"], "train.batch_size=-4"),
    ("zero ckpt_every", ["train", CONFIG, "train.ckpt_every=0"], "train.ckpt_every=0"),
    ("zero log_every", ["train", CONFIG, "train.log_every=0"], "train.log_every=0"),
    ("NaN lr", ["train", CONFIG, "optim.lr=.nan"], "expected a finite number"),
    ("infinite lr", ["train", CONFIG, "optim.lr=.inf"], "expected a finite number"),
    ("zero lr", ["train", CONFIG, "optim.lr=0"], "optim.lr=0.0 is out of range: must be > 0"),
    ("beta of 1.5", ["train", CONFIG, "optim.betas=[0.9,1.5]"], "optim.betas"),
    ("crop scale reversed", ["train", CONFIG, "aug.scale=[1.5,-1]"], "aug.scale=[1.5, -1.0]"),
    ("crop scale of one value", ["train", CONFIG, "aug.scale=[0.2]"], "list of 2"),
    ("hue above 0.5", ["train", CONFIG, "aug.hue=0.9"], "aug.hue=0.9"),
    ("drop path 1", ["train", CONFIG, "model.drop_path=1.0"], "model.drop_path=1.0"),
    ("no channels", ["train", CONFIG, "model.in_chans=0"], "model.in_chans=0"),
    ("NaN guidance", ["images", CONFIG, "images.guidance_scale=.nan"], "expected a finite"),
    ("zero sampling steps", ["images", CONFIG, "images.steps=0"], "images.steps=0"),
    ("resolution 4 px", ["images", CONFIG, "images.resolution=4"], "images.resolution=4"),
    ("no captions", ["captions", CONFIG, "captions.num=0"], "captions.num=0"),
    ("top_p above 1", ["captions", CONFIG, "captions.top_p=1.5"], "captions.top_p=1.5"),
    ("max words below min", ["captions", CONFIG, "captions.max_words=2",
                             "captions.min_words=5"], "captions.max_words=2 is below"),
    ("zero bank weights", ["captions", CONFIG, "captions.banks={fashion: 0}"],
     "must not all be 0"),
    ("a C of 0", ["eval", CONFIG, "eval.linear_cs=[0,1]"], "eval.linear_cs=[0.0, 1.0]"),
    ("k of 0", ["eval", CONFIG, "eval.knn_k=0"], "eval.knn_k=0"),
    ("validation share 0", ["eval", CONFIG, "eval.val_fraction=0"], "eval.val_fraction=0.0"),
    ("filter ratio 1", ["train", CONFIG, "selection.filter_ratio=1.0"],
     "selection.filter_ratio=1.0"),
    ("zero chunks", ["train", CONFIG, "selection.chunks=0"], "selection.chunks=0"),
    ("zero max captions", ["train", CONFIG, "data.max_captions=0"], "data.max_captions=0"),
    ("EMA of 1", ["train-generator", CONFIG, "generator.ema=1.0"], "generator.ema=1.0"),
    ("scale size 0", ["scale", CONFIG, "scale.captions=[0,20]"], "scale.captions=[0, 20]"),
    # method options
    ("unknown method", ["train", CONFIG, "method.name=nope"], "unknown method 'nope'"),
    ("another method's option", ["train", CONFIG, "method.simclr.mask_ratio=0.5"],
     "mask_ratio is an option of method(s) mae, moce, not of 'simclr'"),
    ("another method's section", ["train", CONFIG, "method.moce.clusters=4"],
     "configures method 'moce', but method.name is 'simclr'"),
    ("a flat method option", ["train", CONFIG, "method.temperature=0.1"],
     "write method.simclr.temperature"),
    ("zero temperature", ["train", CONFIG, "method.simclr.temperature=0"],
     "method.simclr.temperature=0.0 is out of range"),
    ("misspelt option", ["train", CONFIG, "method.simclr.temprature=0.1"],
     "unknown config key 'method.simclr.temprature'"),
    ("MAE mask ratio 1", ["train", "configs/mae_fashion.yaml", "method.mae.mask_ratio=1.0"],
     "method.mae.mask_ratio=1.0 is out of range"),
    # a command that disagrees with what the run already holds
    ("more captions on a finished run", ["captions", CONFIG, "captions.num=300",
                                         "captions.shard_size=16"],
     "was made with a different config (changed: num)"),
    ("another lr on a trained run", ["train", CONFIG, *TINY, "optim.lr=0.5"],
     "was written with a different 'optim' config (changed: optim.lr)"),
    ("a folder as checkpoint", ["eval", CONFIG, "--checkpoint", "{run}"], "is a directory"),
    ("a missing checkpoint", ["eval", CONFIG, "--checkpoint", "{tmp}/none.safetensors"],
     "does not exist"),
    ("scale beyond the captions", ["scale", CONFIG, "scale.captions=[10,20]", "captions.num=15"],
     "scale.captions goes up to 20 but captions.num is 15"),
    # keys, types, syntax, files
    ("unknown section", ["train", CONFIG, "foo.bar=1"], "unknown config key 'foo'"),
    ("words for a number", ["train", CONFIG, "train.steps=ten"], "expected an integer"),
    ("empty key segment", ["train", CONFIG, "train..steps=1"], "empty key segment"),
    ("unknown stage", ["run", CONFIG, "run.stages=[nope]"], "run.stages='nope' is unknown"),
    ("missing config file", ["train", "{tmp}/missing.yaml"], "does not exist"),
    ("config not a mapping", ["train", "{tmp}/list.yaml"], "must hold a mapping"),
    ("python tag in YAML", ["train", "{tmp}/tag.yaml"], "is not valid YAML"),
]
FILES = {"list.yaml": "- 1\n- 2\n", "tag.yaml": "train: !!python/object/apply:os.system [ls]\n"}


def test_the_table_has_at_least_40_rows():
    assert len(ROWS) >= 40 and len({name for name, _, _ in ROWS}) == len(ROWS)


@pytest.mark.parametrize("name, command, words", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(finished, tmp_path, capsys, name,
                                                          command, words):
    for file, text in FILES.items():
        _write(tmp_path, file, text)
    before = _digest(finished)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(finished)) for a in command]
    capsys.readouterr()
    assert main([*argv, f"run.dir={finished}"]) == 2, name
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synrep: error: "), err
    assert words in lines[0], lines[0]
    assert "Traceback" not in err
    assert _digest(finished) == before, f"{name} changed the run directory"
