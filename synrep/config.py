"""Typed configuration: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.

Every field has a type and a default; a YAML file and command-line overrides change only what they
name. Unknown keys and values of the wrong type are errors that name the key and where it came
from. The resolved config is written into the run directory and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from synrep.errors import ConfigError
from synrep.utils import yaml_error_summary


@dataclass
class RunConfig:
    name: str = ""  # defaults to the config file's stem
    dir: str = ""  # defaults to runs/<name>
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"; under torchrun each rank takes cuda:LOCAL_RANK
    stages: list[str] = field(default_factory=lambda: ["train", "eval"])
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default


@dataclass
class DataConfig:
    source: Literal["dataset", "shards"] = "dataset"
    dataset: str = "fashion-mnist"  # a registered dataset, used when source = "dataset"
    root: str | None = None  # dataset folder; None uses the dataset's default location
    split: str = "train"
    shards: str = ""  # caption-group shards for source = "shards"; "" = this run's images stage
    max_captions: int | None = None  # train on the first n caption groups only (data scaling)
    max_images_per_caption: int | None = None  # and on the first k images of each
    classes: list[int] | None = None  # keep only images (or caption groups) of these labels
    image_size: int | None = None  # resize on load; None keeps the stored size


@dataclass
class ModelConfig:
    backbone: str = "vit_tiny_p7_28"  # a registered backbone or "timm:<any timm model>"
    in_chans: int = 1
    img_size: int = 28
    drop_path: float = 0.0
    global_pool: Literal["token", "avg"] = "token"  # ViT feature used by training objectives
    mean: float = 0.5  # input normalisation applied inside the encoder to [0, 1] pixels
    std: float = 0.5


@dataclass
class AugConfig:
    """SimCLR-strong augmentation, applied on batches on the training device."""

    size: int = 28
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    sharpen_p: float = 0.0  # unsharp masking x + a * (x - blur(x)), a uniform in sharpen_amount
    sharpen_amount: tuple[float, float] = (0.5, 2.0)
    sharpen_sigma: float = 1.0  # blur width in pixels at 28 px (scaled with aug.size)
    noise_p: float = 0.0  # additive Gaussian pixel noise
    noise_std: float = 0.05
    erase_p: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.2)


@dataclass
class MethodConfig:
    name: str = "simclr"  # a registered method: synclr, stablerep, simclr, supervised, mae, mixedae
    temperature: float = 0.2
    proj_layers: int = 2  # projection MLP depth (1 = linear)
    proj_hidden_dim: int = 1024
    proj_dim: int = 128
    local_crops: int = 0  # multi-crop: extra small views per image (all positives)
    local_size: int = 14
    local_scale: tuple[float, float] = (0.1, 0.4)
    images_per_caption: int = 2  # m images of each caption per batch (caption-group methods)
    num_classes: int = 10  # supervised method only
    label_smoothing: float = 0.0
    # SynCLR (docs/methods.md section 1): EMA teacher keys, multi-crop queries, iBOT masking.
    global_crops: int = 1  # global views per image (queries and keys)
    teacher: bool = True  # keys from an EMA teacher; False = keys are the student's own features
    ema_momentum: float = 0.994  # teacher momentum at step 0, cosine-annealed to ema_momentum_end
    ema_momentum_end: float = 1.0
    contrastive_weight: float = 1.0  # multi-positive contrastive term; 0 removes it
    ibot_weight: float = 1.0  # iBOT masked-token term; 0 removes it (and the iBOT head)
    ibot_prototypes: int = 1024  # prototypes of the iBOT head (the paper: 65,536)
    ibot_hidden_dim: int = 512
    ibot_bottleneck_dim: int = 128
    ibot_mask: Literal["block", "random"] = "block"  # block-wise (BEiT) or uniformly random tokens
    ibot_mask_prob: float = 0.5  # share of global crops that are masked
    ibot_mask_ratio: tuple[float, float] = (0.1, 0.5)  # share of tokens masked, uniform per crop
    ibot_student_temp: float = 0.1
    ibot_teacher_temp: float = 0.07  # teacher temperature after warm-up
    ibot_teacher_temp_start: float = 0.04
    ibot_teacher_temp_warmup: int = 0  # steps of linear teacher-temperature warm-up
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations for the teacher's token targets
    # Flexi-JEST's mixed-resolution training (docs/methods.md section 5): this share of each batch's
    # caption groups is trained at low_res_size (global crops downsampled, antialiased), so the
    # learner also knows the low resolution it scores at (selection.score_size) and steps cost less.
    low_res_share: float = 0.0  # in [0, 1); 0 trains every group at aug.size (synclr only)
    low_res_size: int = 14
    # MAE (He et al. 2022): reconstruct the pixels of randomly masked patches.
    mae_mask_ratio: float = 0.75  # share of patches hidden from the encoder, in (0, 1)
    mae_decoder_dim: int = 128  # width of the lightweight decoder (divisible by its heads)
    mae_decoder_depth: int = 2  # transformer blocks of the decoder
    mae_decoder_heads: int = 4  # attention heads of each decoder block
    mae_norm_pix: bool = True  # targets: each patch normalised by its own mean and variance
    # MixedAE (Chen et al. 2023): mix groups of 1/r images patch-wise instead of masking; uses the
    # mae_decoder_* / mae_norm_pix keys above and proj_hidden_dim / proj_dim for its MLP head.
    mixedae_ratio: float = 0.25  # share r of a mixed image's patches from each source: 1/r images
    #   per group, 1/r an integer >= 2, r * (patches per image) an integer >= 2, and the batch
    #   (per rank) divisible by 1/r
    mixedae_contrastive_weight: float = 0.1  # weight of the homologous contrastive term; 0 = off
    mixedae_temperature: float = 0.2  # InfoNCE temperature of the homologous contrastive term
    mixedae_homologous: bool = True  # top-K homologous attention in pretraining; False = ordinary
    # Language supervision (docs/methods.md sections 2, 4): clip and stablerep_pp add a text tower;
    # image and text embeddings meet in proj_dim, compared with a learned logit scale.
    text_model: str = "fashion-text"  # a built-in text tower, or a folder saved by save_pretrained
    text_width: int = 256  # built-in tower: transformer width, layers, heads (width % heads == 0)
    text_layers: int = 3
    text_heads: int = 4
    text_context: int = 32  # tokens per text, special tokens included (longer texts are cut)
    clip_init_temperature: float = 0.07  # the logit scale starts at 1 / this (CLIP: 0.07)
    clip_max_logit_scale: float = 100.0  # the learned logit scale is clamped here (CLIP: 100)
    text_weight: float = 1.0  # stablerep_pp: weight of the image-text term (image-image: 1)
    rewrites: bool = False  # LaCLIP: each step a caption or one of its RUN/rewrites, uniformly
    # MoCE (Liu et al. 2023): MAE whose last blocks hold cluster-conditional experts; uses the
    # mae_* keys above. The clusters come from the `cluster` stage (k-means on moce_features).
    moce_features: str = ""  # checkpoint whose encoder features cluster the images (an MAE)
    moce_clusters: int = 16  # k-means clusters of the pretraining images
    moce_kmeans_iters: int = 50  # Lloyd iterations (k-means++ seeding, run.seed)
    moce_cluster_file: str = ""  # clusters.safetensors to train with; "" = RUN/cluster's
    moce_experts: int = 4  # experts in each MoE block
    moce_blocks: int = 2  # the last n encoder blocks get MoE MLPs
    moce_top_k: int = 1  # experts per image (all its tokens share the route); search needs 1
    moce_importance_weight: float = 0.01  # V-MoE importance loss (CV^2 of summed gate probs)
    moce_load_weight: float = 0.01  # load loss E * sum_e f_e * P_e (fraction routed x mean prob)
    # "" trains from scratch; an MAE checkpoint of the same shape starts every weight from it and
    # every expert from its block's dense MLP (sparse upcycling); gates start fresh
    moce_init: str = ""


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate at batch_size 256; scaled linearly with the batch
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value (SynCLR)
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256  # global batch (summed over ranks), in samples before augmentation
    # auto: bf16 autocast where the device computes bf16 natively (GPUs, AVX512-BF16/AMX CPUs)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    ckpt_every: int = 200
    keep_every: int = 0  # also keep the weights every n steps (checkpoints/step_000100...); 0 = no
    log_every: int = 10
    compile: bool = False


@dataclass
class EvalConfig:
    dataset: str = "fashion-mnist"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_size: int | None = None
    # frozen-feature protocols: linear, sgd, knn, fewshot, zeroshot (text-tower checkpoints only);
    # finetune trains the whole encoder (minutes per epoch on a CPU), so it is opt-in
    protocols: list[str] = field(
        default_factory=lambda: ["linear", "sgd", "knn", "fewshot", "zeroshot"])
    pool: Literal["cls", "avg", "cls+avg"] = "cls+avg"  # ViT probe features (CNNs: pooled)
    n_last_blocks: int = 1  # concatenate features of the last n blocks (DINOv2 linear eval)
    weights: Literal["teacher", "student"] = "teacher"  # EMA teacher's encoder when there is one
    linear_cs: list[float] = field(default_factory=lambda: [10.0**e for e in range(-3, 4)])
    linear_max_iter: int = 200
    sgd_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    sgd_epochs: int = 20
    knn_k: int = 20
    knn_temperature: float = 0.07
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    fewshot_seeds: int = 5  # draws per shot count; the report gives mean and spread
    fewshot_c: float = 0.01  # chosen on a train-only split of the demo features (1-10 shots)
    # prompt templates of zero-shot classification ("{}" = class name); [] = built-in ones
    zeroshot_templates: list[str] = field(default_factory=list)
    # class names written into the prompts, in label order (after eval.classes); [] = the
    # dataset's prompt names (Fashion-MNIST: the caption grammar's words, e.g. "trousers")
    zeroshot_classnames: list[str] = field(default_factory=list)
    finetune_epochs: int = 1
    finetune_batch_size: int = 256
    finetune_lr: float = 1e-3
    finetune_layer_decay: float = 0.75
    finetune_weight_decay: float = 0.05
    finetune_warmup_epochs: float = 0.1
    finetune_label_smoothing: float = 0.1
    pca_images: int = 16  # test images shown with PCA maps of their patch features; 0 = none
    val_fraction: float = 0.1
    batch_size: int = 512
    limit_train: int | None = None  # evaluate on a seeded subset of this many train images
    limit_test: int | None = None
    classes: list[int] | None = None  # evaluate on these labels only (relabelled 0..n-1)


@dataclass
class RewriteConfig:
    """LaCLIP caption rewrites: k paraphrases of every caption (docs/methods.md section 4)."""

    source: str = ""  # caption shards to rewrite; "" = this run's captions stage output
    k: int = 3
    temperature: float = 0.9
    top_p: float = 0.95


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
    shard_size: int = 5000
    demos_per_prompt: int = 3
    temperature: float = 0.8
    top_p: float = 0.9
    max_new_tokens: int = 100
    batch_size: int = 64  # prompts per language-model call
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    min_words: int = 3
    max_words: int = 60
    require_concept: bool = True  # reject captions that do not name their concept
    near_dup_threshold: float = 0.9  # MinHash Jaccard above which a caption is dropped; 1 = off
    num_perm: int = 64  # MinHash permutations
    min_accept_rate: float = 0.02  # fewer usable captions than this, after 256 tries: stop
    max_rounds: int = 50  # generation rounds per shard before giving up on filling it
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)


@dataclass
class ImagesConfig:
    """The images stage: k images per caption from a diffusers text-to-image pipeline."""

    pipeline: str = "fashion-mini"  # a shipped pipeline, a local diffusers folder or a hub id
    captions: str = ""  # caption shards to render; "" = this run's captions stage output
    images_per_caption: int = 4
    guidance_scale: float = 2.5
    scheduler: Literal["dpmsolver++", "ddim", "pipeline"] = "dpmsolver++"  # pipeline: as saved
    steps: int | None = None  # None = the pipeline's recommended steps (fashion-mini: 10), else 25
    resolution: int | None = None  # generation size in pixels; None = the pipeline's default
    output_size: int | None = None  # stored size (antialiased resize); None = as generated
    format: Literal["png", "jpg", "webp"] = "png"  # stored format (webp is lossless)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # half precision on GPUs
    batch_size: int = 32  # images per pipeline call
    shard_size: int = 1000  # captions per image shard
    compile: bool = False  # torch.compile the denoiser; batches are padded to one shape
    executor: Literal["local", "pool", "ranks", "ray"] = "local"
    devices: list[str] = field(default_factory=list)  # pool/ray workers; [] = [run.device]
    max_retries: int = 2  # re-draws (new seeds) of NaN or blank images before giving up


@dataclass
class GeneratorConfig:
    """`synrep train-generator`: the mini text-to-image model on Fashion-MNIST."""

    out: str = ""  # folder for the trained pipeline; "" = RUN/generator/pipeline
    vae_steps: int = 1500
    vae_batch_size: int = 128
    vae_lr: float = 2e-3
    vae_kl: float = 1e-3  # weight of the KL term per pixel
    steps: int = 6000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 200
    ema: float = 0.999
    attr_p: float = 0.6  # probability that a training caption names each measured attribute
    cond_drop: float = 0.1  # probability of an empty caption (classifier-free guidance)
    ckpt_every: int = 250
    sample_steps: int = 10  # the pipeline's recommended sampling steps (DPM-Solver++)
    # Adversarial fine-tuning of the autoencoder's decoder with its encoder frozen (latents, so the
    # denoiser, unchanged), as Stable Diffusion's autoencoders: L1 + MSE + a hinge patch critic.
    decoder_steps: int = 0
    decoder_batch_size: int = 128
    decoder_lr: float = 2e-4
    decoder_gan_weight: float = 0.05
    init: str = ""  # a saved mini pipeline to continue from ("fashion-mini" or a folder): its
    # autoencoder, denoiser and text encoder are kept and only the decoder fine-tuning runs
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

    captions: list[int] = field(default_factory=lambda: [625, 1250, 2500, 5000])
    images_per_caption: list[int] = field(default_factory=lambda: [4])
    steps: int | None = None  # pretraining steps at every size; None keeps train.steps
    protocol: Literal["linear", "sgd", "knn"] = "linear"
    fit: Literal["power", "power+offset"] = "power"


@dataclass
class SelectionConfig:
    """JEST data selection (docs/methods.md section 5): which examples the learner trains on.

    ``online``: every step draws a super-batch of ``B = train.batch_size / (1 - filter_ratio)``
    caption groups, scores it with the learner (and the frozen ``reference``), and trains on the
    ``train.batch_size`` groups chosen. The ``select`` stage does the same offline over the whole
    pool and writes the kept ids and new shards (``RUN/select``).
    """

    online: bool = False
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
            return float(value)
        # PyYAML follows YAML 1.1, which reads "1e-3" (no dot) as a string; YAML 1.2 and every
        # user reads it as a number.
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)
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
        if dataclasses.is_dataclass(current):
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file, and overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
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
    return cfg


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a config stored in a run directory or checkpoint."""
    cfg = Config()
    _merge(cfg, data, source)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(cfg.to_json()), sort_keys=False))
    tmp.replace(path)
