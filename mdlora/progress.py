"""Progress of a long stage: a bar on a terminal, a log line every few seconds otherwise.

Materialisation, adapter training and scoring run for minutes; in Ray workers and CI logs there
is no terminal, so a :class:`Progress` writes ``<what>: 1,200,000/3,000,000 rows (40%),
52,000 rows/s, ETA 35 s`` through the ``mdlora.progress`` logger at most every ``every``
seconds, and once at the end when the stage took that long. On a terminal it draws a tqdm bar.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("mdlora.progress")
T = TypeVar("T")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s} s"


class Progress:
    """Counts ``unit`` of one stage and reports rate and ETA.

    Args:
        what: the stage, as the line starts (``materialise train``).
        total: the expected count, or None when unknown (no percentage or ETA then).
        unit: what is counted.
        every: seconds between lines (no terminal).
        clock: time source (tests).
        bar: draw a tqdm bar (default: when stderr is a terminal).
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "rows", every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, bar: bool | None = None) -> None:
        self.what, self.total, self.unit, self.every, self.clock = what, total, unit, every, clock
        self.done, self.start = 0, clock()
        self._last = self.start
        self._bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=f" {unit}", unit_scale=True, leave=False)

    def line(self) -> str:
        """The progress line now."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:,.0f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text + ("" if self.done < (self.total or self.done + 1) else f", {_duration(elapsed)}")

    def add(self, n: int) -> None:
        """Count ``n`` more; report when ``every`` seconds have passed since the last line."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            log.info(self.line())

    def close(self) -> None:
        """The final line (or close the bar); none for a stage that ended within ``every``
        seconds without a line (a quick scoring run prints only its result)."""
        if self._bar is not None:
            self._bar.close()
        elif self._last > self.start or self.clock() - self.start >= self.every:
            log.info(self.line())


def counted(batches: Iterable[T], progress: Progress) -> Iterator[T]:
    """``batches`` unchanged, each one's ``len`` counted by ``progress``."""
    for batch in batches:
        progress.add(len(batch))
        yield batch
