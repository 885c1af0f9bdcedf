"""SynCLR: its losses against hand-written references, masks, the EMA teacher, and 2 gloo
processes against one process on the same global batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synrep.config import Config, load_config
from synrep.data.masks import patch_masks
from synrep.errors import ConfigError
from synrep.factory import build_method
from synrep.losses import MultiPosConLoss, ibot_loss, multipos_query_key_loss, sinkhorn_knopp
from synrep.models import GlobalBatchNorm1d
from tests._dist import run_gloo


def reference_query_key(q, q_lab, k, k_lab, exclude, tau):
    """Loop by loop: for each query, -mean over its positive keys of log softmax over the keys
    it may see (all but its excluded one); mean over queries that have a positive."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    rows = []
    for i in range(q.shape[0]):
        seen = [j for j in range(k.shape[0]) if j != int(exclude[i])]
        pos = [j for j in seen if k_lab[j] == q_lab[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([q[i] @ k[j] / tau for j in seen]), dim=0)
        rows.append(torch.stack([denom - q[i] @ k[j] / tau for j in pos]).mean())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("tau", [0.08, 0.2])
def test_query_key_loss_matches_loop_reference(tau):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(14, 8, generator=g, requires_grad=True)
    k = torch.randn(9, 8, generator=g, requires_grad=True)
    q_lab = torch.randint(0, 4, (14,), generator=g)
    k_lab = torch.randint(0, 4, (9,), generator=g)
    exclude = torch.randint(-1, 9, (14,), generator=g)
    got = multipos_query_key_loss(q, q_lab, k, k_lab, exclude, tau)
    ref_q, ref_k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    ref = reference_query_key(ref_q, q_lab, ref_k, k_lab, exclude, tau)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    ref.backward()
    torch.testing.assert_close(q.grad, ref_q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k.grad, ref_k.grad, rtol=1e-4, atol=1e-6)


def test_query_key_loss_with_keys_equal_queries_is_stablerep():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 16, generator=g)
    labels = torch.arange(4).repeat_interleave(3)
    a = multipos_query_key_loss(z, labels, z, labels, torch.arange(12), 0.1)
    b = MultiPosConLoss(0.1)(z, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_query_key_exact_value():
    # two orthogonal unit keys, one query equal to key 0; positive = key 0 only.
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = multipos_query_key_loss(q, torch.tensor([0]), k, torch.tensor([0, 1]),
                                  torch.tensor([-1]), 0.5)
    assert got.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def reference_sinkhorn(scores: np.ndarray, temp: float, iters: int) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp written with numpy: alternately normalise prototype (column) and
    sample (row) marginals of exp(scores / temp) to 1/K and 1/N; return rows summing to 1."""
    q = np.exp(scores / temp)
    q = q / q.sum()
    n, k = q.shape
    for _ in range(iters):
        q = q / q.sum(axis=0, keepdims=True) / k
        q = q / q.sum(axis=1, keepdims=True) / n
    return q * n


def test_sinkhorn_matches_numpy_and_balances():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(40, 6, generator=g)
    got = sinkhorn_knopp(s, 0.5, iters=3)
    np.testing.assert_allclose(got.numpy(), reference_sinkhorn(s.double().numpy(), 0.5, 3),
                               rtol=1e-5)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(40))
    many = sinkhorn_knopp(s, 0.5, iters=200)  # converged: every prototype gets N/K of the mass
    torch.testing.assert_close(many.sum(dim=0), torch.full((6,), 40 / 6), rtol=1e-4, atol=1e-4)
    # a low temperature does not overflow
    assert torch.isfinite(sinkhorn_knopp(s * 100, 0.04)).all()
    assert sinkhorn_knopp(torch.zeros(0, 6), 0.07).shape == (0, 6)


def test_ibot_loss_exact_per_image_mean():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    img = torch.tensor([0, 0, 2])  # image 0 has two masked tokens, image 2 one, image 1 none
    tau = 0.5

    def ce(si, ti):
        return -(ti * torch.log_softmax(si / tau, dim=0)).sum()

    expected = ((ce(s[0], t[0]) + ce(s[1], t[1])) / 2 + ce(s[2], t[2])) / 2
    assert ibot_loss(s, t, img, 3, tau).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["random", "block"])
def test_patch_masks(kind):
    g = torch.Generator().manual_seed(0)
    m = patch_masks(400, 4, 4, g, 0.5, (0.1, 0.5), kind)
    counts = m.flatten(1).sum(dim=1)
    assert m.shape == (400, 4, 4) and m.dtype == torch.bool
    assert (counts > 0).sum() == 200  # exactly mask_prob of the crops
    assert counts.max() <= 16
    if kind == "random":  # exact counts: round(share * 16) within [0.1, 0.5] * 16
        assert counts[counts > 0].min() >= 2 and counts.max() <= 8
    with pytest.raises(ValueError):
        patch_masks(4, 4, 4, g, 0.5, (0.5, 1.0), kind)


def _cfg(**method) -> Config:
    cfg = Config()
    cfg.method.name = "synclr"
    opts = cfg.method.synclr
    opts.images_per_caption = 2
    opts.proj_hidden_dim = 64
    opts.ibot_prototypes = 32
    opts.ibot_hidden_dim = 32
    opts.ibot_bottleneck_dim = 16
    cfg.train.steps = 10
    for k, v in method.items():
        setattr(opts, k, v)
    return cfg


def test_ema_teacher_update_and_schedules():
    cfg = _cfg(ema_momentum=0.9, ibot_teacher_temp_warmup=4)
    m = build_method(cfg)
    teacher_before = [p.clone() for p in m.teacher["encoder"].parameters()]
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    m.set_step(0)
    assert m.momentum() == pytest.approx(0.9) and m.teacher_temp() == pytest.approx(0.04)
    m.after_step()
    for t0, t, s in zip(teacher_before, m.teacher["encoder"].parameters(), m.encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    m.set_step(2)
    assert m.teacher_temp() == pytest.approx(0.055)
    m.set_step(5)
    assert m.momentum() == pytest.approx(0.95) and m.teacher_temp() == pytest.approx(0.07)
    m.set_step(10)
    assert m.momentum() == pytest.approx(1.0)
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_eval_ema_averages_the_encoder_without_changing_training():
    """teacher=false, eval_ema=true: the same losses and gradients as without it (the keys stay
    the student's own), plus an EMA of the encoder only, which evaluation reads as the teacher."""
    outs = []
    for ema in (False, True):
        torch.manual_seed(0)
        m = build_method(_cfg(teacher=False, ibot_weight=0.0, eval_ema=ema, ema_momentum=0.9))
        x = torch.randint(0, 256, (4, 2, 1, 28, 28), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
        out = m({"images": x}, torch.Generator().manual_seed(2))
        out["loss"].backward()
        outs.append((float(out["loss"]), [p.grad.clone() for p in m.encoder.parameters()]))
        if ema:
            assert set(m.teacher) == {"encoder"}
            before = [p.clone() for p in m.teacher["encoder"].parameters()]
            with torch.no_grad():
                for p in m.encoder.parameters():
                    p.add_(1.0)
            m.set_step(0)
            m.after_step()
            for t0, t, s in zip(before, m.teacher["encoder"].parameters(),
                                m.encoder.parameters()):
                torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
            assert any(k.startswith("teacher.encoder.") for k in m.state_dict())
        else:
            assert m.teacher is None
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("changes,needle", [
    ({"contrastive_weight": 0.0, "ibot_weight": 0.0}, "nothing to train"),
    ({"teacher": False}, "EMA teacher"),
    ({"images_per_caption": 1}, "two views"),
])
def test_bad_settings_are_refused(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        build_method(_cfg(**changes))


def test_weight_zero_removes_terms():
    x = (torch.rand(4, 2, 1, 28, 28) * 255).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    only_con = build_method(_cfg(ibot_weight=0.0))
    assert only_con.ibot_head is None and "ibot" not in only_con({"images": x}, g)
    only_mim = build_method(_cfg(contrastive_weight=0.0))
    assert only_mim.head is None and "contrastive" not in only_mim({"images": x}, g)
    stablerep = build_method(_cfg(teacher=False, ibot_weight=0.0))
    assert stablerep.teacher is None


def test_low_res_share_trains_whole_groups_at_low_resolution():
    """Flexi training: a share of the caption groups goes through the encoder at low_res_size;
    features, row by row, and the loss equal an encoder applied to each view on its own."""
    torch.manual_seed(0)
    cfg = _cfg(teacher=False, ibot_weight=0.0, global_crops=2, low_res_share=0.5,
               low_res_size=14)
    m = build_method(cfg).eval()  # eval: no drop-path, running BN statistics in the head
    x = (torch.rand(6, 2, 1, 28, 28) * 255).to(torch.uint8)
    v = m.views(x, torch.Generator().manual_seed(3))
    hi, lo = v["low"]
    assert sorted(torch.cat([hi, lo]).tolist()) == list(range(24))  # each row once
    is_low = torch.zeros(24, dtype=torch.bool)
    is_low[lo] = True
    low = is_low.view(2, 6, 2)  # (global crop, group, image): view-major rows
    assert (low == low[:, :, :1]).all() and (low[0] == low[1]).all()  # whole groups, every crop
    assert int(low[0, :, 0].sum()) == 3
    with torch.no_grad():
        got = m._encode(m.encoder, v["global"], v["low"])
        rows = []
        for view, small in zip(v["global"], is_low.tolist()):
            view = view[None]
            if small:
                view = F.interpolate(view, size=(14, 14), mode="bilinear", antialias=True,
                                     align_corners=False)
            rows.append(m.encoder(view)[0])
        ref = torch.stack(rows)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        caption = torch.arange(6).repeat_interleave(2).repeat(2)
        q = m.head(ref)
        expected = multipos_query_key_loss(q, caption, q, caption, torch.arange(24),
                                           cfg.method.synclr.temperature)
        assert m.losses(v)["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    # without a low-resolution share every view is encoded at full size
    full = build_method(_cfg(teacher=False, ibot_weight=0.0, global_crops=2))
    assert full.views(x, torch.Generator().manual_seed(3))["low"] is None


def test_low_res_share_lowers_training_flops():
    from torch.utils.flop_counter import FlopCounterMode

    x = (torch.rand(8, 2, 1, 28, 28) * 255).to(torch.uint8)
    flops = {}
    for share in (0.0, 0.5):
        m = build_method(_cfg(teacher=False, ibot_weight=0.0, low_res_share=share))
        counter = FlopCounterMode(display=False)
        with counter:
            m({"images": x}, torch.Generator().manual_seed(0))["loss"].backward()
        flops[share] = counter.get_total_flops()
    # 14 px with 7 px patches: 4 tokens instead of 16, so half the groups cost about a quarter
    assert flops[0.5] < 0.7 * flops[0.0]


@pytest.mark.parametrize("share, groups, expected", [
    (0.5, 6, 3), (0.5, 5, 3), (0.5, 3, 2),  # half rounded up
    (0.25, 2, 1), (0.9, 4, 3),  # at least one group at each resolution
    (0.5, 1, 1), (0.4, 1, 0), (0.0, 8, 0),
])
def test_low_res_group_count(share, groups, expected):
    m = build_method(_cfg(teacher=False, ibot_weight=0.0, low_res_share=share))
    assert m.low_res_groups(groups) == expected


@pytest.mark.parametrize("changes,needle", [
    ({"low_res_share": 1.0}, "low_res_share must be in"),
    ({"low_res_share": 0.5, "low_res_size": 28}, "low_res_size=28 must be a multiple"),
    ({"low_res_share": 0.5, "low_res_size": 10}, "multiple of the patch size 7"),
    ({"low_res_share": 0.5}, "ibot_weight=0"),
])
def test_bad_low_res_settings_are_refused(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        build_method(_cfg(**changes))
    with pytest.raises(ConfigError, match="low_res_share is an option of method.s. synclr"):
        load_config(None, ["method.name=stablerep", "method.stablerep.low_res_share=0.5"])
    cnn = _cfg(teacher=False, ibot_weight=0.0, low_res_share=0.5)
    cnn.model.backbone = "resnet18_28"
    with pytest.raises(ConfigError, match="needs a ViT backbone"):
        build_method(cnn)


def test_ibot_refuses_a_convolutional_stem():
    cfg = _cfg()
    cfg.model.backbone = "vit_tiny_c7_28"
    with pytest.raises(ConfigError, match="across patch borders"):
        build_method(cfg)
    cfg.method.synclr.ibot_weight = 0.0
    build_method(cfg)  # the contrastive term alone is fine


def test_global_batchnorm_is_batchnorm_in_one_process():
    x = torch.randn(16, 8)
    a, b = GlobalBatchNorm1d(8), torch.nn.BatchNorm1d(8)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.running_var, b.running_var)


# -- two gloo processes against one -------------------------------------------------------------
GROUPS, M, STEPS = 4, 2, 3


def _rank_slice(t: torch.Tensor, n: int, rank: int, world: int) -> torch.Tensor:
    """Rows of a view-major (V*n, ...) tensor that belong to ``rank``'s images."""
    per = n // world
    return t.view(-1, n, *t.shape[1:])[:, rank * per : (rank + 1) * per].flatten(0, 1)


def _global_views(method, step):
    g = torch.Generator().manual_seed(100 + step)
    x = (torch.rand(GROUPS, M, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    return method.views(x, g)


def _sliced(v, rank, world):
    n = v["groups"] * v["m"]
    out = dict(v, groups=v["groups"] // world)
    for key in ("global", "local", "masks"):
        if v[key] is not None:
            out[key] = _rank_slice(v[key], n, rank, world)
    return out


def _train_steps(model, method, views_for_step):
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(STEPS):
        method.set_step(step)
        out = model({"views": views_for_step(step)}, None)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step()
        losses.append({k: float(v.detach()) for k, v in out.items()})
    return losses


def _cfg_dist() -> Config:
    return _cfg(local_crops=2, ibot_mask_prob=0.5, ema_momentum=0.9)


def _dist_synclr(rank, world, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    method = build_method(_cfg_dist())
    maker = build_method(_cfg_dist())  # draws the same global views as the single process
    model = DDP(method)
    losses = _train_steps(model, method,
                          lambda s: _sliced(_global_views(maker, s), rank, world))
    # the mean over ranks of each rank's loss is the global-batch loss
    mean_losses = []
    for row in losses:
        t = torch.tensor([row["loss"], row["contrastive"], row["ibot"]], dtype=torch.float64)
        dist.all_reduce(t)
        mean_losses.append((t / world).tolist())
    np.save(f"{out_dir}/losses{rank}.npy", np.array(mean_losses))
    torch.save({k: v.detach() for k, v in method.state_dict().items()},
               f"{out_dir}/state{rank}.pt")


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.set_num_threads(1)
    run_gloo(_dist_synclr, 2, str(tmp_path))
    method = build_method(_cfg_dist())
    maker = build_method(_cfg_dist())
    single = _train_steps(method, method, lambda s: _global_views(maker, s))
    expected = np.array([[r["loss"], r["contrastive"], r["ibot"]] for r in single])
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"losses{rank}.npy"), expected,
                                   rtol=1e-4, atol=1e-5)
    s0 = torch.load(tmp_path / "state0.pt")
    s1 = torch.load(tmp_path / "state1.pt")
    ref = method.state_dict()
    for name in ref:
        if "running_" in name or "num_batches" in name:
            continue
        # teacher, prototypes and student identical across ranks ...
        torch.testing.assert_close(s0[name], s1[name], rtol=0, atol=0, msg=name)
        # ... and equal to one process on the global batch
        torch.testing.assert_close(s0[name], ref[name], rtol=1e-3, atol=1e-4, msg=name)
    assert any(k.startswith("teacher.ibot_head.prototypes") for k in ref)


@pytest.mark.parametrize("name", ["synclr_vitb16", "synclr_vitl14", "stablerep_vitb16",
                                  "quickstart"])
def test_recipe_configs_build(name):
    """The paper recipes parse and build their method (on a small backbone, to stay fast)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    small = ([f"method.{m}.local_size=14", f"method.{m}.ibot_prototypes=64"]
             if (m := "stablerep" if name.startswith("stablerep") else "synclr") == "synclr"
             else [])
    cfg = load_config(path, ["model.backbone=vit_tiny_p7_28", "model.img_size=28", "aug.size=28",
                             *small, f"method.{m}.proj_hidden_dim=64"])
    method = build_method(cfg)
    assert method.batch_kind == "groups"
    full = load_config(path)
    assert full.data.source == "shards"
    if name != "quickstart":
        assert full.train.batch_size == 8192 and full.method.options.images_per_caption == 4
