"""The run report: one self-contained HTML page that shows what a run made and how it did.

``write_report(RUN)`` reads a run folder (``RUN/config.yaml`` and whatever the stages wrote) and
writes ``RUN/report.html``: the run's settings, the first caption groups of its image shards with
their k images, the generator settings, the training curves, the evaluation results, the PCA maps
of patch features and the data-scaling fit. Each section appears when its inputs exist and says
which command makes them when they do not.

The page is static and offline: inline CSS, images as base64 ``data:`` URIs, no scripts, no
network fetches, system fonts. Every number of the evaluation and scaling tables sits in an
element with ``data-dataset``, ``data-key`` (the dotted key path in the JSON file) and
``data-value`` (the exact JSON value), so a test can check that the page shows what the files say
(:func:`synrep.browser.render_in_browser` reads them back from a real browser).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

import synrep
from synrep.config import Config, config_from_dict
from synrep.data.shards import complete_shards, iter_groups, marker_path
from synrep.errors import ConfigError, DataError, SynrepError
from synrep.eval.scaling import draw_fit
from synrep.layout import RunLayout
from synrep.utils import yaml_error_summary

REPORT_FILE = RunLayout(".").report.name
#: results.json keys shown first, in this order, with a readable name; other ``*_top1`` keys follow.
TOP1_LABELS = {
    "linear_probe_top1": "linear probe (L-BFGS)",
    "sgd_probe_top1": "linear heads (SGD grid)",
    "knn_top1": "kNN",
    "zeroshot_top1": "zero-shot",
    "finetune_top1": "fine-tuning",
}
# metrics.jsonl columns written by the training loop itself; every other column is a term of the
# method's objective (its output dict), plotted together with the total loss.
_LOOP_COLUMNS = ("step", "lr", "grad_norm", "samples_per_s", "examples_read", "flops",
                 "score_seconds", "train_seconds")
_SELECTION_PREFIX = "select/"  # data-selection statistics (JEST), drawn in their own panel
_THUMB_TARGET = 84  # shown height of one sample image in pixels (28 px images: 3x nearest)
_THUMB_MAX = 128  # larger images are shrunk to this (antialiased) to keep the page small
_MAX_SHOWN_IMAGES = 8  # images per caption group shown


@dataclass
class _Section:
    anchor: str
    title: str
    body: str
    present: bool  # False: the stage that makes its inputs has not run yet


# -- formatting -------------------------------------------------------------------------------

def _e(value: Any) -> str:
    """HTML-escape any value's text (quotes too: it may land in an attribute)."""
    return html.escape(str(value), quote=True)


def format_number(x: int | float) -> str:
    """How the report shows a number: ints exactly, floats with 2 decimals.

    Floats too small for 2 decimals (0 < |x| < 0.01, say a probe's C of 0.001) keep 3 significant
    digits (``1.00e-03``) instead of showing ``0.00``; non-finite values are ``nan``/``inf``.
    """
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"format_number takes an int or float, got {x!r}")
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x != 0 and abs(x) < 0.01:
        return f"{x:.2e}"
    return f"{x:.2f}"


def _number(x: int | float, dataset: str | None = None, key: str | None = None) -> str:
    """A number's element; with ``dataset`` and ``key`` it carries the data-* attributes."""
    if dataset is None or key is None:
        return f'<span class="num">{format_number(x)}</span>'
    return (f'<span class="num" data-dataset="{_e(dataset)}" data-key="{_e(key)}" '
            f'data-value="{_e(json.dumps(x))}">{format_number(x)}</span>')


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _value(x: Any, dataset: str | None = None, key: str | None = None) -> str:
    """Any JSON value as HTML: numbers formatted (and marked), dicts and lists as nested tables."""
    if _is_number(x):
        return _number(x, dataset, key)
    if isinstance(x, bool):
        return f"<code>{str(x).lower()}</code>"
    if x is None:
        return '<span class="muted">null</span>'
    if x == "" or x == {}:
        return f'<span class="muted">{"&quot;&quot;" if x == "" else "{}"}</span>'
    if isinstance(x, dict):
        return _dict_table(x, dataset, key)
    if isinstance(x, (list, tuple)):
        if not x:
            return '<span class="muted">[]</span>'
        parts = [_value(v, dataset, f"{key}.{i}" if key is not None else None)
                 for i, v in enumerate(x)]
        if all(_is_number(v) or isinstance(v, str) for v in x):
            return ", ".join(parts)
        return "<ol start=\"0\">" + "".join(f"<li>{p}</li>" for p in parts) + "</ol>"
    return _e(x)


