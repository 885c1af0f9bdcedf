"""Rendering captions with a diffusers text-to-image pipeline (docs/methods.md section 1: SD 1.5 at
guidance 2.5 in the paper; the shipped mini model on CPUs).

Every image has its own CPU generator seeded from ``(run seed, caption_id, k, attempt)``, so any
single image can be reproduced out of any batch: the initial latents are drawn per image and the
default samplers (DPM-Solver++ multistep, DDIM with eta 0) add no further noise. Images that come
back NaN or blank are drawn again with the next attempt's seed, up to ``images.max_retries``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synrep.errors import ConfigError, DataError
from synrep.shipped import SHIPPED
from synrep.utils import derive_seed

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ImageError(DataError):
    """A pipeline whose output cannot be used (NaN or blank images after retries)."""


def image_seed(seed: int, caption_id: int, k: int, attempt: int = 0) -> int:
    """The generator seed of image ``k`` of caption ``caption_id`` (recorded in the shard)."""
    return derive_seed(seed, "image", caption_id, k, attempt) % (1 << 63)


def resolve_pipeline(name: str) -> str:
    """A shipped pipeline's folder, a local folder (checked), or a hub id (passed through)."""
    if name in SHIPPED:
        path = SHIPPED[name]
        if not (path / "model_index.json").exists():
            raise ConfigError(f"the shipped pipeline {name!r} is missing from {str(path)!r}; "
                              "reinstall synrep or train it with `synrep train-generator`")
        return str(path)
    if not name:
        raise ConfigError("images.pipeline is empty; give a diffusers folder, a hub id (e.g. "
                          "stable-diffusion-v1-5/stable-diffusion-v1-5) or 'fashion-mini'")
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local:
        path = Path(name).expanduser()
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"images.pipeline {name!r} is not a diffusers pipeline folder (no "
                              "model_index.json there); give a folder saved with "
                              "save_pretrained, a hub id, or 'fashion-mini'")
    return name


@dataclass
class Rendered:
    """Images of one call: uint8 (N, H, W) or (N, H, W, 3), and the seed each was drawn with."""

    images: np.ndarray
    seeds: list[int]
    retried: int


class Renderer:
    """A loaded pipeline with the stage's sampling settings.

    Args:
        cfg: the :class:`~synrep.config.ImagesConfig`.
        device: where the pipeline runs ("cpu", "cuda", "cuda:1").
    """

    def __init__(self, cfg, device: str = "cpu") -> None:
        try:
            import diffusers
        except ImportError:
            raise ConfigError("the images stage needs diffusers: pip install 'synrep[gen]'"
                              ) from None
        self.cfg = cfg
        self.device = torch.device(device)
        source = resolve_pipeline(cfg.pipeline)
        dtype = _DTYPES[cfg.dtype]
        if dtype != torch.float32 and self.device.type == "cpu":
            raise ConfigError(f"images.dtype={cfg.dtype} is for GPUs; use float32 on the CPU")
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the pipeline {cfg.pipeline!r}: "
                              f"{' '.join(str(e).split())}") from None
        if hasattr(pipe, "safety_checker"):
            pipe.safety_checker = None  # research data; blank images are caught below
        if cfg.scheduler == "dpmsolver++":
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
                pipe.scheduler.config, algorithm_type="dpmsolver++")
        elif cfg.scheduler == "ddim":
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(self.device)
        # a pipeline saved by synrep declares its sampling defaults and the crop that undoes the
        # padding of its training images (fashion-mini: 32 px generated, centre 28 px kept)
        meta = Path(source) / "synrep.json"
        self.defaults = json.loads(meta.read_text()) if meta.is_file() else {}
        self.steps = cfg.steps or int(self.defaults.get("steps", 25))
        self.crop = self.defaults.get("crop")
        if cfg.compile:
            pipe.unet = torch.compile(pipe.unet, dynamic=False)
        self.pipe = pipe
        self.source = source
        self.provenance = {
            "pipeline": cfg.pipeline, "pipeline_class": type(pipe).__name__,
            "diffusers": diffusers.__version__, "scheduler": type(pipe.scheduler).__name__,
            "steps": self.steps, "guidance_scale": cfg.guidance_scale, "dtype": cfg.dtype,
            "resolution": self.resolution, "crop": self.crop,
            "size": cfg.output_size or self.crop or self.resolution}

    @property
    def resolution(self) -> int:
        if self.cfg.resolution:
            return self.cfg.resolution
        unet = getattr(self.pipe, "unet", None)
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        return int(unet.config.sample_size * scale) if unet is not None else 512

    @torch.inference_mode()
    def _call(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """Float images (N, H, W, C) in [0, 1] (NaN kept), in fixed-size batches."""
        bs = self.cfg.batch_size
        out = []
        for s in range(0, len(prompts), bs):
            p, sd = prompts[s:s + bs], seeds[s:s + bs]
            n = len(p)
            if self.cfg.compile and n < bs:  # one batch shape for the compiled denoiser
                p, sd = p + [p[-1]] * (bs - n), sd + [sd[-1]] * (bs - n)
            gens = [torch.Generator("cpu").manual_seed(x) for x in sd]
            res = self.pipe(prompt=p, num_inference_steps=self.steps,
                            guidance_scale=self.cfg.guidance_scale, generator=gens,
                            height=self.resolution, width=self.resolution, output_type="pt")
            out.append(res.images[:n].float().cpu())  # (n, C, H, W)
        images = torch.cat(out)
        if self.crop and self.crop < images.shape[-1]:
            o = (images.shape[-1] - self.crop) // 2
            images = images[..., o:o + self.crop, o:o + self.crop]
        if self.cfg.output_size and self.cfg.output_size != images.shape[-1]:
            images = F.interpolate(images, size=(self.cfg.output_size,) * 2, mode="bilinear",
                                   antialias=True, align_corners=False)
        return images.permute(0, 2, 3, 1).numpy()

    def render(self, prompts: list[str], caption_ids: list[int], ks: list[int],
               seed: int) -> Rendered:
        """Render image ``ks[i]`` of caption ``caption_ids[i]`` for every i."""
        seeds = [image_seed(seed, c, k) for c, k in zip(caption_ids, ks)]
        images = self._call(prompts, seeds)
        retried = 0
        for attempt in range(1, self.cfg.max_retries + 2):
            bad = np.flatnonzero(_bad(images))
            if not len(bad):
                break
            if attempt > self.cfg.max_retries:
                nan = int(np.isnan(images[bad]).any(axis=(1, 2, 3)).sum())
                raise ImageError(
                    f"the pipeline {self.cfg.pipeline!r} gave {len(bad)} unusable images "
                    f"({nan} NaN, {len(bad) - nan} blank) after {self.cfg.max_retries} re-draws, "
                    f"first for caption {caption_ids[bad[0]]}; check the pipeline (half "
                    "precision overflows: try images.dtype=float32 or bfloat16). Nothing was "
                    "written for this shard")
            retried += len(bad)
            for i in bad:
                seeds[i] = image_seed(seed, caption_ids[i], ks[i], attempt)
            images[bad] = self._call([prompts[i] for i in bad], [seeds[i] for i in bad])
        u8 = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if u8.shape[-1] == 1:
            u8 = u8[..., 0]
        return Rendered(u8, seeds, retried)


def _bad(images: np.ndarray) -> np.ndarray:
    """NaN/inf anywhere, or (nearly) constant: what a broken pipeline or a safety filter gives."""
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    flat = np.nan_to_num(images).reshape(len(images), -1)
    return ~finite | (flat.std(axis=1) < 0.5 / 255)
