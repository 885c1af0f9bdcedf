"""Backbones from the registry and the batched augmentations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synrep.config import AugConfig
from synrep.data.augment import BatchAugment, MultiCrop, _gaussian_blur
from synrep.errors import ConfigError
from synrep.models import build_backbone, build_encoder
from synrep.models.backbones import Encoder

SMALL = ["vit_tiny_p7_28", "vit_small_p7_28", "vit_tiny_p4_28", "vit_tiny_c7_28", "resnet18_28"]


@pytest.mark.parametrize("name", SMALL)
def test_small_backbones_forward_backward_every_parameter(name):
    torch.manual_seed(0)
    enc = Encoder(build_backbone(name, in_chans=1, img_size=28))
    for m in enc.modules():  # timm zero-initialises the last norm of residual blocks
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    x = torch.rand(4, 1, 28, 28)
    out = enc(x)
    assert out.shape == (4, enc.embed_dim) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("pool, n, mult", [("cls", 1, 1), ("avg", 2, 2), ("cls+avg", 4, 8)])
def test_vit_probe_features(pool, n, mult):
    enc = Encoder(build_backbone("vit_tiny_p7_28", 1, 28)).eval()
    x = torch.rand(3, 1, 28, 28)
    feats = enc.probe_features(x, pool, n)
    assert feats.shape == (3, 192 * mult) == (3, enc.probe_dim(pool, n))
    if pool == "cls":  # the last block's CLS after the final norm is the pooled feature
        torch.testing.assert_close(feats, enc(x))


def test_any_timm_model_by_name_and_unknown_names():
    enc = Encoder(build_backbone("timm:resnet10t", in_chans=3, img_size=32))
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, enc.embed_dim)
    with pytest.raises(ConfigError, match="timm has no model"):
        build_backbone("timm:not_a_model", 1, 28)
    with pytest.raises(ConfigError, match="unknown backbone 'vit_huge'.*vit_tiny_p7_28"):
        build_backbone("vit_huge", 1, 28)
    with pytest.raises(ConfigError, match="multiple of the patch"):
        build_backbone("vit_tiny_p7_28", 1, 30)


def test_paper_vit_b16_builds_at_224():
    from synrep.config import ModelConfig

    enc = build_encoder(ModelConfig(backbone="vit_base_patch16_224", in_chans=3, img_size=224))
    assert enc.embed_dim == 768
    assert 85e6 < sum(p.numel() for p in enc.parameters()) < 87e6


def _plain(**kw) -> AugConfig:
    base = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, grayscale_p=0.0,
                blur_p=0.0, solarize_p=0.0, erase_p=0.0)
    return AugConfig(**{**base, **kw})


def test_identity_flip_and_determinism():
    x = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(BatchAugment(_plain())(x, g), x.float() / 255, atol=1e-5, rtol=0)
    flipped = BatchAugment(_plain(hflip=1.0))(x, g)
    torch.testing.assert_close(flipped, x.float().flip(-1) / 255, atol=1e-5, rtol=0)
    aug = BatchAugment(AugConfig(blur_p=0.5, solarize_p=0.2, erase_p=0.5))
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 3, 28, 28) and 0 <= a.min() and a.max() <= 1


def test_each_image_gets_its_own_crop():
    x = torch.rand(1, 1, 28, 28).expand(64, -1, -1, -1)
    out = BatchAugment(_plain(scale=(0.2, 1.0)))(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) == 64


def test_brightness_is_a_per_image_scale():
    x = 0.25 + torch.rand(8, 1, 28, 28) * 0.25
    out = BatchAugment(_plain(jitter_p=1.0, brightness=0.4, contrast=0.0))(
        x, torch.Generator().manual_seed(0))
    ratio = out / x
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-4)
    assert ((per_image[:, 0] >= 0.6 - 1e-5) & (per_image[:, 0] <= 1.4 + 1e-5)).all()


def test_blur_matches_convolution_with_reflect_padding():
    x = torch.rand(3, 2, 40, 40)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    out = _gaussian_blur(x, sigma)
    k = 5  # 10 % of the 40 px side, odd
    for i in range(3):
        r = torch.arange(k) - k // 2
        ker = torch.exp(-(r.float() ** 2) / (2 * sigma[i] ** 2))
        ker = ker / ker.sum()
        ref = F.conv2d(F.pad(x[i : i + 1], (2, 2, 2, 2), mode="reflect"),
                       (ker[:, None] * ker[None]).expand(2, 1, k, k), groups=2)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_multicrop_sizes():
    mc = MultiCrop(AugConfig(size=28), AugConfig(size=14, scale=(0.1, 0.4)), 2, 3)
    views = mc(torch.rand(4, 1, 28, 28), torch.Generator().manual_seed(0))
    assert [v.shape[-1] for v in views] == [28, 28, 14, 14, 14]


def test_bad_aug_config():
    with pytest.raises(ValueError, match="aug.scale"):
        BatchAugment(AugConfig(scale=(0.5, 0.2)))


def test_sharpen_is_unsharp_masking():
    x = 0.2 + torch.rand(4, 1, 28, 28) * 0.6
    g = torch.Generator().manual_seed(0)
    out = BatchAugment(_plain(sharpen_p=1.0, sharpen_amount=(0.5, 0.5), sharpen_sigma=1.0))(x, g)
    expected = (x + 0.5 * (x - _gaussian_blur(x, torch.full((4,), 1.0)))).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    none = BatchAugment(_plain(sharpen_p=1.0, sharpen_amount=(0.0, 0.0)))(x, g)
    torch.testing.assert_close(none, x, atol=1e-5, rtol=0)


def test_noise_has_the_configured_std():
    x = torch.full((16, 1, 28, 28), 0.5)
    out = BatchAugment(_plain(noise_p=1.0, noise_std=0.05))(x, torch.Generator().manual_seed(0))
    assert (out - x).std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(BatchAugment(_plain(noise_p=0.0))(x, torch.Generator()), x)


def test_conv_stem_tokens_see_two_pixels_past_their_patch():
    """Patch tokens of vit_tiny_c7_28 depend on pixels up to 2 px outside their 7 px patch (two
    3x3 convolutions), and on no others; plain patch embeddings only on their own patch."""
    torch.manual_seed(0)
    for name, reach in (("vit_tiny_c7_28", 2), ("vit_tiny_p7_28", 0)):
        embed = build_backbone(name, 1, 28).patch_embed
        x = torch.rand(1, 1, 28, 28)
        base = embed(x)  # (1, 4, 4, D): token (0, 0) covers pixels 0-6
        for col, changes in ((6 + reach, True), (7 + reach, False)):
            y = x.clone()
            y[..., 3, col] += 1.0
            moved = not torch.allclose(embed(y)[0, 0, 0], base[0, 0, 0], atol=1e-6)
            assert moved == changes, (name, col)


def test_masked_autoencoders_refuse_a_convolutional_stem():
    from synrep.config import Config
    from synrep.errors import ConfigError
    from synrep.factory import build_method

    cfg = Config()
    cfg.method.name = "mae"
    cfg.model.backbone = "vit_tiny_c7_28"
    with pytest.raises(ConfigError, match="across patch borders"):
        build_method(cfg)


def test_patch_drop_keeps_a_random_share_of_tokens_in_training_only():
    """model.patch_drop: in training each image keeps 1 - x of its patch tokens (and its CLS
    token), a different subset per image and per seed; in evaluation every token; the step's
    FLOPs fall with the tokens; a non-ViT backbone is refused."""
    from torch.utils.flop_counter import FlopCounterMode

    from synrep.config import ModelConfig

    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(patch_drop=0.5))
    x = torch.rand(8, 1, 28, 28)
    enc.train()
    torch.manual_seed(1)
    a = enc.tokens(x)
    torch.manual_seed(1)
    b = enc.tokens(x)
    torch.manual_seed(2)
    c = enc.tokens(x)
    assert a.shape == (8, 1 + 8, 192)  # 16 patches, half kept
    assert torch.equal(a, b) and not torch.equal(a, c)
    enc.eval()
    assert enc.tokens(x).shape == (8, 17, 192)

    def flops(model_cfg: ModelConfig) -> int:
        torch.manual_seed(0)
        e = build_encoder(model_cfg).train()
        with FlopCounterMode(display=False) as fc:
            e(x).sum().backward()
        return fc.get_total_flops()

    ratio = flops(ModelConfig(patch_drop=0.5)) / flops(ModelConfig())
    assert 0.45 < ratio < 0.6, ratio
    with pytest.raises(ConfigError, match="is not a ViT"):
        build_encoder(ModelConfig(backbone="resnet18_28", patch_drop=0.5))


@pytest.mark.parametrize("name,chans,size", [("vit_tiny_p7_28", 1, 28),
                                             ("timm:vit_tiny_patch16_224", 3, 64)])
def test_patch_projection_is_the_convolution_forward_and_backward(name, chans, size):
    from synrep.models.backbones import PatchProjection

    proj = build_backbone(name, chans, size).patch_embed.proj
    assert type(proj) is PatchProjection
    conv = torch.nn.Conv2d(proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride)
    conv.load_state_dict(proj.state_dict())  # the same keys and shapes as timm's convolution
    x = torch.rand(6, chans, size, size, generator=torch.Generator().manual_seed(0))
    out, ref = proj(x), conv(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(proj.weight.grad, conv.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(proj.bias.grad, conv.bias.grad, atol=1e-4, rtol=1e-5)
    # an input the patches do not tile takes the convolution itself (which floors the grid)
    odd = torch.rand(2, chans, size + 3, size + 3)
    torch.testing.assert_close(proj(odd), conv(odd), atol=1e-5, rtol=1e-5)
