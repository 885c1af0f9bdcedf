"""User-facing errors.

A :class:`SynrepError` carries one message that names the problem and how to fix it. The CLI prints
it without a traceback and exits with status 2; library callers can catch it like any exception.
"""


class SynrepError(Exception):
    """An error caused by the user's input (config, files, data), not by a bug in synrep."""


class ConfigError(SynrepError):
    """A malformed config file, an unknown key, or a value of the wrong type."""


class DataError(SynrepError):
    """A missing, truncated or corrupted dataset, shard or file."""


class CheckpointError(SynrepError):
    """A checkpoint that is missing, not written by synrep, or incompatible with the config."""
