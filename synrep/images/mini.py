"""The mini text-to-image model: a latent diffusion pipeline trained on Fashion-MNIST, in diffusers
format, loaded and sampled through the same code as Stable Diffusion (the embedded default).

Components (all trained here, nothing downloaded): an ``AutoencoderKL`` (1 x 32 x 32 pixels <->
4 x 8 x 8 latents), a ``UNet2DConditionModel`` with cross-attention at 4 x 4 and 2 x 2, a 2-layer
``CLIPTextModel`` over a word-level tokenizer whose vocabulary is the fashion bank's grammar, and
a DPM-Solver++ scheduler. Training captions are made by the caption grammar
(:func:`synrep.captions.grammar.compose`) from each training image's class and its measured
attributes (:mod:`synrep.concepts.fashion`: tone, fill, texture cut at per-class tertiles), each
attribute named with probability ``attr_p``, so a caption says more than its class and the
generator learns the exact vocabulary the caption stage writes. Captions are dropped with
probability ``cond_drop`` for classifier-free guidance.

    synrep train-generator configs/generator_fashion.yaml    # resumable; writes RUN/generator
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from synrep.captions.grammar import BG_FORMS, LEADS, MODIFIERS, REL_FORMS, SWAPS, TAILS, compose
from synrep.concepts import RELATIONS, load_bank
from synrep.concepts.banks import vocab as shipped_vocab
from synrep.concepts.fashion import (
    ATTRIBUTES,
    attribute_levels,
    attribute_thresholds,
    measure_attributes,
)
from synrep.config import Config
from synrep.data.fashion_mnist import load_fashion_mnist
from synrep.errors import CheckpointError, ConfigError
from synrep.images.render import resolve_pipeline
from synrep.layout import layout
from synrep.utils import ensure_writable_dir, remove_stale_temps, temp_path, write_json_atomic

IMAGE_SIZE = 32  # Fashion-MNIST's 28 px padded to a multiple of 8, as diffusers pipelines need
MAX_TOKENS = 32
TEXT_DIM = 64
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
_WORD = re.compile(r"\w+|[^\w\s]")


def caption_vocabulary() -> list[str]:
    """Every word the caption grammar can write for the fashion bank (and its rewrites)."""
    bank = load_bank("fashion")
    v = shipped_vocab()
    texts = [*LEADS, *MODIFIERS, *TAILS, *BG_FORMS, *REL_FORMS, *RELATIONS, "a an pair of it ,",
             *v["fashion_backgrounds"], *v["fashion_objects"], *SWAPS,
             *(x for alts in SWAPS.values() for x in alts),
             *(p for pool in bank.phrases.values() for p in pool),
             *(n for c in bank.concepts for n in c.names), *(d for c in bank.concepts
                                                             for d in c.details),
             *(w for values in ATTRIBUTES.values() for w in values)]
    words = {w for t in texts for w in _WORD.findall(t.lower().replace("{", " ").replace("}", " "))}
    return sorted(words - {"np", "bg", "rel", "obj"})


def build_tokenizer():
    """A word-level tokenizer over :func:`caption_vocabulary` (``<unk>`` for other words)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + caption_vocabulary()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>",
                                   model_max_length=MAX_TOKENS)


