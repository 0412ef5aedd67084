"""What the `raydistill` command prints besides its own lines: Ray's messages and Python warnings, kept short.

Ray forwards its raylet's error messages to the driver's stdout. Most are one line already (a retried task says so in
one line), but a dead worker's notice is a paragraph of troubleshooting advice, and every prefix carries colour codes
even in a log file. `console()` (around every CLI command) keeps them to one plain line each:

- no colour codes when the output is not a terminal (RAY_COLOR_PREFIX=0, and any left are stripped);
- a dead worker's paragraph becomes one line with its PID and exit type (the engine retries its task);
- Python warnings (a skipped damaged checkpoint, a deprecation) print as `warning: Category: message`, without the
  source line.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import IO, Any

from raydistill.compat import RAY_COLOR_PREFIX, RAY_WORKER_DIED, RAY_WORKER_EXIT, RAY_WORKER_PID
from raydistill.watch.progress import LOG_EVERY_ENV, is_terminal

ANSI = re.compile(r"\x1b\[[0-9;]*m")
WORKER_DIED, PID, EXIT = RAY_WORKER_DIED, RAY_WORKER_PID, RAY_WORKER_EXIT  # Ray's wording, in raydistill.compat


def condense(line: str) -> str:
    """One of Ray's driver lines, without colour codes, and a dead worker's paragraph shortened to one line."""
    line = ANSI.sub("", line)
    if WORKER_DIED in line:
        head = line[: line.index(WORKER_DIED)]
        pid, exit_type = PID.search(line), EXIT.search(line)
        detail = ", ".join(part for part in (pid and f"PID {pid.group(1)}", exit_type and exit_type.group(1)) if part)
        line = (f"{head}a worker process died{f' ({detail})' if detail else ''}; its task is retried "
                "(the worker's own log has the details: ray logs, or the dashboard)")
    return line


class CondensingStream(io.TextIOBase):
    """A text stream that passes whole lines through `condense` on their way to `stream`."""

    def __init__(self, stream: IO):
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.stream.write(condense(line) + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(condense(self.pending))
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return is_terminal(self.stream)

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self.stream, name)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {category.__name__}: {message}", file=sys.stderr if file is None else file)


@contextlib.contextmanager
def console(log_every_s: float | None = None) -> Iterator[None]:
    """The CLI's output for the duration of a command (see the module docstring); `log_every_s` sets the interval
    of compact progress lines. Everything it changes is restored on exit."""
    saved_env = {key: os.environ.get(key) for key in (LOG_EVERY_ENV, RAY_COLOR_PREFIX)}
    saved_stdout, saved_showwarning = sys.stdout, warnings.showwarning
    if log_every_s is not None:
        os.environ[LOG_EVERY_ENV] = str(log_every_s)  # the driver reads it when a run starts
    if not is_terminal(sys.stdout):
        os.environ.setdefault(RAY_COLOR_PREFIX, "0")
    sys.stdout = CondensingStream(sys.stdout)
    warnings.showwarning = one_line_warning
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout, warnings.showwarning = saved_stdout, saved_showwarning
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
