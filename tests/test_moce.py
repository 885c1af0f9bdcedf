"""MoCE: k-means, cluster-conditional routing (one route per image), the balance losses against
hand-written values, expert search on constructed data, the dense export reproducing the routed
model, MoE blocks under 2 gloo processes, a tiny cluster -> train -> search -> eval run, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from synrep import cli
from synrep.cluster import kmeans, load_clusters, nearest
from synrep.config import Config
from synrep.errors import CheckpointError, ConfigError, DataError
from synrep.factory import load_encoder
from synrep.methods import mae as mae_module
from synrep.methods.moce import (
    MoCE,
    MoEMlp,
    dense_state,
    export_expert,
    importance_loss,
    load_loss,
    route_weights,
    search_experts,
)
from synrep.models import build_encoder
from tests._dist import run_gloo
from tests.conftest import TINY, needs_fashion

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**method) -> Config:
    cfg = Config()
    cfg.method.name = "moce"
    opts = cfg.method.moce
    opts.decoder_dim = 32
    opts.decoder_heads = 2
    opts.decoder_depth = 1
    opts.clusters = 6
    opts.experts = 3
    opts.blocks = 2
    for k, v in method.items():
        setattr(opts, k, v)
    return cfg


def _model(gate_dim: int = 8, seed: int = 0, **method) -> MoCE:
    cfg = _cfg(**method)
    torch.manual_seed(seed)
    model = MoCE(cfg, build_encoder(cfg.model), gate_dim=gate_dim)
    g = torch.Generator().manual_seed(seed + 1)
    model.centroids.copy_(torch.randn(cfg.method.moce.clusters, gate_dim, generator=g))
    return model.eval()


# --- k-means ---------------------------------------------------------------------------------

def test_kmeans_recovers_separated_blobs_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.arange(4).repeat_interleave(50)
    x = centres[truth] + 0.3 * torch.randn(200, 2, generator=g)
    c1, a1, inertia = kmeans(x, 4, iters=30, seed=3)
    c2, a2, _ = kmeans(x, 4, iters=30, seed=3)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    # The partition matches the truth up to a relabelling: every blob maps to one cluster.
    for k in range(4):
        assert len(set(a1[truth == k].tolist())) == 1
    assert len(set(a1.tolist())) == 4
    # Each centroid is the mean of its points; the inertia is the mean squared distance.
    for j in range(4):
        torch.testing.assert_close(c1[j], x[a1 == j].mean(0))
    ref = ((x - c1[a1]) ** 2).sum(1).mean()
    assert inertia == pytest.approx(float(ref), rel=1e-4)  # expanded-form distances
    torch.testing.assert_close(nearest(x, c1), a1)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ConfigError, match="clusters"):
        kmeans(torch.randn(3, 2), 5)


# --- routing and the balance losses ----------------------------------------------------------

def test_importance_and_load_losses_match_hand_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    imp = [1.6, 1.1, 1.3]
    mean = sum(imp) / 3
    var = sum((v - mean) ** 2 for v in imp) / 3
    assert float(importance_loss(p)) == pytest.approx(var / mean**2, rel=1e-6)
    # top experts: 0, 0, 2, 1 -> f = (1/2, 1/4, 1/4); P = column means.
    f = [0.5, 0.25, 0.25]
    pm = [1.6 / 4, 1.1 / 4, 1.3 / 4]
    assert float(load_loss(p)) == pytest.approx(3 * sum(a * b for a, b in zip(f, pm)), rel=1e-6)
    # Extremes: balanced uniform -> 0 and 1; one certain expert -> E - 1 and E.
    assert float(importance_loss(torch.full((6, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-9)
    one = torch.tensor([[1.0, 0.0, 0.0]]).repeat(5, 1)
    assert float(importance_loss(one)) == pytest.approx(2.0)
    assert float(load_loss(one)) == pytest.approx(3.0)


def test_top1_weight_is_exactly_one_with_the_gate_gradient():
    logits = torch.randn(5, 4, requires_grad=True)
    probs = logits.softmax(1)
    idx, w = route_weights(probs, 1)
    assert torch.equal(w, torch.ones(5, 1))
    assert torch.equal(idx[:, 0], probs.argmax(1))
    w.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    idx2, w2 = route_weights(probs.detach(), 2)
    torch.testing.assert_close(w2.sum(1), torch.ones(5))


def test_every_token_of_an_image_takes_the_same_route():
    torch.manual_seed(0)
    moe = MoEMlp(dim=16, hidden=32, num_experts=3, gate_dim=5, top_k=1)
    centroids = torch.randn(4, 5)
    clusters = torch.tensor([0, 1, 2, 3, 1, 0])
    probs = moe.gate_probs(centroids[clusters])
    # The gate reads the centroid only: images of one cluster get identical gate outputs.
    torch.testing.assert_close(probs[1], probs[4], rtol=0, atol=0)
    torch.testing.assert_close(probs[0], probs[5], rtol=0, atol=0)
    x = torch.randn(6, 7, 16)  # different content in every token
    out = moe(x, probs)
    top = probs.argmax(1)
    for b in range(6):
        ref = moe.experts[int(top[b])](x[b])  # every token through the image's one expert
        torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-6)


def test_moe_block_without_a_route_names_expert_search():
    moe = MoEMlp(dim=8, hidden=16, num_experts=2, gate_dim=3)
    with pytest.raises(ConfigError, match="expert search"):
        moe(torch.randn(2, 3, 8))


def _training_batch(model: MoCE, n: int) -> dict:
    """``n`` random images bound to clusters round-robin (the model's training assignment)."""
    model._assign = torch.arange(n) % model.cfg.method.moce.clusters
    return {"images": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8),
            "index": torch.arange(n)}


