"""Typed configuration: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.

Every field has a type and a default; a YAML file and command-line overrides change only what they
name. Unknown keys and values of the wrong type are errors that name the key and where it came
from. The resolved config is written into the run directory and into every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import json
import math
import re
import tokenize
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from synrep.errors import ConfigError
from synrep.registry import Registry
from synrep.utils import atomic_output, yaml_error_summary


@dataclass
class RunConfig:
    name: str = ""  # defaults to the config file's stem
    dir: str = ""  # defaults to runs/<name>
    seed: int = 0  # seeds the weights, batch order, augmentations, captions and images
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"; under torchrun each rank takes cuda:LOCAL_RANK
    # what `synrep run` runs, in the order given: captions, rewrites, images, select, cluster,
    # train, search, eval, report (stages already complete are skipped)
    stages: list[str] = field(default_factory=lambda: ["train", "eval"])
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class DataConfig:
    # dataset: a registered dataset; shards: synrep's caption-group shards; webdataset: plain
    # image(-text) shards, one image a key (img2dataset, open_clip)
    # mixture: weighted sources (data.mixture), each step's batch split by weight
    source: Literal["dataset", "shards", "webdataset", "mixture"] = "dataset"
    dataset: str = "fashion-mnist"  # a registered dataset, used when source = "dataset"
    root: str | None = None  # dataset folder; None uses the dataset's default location
    split: str = "train"  # split of data.dataset to train on (imagefolder: a subfolder of root)
    # source = shards: a folder of caption-group shards ("" = this run's images stage);
    # source = webdataset: a folder, a .tar, a brace pattern (dir/{000..099}.tar) or a list
    shards: str | list[str] = ""
    # memory: decode the whole set into RAM; stream: read each batch's samples from the shards
    # through their index (memory independent of the set's size); auto: memory up to 512 MiB
    # of decoded images, stream above
    loader: Literal["auto", "memory", "stream"] = "auto"
    workers: int = 0  # DataLoader worker processes decoding streamed batches (0 = this process)
    # how streamed images of another size become image_size: the centred square, or a random
    # resized crop (aug.scale, aug.ratio) drawn per (seed, step, sample)
    crop: Literal["center", "random"] = "center"
    # source = mixture: {shards spec or "dataset:<name>": weight}, e.g.
    # {runs/q/images: 0.75, "dataset:fashion-mnist": 0.25} (real + synthetic)
    mixture: dict[str, float] = field(default_factory=dict)
    max_captions: int | None = None  # train on the first n caption groups only (data scaling)
    max_images_per_caption: int | None = None  # and on the first k images of each
    classes: list[int] | None = None  # keep only images (or caption groups) of these labels
    image_size: int | None = None  # resize on load; None keeps the stored size


@dataclass
class ModelConfig:
    backbone: str = "vit_tiny_p7_28"  # a registered backbone or "timm:<any timm model>"
    in_chans: int = 1  # image channels the encoder takes: 1 = grayscale, 3 = RGB
    img_size: int = 28  # input side in pixels the backbone is built for (eval.image_size's default)
    drop_path: float = 0.0  # stochastic depth rate of the backbone's blocks; 0 = off
    # share of a ViT's patch tokens dropped at random from every training image (FLIP's token
    # masking, Li et al. 2023): the blocks see fewer tokens, so a step costs about (1 - x) of
    # the compute; evaluation always sees every token. 0 = off
    patch_drop: float = 0.0
    # the last n training steps see every token (FLIP's unmasked tuning): the encoder meets the
    # full token sequence evaluation gives it before training ends
    patch_drop_unmasked_steps: int = 0
    global_pool: Literal["token", "avg"] = "token"  # ViT feature used by training objectives
    mean: float = 0.5  # input normalisation applied inside the encoder to [0, 1] pixels
    std: float = 0.5  # with mean: the encoder sees (x - mean) / std


@dataclass
class AugConfig:
    """SimCLR-strong augmentation, applied on batches on the training device."""

    size: int = 28  # side in pixels of the augmented views (the training resolution)
    scale: tuple[float, float] = (0.2, 1.0)  # random resized crop: area range (share of image)
    ratio: tuple[float, float] = (0.75, 1.3333333)  # crop aspect ratio (w / h), log-uniform
    hflip: float = 0.5  # probability of a horizontal flip
    jitter_p: float = 0.8  # probability of colour jitter (brightness, contrast, saturation, hue)
    brightness: float = 0.4  # jitter: brightness factor uniform in [1 - x, 1 + x]; 0 = off
    contrast: float = 0.4  # jitter: contrast factor uniform in [1 - x, 1 + x]; 0 = off
    saturation: float = 0.4  # jitter: saturation factor in [1 - x, 1 + x]; RGB only
    hue: float = 0.1  # jitter: hue rotation uniform in [-x, x] of a full turn; RGB only
    grayscale_p: float = 0.2  # probability of converting a view to grayscale; RGB only
    blur_p: float = 0.5  # probability of a Gaussian blur
    # range of the blur's sigma in pixels of a 224 px image (SimCLR's), scaled with aug.size
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0  # probability of solarizing (pixels >= 0.5 become 1 - x)
    sharpen_p: float = 0.0  # unsharp masking x + a * (x - blur(x)), a uniform in sharpen_amount
    sharpen_amount: tuple[float, float] = (0.5, 2.0)  # range of the unsharp-masking amount a
    sharpen_sigma: float = 1.0  # blur width in pixels at 28 px (scaled with aug.size)
    noise_p: float = 0.0  # additive Gaussian pixel noise
    noise_std: float = 0.05  # std of the noise_p Gaussian noise, pixels in [0, 1]
    erase_p: float = 0.0  # probability of random erasing (one rectangle set to 0)
    erase_scale: tuple[float, float] = (0.02, 0.2)  # erased area range, as a share of the image


#: Each method's options: a dataclass registered under the method's name (by
#: :data:`synrep.methods.METHODS` when the method registers), configured as ``method.<name>.*``.
METHOD_OPTIONS: Registry[type] = Registry("method")

# Before methods had sections, synrep wrote one flat ``method`` section where some methods'
# options carried a prefix (``mae_decoder_dim``, ``moce_clusters``): by method, the prefixes to
# try before the bare name. Only read from stored configs (checkpoints, run folders).
_LEGACY_PREFIXES = {"mae": ("mae",), "mixedae": ("mixedae", "mae"), "moce": ("moce", "mae")}


@dataclass
class MethodOptions:
    """Base of every method's options: a method declares its own subclass (its section
    ``method.<name>``) in its file and registers it with the method."""

    #: ``method.<name>``, set when the method registers: error messages name keys with it.
    section: ClassVar[str] = "method"
    #: option -> rule (see :data:`RULES`), checked when a config loads; subclasses add theirs.
    rules: ClassVar[dict[str, str]] = {}

    def __setattr__(self, key: str, value: Any) -> None:
        # A misspelt option set in code fails here instead of being silently ignored.
        if key not in self.__dataclass_fields__:
            raise AttributeError(f"{self.section} has no option {key!r}; its options: "
                                 f"{', '.join(self.__dataclass_fields__)}")
        object.__setattr__(self, key, value)


class MethodConfig:
    """``method``: which objective trains (``name``, a registered method) and that method's own
    options, the section ``method.<name>`` declared by the method's file (for example
    ``method.synclr.temperature``). A section of another method is an error naming its owner.

    ``options`` (and ``cfg.method.<name>``) is the active method's options dataclass. A section
    read before its method is registered is kept as given and checked when first used.
    """

    def __init__(self, name: str = "simclr") -> None:
        self.name = name
        self._raw: dict[str, dict[str, Any]] = {}  # sections as given, by method name
        self._sources: dict[str, str] = {}
        self._options: Any = None

    # -- access --------------------------------------------------------------------------------
    @property
    def options(self) -> Any:
        """The active method's options (its dataclass, defaults updated by its section)."""
        cls = METHOD_OPTIONS.get(self.name)  # unknown method: one error listing the choices
        if type(self._options) is not cls:
            opts = cls()
            raw = self._raw.get(self.name, {})
            source = self._sources.get(self.name, "the config")
            known = {f.name for f in dataclasses.fields(cls)}
            for key in raw:
                owners = [n for n in _owners(key) if n != self.name]
                if key not in known and owners:
                    raise ConfigError(
                        f"'method.{self.name}.{key}' in {source}: {key} is an option of "
                        f"method(s) {', '.join(owners)}, not of {self.name!r}; valid keys under "
                        f"'method.{self.name}': {', '.join(sorted(known))}")
            _merge(opts, raw, source, f"method.{self.name}.")
            self._options = opts
        return self._options

    def __getattr__(self, key: str) -> Any:
        # Called only when normal lookup fails: ``cfg.method.synclr`` -> synclr's options.
        if key.startswith("_") or "name" not in self.__dict__:
            raise AttributeError(key)
        if key == self.name:
            return self.options
        owners = _owners(key)
        if key in METHOD_OPTIONS:
            raise AttributeError(f"method.{key}: this config trains method {self.name!r}")
        if owners:
            raise AttributeError(f"method.{key} is an option of method(s) {', '.join(owners)}: "
                                 f"read it as cfg.method.{self.name}.{key}")
        raise AttributeError(f"MethodConfig has no attribute {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name" or key.startswith("_"):
            object.__setattr__(self, key, value)
            return
        raise AttributeError(f"method.{key}: set options on the method's section, "
                             f"cfg.method.{self.__dict__.get('name')}.{key}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"MethodConfig({self.to_dict()!r})"

    def __deepcopy__(self, memo: dict) -> MethodConfig:
        out = MethodConfig(self.name)
        out._raw = copy.deepcopy(self._raw, memo)
        out._sources = dict(self._sources)
        out._options = copy.deepcopy(self._options, memo)
        return out

    # -- reading and writing -------------------------------------------------------------------
    def update(self, updates: dict[str, Any], source: str) -> None:
        """Merge a ``method`` mapping (from a file, overrides or a stored config). The sections
        it sets must be those of the method it leaves active: a section of another method in
        the same file (or the same overrides) is an error naming the method that owns it."""
        if "name" in updates:
            name = _coerce(updates["name"], str, f"'method.name' in {source}")
            if METHOD_OPTIONS.names() and name not in METHOD_OPTIONS:
                raise ConfigError(f"'method.name' in {source}: unknown method {name!r}; choose "
                                  f"one of: {', '.join(METHOD_OPTIONS.names())}")
            if name != self.name:
                self._options = None
            self.name = name
        flat = {k: v for k, v in updates.items() if k != "name" and not isinstance(v, dict)}
        if flat:
            self._update_flat(flat, source)
        for key, value in updates.items():
            if key == "name" or not isinstance(value, dict):
                continue
            if key != self.name:
                if key in METHOD_OPTIONS:
                    raise ConfigError(
                        f"'method.{key}' in {source} configures method {key!r}, but method.name "
                        f"is {self.name!r}: remove the method.{key} section or set "
                        f"method.name={key}")
                raise ConfigError(f"unknown config key 'method.{key}' in {source}; the method "
                                  f"section holds 'name' and the options of method.{self.name}")
            deep_update(self._raw.setdefault(key, {}), value)
            self._sources[key] = source
            self._options = None  # rebuilt from the updated section on next use
        # Check the section now, while the source is known (once the methods are registered,
        # which importing synrep.methods does; until then the section is checked on first use).
        if self.name in METHOD_OPTIONS or METHOD_OPTIONS.names():
            self.options  # noqa: B018

    def _update_flat(self, flat: dict[str, Any], source: str) -> None:
        if source.startswith(STORED):  # a config written before methods had sections
            cls = METHOD_OPTIONS.get(self.name)
            legacy = {}
            for f in dataclasses.fields(cls):
                prefixes = _LEGACY_PREFIXES.get(self.name, ())
                for key in (*(f"{p}_{f.name}" for p in prefixes), f.name):
                    if key in flat:
                        legacy[f.name] = flat[key]
                        break
            self.update({self.name: legacy}, source)
            return
        key = next(iter(flat))
        owners = _owners(key)
        if not owners:
            raise ConfigError(
                f"unknown config key 'method.{key}' in {source}; the method section holds "
                f"'name' and the method's own options under 'method.{self.name}'")
        where = (f"write method.{self.name}.{key}" if self.name in owners
                 else f"not of method {self.name!r}")
        raise ConfigError(f"'method.{key}' in {source}: {key} is an option of method(s) "
                          f"{', '.join(owners)}; {where}")

    def to_dict(self) -> dict[str, Any]:
        if self.name in METHOD_OPTIONS:
            return {"name": self.name, self.name: dataclasses.asdict(self.options)}
        return {"name": self.name, **copy.deepcopy(self._raw)}


def _owners(option: str) -> list[str]:
    """The registered methods whose options include ``option``."""
    return [n for n in METHOD_OPTIONS
            if option in {f.name for f in dataclasses.fields(METHOD_OPTIONS.get(n))}]


def deep_update(into: dict[str, Any], updates: dict[str, Any]) -> None:
    """Merge nested ``updates`` into ``into`` in place (mappings merge, other values replace)."""
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_update(into[k], v)
        else:
            into[k] = v


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate at batch_size 256; scaled linearly with the batch
    weight_decay: float = 0.05  # AdamW weight decay of weight matrices (none on biases, norms)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    warmup_steps: int = 100  # linear learning-rate warm-up from 0 to the peak, in steps
    min_lr_ratio: float = 0.01  # the cosine decay ends at this fraction of the peak lr
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value (SynCLR)
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps; raising it later extends a finished run
    batch_size: int = 256  # global batch (summed over ranks), in samples before augmentation
    # auto: bf16 autocast where the device computes bf16 natively (GPUs, AVX512-BF16/AMX CPUs)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    ckpt_every: int = 200  # save the resumable checkpoint (with optimizer state) every n steps
    keep_every: int = 0  # also keep the weights every n steps (checkpoints/step_000100...); 0 = no
    log_every: int = 10  # write loss, lr and throughput (metrics.jsonl, tracker) every n steps
    compile: bool = False  # torch.compile the model before training
    # split each step's batch into this many micro-batches whose gradients are summed before
    # one optimizer step; contrastive negatives are those of the micro-batch (docs/scale.md)
    accum_steps: int = 1
    grad_checkpointing: bool = False  # recompute each ViT block's activations in backward


@dataclass
class EvalConfig:
    # the labelled (real) dataset: a registered one or torchvision:<Class>
    dataset: str = "fashion-mnist"
    root: str | None = None  # eval.dataset's folder; None = its default location
    train_split: str = "train"  # split the probes are fitted on (and the kNN bank)
    test_split: str = "test"  # split the reported top-1 is measured on
    image_size: int | None = None  # resize evaluation images to this; None = model.img_size
    workers: int = 0  # DataLoader processes decoding sets read from disk (imagefolder, webdataset)
    # frozen-feature protocols: linear, sgd, knn, fewshot, zeroshot (text-tower checkpoints only);
    # finetune trains the whole encoder (minutes per epoch on a CPU), so it is opt-in
    protocols: list[str] = field(
        default_factory=lambda: ["linear", "sgd", "knn", "fewshot", "zeroshot"])
    pool: Literal["cls", "avg", "cls+avg"] = "cls+avg"  # ViT probe features (CNNs: pooled)
    n_last_blocks: int = 1  # concatenate features of the last n blocks (DINOv2 linear eval)
    # a synrep checkpoint: teacher (the EMA teacher's encoder when there is one) or student;
    # eval.model=timm:<name> or open_clip:<name>: the weights file (safetensors or a state dict)
    weights: str = "teacher"
    # "" = this run's checkpoint; timm:<name> (with eval.weights=FILE), local-dir:<folder> (a
    # timm model folder, e.g. written by `synrep export`), open_clip:<name> (with
    # eval.weights=FILE) or open_clip:local-dir:<folder> (zero-shot too): same protocols, each
    # at the model's own input size and normalisation
    model: str = ""
    # linear: L-BFGS logistic regression, C (inverse L2 strength) chosen on val_fraction
    linear_cs: list[float] = field(default_factory=lambda: [10.0**e for e in range(-3, 4)])
    linear_max_iter: int = 200  # linear: L-BFGS iterations per fit
    # sgd: one linear head per learning rate (and pooling), the best chosen on val_fraction
    sgd_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    sgd_epochs: int = 20  # sgd: passes over the training features
    knn_k: int = 20  # knn: neighbours that vote for each test image (DINO: 20)
    knn_temperature: float = 0.07  # knn: votes weighted by exp(cosine similarity / T)
    # fewshot: labelled training images per class; one logistic regression per entry
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    fewshot_seeds: int = 5  # draws per shot count; the report gives mean and spread
    fewshot_c: float = 0.01  # chosen on a train-only split of the demo features (1-10 shots)
    # prompt templates of zero-shot classification ("{}" = class name); [] = built-in ones
    zeroshot_templates: list[str] = field(default_factory=list)
    # class names written into the prompts, in label order (after eval.classes); [] = the
    # dataset's prompt names (Fashion-MNIST: the caption grammar's words, e.g. "trousers")
    zeroshot_classnames: list[str] = field(default_factory=list)
    finetune_epochs: int = 1  # finetune: passes over the training split
    finetune_batch_size: int = 256  # finetune: images per step
    finetune_lr: float = 1e-3  # finetune: peak AdamW lr of the head (not scaled by batch)
    finetune_layer_decay: float = 0.75  # finetune: lr x this per block below the head; 1 = none
    finetune_weight_decay: float = 0.05  # finetune: AdamW weight decay of weight matrices
    finetune_warmup_epochs: float = 0.1  # finetune: linear warm-up in epochs, then cosine
    finetune_label_smoothing: float = 0.1  # finetune: label smoothing of the cross-entropy
    pca_images: int = 16  # test images shown with PCA maps of their patch features; 0 = none
    val_fraction: float = 0.1  # share of each train class held out to pick linear's C, sgd's lr
    batch_size: int = 512  # images per forward pass when extracting features
    limit_train: int | None = None  # evaluate on a seeded subset of this many train images
    limit_test: int | None = None  # evaluate on a seeded subset of this many test images
    classes: list[int] | None = None  # evaluate on these labels only (relabelled 0..n-1)


@dataclass
class RewriteConfig:
    """LaCLIP caption rewrites: k paraphrases of every caption (docs/methods.md section 4)."""

    source: str = ""  # caption shards to rewrite; "" = this run's captions stage output
    k: int = 3  # rewrites written per caption
    temperature: float = 0.9  # sampling temperature of the rewrites (LLM backends)
    top_p: float = 0.95  # nucleus (top-p) sampling of the rewrites (LLM backends)


@dataclass
class CaptionsConfig:
    """The captions stage: concept banks -> prompts -> backend -> cleaned JSONL shards."""

    backend: str = "grammar"  # a registered caption backend: grammar, transformers, vllm
    model: str = ""  # local path or hub id of the language model (transformers, vllm)
    # concept banks and their sampling weights: a registered bank or a .yaml/.txt file path
    banks: dict[str, float] = field(default_factory=lambda: {"fashion": 1.0})
    # template name -> sampling weight (c: object; c_bg: object + background; c_rel: + relation)
    templates: dict[str, float] = field(
        default_factory=lambda: {"c": 1 / 3, "c_bg": 1 / 3, "c_rel": 1 / 3})
    num: int = 10000  # captions to keep (after cleaning and dedup)
    shard_size: int = 5000  # captions per JSONL shard
    demos_per_prompt: int = 3  # in-context example captions per prompt (LLM backends)
    temperature: float = 0.8  # sampling temperature of the language model
    top_p: float = 0.9  # nucleus (top-p) sampling of the language model
    max_new_tokens: int = 100  # longest completion in tokens; its first line is the caption
    batch_size: int = 64  # prompts per language-model call
    # precision of the language model's weights; auto: the backend's choice (transformers: the
    # checkpoint's dtype, float32 on a CPU)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    min_words: int = 3  # drop captions of fewer words
    max_words: int = 60  # drop captions of more words
    require_concept: bool = True  # reject captions that do not name their concept
    near_dup_threshold: float = 0.9  # MinHash Jaccard above which a caption is dropped; 1 = off
    num_perm: int = 64  # MinHash permutations
    min_accept_rate: float = 0.02  # fewer usable captions than this, after 256 tries: stop
    max_rounds: int = 50  # generation rounds per shard before giving up on filling it
    # LaCLIP rewrites (the rewrites stage): captions.rewrite.source, k, temperature, top_p
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)


@dataclass
class ImagesConfig:
    """The images stage: k images per caption from a diffusers text-to-image pipeline."""

    pipeline: str = "fashion-mini"  # a shipped pipeline, a local diffusers folder or a hub id
    captions: str = ""  # caption shards to render; "" = this run's captions stage output
    images_per_caption: int = 4  # k images per caption, each from its own seed
    guidance_scale: float = 2.5  # classifier-free guidance scale (SynCLR: 2.5); <= 1 = off
    scheduler: Literal["dpmsolver++", "ddim", "pipeline"] = "dpmsolver++"  # pipeline: as saved
    steps: int | None = None  # None = the pipeline's recommended steps (fashion-mini: 10), else 25
    resolution: int | None = None  # generation size in pixels; None = the pipeline's default
    output_size: int | None = None  # stored size (antialiased resize); None = as generated
    format: Literal["png", "jpg", "webp"] = "png"  # stored format (webp is lossless)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # half precision on GPUs
    batch_size: int = 32  # images per pipeline call
    shard_size: int = 1000  # captions per image shard
    compile: bool = False  # torch.compile the denoiser; batches are padded to one shape
    # who renders the shards: local: this process; pool: one process per images.devices entry;
    # ranks: every torchrun/SLURM rank its share; ray: Ray actors, one per device
    executor: Literal["local", "pool", "ranks", "ray"] = "local"
    devices: list[str] = field(default_factory=list)  # pool/ray workers; [] = [run.device]
    max_retries: int = 2  # re-draws (new seeds) of NaN or blank images before giving up


@dataclass
class GeneratorConfig:
    """`synrep train-generator`: the mini text-to-image model on Fashion-MNIST."""

    out: str = ""  # folder for the trained pipeline; "" = RUN/generator/pipeline
    vae_steps: int = 1500  # training steps of the autoencoder (AutoencoderKL)
    vae_batch_size: int = 128  # images per autoencoder step
    vae_lr: float = 2e-3  # peak AdamW learning rate of the autoencoder
    vae_kl: float = 1e-3  # weight of the KL term per pixel
    steps: int = 6000  # training steps of the denoiser (UNet) and text encoder
    batch_size: int = 256  # images per denoiser step
    lr: float = 1e-3  # peak AdamW learning rate of the denoiser and text encoder
    warmup_steps: int = 200  # linear warm-up of generator.lr in steps, then cosine to 0
    ema: float = 0.999  # EMA decay of the saved denoiser and text-encoder weights
    attr_p: float = 0.6  # probability that a training caption names each measured attribute
    cond_drop: float = 0.1  # probability of an empty caption (classifier-free guidance)
    ckpt_every: int = 250  # save the resumable training state every n steps (every phase)
    sample_steps: int = 10  # the pipeline's recommended sampling steps (DPM-Solver++)
    # Adversarial fine-tuning of the autoencoder's decoder with its encoder frozen (latents, so the
    # denoiser, unchanged), as Stable Diffusion's autoencoders: L1 + MSE + a hinge patch critic.
    decoder_steps: int = 0
    decoder_batch_size: int = 128  # images per decoder fine-tuning step
    decoder_lr: float = 2e-4  # AdamW learning rate of the decoder (the critic's: twice this)
    decoder_gan_weight: float = 0.05  # weight of the adversarial term next to L1 + MSE
    # a saved mini pipeline to continue from ("fashion-mini" or a folder): its autoencoder,
    # denoiser and text encoder are kept and only the decoder fine-tuning runs
    init: str = ""
    train_limit: int | None = None  # train on a seeded subset of this many images (smoke tests)
    # where to train: "auto" = the GPU where there is one, else the CPU. Batches are drawn on the
    # CPU either way, so a config draws the same data on every device (the arithmetic differs)
    device: str = "auto"
    # processes drawing the denoiser's batches ahead of the GPU; -1: none on a CPU, <= 6 on a GPU
    loader_workers: int = -1


@dataclass
class ScaleConfig:
    """``synrep scale``: pretrain at several data sizes and fit test error against data size.

    Every size trains on the first ``captions`` caption groups of the run's image shards with the
    first ``images_per_caption`` images of each, then evaluates; the test error of ``protocol`` is
    fitted with ``error(n) = a * n^-b (+ c)`` over n = captions x images per caption (the data
    scaling of docs/methods.md section 3).
    """

    # caption-group counts (the first n of the shards), each crossed with every
    # scale.images_per_caption value
    captions: list[int] = field(default_factory=lambda: [625, 1250, 2500, 5000])
    # images per caption group (the first k of each); every (n, k) pair is one data size
    images_per_caption: list[int] = field(default_factory=lambda: [4])
    steps: int | None = None  # pretraining steps at every size; None keeps train.steps
    protocol: Literal["linear", "sgd", "knn"] = "linear"  # eval protocol whose error is fitted
    # power: error = a * n^-b; power+offset: a * n^-b + c (needs three or more data sizes)
    fit: Literal["power", "power+offset"] = "power"


@dataclass
class SelectionConfig:
    """JEST data selection (docs/methods.md section 5): which examples the learner trains on.

    ``online``: every step draws a super-batch of ``B = train.batch_size / (1 - filter_ratio)``
    caption groups, scores it with the learner (and the frozen ``reference``), and trains on the
    ``train.batch_size`` groups chosen. The ``select`` stage does the same offline over the whole
    pool and writes the kept ids and new shards (``RUN/select``).
    """

    online: bool = False  # select every training batch from a scored super-batch (JEST)
    # which examples score high: learnability: learner loss - reference loss; hard_learner:
    # the learner's loss; easy_reference: minus the reference's loss
    score: Literal["learnability", "hard_learner", "easy_reference"] = "learnability"
    joint: bool = True  # False: independent per-example selection (RHO-LOSS style)
    filter_ratio: float = 0.8  # f: share of each super-batch that is dropped, in [0, 1)
    chunks: int = 16  # N: blocks of the sequential joint sampler
    temperature: float = 1.0  # examples are drawn from softmax(score / temperature)
    greedy: bool = False  # take the top scores instead of sampling (deterministic)
    reference: str = ""  # frozen reference checkpoint (needed unless score = hard_learner)
    score_size: int | None = None  # Flexi-JEST: score at this resolution; None = aug.size
    score_images: int | None = None  # score each caption with this many of its images (>= 2)
    log_ids: bool = True  # write the selected sample ids of every step (RUN/train/selected.jsonl)
    learner: str = ""  # select stage: learner checkpoint (needed unless score = easy_reference)
    super_batch: int | None = None  # select stage: groups per super-batch; None = online's B
    # The sampler's similarity GEMMs: bf16 operands (float32 sums, exps and logs) or fp32.
    # auto: bf16 where training runs in bf16 (train.precision, resolved on the device), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class LogConfig:
    """Where training and evaluation figures go besides RUN/train/metrics.jsonl and
    RUN/eval/results.json."""

    # tensorboard: RUN/train/tb; wandb: a W&B run (WANDB_MODE=offline keeps it on disk);
    # mlflow: an MLflow run; none: the JSON files only. wandb and mlflow are optional
    # installs (pip install 'synrep[wandb]' or 'synrep[mlflow]'), imported only when chosen.
    tracker: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"
    project: str = "synrep"  # the W&B project or MLflow experiment
    uri: str = ""  # the MLflow tracking URI; "" = a file store in RUN/mlruns


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: self.method.to_dict() if f.name == "method"
                else asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name or 'default'}")


