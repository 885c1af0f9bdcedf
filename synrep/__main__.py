"""``synrep`` and ``python -m synrep``: check the config's registry names, then run the command.

The names are checked against :mod:`synrep.names` before :mod:`synrep.cli` (and with it torch,
timm and torchvision, several seconds on a small machine) is imported, so a misspelt method,
backbone or protocol fails at once with the valid choices.
"""

from __future__ import annotations

import sys

from synrep.errors import ConfigError
from synrep.names import prescreen

#: Commands whose first argument is a config (file or shipped name), followed by overrides.
CONFIG_COMMANDS = ("run", "captions", "rewrite", "images", "cluster", "train", "search", "eval",
                   "scale", "config")


def _config_args(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """(config, overrides) of a config command's arguments, or None for other commands."""
    if not argv or argv[0] not in CONFIG_COMMANDS:
        return None
    rest = argv[1:]
    path = rest[0] if rest and not rest[0].startswith("-") and "=" not in rest[0] else None
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    found = _config_args(argv)
    if found is not None:
        try:
            prescreen(*found)
        except ConfigError as e:
            print(f"synrep: error: {e}", file=sys.stderr)
            return 2
    # the deep-learning stack loads only once the names are known to be valid
    from synrep.cli import main as run_command

    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