def test_moce_trains_every_part_and_logs_the_balance_terms():
    model = _model().train()
    batch = _training_batch(model, 12)
    out = model(batch, torch.Generator().manual_seed(0))
    assert set(out) >= {"loss", "recon", "importance", "load", "experts_used"}
    out["loss"].backward()
    for layer in model.moe_layers:
        assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
        # Experts no image chose still get a (zero) gradient, so DDP sees every parameter.
        assert all(p.grad is not None for p in layer.parameters())
    hand = model.importance_weight * out["importance"] + model.load_weight * out["load"]
    assert float(out["loss"].detach()) == pytest.approx(float(out["recon"] + hand), rel=1e-6)


def test_moce_trains_under_bf16_autocast():
    # train.precision=bf16 runs the experts in bf16 while the residual stream stays float32; the
    # routed sum must keep the tokens' dtype (it once failed in index_add).
    model = _model().train()
    batch = _training_batch(model, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for layer in model.moe_layers:
        assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    x = torch.randn(3, 5, model.moe_layers[0].experts[0].fc1.in_features)
    probs = model.moe_layers[0].gate_probs(torch.randn(3, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.moe_layers[0](x, probs)
    assert y.dtype == torch.float32


# --- expert search and the dense export ------------------------------------------------------

def test_search_picks_the_expert_of_the_matching_clusters():
    model = _model(gate_dim=4, clusters=4, experts=3)
    # Clusters 0, 1 ("shoes") sit near +e0, clusters 2, 3 ("shirts") near +e1; the gates send
    # shoes to expert 2 in both blocks and shirts to expert 0 (block 4) and 1 (block 5).
    model.centroids.copy_(torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0],
                                        [0, 1.0, 0, 0], [0.1, 0.9, 0, 0]]))
    with torch.no_grad():
        for layer, shirt in zip(model.moe_layers, (0, 1)):
            w = torch.zeros(3, 4)
            w[2, 0] = 20.0
            w[shirt, 1] = 20.0
            layer.gate.weight.copy_(w)
    g = torch.Generator().manual_seed(0)
    shoes = torch.tensor([1.0, 0.05, 0, 0]) + 0.02 * torch.randn(30, 4, generator=g)
    shirts = torch.tensor([0.05, 1.0, 0, 0]) + 0.02 * torch.randn(40, 4, generator=g)
    found = search_experts(model, shoes)
    assert found.chosen == [2, 2]
    assert found.counts.tolist() == [[0, 0, 30], [0, 0, 30]]
    assert found.cluster_hist[:2].sum() == 30
    assert search_experts(model, shirts).chosen == [0, 1]
    # A mixed downstream set keeps the majority's experts.
    assert search_experts(model, torch.cat([shoes, shirts[:10]])).chosen == [2, 2]
    with pytest.raises(ConfigError, match=r"method\.moce\.features"):
        search_experts(model, torch.randn(3, 7))