def _matrix_columns(d: dict[str, Any]) -> list[str] | None:
    """The shared inner keys when ``d`` is a dict of flat dicts of scalars (say fewshot:
    ``{"1": {"mean": ..., "std": ...}, "5": ...}``), which reads best as one table; else None."""
    if len(d) < 2 or not all(isinstance(v, dict) and v for v in d.values()):
        return None
    columns: list[str] = []
    for v in d.values():
        if any(isinstance(x, (dict, list)) for x in v.values()):
            return None
        columns += [k for k in v if k not in columns]
    return columns


def _dict_table(d: dict[str, Any], dataset: str | None = None, prefix: str | None = None) -> str:
    def path(k: str) -> str | None:
        return None if dataset is None else (f"{prefix}.{k}" if prefix else str(k))

    columns = _matrix_columns(d)
    if columns is not None:
        head = "".join(f"<th>{_e(c)}</th>" for c in columns)
        rows = "".join(
            f"<tr><th>{_e(k)}</th>" + "".join(
                f"<td>{_value(v[c], dataset, f'{path(k)}.{c}' if dataset else None)}</td>"
                if c in v else "<td></td>" for c in columns) + "</tr>"
            for k, v in d.items())
        return f'<table class="kv matrix"><tr><th></th>{head}</tr>{rows}</table>'
    rows = "".join(f"<tr><th><code>{_e(k)}</code></th><td>{_value(v, dataset, path(k))}</td></tr>"
                   for k, v in d.items())
    return f'<table class="kv">{rows}</table>'


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, without pyplot (no global backend state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SynrepError("the run report draws its plots with matplotlib, which is not "
                          "installed; pip install matplotlib") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _missing(what: str, command: str, how: str = "") -> str:
    """The line a section shows when the stage that makes its input has not run."""
    run = f"run <code>{_e(command)}</code>" if command else ""
    return f'<p class="missing">not run yet: {_e(what)} is missing; {run}{how}</p>'


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); rerun the stage that writes it, "
                        "or delete it to leave it out of the report") from None


# -- sections ---------------------------------------------------------------------------------

def _header(cfg: Config, run_dir: Path, sections: list[_Section],
            results: dict[str, dict[str, Any]] | None) -> str:
    m, t = cfg.method, cfg.train
    data = (f"{cfg.data.dataset} ({cfg.data.split})" if cfg.data.source == "dataset"
            else f"caption-group shards {cfg.data.shards or 'in images/ (this run)'}")
    precision = t.precision
    env = RunLayout(run_dir).train_env
    if env.is_file():  # what the trainer ran (train.precision=auto resolves per device)
        ran = json.loads(env.read_text()).get("precision", precision)
        precision = ran if ran == precision else f"{ran} ({precision})"
    summary = {
        "method": m.name,
        "backbone": f"{cfg.model.backbone} ({cfg.model.img_size} px, {cfg.model.in_chans} ch)",
        "training data": data,
        "training": f"{t.steps} steps x {t.batch_size} images, peak lr {cfg.optim.lr:g}, "
                    f"{precision}",
        "stages": ", ".join(cfg.run.stages),
        "seed": cfg.run.seed,
    }
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary.items())
    for dataset, entry in (results or {}).items():
        shown = [f"{_e(TOP1_LABELS.get(k, k))} <b>{_number(entry[k], dataset, k)}</b>&thinsp;%"
                 for k in _top1_keys({dataset: entry})]
        if shown:
            rows += (f'<tr class="headline"><th>top-1 on {_e(dataset)}</th>'
                     f'<td>{", ".join(shown)}</td></tr>')
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    nav = "".join(
        f'<li class="{"done" if s.present else "todo"}"><a href="#{s.anchor}">{_e(s.title)}</a>'
        f'{"" if s.present else " <span class=muted>(not run yet)</span>"}</li>'
        for s in sections)
    return (
        f"<header><h1>Run report: {_e(cfg.run.name)}</h1>"
        f'<p class="meta">directory <code>{_e(run_dir)}</code> &middot; written {_e(when)} '
        f"&middot; synrep {_e(synrep.__version__)}</p></header>"
        f'<div class="overview"><table class="kv">{rows}</table>'
        f'<nav><h2>Contents</h2><ul>{nav}</ul></nav></div>'
    )


