"""Progress wherever the output goes: a tqdm bar on a terminal, plain timed log lines anywhere else."""

from __future__ import annotations

import io
import logging
import os
import select
import subprocess
import sys
from pathlib import Path

from test_main_command import REPO, SHRINK

from locoswarm.progress import Progress


def test_without_a_terminal_it_logs_a_line_every_interval_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="locoswarm.progress")
    stream = io.StringIO()  # not a TTY: a bar would write carriage-return frames here
    p = Progress(total=10, initial=2, name="run", enabled=True, every=3600.0, stream=stream)
    for _ in range(7):
        p.update(1, loss="2.500")
    assert caplog.records == []  # inside the interval and not finished: nothing
    p.update(1, loss="2.400", val="2.600")
    p.close()
    assert stream.getvalue() == ""
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("run: step 10/10 (100%)") and line.endswith("| loss=2.400 val=2.600"), line

    caplog.clear()
    p = Progress(total=5, initial=0, name="run", enabled=True, every=0.0, stream=stream)
    for _ in range(5):
        p.update(1)
    assert [r.getMessage().split(" |")[0] for r in caplog.records] == [f"run: step {i}/5 ({20 * i}%)" for i in
                                                                        range(1, 6)]  # fmt: skip

    caplog.clear()
    p = Progress(total=5, initial=0, name="run", enabled=False, every=0.0, stream=stream)
    p.update(5)
    assert caplog.records == [] and stream.getvalue() == ""


def test_on_a_terminal_it_draws_a_bar_and_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="locoswarm.progress")
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        assert tty.isatty()
        p = Progress(total=4, initial=0, name="run", enabled=True, every=0.0, stream=tty)
        for _ in range(4):
            p.update(1, loss="1.000")
        p.close()
        tty.flush()
        drawn = _drain(leader)
    os.close(leader)
    assert "4/4" in drawn and "loss=1.000" in drawn and "\r" in drawn
    assert caplog.records == []


def _drain(fd: int) -> str:
    """Everything written to a pty so far: one read may return only part of it (the failure seen in CI)."""
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_a_run_piped_to_a_file_writes_progress_lines_not_bar_frames(tmp_path):
    exe = Path(sys.executable).with_name("locoswarm-train")
    overrides = [o for o in SHRINK if not o.startswith("train.progress")]
    cmd = [str(exe), f"hydra.run.dir={tmp_path / 'run'}", *overrides, "train.progress_every=0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    lines = [line for line in text.splitlines() if "step " in line and "steps/s" in line]
    assert lines and "step 12/12 (100%)" in lines[-1], text[-3000:]
    assert "\r" not in text
