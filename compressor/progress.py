"""Progress: Rich bars on a terminal; on a log (not a terminal) a line when each stage starts and ends and
every LINE_EVERY_S seconds while it runs, so a CI log never stays silent for minutes; nothing when quiet."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
LINE_EVERY_S = 30.0


class Reporter:
    def __init__(self, enabled: bool | None = None):
        """enabled: None = bars on a terminal, lines on a log; False = silent."""
        self.enabled = console.is_terminal if enabled is None else enabled
        self.lines = enabled is None and not self.enabled
        self._progress: Progress | None = None

    @contextlib.contextmanager
    def _lines(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        start = last = time.monotonic()
        done, note = 0, ""
        print(f"{description} ...", file=sys.stderr, flush=True)

        def advance(n: int = 1, info: str | None = None):
            nonlocal last, done, note
            done += n
            note = info if info is not None else note
            now = time.monotonic()
            if now - last >= LINE_EVERY_S:
                last = now
                count = f"{done}/{total}" if total else f"{done}"
                print(f"{description}: {count} {note} ({now - start:.0f} s)".rstrip(), file=sys.stderr, flush=True)

        yield advance
        tail = f"; {note}" if note else ""
        print(f"{description}: done in {time.monotonic() - start:.1f} s{tail}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yield `advance(n=1, **fields)`; nests inside an outer bar when one is running."""
        if self.lines:
            with self._lines(description, total) as advance:
                yield advance
            return
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
        """One line of progress (an attempt, a cell): nothing when quiet."""
        if self.enabled:
            console.print(msg)
        elif self.lines:
            print(msg, file=sys.stderr, flush=True)


QUIET = Reporter(enabled=False)
