"""User errors from ``--dsq-*`` options end the command with one line, not a traceback."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Optional, Type

from dsq_fairseq.precision import DSQConfigError


def _excepthook(
    exc_type: Type[BaseException],
    exc: BaseException,
    tb: Optional[TracebackType],
    _previous=sys.excepthook,
) -> None:
    if issubclass(exc_type, DSQConfigError):
        sys.stderr.write(f"dsq-fairseq: error: {exc}\n")
        return  # the interpreter still exits with status 1
    _previous(exc_type, exc, tb)


def install_excepthook() -> None:
    """Print an uncaught :class:`DSQConfigError` as one ``dsq-fairseq: error: ...`` line."""
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
