"""MixedAE: homologous attention never crosses sources when the top-K is unambiguous and equals
softmax attention with K = all keys; patch mixing; a full forward trains every part while the
encoder keeps timm's attention; clear config errors; a tiny CLI run on Fashion-MNIST."""

from __future__ import annotations

import json
import math

import pytest
import torch
from timm.layers import Attention

from synrep import cli
from synrep.config import Config, load_config
from synrep.factory import build_method
from synrep.methods.mixedae import MixedAE, homologous_attention, homologous_block, mix_patches
from tests.conftest import TINY, needs_fashion

pytestmark = pytest.mark.usefixtures("one_thread")


def test_homologous_attention_stays_within_source():
    """4 sources of K=3 tokens, each source's queries/keys in its own orthogonal subspace with a
    large within-source logit, shuffled positions and a class token: weights to other sources'
    keys are exactly 0, and the output equals softmax attention over the own source by hand."""
    g = torch.Generator().manual_seed(0)
    n_src, k, d, p = 4, 3, 8, 1
    n = n_src * k
    src = torch.randperm(n, generator=g) % n_src  # (N,) source of each patch position
    basis = torch.eye(d)[:n_src] * 4.0  # source s lives along axis s
    noise = lambda: 0.1 * torch.randn(2, 3, n, d, generator=g)  # noqa: E731
    q = basis[src] + noise()
    kk = basis[src] + noise()
    v = torch.randn(2, 3, p + n, d, generator=g)
    cls = torch.randn(2, 3, p, d, generator=g)
    q, kk = torch.cat([cls, q], dim=2), torch.cat([cls, kk], dim=2)
    out, w = homologous_attention(q, kk, v, top_k=k, keep_prefix=p, return_weights=True)
    other = src[:, None] != src[None, :]  # (N, N) query-key pairs of different sources
    assert (w[..., p:, p:][..., other] == 0).all()
    assert (w[..., p:, p:][..., ~other] > 0).all() and (w[..., p:, :p] > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, p + n))
    # by hand: each patch query softmaxes over the class token and its own source's keys
    scale = d ** -0.5
    for i in range(n):
        keys = [0] + [p + j for j in range(n) if src[j] == src[i]]
        logits = (q[..., p + i, None, :] * kk[..., keys, :]).sum(-1) * scale  # (2, 3, 1+K)
        ref = (logits.softmax(-1).unsqueeze(-1) * v[..., keys, :]).sum(-2)
        torch.testing.assert_close(out[..., p + i, :], ref)
    # the class-token query attends to every key normally
    ref_cls = ((q[..., :p, :] @ kk.transpose(-2, -1)) * scale).softmax(-1) @ v
    torch.testing.assert_close(out[..., :p, :], ref_cls)


def test_all_keys_is_softmax_attention_and_block_matches_timm():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v  # scale = 4 ** -0.5
    torch.testing.assert_close(homologous_attention(q, k, v, top_k=7), ref)
    torch.testing.assert_close(homologous_attention(q, k, v, top_k=6, keep_prefix=1), ref)
    cfg = load_config("configs/mixedae_fashion.yaml", ["model.backbone=vit_tiny_p7_28"])
    blk = build_method(cfg).encoder.backbone.blocks[0].eval()
    x = torch.randn(2, 17, 192, generator=g)
    torch.testing.assert_close(homologous_block(blk, x, top_k=16, keep_prefix=1), blk(x))


def test_mix_patches():
    b, n, d, ratio = 8, 12, 5, 0.25
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(2))
    mixed, source, owner = mix_patches(x, ratio, torch.Generator().manual_seed(3))
    assert mixed.shape == (2, n, d) and source.shape == (2, n) and owner.shape == (2, 4)
    assert source.dtype == torch.long and owner.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for gi in range(2):
        assert torch.bincount(source[gi], minlength=4).tolist() == [3, 3, 3, 3]  # r*N each
        for j in range(n):
            torch.testing.assert_close(mixed[gi, j], x[owner[gi, source[gi, j]], j], rtol=0,
                                       atol=0)
    again = mix_patches(x, ratio, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], source)
    other = mix_patches(x, ratio, torch.Generator().manual_seed(4))[1]
    assert not torch.equal(other, source)
    assert not torch.equal(source[0], source[1])  # a permutation per group
    with pytest.raises(ValueError):
        mix_patches(x[:6], ratio, torch.Generator())


