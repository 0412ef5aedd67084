"""Progress for people and for log files: a tqdm bar on a terminal, compact lines everywhere else.

A bar redraws itself with carriage returns, which is right on a terminal and wrong in a log file: a Ray job's log, a
cluster job's output or `make demo > log` would hold one frame per redraw (hundreds of KB over a long run). When the
stream is not a terminal, `progress_bar` returns a `LineProgress` instead: the same calls, but it writes one plain
line every `RAYDISTILL_LOG_EVERY` seconds (default 30; `--log-every` on the CLI), one per new validation result, and
one at the end, each with step, steps/s, the values the caller posts (meta-loss, live workers, validation accuracy)
and the ETA.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

LOG_EVERY_ENV = "RAYDISTILL_LOG_EVERY"  # seconds between compact progress lines
DEFAULT_LOG_EVERY_S = 30.0
NOTABLE = ("val",)  # posted values that earn a line as soon as they change


def log_every_s() -> float:
    """Seconds between compact lines: RAYDISTILL_LOG_EVERY, or 30 s when unset or not a finite number >= 0."""
    try:
        value = float(os.environ.get(LOG_EVERY_ENV, DEFAULT_LOG_EVERY_S))
    except ValueError:
        return DEFAULT_LOG_EVERY_S
    return value if 0 <= value < float("inf") else DEFAULT_LOG_EVERY_S


def is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, desc: str, unit: str = "step", enabled: bool = True, stream: IO | None = None):
    """A tqdm bar when `stream` (stderr by default) is a terminal, else a LineProgress; silent when not enabled."""
    stream = sys.stderr if stream is None else stream
    if enabled and not is_terminal(stream):
        return LineProgress(total, desc, unit, stream, log_every_s())
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, file=stream)


def format_duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LineProgress:
    """The subset of tqdm's interface the engine uses (update, reset, set_postfix, close, n), written as lines."""

    def __init__(self, total: int, desc: str, unit: str, stream: IO, every_s: float):
        self.total, self.desc, self.unit, self.stream, self.every_s = total, desc, unit, stream, every_s
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.closed = False
        self._restart(0)

    def _restart(self, n: int) -> None:
        self.began, self.n_began = time.monotonic(), n  # rate counts this session's steps only (not a resume's)
        self.last_line = self.began
        self.unwritten = False  # progress since the last line
        self.due = False  # a notable value changed: the next update writes a line

    def update(self, k: int = 1) -> None:
        if k <= 0:
            return
        self.n += k
        self.unwritten = True
        if self.due or time.monotonic() - self.last_line >= self.every_s:
            self.line()

    def reset(self, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.n = 0
        self._restart(0)

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown on the next line (post them before the update they belong to)."""
        values = {**(values or {}), **kwargs}
        self.due = self.due or any(key in values and values[key] != self.postfix.get(key) for key in NOTABLE)
        self.postfix.update(values)
        self.unwritten = self.unwritten or bool(values)

    def rate(self) -> float | None:
        elapsed, done = time.monotonic() - self.began, self.n - self.n_began
        return done / elapsed if elapsed > 0 and done > 0 else None

    def text(self) -> str:
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s/{self.unit}")
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        if rate is not None and self.total and self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        elif self.n >= (self.total or 0) > 0:
            parts.append(f"took {format_duration(time.monotonic() - self.began)}")
        return " | ".join(parts)

    def line(self) -> None:
        print(self.text(), file=self.stream, flush=True)
        self.last_line = time.monotonic()
        self.unwritten = self.due = False

    def close(self) -> None:
        """The last line, unless the line before it already said everything."""
        if not self.closed:
            self.closed = True
            if self.unwritten:
                self.line()
