"""Checkpoints: one safetensors file holding the weights, the optimizer state and the config.

Nothing is ever unpickled: the tensors live in safetensors, everything else (step, optimizer
hyper-parameters, the resolved config) in its JSON metadata. A file that is not a safetensors file
written by synrep is rejected with a clear error. Files are written to a temporary name and
renamed, so a crash never leaves a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from synrep.errors import CheckpointError
from synrep.utils import atomic_path, json_dumps

FORMAT = "synrep-checkpoint-v1"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, model: torch.nn.Module | dict[str, torch.Tensor],
                    config: dict[str, Any],
                    step: int, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights (a module or a state dict) and the optimizer state with the
    config and step, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    meta: dict[str, Any] = {"format": FORMAT, "step": step, "config": config, "extra": extra or {}}
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    metadata = {"synrep": json_dumps(meta, path)}  # NaN/inf refused before anything is written
    # a temporary name unique to this process: ranks or runs never share a temporary file
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


class Checkpoint:
    """A synrep checkpoint read from disk: ``step``, ``config`` (dict), ``model_state``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} is a directory, not a file; pass the "
                "checkpoint's .safetensors file (e.g. RUN/train/checkpoints/final.safetensors)")
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint {str(self.path)!r} does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw = (f.metadata() or {}).get("synrep")
                keys = list(f.keys())
                if raw is None:
                    raise CheckpointError(
                        f"{str(self.path)!r} is a safetensors file but not a synrep checkpoint "
                        "(no synrep metadata); pass a checkpoint written by `synrep train`")
                self.meta = json.loads(raw)
                self._tensors = {k: f.get_tensor(k) for k in keys}
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for foreign files
            raise CheckpointError(
                f"{str(self.path)!r} is not a synrep checkpoint ({type(e).__name__}: {e}); "
                "synrep reads only safetensors checkpoints written by `synrep train` and never "
                "unpickles files") from None
        self._check_meta()
        self.step: int = self.meta["step"]
        self.config: dict[str, Any] = self.meta["config"]
        self.extra: dict[str, Any] = self.meta.get("extra", {})

    def _check_meta(self) -> None:
        """The metadata's shape: an object with an integer ``step`` and object ``config``."""
        meta = self.meta

        def bad(what: str) -> CheckpointError:
            return CheckpointError(
                f"checkpoint {str(self.path)!r} has malformed synrep metadata ({what}); it was "
                "not written by `synrep train` or was edited: use an unmodified checkpoint")

        if not isinstance(meta, dict):
            raise bad(f"a JSON {type(meta).__name__}, expected an object")
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{str(self.path)!r} has checkpoint format {meta.get('format')!r}; this "
                f"synrep reads {FORMAT!r}")
        if "step" not in meta:
            raise bad("no 'step'")
        step = meta["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad(f"'step' is {step!r}, expected an integer >= 0")
        if not isinstance(meta.get("config"), dict):
            got = "missing" if "config" not in meta else f"a {type(meta['config']).__name__}"
            raise bad(f"'config' is {got}, expected an object")
        if not isinstance(meta.get("extra", {}), dict):
            raise bad(f"'extra' is a {type(meta['extra']).__name__}, expected an object")
        opt = meta.get("optimizer")
        if opt is not None and not (isinstance(opt, dict) and isinstance(
                opt.get("param_groups"), list) and isinstance(opt.get("scalars"), dict)):
            raise bad("'optimizer' is not an object with 'param_groups' and 'scalars'")

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return {k[len("model/"):]: v for k, v in self._tensors.items() if k.startswith("model/")}

    def submodule_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Weights under ``prefix`` (e.g. ``"encoder."``) with the prefix removed."""
        state = {k[len(prefix):]: v for k, v in self.model_state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} holds no weights under {prefix!r}")
        return state

    def optimizer_state(self) -> dict[str, Any] | None:
        if "optimizer" not in self.meta:
            return None
        tensors = {k: v for k, v in self._tensors.items() if k.startswith("optim/")}
        return _unflatten_optimizer(tensors, self.meta["optimizer"])

    def load_model(self, model: torch.nn.Module) -> None:
        try:
            model.load_state_dict(self.model_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} does not fit the configured model: "
                f"{str(e).splitlines()[0]}") from None
