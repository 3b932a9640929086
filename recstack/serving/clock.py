"""The server's clock: the wall clock, or a virtual one that a replay harness sets.

Every time the server reads (a request's time, the age of each behaviour in the feature store,
the "not in the future" check of LogEvents, the impression log's `ts`) comes from one clock,
`Cascade.clock`. In production that is the wall clock. A replay of simulated days
(`recstack live`) compresses a day into seconds; on the wall clock every event of the replay
would then look minutes old, and the 1 h / 24 h / 7 d windows of the interacted features would
count days of behaviour as the last hour. `recstack serve --clock-file F` makes the server's
time the number in F instead (seconds since the epoch), which the harness rewrites as its
simulated time passes (`set_clock`), so ages are the simulated ones.

    set_clock("arms/A/clock", 1_796_400_000.0)
    clock = FileClock("arms/A/clock")     # clock() -> 1796400000.0
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


class ClockError(ValueError):
    """The clock file is missing or does not hold a time."""


def read_clock(path: str | Path) -> float:
    """The time in the clock file -> seconds since the epoch; ClockError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClockError(f"clock file {path}: {e.strerror or e}") from None
    try:
        value = float(text.strip())
    except ValueError:
        raise ClockError(f"clock file {path}: not a number of seconds since the epoch: {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ClockError(f"clock file {path}: must be a finite time > 0, got {value}")
    return value


def set_clock(path: str | Path, t: float) -> None:
    """Write `t` (seconds since the epoch) atomically: a reader sees the old time or the new one."""
    if not math.isfinite(t) or t <= 0:
        raise ClockError(f"clock file {path}: must be a finite time > 0, got {t}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(repr(float(t)))
    os.replace(tmp, path)


class FileClock:
    """A clock that reads its time from a file on every call (a few microseconds: the harness may
    rewrite it between any two calls). The file must hold a time when the clock is made; a later
    read that fails keeps the last time and logs once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._last = read_clock(self.path)
        self._failing = False

    def __call__(self) -> float:
        try:
            self._last = read_clock(self.path)
            self._failing = False
        except ClockError as e:
            if not self._failing:
                log.warning("%s; keeping the last time %.3f", e, self._last)
            self._failing = True
        return self._last
