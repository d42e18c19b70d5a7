"""Progress reporting: the library calls a small protocol; the CLI supplies a display (or nothing).

Two displays, chosen by where the output goes (:func:`display`):

- at a terminal, a rich bar with the phase, labelled counts, elapsed time and ETA; when it ends, one line keeps
  the phase's elapsed time (``tolcli: precompute 2 layer(s): done, 4,096 rows in 12.3s``);
- off a terminal (CI logs, ``nohup``), a heartbeat: at most one line every ``TOLCLI_HEARTBEAT_SECONDS`` (default
  30 s) with the phase, the count, the percentage, the elapsed time and an estimate of what is left, and then one line
  when the phase ends. A phase shorter than the period logs nothing; an hour-long one about 120 lines.

Both write to stderr, never to stdout (which ``--json`` keeps for its document), and neither writes anything under
``--quiet`` or ``--json``. A display still running when the command fails or is interrupted is stopped by
:func:`close_all`, so no stale bar is left on the terminal above the error line.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from typing import IO, Any, Protocol

HEARTBEAT_ENV = "TOLCLI_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT = 30.0

# What a phase's counts are, by the first word of its description (the library's phases are named in one place
# each: precompute.py, compress.py, evaluation.py, ...).
UNITS = {
    "precompute": "rows",
    "compress": "layers",
    "spectra": "layers",
    "eval-ppl": "batches",
    "sensitivity": "windows",
    "sweep:": "bundles",
    "convert": "bytes",
    "verify": "bytes",
    "entropy": "bytes",
    "auto:": "encodes",
    "cross-layer": "stages",  # the basis, A's codec, the encoding
    "pack": "bytes",
    "unpack": "bytes",
}


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


def unit_of(description: str) -> str:
    """The unit of a phase's counts ("rows", "bytes", ...), from the first word of its description."""
    words = description.split()
    return UNITS.get(words[0], "steps") if words else "steps"


def count_text(n: int, unit: str) -> str:
    """``12,345 rows``; bytes in binary multiples (``1.5 GiB``)."""
    if unit != "bytes":
        return f"{n:,} {unit}"
    size = float(n)
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or suffix == "GiB":
            return f"{size:,.0f} {suffix}" if suffix == "B" else f"{size:,.1f} {suffix}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def duration_text(seconds: float) -> str:
    """``0.4s``, ``12.3s``, ``4m05s``, ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds + 0.5), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def heartbeat_seconds(env: dict[str, str] | None = None) -> float:
    """The heartbeat period: ``TOLCLI_HEARTBEAT_SECONDS`` (a positive number), else 30 s."""
    raw = (os.environ if env is None else env).get(HEARTBEAT_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_HEARTBEAT
    return value if value > 0 and value == value else DEFAULT_HEARTBEAT


_ACTIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def close_all() -> None:
    """Stop every display still running (a command that failed or was interrupted mid-phase)."""
    for p in list(_ACTIVE):
        p.abandon()


class _Phase:
    """The state both displays share: the phase, its total and count, and when it started."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.description = ""
        self.total = 0
        self.done = 0
        self.unit = "steps"
        self.t0 = 0.0
        self.running = False

    def begin(self, description: str, total: int) -> None:
        self.description, self.total, self.done = description, max(0, int(total)), 0
        self.unit, self.t0, self.running = unit_of(description), self.clock(), True
        _ACTIVE.add(self)

    def end(self) -> bool:
        """Mark the phase ended; True if it was running."""
        was, self.running = self.running, False
        _ACTIVE.discard(self)
        return was

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def summary(self) -> str:
        return f"{self.description}: done, {count_text(self.done, self.unit)} in {duration_text(self.elapsed())}"


class HeartbeatProgress(_Phase):
    """Progress as plain lines at a bounded rate, for logs (no terminal): see the module docstring."""

    def __init__(self, stream: IO[str] | None = None, period: float | None = None, clock=time.monotonic) -> None:
        super().__init__(clock)
        self.stream = stream
        self.period = heartbeat_seconds() if period is None else period
        self._last = 0.0
        self.beats = 0

    def _line(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(f"tolcli: {text}\n")
        stream.flush()

    def start(self, description: str, total: int) -> None:
        self.begin(description, total)
        self._last = self.t0
        self.beats = 0

    def advance(self, n: int) -> None:
        if not self.running:
            return
        self.done += n
        now = self.clock()
        if now - self._last >= self.period and self.done < self.total:
            self._last = now
            self.beats += 1
            self._line(self.status(now))

    def status(self, now: float) -> str:
        """``precompute 2 layer(s): 1,024/4,096 rows (25%), 1m02s elapsed, about 3m06s left``."""
        spent = now - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = spent * (self.total - self.done) / self.done if self.done else None
        eta = f", about {duration_text(left)} left" if left is not None else ""
        return (
            f"{self.description}: {self.done:,}/{count_text(self.total, self.unit)} ({pct:.0f}%), "
            f"{duration_text(spent)} elapsed{eta}"
        )

    def finish(self) -> None:
        if self.end() and self.beats:
            self._line(self.summary())

    def abandon(self) -> None:
        if self.end() and self.beats:
            self._line(f"stopped: {self.status(self.clock())}")


class TerminalProgress(_Phase):
    """A rich bar (phase, labelled counts, elapsed, ETA) for a person at a terminal; the elapsed time stays."""

    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console
        self._bar: Any = None
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        self.begin(description, total)
        if self.total <= 0:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(description, total=self.total, counts=self._counts())

    def _counts(self) -> str:
        if self.unit == "bytes":
            return f"{count_text(self.done, 'bytes')}/{count_text(self.total, 'bytes')}"
        return f"{self.done:,}/{self.total:,} {self.unit}"

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, counts=self._counts())

    def _stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def finish(self) -> None:
        self._stop()
        if self.end():
            self.console.print(f"tolcli: {self.summary()}", highlight=False, markup=False)

    def abandon(self) -> None:
        self._stop()
        self.end()


def display(*, enabled: bool, interactive: bool, console: Any = None, stream: IO[str] | None = None) -> Progress:
    """The display for a command: nothing when ``enabled`` is false (``--quiet``/``--json``), a bar at a terminal
    (``interactive``), else the heartbeat."""
    if not enabled:
        return NullProgress()
    if interactive and console is not None:
        return TerminalProgress(console)
    return HeartbeatProgress(stream)
