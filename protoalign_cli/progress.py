"""Progress of long steps, on a terminal and in a log file alike.

On a terminal (the stream is a TTY) a tqdm bar. Otherwise (output piped, a SLURM log, a file)
a tqdm bar would write carriage returns that a log shows as one ever-growing line, so a plain
line is written every ``LOG_INTERVAL_S`` seconds instead, and one more when the step ends (only
if it lasted that long: short steps stay silent)::

    extract: 1200/24000 configs (5%), 40.1 configs/s, 9 min 28 s left

Use::

    with progress(total=len(todo), desc="extract", unit="config", initial=done) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO

LOG_INTERVAL_S = 10.0  # seconds between two progress lines in a log


def duration_text(seconds: float) -> str:
    """A duration for people: '45 s', '9 min 28 s', '3 h 07 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(desc: str, done: int, total: int | None, unit: str, rate: float | None) -> str:
    """One log line: ``DESC: DONE/TOTAL UNITs (P%), R UNITs/s, T left`` (``rate`` in units per second, None unknown)."""
    units = f"{unit}s"
    if not total:
        line = f"{desc}: {done} {units}"
    else:
        line = f"{desc}: {done}/{total} {units} ({100 * done / total:.0f}%)"
    if rate:
        line += f", {rate:.3g} {units}/s"
        if total and done < total:
            line += f", {duration_text((total - done) / rate)} left"
    return line


class LogLines:
    """Progress as plain lines on ``stream``, at most one per ``interval_s`` seconds (see the module docstring)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream: TextIO, interval_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.stream, self.interval_s, self.clock = stream, interval_s, clock
        self.done = initial
        self.started = self.last = clock()
        self.lines = 0

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; write a line if ``interval_s`` has passed since the last one."""
        self.done += n
        if self.clock() - self.last >= self.interval_s:
            self._write()

    def close(self) -> None:
        """Write the final state, if the step lasted long enough to have written a line before."""
        if self.lines:
            self._write()

    def _write(self) -> None:
        now = self.clock()
        elapsed = now - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else None
        print(progress_line(self.desc, self.done, self.total, self.unit, rate), file=self.stream, flush=True)
        self.last = now
        self.lines += 1


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress(total: int | None, desc: str, unit: str = "item", initial: int = 0, enabled: bool = True,
             stream: TextIO | None = None, interval_s: float | None = None) -> Iterator:
    """Yield an object whose ``update(n)`` counts ``n`` more units of a step of ``total`` (None: unknown).

    A tqdm bar when ``stream`` (default: sys.stderr) is a terminal, else plain lines every
    ``interval_s`` seconds (default ``LOG_INTERVAL_S``); nothing when ``enabled`` is false.
    ``initial`` units were done before (a resumed run): the rate counts only this run's.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        yield _Silent()
    elif getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        with tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True) as bar:
            yield bar
    else:
        lines = LogLines(total, desc, unit, initial, stream, LOG_INTERVAL_S if interval_s is None else interval_s)
        try:
            yield lines
        finally:
            lines.close()
