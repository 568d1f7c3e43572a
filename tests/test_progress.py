"""Progress that shows in a log: plain lines per task and per stage when stdout is not a terminal."""

import io
import re

import pytest
from rich.console import Console

from aiflow_fl.progress import plain_line, progress_bar, stage


def test_not_a_terminal_logs_start_progress_and_end(capsys):
    console = Console(file=io.StringIO(), force_terminal=False)
    with progress_bar(console=console, log_every_s=0.0) as progress:
        task = progress.add_task("[bold]training branches[/bold]", total=4)
        for _ in range(4):
            progress.advance(task)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] training branches: 0/4 \(0%\), 0 s", lines[0])
    assert lines[-1].startswith("[") and "training branches: 4/4 (100%)" in lines[-1]
    assert len(lines) == 5  # start + one per advance (log_every_s=0); the end is not repeated


def test_lines_are_rate_limited(capsys):
    console = Console(file=io.StringIO(), force_terminal=False)
    with progress_bar(console=console, log_every_s=3600.0) as progress:
        task = progress.add_task("steps", total=100)
        for _ in range(100):
            progress.update(task, advance=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "0/100" in lines[0] and "100/100" in lines[1]


def test_a_terminal_gets_the_bar_only(capsys):
    console = Console(file=io.StringIO(), force_terminal=True)
    with progress_bar(console=console, log_every_s=0.0) as progress:
        task = progress.add_task("steps", total=3)
        progress.advance(task, 3)
    assert capsys.readouterr().out == ""


def test_stage_lines_and_failure():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with stage("calibration", console):
        pass
    with pytest.raises(ValueError), stage("saving", console):
        raise ValueError("disk full")
    text = out.getvalue()
    assert "calibration ..." in text and "calibration: done in" in text and "saving: failed after" in text


def test_plain_line_without_total_and_with_brackets():
    assert plain_line("loss [3.2", 5, None, 2.4) == "loss [3.2: 5 done, 2 s"