_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float, lists to
    tuples). Raise ConfigError naming ``where`` on a mismatch. Never guesses: "3" is not an int."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN or infinity never reach a run or an output
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        # PyYAML follows YAML 1.1, which reads "1e-3" (no dot) as a string; YAML 1.2 and every
        # user reads it as a number.
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)  # the pattern admits no nan or inf
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _merge(obj: Any, updates: dict[str, Any], source: str, prefix: str = "") -> None:
    """Write ``updates`` into the dataclass ``obj`` in place, validating keys and types."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown config key {path!r} in {source}; valid keys"
                f"{' under ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(names)}"
            )
        current = getattr(obj, key)
        if isinstance(current, MethodConfig):
            if not isinstance(value, dict):
                raise ConfigError(f"{path!r} in {source} must be a mapping, got {value!r}")
            current.update(value, source)
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path!r} in {source} must be a mapping, got {value!r}")
            _merge(current, value, source, f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{path!r} in {source}"))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "run.dir=/tmp/x"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML "
                              f"({yaml_error_summary(e)})") from None
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


#: The configs shipped inside the package (``synrep run quickstart`` finds quickstart.yaml).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, str]:
    """Name -> first comment line (what it is) of every config shipped with synrep."""
    out = {}
    for p in sorted(SHIPPED_CONFIGS.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in p.read_text().splitlines()
                      if ln.startswith("#") and ln.strip("# ").strip()), "")
        out[p.stem] = first
    return out


def resolve_config_path(path: str | Path) -> Path:
    """``path`` when it is a file, else the shipped config of that name (``quickstart`` or
    ``quickstart.yaml``), from any directory."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    shipped = SHIPPED_CONFIGS / f"{name}.yaml"
    if (p.parent == Path(".") or p.parent.name == "configs") and shipped.is_file():
        return shipped
    raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML file or a shipped "
                      f"config: {', '.join(shipped_configs())} (synrep config --list)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file (or a shipped config's
    name), and overrides."""
    cfg = Config()
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML "
                              f"({yaml_error_summary(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        _merge(cfg, data, f"config file {str(path)!r}")
        if not cfg.run.name:
            cfg.run.name = path.stem
    if overrides:
        _merge(cfg, parse_overrides(overrides), "command-line overrides")
    if not cfg.run.name:
        cfg.run.name = "default"
    if not cfg.run.dir:
        cfg.run.dir = f"runs/{cfg.run.name}"
    check_config(cfg)
    return cfg


# -- value rules, checked when a config loads ------------------------------------------------
# "section.key" -> rule. A rule is a comparison (">= 1", "> 0"), an interval ("in [0, 1)"),
# "each <rule>" for lists, or "pair <rule>" for (low, high) pairs that must also be ordered.
# Options that may be null are only checked when set. Method options carry their own rules
# (``MethodOptions.rules``).
RULES: dict[str, str] = {
    "run.seed": ">= 0", "run.threads": ">= 0",
    "data.max_captions": ">= 1", "data.max_images_per_caption": ">= 1",
    "data.image_size": ">= 1",
    "model.in_chans": ">= 1", "model.img_size": ">= 1", "model.drop_path": "in [0, 1)",
    "model.patch_drop": "in [0, 1)", "model.patch_drop_unmasked_steps": ">= 0",
    "model.std": "> 0",
    "aug.size": ">= 1", "aug.scale": "pair in (0, 1]", "aug.ratio": "pair > 0",
    "aug.hflip": "in [0, 1]", "aug.jitter_p": "in [0, 1]", "aug.brightness": ">= 0",
    "aug.contrast": ">= 0", "aug.saturation": ">= 0", "aug.hue": "in [0, 0.5]",
    "aug.grayscale_p": "in [0, 1]", "aug.blur_p": "in [0, 1]", "aug.blur_sigma": "pair > 0",
    "aug.solarize_p": "in [0, 1]", "aug.sharpen_p": "in [0, 1]", "aug.sharpen_amount": "pair >= 0",
    "aug.sharpen_sigma": "> 0", "aug.noise_p": "in [0, 1]", "aug.noise_std": ">= 0",
    "aug.erase_p": "in [0, 1]", "aug.erase_scale": "pair in (0, 1)",
    "optim.lr": "> 0", "optim.weight_decay": ">= 0", "optim.betas": "each in [0, 1)",
    "optim.warmup_steps": ">= 0", "optim.min_lr_ratio": "in [0, 1]",
    "optim.weight_decay_end": ">= 0", "optim.grad_clip": ">= 0",
    "train.steps": ">= 1", "train.batch_size": ">= 1", "train.ckpt_every": ">= 1",
    "train.keep_every": ">= 0", "train.log_every": ">= 1", "train.accum_steps": ">= 1",
    "data.workers": ">= 0", "eval.workers": ">= 0", "data.mixture": "each > 0",
    "eval.image_size": ">= 1", "eval.n_last_blocks": ">= 1", "eval.linear_cs": "each > 0",
    "eval.linear_max_iter": ">= 1", "eval.sgd_lrs": "each > 0", "eval.sgd_epochs": ">= 1",
    "eval.knn_k": ">= 1", "eval.knn_temperature": "> 0", "eval.fewshot_shots": "each >= 1",
    "eval.fewshot_seeds": ">= 1", "eval.fewshot_c": "> 0", "eval.finetune_epochs": ">= 1",
    "eval.finetune_batch_size": ">= 1", "eval.finetune_lr": "> 0",
    "eval.finetune_layer_decay": "in (0, 1]", "eval.finetune_weight_decay": ">= 0",
    "eval.finetune_warmup_epochs": ">= 0", "eval.finetune_label_smoothing": "in [0, 1)",
    "eval.pca_images": ">= 0", "eval.val_fraction": "in (0, 1)", "eval.batch_size": ">= 1",
    "eval.limit_train": ">= 1", "eval.limit_test": ">= 1",
    "captions.num": ">= 1", "captions.shard_size": ">= 1", "captions.demos_per_prompt": ">= 0",
    "captions.temperature": ">= 0", "captions.top_p": "in (0, 1]",
    "captions.max_new_tokens": ">= 1", "captions.batch_size": ">= 1", "captions.min_words": ">= 1",
    "captions.max_words": ">= 1", "captions.near_dup_threshold": "in (0, 1]",
    "captions.num_perm": ">= 1", "captions.min_accept_rate": "in [0, 1]",
    "captions.max_rounds": ">= 1", "captions.banks": "each >= 0", "captions.templates": "each >= 0",
    "captions.rewrite.k": ">= 1", "captions.rewrite.temperature": ">= 0",
    "captions.rewrite.top_p": "in (0, 1]",
    "images.images_per_caption": ">= 1", "images.guidance_scale": ">= 0", "images.steps": ">= 1",
    "images.resolution": ">= 8", "images.output_size": ">= 8", "images.batch_size": ">= 1",
    "images.shard_size": ">= 1", "images.max_retries": ">= 0",
    "generator.vae_steps": ">= 0", "generator.vae_batch_size": ">= 1", "generator.vae_lr": "> 0",
    "generator.vae_kl": ">= 0", "generator.steps": ">= 0", "generator.batch_size": ">= 1",
    "generator.lr": "> 0", "generator.warmup_steps": ">= 0", "generator.ema": "in [0, 1)",
    "generator.attr_p": "in [0, 1]", "generator.cond_drop": "in [0, 1]",
    "generator.ckpt_every": ">= 1", "generator.sample_steps": ">= 1",
    "generator.decoder_steps": ">= 0", "generator.decoder_batch_size": ">= 1",
    "generator.decoder_lr": "> 0", "generator.decoder_gan_weight": ">= 0",
    "generator.train_limit": ">= 1", "generator.loader_workers": ">= -1",
    "scale.captions": "each >= 1", "scale.images_per_caption": "each >= 1", "scale.steps": ">= 1",
    "selection.filter_ratio": "in [0, 1)", "selection.chunks": ">= 1",
    "selection.temperature": "> 0", "selection.score_size": ">= 1",
    "selection.score_images": ">= 2", "selection.super_batch": ">= 1",
}
_RULE = re.compile(r"(?:(each|pair) )?(?:(>=|>) *(-?[\d.]+)"
                   r"|in ([\[(]) *(-?[\d.]+), *(-?[\d.]+) *([\])]))")


def _holds(rule: str, x: float) -> bool:
    m = _RULE.fullmatch(rule.strip())
    if m is None:
        raise ValueError(f"bad config rule {rule!r}")
    _, op, bound, left, lo, hi, right = m.groups()
    if op is not None:
        return x >= float(bound) if op == ">=" else x > float(bound)
    lo_ok = x >= float(lo) if left == "[" else x > float(lo)
    hi_ok = x <= float(hi) if right == "]" else x < float(hi)
    return lo_ok and hi_ok


def check_value(key: str, value: Any, rule: str) -> None:
    """Raise a ConfigError naming ``key``, ``value`` and the valid range unless ``value`` obeys
    ``rule`` (see :data:`RULES`); None passes (an unset optional value)."""
    if value is None:
        return
    kind = rule.split(" ", 1)[0]
    if kind in ("each", "pair"):
        body = rule.split(" ", 1)[1]
        items = list(value.values()) if isinstance(value, dict) else list(value)
        ok = all(_holds(body, float(v)) for v in items)
        if kind == "pair":
            ok = ok and items[0] <= items[1]
        if not ok:
            what = ("two values, low <= high, each " if kind == "pair" else "every value ") + body
            raise ConfigError(f"{key}={_show(value)} is out of range: {what}")
        return
    if not _holds(rule, float(value)):
        raise ConfigError(f"{key}={_show(value)} is out of range: must be {rule}")


def _show(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def check_config(cfg: Config) -> None:
    """Every numeric option against its rule (:data:`RULES` and the active method's
    ``rules``), plus the rules that relate two options. Called by :func:`load_config`."""
    for key, rule in RULES.items():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        check_value(key, node, rule)
    if cfg.captions.max_words < cfg.captions.min_words:
        raise ConfigError(f"captions.max_words={cfg.captions.max_words} is below "
                          f"captions.min_words={cfg.captions.min_words}")
    if cfg.captions.banks and sum(cfg.captions.banks.values()) <= 0:
        raise ConfigError("captions.banks: the sampling weights must not all be 0")
    if cfg.method.name in METHOD_OPTIONS:
        opts = cfg.method.options
        for cls in reversed(type(opts).__mro__):
            for key, rule in vars(cls).get("rules", {}).items():
                check_value(f"{opts.section}.{key}", getattr(opts, key), rule)


#: Source prefix of stored configs: their flat method section is read as an older synrep wrote it.
STORED = "the config stored in"


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a config stored in a run directory or checkpoint (``source`` names it)."""
    cfg = Config()
    _merge(cfg, data, source if source.startswith(STORED) else f"{STORED} {source}")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(json.loads(cfg.to_json()), sort_keys=False)
    with atomic_output(path, "w") as f:  # a name unique to this process; ENOSPC: one DataError
        f.write(text)