def build_components(vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """Fresh (random) VAE, UNet and text encoder of the mini model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 64),
        norm_num_groups=8, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=MAX_TOKENS,
        pad_token_id=0, bos_token_id=2, eos_token_id=3))
    return {"vae": vae, "unet": unet, "text_encoder": text}


def training_images(root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST train images in [-1, 1], padded to 32 px: (N, 1, 32, 32), and labels."""

    images, labels = load_fashion_mnist("train", root)
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.from_numpy(labels)


class CaptionMaker:
    """Training captions from (class, attribute levels): the caption grammar with a random
    subset of the measured attributes, a random template frame, and dropout to ""."""

    def __init__(self, attr_p: float, cond_drop: float) -> None:
        self.bank = load_bank("fashion")
        self.attr_p, self.cond_drop = attr_p, cond_drop
        self.names = list(ATTRIBUTES)

    def __call__(self, labels: list[int], levels: list[list[int]], rng: random.Random
                 ) -> list[str]:
        out = []
        for label, lv in zip(labels, levels):
            if rng.random() < self.cond_drop:
                out.append("")
                continue
            attrs = {a: ATTRIBUTES[a][lv[i]] for i, a in enumerate(self.names)
                     if rng.random() < self.attr_p}
            concept = self.bank.concepts[label]
            t = rng.choices(("c", "c_bg", "c_rel"), (0.6, 0.2, 0.2))[0]
            out.append(compose(self.bank, concept, t, rng, attributes=attrs,
                               background=rng.choice(self.bank.backgrounds),
                               relation=rng.choice(RELATIONS),
                               obj=rng.choice(self.bank.relation_objects)))
        return out


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


_STATE_FORMAT = "synrep-mini-state-v2"


def _optimizer_states(opt) -> dict[str, dict[str, Any]]:
    """One optimizer, or several in :class:`_Optimizers`, as {name: state dict}."""
    return opt.state_dicts() if isinstance(opt, _Optimizers) else {"opt": opt.state_dict()}


def _flatten_optimizers(opt) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as safetensors tensors (``optim/<name>/<param id>/<key>``) and JSON (param
    groups and non-tensor values), as synrep.checkpoint stores a trainer's optimizer."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for oname, state in _optimizer_states(opt).items():
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in state["state"].items():
            for key, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim/{oname}/{pid}/{key}"] = v.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[key] = v
        meta[oname] = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, meta


def _unflatten_optimizers(tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                          ) -> dict[str, dict[str, Any]]:
    states: dict[str, dict[str, Any]] = {}
    for oname, m in meta.items():
        state: dict[int, dict[str, Any]] = {}
        for pid, st in m["scalars"].items():
            state.setdefault(int(pid), {}).update(st)
        states[oname] = {"state": state, "param_groups": m["param_groups"]}
    for key, v in tensors.items():
        _, oname, pid, name = key.split("/", 3)
        states[oname]["state"].setdefault(int(pid), {})[name] = v
    return states


def _save_state(path: Path, modules: dict[str, torch.nn.Module], opt, step: int,
                extra: dict[str, Any]) -> None:
    """Weights and optimizer state in one safetensors file, written to a temporary name and
    renamed: a kill leaves the previous consistent state or the new one, never a mix."""
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    meta: dict[str, str] = {"format": _STATE_FORMAT, "step": str(step),
                            "extra": json.dumps(extra)}
    if opt is not None:
        opt_tensors, opt_meta = _flatten_optimizers(opt)
        tensors.update(opt_tensors)
        meta["optimizer"] = json.dumps(opt_meta)
    remove_stale_temps(path)  # a killed writer's leftovers
    tmp = temp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    path.with_suffix(".opt").unlink(missing_ok=True)  # an older synrep's pickled optimizer state


def _load_state(path: Path, modules: dict[str, torch.nn.Module], opt) -> tuple[int, dict]:
    """Load what :func:`_save_state` wrote; with ``opt``, the optimizer state saved with the
    weights (a state without one is refused rather than resumed with a fresh optimizer)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, m in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        m.load_state_dict(sd)
    if opt is not None:
        if meta.get("format") != _STATE_FORMAT or "optimizer" not in meta:
            raise CheckpointError(
                f"{str(path)!r} holds no optimizer state in this synrep's format "
                f"({_STATE_FORMAT!r}; an older synrep kept it in a pickle that is no longer "
                "read): delete the file to train that part again, or use a new run.dir")
        states = _unflatten_optimizers(
            {k: v for k, v in tensors.items() if k.startswith("optim/")},
            json.loads(meta["optimizer"]))
        if set(states) != set(_optimizer_states(opt)):
            raise CheckpointError(f"{str(path)!r} holds the optimizer state of "
                                  f"{sorted(states)}, not of {sorted(_optimizer_states(opt))}")
        if isinstance(opt, _Optimizers):
            opt.load_state_dicts(states)
        else:
            opt.load_state_dict(states["opt"])
    return int(meta["step"]), json.loads(meta["extra"])


def train_vae(vae, images: torch.Tensor, cfg, state: Path, bar_desc: str = "vae") -> float:
    """Train the autoencoder (L1 + MSE reconstruction, a small KL term); resumable. Returns the
    latent scaling factor (1 / std of latents), as Stable Diffusion's 0.18215."""
    g = cfg.generator
    dev = images.device
    opt = torch.optim.AdamW(vae.parameters(), lr=g.vae_lr, weight_decay=0.0)
    step = 0
    if state.exists():
        step, _ = _load_state(state, {"vae": vae}, opt)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    vae.train()
    with tqdm(total=g.vae_steps, initial=step, desc=bar_desc, dynamic_ncols=True) as bar:
        while step < g.vae_steps:
            gen.manual_seed(cfg.run.seed * 1_000_003 + step)
            idx = torch.randint(len(images), (g.vae_batch_size,), generator=gen)
            x = images[idx.to(dev)]
            for pg in opt.param_groups:
                pg["lr"] = _lr(step, g.vae_steps, g.vae_lr, 100)
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
            rec = vae.decode(z).sample
            loss = (F.l1_loss(rec, x) + F.mse_loss(rec, x)
                    + g.vae_kl * post.kl().mean() / x[0].numel())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % g.ckpt_every == 0 or step == g.vae_steps:
                _save_state(state, {"vae": vae}, opt, step, {})
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i:i + 1000]).latent_dist.mean
                         for i in range(0, min(len(images), 10000), 1000)])
    return float(1.0 / lat.std())


