"""Where and in what precision a job runs: the device, bf16 support, autocast, attention path.

Chosen once per job (as nanoGPT chooses its autocast context once) and shared by training,
selection and evaluation.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from synrep import dist
from synrep.config import Config
from synrep.errors import ConfigError


def resolve_device(cfg: Config) -> torch.device:
    dev = cfg.run.device
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={dev!r} but no CUDA device is available; use cpu")
        if dist.world_size() > 1 or "WORLD_SIZE" in os.environ:
            dev = f"cuda:{dist.local_rank()}"
            torch.cuda.set_device(dev)
    return torch.device(dev)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX (on other CPUs bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # PyTorch's kernels run at most at the instruction set ATEN_CPU_CAPABILITY allows (set to
        # avx2 to run as an AVX2-only CPU would): below AVX512, bf16 is emulated whatever the chip
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as the loop runs it: ``auto`` is bf16 autocast where the device
    computes bf16 natively (:func:`native_bf16`) and fp32 elsewhere; other values pass through.
    On the quickstart's tiny ViT, bf16 autocast on an AVX512-BF16 CPU ran 1.5x the fp32 step rate.
    """
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def choose_attention(model: torch.nn.Module, device: torch.device, precision: str) -> str:
    """Pick timm's attention path for training: fused (``scaled_dot_product_attention``) or
    explicit (``softmax(q k^T) v`` as matmuls). Returns ``"fused"`` or ``"explicit"``.

    On a CPU under bf16 autocast the fused kernel's backward is slow: fused against explicit, one
    attention layer forward and backward in bf16 took 26.3 / 8.7 ms at 17 tokens (the quickstart
    ViT, batch 256), 25.6 / 10.5 ms at 65 and 63.1 / 52.1 ms at 197 tokens; a whole quickstart
    training step 299 / 175 ms (in fp32 both paths took 411 ms). So bf16 on a CPU trains with
    the explicit path; everything else keeps the fused one. Both compute the same attention.
    """
    fused = not (device.type == "cpu" and precision == "bf16")
    for m in model.modules():
        if hasattr(m, "fused_attn"):  # timm's Attention and the blocks built on it
            m.fused_attn = fused
    return "fused" if fused else "explicit"


def autocast_for(precision: str, device: torch.device):
    """The autocast context of a resolved precision (fp32: none). Reusable across steps."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)

