"""SimCLR-strong augmentation and multi-crop, applied to whole batches on the training device.

Per-sample PIL pipelines dominate the step time of small models on CPUs and starve GPUs at scale;
here every transform is one batched tensor op driven by per-sample random parameters:
random resized crop and flip as one affine ``grid_sample``; colour jitter, grayscale, Gaussian blur,
solarisation and random erasing as masked tensor arithmetic. The randomness comes from an explicit
``torch.Generator``, so a batch's views are a pure function of (seed, step): resuming a run
reproduces them exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from synrep.config import AugConfig

_LUMA = (0.299, 0.587, 0.114)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float (B, C, H, W) -> (B, C, size, size), bilinear with antialiasing (a no-op at size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _gray(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H, W)
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's blend: f * a + (1 - f) * b, clamped; f is (B,)."""
    return (f.view(-1, 1, 1, 1) * a + (1 - f.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def _rotate_hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate hue by h * 2pi (h in [-0.5, 0.5]) in YIQ space: a linear map per image."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype)
    rgb = torch.linalg.inv(yiq)
    c, s = torch.cos(h * 2 * math.pi), torch.sin(h * 2 * math.pi)
    rot = torch.zeros(h.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = rgb @ rot @ yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def _reflect_index(n: int, k: int, device) -> torch.Tensor:
    """(n, k) source index of tap t for output i under reflect padding: i + t - k//2 mirrored."""
    idx = torch.arange(n, device=device)[:, None] + torch.arange(k, device=device)[None] - k // 2
    idx = idx.abs()
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx)


def _blur_matrix(sigma: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per-image (B, n, n) matrix M with (M @ v) = v blurred by a Gaussian of width sigma."""
    r = torch.arange(k, device=sigma.device, dtype=sigma.dtype) - k // 2
    ker = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    ker = ker / ker.sum(dim=1, keepdim=True)  # (B, k)
    idx = _reflect_index(n, k, sigma.device)  # (n, k)
    m = torch.zeros(sigma.shape[0], n, n, device=sigma.device, dtype=sigma.dtype)
    src = ker[:, None, :].expand(-1, n, -1)
    return m.scatter_add_(2, idx[None].expand(sigma.shape[0], -1, -1), src)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (pixels), kernel ~10% of the image side,
    reflect padding. Done as two batched matmuls with banded matrices: far faster on CPU than a
    grouped convolution with one group per image."""
    b, c, h, w = x.shape
    k = min(max(3, int(0.1 * min(h, w)) // 2 * 2 + 1), 2 * min(h, w) - 1)
    mh = _blur_matrix(sigma, h, k)[:, None]  # (B, 1, H, H)
    mw = _blur_matrix(sigma, w, k)[:, None]  # (B, 1, W, W)
    return mh @ x @ mw.transpose(-1, -2)


class BatchAugment:
    """One augmented view of every image in a batch.

    Call with ``x`` uint8 or float in [0, 1], shape (B, C, H, W), and a generator on ``x``'s
    device; returns float (B, C, size, size) in [0, 1].
    """

    def __init__(self, cfg: AugConfig) -> None:
        lo, hi = cfg.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"aug.scale must satisfy 0 < lo <= hi <= 1, got {cfg.scale}")
        if cfg.size < 1:
            raise ValueError(f"aug.size must be positive, got {cfg.size}")
        self.cfg = cfg

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        b, c, dev = x.shape[0], x.shape[1], x.device

        # Random resized crop + horizontal flip: one affine grid per image. Crop side lengths are
        # fractions of the image (area scale s, aspect ratio r), the centre keeps it inside.
        area = _uniform(g, b, *cfg.scale, dev)
        log_r = _uniform(g, b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), dev)
        ratio = torch.exp(log_r)
        cw = torch.sqrt(area * ratio).clamp(max=1.0)
        ch = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - cw)
        cy = (torch.rand(b, generator=g, device=dev) * 2 - 1) * (1 - ch)
        flip = torch.where(torch.rand(b, generator=g, device=dev) < cfg.hflip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = ch, cy
        grid = F.affine_grid(theta, [b, c, cfg.size, cfg.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)

        # Colour jitter (applied with probability jitter_p; fixed order b, c, s, h).
        jit = torch.rand(b, generator=g, device=dev) < cfg.jitter_p
        one = torch.ones(b, device=dev)
        if cfg.brightness > 0:
            f = _uniform(g, b, 1 - cfg.brightness, 1 + cfg.brightness, dev)
            x = _blend(x, torch.zeros_like(x), torch.where(jit, f, one))
        if cfg.contrast > 0:
            f = _uniform(g, b, 1 - cfg.contrast, 1 + cfg.contrast, dev)
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = _blend(x, mean.expand_as(x), torch.where(jit, f, one))
        if c == 3 and cfg.saturation > 0:
            f = _uniform(g, b, 1 - cfg.saturation, 1 + cfg.saturation, dev)
            x = _blend(x, _gray(x).expand_as(x), torch.where(jit, f, one))
        if c == 3 and cfg.hue > 0:
            h = _uniform(g, b, -cfg.hue, cfg.hue, dev)
            x = _rotate_hue(x, torch.where(jit, h, torch.zeros_like(h)))
        if c == 3 and cfg.grayscale_p > 0:
            gm = (torch.rand(b, generator=g, device=dev) < cfg.grayscale_p).view(-1, 1, 1, 1)
            x = torch.where(gm, _gray(x).expand_as(x), x)

        if cfg.blur_p > 0:
            sigma = _uniform(g, b, *cfg.blur_sigma, dev) * cfg.size / 224
            bm = (torch.rand(b, generator=g, device=dev) < cfg.blur_p).view(-1, 1, 1, 1)
            # sigma is given for 224 px images (SimCLR's 0.1-2.0) and scaled to this size.
            x = torch.where(bm, _gaussian_blur(x, sigma.clamp(min=1e-3)), x)

        if cfg.sharpen_p > 0:
            # Unsharp masking, x + a * (x - blur(x)): restores edge and texture energy, which
            # images from small generators lack next to real photographs.
            amount = _uniform(g, b, *cfg.sharpen_amount, dev)
            sm = (torch.rand(b, generator=g, device=dev) < cfg.sharpen_p).view(-1, 1, 1, 1)
            sigma = torch.full((b,), cfg.sharpen_sigma * cfg.size / 28, device=dev)
            detail = x - _gaussian_blur(x, sigma)
            x = torch.where(sm, (x + amount.view(-1, 1, 1, 1) * detail).clamp(0, 1), x)

        if cfg.noise_p > 0:
            nm = (torch.rand(b, generator=g, device=dev) < cfg.noise_p).view(-1, 1, 1, 1)
            noise = torch.randn(x.shape, generator=g, device=dev) * cfg.noise_std
            x = torch.where(nm, (x + noise).clamp(0, 1), x)

        if cfg.solarize_p > 0:
            sm = (torch.rand(b, generator=g, device=dev) < cfg.solarize_p).view(-1, 1, 1, 1)
            x = torch.where(sm & (x >= 0.5), 1 - x, x)

        if cfg.erase_p > 0:
            x = self._erase(x, g)
        return x

    def _erase(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random erasing: one rectangle of area in erase_scale, filled with zeros."""
        b, _, h, w = x.shape
        dev = x.device
        area = _uniform(g, b, *self.cfg.erase_scale, dev)
        ratio = torch.exp(_uniform(g, b, math.log(0.3), math.log(3.3), dev))
        eh = (torch.sqrt(area * ratio) * h).clamp(1, h)
        ew = (torch.sqrt(area / ratio) * w).clamp(1, w)
        y0 = torch.rand(b, generator=g, device=dev) * (h - eh)
        x0 = torch.rand(b, generator=g, device=dev) * (w - ew)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        box = ((ys >= y0.view(-1, 1, 1)) & (ys < (y0 + eh).view(-1, 1, 1))
               & (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + ew).view(-1, 1, 1)))
        on = (torch.rand(b, generator=g, device=dev) < self.cfg.erase_p).view(-1, 1, 1)
        return x.masked_fill((box & on).unsqueeze(1), 0.0)


class MultiCrop:
    """``n_global`` global views and ``n_local`` local views (SwAV / DINO / SynCLR multi-crop).

    Returns a list of (B, C, size, size) tensors: the global views first.
    """

    def __init__(self, global_cfg: AugConfig, local_cfg: AugConfig, n_global: int = 2,
                 n_local: int = 0) -> None:
        self.global_aug = BatchAugment(global_cfg)
        self.local_aug = BatchAugment(local_cfg)
        self.n_global, self.n_local = n_global, n_local

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        views = [self.global_aug(x, g) for _ in range(self.n_global)]
        return views + [self.local_aug(x, g) for _ in range(self.n_local)]
