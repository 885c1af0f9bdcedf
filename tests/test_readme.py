"""Every command the README shows is dry-run: its config loads with its overrides, its options
parse, the scripts and files it names exist. (The commands that train run in other tests.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from synrep.cli import _parser
from synrep.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_COMMANDS = {"run", "captions", "rewrite", "images", "train-generator", "eval-generator",
                   "select", "train", "eval", "scale", "cluster", "search", "config"}


def readme_commands() -> list[str]:
    """Shell lines of the README's code blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    out: list[str] = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("python -c") \
                else line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


COMMANDS = [c for c in readme_commands()
            if c.split()[0] in ("synrep", "make", "pip", "python", "torchrun")]


def test_the_readme_shows_commands():
    assert sum(c.startswith("synrep ") for c in COMMANDS) >= 10
    assert "make demo" in COMMANDS and "make test" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_dry_runs(command):
    plain = command.split()
    if plain[0] == "synrep" and any(w in ("CONFIG", "RUN", "PATH", "CHECKPOINT") for w in plain):
        # a synopsis line of the CLI table: the command exists
        assert plain[1] in {*CONFIG_COMMANDS, "embed", "report", "export"}, command
        return
    words = shlex.split(command)
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), flags=re.M), command
        return
    if words[0] == "pip":
        assert (ROOT / "pyproject.toml").is_file()
        return
    if words[0] == "python":
        if words[1] == "-c":
            compile(words[2], "<readme>", "exec")  # the snippet is valid Python
        else:
            assert (ROOT / words[1]).is_file(), command
        return
    if words[0] == "torchrun":
        words = ["synrep", *words[words.index("synrep") + 1:]]
    args, extra = _parser().parse_known_args(words[1:])
    assert all("=" in x for x in extra), command
    if args.command in CONFIG_COMMANDS and getattr(args, "config", None):
        cfg = load_config(args.config, [*args.overrides, *extra])
        assert cfg.run.name
