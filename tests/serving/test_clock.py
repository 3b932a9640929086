"""The server's clock: a virtual time read from a file a replay harness rewrites."""
from __future__ import annotations

import pytest

from recstack.serving.clock import ClockError, FileClock, read_clock, set_clock
from recstack.serving.process import ServeError, ServeOptions, _clock


def test_the_file_clock_follows_the_file(tmp_path):
    path = tmp_path / "clock"
    set_clock(path, 1.9e9)
    clock = FileClock(path)
    assert clock() == 1.9e9
    set_clock(path, 1.9e9 + 86400.5)
    assert clock() == 1.9e9 + 86400.5
    assert read_clock(path) == 1.9e9 + 86400.5
    assert [p.name for p in tmp_path.iterdir()] == ["clock"]  # the atomic write leaves no temporary file


def test_a_clock_that_cannot_be_read_is_refused_at_start_and_kept_after(tmp_path, caplog):
    path = tmp_path / "clock"
    with pytest.raises(ClockError, match="clock file .*clock: No such file"):
        FileClock(path)
    path.write_text("tomorrow")
    with pytest.raises(ClockError, match="not a number of seconds since the epoch: 'tomorrow'"):
        FileClock(path)
    for bad in ("nan", "-5", "0"):
        path.write_text(bad)
        with pytest.raises(ClockError, match="finite time > 0"):
            read_clock(path)
    with pytest.raises(ClockError, match="finite time > 0"):
        set_clock(path, float("inf"))
    set_clock(path, 2e9)
    clock = FileClock(path)
    path.write_text("garbled")  # a harness bug after start: the server keeps its last time, says so once
    assert clock() == 2e9 and clock() == 2e9
    assert sum("keeping the last time" in r.getMessage() for r in caplog.records) == 1
    set_clock(path, 2e9 + 1)
    assert clock() == 2e9 + 1


def test_serve_refuses_a_missing_clock_file_in_one_line(tmp_path):
    assert _clock(ServeOptions()) == {}
    with pytest.raises(ServeError, match=r"^--clock-file: clock file .*missing: No such file"):
        _clock(ServeOptions(clock_file=str(tmp_path / "missing")))
    set_clock(tmp_path / "ok", 2e9)
    assert _clock(ServeOptions(clock_file=str(tmp_path / "ok")))["clock"]() == 2e9
