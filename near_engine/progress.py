"""A small progress report for long commands: a stage name, a count, and an estimate of the time left.

One line per tenth of the work (not a log wall, and it reads the same in a terminal, a log file and a render farm's
job log); no dependency, so it also runs inside Blender's Python.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")

__all__ = ["progress"]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress(items: Sequence[T] | Iterable[T], stage: str, log: Callable[[str], object] = print,
             total: int | None = None, steps: int = 10) -> Iterator[T]:
    """Yield `items`, logging "stage: k/n (p%), elapsed, ETA" about `steps` times in all."""
    total = len(items) if total is None and hasattr(items, "__len__") else total  # type: ignore[arg-type]
    start = time.perf_counter()
    every = max(1, (total or 1) // steps)
    done = 0
    for item in items:
        yield item
        done += 1
        if total and (done % every == 0 or done == total):
            elapsed = time.perf_counter() - start
            left = elapsed / done * (total - done)
            log(f"{stage}: {done}/{total} ({100 * done // total}%), {_duration(elapsed)} elapsed, "
                f"{_duration(left)} left")