def test_search_picks_the_experts_that_trained_on_the_matching_cluster():
    """Train a MoCE model on two clusters of images (bright squares / dark stripes), count which
    expert of each MoE block every cluster's images went through during training, then search
    with downstream features from each cluster: the search must export those experts."""
    model = _model(gate_dim=4, clusters=2, experts=2, importance_weight=1.0,
                   load_weight=1.0).train()
    model.centroids.copy_(torch.eye(4)[:2])
    g = torch.Generator().manual_seed(0)
    bright = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    bright[:, :, 7:21, 7:21] = 230
    dark = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    dark[:, :, :, ::4] = 90
    images = torch.stack([bright, dark], 1).flatten(0, 1)  # cluster of image i: i % 2
    model._assign = torch.arange(8) % 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trained = torch.zeros(2, len(model.moe_layers), 2)  # (cluster, block, expert) images seen
    batch = {"images": images, "index": torch.arange(8)}
    for _ in range(30):
        with torch.no_grad():
            for b, p in enumerate(model.gate_probs(model._assign)):
                trained[:, b].index_add_(0, model._assign,
                                         torch.nn.functional.one_hot(p.argmax(1), 2).float())
        out = model(batch, g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    routes = [trained[c].argmax(1).tolist() for c in range(2)]
    assert routes[0] != routes[1]  # the balance terms gave the two clusters different experts
    for c in range(2):
        down = torch.eye(4)[c] + 0.05 * torch.randn(25, 4, generator=g)
        found = search_experts(model.eval(), down)
        assert found.chosen == routes[c]
        assert found.cluster_hist.tolist() == [25 if k == c else 0 for k in range(2)]


def _set_routes(model: MoCE, routes: dict[int, tuple[int, ...]]) -> None:
    """Gate weights sending cluster c (centroid on axis c) through ``routes[c]``: its standardised
    centroid is positive on axis c only, so a weight of 20 there wins the top-1."""
    experts, dims = model.moe_layers[0].gate.weight.shape
    with torch.no_grad():
        for b, layer in enumerate(model.moe_layers):
            w = torch.zeros(experts, dims)
            for cluster, route in routes.items():
                w[route[b], cluster] = 20.0
            layer.gate.weight.copy_(w)
            if layer.gate.bias is not None:
                layer.gate.bias.zero_()


def test_search_keeps_the_most_common_route_not_each_blocks_most_used_expert():
    model = _model(gate_dim=4, clusters=4, experts=3)
    model.centroids.copy_(torch.eye(4))  # cluster c sits on axis c
    # Routes (block 4, block 5): cluster 0 -> (0, 2), cluster 1 -> (1, 1), cluster 2 -> (0, 1),
    # cluster 3 -> (2, 0). With 30, 35, 20 and 5 images, block by block expert 0 (50 images) and
    # expert 1 (55) are the most used, but only cluster 2's 20 images ever took (0, 1); the most
    # common whole route is cluster 1's (1, 1).
    routes = {0: (0, 2), 1: (1, 1), 2: (0, 1), 3: (2, 0)}
    _set_routes(model, routes)
    top = [p.argmax(1).tolist() for p in model.gate_probs(torch.arange(4))]
    assert [tuple(r) for r in zip(*top)] == [routes[c] for c in range(4)]  # the gates as built
    g = torch.Generator().manual_seed(0)
    sizes = [30, 35, 20, 5]
    feats = torch.cat([torch.eye(4)[c] + 0.02 * torch.randn(n, 4, generator=g)
                       for c, n in enumerate(sizes)])
    found = search_experts(model, feats)
    assert found.counts.tolist() == [[50, 35, 5], [5, 55, 30]]
    assert found.chosen == [1, 1]
    assert found.route_share == pytest.approx(35 / 90)
    # Two clusters on one route pool their images: clusters 0 and 3 both on (0, 2) now win.
    routes[3] = (0, 2)
    _set_routes(model, routes)
    feats = torch.cat([feats, torch.eye(4)[3] + 0.02 * torch.randn(10, 4, generator=g)])
    found = search_experts(model, feats)
    assert found.chosen == [0, 2] and found.route_share == pytest.approx(45 / 100)


def test_exported_dense_vit_equals_the_routed_moce(tmp_path):
    model = _model(seed=3)
    x = torch.rand(5, 1, 28, 28)
    k = model.cfg.method.moce.clusters
    for cluster in range(k):
        chosen = [int(p[0].argmax()) for p in model.gate_probs(torch.tensor([cluster]))]
        routed = model.encode_tokens(x, torch.full((5,), cluster))
        dense = build_encoder(model.cfg.model)
        enc = {n[len("encoder."):]: v for n, v in dense_state(model, chosen).items()
               if n.startswith("encoder.")}
        dense.load_state_dict(enc, strict=True)
        torch.testing.assert_close(dense.eval().tokens(x), routed, rtol=0, atol=1e-6)
    # Through the checkpoint: an ordinary MAE checkpoint that evaluation reads.
    path = export_expert(model, chosen, tmp_path / "expert.safetensors")
    encoder, cfg = load_encoder(path)
    assert cfg.method.name == "mae"
    torch.testing.assert_close(encoder.tokens(x), routed, rtol=0, atol=1e-6)
    n_dense = sum(v.numel() for v in build_encoder(model.cfg.model).state_dict().values())
    assert sum(v.numel() for v in encoder.state_dict().values()) == n_dense


def _mae_checkpoint(tmp_path, seed: int = 5, **method):
    """A dense MAE of the tiny test config saved as a checkpoint (random weights)."""
    from synrep.checkpoint import save_checkpoint
    from synrep.methods.mae import MAE

    moce = _cfg(**method)
    cfg = _cfg(**method)
    cfg.method.name = "mae"
    for f in dataclasses.fields(cfg.method.mae):  # the same decoder and masking
        setattr(cfg.method.mae, f.name, getattr(moce.method.moce, f.name))
    torch.manual_seed(seed)
    mae = MAE(cfg, build_encoder(cfg.model))
    return mae, save_checkpoint(tmp_path / "mae.safetensors", mae, json.loads(cfg.to_json()),
                                step=10)


def test_upcycled_moce_starts_as_the_dense_mae_on_every_route(tmp_path):
    mae, path = _mae_checkpoint(tmp_path)
    model = _model(seed=1, init=str(path))  # other random weights, then upcycled
    x = torch.rand(4, 1, 28, 28)
    dense = mae.encoder.eval().tokens(x)
    for cluster in range(model.cfg.method.moce.clusters):
        routed = model.encode_tokens(x, torch.full((4,), cluster))
        torch.testing.assert_close(routed, dense, rtol=0, atol=1e-6)
    for layer, i in zip(model.moe_layers, model.moe_indices):
        w = mae.encoder.backbone.blocks[i].mlp.fc1.weight
        assert all(torch.equal(e.fc1.weight, w) for e in layer.experts)
        assert not any(e.fc1.weight is w for e in layer.experts)  # copies, trained apart
    decoder = {k: v for k, v in mae.state_dict().items() if not k.startswith("encoder.")}
    for k, v in decoder.items():
        assert torch.equal(model.state_dict()[k], v), k
    # The gates are MoCE's own (the checkpoint has none), so routes still differ by cluster.
    fresh = _model(seed=1)
    for a, b in zip(model.moe_layers, fresh.moe_layers):
        assert torch.equal(a.gate.weight, b.gate.weight)


def test_upcycling_rejects_a_checkpoint_that_does_not_fit(tmp_path):
    _, path = _mae_checkpoint(tmp_path, decoder_dim=16)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        _model(init=str(path))
    moce_path = export_expert(_model(), [0, 0], tmp_path / "x.safetensors")
    from synrep.checkpoint import Checkpoint, save_checkpoint

    ck = Checkpoint(moce_path)
    cfg = dict(ck.config, method=dict(ck.config["method"], name="moce"))
    other = save_checkpoint(tmp_path / "moce.safetensors", ck.model_state, cfg, step=1)
    with pytest.raises(CheckpointError, match="upcycles a dense MAE"):
        _model(init=str(other))


# --- distributed -----------------------------------------------------------------------------

def _moe_steps(moe: MoEMlp, x, route, target, steps: int = 3):
    from synrep import dist as sdist

    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    for _ in range(steps):
        probs = (moe.module if hasattr(moe, "module") else moe).gate_probs(route)
        out = moe(x, probs)
        pg = sdist.gather_with_grad(probs)
        loss = (out - target).pow(2).mean() + 0.5 * importance_loss(pg) + 0.5 * load_loss(pg)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(8, 5, 16, generator=g), torch.randn(8, 6, generator=g),
            torch.randn(8, 5, 16, generator=g))


