"""User errors from ``--dsq-*`` options end the command with one line, not a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from types import TracebackType
from typing import Iterator, Optional, Type

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


def _hydra_app_running() -> bool:
    """Whether this process runs a hydra app (``fairseq-hydra-train``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover - hydra ships with fairseq
        return False
    return HydraConfig.initialized()


def _with_hydra_key(message: str) -> str:
    """``--dsq-foo-bar: ...`` -> ``--dsq-foo-bar (model.dsq_foo_bar): ...``: name the YAML key."""
    flag, sep, rest = message.partition(":")
    if sep and flag.startswith("--dsq-") and " " not in flag:
        return f"{flag} (model.{flag[2:].replace('-', '_')}){sep}{rest}"
    return message


@contextmanager
def user_errors_exit_cleanly() -> Iterator[None]:
    """Let a :class:`DSQConfigError` end a hydra app with one line and exit status 1.

    ``fairseq-train`` reaches :func:`_excepthook` on its own; hydra catches every ``Exception``
    and prints a traceback instead, so under hydra the error becomes that line plus
    ``SystemExit(1)`` (a ``BaseException``, which hydra lets through). Elsewhere (tests, library
    use) the error propagates unchanged.
    """
    try:
        yield
    except DSQConfigError as exc:
        if not _hydra_app_running():
            raise
        sys.stderr.write(f"dsq-fairseq: error: {_with_hydra_key(str(exc))}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
