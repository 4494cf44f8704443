"""One exception family for everything badnet-jax refuses to do.

Every message names the file (or array), the part of it at fault and what a user can do about it, so that
a CLI can print ``str(err)`` and stop without a traceback.
"""

from __future__ import annotations


class BadNetError(Exception):
    """Base class of every error raised on purpose by badnet-jax.

    Args:
        message: what is wrong and what to do, in the library's own terms (argument and config field names).
        field: the argument or config field at fault, if one is (e.g. ``"out_dir"``): a command-line tool
            maps it to its flag, so a library caller and a CLI user each read the names they typed.
    """

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelFileError(BadNetError):
    """A Keras model file is missing, unreadable, of an unknown layout or does not match the architecture."""


class DataFileError(BadNetError):
    """A data file (lab h5 or image) is missing, unreadable or holds the wrong shape, dtype or values."""


class ConfigError(BadNetError):
    """Arguments or configuration that cannot work together (e.g. only some lab data files given)."""


class CheckpointError(BadNetError):
    """An orbax checkpoint is missing or does not hold what badnet-jax wrote."""


class OutputError(BadNetError):
    """Results could not be written (a full disk, a folder that went read-only or away mid-run)."""