def _fresh_moe() -> MoEMlp:
    torch.manual_seed(0)
    return MoEMlp(dim=16, hidden=24, num_experts=4, gate_dim=6, top_k=1)


def _ddp_worker(rank: int, world: int, out_path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    x, route, target = _data()
    sl = slice(rank * 4, (rank + 1) * 4)
    moe = DDP(_fresh_moe())
    _moe_steps(moe, x[sl], route[sl], target[sl])
    if rank == 0:
        torch.save({k: v.detach() for k, v in moe.module.state_dict().items()}, out_path)


def test_moe_blocks_train_the_same_under_two_gloo_processes(tmp_path):
    x, route, target = _data()
    single = _fresh_moe()
    _moe_steps(single, x, route, target)
    out = tmp_path / "ddp.pt"
    run_gloo(_ddp_worker, 2, str(out))
    ddp = torch.load(out)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ddp["gate.weight"], _fresh_moe().gate.weight.detach())


# The whole MoCE model (routing by cluster, attention, decoder, gathered balance terms) under
# DDP. Augmentation and masking are random per batch, so one process on 8 images and two on 4
# each would draw differently: here each image keeps its own fixed mask and un-augmented view.
_MASK_NOISE = torch.rand(8, 16, generator=torch.Generator().manual_seed(3))  # 8 images, 16 patches
_BATCH_INDEX: list[torch.Tensor] = []


