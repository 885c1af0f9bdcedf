"""The package installs from a built wheel and works outside the source tree: the shipped
configs, concept banks and the mini text-to-image model travel as package data, and the
``synrep`` entry point runs from any folder.

The wheel goes into a fresh venv without its dependencies; a ``.pth`` file lends it this
environment's packages (torch and the rest), so the test needs no download. The full fresh-venv
install with its dependencies (``pip install .``, torch included) is ``make check-install``.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run inside a venv")
def test_the_built_wheel_runs_from_another_folder(tmp_path):
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                 "-q", "-w", str(tmp_path / "dist"), str(ROOT)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("synrep-*.whl"))

    venv = tmp_path / "venv"
    proc = _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    py = venv / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp_path).stdout.strip()
    # this environment's packages (not its editable synrep: .pth files under a .pth path are not
    # read) for the wheel's dependencies
    lent = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lent.append(sysconfig.get_paths()["purelib"])
    Path(purelib, "lent.pth").write_text("\n".join(dict.fromkeys(lent)) + "\n")
    proc = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import synrep; print(synrep.__file__)"], elsewhere)
    assert where.returncode == 0 and where.stdout.strip().startswith(purelib), where
    synrep = str(venv / "bin" / "synrep")
    listed = _run([synrep, "config", "--list"], elsewhere)
    assert listed.returncode == 0 and "quickstart" in listed.stdout, listed.stderr[-2000:]
    # captions from the shipped concept banks, images from the shipped mini generator
    run = _run([synrep, "run", "quickstart", "run.stages=[captions,images]", "captions.num=4",
                "images.images_per_caption=2", f"run.dir={tmp_path / 'run'}"], elsewhere)
    assert run.returncode == 0, run.stderr[-3000:]
    shards = list((tmp_path / "run/images").glob("*.tar"))
    assert shards, sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert not (elsewhere / "runs").exists()  # run.dir was honoured