# -- the configuration reference, generated from the dataclasses above ------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comments in ``cls``'s source: the block above it and the one after it."""
    lines = inspect.getsource(cls).splitlines(keepends=True)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        m = re.match(r"    (\w+): ", line)
        if not m or m.group(1) not in {f.name for f in dataclasses.fields(cls)}:
            continue
        above, j = [], i - 1
        while j in comments and lines[j - 1].lstrip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        after = [comments[i]] if i in comments and not line.lstrip().startswith("#") else []
        text = " ".join(above + after)
        out[m.group(1)] = re.sub(r"noqa: \S+", "", text).strip()
    return out


def _default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return "`" + json.dumps(value, default=str) + "`"


def _table(cls: type, prefix: str) -> list[str]:
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # inherited options keep the comments of their class
        if dataclasses.is_dataclass(base):
            comments.update({k: v for k, v in _field_comments(base).items() if v})
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        kind = str(f.type).replace("|", "\\|")
        text = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}.{f.name}` | `{kind}` | {_default_of(f)} | {text} |")
    return rows


def config_reference() -> str:
    """Every option of every section (and of every registered method's section) as Markdown:
    key, type, default and the comment beside it in the source (``docs/config.md``)."""
    out = ["# Configuration reference", "",
           "Every option synrep reads, with its type and default. A YAML file sets any of them "
           "by section (`train: {steps: 2000}`), a command line by dotted key "
           "(`train.steps=2000`); an unknown key or a value of the wrong type is an error. "
           "Generated from the config dataclasses by `synrep config --reference`.", ""]
    for f in dataclasses.fields(Config):
        out.append(f"## `{f.name}`")
        out.append("")
        if f.name == "method":
            out += ["| key | type | default | meaning |", "|---|---|---|---|",
                    "| `method.name` | `str` | `\"simclr\"` | the objective: "
                    f"{', '.join(METHOD_OPTIONS.names())} |", ""]
            for name in METHOD_OPTIONS.names():
                cls = METHOD_OPTIONS.get(name)
                out += [f"### `method.{name}`", ""]
                doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
                if doc and not doc.startswith(cls.__name__ + "("):
                    out += [doc, ""]
                out += _table(cls, f"method.{name}") + [""]
            continue
        cls = f.default_factory  # type: ignore[misc]
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        if doc and not doc.startswith(cls.__name__ + "("):
            out += [doc, ""]
        out += _table(cls, f.name) + [""]
    return "\n".join(out)
