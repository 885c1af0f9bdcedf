"""MAE: patchify, random masking and the loss against hand-written references; the encoder sees
only visible tokens; a tiny CLI run on Fashion-MNIST; clear errors; determinism."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from synrep import cli
from synrep.config import Config, load_config
from synrep.errors import ConfigError
from synrep.factory import build_method
from synrep.losses.mae import masked_reconstruction_loss as loss_fn
from synrep.methods.mae import MAE, patchify, random_masking, unpatchify
from synrep.models import Encoder
from synrep.train.loop import train
from tests.conftest import TINY, needs_fashion

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**method) -> Config:
    cfg = Config()
    cfg.method.name = "mae"
    opts = cfg.method.mae
    opts.decoder_dim = 32
    opts.decoder_heads = 2
    opts.decoder_depth = 1
    for k, v in method.items():
        setattr(opts, k, v)
    return cfg


def _tiny_vit(**kw) -> VisionTransformer:
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=0, embed_dim=32,
                             depth=1, num_heads=2, dynamic_img_size=True, **kw)


def test_patchify_matches_loop_and_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 6, generator=g)
    p = 2
    got = patchify(x, p)
    assert got.shape == (2, 2 * 3, p * p * 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                ref = [x[b, c, i * p + r, j * p + s] for r in range(p) for s in range(p)
                       for c in range(3)]
                torch.testing.assert_close(got[b, i * 3 + j], torch.stack(ref))
    torch.testing.assert_close(unpatchify(got, p, 3, grid=(2, 3)), x)
    sq = torch.rand(3, 1, 28, 28, generator=g)
    torch.testing.assert_close(unpatchify(patchify(sq, 7), 7, 1), sq)
    with pytest.raises(ValueError):
        patchify(x, 4)


def test_random_masking_with_given_noise_keeps_its_lowest_tokens():
    x = torch.randn(2, 6, 3)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    vis, mask, _ = random_masking(x, 0.5, None, noise=noise)
    assert mask.tolist() == [[1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1]]
    torch.testing.assert_close(vis[0], x[0, [1, 5, 3]])  # in order of rising noise
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(x, 0.5, None, noise=noise[:, :5])


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.99])
def test_random_masking(ratio):
    b, n, d = 8, 16, 3
    x = torch.arange(b * n * d, dtype=torch.float32).reshape(b, n, d)
    vis, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(1))
    keep = max(1, round(n * (1 - ratio)))
    assert vis.shape == (b, keep, d) and mask.shape == (b, n) and ids_restore.shape == (b, n)
    assert ((mask == 0).sum(dim=1) == keep).all() and ((mask == 1).sum(dim=1) == n - keep).all()
    ids_shuffle = ids_restore.argsort(dim=1)
    idx = ids_shuffle.unsqueeze(-1).expand(-1, -1, d)
    shuffled = x.gather(1, idx)
    # gathering the shuffled sequence with ids_restore gives the original back
    torch.testing.assert_close(shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d)), x)
    torch.testing.assert_close(vis, shuffled[:, :keep])  # the kept tokens come first
    for i in range(b):  # visible tokens are exactly those at mask == 0
        kept = set(torch.nonzero(mask[i] == 0).flatten().tolist())
        assert {int(t[0]) // d - i * n for t in vis[i]} == kept
    again = random_masking(x, ratio, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, c) for a, c in zip((vis, mask, ids_restore), again))
    if keep > 1:
        assert len({tuple(row.tolist()) for row in mask}) > 1  # images get different masks
    other = random_masking(x, ratio, torch.Generator().manual_seed(2))[1]
    assert keep == 1 or not torch.equal(other, mask)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_hand_formula_and_ignores_visible(norm_pix):
    g = torch.Generator().manual_seed(3)
    target, pred = torch.rand(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.float32)
    terms = []
    for b in range(3):
        for i in range(5):
            if mask[b, i]:
                t = target[b, i]
                if norm_pix:
                    mu = sum(t.tolist()) / 4
                    var = sum((v - mu) ** 2 for v in t.tolist()) / 3  # unbiased, as in MAE
                    t = (t - mu) / (var + 1e-6) ** 0.5
                terms.append(((pred[b, i] - t) ** 2).mean())
    expected = torch.stack(terms).mean()
    got = loss_fn(target, pred, mask, norm_pix)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    changed = torch.where(mask.bool().unsqueeze(-1), pred, pred + 100.0)
    assert loss_fn(target, changed, mask, norm_pix).item() == pytest.approx(got.item(), rel=1e-6)
    moved = torch.where(mask.bool().unsqueeze(-1), pred + 1.0, pred)
    assert loss_fn(target, moved, mask, norm_pix).item() != pytest.approx(got.item())


def test_forward_sees_visible_tokens_and_trains_everything():
    cfg = _cfg()
    m = build_method(cfg)
    seen = []
    blocks = m.encoder.backbone.blocks
    blocks.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    out = m({"images": x}, torch.Generator().manual_seed(0))
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert out["mask_ratio"].item() == pytest.approx(0.75)
    assert seen == [torch.Size([6, 1 + 4, 192])]  # the class token and 4 of the 16 patches
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []  # encoder, decoder, mask token: every parameter gets a gradient
    # caption groups (G, m, C, H, W) are flattened into images
    g5 = m({"images": x.view(3, 2, 1, 28, 28)}, torch.Generator().manual_seed(0))["loss"]
    assert g5.item() == pytest.approx(loss.item(), rel=1e-6)
    # the encoder module stays the plain Encoder, so evaluation loads it unchanged
    assert isinstance(m.encoder, Encoder)
    assert all(k.startswith("encoder.") != ("decoder" in k or k == "mask_token")
               for k in m.state_dict())


@pytest.mark.parametrize("kw", [{}, {"no_embed_class": True, "reg_tokens": 2},
                                {"class_token": False, "global_pool": "avg"}])
def test_encoder_tokens_match_timm_embedding(kw):
    """The tokens entering the blocks are timm's own embedding (prefix tokens, then patches with
    their positions) restricted to the visible patches, for every pos_embed layout."""
    vit = _tiny_vit(**kw)
    torch.nn.init.normal_(vit.pos_embed, std=1.0)
    if vit.cls_token is not None:
        torch.nn.init.normal_(vit.cls_token, std=1.0)
    m = MAE(_cfg(), Encoder(vit))
    seen = []
    vit.blocks.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.rand(4, 1, 28, 28)
    latent, mask, ids_restore = m.forward_encoder(x, torch.Generator().manual_seed(5))
    p = vit.num_prefix_tokens
    full = vit._pos_embed(vit.patch_embed(x))  # (B, P + 16, D)
    keep = ids_restore.argsort(dim=1)[:, :4]
    expect = torch.cat([full[:, :p], full[:, p:].gather(1, keep[..., None].expand(-1, -1, 32))],
                       dim=1)
    torch.testing.assert_close(seen[0], expect)
    assert latent.shape == (4, p + 4, 32)
    pred = m.forward_decoder(latent, ids_restore)
    assert pred.shape == (4, 16, 49)


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match=r"method\.mae\.mask_ratio"):
        build_method(_cfg(mask_ratio=0.0))
    with pytest.raises(ConfigError, match=r"method\.mae\.decoder_heads"):
        build_method(_cfg(decoder_dim=30, decoder_heads=4))
    cfg = _cfg()
    cfg.aug.size = 21
    with pytest.raises(ConfigError, match="aug.size"):
        build_method(cfg)


@pytest.mark.parametrize("override, needle", [("method.mae.mask_ratio=1.0", "mask_ratio"),
                                              ("model.backbone=resnet18_28", "ViT")])
def test_cli_rejects_bad_settings(tmp_path, capsys, override, needle):
    code = cli.main(["run", "configs/mae_fashion.yaml", *TINY, "run.threads=1",
                     f"run.dir={tmp_path}", override])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and needle in err and "Traceback" not in err


@needs_fashion
def test_cli_end_to_end(tmp_path):
    code = cli.main(["run", "configs/mae_fashion.yaml", *TINY, "run.threads=1", "train.steps=3",
                     f"run.dir={tmp_path}", "eval.protocols=[linear]"])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "linear_probe_top1" in json.dumps(results)
    rows = [json.loads(r) for r in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mask_ratio"] == pytest.approx(0.75) for r in rows)


@needs_fashion
def test_same_seed_gives_identical_weights(tmp_path):
    weights = []
    for name in ("a", "b"):
        cfg = load_config("configs/mae_fashion.yaml", [
            *TINY, "run.threads=1", "train.steps=2", "run.stages=[train]",
            f"run.dir={tmp_path / name}"])
        ck = train(cfg)
        weights.append({k: v for k, v in load_file(str(ck)).items() if k.startswith("model/")})
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 10
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_vitb16_recipe_builds_at_full_size_and_steps():
    """The paper's ViT-B/16 recipe: 224 px, 196 patches of 16 px, 49 visible, a 512 x 8 decoder."""
    cfg = load_config("configs/mae_vitb16.yaml", ["run.device=cpu"])
    method = build_method(cfg)
    assert method.grid == (14, 14) and len(method.decoder_blocks) == 8
    assert method.decoder_embed.out_features == 512
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    out = method({"images": images}, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and float(out["mask_ratio"]) == pytest.approx(0.75)
    assert method.encoder.backbone.patch_embed.proj.weight.grad is not None
