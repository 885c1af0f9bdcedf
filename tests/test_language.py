"""Language supervision: CLIP and StableRep++ losses against hand-written references and across 2
gloo processes, the text tower (built-in and loaded from a saved folder), LaCLIP's rewrite choice,
and clip / stablerep_pp trained end to end with zero-shot evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.cli import main
from synrep.config import load_config
from synrep.data.shards import CaptionGroup, write_shard, write_sizes
from synrep.data.sources import ArraySource, group_texts, rewrite_choice
from synrep.errors import ConfigError, DataError
from synrep.losses import ClipLoss, MultiPosImageTextLoss
from tests._dist import run_gloo
from tests.conftest import needs_fashion

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP_CONFIG = "configs/clip_fashion.yaml"
PP_CONFIG = "configs/stablerep_pp_fashion.yaml"
# A tiny text tower and a tiny run: seconds on one CPU thread.
def small_text(method: str) -> list[str]:
    """A tiny text tower (and image head) for ``method`` (clip or stablerep_pp)."""
    out = [f"method.{method}.text_width=32", f"method.{method}.text_layers=1",
           f"method.{method}.text_heads=2", "run.threads=1"]
    return out + ([f"method.{method}.proj_hidden_dim=64"] if method == "stablerep_pp" else [])


SMALL_TEXT = small_text("clip")
CAPTIONS = ["a dark coat", "a sandal on a bench", "a bag next to a chair", "a pale dress",
            "a sneaker", "a shirt with a collar", "a trouser", "a pullover at dusk"]


# ----------------------------------------------------------------------------- references


def reference_clip_directions(img: torch.Tensor, txt: torch.Tensor, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's two cross-entropies written row by row from the paper: image i against every text
    (text i is the positive), and text i against every image."""
    img, txt = F.normalize(img.double(), dim=1), F.normalize(txt.double(), dim=1)
    n = img.shape[0]
    i2t = [torch.logsumexp(scale * img[i] @ txt.T, 0) - scale * img[i] @ txt[i] for i in range(n)]
    t2i = [torch.logsumexp(scale * txt[i] @ img.T, 0) - scale * txt[i] @ img[i] for i in range(n)]
    return torch.stack(i2t).mean(), torch.stack(t2i).mean()


def reference_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    i2t, t2i = reference_clip_directions(img, txt, scale)
    return (i2t + t2i) / 2


