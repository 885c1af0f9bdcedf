"""The ``transformers`` caption backend: any causal language model, from a local folder or a hub id.

Prompts are batched and left-padded (decoder-only models continue from the right edge), sampled
with the configured temperature and top-p, and stopped at the first newline, since only the first
line of a completion is kept (SynCLR's protocol: Llama-2-7B, temperature 0.8, top-p 0.9, at most
100 new tokens). Sampling is seeded per call, so a run is reproducible on the same device and
batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from synrep.captions.base import BACKENDS, CaptionBackend, Query, Sampling
from synrep.errors import ConfigError
from synrep.utils import derive_seed

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(model: str, backend: str) -> None:
    """A clear error for an empty or missing model; hub ids pass through to the loader."""
    if not model:
        raise ConfigError(f"captions.backend={backend} needs captions.model=<local folder or "
                          "hub id>, e.g. captions.model=meta-llama/Llama-2-7b-hf")
    looks_local = model.startswith((".", "/", "~")) or Path(model).expanduser().exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise ConfigError(f"language model folder {model!r} does not exist; give a folder "
                          "holding config.json and the tokenizer files, or a hub id")


@BACKENDS.register("transformers")
class TransformersBackend(CaptionBackend):
    """Batched sampling from a ``transformers`` causal LM.

    Example:
        >>> backend = TransformersBackend(cfg.captions, "cuda")  # cfg.captions.model = path
        >>> backend.generate(queries, Sampling(0.8, 0.9, 100), seed=0)
    """

    name = "transformers"

    def __init__(self, cfg, device: str = "cpu") -> None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ConfigError("captions.backend=transformers needs the transformers package: "
                              "pip install 'synrep[gen]'") from None
        check_model_path(cfg.model, "transformers")
        self.model = cfg.model
        self.batch_size = cfg.batch_size
        self.device = torch.device(device)
        dtype = "auto" if cfg.dtype == "auto" else _DTYPES[cfg.dtype]
        if dtype == "auto" and self.device.type == "cpu":
            dtype = torch.float32  # half precision is slow on CPUs
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            self.lm = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        except (OSError, ValueError) as e:
            detail = " ".join(str(e).split())  # one line
            raise ConfigError(f"cannot load the language model {cfg.model!r}: {detail}") from None
        self.lm.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @torch.inference_mode()
    def generate(self, queries: Sequence[Query], sampling: Sampling, seed: int) -> list[str]:
        tok = self.tokenizer
        out: list[str] = []
        devices = [self.device] if self.device.type == "cuda" else []
        for start in range(0, len(queries), self.batch_size):
            prompts = [q.prompt for q in queries[start:start + self.batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True).to(self.device)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derive_seed(seed, start))
                ids = self.lm.generate(
                    **enc, do_sample=True, temperature=sampling.temperature,
                    top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=tok.pad_token_id, stop_strings=["\n"], tokenizer=tok)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out
