"""The command that produced a result: set by the front end (the CLI), quoted in run records and profile
documents. The library never reads sys.argv (a caller of the Python API has no command line)."""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

_COMMAND: ContextVar[str] = ContextVar("command", default="(Python API)")


def command() -> str:
    return _COMMAND.get()


@contextlib.contextmanager
def running(cmd: str) -> Iterator[None]:
    token = _COMMAND.set(cmd)
    try:
        yield
    finally:
        _COMMAND.reset(token)
