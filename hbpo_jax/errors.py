"""The errors a user's input can raise: each message is one sentence that names what to change.

The launchers print these as that sentence alone (exit status 2); everything else is a bug and
keeps its traceback.
"""


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the key."""


class DataError(ValueError):
    """A data source that cannot be read or yields no usable rows; the message names it."""


class WorkdirError(ValueError):
    """The workdir cannot be used as asked: in use by another run, holding checkpoints of another
    spec, not writable or full; the message names the path."""


def require(ok: bool, message: str) -> None:
    """ConfigError(message) unless `ok`: the one-line checks of a config's values."""
    if not ok:
        raise ConfigError(message)


__all__ = ["ConfigError", "DataError", "WorkdirError", "require"]