class _PatchCritic(torch.nn.Module):
    """Hinge-loss patch discriminator of the decoder fine-tuning: 32 px -> 8 x 8 patch logits,
    spectrally normalised convolutions (as the critics of Stable Diffusion's autoencoders)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        act = torch.nn.LeakyReLU(0.2)
        self.net = torch.nn.Sequential(
            sn(torch.nn.Conv2d(1, width, 4, 2, 1)), act,
            sn(torch.nn.Conv2d(width, 2 * width, 4, 2, 1)), act,
            sn(torch.nn.Conv2d(2 * width, 2 * width, 3, 1, 1)), act,
            torch.nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Optimizers:
    """Several optimizers saved and restored as one state (for :func:`_save_state`)."""

    def __init__(self, **opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        return {k: o.state_dict() for k, o in self.opts.items()}

    def load_state_dicts(self, states: dict[str, dict[str, Any]]) -> None:
        for k, o in self.opts.items():
            o.load_state_dict(states[k])


def finetune_decoder(vae, images: torch.Tensor, cfg, state: Path) -> None:
    """Sharpen the autoencoder's decoder adversarially with its encoder frozen; resumable.

    Pixel losses alone (L1 + MSE) make the decoder draw the mean of what a latent could be, so
    fine prints and seams come out smooth. As with Stable Diffusion's autoencoders, a patch critic
    (hinge loss, weight ``decoder_gan_weight``) asks for real-looking texture while L1 + MSE keep
    the reconstruction. The encoder, hence every latent and the denoiser trained on them, is left
    untouched, so the fine-tuned decoder drops into an already trained pipeline. Latents are drawn
    from the encoder's posterior (mean + std * noise), as in the autoencoder's own training.
    """
    g = cfg.generator
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posts = [vae.encode(images[i:i + 2000]).latent_dist for i in range(0, len(images), 2000)]
        mu = torch.cat([p.mean for p in posts])
        std = torch.cat([p.std for p in posts])
    del posts
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    torch.manual_seed(cfg.run.seed)
    dev = images.device
    critic = _PatchCritic().to(dev)
    opt_g = torch.optim.AdamW(decoder, lr=g.decoder_lr, betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(critic.parameters(), lr=2 * g.decoder_lr, betas=(0.5, 0.9),
                              weight_decay=0.0)
    opts = _Optimizers(decoder=opt_g, critic=opt_d)
    modules = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv, "critic": critic}
    step = 0
    if state.exists():
        step, extra = _load_state(state, modules, opts)
        if extra.get("config") != _fingerprint(cfg):
            raise CheckpointError(f"{str(state)!r} was fine-tuned with another generator config; "
                                  "use the same config or a new run.dir")
    gen = torch.Generator()
    vae.decoder.train()
    critic.train()
    with tqdm(total=g.decoder_steps, initial=step, desc="decoder", dynamic_ncols=True) as bar:
        while step < g.decoder_steps:
            gen.manual_seed(cfg.run.seed * 1_000_003 + step)
            idx = torch.randint(len(images), (g.decoder_batch_size,), generator=gen).to(dev)
            x = images[idx]
            z = mu[idx] + std[idx] * torch.randn(mu[idx].shape, generator=gen).to(dev)
            rec = vae.decode(z).sample
            d_loss = F.relu(1 - critic(x)).mean() + F.relu(1 + critic(rec.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
            loss = rec_loss - g.decoder_gan_weight * critic(rec).mean()
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            step += 1
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(rec=f"{rec_loss.item():.4f}", critic=f"{d_loss.item():.3f}")
            if step % g.ckpt_every == 0 or step == g.decoder_steps:
                _save_state(state, modules, opts, step, {"config": _fingerprint(cfg)})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, scale: float) -> torch.Tensor:
    """Posterior means of every training image, scaled: (N, 4, 8, 8)."""
    return torch.cat([vae.encode(images[i:i + 1000]).latent_dist.mean * scale
                      for i in range(0, len(images), 1000)])


_NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
              beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1)


def _init_folder(name: str) -> Path:
    folder = Path(resolve_pipeline(name))
    if not all((folder / part).is_dir() for part in ("vae", "unet", "text_encoder")) or \
            not (folder / "synrep.json").is_file():
        raise ConfigError(f"generator.init {name!r} is not a mini pipeline folder (vae, unet, "
                          "text_encoder and synrep.json); give 'fashion-mini' or a folder "
                          "written by `synrep train-generator`")
    return folder


def _load_pipeline_parts(folder: Path, vocab_size: int):
    """The autoencoder, denoiser and text encoder of a saved mini pipeline (``generator.init``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    name = str(folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    if text.config.vocab_size != vocab_size or vae.config.in_channels != 1:
        raise ConfigError(f"generator.init {name!r} is not a mini pipeline of this synrep (its "
                          f"text encoder knows {text.config.vocab_size} words, the caption "
                          f"grammar {vocab_size}); retrain it with `synrep train-generator`")
    return vae, unet.eval().requires_grad_(False), text.eval().requires_grad_(False)


class _DenoiserBatches(torch.utils.data.Dataset):
    """Step ``i``'s batch of the denoiser: image indices, caption token ids, noise and timesteps,
    a function of (seed, i) alone, so loader workers and resumed runs draw exactly the same
    batches as one process training from the start."""

    def __init__(self, cfg: Config, n: int, labels: list[int], levels: list[list[int]],
                 tokenizer, latent_shape: tuple[int, ...]) -> None:
        g = cfg.generator
        self.seed, self.batch, self.n = cfg.run.seed, g.batch_size, n
        self.labels, self.levels, self.tokenizer = labels, levels, tokenizer
        self.shape = (g.batch_size, *latent_shape)
        self.maker = CaptionMaker(g.attr_p, g.cond_drop)
        self.steps = g.steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rng = random.Random(f"{self.seed}/generator/{step}")
        idx = torch.randint(self.n, (self.batch,), generator=gen)
        il = idx.tolist()
        captions = self.maker([self.labels[i] for i in il], [self.levels[i] for i in il], rng)
        ids = self.tokenizer(captions, padding="max_length", max_length=MAX_TOKENS,
                             truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(self.shape, generator=gen)
        t = torch.randint(0, 1000, (self.batch,), generator=gen)
        return idx, ids, noise, t


def _loader_workers(g, dev: torch.device) -> int:
    """``generator.loader_workers``; -1 = none on a CPU (the cores train), up to 6 on a GPU."""

    if g.loader_workers >= 0:
        return g.loader_workers
    return 0 if dev.type == "cpu" else max(0, min(6, (os.cpu_count() or 1) - 2))


def _train_vae_and_denoiser(cfg: Config, images, labels, measures, thresholds, tokenizer,
                            work: Path):
    """The autoencoder, then the denoiser and text encoder on its latents (EMA weights returned)."""
    from diffusers import DDPMScheduler

    g = cfg.generator
    dev = images.device
    parts = {k: m.to(dev) for k, m in build_components(len(tokenizer), cfg.run.seed).items()}
    vae, unet, text = parts["vae"], parts["unet"], parts["text_encoder"]
    scale_file = work / "vae_scale.json"
    if scale_file.exists():
        _load_state(work / "vae.safetensors", {"vae": vae}, None)
        scale = json.loads(scale_file.read_text())["scaling_factor"]
    else:
        scale = train_vae(vae, images, cfg, work / "vae.safetensors")
        write_json_atomic(scale_file, {"scaling_factor": scale})
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=scale)
    latents = encode_latents(vae, images, scale)
    levels = attribute_levels(measures, labels, thresholds).tolist()
    labels_l = labels.tolist()
    noise_sched = DDPMScheduler(**_NOISE)
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=g.lr, weight_decay=0.01)
    ema = {"unet": _ema_copy(unet), "text_encoder": _ema_copy(text)}
    state = work / "denoiser.safetensors"
    step = 0
    if state.exists():
        step, extra = _load_state(state, {"unet": unet, "text_encoder": text,
                                          "ema_unet": ema["unet"],
                                          "ema_text_encoder": ema["text_encoder"]}, opt)
        if extra.get("config") != _fingerprint(cfg, "denoiser"):
            raise CheckpointError(f"{str(state)!r} was trained with another generator config; "
                                  "use the same config or a new run.dir")
    # every draw is a function of (seed, step), made on the CPU whatever the device (in loader
    # workers ahead of the GPU there): a resumed run continues identically
    batches = _DenoiserBatches(cfg, len(latents), labels_l, levels, tokenizer,
                               tuple(latents.shape[1:]))
    workers = _loader_workers(g, dev)
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(step, g.steps)), batch_size=None,
        num_workers=workers, pin_memory=dev.type == "cuda",
        prefetch_factor=8 if workers else None, persistent_workers=False)
    nb = dev.type == "cuda"  # pinned batches copy asynchronously
    unet.train()
    text.train()
    with tqdm(total=g.steps, initial=step, desc="denoiser", dynamic_ncols=True) as bar:
        for idx, ids, noise, t in loader:
            z0 = latents[idx.to(dev, non_blocking=nb)]
            ids = ids.to(dev, non_blocking=nb)
            noise, t = noise.to(dev, non_blocking=nb), t.to(dev, non_blocking=nb)
            zt = noise_sched.add_noise(z0, noise, t)
            for pg in opt.param_groups:
                pg["lr"] = _lr(step, g.steps, g.lr, g.warmup_steps)
            pred = unet(zt, t, text(ids)[0]).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            _ema_update(ema["unet"], unet, g.ema)
            _ema_update(ema["text_encoder"], text, g.ema)
            step += 1
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % g.ckpt_every == 0 or step == g.steps:
                _save_state(state, {"unet": unet, "text_encoder": text, "ema_unet": ema["unet"],
                                    "ema_text_encoder": ema["text_encoder"]}, opt, step,
                            {"config": _fingerprint(cfg, "denoiser")})
    return vae, ema["text_encoder"], ema["unet"], scale


