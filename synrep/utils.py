"""Small helpers shared by the stages."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from synrep.errors import ConfigError, SynrepError


def ensure_writable_dir(path: str | Path, key: str = "run.dir") -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SynrepError(
            f"output directory {str(path)!r} is not writable ({e.strerror}); choose another "
            f"folder with {key}=PATH") from None
    return path


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file named after this process, so
    that processes writing the same file at once (ranks finishing together) never collide."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (say run seed, stage, shard, round): stable across processes,
    machines and Python versions, unlike ``hash()``."""

    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def yaml_error_summary(e: Exception) -> str:
    """A YAML parser error in one line: ``line 3, column 7: expected ',' or '}'``."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def check_same_settings(stored: dict[str, Any], current: dict[str, Any], what: str,
                        prefix: str = "") -> None:
    """Refuse to continue ``what`` (say, "'runs/x/captions' was made") with settings other than
    those it was made with, naming the changed keys."""
    if stored == current:
        return

    changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    names = ", ".join("run.seed" if k == "seed" else f"{prefix}{k}" for k in changed)
    raise ConfigError(f"{what} with a different config (changed: {names}); use the same "
                      "config, or start a new run with run.dir=<new folder>")