def _fixed_masks(x, ratio, g, _orig=mae_module.random_masking):
    return _orig(x, ratio, g, noise=_MASK_NOISE[_BATCH_INDEX[-1]])


def _moce_steps(model, batch, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        _BATCH_INDEX.append(batch["index"])
        out = model(batch, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()


def _moce_for_ddp() -> MoCE:
    model = _model().train()
    _training_batch(model, 8)  # binds images 0..7 to clusters round-robin
    model.augment = lambda x, g: x.float() / 255.0
    return model


def _moce_batch() -> dict:
    g = torch.Generator().manual_seed(4)
    return {"images": torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=g),
            "index": torch.arange(8)}


def _moce_ddp_worker(rank: int, world: int, out_path: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    mae_module.random_masking = _fixed_masks
    model = _moce_for_ddp()
    batch = {k: v[rank * 4:(rank + 1) * 4] for k, v in _moce_batch().items()}
    _moce_steps(DDP(model), batch)
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out_path)


def test_moce_model_trains_the_same_under_two_gloo_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(mae_module, "random_masking", _fixed_masks)
    single = _moce_for_ddp()
    start = {k: v.clone() for k, v in single.state_dict().items()}
    _moce_steps(single, _moce_batch())
    out = tmp_path / "ddp.pt"
    run_gloo(_moce_ddp_worker, 2, str(out))
    ddp = torch.load(out)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-6, msg=k)
    gates = [k for k in start if ".mlp.gate." in k]
    experts = [k for k in start if ".mlp.experts." in k]
    assert gates and experts
    assert all(not torch.equal(start[k], ddp[k]) for k in gates)  # the gates trained
    assert sum(not torch.equal(start[k], ddp[k]) for k in experts) > len(experts) // 2


