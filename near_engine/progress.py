"""Progress of long commands: a stage name, a count, a bar and an estimate of the time left.

On a terminal it is one bar redrawn in place; in a log file or a render farm's job log (not a terminal), or through a
`log` function, it is one line per tenth of the work, so it never becomes a log wall. No dependency, so it also runs
inside Blender's Python.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, Sequence, TextIO, TypeVar

T = TypeVar("T")

__all__ = ["Progress", "duration", "progress"]

BAR_WIDTH = 24
REDRAW_SECONDS = 0.2  # a terminal bar is redrawn at most this often (and always at the end)


def duration(seconds: float) -> str:
    """A duration as 1m05s, or as 2h03m from an hour on."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Progress of one stage of `total` steps: call `advance()` per step and `close()` at the end.

    `log` given: lines through it, about `steps` in all. Otherwise on `stream` (default stderr): a bar redrawn in
    place if it is a terminal, else lines as with `log`. `say(line)` prints a line without breaking the bar.
    """

    def __init__(self, stage: str, total: int, *, log: Callable[[str], object] | None = None,
                 stream: TextIO | None = None, steps: int = 10) -> None:
        self.stage, self.total, self.done = stage, max(0, int(total)), 0
        self._log = log
        self._stream = stream if stream is not None else sys.stderr
        self._bar = log is None and bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = max(1, self.total // max(1, steps))
        self._start = time.perf_counter()
        self._drawn = 0.0
        self._closed = False
        if self._bar:
            self._draw()

    def advance(self, steps: int = 1) -> None:
        """Count `steps` more steps as done."""
        before, self.done = self.done, min(self.total, self.done + steps)
        if self._bar:
            if time.perf_counter() - self._drawn >= REDRAW_SECONDS or self.done == self.total:
                self._draw()
        elif self.total and (self.done == self.total or self.done // self._every > before // self._every):
            self._line(self.status())

    def status(self) -> str:
        """The line "stage: k/n (p%), elapsed, time left"."""
        elapsed = time.perf_counter() - self._start
        percent = 100 * self.done // self.total if self.total else 100
        left = f"{duration(elapsed / self.done * (self.total - self.done))} left" if self.done else "ETA unknown"
        return f"{self.stage}: {self.done}/{self.total} ({percent}%), {duration(elapsed)} elapsed, {left}"

    def say(self, line: str) -> None:
        """Print `line` (through `log`, or on the stream above the bar)."""
        if self._bar:
            self._stream.write("\r\033[K" + line + "\n")
            self._draw()
        else:
            self._line(line)

    def close(self) -> None:
        """End the bar's line (a terminal bar stays visible, finished or not)."""
        if self._bar and not self._closed:
            self._draw()
            self._stream.write("\n")
            self._stream.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self) -> None:
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        stage, rest = self.status().split(": ", 1)
        self._stream.write(f"\r\033[K{stage} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {rest}")
        self._stream.flush()
        self._drawn = time.perf_counter()

    def _line(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
        else:
            self._stream.write(line + "\n")
            self._stream.flush()


def progress(items: Sequence[T] | Iterable[T], stage: str, log: Callable[[str], object] | None = None,
             total: int | None = None, steps: int = 10) -> Iterator[T]:
    """Yield `items`, showing a `Progress` of them (lines through `log` when given, else a bar on stderr)."""
    total = len(items) if total is None and hasattr(items, "__len__") else total  # type: ignore[arg-type]
    with Progress(stage, total or 0, log=log, steps=steps) as bar:
        for item in items:
            yield item
            bar.advance()
