"""One command per run directory: an OS file lock on ``RUN/.lock``.

Every command that writes into a run directory (``synrep run``, ``captions``, ``images``,
``train``, ``eval``, ... all through :func:`synrep.pipeline.run_stages`) holds :func:`run_lock`
from before its first write until its last stage ends. A second command on the same directory
fails at once with a :class:`~synrep.errors.SynrepError` naming the holder (pid and host, read
from the lock file), so two commands never interleave their writes.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the lock file. The kernel releases it when its holder
exits, however it exits (SIGKILL included), so a lock file left by a dead process is simply locked
again by the next command and its contents overwritten: no stale-lock cleanup is needed and
none is done. The file itself is never deleted (deleting a lock file lets two processes lock two
different files of one name). ``flock`` on network file systems (NFS) is only as reliable as
the server's lock support.

Under ``torchrun`` all ranks of one job share the directory: only rank 0 (env ``RANK``, unset in
a single process) takes the lock, and the other ranks never contend for it. If rank 0 of a
second job is refused, it exits with status 2 and torchrun stops that job's other ranks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from synrep.errors import SynrepError
from synrep.layout import RunLayout

__all__ = ["RunLockedError", "lock_holder", "run_lock", "takes_lock"]

#: Run directories (resolved) whose lock this process holds: a nested ``run_lock`` of the same
#: directory is a no-op instead of a conflict with itself.
_HELD: dict[Path, int] = {}


class RunLockedError(SynrepError):
    """Another command holds the run directory's lock."""


def takes_lock() -> bool:
    """Whether this process takes run locks: every process but the non-zero ranks of a
    ``torchrun`` job (which share rank 0's)."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


def lock_holder(run_dir: str | Path) -> dict | None:
    """What the lock file of ``run_dir`` records (``pid``, ``host``, ``since``), or None. The
    record may be that of a dead process: only a failed lock attempt says it is held."""
    path = RunLayout(run_dir).lock
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _holder_text(fd: int) -> str:
    # The holder writes its record right after it locks; give it a moment if it is empty.
    for _ in range(50):
        try:
            raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        except OSError:
            raw = ""
        try:
            data = json.loads(raw) if raw.strip() else None
        except ValueError:
            data = None
        if isinstance(data, dict):
            since = data.get("since")
            when = f", since {since}" if since else ""
            return f"pid {data.get('pid')} on host {data.get('host')!r}{when}"
        time.sleep(0.02)
    return "a process that has not recorded itself yet"


@contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``RUN/.lock`` for the duration of the ``with`` block.

    Creates ``run_dir`` if needed (nothing else is written before the lock is held). With
    ``enabled`` False, or in a non-zero torchrun rank (:func:`takes_lock`), nothing is locked.

    Raises:
        RunLockedError: another live process holds the lock; the message names its pid and host.
        SynrepError: the lock file cannot be created.
    """
    if not enabled or not takes_lock():
        yield
        return
    root = Path(run_dir)
    key = root.resolve()
    if key in _HELD:  # this process already holds it (a stage that runs stages)
        yield
        return
    path = RunLayout(root).lock
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SynrepError(f"cannot create the run lock {str(path)!r} ({e.strerror}); choose a "
                          "writable folder with run.dir=PATH") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"run directory {str(root)!r} is in use by another synrep command "
                f"({_holder_text(fd)}); wait for it to finish, or use another run.dir=PATH"
            ) from None
        except OSError as e:
            raise SynrepError(f"cannot lock {str(path)!r} ({e.strerror}); the file system may "
                              "not support locks: choose another run.dir=PATH") from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode("utf-8"), 0)
        _HELD[key] = fd
        try:
            yield
        finally:
            _HELD.pop(key, None)
            try:
                os.ftruncate(fd, 0)  # nobody holds it now; the file stays (see the module doc)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