def _strip(images: list[np.ndarray]) -> bytes:
    """The k images of one caption side by side as one PNG, small images enlarged
    nearest-neighbour (pixels stay sharp), large ones shrunk."""

    rgb = any(img.ndim == 3 for img in images)
    tiles = []
    for img in images:
        pil = Image.fromarray(img)
        if rgb and pil.mode != "RGB":
            pil = pil.convert("RGB")
        h = pil.height
        if h < _THUMB_TARGET:
            f = math.ceil(_THUMB_TARGET / h)
            pil = pil.resize((pil.width * f, h * f), Image.Resampling.NEAREST)
        elif h > _THUMB_MAX:
            pil = pil.resize((max(1, round(pil.width * _THUMB_MAX / h)), _THUMB_MAX),
                             Image.Resampling.LANCZOS)
        tiles.append(pil)
    gap = 4
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    height = max(t.height for t in tiles)
    canvas = Image.new("RGB" if rgb else "L", (width, height), (255, 255, 255) if rgb else 255)
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + gap
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _samples(cfg: Config, run_dir: Path, n: int) -> tuple[str, bool, dict[str, Any] | None]:
    """The samples section, whether it has content, and the first group's metadata."""

    folder = RunLayout(run_dir).images
    shards = complete_shards(folder)
    if not shards:
        return _missing(f"{folder} (complete image shards)",
                        f"synrep images CONFIG run.dir={run_dir}"), False, None
    # the generator is dropped (and its open shard closed) as soon as n groups are read
    first = list(itertools.islice(iter_groups(shards), n))
    items = []
    for g in first:
        shown = g.images[:_MAX_SHOWN_IMAGES]
        more = len(g.images) - len(shown)
        h, w = g.images[0].shape[:2]
        facts = [f"key {g.key}", f"{len(g.images)} images, {w}x{h} px"]
        facts += [f"{k} {g.meta[k]}" for k in ("concept", "template", "label") if k in g.meta]
        if more:
            facts.append(f"first {len(shown)} shown")
        items.append(
            f'<figure class="sample"><img src="{_png_uri(_strip(shown))}" '
            f'alt="{len(shown)} images of caption {_e(g.key)}">'
            f'<figcaption><q>{_e(g.caption)}</q><span class="facts">'
            f'{_e(" · ".join(facts))}</span></figcaption></figure>')
    total = sum(_shard_samples(s) for s in shards)
    intro = (f"<p>The first {len(first)} of {total} caption groups in <code>{_e(folder)}</code> "
             f"({len(shards)} complete shard{'s' if len(shards) != 1 else ''}): each caption with "
             "the images drawn for it, the positives of one another in multi-positive "
             "training.</p>")
    return intro + f'<div class="samples">{"".join(items)}</div>', True, (
        first[0].meta if first else None)


def _shard_samples(shard: Path) -> int:
    marker = _read_json(marker_path(shard))
    return int(marker.get("samples", 0)) if isinstance(marker, dict) else 0


def _cols(*blocks: str) -> str:
    """Blocks (a heading and a table each) side by side, wrapping on narrow windows."""
    return '<div class="cols">' + "".join(f"<div>{b}</div>" for b in blocks if b) + "</div>"


