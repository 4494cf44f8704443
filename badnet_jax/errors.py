"""One exception family for everything badnet-jax refuses to do.

Every message names the file (or array), the part of it at fault and what a user can do about it, so that
a command-line tool can print it and stop without a traceback.

Messages speak the library's own terms: the argument or config field at fault (``drops``, ``out_dir``), never
a command-line flag. A message marks each such name with :func:`arg`, so that a command-line tool can show the
same message with its flags instead (:meth:`BadNetError.render`): a library caller reads ``drops=4``, a user
of ``badnet-prune`` reads the flag ``drop`` with the value 4, as typed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Callable, Iterator, Optional

_MARK = "\x00"  # delimits an arg() inside a message; JSON escapes it, so a marked value cannot contain it
_MARKED = re.compile(f"{_MARK}([^{_MARK}]*){_MARK}")


class _NoValue:
    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()
"""The value a :data:`Shown` function receives for a name marked without one (``arg("model")``)."""

Shown = Callable[[str, Any], str]
"""How a reader is shown a marked name: ``(name, value)`` -> text, ``value`` :data:`NO_VALUE` if none was given."""


def arg(name: str, value: Any = NO_VALUE) -> str:
    """Mark an argument or config field (and optionally the value given for it) inside an error message.

    Only for messages passed to :class:`BadNetError`: ``str(err)`` shows ``name`` (or ``name=value``), and a
    command-line tool shows its flag (and the value as a user types it) instead.

    Args:
        name: the argument or config field, as a library caller writes it (``"out_dir"``, ``"anp.steps"``).
        value: the value given for it, if the message should show it: a bool or a number is kept as such (a
            tool shows a bool its own way), anything else as ``str(value)``.
    """
    if value is not NO_VALUE and not isinstance(value, (bool, int, float)):
        value = str(value)
    entry = [name] if value is NO_VALUE else [name, value]
    return _MARK + json.dumps(entry) + _MARK


def show_in_library(name: str, value: Any) -> str:
    """How ``str(err)`` shows a marked name: ``name``, or ``name=value``."""
    return name if value is NO_VALUE else f"{name}={value}"


class BadNetError(Exception):
    """Base class of every error raised on purpose by badnet-jax.

    Args:
        message: what is wrong and what to do, in the library's own terms; the argument and config field
            names in it are marked with :func:`arg`.
        field: the argument or config field at fault, if one is (e.g. ``"out_dir"``): a command-line tool
            maps it to its flag, so a library caller and a CLI user each read the names they typed.
    """

    def __init__(self, message: str = "", *, field: Optional[str] = None) -> None:
        self.template = message
        self.field = field
        super().__init__(self.render(show_in_library))

    def render(self, show: Shown) -> str:
        """The message with every marked name shown by ``show(name, value)`` (``value`` :data:`NO_VALUE` if none)."""

        def one(match: re.Match) -> str:
            name, *value = json.loads(match.group(1))
            return show(name, value[0] if value else NO_VALUE)

        return _MARKED.sub(one, self.template)


@contextlib.contextmanager
def reading(role: str, path: os.PathLike | str) -> Iterator[None]:
    """An error raised while reading ``path``, the file given for ``role``, names that role.

    The readers name the file ("bd_weight.h5: file not found"); a caller who gave several files needs to know
    which argument to fix: ``model=bd_weight.h5: file not found``, and a command shows its flag. An error that
    already names a field is left as it is.
    """
    try:
        yield
    except BadNetError as err:
        if err.field is not None:
            raise
        text, name = err.template, str(path)
        told = f"{arg(role, name)}{text[len(name):]}" if text.startswith(name + ":") else f"{arg(role, name)}: {text}"
        try:
            renamed = type(err)(told, field=role)
        except TypeError:  # a subclass with another signature keeps its own message
            raise err from None
        raise renamed.with_traceback(err.__traceback__) from None


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
