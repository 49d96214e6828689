"""Progress bars (Rich) that cost nothing when output is not a terminal or the caller is quiet."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class Reporter:
    def __init__(self, enabled: bool | None = None):
        self.enabled = console.is_terminal if enabled is None else enabled
        self._progress: Progress | None = None

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yield `advance(n=1, **fields)`; nests inside an outer bar when one is running."""
        if not self.enabled:
            yield lambda *a, **k: None
            return
        own = self._progress is None
        progress = self._progress
        if progress is None:
            progress = self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False,
            )
            progress.start()
        tid = progress.add_task(description, total=total, info="")
        try:
            def advance(n: int = 1, info: str | None = None):
                if info is None:
                    progress.update(tid, advance=n)
                else:
                    progress.update(tid, advance=n, info=info)
            yield advance
        finally:
            if own:
                progress.stop()
                self._progress = None
            else:
                progress.remove_task(tid)

    def log(self, msg: str) -> None:
        if self.enabled:
            console.print(msg)
        else:
            print(msg, file=sys.stderr)


QUIET = Reporter(enabled=False)
