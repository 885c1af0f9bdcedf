"""``synrep export``: a trained image encoder as a timm model folder that needs no synrep.

    synrep export runs/quickstart/train/checkpoints/final.safetensors --out exported/

writes ``exported/config.json`` (timm's hub format: ``architecture``, ``model_args``,
``pretrained_cfg`` with the input size, mean, std and interpolation, ``num_classes`` 0),
``exported/model.safetensors`` (the encoder's weights only, under timm's key names) and
``exported/README.md`` (a model card: method, data and its provenance, steps, evaluation). Then, in
any Python with timm::

    model = timm.create_model("local-dir:exported", pretrained=True)

gives the features synrep's encoder gives on the same input normalised with the card's mean and
std (checked at export: the folder is written only when timm's model, built from ``config.json``
and loaded from ``model.safetensors``, reproduces the encoder's features to 1e-5).

A checkpoint with a text tower (clip, stablerep_pp) also gets, when its tower is a CLIP text
transformer (the built-in ``fashion-text`` and any saved CLIP text model are):

- ``exported/text/``: the tower and its projection as a transformers
  ``CLIPTextModelWithProjection`` with its tokenizer (``save_pretrained`` format);
- ``exported/image_projection.safetensors``: ``weight`` (proj_dim x features), the image side's
  projection without bias, and ``logit_scale`` (the learned temperature's inverse, exp'd).

Zero-shot, with timm and transformers only::

    txt = CLIPTextModelWithProjection.from_pretrained("exported/text")(
        **AutoTokenizer.from_pretrained("exported/text")(texts, padding=True,
                                                         truncation=True, return_tensors="pt")
    ).text_embeds
    img = model(images) @ load_file("exported/image_projection.safetensors")["weight"].T

equal (1e-5, checked at export) to the checkpoint's ``encode_text`` and ``encode_image``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from synrep.checkpoint import Checkpoint
from synrep.errors import ConfigError
from synrep.factory import checkpoint_config, load_encoder, load_method
from synrep.models.backbones import timm_spec
from synrep.utils import temp_path

#: Largest difference allowed between synrep's and timm's features at export.
TOLERANCE = 1e-5


def export_encoder(checkpoint: str | Path, out: str | Path,
                   weights: str = "teacher") -> dict[str, Any]:
    """Export the encoder of ``checkpoint`` (the EMA teacher's when it has one and ``weights`` is
    "teacher") to the folder ``out``, and its text tower when it has one; returns config.json's
    contents with ``text_tower``: "text" (the exported subfolder), why it was not exported, or
    None (no text tower).

    Raises:
        ConfigError: ``out`` exists and is not empty, the backbone has no plain-timm equivalent,
            or timm's rebuilt model does not reproduce the encoder's features.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    encoder, cfg = load_encoder(checkpoint, "cpu", weights)
    arch, model_args = timm_spec(cfg.model)
    c = cfg.model.in_chans
    mean, std = [float(cfg.model.mean)] * c, [float(cfg.model.std)] * c
    state = {k: v.detach().contiguous().clone() for k, v in encoder.backbone.state_dict().items()}

    # The folder must load in plain timm and give the encoder's features: check before writing.
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args).eval()
    missing = model.load_state_dict(state, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise ConfigError(f"timm's {arch} does not take this encoder's weights (missing "
                          f"{missing.missing_keys[:3]}, unexpected {missing.unexpected_keys[:3]})")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, c, cfg.model.img_size, cfg.model.img_size, generator=g)
    with torch.inference_mode():
        diff = float((model(encoder.normalize(x)) - encoder(x)).abs().max())
    if diff > TOLERANCE:
        raise ConfigError(f"timm's {arch} rebuilt from the export differs from the encoder by "
                          f"{diff:.2e} (> {TOLERANCE}); this backbone cannot be exported")

    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": int(encoder.embed_dim),
        "global_pool": model_args.get("global_pool", ""),
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [c, cfg.model.img_size, cfg.model.img_size],
            "mean": mean, "std": std, "interpolation": "bicubic", "crop_pct": 1.0,
            "crop_mode": "center", "num_classes": 0,
            "tag": f"synrep-{cfg.method.name}",
        },
    }
    text, why_not = _text_export(checkpoint) if _has_text_tower(checkpoint) else (None, "")
    tmp = temp_path(out)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "exported_by": "synrep"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if text is not None:
            model_hf, tokenizer, projection = text
            model_hf.save_pretrained(str(tmp / "text"))
            tokenizer.save_pretrained(str(tmp / "text"))
            save_file(projection, str(tmp / "image_projection.safetensors"),
                      metadata={"format": "pt", "exported_by": "synrep"})
        (tmp / "README.md").write_text(model_card(checkpoint, cfg, arch, config, weights,
                                                  text=text is not None, text_skipped=why_not))
        if out.exists():
            out.rmdir()  # empty: checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**config, "text_tower": "text" if text is not None else why_not or None}


def _has_text_tower(checkpoint: str | Path) -> bool:
    return any(k.startswith("text.model.") for k in Checkpoint(checkpoint).model_state)


