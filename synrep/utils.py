"""Small helpers shared by the stages."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from synrep.errors import ConfigError, DataError, SynrepError

#: ``<name>.<pid>.<8 hex>.tmp``: the temporary names of :func:`temp_path`.
_TEMP_NAME = re.compile(r"^(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")


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


def temp_path(path: str | Path) -> Path:
    """A temporary name for ``path`` in its own folder, unique to this process and call:
    ``<name>.<pid>.<8 random hex>.tmp``. Writers write there and :func:`os.replace` it onto
    ``path``, so processes writing the same file at once never share a temporary file, and
    :func:`remove_stale_temps` can tell whose it is."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temp_owner(tmp: str | Path) -> int | None:
    """The pid that made the :func:`temp_path` ``tmp``, or None for another name."""
    m = _TEMP_NAME.match(Path(tmp).name)
    return int(m["pid"]) if m else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 checks without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` (:func:`temp_path` names) whose writer is dead,
    a killed run's leftovers; return them. Files of a live process, this one included, are
    never touched, nor are names of any other form except ``<name>.tmp``, the pid-less name of
    earlier synrep versions, which no current writer uses."""
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    legacy = path.with_name(path.name + ".tmp")
    if legacy.is_file():
        legacy.unlink(missing_ok=True)
        removed.append(legacy)
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        m = _TEMP_NAME.match(tmp.name)
        if m is None or m["name"] != path.name:
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not pid_alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` is a full disk: OSError ENOSPC (or EDQUOT), or a library error wrapping
    one (safetensors reports ``No space left on device (os error 28)``)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "os error 28" in str(e)


def no_space_error(path: str | Path) -> DataError:
    """The one-line error for a write of ``path`` that found the disk full."""
    return DataError(f"cannot write {str(path)!r}: no space left on device; free some space "
                     "and run the same command again (it resumes)")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A :func:`temp_path` of ``path`` to write (for writers that take a file name); renamed
    onto ``path`` on a clean exit. On any error the temporary file is removed; a full disk
    becomes one :class:`DataError` naming ``path``."""
    path = Path(path)
    remove_stale_temps(path)  # what a killed writer of this file left behind
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_no_space(e):
            raise no_space_error(path) from None
        raise


@contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file for writing ``path`` (:func:`atomic_path`), fsynced before it is
    renamed onto ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def _first_non_finite(data: Any, where: str = "") -> str | None:
    if isinstance(data, float) and not math.isfinite(data):
        return f"the value at {where!r} is {data}" if where else f"the value is {data}"
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return None
    for k, v in items:
        found = _first_non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def json_dumps(data: Any, path: str | Path, **kwargs: Any) -> str:
    """``json.dumps(data, allow_nan=False, **kwargs)`` for the output ``path``: a NaN or an
    infinity (say a diverged loss) is a :class:`SynrepError` naming the file and the key,
    never an invalid JSON file."""
    try:
        return json.dumps(data, allow_nan=False, **kwargs)
    except ValueError as e:
        where = _first_non_finite(data) or str(e)
        raise SynrepError(f"refusing to write {str(path)!r}: {where}; JSON outputs hold finite "
                          "numbers only (a NaN usually means training diverged: lower the "
                          "learning rate or check the inputs)") from None


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a :func:`temp_path` (unique to this process
    and call), so that processes writing the same file at once (ranks finishing together)
    never collide. NaN and infinities are refused (:func:`json_dumps`)."""
    text = json_dumps(data, path, indent=2, sort_keys=True) + "\n"
    with atomic_output(path, "w") as f:
        f.write(text)


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
