"""SIGTERM stops a command as Ctrl-C does: one line, exit 143, and the same command resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import synrep.cli
from synrep.checkpoint import Checkpoint
from synrep.cli import main
from synrep.config import load_config
from synrep.layout import layout
from tests.conftest import TINY, needs_fashion

CONFIG = "configs/fashion_simclr.yaml"
ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "synrep: interrupted; run the same command again to resume"


def test_sigterm_in_process_prints_the_interrupt_line_and_restores_the_handler(
        tmp_path, monkeypatch, capsys):
    def stopped(cfg, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr(synrep.cli, "run_stages", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", CONFIG, f"run.dir={tmp_path / 'r'}"]) == 143
    assert MESSAGE in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before

    def interrupted(cfg, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synrep.cli, "run_stages", interrupted)
    assert main(["train", CONFIG, f"run.dir={tmp_path / 'r'}"]) == 130
    assert MESSAGE in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


@needs_fashion
def test_sigterm_mid_training_then_the_same_command_resumes(tmp_path):
    args = [sys.executable, "-m", "synrep", "train", CONFIG, *TINY, "train.steps=24",
            "train.ckpt_every=2", f"run.dir={tmp_path / 'r'}"]
    paths = layout(load_config(CONFIG, [f"run.dir={tmp_path / 'r'}"]))
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not paths.last_checkpoint.exists():  # training has begun
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == MESSAGE
    assert "Traceback" not in err
    stopped_at = Checkpoint(paths.last_checkpoint).step
    assert 2 <= stopped_at < 24 and not paths.final_checkpoint.exists()
    assert not list(paths.checkpoints.glob("*.tmp"))  # nothing half-written left behind

    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"trained {24 - stopped_at} steps" in again.stdout  # resumed, not restarted
    assert Checkpoint(paths.final_checkpoint).step == 24