def _text_export(checkpoint: str | Path) -> tuple[tuple[Any, Any, dict] | None, str]:
    """The checkpoint's text tower as a ``CLIPTextModelWithProjection`` (with its tokenizer) and
    the image projection, checked against the method's own ``encode_text``; or None and why
    not (a tower that is not a CLIP text transformer)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    method, _ = load_method(checkpoint, "cpu")
    tower = method.text
    if not isinstance(tower.model, CLIPTextModel):
        return None, (f"the text tower is a {type(tower.model).__name__}, not a CLIP text "
                      "transformer: only the image encoder is exported")
    config = tower.model.config.__class__.from_dict(tower.model.config.to_dict())
    config.projection_dim = int(tower.proj.out_features)
    hf = CLIPTextModelWithProjection(config).eval()
    # the transformer under .text_model (key prefixes differ between transformers versions)
    state = {k.removeprefix("text_model."): v.detach().clone()
             for k, v in tower.model.state_dict().items()}
    hf.text_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        hf.text_projection.weight.copy_(tower.proj.weight)
    tokenizer = tower.tokenizer
    tokenizer.model_max_length = tower.context  # plain truncation=True keeps what synrep keeps
    texts = ["a dark coat", "a sandal on a bench next to a chair at dusk", "a bag"]
    with torch.inference_mode():
        ours = method.encode_text(texts)
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        theirs = hf(**enc).text_embeds
    diff = float((ours - theirs).abs().max())
    if diff > TOLERANCE:
        raise ConfigError(f"transformers' CLIPTextModelWithProjection rebuilt from the text tower "
                          f"differs by {diff:.2e} (> {TOLERANCE}); the text tower cannot be "
                          "exported")
    projection = {"weight": method.image_proj.weight.detach().contiguous().clone(),
                  "logit_scale": method.logit_scale.detach().exp().reshape(()).clone()}
    return (hf, tokenizer, projection), ""


def _results_of(checkpoint: Path) -> dict[str, Any]:
    """The evaluation results of the run a checkpoint belongs to, when they are beside it
    (``RUN/train/checkpoints/x.safetensors`` -> ``RUN/eval/results.json``) and evaluated it."""
    run = checkpoint.resolve().parents[2] if len(checkpoint.resolve().parents) > 2 else None
    path = run / "eval" / "results.json" if run else None
    if path is None or not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text())
    except ValueError:
        return {}
    return {k: v for k, v in results.items()
            if isinstance(v, dict) and Path(str(v.get("checkpoint", ""))).name == checkpoint.name}


def model_card(checkpoint: str | Path, cfg: Any, arch: str, config: dict[str, Any],
               weights: str, text: bool = False, text_skipped: str = "") -> str:
    """A Markdown model card: what the encoder is, how it was trained, on what, and how it
    scored (when the run's evaluation of this checkpoint is beside it)."""
    checkpoint = Path(checkpoint)
    ck = Checkpoint(checkpoint)
    d = checkpoint_config(ck).data
    if d.source == "shards":
        data = (f"synthetic caption-group shards ({d.shards or 'the run`s images stage'}): "
                f"captions by the `{cfg.captions.backend}` backend from concept banks "
                f"{dict(cfg.captions.banks)}, images by the `{cfg.images.pipeline}` pipeline, "
                f"{cfg.images.images_per_caption} per caption, guidance "
                f"{cfg.images.guidance_scale}")
    elif d.source == "webdataset":
        data = f"WebDataset shards {d.shards}"
    elif d.source == "mixture":
        data = f"a mixture {dict(d.mixture)}"
    else:
        data = f"the `{d.dataset}` dataset, split `{d.split}`"
    lines = [
        f"# synrep {cfg.method.name} encoder ({arch})", "",
        f"An image encoder pretrained by synrep with the `{cfg.method.name}` method.", "",
        "## Use", "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)',
        "features = model(images)  # normalised with the mean and std below",
        "```", "",
        *(["The text tower is in `text/` (transformers), the image projection in",
           "`image_projection.safetensors`; zero-shot embeddings:", "",
           "```python",
           "from safetensors.torch import load_file",
           "from transformers import AutoTokenizer, CLIPTextModelWithProjection",
           'tok = AutoTokenizer.from_pretrained("PATH/text")',
           'text_model = CLIPTextModelWithProjection.from_pretrained("PATH/text")',
           "text_emb = text_model(**tok(texts, padding=True, truncation=True,",
           '                             return_tensors="pt")).text_embeds',
           'proj = load_file("PATH/image_projection.safetensors")',
           'image_emb = features @ proj["weight"].T  # proj["logit_scale"]: the temperature',
           "```", ""] if text else []),
        *([f"Text tower not exported: {text_skipped}.", ""] if text_skipped else []),
        "## Details", "",
        f"- architecture: `{arch}` with `{json.dumps(config['model_args'])}`",
        f"- input: {config['pretrained_cfg']['input_size']} (C, H, W), mean "
        f"{config['pretrained_cfg']['mean']}, std {config['pretrained_cfg']['std']}",
        f"- features: {config['num_features']} (`{config['global_pool'] or 'pooled'}` pooling)",
        f"- weights: the {'EMA teacher' if weights == 'teacher' and any(k.startswith('teacher.') for k in ck.model_state) else 'student'}'s encoder at step {ck.step} of {cfg.train.steps}",  # noqa: E501
        f"- training data: {data}",
        f"- batch {cfg.train.batch_size}, optimiser AdamW lr {cfg.optim.lr} (per 256), "
        f"seed {cfg.run.seed}",
        f"- source checkpoint: `{checkpoint}`", "",
    ]
    results = _results_of(checkpoint)
    if results:
        lines += ["## Evaluation (frozen features)", "", "| dataset | protocol | top-1 % |",
                  "|---|---|---|"]
        for name, entry in results.items():
            for key, value in sorted(entry.items()):
                if key.endswith("_top1") and isinstance(value, (int, float)):
                    lines.append(f"| {name} | {key[:-5]} | {value:.2f} |")
        lines.append("")
    else:
        lines += ["## Evaluation", "", "Not evaluated beside this checkpoint: run "
                  "`synrep eval CONFIG eval.model=local-dir:THIS_FOLDER`.", ""]
    return "\n".join(lines)
