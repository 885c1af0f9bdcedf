"""The run report (synrep.report) on a small hand-made run folder, read back as HTML and in
headless Chromium (synrep.browser).

Shown numbers are checked against the JSON files they come from (rounded to 2 decimals by
``round``, not by the report's formatter); the browser test skips without Chromium unless
``SYNREP_REQUIRE_BROWSER=1`` (CI), where it fails instead.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from synrep.config import Config, save_config
from synrep.data.shards import CaptionGroup, write_shard
from synrep.errors import ConfigError, DataError
from synrep.report import REPORT_FILE, format_number, write_report

SPECIAL = 'a <b>bold</b> shirt & "tie" <script>alert(1)</script>'
SECTIONS = ("samples", "generator", "training", "evaluation", "pca", "scaling")
RESULTS = {
    "fashion-mnist": {
        "linear_probe_top1": 87.38999962806702,
        "sgd_probe_top1": 86.5,
        "knn_top1": 83.715,
        "feature_dim": 192,
        "linear_probe_best_c": 0.001,
        "checkpoint": "runs/x/<final>.safetensors",
        "protocol": {"pool": "cls+avg", "n_last_blocks": 1, "weights": "teacher"},
        "timings": {"features_s": 3.456, "knn_s": 0.5},
        "fewshot": {"1": {"mean": 45.678, "std": 3.2149}, "5": {"mean": 60.0, "std": 1.005},
                    "10": {"mean": 70.125, "std": 0.0}},
    },
    "imagefolder": {"knn_top1": 50.0, "linear_probe_top1": 61.23456},
}
SCALE = {  # as synrep.scaling.run_scaling writes it
    "protocol": "linear",
    "dataset": "fashion-mnist",
    "points": [
        {"captions": 100, "images_per_caption": 4, "images": 400, "top1": 70.5, "error": 29.5,
         "run": "runs/x/scale/c100_k4"},
        {"captions": 25, "images_per_caption": 4, "images": 100, "top1": 60.25, "error": 39.75,
         "run": "runs/x/scale/c25_k4"},
        {"captions": 400, "images_per_caption": 4, "images": 1600, "top1": 78.125,
         "error": 21.875, "run": "runs/x/scale/c400_k4"},
    ],
    "fit": {"form": "power+offset", "a": 312.5, "b": 0.3456, "c": 5.0, "r2": 0.987654},
}
REQUIRE_BROWSER = os.environ.get("SYNREP_REQUIRE_BROWSER") == "1"


def _make_run(run: Path, *, everything: bool = True) -> Path:
    """A run folder with config.yaml and (``everything``) every input of every section."""
    cfg = Config()
    cfg.run.name, cfg.run.dir = "unit", str(run)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    if not everything:
        return run
    rng = np.random.default_rng(0)
    captions = [SPECIAL, "a plain dress", "a sneaker on a box", "a bag", "an ankle boot"]
    groups = [CaptionGroup(f"{i:09d}", c, {"concept": "shirt", "template": "c", "label": 6},
                           [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(4)])
              for i, c in enumerate(captions)]
    write_shard(run / "images" / "000000.tar", groups[:3])
    write_shard(run / "images" / "000001.tar", groups[3:])
    (run / "train").mkdir()
    with open(run / "train" / "metrics.jsonl", "w") as f:
        for step in range(10, 210, 10):
            f.write(json.dumps({"step": step, "lr": 1e-3 * step / 200, "grad_norm": 2.0,
                                "samples_per_s": 100.0 + step, "contrastive": 5 - step / 100,
                                "ibot": 1.0, "loss": 6 - step / 100}) + "\n")
    (run / "train" / "summary.json").write_text(json.dumps(
        {"steps": 200, "seconds": 12.5, "samples_per_s": 123.4}))
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(RESULTS))
    Image.fromarray(rng.integers(0, 256, (56, 112, 3), dtype=np.uint8)).save(
        run / "eval" / "pca.png")
    (run / "scale").mkdir()
    (run / "scale" / "results.json").write_text(json.dumps(SCALE))
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    run = _make_run(tmp_path_factory.mktemp("report") / "run")
    path = write_report(run)
    return path, path.read_text(encoding="utf-8")


class _Collect(HTMLParser):
    """Every tag's attributes, and the text of elements that carry data-key."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.values: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "data-key" in a:
            self._open.append({"dataset": a["data-dataset"], "key": a["data-key"],
                               "data_value": a["data-value"], "value": "", "tag": tag})

    def handle_data(self, data):
        for v in self._open:
            v["value"] += data

    def handle_endtag(self, tag):
        if self._open and self._open[-1]["tag"] == tag:
            v = self._open.pop()
            v["value"] = v["value"].strip()
            self.values.append(v)


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _check_values(values: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Every shown number equals its JSON value rounded to 2 decimals; returns what was shown."""
    shown = set()
    for v in values:
        source = SCALE if v["dataset"] == "scale" else RESULTS[v["dataset"]]
        expected = _lookup(source, v["key"])
        assert json.loads(v["data_value"]) == expected, v
        text = v["value"]
        if isinstance(expected, int):
            assert text == str(expected), v
        elif expected != 0 and abs(expected) < 0.01:  # too small for 2 decimals: 3 digits
            assert float(text) == pytest.approx(expected, rel=5e-3), v
        else:
            assert re.fullmatch(r"-?\d+\.\d\d", text), v
            assert float(text) == round(expected, 2), v
        shown.add((v["dataset"], v["key"]))
    return shown


def _top1(results: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d, k) for d, entry in results.items() for k in entry if k.endswith("_top1")}


def test_format_number_exact():
    assert format_number(87.38999962806702) == "87.39"
    assert format_number(83.715) == "83.72"  # stored as 83.71500000000000341...
    assert format_number(2.675) == "2.67"  # stored as 2.67499999999999982...
    assert format_number(1536) == "1536"
    assert format_number(1000.0) == "1000.00"
    assert format_number(0.0) == "0.00"
    assert format_number(0.001) == "1.00e-03"
    assert format_number(-0.5) == "-0.50"
    assert format_number(float("nan")) == "nan"
    with pytest.raises(TypeError):
        format_number(True)


def test_html_has_every_section_and_nothing_external(report):
    path, text = report
    assert path.name == REPORT_FILE and path.stat().st_mode & 0o444 == 0o444
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in text
    assert "not run yet" not in text
    # captions (and every other text from files) are escaped
    assert html.escape(SPECIAL, quote=True) in text
    assert "<script" not in text and "<b>bold" not in text
    assert html.escape("runs/x/<final>.safetensors") in text
    # nothing fetched from elsewhere: no scheme-ful or protocol-relative src/href, no CSS url()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", text, re.I)
    assert "url(" not in text and "@import" not in text
    parser = _Collect()
    parser.feed(text)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == 5 + 3  # 5 caption groups, training curves, PCA, scaling plot
    for a in imgs:
        src = a["src"]
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert im.width > 0 and im.height > 0
    # the 28 px images are enlarged nearest-neighbour: 4 tiles of 3x, 3 gaps of 4 px
    strip = Image.open(io.BytesIO(base64.b64decode(imgs[0]["src"].split(",", 1)[1])))
    assert strip.size == (4 * 84 + 3 * 4, 84)
    links = [a["href"] for t, a in parser.tags if t == "a"]
    assert sorted(links) == sorted(f"#{s}" for s in SECTIONS)


def test_html_numbers_equal_the_json(report):
    _, text = report
    parser = _Collect()
    parser.feed(text)
    shown = _check_values(parser.values)
    assert _top1(RESULTS) <= shown
    assert {("scale", "fit.b"), ("scale", "points.2.error")} <= shown
    assert ("fashion-mnist", "fewshot.5.mean") in shown


def test_missing_inputs_are_named_not_errors(tmp_path):
    run = _make_run(tmp_path / "bare", everything=False)
    text = write_report(run, tmp_path / "out" / "r.html").read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in text
    # every section but the generator settings (from config.yaml) says what to run
    assert text.count("not run yet:") == 5
    for command in ("images", "train", "eval", "scale"):
        assert f"synrep {command} CONFIG run.dir=" in text
    assert not (run / REPORT_FILE).exists()


def test_only_complete_shards_and_max_groups(tmp_path):
    run = _make_run(tmp_path / "run")
    text = write_report(run, max_groups=2).read_text()
    assert text.count('<figure class="sample">') == 2
    (run / "images" / "000001_stats.json").unlink()  # an unfinished shard is not shown
    text = write_report(run).read_text()
    assert text.count('<figure class="sample">') == 3 and "of 3 caption groups" in text


def test_truncated_metrics_line_and_bad_json(tmp_path):
    run = _make_run(tmp_path / "run")
    with open(run / "train" / "metrics.jsonl", "a") as f:
        f.write('{"step": 210, "lr"')  # a writer killed mid-line
    assert "last line is incomplete" in write_report(run).read_text()
    with open(run / "train" / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 220, "loss": 1.0}) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl line 21"):
        write_report(run)
    (run / "train" / "metrics.jsonl").unlink()
    (run / "scale" / "results.json").write_text(json.dumps({"points": [{"captions": 1}]}))
    with pytest.raises(DataError, match=r"points\[0\] has no numeric 'images_per_caption'"):
        write_report(run)
    (run / "scale" / "results.json").unlink()
    (run / "eval" / "results.json").write_text("{not json")
    with pytest.raises(DataError, match=r"results\.json is not readable JSON"):
        write_report(run)


def test_missing_run_or_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"run folder .*nope.* does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"config\.yaml.* does not exist.*synrep run"):
        write_report(tmp_path / "empty")
    run = _make_run(tmp_path / "run", everything=False)
    (run / "config.yaml").write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz.*config\.yaml"):
        write_report(run)
    assert not (run / REPORT_FILE).exists()


def test_write_is_atomic(tmp_path, monkeypatch):
    import synrep.report as report_mod

    run = _make_run(tmp_path / "run", everything=False)
    out = write_report(run)
    old = out.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # the write fails after part of the file is on disk: the old report stays whole
    monkeypatch.setattr(report_mod.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(run)
    assert out.read_bytes() == old
    fresh = tmp_path / "fresh" / "report.html"
    with pytest.raises(OSError, match="disk full"):
        write_report(run, fresh)
    assert not fresh.exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", REPORT_FILE]
    assert list(fresh.parent.iterdir()) == []
    monkeypatch.undo()
    # a section that fails while the page is built writes nothing either
    monkeypatch.setattr(report_mod, "_pca", lambda run_dir: fail())
    with pytest.raises(OSError):
        write_report(run, fresh)
    assert not fresh.exists()


def _render(path: Path, **kwargs: Any) -> dict[str, Any]:
    from synrep.browser import BrowserUnavailable, render_in_browser

    try:
        return render_in_browser(path, **kwargs)
    except BrowserUnavailable as e:
        if REQUIRE_BROWSER:
            pytest.fail(f"SYNREP_REQUIRE_BROWSER=1 but the browser is unavailable: {e}")
        pytest.skip(str(e))


def test_report_in_headless_chromium(report, tmp_path):
    path, text = report
    shot = tmp_path / "report.png"
    seen = _render(path, screenshot=shot)
    assert seen["errors"] == [], seen["console"]
    assert seen["broken_images"] == []
    assert seen["images"] == text.count("<img ")
    shown = _check_values(seen["values"])
    assert _top1(RESULTS) <= shown
    assert ("scale", "fit.b") in shown
    assert seen["screenshot"] == shot
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height >= min(seen["height"], 8000) > 1000
