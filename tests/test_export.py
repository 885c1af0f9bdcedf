"""`synrep export`: the encoder leaves synrep as a timm model folder; any model is evaluated the
same way (`eval.model=local-dir:` / `timm:`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synrep.config import load_config
from synrep.data.fashion_mnist import load_fashion_mnist
from synrep.errors import ConfigError
from synrep.export import export_encoder
from synrep.factory import load_encoder, load_external_encoder
from tests.conftest import TINY, needs_fashion

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/fashion_simclr.yaml"
EVAL = ["eval.protocols=[linear,knn]", "eval.pca_images=0"]

# Runs in a process that never imports synrep: plain timm on real Fashion-MNIST images.
TIMM_ONLY = """
import sys, numpy as np, torch, timm
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
cfg = model.pretrained_cfg
x = torch.from_numpy(np.load(sys.argv[2])).float().div(255)
mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1); std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
with torch.inference_mode():
    np.save(sys.argv[3], model((x - mean) / std).numpy())
assert "synrep" not in sys.modules
print(model.num_features, tuple(cfg["input_size"]))
"""


def _synrep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "synrep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    proc = _synrep("run", CONFIG, *TINY, *EVAL, f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@needs_fashion
def test_exported_encoder_loads_in_plain_timm_with_the_same_features(trained, tmp_path):
    ck = trained / "train/checkpoints/final.safetensors"
    out = tmp_path / "exported"
    proc = _synrep("export", str(ck), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                       "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28]
    card = (out / "README.md").read_text()
    assert "simclr" in card and "linear_probe" in card and "local-dir:" in card

    images, _ = load_fashion_mnist("test", None)
    x = images[:64, None]  # real images, uint8 (64, 1, 28, 28)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    timm_run = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(out), str(tmp_path / "x.npy"),
                               str(tmp_path / "f.npy")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert timm_run.returncode == 0, timm_run.stderr[-2000:]
    theirs = torch.from_numpy(np.load(tmp_path / "f.npy"))
    encoder, _ = load_encoder(ck)
    with torch.inference_mode():
        ours = encoder(torch.from_numpy(x).float() / 255)
    assert theirs.shape == ours.shape == (64, 192)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@needs_fashion
def test_an_exported_encoder_evaluated_as_an_external_model_scores_the_same(trained, tmp_path):
    ck = trained / "train/checkpoints/final.safetensors"
    export_encoder(ck, tmp_path / "exported")
    proc = _synrep("eval", CONFIG, *TINY, *EVAL, f"run.dir={tmp_path / 'ext'}",
                   f"eval.model=local-dir:{tmp_path / 'exported'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads((tmp_path / "ext/eval/results.json").read_text())["fashion-mnist"]
    ours = json.loads((trained / "eval/results.json").read_text())["fashion-mnist"]
    for key in ("linear_probe_top1", "knn_top1", "feature_dim"):
        assert theirs[key] == ours[key], key
    assert theirs["checkpoint"] == f"local-dir:{tmp_path / 'exported'}"


def test_a_timm_model_with_a_weights_file_is_an_encoder(tmp_path):
    """`eval.model=timm:<name> eval.weights=FILE`: timm's own model, its weights from the file
    (nothing downloaded), normalised with its pretrained_cfg; grayscale input is repeated."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False).eval()  # 1000-class head included
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    enc = load_external_encoder("timm:resnet18", str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 1, 32, 32)
    mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        ref = net.forward_head(net.forward_features((x.expand(-1, 3, -1, -1) - mean) / std),
                               pre_logits=True)
        got = enc(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert enc.embed_dim == 512


def test_export_refuses_a_used_folder_and_a_backbone_timm_cannot_build(tmp_path):
    from synrep.checkpoint import save_checkpoint
    from synrep.factory import build_method

    cfg = load_config(ROOT / CONFIG, ["model.backbone=vit_tiny_c7_28"])
    ck = tmp_path / "c.safetensors"
    save_checkpoint(ck, build_method(cfg), cfg.to_dict(), 1)
    with pytest.raises(ConfigError, match="no plain-timm equivalent"):
        export_encoder(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "used").mkdir()
    (tmp_path / "used/x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        export_encoder(ck, tmp_path / "used")


def test_external_model_specs_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="needs eval.weights"):
        load_external_encoder("timm:vit_tiny_patch16_224", "teacher")
    with pytest.raises(ConfigError, match="timm has no model"):
        load_external_encoder("timm:not_a_model", str(tmp_path))
    with pytest.raises(ConfigError, match="config.json does not exist"):
        load_external_encoder(f"local-dir:{tmp_path}")
    with pytest.raises(ConfigError, match="choose timm:"):
        load_external_encoder("hub:foo")


@pytest.mark.parametrize("override, expected", [
    ("model.backbone=vit_tinyy", "model.backbone='vit_tinyy' is unknown; choose one of: "),
    ("eval.protocols=[linear,knnn]", "eval.protocols='knnn' is unknown; choose one of: fewshot"),
    ("run.stages=[captions,trainn]", "run.stages='trainn' is unknown; choose one of: captions"),
    ("captions.backend=grammer", "captions.backend='grammer' is unknown; choose one of: grammar"),
    ("eval.dataset=fashion", "eval.dataset='fashion' is unknown; choose one of: fashion-glyphs"),
    ("data.source=dataset", "trains on caption groups: set data.source=shards"),
    ("eval.model=hub:x", "eval.model='hub:x': choose timm:<name>"),
    ("eval.weights=/no/such/file", "eval.weights='/no/such/file': choose teacher or student"),
])
def test_a_misspelt_name_fails_at_start_before_any_stage(override, expected, tmp_path):
    """`synrep run` on the quickstart (captions and images first) stops at start-up, in one
    line naming the key, the value and the choices, and writes nothing."""
    proc = _synrep("run", "configs/quickstart.yaml", f"run.dir={tmp_path / 'run'}", override)
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if x.startswith("synrep: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@needs_fashion
def test_raising_train_steps_extends_a_finished_run_and_lowering_is_refused(trained, tmp_path):
    """A finished 6-step run given train.steps=8 trains steps 7-8 from its last checkpoint (the
    schedule of the new total from there on) and is evaluated again; train.steps=4 is refused."""
    import shutil

    from synrep.checkpoint import Checkpoint
    from synrep.schedule import warmup_cosine

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    steps = [a for a in TINY if not a.startswith("train.steps=")]
    proc = _synrep("run", CONFIG, *steps, "train.steps=8", *EVAL, f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Checkpoint(run / "train/checkpoints/final.safetensors").step == 8
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    cfg = load_config(ROOT / CONFIG, [*steps, "train.steps=8"])
    peak = cfg.optim.lr * cfg.train.batch_size / 256
    want = warmup_cosine(7, 8, peak, cfg.optim.warmup_steps, peak * cfg.optim.min_lr_ratio)
    assert abs(rows[-1]["lr"] - want) < 1e-12  # logged at step 8: the lr of step index 7
    results = json.loads((run / "eval/results.json").read_text())["fashion-mnist"]
    assert results["checkpoint_step"] == 8
    shorter = _synrep("run", CONFIG, *steps, "train.steps=4", *EVAL, f"run.dir={run}")
    assert shorter.returncode == 2 and "not shortened" in shorter.stderr


def test_shipped_configs_by_name_from_any_folder(tmp_path):
    from synrep.config import resolve_config_path, shipped_configs

    names = shipped_configs()
    assert "quickstart" in names and names["quickstart"].startswith("The embedded default")
    proc = subprocess.run([sys.executable, "-m", "synrep", "config", "--list"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "synclr_vitl14" in proc.stdout
    cfg = load_config("quickstart", ["train.steps=3"])  # by name, as `synrep run quickstart`
    assert cfg.run.name == "quickstart" and cfg.train.steps == 3
    assert resolve_config_path("quickstart.yaml").parent.name == "configs"
    with pytest.raises(ConfigError, match="shipped config: .*quickstart"):
        load_config("quickstartt")


# Zero-shot embeddings from the exported folder with timm and transformers only.
CLIP_ONLY = """
import sys, numpy as np, torch, timm
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModelWithProjection
out = sys.argv[1]
model = timm.create_model("local-dir:" + out, pretrained=True).eval()
cfg = model.pretrained_cfg
x = torch.from_numpy(np.load(sys.argv[2])).float().div(255)
mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1); std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
tok = AutoTokenizer.from_pretrained(out + "/text")
text_model = CLIPTextModelWithProjection.from_pretrained(out + "/text").eval()
proj = load_file(out + "/image_projection.safetensors")
texts = sys.argv[4].split("|")
with torch.inference_mode():
    img = model((x - mean) / std) @ proj["weight"].T
    txt = text_model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).text_embeds
np.savez(sys.argv[3], img=img.numpy(), txt=txt.numpy(), scale=proj["logit_scale"].numpy())
assert "synrep" not in sys.modules
"""


# The same embeddings from the exported open_clip folder, with open_clip's own preprocessing.
OPEN_CLIP_ONLY = """
import sys, numpy as np, torch, open_clip
from PIL import Image
out = sys.argv[1]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out)
tokenizer = open_clip.get_tokenizer("local-dir:" + out)
x = np.load(sys.argv[2])  # uint8 (N, 1, H, W): grayscale PIL images, converted to RGB
images = torch.stack([preprocess(Image.fromarray(a[0])) for a in x])
with torch.inference_mode():
    img = model.eval().encode_image(images)
    txt = model.encode_text(tokenizer(sys.argv[4].split("|")))
np.savez(sys.argv[3], img=img.numpy(), txt=txt.numpy(),
         scale=model.logit_scale.detach().exp().numpy())
assert "synrep" not in sys.modules
"""


def _run_script(source: str, tmp_path: Path, *args: str) -> np.lib.npyio.NpzFile:
    """Run ``source`` in a fresh Python without synrep on its path; load the .npz it writes."""
    script = tmp_path / "script.py"
    script.write_text(source)
    out = tmp_path / "emb.npz"
    proc = subprocess.run([sys.executable, str(script), args[0], args[1], str(out), *args[2:]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


@needs_fashion
@pytest.mark.parametrize("config, extra", [
    ("configs/clip_fashion.yaml", []),
    ("configs/stablerep_pp_fashion.yaml",
     ["train.batch_size=4", "method.stablerep_pp.images_per_caption=2"]),
])
def test_a_checkpoint_exports_its_text_tower_for_transformers(config, extra, tmp_path):
    """clip and stablerep_pp: image and text embeddings from the exported folder, computed with
    timm and transformers only, equal the checkpoint's encode_image / encode_text."""
    from synrep.cli import main
    from synrep.factory import load_method
    from tests.test_language import _tiny_shards, _train_args

    run = tmp_path / "run"
    assert main(_train_args(config, _tiny_shards(tmp_path / "shards"), run, *extra)) == 0
    ck = run / "train/checkpoints/final.safetensors"
    out = tmp_path / "exported"
    proc = _synrep("export", str(ck), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CLIPTextModelWithProjection" in proc.stdout
    assert (out / "text/config.json").is_file() and (out / "image_projection.safetensors").exists()
    assert "CLIPTextModelWithProjection.from_pretrained" in (out / "README.md").read_text()

    assert "open_clip.create_model_and_transforms" in (out / "README.md").read_text()

    images = np.asarray(load_fashion_mnist("test", None)[0][:16])[:, None]
    np.save(tmp_path / "x.npy", images)
    texts = ["a photo of a sneaker", "a dark coat next to a chair at dusk", "a bag"]
    method, _ = load_method(ck)
    with torch.inference_mode():
        img = method.encode_image(torch.from_numpy(images).float().div(255))
        txt = method.encode_text(texts)
    for source, folder in ((CLIP_ONLY, out), (OPEN_CLIP_ONLY, out / "open_clip")):
        got = _run_script(source, tmp_path, str(folder), str(tmp_path / "x.npy"), "|".join(texts))
        np.testing.assert_allclose(got["img"], img.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["txt"], txt.numpy(), atol=1e-5, rtol=0)
        scale = float(method.logit_scale.detach().exp())
        assert float(got["scale"]) == pytest.approx(scale, rel=1e-6)


@needs_fashion
def test_an_exported_open_clip_folder_evaluated_as_an_external_model_zero_shots_the_same(
        tmp_path, monkeypatch):
    """`eval.model=open_clip:local-dir:DIR/open_clip`: zero-shot equals the checkpoint's own;
    the frozen-feature protocols run on open_clip's image embedding. Without open_clip the
    export leaves that folder out and says why."""
    from synrep.cli import main
    from synrep.factory import load_method
    from tests.test_language import _tiny_shards, _train_args

    shards, run = _tiny_shards(tmp_path / "shards"), tmp_path / "run"
    args = _train_args("configs/clip_fashion.yaml", shards, run)
    assert main(args) == 0
    export_encoder(run / "train/checkpoints/final.safetensors", tmp_path / "exported")
    ev = ["eval.protocols=[knn,zeroshot]", "eval.limit_train=1000", "eval.limit_test=500",
          "eval.pca_images=0"]
    assert main(["eval", *args[1:], *ev]) == 0
    assert main(["eval", *args[1:], *ev, f"run.dir={tmp_path / 'ext'}",
                 f"eval.model=open_clip:local-dir:{tmp_path / 'exported/open_clip'}"]) == 0
    ours = json.loads((run / "eval/results.json").read_text())["fashion-mnist"]
    theirs = json.loads((tmp_path / "ext/eval/results.json").read_text())["fashion-mnist"]
    assert theirs["zeroshot_top1"] == ours["zeroshot_top1"]
    method, _ = load_method(run / "train/checkpoints/final.safetensors")
    assert theirs["feature_dim"] == method.image_proj.out_features
    assert 10.0 < theirs["knn_top1"] <= 100.0 and "skipped" not in theirs

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if it were not installed
    config = export_encoder(run / "train/checkpoints/final.safetensors", tmp_path / "no_oc")
    assert config["text_tower"] == "text" and "not installed" in config["open_clip"]
    assert not (tmp_path / "no_oc/open_clip").exists()
    assert "No open_clip folder: open_clip is not installed" in (
        tmp_path / "no_oc/README.md").read_text()


def test_a_named_open_clip_model_with_a_weights_file(tmp_path):
    """`eval.model=open_clip:<name> eval.weights=FILE`: the named architecture with the file's
    weights; images normalised by its preprocessing (grayscale repeated to RGB), texts through
    its own tokenizer; errors name the problem."""
    import open_clip

    from synrep.factory import check_external_model, load_external

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 28, "layers": 1, "width": 32,
                                           "head_width": 16, "patch_size": 7},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/synrep-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    ref = open_clip.create_model("synrep-test-tiny").eval()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    encoder, clip = load_external("open_clip:synrep-test-tiny", str(tmp_path / "w.pt"))
    x = torch.rand(3, 1, 28, 28)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    texts = ["a photo of a bag", "a photo of a sandal"]
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), ref.encode_image((x.expand(-1, 3, -1, -1) - mean)
                                                                / std), rtol=0, atol=1e-6)
        torch.testing.assert_close(clip.encode_text(texts), ref.encode_text(
            open_clip.get_tokenizer("synrep-test-tiny")(texts)), rtol=0, atol=1e-6)
    assert encoder.input_size == 28 and encoder.embed_dim == 16

    with pytest.raises(ConfigError, match="open_clip has no model 'no-such-clip'"):
        check_external_model("open_clip:no-such-clip", str(tmp_path / "w.pt"))
    with pytest.raises(ConfigError, match="needs eval.weights"):
        check_external_model("open_clip:synrep-test-tiny", "teacher")
    with pytest.raises(ConfigError, match="open_clip_config.json does not exist"):
        check_external_model(f"open_clip:local-dir:{tmp_path}", "")
