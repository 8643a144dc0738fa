"""Progress of long steps: a tqdm bar on a terminal, plain lines that reach a log file otherwise."""

from __future__ import annotations

import fcntl
import io
import os
import select
import struct
import termios

from protoalign_cli import progress as progress_module
from protoalign_cli.progress import LogLines, duration_text, progress, progress_line


def test_progress_line_says_how_far_how_fast_and_how_long_still():
    assert progress_line("extract", 1200, 24000, "config", 40.0) == \
        "extract: 1200/24000 configs (5%), 40 configs/s, 9 min 30 s left"
    assert progress_line("extract", 24000, 24000, "config", 40.0) == "extract: 24000/24000 configs (100%), 40 configs/s"
    assert progress_line("read", 7, None, "atom", None) == "read: 7 atoms"
    assert [duration_text(s) for s in (0.4, 59, 61, 3600 * 3 + 7 * 60 + 5)] == ["0 s", "59 s", "1 min 1 s", "3 h 07 min"]


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_come_every_interval_and_once_at_the_end_only_after_a_long_step():
    stream, clock = io.StringIO(), Clock()
    lines = LogLines(total=100, desc="extract", unit="config", initial=20, stream=stream, interval_s=10, clock=clock)
    for _ in range(4):
        clock.now += 4
        lines.update(10)  # at 4, 8, 12 (a line: 10 s since the start), 16 s
    lines.close()
    assert stream.getvalue().splitlines() == [
        "extract: 50/100 configs (50%), 2.5 configs/s, 20 s left",  # the rate counts only this run's 30 configs
        "extract: 60/100 configs (60%), 2.5 configs/s, 16 s left",
    ]
    short, clock = io.StringIO(), Clock()
    lines = LogLines(total=100, desc="extract", unit="config", initial=0, stream=short, interval_s=10, clock=clock)
    clock.now += 3
    lines.update(100)
    lines.close()
    assert short.getvalue() == ""


def test_a_log_file_gets_whole_lines_without_carriage_returns(tmp_path):
    log = tmp_path / "slurm-1234.out"
    with open(log, "w") as stream, progress(total=3, desc="step", unit="item", stream=stream, interval_s=0) as bar:
        for _ in range(3):
            bar.update()
    text = log.read_text()
    assert "\r" not in text
    assert text.splitlines()[-1].startswith("step: 3/3 items (100%)")
    assert len(text.splitlines()) == 4  # one per update, one at the end


def test_a_terminal_gets_a_tqdm_bar(tmp_path):
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 24 rows, 80 columns
    try:
        with open(terminal, "w", closefd=False) as stream:
            with progress(total=3, desc="step", unit="item", stream=stream) as bar:
                bar.update(3)
        text = ""
        while select.select([controller], [], [], 0.2)[0]:
            text += os.read(controller, 4096).decode()
    finally:
        os.close(controller)
        os.close(terminal)
    assert "\r" in text and "3/3" in text and "step" in text


def test_disabled_progress_writes_nothing(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0)
    with progress(total=3, desc="step", stream=stream, enabled=False) as bar:
        bar.update(3)
    assert stream.getvalue() == ""