def reference_image_text(img: torch.Tensor, img_lab: torch.Tensor, txt: torch.Tensor,
                         txt_lab: torch.Tensor, scale: float) -> torch.Tensor:
    """StableRep++'s image-text term, loop by loop: every image against all texts (its caption
    is the positive), every text against all images (the mean over its images of -log p)."""
    img, txt = F.normalize(img.double(), dim=1), F.normalize(txt.double(), dim=1)
    i2t = []
    for i in range(len(img)):
        logp = scale * img[i] @ txt.T - torch.logsumexp(scale * img[i] @ txt.T, 0)
        pos = [j for j in range(len(txt)) if txt_lab[j] == img_lab[i]]
        i2t.append(-torch.stack([logp[j] for j in pos]).mean())
    t2i = []
    for t in range(len(txt)):
        logp = scale * txt[t] @ img.T - torch.logsumexp(scale * txt[t] @ img.T, 0)
        pos = [i for i in range(len(img)) if img_lab[i] == txt_lab[t]]
        t2i.append(-torch.stack([logp[i] for i in pos]).mean())
    return (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("scale", [1 / 0.07, 3.0, 60.0])
def test_clip_loss_matches_reference_value_and_gradients(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 8, generator=g, requires_grad=True)
    txt = torch.randn(6, 8, generator=g, requires_grad=True)
    log_scale = torch.tensor(math.log(scale), requires_grad=True)
    loss = ClipLoss()(img, txt, log_scale)
    loss.backward()

    ref_img, ref_txt = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    ref_log = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
    ref = reference_clip(ref_img, ref_txt, ref_log.exp())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(img.grad, ref_img.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(txt.grad, ref_txt.grad, rtol=1e-4, atol=1e-6)
    assert log_scale.grad.item() == pytest.approx(ref_log.grad.item(), rel=1e-4, abs=1e-6)


def test_clip_loss_exact_values_in_both_directions() -> None:
    # Orthonormal pairs: every positive has cosine 1, every negative 0, in both directions:
    # loss = -log(e^s / (e^s + (n - 1))).
    s, n = 2.0, 3  # a small scale keeps the float32 loss far from rounding
    eye = torch.eye(n)
    expected = -math.log(math.exp(s) / (math.exp(s) + n - 1))
    assert ClipLoss()(eye, eye, torch.tensor(math.log(s))).item() == pytest.approx(expected)
    # Texts 0 and 1 are the same vector e0 and image 1 matches nothing: the similarity matrix
    # S = [[1, 1, 0], [0, 0, 0], [0, 0, 1]] is not symmetric, so the directions differ.
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    e = math.exp(s)
    i2t = (-math.log(e / (2 * e + 1)) + math.log(3) - math.log(e / (e + 2))) / 3
    t2i = (-2 * math.log(e / (e + 2)) + math.log(e + 2)) / 3
    ref_i2t, ref_t2i = reference_clip_directions(img, txt, s)
    assert (ref_i2t.item(), ref_t2i.item()) == pytest.approx((i2t, t2i), rel=1e-12)
    loss = ClipLoss()(img, txt, torch.tensor(math.log(s)))
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # swapping the towers swaps the directions: the same mean
    assert ClipLoss()(txt, img, torch.tensor(math.log(s))).item() == pytest.approx(loss.item())


def test_logit_scale_is_clamped_at_the_maximum() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    high = torch.tensor(math.log(1000.0), requires_grad=True)
    loss = ClipLoss(max_logit_scale=100.0)(img, txt, high)
    loss.backward()
    assert loss.item() == pytest.approx(reference_clip(img, txt, 100.0).item(), rel=1e-5)
    assert high.grad.item() == 0.0  # above the clamp the scale no longer learns
    low = torch.tensor(math.log(50.0), requires_grad=True)
    ClipLoss(max_logit_scale=100.0)(img, txt, low).backward()
    assert low.grad.item() != 0.0
    clamped = MultiPosImageTextLoss(max_logit_scale=20.0)(
        img, torch.arange(5), txt, torch.arange(5), torch.tensor(math.log(1000.0)))
    assert clamped.item() == pytest.approx(reference_clip(img, txt, 20.0).item(), rel=1e-5)
    with pytest.raises(ValueError, match="max_logit_scale"):
        ClipLoss(max_logit_scale=0.0)
    with pytest.raises(ValueError, match="both be"):
        ClipLoss()(img, txt[:4], high)


def test_stablerep_pp_image_text_term_matches_multipositive_reference() -> None:
    g = torch.Generator().manual_seed(2)
    n_cap, m = 4, 3
    img = torch.randn(n_cap * m, 8, generator=g, requires_grad=True)
    txt = torch.randn(n_cap, 8, generator=g, requires_grad=True)
    img_lab, txt_lab = torch.arange(n_cap).repeat_interleave(m), torch.arange(n_cap)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss = MultiPosImageTextLoss()(img, img_lab, txt, txt_lab, log_scale)
    loss.backward()
    ref_img, ref_txt = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    ref_log = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    ref = reference_image_text(ref_img, img_lab, ref_txt, txt_lab, ref_log.exp())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(img.grad, ref_img.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(txt.grad, ref_txt.grad, rtol=1e-4, atol=1e-6)
    assert log_scale.grad.item() == pytest.approx(ref_log.grad.item(), rel=1e-4)
    # one image per caption: exactly CLIP's loss
    one = img.detach()[::m]
    assert MultiPosImageTextLoss()(one, txt_lab, txt.detach(), txt_lab, log_scale).item() == \
        pytest.approx(ClipLoss()(one, txt.detach(), log_scale).item(), rel=1e-5)


def _dist_worker(rank, world, img_all, txt_all, m, out_dir):
    n = txt_all.shape[0] // world  # captions per rank
    img = img_all[rank * n * m : (rank + 1) * n * m].clone().requires_grad_(True)
    txt = txt_all[rank * n : (rank + 1) * n].clone().requires_grad_(True)
    results = {}
    for name in ("clip", "image_text"):
        img.grad = txt.grad = None
        log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        if name == "clip":
            loss = ClipLoss()(img[::m], txt, log_scale)
        else:  # labels are local caption ids: the loss offsets them by rank
            loss = MultiPosImageTextLoss()(img, torch.arange(n).repeat_interleave(m), txt,
                                           torch.arange(n), log_scale)
        loss.backward()
        results[name] = [loss.item(), img.grad.numpy().copy(), txt.grad.numpy().copy(),
                         log_scale.grad.item()]
    np.save(f"{out_dir}/rank{rank}.npy", np.array(results, dtype=object), allow_pickle=True)


def test_losses_across_two_gloo_processes_match_one(tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    world, n, m = 2, 4, 3
    img_all = torch.randn(world * n * m, 8, generator=g)
    txt_all = torch.randn(world * n, 8, generator=g)
    run_gloo(_dist_worker, world, img_all, txt_all, m, str(tmp_path))
    ranks = [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True).item() for r in range(world)]

    for name in ("clip", "image_text"):
        img = img_all.clone().requires_grad_(True)
        txt = txt_all.clone().requires_grad_(True)
        log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        if name == "clip":
            loss = ClipLoss()(img[::m], txt, log_scale)
        else:
            loss = MultiPosImageTextLoss()(img, torch.arange(world * n).repeat_interleave(m), txt,
                                           torch.arange(world * n), log_scale)
        loss.backward()
        # DDP averages over ranks: the mean of the rank losses, the feature gradients / world
        # and the mean of the logit-scale gradients equal one process on the whole batch.
        assert np.mean([r[name][0] for r in ranks]) == pytest.approx(loss.item(), rel=1e-5)
        grad_img = np.concatenate([r[name][1] for r in ranks])
        grad_txt = np.concatenate([r[name][2] for r in ranks])
        np.testing.assert_allclose(grad_img / world, img.grad.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(grad_txt / world, txt.grad.numpy(), rtol=1e-4, atol=1e-7)
        assert np.mean([r[name][3] for r in ranks]) == pytest.approx(log_scale.grad.item(),
                                                                     rel=1e-4)


# ----------------------------------------------------------------------------- text tower


def test_text_tower_loads_a_saved_clip_text_model(tmp_path) -> None:
    from transformers import CLIPTextModel

    from synrep.factory import build_method
    from synrep.models.text import build_text_tower
    from synrep.testing import build_tiny_clip_text

    folder = build_tiny_clip_text(tmp_path / "text", width=32, max_length=16)
    cfg = load_config(CLIP_CONFIG, [f"method.clip.text_model={folder}",
                                    "method.clip.text_context=64", "method.clip.proj_dim=24"])
    method = build_method(cfg)
    saved = CLIPTextModel.from_pretrained(folder).eval()
    for k, v in saved.state_dict().items():
        assert torch.equal(method.text.model.state_dict()[k], v), k
    assert method.text.context == 16  # the model's 16 positions, not text_context=64
    method.eval()
    texts = ["a dark coat", "x" * 40]  # the second is cut to 16 tokens, ending in end-of-text
    ids = method.text.tokenizer(texts, padding=True, truncation=True, max_length=16,
                                return_tensors="pt")
    assert ids.input_ids.shape == (2, 16) and ids.input_ids[1, -1] == saved.config.eos_token_id
    with torch.no_grad():
        pooled = saved(**ids).pooler_output  # the end-of-text token's feature
        emb = method.encode_text(texts)
    torch.testing.assert_close(emb, pooled @ method.text.proj.weight.T)
    assert emb.shape == (2, 24)
    with pytest.raises(ConfigError, match="neither a built-in text model"):
        build_text_tower(load_config(None, ["method.name=clip",
                                            "method.clip.text_model=no/such/folder"]
                                     ).method.options)


def test_builtin_text_tower_reads_the_shipped_vocabulary() -> None:
    from synrep.models.text import build_text_tower

    cfg = load_config(None, ["method.name=clip", "method.clip.text_width=32",
                             "method.clip.text_layers=2", "method.clip.text_heads=4",
                             "method.clip.text_context=12"])
    tower = build_text_tower(cfg.method.options).eval()
    tok = tower.tokenizer
    ids, mask = tower.tokenize(CAPTIONS[:2])
    assert tok.unk_token_id not in ids[mask.bool()].tolist()  # grammar words are all known
    assert ids[0, 0] == tok.bos_token_id and tok.eos_token_id in ids[0].tolist()
    assert tower.model.config.num_hidden_layers == 2 and tower.width == 32
    assert tower.tokenize(["a " * 30])[0].shape == (1, 12)  # text_context
    with torch.no_grad():  # padding never changes a text's embedding (causal, pooled at eos)
        alone = tower(["a dark coat"])
        padded = tower(["a dark coat", "a bag next to a chair in soft morning light"])[:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="divisible"):
        build_text_tower(load_config(None, ["method.name=clip", "method.clip.text_width=30",
                                            "method.clip.text_heads=4"]).method.options)


# ----------------------------------------------------------------------------- LaCLIP


def test_rewrite_choice_is_uniform_and_deterministic() -> None:
    counts = torch.tensor([1, 2, 4] * 2000)
    picks = rewrite_choice(counts, seed=0, step=7)
    assert torch.equal(picks, rewrite_choice(counts, seed=0, step=7))  # pure in (seed, step)
    assert not torch.equal(picks, rewrite_choice(counts, seed=0, step=8))
    assert not torch.equal(picks, rewrite_choice(counts, seed=1, step=7))
    assert (picks >= 0).all() and (picks < counts).all()
    for c in (1, 2, 4):
        freq = torch.bincount(picks[counts == c], minlength=c).double() / 2000
        # 2,000 draws: each frequency is within 5 standard errors of 1/c
        assert (freq - 1 / c).abs().max() < 5 * math.sqrt((1 / c) * (1 - 1 / c) / 2000) + 1e-9


def _shards_from_captions(rows: list[dict], out: Path, k: int = 2, seed: int = 0) -> Path:
    """Caption-group shards as the images stage writes them (key = caption id, row as meta)."""
    rng = np.random.default_rng(seed)
    groups = [CaptionGroup(key=f"{r['caption_id']:09d}", caption=r["caption"],
                           meta={key: v for key, v in r.items() if key != "caption"},
                           images=[rng.integers(0, 256, (28, 28), dtype=np.uint8)
                                   for _ in range(k)])
              for r in rows]
    write_shard(out / "00000.tar", groups)
    write_sizes(out)
    return out


def test_laclip_batches_use_the_rewrites_stage(tmp_path) -> None:
    from synrep.captions.stage import read_caption_shard, read_rewrites, run_captions, run_rewrites
    from synrep.factory import build_source

    run = tmp_path / "run"
    cfg = load_config("configs/captions_fashion.yaml", [
        f"run.dir={run}", "captions.num=16", "captions.shard_size=16", "captions.rewrite.k=2"])
    run_captions(cfg)
    run_rewrites(cfg)
    rows = read_caption_shard(run / "captions/captions-00000.jsonl")
    shards = _shards_from_captions(rows, tmp_path / "shards")
    overrides = [f"run.dir={run}", f"data.shards={shards}", "train.batch_size=8",
                 "method.clip.rewrites=true", *SMALL_TEXT]
    source = build_source(load_config(CLIP_CONFIG, overrides), "images", texts=True)
    table = read_rewrites(run / "rewrites")
    candidates = {r["caption_id"]: [r["caption"], *table[r["caption_id"]][1]] for r in rows}
    used_rewrite = 0
    for step in range(12):
        b = source.batch(step)
        for i, text in zip(b["index"].tolist(), b["texts"]):
            options = candidates[rows[i]["caption_id"]]
            assert text in options
            used_rewrite += text != options[0]
        # two ranks draw the texts one process draws, each its half
        halves = [ArraySource(source.images, None, 8, 0, r, 2, 1, texts=source.texts).batch(step)
                  for r in range(2)]
        assert halves[0]["texts"] + halves[1]["texts"] == b["texts"]
    assert 0.4 < used_rewrite / 96 < 0.9  # 2 rewrites per caption: 2/3 of the texts expected
    # a batch's texts are a pure function of (seed, step)
    again = build_source(load_config(CLIP_CONFIG, overrides), "images", texts=True)
    assert again.batch(5)["texts"] == source.batch(5)["texts"]
    # without rewrites the caption itself, every step
    plain = build_source(load_config(CLIP_CONFIG, [f"run.dir={run}", f"data.shards={shards}",
                                                   "train.batch_size=8"]), "images", texts=True)
    b = plain.batch(0)
    assert b["texts"] == [rows[i]["caption"] for i in b["index"].tolist()]

    # rewrites must come from the captions the images were rendered from
    keys = [f"{r['caption_id']:09d}" for r in rows]
    metas = [{"caption_id": r["caption_id"]} for r in rows]
    with pytest.raises(DataError, match="were made from"):
        group_texts(["another caption"] + [r["caption"] for r in rows[1:]], keys, metas, table)
    with pytest.raises(DataError, match="has no rewrites"):
        group_texts(["x"], ["999999999"], [{}], table)


def test_text_methods_reject_unusable_configs(tmp_path) -> None:
    from synrep.factory import build_method, build_source

    with pytest.raises(ConfigError, match="data.source=shards"):
        build_source(load_config(CLIP_CONFIG, ["data.source=dataset"]), "images", texts=True)
    with pytest.raises(ConfigError, match="rewrites is an option of method.s. clip, stablerep_pp"):
        load_config(CLIP_CONFIG, ["method.name=stablerep", "method.stablerep.rewrites=true"])
    with pytest.raises(ConfigError, match="use method.name=stablerep"):
        build_method(load_config(PP_CONFIG, ["method.stablerep_pp.text_weight=0",
                                             *small_text("stablerep_pp")]))


# ----------------------------------------------------------------------------- end to end


def _tiny_shards(out: Path, n: int = 16, k: int = 3) -> Path:
    rows = [{"caption_id": i, "label": i % 10,
             "caption": CAPTIONS[i % len(CAPTIONS)] + ("" if i < 8 else " at dusk")}
            for i in range(n)]
    return _shards_from_captions(rows, out, k=k)


def _train_args(config: str, shards: Path, run: Path, *extra: str) -> list[str]:
    method = "clip" if config == CLIP_CONFIG else "stablerep_pp"
    return ["train", config, "train.steps=3", "train.batch_size=8", "train.ckpt_every=3",
            "train.log_every=1", "optim.warmup_steps=1", f"data.shards={shards}",
            f"run.dir={run}", *small_text(method), *extra]


@needs_fashion
def test_clip_trains_and_zero_shot_evaluates(tmp_path) -> None:
    from synrep.checkpoint import Checkpoint
    from synrep.eval.zeroshot import class_embeddings, zero_shot_classify
    from synrep.factory import build_method

    shards = _tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    assert main(_train_args(CLIP_CONFIG, shards, run)) == 0
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # 8 captions (up to repeats of one text) per step: CLIP's loss starts near log(8)
    assert 1.0 < rows[0]["loss"] < 3.5 and 1.0 <= rows[0]["logit_scale"] <= 100.0
    ck_path = run / "train/checkpoints/final.safetensors"
    ck = Checkpoint(ck_path)
    assert ck.step == 3 and any(k.startswith("text.model.") for k in ck.model_state)

    templates = ["a photo of a {}", "a {}"]
    assert main(["eval", CLIP_CONFIG, f"run.dir={run}", "--checkpoint", str(ck_path),
                 "eval.protocols=[zeroshot]", "eval.limit_test=200", "eval.pca_images=0",
                 f"eval.zeroshot_templates={json.dumps(templates)}", *SMALL_TEXT]) == 0
    res = json.loads((run / "eval/results.json").read_text())["fashion-mnist"]
    # the same number from the checkpoint's own towers, computed here
    from synrep.eval.stage import load_split

    cfg = load_config(CLIP_CONFIG, [f"run.dir={run}", "eval.limit_test=200", *SMALL_TEXT])
    method = build_method(cfg)
    ck.load_model(method)
    method.eval()
    ds = load_split(cfg.eval, "test", 28)
    with torch.no_grad():
        img = method.encode_image(ds.images.float() / 255)
        # prompts name Fashion-MNIST's classes with the words captions use ("trousers")
        names = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt",
                 "sneaker", "bag", "ankle boot"]
        cls = class_embeddings(method.encode_text, names, templates)
    assert res["zeroshot_top1"] == pytest.approx(
        zero_shot_classify(img, cls, ds.labels)["top1"], abs=1e-6)
    # Names given in the config replace them; a wrong count is a clear error.
    assert main(["eval", CLIP_CONFIG, f"run.dir={run}", "--checkpoint", str(ck_path),
                 "eval.protocols=[zeroshot]", "eval.limit_test=200", "eval.pca_images=0",
                 "eval.zeroshot_classnames=[a,b]", *SMALL_TEXT]) == 2


def test_stablerep_pp_trains_with_both_terms(tmp_path) -> None:
    shards = _tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    assert main(_train_args(PP_CONFIG, shards, run, "train.batch_size=4",
                            "method.stablerep_pp.images_per_caption=2",
                            "method.stablerep_pp.text_weight=0.5")) == 0
    rows = [json.loads(x) for x in (run / "train/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss"] == pytest.approx(r["image_image"] + 0.5 * r["image_text"], rel=1e-5)
        assert r["image_text"] > 0 and r["image_image"] > 0
