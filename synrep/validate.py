"""Every name a config gives a registry, and every rule between options, checked when the config
is loaded by a command: before any stage runs, so a typo in ``model.backbone`` or
``eval.protocols`` is one line at start-up, not an error after hours of generation and training.

Each failure is one :class:`ConfigError` naming the key, the value and the valid choices.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torchvision.datasets

from synrep.captions.base import BACKENDS
from synrep.concepts.banks import BANKS
from synrep.config import Config
from synrep.data.datasets import DATASETS, TORCHVISION_PREFIX
from synrep.errors import ConfigError
from synrep.eval.stage import PROTOCOLS
from synrep.factory import check_external_model
from synrep.methods import METHODS
from synrep.models.backbones import BACKBONES
from synrep.models.text import TEXT_MODELS
from synrep.stages import STAGES, stage_names


def _choose(key: str, value: object, choices: list[str], extra: str = "") -> ConfigError:
    return ConfigError(f"{key}={value!r} is unknown; choose one of: {', '.join(choices)}{extra}")


def check_dataset(key: str, name: str) -> None:
    """A registered dataset or ``torchvision:<Class>``."""
    if name.startswith(TORCHVISION_PREFIX):
        cls = name[len(TORCHVISION_PREFIX):]
        if not isinstance(getattr(torchvision.datasets, cls, None), type):
            raise ConfigError(f"{key}={name!r}: torchvision.datasets has no dataset class "
                              f"{cls!r}")
        return
    if name not in DATASETS:
        raise _choose(key, name, DATASETS.names(), f", or {TORCHVISION_PREFIX}<ClassName>")


def check_backbone(key: str, name: str) -> None:
    """A registered backbone or ``timm:<any timm model>``."""
    if name.startswith("timm:"):
        if not timm.is_model(name[len("timm:"):]):
            raise ConfigError(f"{key}={name!r}: timm has no model {name[len('timm:'):]!r}")
        return
    if name not in BACKBONES:
        raise _choose(key, name, BACKBONES.names(), ", or timm:<model name>")


def validate(cfg: Config) -> None:
    """Check ``cfg`` against every registry and cross-field rule (see the module docstring).

    Raises:
        ConfigError: the first problem found, in one line.
    """
    stages = list(cfg.run.stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise _choose("run.stages", bad[0], stage_names())
    if cfg.method.name not in METHODS:
        raise _choose("method.name", cfg.method.name, METHODS.names())
    check_backbone("model.backbone", cfg.model.backbone)
    if cfg.captions.backend not in BACKENDS:
        raise _choose("captions.backend", cfg.captions.backend, BACKENDS.names())
    for spec in cfg.captions.banks:
        if spec not in BANKS and "/" not in spec and not spec.endswith((".yaml", ".yml", ".txt")):
            raise _choose("captions.banks", spec, BANKS.names(), ", or a .yaml/.txt file")
    text_model = getattr(cfg.method.options, "text_model", None)
    if text_model is not None and text_model not in TEXT_MODELS \
            and not Path(text_model).expanduser().is_dir():
        raise ConfigError(f"method.{cfg.method.name}.text_model={text_model!r} is neither a "
                          f"built-in text model ({', '.join(TEXT_MODELS.names())}) nor a folder; "
                          "give a folder written by save_pretrained")
    bad = [p for p in cfg.eval.protocols if p not in PROTOCOLS]
    if bad:
        raise _choose("eval.protocols", bad[0], sorted(PROTOCOLS))
    check_dataset("eval.dataset", cfg.eval.dataset)

    d = cfg.data
    method = METHODS.get(cfg.method.name)
    if d.source == "dataset":
        check_dataset("data.dataset", d.dataset)
    if d.source == "mixture":
        if not d.mixture:
            raise ConfigError("data.source=mixture needs data.mixture: {<shards or "
                              "dataset:<name>>: weight, ...}")
        for spec in d.mixture:
            if spec.startswith("dataset:"):
                check_dataset(f"data.mixture key {spec!r}", spec[len("dataset:"):])
    if d.source == "webdataset" and not d.shards:
        raise ConfigError("data.source=webdataset needs data.shards (a folder, a .tar, a brace "
                          "pattern or a list)")
    if method.batch_kind == "groups" and d.source not in ("shards", "mixture"):
        raise ConfigError(f"method {cfg.method.name!r} trains on caption groups: set "
                          f"data.source=shards (data.source={d.source!r})")
    if method.has_text_tower and d.source == "dataset":
        raise ConfigError(f"method {cfg.method.name!r} trains on captions: set "
                          "data.source=shards or webdataset (with txt members)")
    if d.crop == "random" and d.image_size is None:
        raise ConfigError("data.crop=random needs data.image_size (the crop's output size)")
    if d.loader == "stream" and d.source == "dataset" and d.dataset != "imagefolder":
        raise ConfigError(f"data.loader=stream reads shards or image folders; dataset "
                          f"{d.dataset!r} is loaded into memory: use data.loader=auto or memory")
    if cfg.selection.online and d.loader == "stream":
        raise ConfigError("selection.online scores a pool held in RAM: set data.loader=memory "
                          "or auto")

    e = cfg.eval
    if e.model:
        check_external_model(e.model, e.weights)
    elif e.weights not in ("teacher", "student"):
        raise ConfigError(f"eval.weights={e.weights!r}: choose teacher or student (a weights "
                          "file goes with eval.model=timm:<name>)")
