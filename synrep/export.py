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

When open_clip is installed, such a checkpoint also gets ``exported/open_clip/``: the whole CLIP
model in open_clip's folder format (``open_clip_config.json``, ``open_clip_model.safetensors`` and
the tokenizer), so that::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exported/open_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:exported/open_clip")

gives the same embeddings (1e-5, checked at export). open_clip builds the image tower with timm: a
plain timm model by name, or, for a backbone with its own sizes, from the timm folder
``exported/open_clip/image`` named by its absolute path in ``open_clip_config.json`` (after moving
the folder, export again or edit ``vision_cfg.timm_model_name``). A 1-channel encoder is exported
for RGB input (its first layer's weights split evenly over 3 channels), so open_clip's own
preprocessing, which converts every image to RGB, gives the same features for grayscale images.
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
        oc_note = ""
        if text is not None:
            model_hf, tokenizer, projection, method = text
            model_hf.save_pretrained(str(tmp / "text"))
            tokenizer.save_pretrained(str(tmp / "text"))
            save_file(projection, str(tmp / "image_projection.safetensors"),
                      metadata={"format": "pt", "exported_by": "synrep"})
            oc_note = _open_clip_export(method, cfg, config, state, model_hf, tokenizer,
                                        model.pretrained_cfg.get("first_conv", ""), tmp, out)
        (tmp / "README.md").write_text(model_card(checkpoint, cfg, arch, config, weights,
                                                  text=text is not None, text_skipped=why_not,
                                                  open_clip_note=oc_note))
        if out.exists():
            out.rmdir()  # empty: checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**config, "text_tower": "text" if text is not None else why_not or None,
            "open_clip": "open_clip" if text is not None and not oc_note else oc_note or None}


#: Activations of transformers' CLIP text tower that open_clip's text transformer has.
_OPEN_CLIP_ACTS = {"quick_gelu": True, "gelu": False}


def _open_clip_export(method: Any, cfg: Any, config: dict[str, Any],
                      image_state: dict[str, torch.Tensor], text_model: Any, tokenizer: Any,
                      first_conv: str, tmp: Path, out: Path) -> str:
    """Write ``tmp/open_clip/`` (open_clip's folder format) and return "", or return why not.

    The folder is written only when open_clip, building the model from it, reproduces the
    checkpoint's ``encode_image`` and ``encode_text`` to :data:`TOLERANCE`.
    """
    try:
        import open_clip
    except ImportError:
        return "open_clip is not installed (pip install open_clip_torch), so no open_clip folder"
    tc = text_model.config
    if tc.hidden_act not in _OPEN_CLIP_ACTS:
        return (f"the text tower's activation {tc.hidden_act!r} has no open_clip equivalent, "
                "so no open_clip folder")
    c, size = cfg.model.in_chans, cfg.model.img_size
    context = int(tokenizer.model_max_length)  # the tower's context: texts are cut there
    arch, model_args = config["architecture"], dict(config["model_args"])
    state = dict(image_state)
    if c == 1:  # open_clip's preprocessing gives RGB: split the first layer over 3 channels
        key = f"{first_conv}.weight"
        if key not in state or state[key].shape[1] != 1:
            return "the encoder's first layer takes no 1-channel input, so no open_clip folder"
        state[key] = state[key].repeat(1, 3, 1, 1) / 3
        model_args["in_chans"] = 3
    folder = tmp / "open_clip"
    image_dir = folder / "image"
    image_dir.mkdir(parents=True)
    timm_config = json.loads(json.dumps(config))
    timm_config["model_args"] = model_args
    timm_config["pretrained_cfg"].update(input_size=[3, size, size],
                                         mean=[float(cfg.model.mean)] * 3,
                                         std=[float(cfg.model.std)] * 3)
    (image_dir / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
    # A timm model by name when its defaults are this encoder's, else this folder's image/.
    plain = {k: v for k, v in model_args.items() if not (k == "in_chans" and v == 3)}
    vision = {"image_size": size, "timm_model_pretrained": False, "timm_pool": "",
              "timm_proj": "linear", "timm_proj_bias": False}
    model_cfg = {
        "embed_dim": int(text_model.config.projection_dim),
        "quick_gelu": _OPEN_CLIP_ACTS[tc.hidden_act],
        "vision_cfg": {**vision, "timm_model_name": arch if not plain
                       else f"local-dir:{image_dir}"},
        "text_cfg": {
            "context_length": context, "vocab_size": int(tc.vocab_size),
            "width": int(tc.hidden_size), "heads": int(tc.num_attention_heads),
            "layers": int(tc.num_hidden_layers),
            "mlp_ratio": tc.intermediate_size / tc.hidden_size,
            # transformers pools at the first end-of-text token, or at the largest id for the
            # original CLIP vocabulary (eos_token_id 2)
            "pool_type": "argmax" if tc.eos_token_id == 2 else "eos",
            "eos_id": int(tc.eos_token_id), "pad_id": int(tokenizer.pad_token_id),
            "hf_tokenizer_name": str(out.resolve() / "open_clip"),
        },
    }
    preprocess = {"size": size, "mean": [float(cfg.model.mean)] * 3,
                  "std": [float(cfg.model.std)] * 3, "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    model = open_clip.CLIP(**model_cfg).eval()
    oc_state = _open_clip_state(state, text_model, method, context)
    model.load_state_dict(oc_state, strict=True)
    # compare with the checkpoint on grayscale-as-RGB images and a few texts
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, c, size, size, generator=g)
    texts = ["a dark coat", "a sandal on a bench next to a chair at dusk", "a bag"]
    ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                    max_length=context).input_ids
    rgb = x.expand(-1, 3, -1, -1) if c == 1 else x
    with torch.inference_mode():
        img = model.encode_image((rgb - cfg.model.mean) / cfg.model.std)
        txt = model.encode_text(ids)
        diff = max(float((img - method.encode_image(x)).abs().max()),
                   float((txt - method.encode_text(texts)).abs().max()))
    if diff > TOLERANCE:
        raise ConfigError(f"open_clip's CLIP rebuilt from the export differs from the checkpoint "
                          f"by {diff:.2e} (> {TOLERANCE}); export with open_clip uninstalled to "
                          "skip its folder")
    if plain:  # the final folder's path, written once the check passed
        final = out.resolve() / "open_clip" / "image"
        model_cfg["vision_cfg"]["timm_model_name"] = f"local-dir:{final}"
    else:
        (image_dir / "config.json").unlink()
        image_dir.rmdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in oc_state.items()},
              str(folder / "open_clip_model.safetensors"),
              metadata={"format": "pt", "exported_by": "synrep"})
    tokenizer.save_pretrained(str(folder))
    return ""