def _generator(cfg: Config, run_dir: Path, meta: dict[str, Any] | None) -> str:
    images = [f"<h3>Images: config</h3>{_dict_table(dict(vars(cfg.images)))}"]
    rendered = (meta or {}).get("generator")
    if isinstance(rendered, dict):
        images.append("<h3>As rendered</h3><p class=note>The first sample's metadata (null "
                      f"settings resolved).</p>{_dict_table(rendered)}")
    stats_path = RunLayout(run_dir).images / "stats.json"
    if stats_path.is_file():
        stats = _read_json(stats_path)
        if isinstance(stats, dict):
            keep = {k: v for k, v in stats.items() if k not in ("config", "shards")}
            images.append("<h3>Images stage</h3><p class=note><code>images/stats.json</code></p>"
                          + _dict_table(keep))
    c = cfg.captions
    essentials = {
        "backend": c.backend, "model": c.model or "(none: grammar)", "banks": c.banks,
        "templates": c.templates, "captions kept": c.num, "temperature": c.temperature,
        "top_p": c.top_p, "words": f"{c.min_words} to {c.max_words}",
        "require_concept": c.require_concept, "near_dup_threshold": c.near_dup_threshold,
    }
    source = (f"<p class=note>Images were drawn for the captions in "
              f"<code>{_e(cfg.images.captions)}</code>; these are this run's captions "
              "settings.</p>" if cfg.images.captions else "")
    captions = [f"<h3>Captions: config</h3>{source}{_dict_table(essentials)}"]
    cstats_path = RunLayout(run_dir).captions / "stats.json"
    if cstats_path.is_file():
        cstats = _read_json(cstats_path)
        if isinstance(cstats, dict):
            keep = {k: v for k, v in cstats.items() if k != "config"}
            captions.append("<h3>Captions stage</h3><p class=note><code>captions/stats.json"
                            f"</code>; rejections by reason</p>{_dict_table(keep)}")
    return _cols(*images) + _cols(*captions)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Rows of metrics.jsonl by step (a resumed run logs some steps twice: the last row wins),
    and a note for the reader."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: dict[int, dict[str, Any]] = {}
    note = ""
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if i == len(lines) - 1:  # a writer killed mid-line; every earlier row is whole
                note = "The last line is incomplete (training running or killed) and is left out."
                break
            raise DataError(f"{path} line {i + 1} is not JSON ({e}); delete the line or rerun "
                            "training") from None
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            raise DataError(f"{path} line {i + 1} has no numeric 'step'; each line must be a "
                            "JSON object with step, lr, loss, ...")
        rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)], note


