"""PCA maps of patch features: numbers against numpy's SVD, cluster properties, the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from synrep.config import ModelConfig
from synrep.eval.pca import patch_features, pca_maps, pca_rgb, save_pca_figure
from synrep.models import Encoder, build_encoder

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest


def _numpy_pca_rgb(x: np.ndarray) -> np.ndarray:
    """Reference: SVD of the centred rows, axes signed by their largest |loading|, min-max."""
    c = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    axes = vt[:3]  # (3, D)
    axes = axes * np.sign(axes[np.arange(3), np.abs(axes).argmax(axis=1)])[:, None]
    z = c @ axes.T
    return (z - z.min(axis=0)) / (z.max(axis=0) - z.min(axis=0))


def _clusters(n_per: int, centres: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + noise * rng.standard_normal((n_per, len(c))) for c in centres])


def test_pca_rgb_matches_numpy_svd():
    rng = np.random.default_rng(0)
    # Anisotropic data so the top three components are well separated in variance.
    x = rng.standard_normal((5 * 4 * 4, 16)) * np.linspace(4.0, 0.2, 16) + rng.standard_normal(16)
    feats = torch.from_numpy(x).float().reshape(5, 4, 4, 16)
    got = pca_rgb(feats)
    assert got.shape == (5, 4, 4, 3) and got.dtype == torch.float32
    want = _numpy_pca_rgb(feats.double().reshape(-1, 16).numpy())
    np.testing.assert_allclose(got.reshape(-1, 3).numpy(), want, atol=1e-5)
    # Each channel spans exactly [0, 1].
    assert torch.allclose(got.flatten(0, 2).amin(0), torch.zeros(3))
    assert torch.allclose(got.flatten(0, 2).amax(0), torch.ones(3))
    # Deterministic. The signs belong to the axes, not the data: negated features get the same
    # axes, hence negated projections, hence inverted maps.
    assert torch.equal(pca_rgb(feats), got)
    torch.testing.assert_close(pca_rgb(-feats), 1 - got, atol=1e-5, rtol=0)


def test_pca_rgb_separates_clusters():
    centres = 10.0 * np.eye(3, 8)  # three clusters far apart in 8-d
    x = _clusters(32, centres, noise=0.1, seed=1)  # (96, 8): cluster k at rows 32k..32k+31
    rgb = pca_rgb(torch.from_numpy(x).float().reshape(6, 4, 4, 8)).reshape(3, 32, 3)
    # Three centres span a plane, so the first two components carry the clusters and the third
    # is within-cluster noise (min-max scaled to full range): compare colours on the first two.
    rg = rgb[..., :2]
    means = rg.mean(dim=1)  # (3 clusters, 2)
    spread = (rg - means[:, None]).norm(dim=2).max()
    gaps = torch.cdist(means, means) + 1e9 * torch.eye(3)
    # Patches of one cluster share a colour; colours of different clusters are far apart.
    assert spread < 0.1
    assert gaps.min() > 0.5


def test_foreground_threshold_blacks_out_background():
    # Background: one big tight cluster far away along dimension 0; foreground: two clusters that
    # differ along dimension 1 (and a little in 2, 3 so three components exist).
    rng = np.random.default_rng(2)
    bg = np.zeros((64, 6))
    bg[:, 0] = -20.0
    fg_a, fg_b = np.zeros((16, 6)), np.zeros((16, 6))
    fg_a[:, 1], fg_b[:, 1] = 3.0, -3.0
    x = np.concatenate([bg, fg_a, fg_b]) + 0.05 * rng.standard_normal((96, 6))
    feats = torch.from_numpy(x).float().reshape(6, 4, 4, 6)
    # The first axis loads mostly (positively, by the sign convention) on dimension 0, where the
    # background sits low: it scales to ~0 and the foreground to ~1.
    rgb = pca_rgb(feats, foreground_threshold=0.5).reshape(96, 3)
    assert torch.equal(rgb[:64], torch.zeros(64, 3))
    fg = rgb[64:]
    # Refitted on the foreground alone, the first component now splits its two clusters.
    assert fg[:16, 0].min() > 0.9 or fg[:16, 0].max() < 0.1
    assert (fg[:16, 0].mean() - fg[16:, 0].mean()).abs() > 0.8
    # And the foreground maps equal a PCA fitted on the foreground patches only.
    want = _numpy_pca_rgb(feats.double().reshape(96, 6)[64:].numpy())
    np.testing.assert_allclose(fg.numpy(), want, atol=1e-5)


def _tiny_vit() -> Encoder:
    torch.manual_seed(0)
    return build_encoder(ModelConfig(backbone="vit_tiny_p7_28", img_size=28, in_chans=1))


def test_patch_features_are_the_last_block_patch_tokens():
    enc = _tiny_vit()
    enc.train()
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    feats = patch_features(enc, images, batch_size=2)
    assert feats.shape == (5, 4, 4, enc.embed_dim)
    assert enc.training  # the training flag is restored
    # Independently: timm's intermediates API, last block, final norm, NCHW layout.
    enc.eval()
    with torch.no_grad():
        (want,) = enc.backbone.forward_intermediates(
            enc.normalize(images.float() / 255.0),
            indices=1,
            norm=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
    torch.testing.assert_close(feats, want.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    maps = pca_maps(enc, images, batch_size=3)
    torch.testing.assert_close(maps, pca_rgb(feats))


def test_save_pca_figure(tmp_path):
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    maps = torch.rand(5, 4, 4, 3)
    path = save_pca_figure(images, maps, tmp_path / "sub" / "pca.png", columns=3, scale=2)
    assert path == tmp_path / "sub" / "pca.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["pca.png"]  # no temporary left
    with Image.open(path) as img:
        assert img.mode == "RGB"
        # 2 rows x 3 pairs, pairs 56 px wide, 2 px gaps, all enlarged 2x.
        assert img.size == ((3 * 56 + 2 * 2) * 2, (2 * 28 + 2) * 2)
        arr = np.asarray(img)
    # Pair 4 (row 1, column 1): the gray image as RGB, then its map upsampled 7x.
    top, left = (28 + 2) * 2, (56 + 2) * 2
    gray = images[4, 0].repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()
    assert (arr[top : top + 56, left : left + 56] == gray[:, :, None]).all()
    m = (maps[4] * 255).round().to(torch.uint8).repeat_interleave(14, 0).repeat_interleave(14, 1)
    assert (arr[top : top + 56, left + 56 : left + 112] == m.numpy()).all()
    # The unused sixth cell is white background.
    assert (arr[top:, (2 * 58) * 2 :] == 255).all()


def test_save_pca_figure_rgb(tmp_path):
    images = torch.randint(0, 256, (2, 3, 14, 14), dtype=torch.uint8)
    path = save_pca_figure(images, torch.zeros(2, 2, 2, 3), tmp_path / "rgb.png", scale=1)
    with Image.open(path) as img:
        arr = np.asarray(img)
    assert arr.shape == (14, 2 * 28 + 2, 3)
    assert (arr[:, :14] == images[0].permute(1, 2, 0).numpy()).all()
    assert (arr[:, 14:28] == 0).all()


def test_bad_inputs():
    enc = _tiny_vit()
    u8 = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="ViT"):
        cnn = Encoder(build_encoder(ModelConfig(backbone="resnet18_28")).backbone)
        patch_features(cnn, u8)
    with pytest.raises(ValueError, match="uint8"):
        patch_features(enc, u8.float())
    with pytest.raises(ValueError, match="empty"):
        patch_features(enc, u8[:0])
    with pytest.raises(ValueError, match="multiple of the patch"):
        patch_features(enc, torch.zeros(1, 1, 30, 30, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch_size"):
        patch_features(enc, u8, batch_size=0)
    with pytest.raises(ValueError, match="on cpu"):
        patch_features(enc, u8, device="meta")
    with pytest.raises(ValueError, match=r"\[N, h, w, D\]"):
        pca_rgb(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="D >= 3"):
        pca_rgb(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        pca_rgb(torch.full((1, 2, 2, 4), float("nan")))
    with pytest.raises(ValueError, match="foreground_threshold"):
        pca_rgb(torch.rand(1, 2, 2, 4), foreground_threshold=1.5)
    with pytest.raises(ValueError, match="one per image"):
        save_pca_figure(u8, torch.zeros(3, 4, 4, 3), "x.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_pca_figure(u8, torch.full((2, 4, 4, 3), 2.0), "x.png")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        save_pca_figure(u8.expand(-1, 2, -1, -1), torch.zeros(2, 4, 4, 3), "x.png")
    with pytest.raises(ValueError, match=".png"):
        save_pca_figure(u8, torch.zeros(2, 4, 4, 3), "x.jpg")
    with pytest.raises(ValueError, match="columns"):
        save_pca_figure(u8, torch.zeros(2, 4, 4, 3), "x.png", columns=0)


def test_rank_deficient_features_give_zero_channels():
    # Features spanning only two directions: the third component is rounding noise, shown as 0.
    base = torch.randn(2, 4, 4, 2, generator=torch.Generator().manual_seed(0))
    feats = (
        torch.cat([base, torch.zeros(2, 4, 4, 6)], dim=-1)
        @ torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))[0]
    )
    rgb = pca_rgb(feats)
    assert torch.equal(rgb[..., 2], torch.zeros(2, 4, 4))
    assert rgb[..., :2].amax() == 1.0