def _open_clip_state(image_state: dict[str, torch.Tensor], text_model: Any,
                     method: Any, context: int) -> dict[str, torch.Tensor]:
    """open_clip's CLIP state dict: ``visual.trunk`` (timm) + ``visual.head.proj``, and the
    text transformer renamed from transformers' layout (q, k, v stacked into ``in_proj``)."""
    t = {k.removeprefix("text_model."): v.detach() for k, v in text_model.state_dict().items()}
    out = {f"visual.trunk.{k}": v for k, v in image_state.items()}
    out["visual.head.proj.weight"] = method.image_proj.weight.detach()
    out["token_embedding.weight"] = t["embeddings.token_embedding.weight"]
    out["positional_embedding"] = t["embeddings.position_embedding.weight"][:context]
    for i in range(text_model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [t[f"{src}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")])
            out[f"{dst}attn.out_proj.{kind}"] = t[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = t[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = t[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = t[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = t[f"{src}mlp.fc2.{kind}"]
    out["ln_final.weight"] = t["final_layer_norm.weight"]
    out["ln_final.bias"] = t["final_layer_norm.bias"]
    out["text_projection"] = text_model.text_projection.weight.detach().T
    out["logit_scale"] = method.logit_scale.detach().reshape(())
    return {k: v.clone() for k, v in out.items()}


def _has_text_tower(checkpoint: str | Path) -> bool:
    return any(k.startswith("text.model.") for k in Checkpoint(checkpoint).model_state)


def _text_export(checkpoint: str | Path) -> tuple[tuple[Any, Any, dict, Any] | None, str]:
    """The checkpoint's text tower as a ``CLIPTextModelWithProjection`` (with its tokenizer) and
    the image projection, checked against the method's own ``encode_text``, and the loaded
    method (the open_clip export reuses it); or None and why not (a tower that is not a CLIP
    text transformer)."""
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
    return (hf, tokenizer, projection, method), ""


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
               weights: str, text: bool = False, text_skipped: str = "",
               open_clip_note: str = "") -> str:
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
        *(["open_clip loads the whole model from `open_clip/` (image and text towers, tokenizer,",
           "preprocessing):", "",
           "```python",
           "import open_clip",
           'model, _, preprocess = open_clip.create_model_and_transforms(',
           '    "local-dir:PATH/open_clip")',
           'tokenizer = open_clip.get_tokenizer("local-dir:PATH/open_clip")',
           "```", ""] if text and not open_clip_note else []),
        *([f"No open_clip folder: {open_clip_note}.", ""] if text and open_clip_note else []),
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
