"""The names each registry holds, known without importing torch.

The command line checks the names a config gives (``method.name``, ``model.backbone``,
``eval.protocols`` ...) against these lists before it loads the deep-learning stack, which takes
several seconds on a small machine: a typo then fails at once, with the valid choices. The full
check (:mod:`synrep.validate`, against the registries themselves and every cross-field rule) runs
after, as before. ``tests/test_names.py`` keeps each list equal to its registry: a new method,
backbone, dataset, protocol, stage, caption backend, text model or concept bank is added here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from synrep.config import deep_update, parse_overrides, resolve_config_path
from synrep.errors import ConfigError

METHODS = ("clip", "mae", "mixedae", "moce", "simclr", "stablerep", "stablerep_pp", "supervised",
           "synclr")
BACKBONES = ("resnet18_28", "vit_base_patch16_224", "vit_large_patch14_224", "vit_small_p7_28",
             "vit_small_patch16_224", "vit_tiny_c7_28", "vit_tiny_p4_28", "vit_tiny_p7_28")
DATASETS = ("fashion-glyphs", "fashion-mnist", "glyphs", "imagefolder", "webdataset")
PROTOCOLS = ("fewshot", "finetune", "knn", "linear", "sgd", "zeroshot")
STAGES = ("captions", "rewrites", "images", "select", "cluster", "train", "search", "eval",
          "report")  # in pipeline order
BACKENDS = ("grammar", "transformers", "vllm")
TEXT_MODELS = ("fashion-text",)
BANKS = ("fashion", "imagenet-12k", "imagenet-1k", "imagenet-21k", "places", "textures")

#: Names with these prefixes are open-ended (any timm model, any torchvision dataset class) and
#: are checked by the full validation, which imports timm and torchvision.
OPEN_PREFIXES = ("timm:", "torchvision:")


def _unknown(key: str, value: object, choices: tuple[str, ...], extra: str = "") -> ConfigError:
    return ConfigError(f"{key}={value!r} is unknown; choose one of: "
                       f"{', '.join(choices)}{extra}")


def _get(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_names(raw: dict[str, Any]) -> None:
    """Check the registry names in a raw (not yet typed) config mapping.

    Keys the mapping does not set keep their defaults, which are valid; malformed values are left
    to the full load, which names them.

    Raises:
        ConfigError: a name that no registry holds, with the valid choices.
    """
    checks = (("method.name", METHODS, ""), ("captions.backend", BACKENDS, ""),
              ("model.backbone", BACKBONES, ", or timm:<model name>"),
              ("eval.dataset", DATASETS, ", or torchvision:<ClassName>"))
    for key, choices, extra in checks:
        value = _get(raw, key)
        if isinstance(value, str) and value not in choices and not value.startswith(OPEN_PREFIXES):
            raise _unknown(key, value, choices, extra)
    dataset = _get(raw, "data.dataset")  # read only when data.source is dataset (the default)
    if _get(raw, "data.source") in (None, "dataset") and isinstance(dataset, str) \
            and dataset not in DATASETS and not dataset.startswith(OPEN_PREFIXES):
        raise _unknown("data.dataset", dataset, DATASETS, ", or torchvision:<ClassName>")
    for key, choices in (("run.stages", STAGES), ("eval.protocols", PROTOCOLS)):
        values = _get(raw, key)
        for v in values if isinstance(values, list) else []:
            if isinstance(v, str) and v not in choices:
                raise _unknown(key, v, choices)
    method = _get(raw, "method.name")
    text_model = _get(raw, f"method.{method}.text_model") if isinstance(method, str) else None
    if isinstance(text_model, str) and text_model not in TEXT_MODELS \
            and not Path(text_model).expanduser().is_dir():
        raise ConfigError(f"method.{method}.text_model={text_model!r} is neither a built-in text "
                          f"model ({', '.join(TEXT_MODELS)}) nor a folder; give a folder written "
                          "by save_pretrained")
    banks = _get(raw, "captions.banks")
    for spec in banks if isinstance(banks, dict) else []:
        if isinstance(spec, str) and spec not in BANKS and "/" not in spec \
                and not spec.endswith((".yaml", ".yml", ".txt")):
            raise _unknown("captions.banks", spec, BANKS, ", or a .yaml/.txt file")


def prescreen(path: str | None, overrides: list[str]) -> None:
    """Check the names of the config ``path`` (a file or a shipped config's name) with
    ``overrides`` applied, reading only YAML. Anything that does not parse is left to the full
    load, which reports it.

    Raises:
        ConfigError: a registry name that does not exist.
    """
    raw: dict[str, Any] = {}
    try:
        if path is not None:
            data = yaml.safe_load(resolve_config_path(path).read_text()) or {}
            if isinstance(data, dict):
                raw = data
        updates = parse_overrides(overrides)
    except (ConfigError, OSError, yaml.YAMLError, UnicodeDecodeError):
        return
    deep_update(raw, updates)
    check_names(raw)