def _training(run_dir: Path) -> tuple[str, bool]:
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return _missing(str(path), f"synrep train CONFIG run.dir={run_dir}"), False
    rows, note = _read_metrics(path)
    if not rows:
        return f'<p class="missing">{_e(path)} has no rows yet (training just started).</p>', False
    steps = [r["step"] for r in rows]

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if _is_number(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]

    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    terms = sorted((k for k in columns if k not in _LOOP_COLUMNS and series(k)[0]
                    and not k.startswith(_SELECTION_PREFIX)),
                   key=lambda k: k != "loss")  # the total first, its terms drawn over it
    panels = [("objective", terms, "loss")]
    chosen = [k for k in columns if k.startswith(_SELECTION_PREFIX) and series(k)[0]]
    if chosen:
        panels.append(("data selection (super-batch vs chosen)", chosen, "loss per image"))
    panels += [(title, [k], label) for k, title, label in (
        ("lr", "learning rate", "lr"),
        ("grad_norm", "gradient norm", "norm (before clipping)"),
        ("samples_per_s", "throughput", "images / s"))
        if series(k)[0]]
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(11, 3.2 * nrows)
    for i, (title, keys, ylabel) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for k in keys:
            x, y = series(k)
            # the total loss solid, its terms dashed on top: a single term equals the total
            term = len(keys) > 1 and k != "loss"
            ax.plot(x, y, lw=1.2 if term else 1.5, ls="--" if term else "-", label=k,
                    marker="o" if len(x) == 1 else None)
        ax.set_title("loss and its terms" if title == "objective" else title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if keys == ["lr"]:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(keys) > 1:
            ax.legend(fontsize=8)
    img = _png_uri(_figure_png(fig))
    last = rows[-1]
    final = {k: last[k] for k in columns if k in last}
    parts = [
        f'<figure class="plot"><img src="{img}" alt="training curves">'
        f"<figcaption>Training curves from <code>train/metrics.jsonl</code>: {len(rows)} logged "
        f"steps ({steps[0]} to {steps[-1]}). Loss terms are the method's outputs; throughput is "
        "averaged since the (last) start.</figcaption></figure>",
    ]
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    summary_path = RunLayout(run_dir).train_summary
    summary = _read_json(summary_path) if summary_path.is_file() else None
    parts.append(_cols(
        f"<h3>Last logged step</h3>{_dict_table(final)}",
        f"<h3>Summary</h3><p class=note><code>train/summary.json</code></p>{_dict_table(summary)}"
        if isinstance(summary, dict) else
        "<h3>Summary</h3><p class=note>No <code>train/summary.json</code>: training has not "
        "finished.</p>"))
    return "".join(parts), True


def _top1_keys(results: dict[str, Any]) -> list[str]:
    found = {k for entry in results.values() if isinstance(entry, dict) for k in entry
             if k.endswith("_top1") and _is_number(entry[k])}
    return [k for k in TOP1_LABELS if k in found] + sorted(found - set(TOP1_LABELS))


def _load_results(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """``RUN/eval/results.json`` ({dataset: {key: value}}), or None before evaluation."""
    path = RunLayout(run_dir).results
    if not path.is_file():
        return None
    results = _read_json(path)
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        raise DataError(f"{path} must map each dataset to an object of results "
                        '({"fashion-mnist": {"linear_probe_top1": 88.3, ...}}); rerun synrep eval')
    return results


def _evaluation(run_dir: Path, results: dict[str, dict[str, Any]] | None) -> tuple[str, bool]:
    path = RunLayout(run_dir).results
    if results is None:
        return _missing(str(path), f"synrep eval CONFIG run.dir={run_dir}"), False
    if not results:
        return f'<p class="missing">{_e(path)} holds no datasets yet.</p>', False
    keys = _top1_keys(results)
    head = "".join(f"<th>{_e(TOP1_LABELS.get(k, k))}<br><code>{_e(k)}</code></th>" for k in keys)
    body = ""
    for dataset, entry in results.items():
        best = max((entry[k] for k in keys if _is_number(entry.get(k))
                    and math.isfinite(entry[k])), default=None)
        cells = "".join(
            (f'<td class="{"best" if entry[k] == best else ""}">'
             f"{_number(entry[k], dataset, k)}&thinsp;%</td>")
            if _is_number(entry.get(k)) else '<td class="muted">&ndash;</td>' for k in keys)
        body += f"<tr><th>{_e(dataset)}</th>{cells}</tr>"
    parts = [
        "<p>Top-1 accuracy (%) on real data of the frozen encoder (best per dataset in bold). "
        "Every number is rounded to 2 decimals from <code>eval/results.json</code>.</p>",
        f'<table class="results"><tr><th>dataset</th>{head}</tr>{body}</table>',
    ]
    for dataset, entry in results.items():
        rest = {k: v for k, v in entry.items() if k not in keys}
        if rest:
            parts.append(f"<h3>{_e(dataset)}: details</h3>{_dict_table(rest, dataset)}")
    return "".join(parts), True


def _pca(run_dir: Path) -> tuple[str, bool]:
    path = RunLayout(run_dir).pca
    if not path.is_file():
        return _missing(str(path), f"synrep eval CONFIG run.dir={run_dir}",
                        " with <code>eval.pca_images</code> &gt; 0"), False

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            w, h = im.size
    except Exception as e:  # PIL raises many types for a broken file
        raise DataError(f"{path} is not a readable PNG ({e}); rerun synrep eval, or delete it "
                        "to leave it out of the report") from None
    # small maps (a few pixels per patch) are shown enlarged by a whole factor, pixels kept
    # sharp; wide ones are shrunk to the page width, smoothly
    f = max(1, min(560 // w, 400 // h)) if w < 560 else 1
    sharp = ' class="pixelated"' if w <= 1100 else ""
    return (f'<figure class="plot"><img{sharp} src="{_png_uri(data)}" width="{w * f}" '
            f'height="{h * f}" alt="PCA maps of patch features"><figcaption>PCA maps of patch '
            "features (<code>eval/pca.png</code>): for "
            "real test images (left of each pair), the encoder's patch features projected on "
            "their first three principal components, shown as red, green and blue (right). Parts "
            "the encoder sees as alike share a colour; an encoder that has learnt object parts "
            "colours them consistently across images.</figcaption></figure>"), True


def _check_scale(data: Any, path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}; expected {{\"points\": [{{\"captions\", "
                         '"images_per_caption", "images", "top1", "error"}], "fit": {"form", '
                         '"a", "b", "c", "r2"}}; rerun the scaling sweep')

    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise bad("no 'points' list")
    points = data["points"]
    for i, p in enumerate(points):
        for k in ("captions", "images_per_caption", "images", "top1", "error"):
            if not isinstance(p, dict) or not _is_number(p.get(k)):
                raise bad(f"points[{i}] has no numeric {k!r}")
        if p["images"] <= 0:
            raise bad(f"points[{i}].images is {p['images']}; it must be positive")
    fit = data.get("fit")
    if fit is not None:
        if not isinstance(fit, dict) or fit.get("form") not in ("power", "power+offset"):
            raise bad("'fit.form' must be 'power' or 'power+offset'")
        for k in ("a", "b", "c", "r2"):
            if not _is_number(fit.get(k)):
                raise bad(f"'fit' has no numeric {k!r}")
    return points, fit


def _scaling(run_dir: Path) -> tuple[str, bool]:
    path = RunLayout(run_dir).scale_results
    if not path.is_file():
        return _missing(str(path), f"synrep scale CONFIG run.dir={run_dir}"), False
    data = _read_json(path)
    points, fit = _check_scale(data, path)
    order = sorted(range(len(points)), key=lambda i: points[i]["images"])
    parts = []
    if points:
        fig = _new_figure(7.5, 4.6)
        ax = fig.add_subplot(1, 1, 1)
        draw_fit(ax, points, fit)
        ax.set_title("error vs. training images")
        parts.append(
            f'<figure class="plot narrow"><img src="{_png_uri(_figure_png(fig))}" '
            'alt="scaling fit"><figcaption>Top-1 error against the number of synthetic images '
            "(log-log); labels are captions x images per caption. The curve is the fitted "
            "error(n) = a&middot;n<sup>&minus;b</sup> + c.</figcaption></figure>")
    has_run = any(isinstance(p.get("run"), str) for p in points)
    head = "".join(f"<th>{k}</th>" for k in ("captions", "images per caption", "images",
                                              "top-1 %", "error %"))
    rows = "".join(
        "<tr>" + "".join(f"<td>{_number(points[i][k], 'scale', f'points.{i}.{k}')}</td>"
                         for k in ("captions", "images_per_caption", "images", "top1", "error"))
        + (f"<td><code>{_e(points[i].get('run', ''))}</code></td>" if has_run else "")
        + "</tr>" for i in order)
    what = ", ".join(f"{k} {_e(data[k])}" for k in ("dataset", "protocol")
                     if isinstance(data.get(k), str))
    parts.append(f"<h3>Runs{f' ({what})' if what else ''}</h3>"
                 f'<table class="results"><tr>{head}{"<th>run</th>" if has_run else ""}</tr>'
                 f"{rows}</table>")
    if fit is not None:
        form = ("a&middot;n<sup>&minus;b</sup> + c" if fit["form"] == "power+offset"
                else "a&middot;n<sup>&minus;b</sup> (c fixed)")
        cells = {
            "form": f"<code>{_e(fit['form'])}</code>: error(n) = {form}",
            "a": _number(fit["a"], "scale", "fit.a"),
            "b (exponent)": _number(fit["b"], "scale", "fit.b")
            + " <span class=muted>(error falls by a factor 2<sup>b</sup> per doubling of n)</span>",
            "c (error at infinite n)": _number(fit["c"], "scale", "fit.c") + "&thinsp;%",
            "R²": _number(fit["r2"], "scale", "fit.r2"),
        }
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in cells.items())
        parts.append(f'<h3>Fit</h3><table class="kv">{rows}</table>')
    return "".join(parts), True


# -- page -------------------------------------------------------------------------------------

_CSS = """
:root { --fg:#1d2330; --muted:#6b7280; --line:#e3e6eb; --bg:#f6f7f9; --accent:#2f5bd3; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); line-height:1.45;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width:1180px; margin:0 auto; padding:24px 28px 48px; }
header h1 { margin:0 0 4px; font-size:26px; }
.meta, .muted, .facts { color:var(--muted); }
h2 { font-size:20px; margin:0 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:18px 0 8px; }
section, .overview { background:#fff; border:1px solid var(--line); border-radius:8px;
  padding:18px 22px; margin:18px 0; }
.overview { display:grid; grid-template-columns:minmax(0, 1fr) auto; gap:32px; }
.overview nav h2 { border:0; font-size:15px; margin:0 0 4px; padding:0; }
nav ul { margin:0; padding-left:18px; }
nav li.todo a { color:var(--muted); }
a { color:var(--accent); text-decoration:none; }
code { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; background:#f1f3f6;
  padding:0 3px; border-radius:3px; }
table { border-collapse:collapse; margin:4px 0 8px; }
th, td { text-align:left; vertical-align:top; padding:4px 12px 4px 0;
  border-bottom:1px solid var(--line); }
table.kv table.kv th, table.kv table.kv td { border-bottom:0; padding:1px 10px 1px 0; }
table.kv > tbody > tr > th { font-weight:500; white-space:nowrap; }
table.results th { font-weight:600; font-size:13px; }
table.results td { font-size:17px; padding-right:28px; }
table.results td.best { font-weight:700; }
table.results td code { font-size:12px; }
table.matrix th { font-weight:500; }
.num { font-variant-numeric: tabular-nums; }
.missing { color:#8a5a00; background:#fff8e6; border:1px solid #f3dfae; padding:6px 10px;
  border-radius:6px; margin:0; }
.note { color:var(--muted); font-size:13px; }
.samples { display:grid; grid-template-columns:repeat(auto-fill, minmax(350px, 1fr)); gap:12px; }
figure.sample { display:flex; flex-direction:column; gap:8px; margin:0; padding:10px;
  border:1px solid var(--line); border-radius:6px; }
figure.sample img { align-self:flex-start; max-width:100%; image-rendering:pixelated; }
figure.sample figcaption { margin:0; color:var(--fg); font-size:14px; }
figure.sample q { display:block; quotes:"\\201C" "\\201D"; }
.facts { display:block; font-size:12px; margin-top:4px; color:var(--muted); }
.cols { display:flex; flex-wrap:wrap; gap:8px 48px; align-items:flex-start; }
.cols h3 { margin-top:10px; }
.cols p.note { margin:-4px 0 6px; }
figure.plot { margin:8px 0; }
figure.plot img { max-width:100%; height:auto; display:block; }
figure.plot img.pixelated { border:1px solid var(--line); }
figure.plot.narrow img { max-width:720px; }
img.pixelated { image-rendering:pixelated; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
footer { color:var(--muted); font-size:12px; text-align:center; }
ol { margin:0; padding-left:22px; }
"""


def _page(title: str, header: str, sections: list[_Section]) -> str:
    body = "".join(f'<section id="{s.anchor}"><h2>{_e(s.title)}</h2>{s.body}</section>'
                   for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # an empty inline icon keeps the browser from asking for /favicon.ico
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"{header}{body}<footer>Written by synrep {_e(synrep.__version__)}; a static page with "
        "no scripts and no network access.</footer></main></body></html>\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old
    file or the whole new one, never part of it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SynrepError(f"cannot write the report to {path} ({e.strerror or e}); choose "
                          "another file with --out") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run folder holds (``RUN/config.yaml``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {str(run_dir)!r} does not exist; pass a folder a synrep "
                          "command wrote (runs/<config name>, or the run.dir=PATH it was given)")
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist, so {str(run_dir)!r} is not a synrep run "
                          "folder; every stage writes it: run one first, e.g. `synrep run CONFIG "
                          f"run.dir={run_dir}`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML "
                          f"({yaml_error_summary(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return config_from_dict(data, f"config file {str(path)!r}")


def build_report(run_dir: str | Path, max_groups: int = 12) -> str:
    """The report of ``run_dir`` as one HTML document (see :func:`write_report`)."""
    if max_groups < 0:
        raise ValueError(f"max_groups must be >= 0, got {max_groups}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    shown = run_dir.resolve()
    samples, has_samples, meta = _samples(cfg, shown, max_groups)
    training, has_training = _training(shown)
    results = _load_results(shown)
    evaluation, has_eval = _evaluation(shown, results)
    pca, has_pca = _pca(shown)
    scaling, has_scaling = _scaling(shown)
    sections = [
        _Section("samples", "Caption samples and their images", samples, has_samples),
        _Section("generator", "Generator settings", _generator(cfg, shown, meta), True),
        _Section("training", "Training", training, has_training),
        _Section("evaluation", "Evaluation", evaluation, has_eval),
        _Section("pca", "PCA maps of patch features", pca, has_pca),
        _Section("scaling", "Data scaling", scaling, has_scaling),
    ]
    return _page(f"synrep run {cfg.run.name}", _header(cfg, shown, sections, results), sections)


def write_report(run_dir: str | Path, out: str | Path | None = None, *,
                 max_groups: int = 12) -> Path:
    """Write the HTML report of the run folder ``run_dir`` and return its path.

    Args:
        run_dir: a run folder (holds ``config.yaml``).
        out: the HTML file to write; default ``RUN/report.html``.
        max_groups: caption groups shown with their images.

    Raises:
        ConfigError: ``run_dir`` or its ``config.yaml`` is missing or invalid.
        DataError: a stage output the report reads is malformed.
    """
    out = Path(out) if out is not None else RunLayout(run_dir).report
    text = build_report(run_dir, max_groups=max_groups)
    _write_atomic(out, text)
    return out