def train_generator(cfg: Config) -> Path:
    """Train the mini pipeline and save it in diffusers format; resumable. Returns its folder."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    g = cfg.generator
    for key in ("vae_steps", "steps", "decoder_steps"):
        if getattr(g, key) < 0:
            raise ConfigError(f"generator.{key} must be >= 0, got {getattr(g, key)}")
    if not (g.decoder_lr > 0 and g.decoder_gan_weight >= 0 and g.decoder_batch_size > 0):
        raise ConfigError("generator.decoder_lr and decoder_batch_size must be > 0 and "
                          f"decoder_gan_weight >= 0, got {g.decoder_lr}, "
                          f"{g.decoder_batch_size} and {g.decoder_gan_weight}")
    if g.loader_workers < -1:
        raise ConfigError(f"generator.loader_workers must be >= 0, or -1 for automatic, got "
                          f"{g.loader_workers}")
    init = _init_folder(g.init) if g.init else None
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    dev = _train_device(g.device)
    work = ensure_writable_dir(layout(cfg).generator, "run.dir")
    out = Path(g.out) if g.out else layout(cfg).generator_pipeline
    images, labels = training_images(cfg.eval.root)
    if g.train_limit:
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(
            cfg.run.seed))[:g.train_limit]
        images, labels = images[keep], labels[keep]
    tokenizer = build_tokenizer()
    pix = (images[:, 0, 2:-2, 2:-2] + 1) / 2
    measures = measure_attributes(pix)
    thresholds = attribute_thresholds(measures, labels)
    print(f"generator: training on {dev}")
    images = images.to(dev)
    if init is not None:
        vae, unet, text = _load_pipeline_parts(init, len(tokenizer))
        vae = vae.to(dev)
        scale = vae.config.scaling_factor
    else:
        vae, text, unet, scale = _train_vae_and_denoiser(cfg, images, labels, measures,
                                                         thresholds, tokenizer, work)
    if g.decoder_steps:
        finetune_decoder(vae, images, cfg, work / "decoder.safetensors")
    vae, text, unet = vae.cpu(), text.cpu(), unet.cpu()
    noise_sched = DDPMScheduler(**_NOISE)
    scheduler = DPMSolverMultistepScheduler.from_config(noise_sched.config,
                                                        algorithm_type="dpmsolver++")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = temp_path(out)  # a folder named for this process, renamed when complete
    pipe.save_pretrained(tmp)
    trained = {"train_steps": g.steps, "batch_size": g.batch_size, "vae_steps": g.vae_steps}
    if init is not None:  # the kept parts were trained as the initial pipeline says
        saved = json.loads((init / "synrep.json").read_text())
        trained = {k: saved[k] for k in trained if k in saved}
    write_json_atomic(tmp / "synrep.json", {
        "steps": g.sample_steps, "guidance_scale": 2.5, "image_size": IMAGE_SIZE,
        "crop": 28, "attribute_thresholds": thresholds.tolist(),
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        **trained, "decoder_steps": g.decoder_steps})
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print(f"generator: saved the mini pipeline to {out}")
    return out


def _fingerprint(cfg: Config, stage: str = "decoder") -> dict[str, Any]:
    """The settings a stage's saved state depends on (the denoiser ignores the decoder's)."""

    d = asdict(cfg.generator)
    for k in ("out", "ckpt_every", "device", "loader_workers"):  # same draws on every device
        d.pop(k)
    if stage == "denoiser":
        for k in ("decoder_steps", "decoder_batch_size", "decoder_lr", "decoder_gan_weight",
                  "init"):
            d.pop(k)
    if d["train_limit"] is None:  # the whole train split
        d.pop("train_limit")
    return {"seed": cfg.run.seed, **d}


def _ema_copy(m: torch.nn.Module) -> torch.nn.Module:
    e = copy.deepcopy(m).eval()
    e.requires_grad_(False)
    return e


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def _train_device(name: str) -> torch.device:
    """``generator.device``: "auto" is the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"generator.device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"generator.device is {name!r} but this machine has no CUDA GPU; set "
                          "generator.device=cpu (or auto)")
    return torch.device(name)


def sample_grid(pipe_dir: str | Path, captions: list[str], seed: int = 0) -> np.ndarray:
    """Render one image per caption with the saved pipeline (for quick looks)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    out = pipe(captions, num_inference_steps=10, guidance_scale=2.5, generator=gens,
               output_type="np", height=IMAGE_SIZE, width=IMAGE_SIZE).images
    return (out[..., 0] * 255).round().astype(np.uint8)
