"""One command per run directory (synrep.lock): a second command fails at once naming the holder
and changes nothing; a lock left by a killed process blocks nobody; torchrun's other ranks never
contend."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synrep.cli import main
from synrep.layout import RunLayout
from synrep.lock import RunLockedError, lock_holder, run_lock

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "captions_fashion.yaml")
SMALL = ["captions.num=400", "captions.shard_size=200"]


def _hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


# Runs `synrep captions` but, before it generates the first shard, says so (GATE.waiting) and waits
# for the gate file GATE, so the test knows it holds the lock while a second command starts.
_GATED = """
import sys, time
from pathlib import Path
import synrep.captions.stage as stage
from synrep.cli import main
gate = Path(sys.argv[1])
real = stage._generate_shard
def gated(*a, **k):
    gate.with_suffix(".waiting").touch()
    while not gate.exists():
        time.sleep(0.01)
    return real(*a, **k)
stage._generate_shard = gated
sys.exit(main(sys.argv[2:]))
"""


def _wait_for_holder(run_dir: Path, pid: int, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while (lock_holder(run_dir) or {}).get("pid") != pid:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first command never took the lock"
        time.sleep(0.02)


def test_second_command_fails_at_once_and_the_first_matches_a_lone_run(tmp_path):
    run_dir, gate = tmp_path / "run", tmp_path / "gate"
    args = ["captions", CONFIG, f"run.dir={run_dir}", *SMALL]
    first = subprocess.Popen([sys.executable, "-c", _GATED, str(gate), *args], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(run_dir, first.pid, first)
        while not gate.with_suffix(".waiting").exists():  # it has written all it writes first
            assert first.poll() is None, first.communicate()
            time.sleep(0.02)
        before = _hashes(run_dir)
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "synrep", *args], env=_env(),
                                capture_output=True, text=True, timeout=300)
        took = time.time() - t0
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("synrep: error: "), second.stderr
        assert f"pid {first.pid}" in err[0] and socket.gethostname() in err[0], err[0]
        assert "in use" in err[0] and "Traceback" not in second.stderr
        assert _hashes(run_dir) == before  # the refused command changed nothing
        assert first.poll() is None  # ... and did not disturb the holder
        assert took < 120
    finally:
        gate.touch()
        out, errs = first.communicate(timeout=300)
    assert first.returncode == 0, errs
    # the first command's outputs are byte-identical to a lone run's (config.yaml names run.dir)
    lone = tmp_path / "lone"
    assert main(["captions", CONFIG, f"run.dir={lone}", *SMALL]) == 0
    got, ref = _hashes(run_dir / "captions"), _hashes(lone / "captions")
    assert got.keys() == ref.keys()
    timed = {"stats.json"} | {k for k in ref if k.endswith("_stats.json")}  # hold seconds
    assert {k: v for k, v in got.items() if k not in timed} == \
        {k: v for k, v in ref.items() if k not in timed}
    assert (run_dir / "config.yaml").read_text().replace(str(run_dir), "D") == \
        (lone / "config.yaml").read_text().replace(str(lone), "D")
    assert not list(run_dir.rglob("*.tmp"))
    assert lock_holder(run_dir) is None  # released: the file stays, empty


def test_lock_left_by_a_killed_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom synrep.lock import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n",
         str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host"):
            with run_lock(run_dir):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert lock_holder(run_dir)["pid"] == holder.pid  # the dead process's record is left
    assert main(["captions", CONFIG, f"run.dir={run_dir}", *SMALL]) == 0
    assert (run_dir / "captions" / "stats.json").exists()
    assert RunLayout(run_dir).lock.exists() and lock_holder(run_dir) is None


def test_other_torchrun_ranks_do_not_contend_and_nesting_is_free(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys\nfrom synrep.lock import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('ok')\n")
    with run_lock(run_dir):
        with run_lock(run_dir):  # the same process again (a stage running stages)
            assert lock_holder(run_dir)["pid"] == os.getpid()
        rank1 = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=_env(RANK="1"),
                               capture_output=True, text=True, timeout=120)
        assert rank1.returncode == 0 and rank1.stdout.strip() == "ok", rank1.stderr
        rank0 = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=_env(RANK="0"),
                               capture_output=True, text=True, timeout=120)
        assert rank0.returncode != 0 and "RunLockedError" in rank0.stderr
        assert f"pid {os.getpid()}" in rank0.stderr
        assert lock_holder(run_dir)["pid"] == os.getpid()
    assert lock_holder(run_dir) is None
    with run_lock(run_dir):  # free again
        pass