@pytest.mark.parametrize("homologous", [True, False])
def test_forward_trains_every_part_and_keeps_timm_attention(homologous):
    cfg = load_config("configs/mixedae_fashion.yaml", [
        *TINY, "run.threads=1", f"method.mixedae.homologous={str(homologous).lower()}",
        "method.mixedae.decoder_dim=32", "method.mixedae.decoder_heads=2",
        "method.mixedae.decoder_depth=1"])
    m = build_method(cfg)
    assert isinstance(m, MixedAE)
    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    out = m({"images": x}, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    expect = out["recon"] + 0.1 * out["contrastive"]
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []  # encoder, decoder, both segment embeddings, contrastive head
    for name in ("segment_embed", "decoder_segment_embed", "contrastive_head.0.weight",
                 "decoder_pred.weight", "encoder.backbone.blocks.0.attn.qkv.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0
    assert all(type(b.attn) is Attention for b in m.encoder.backbone.blocks)
    assert all(k.startswith(("encoder.", "decoder", "mask_token", "segment_embed",
                             "contrastive_head")) for k in m.state_dict())


@pytest.mark.parametrize("override, needle", [
    ("method.mixedae.ratio=0.3", "mixedae.ratio"),
    ("method.mixedae.ratio=0.0625", "integer number >= 2"),  # 1 of 16 patches per source
    ("train.batch_size=30", "train.batch_size=30 must be divisible by 1/method.mixedae.ratio = 4"),
])
def test_cli_rejects_bad_settings(tmp_path, capsys, override, needle):
    code = cli.main(["run", "configs/mixedae_fashion.yaml", *TINY, "run.threads=1",
                     f"run.dir={tmp_path}", override])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and needle in err and "Traceback" not in err


@needs_fashion
def test_cli_end_to_end(tmp_path):
    code = cli.main(["run", "configs/mixedae_fashion.yaml", *TINY, "run.threads=1",
                     "train.steps=2", f"run.dir={tmp_path}", "eval.protocols=[linear]"])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "linear_probe_top1" in json.dumps(results)
    rows = [json.loads(r) for r in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("recon" in r and "contrastive" in r for r in rows)


def test_decoder_input_per_source():
    """Decoder row g*n+s: positions owned by s keep the encoded token, others the mask token, plus
    the decoder segment embedding of s and the sin-cos positions."""
    cfg = load_config("configs/mixedae_fashion.yaml", [
        "method.mixedae.decoder_dim=32", "method.mixedae.decoder_heads=2",
        "method.mixedae.decoder_depth=1"])
    m = build_method(cfg).eval()
    seen = []
    m.decoder_blocks.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(2, 17, 192, generator=g)
    source = mix_patches(torch.zeros(8, 16, 1), 0.25, g)[1]
    pred = m.forward_mixed_decoder(latent, source)
    assert pred.shape == (8, 16, 49)
    x = seen[0] - m.decoder_pos_embed  # (8, 17, 32)
    emb = m.decoder_embed(latent)
    seg = m.decoder_segment_embed.view(4, 32)
    for gi in range(2):
        for s in range(4):
            row = x[gi * 4 + s]
            torch.testing.assert_close(row[0], emb[gi, 0])  # the class token is kept
            for j in range(16):
                want = emb[gi, 1 + j] if source[gi, j] == s else m.mask_token
                torch.testing.assert_close(row[1 + j], want + seg[s])


def test_homologous_contrastive_loss_pairs_each_sources_halves():
    """Every token of a source carries the same vector, so whatever random split the loss draws,
    both half-averages are that vector: the loss is InfoNCE between the projected source vectors,
    written out here row by row (positive: the same source's other half; negatives: every other
    half of the batch)."""
    cfg = load_config("configs/mixedae_fashion.yaml", [
        "method.mixedae.decoder_dim=32", "method.mixedae.decoder_heads=2",
        "method.mixedae.decoder_depth=1"])
    m = build_method(cfg).eval()
    g = torch.Generator().manual_seed(7)
    n_groups, n_src, n_pos, d = 2, m.n_src, m.n_pos, 192
    source = mix_patches(torch.zeros(n_groups * n_src, n_pos, 1), 1.0 / n_src, g)[1]  # (G, N)
    vec = torch.randn(n_groups, n_src, d, generator=g)  # one vector per source
    latent = torch.randn(n_groups, m.num_prefix + n_pos, d, generator=g)
    latent[:, m.num_prefix:] = vec.gather(1, source.unsqueeze(-1).expand(-1, -1, d))
    with torch.no_grad():
        got = m.contrastive_loss(latent, source, torch.Generator().manual_seed(8))
        z = torch.nn.functional.normalize(m.contrastive_head(vec.reshape(-1, d)), dim=-1)
    t, rows = m.temperature, []
    zz = torch.cat([z, z])  # first halves, then second halves, source by source
    for i in range(len(zz)):
        pos = (i + len(z)) % len(zz)
        logits = [float(zz[i] @ zz[j]) / t for j in range(len(zz)) if j != i]
        rows.append(math.log(sum(math.exp(v) for v in logits)) - float(zz[i] @ zz[pos]) / t)
    assert got.item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    # a different split of each source's positions changes nothing here
    again = m.contrastive_loss(latent, source, torch.Generator().manual_seed(9))
    assert again.item() == pytest.approx(got.item(), rel=1e-6)


def test_gradients_are_the_same_in_every_run_on_two_threads():
    # The segment embedding's gradient once came from an indexing backward whose accumulation
    # order depended on thread timing: two runs of one seed then trained different weights.
    cfg = Config()
    cfg.method.name = "mixedae"
    cfg.train.batch_size = 64
    m = build_method(cfg).train()
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(3):
            m.zero_grad()
            m({"images": x}, torch.Generator().manual_seed(1))["loss"].backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for name, grad in grads[0].items():
            assert torch.equal(grad, other[name]), name