# --- errors ----------------------------------------------------------------------------------

def test_bad_settings_and_files_get_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="method.moce.blocks"):
        _model(blocks=9)
    with pytest.raises(ConfigError, match="method.moce.experts"):
        _model(experts=1)
    with pytest.raises(ConfigError, match="method.moce.top_k"):
        _model(top_k=5)
    with pytest.raises(ConfigError, match="cluster stage"):
        load_clusters(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(DataError, match="cluster stage"):
        load_clusters(bad)
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="rerun the cluster stage"):
        load_clusters(bad)


def test_cli_cluster_without_features_names_the_key(tmp_path, capsys):
    code = cli.main(["cluster", "configs/moce_fashion.yaml", f"run.dir={tmp_path}",
                     "method.moce.features="])
    assert code == 2
    err = capsys.readouterr().err
    assert "method.moce.features" in err and "Traceback" not in err


@needs_fashion
def test_cluster_train_search_eval_end_to_end(tmp_path):
    small = [*TINY, "run.threads=1", "data.classes=[5,9]"]
    mae_dir = tmp_path / "mae"
    assert cli.main(["run", "configs/mae_fashion.yaml", *small, "train.steps=2",
                     "run.stages=[train]", f"run.dir={mae_dir}"]) == 0
    feats = mae_dir / "train" / "checkpoints" / "final.safetensors"
    run = tmp_path / "moce"
    args = ["run", "configs/moce_fashion.yaml", *small, "train.steps=3", f"run.dir={run}",
            f"method.moce.features={feats}", "method.moce.clusters=4",
            "eval.classes=[5,9]", "eval.protocols=[linear]"]
    assert cli.main(args) == 0
    centroids, assign, meta = load_clusters(run / "cluster" / "clusters.safetensors")
    assert centroids.shape == (4, 192) and assign.shape == (12000,)
    assert sum(meta["sizes"]) == 12000
    rows = [json.loads(r) for r in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all({"importance", "load", "recon"} <= set(r) for r in rows)
    search = json.loads((run / "search" / "search.json").read_text())
    assert search["blocks"] == [4, 5] and len(search["chosen"]) == 2
    assert sum(search["counts"][0]) == 1000  # eval.limit_train images of classes 5 and 9
    # The kept route is the one most images take: at least as many as any single route.
    assert 1 / 4 ** 2 <= search["route_share"] <= 1.0
    assert all(search["counts"][b][e] >= search["route_share"] * 1000
               for b, e in enumerate(search["chosen"]))
    results = json.loads((run / "eval" / "results.json").read_text())
    entry = results["fashion-mnist[5,9]"]
    assert entry["checkpoint"].endswith("search/expert.safetensors")
    assert 50.0 < entry["linear_probe_top1"] <= 100.0  # two classes: chance is 50 %
    # A second run skips every completed stage; a MoCE checkpoint is refused by plain eval.
    assert cli.main(args) == 0
    with pytest.raises(ConfigError, match="expert search"):
        load_encoder(run / "train" / "checkpoints" / "final.safetensors")
    # Training against clusters of other data is refused with the fix.
    assert cli.main([*args[:-2], "data.classes=[5]", "run.stages=[train]",
                     f"run.dir={tmp_path / 'other'}",
                     f"method.moce.cluster_file={run / 'cluster' / 'clusters.safetensors'}"]) == 2


def test_search_with_top_k_above_one_is_refused_before_training(tmp_path, capsys):
    # the exported single-expert ViT equals the routed model only at top-1; the run refuses
    # before any stage, rather than after training
    run = tmp_path / "topk"
    code = cli.main(["run", "configs/moce_fashion.yaml", *TINY, f"run.dir={run}",
                     "method.moce.top_k=2", "run.stages=[train,search]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "method.moce.top_k=1" in err and "Traceback" not in err
    assert not (run / "train").exists()
    code = cli.main(["search", "configs/moce_fashion.yaml", *TINY, f"run.dir={run}",
                     "method.moce.top_k=2"])
    assert code == 2 and "method.moce.top_k=1" in capsys.readouterr().err
