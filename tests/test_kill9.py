"""kill -9 at random moments, many times: the last good checkpoint always loads and resume continues exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from test_interrupt import EXE, TIMING
from test_main_command import REPO, SHRINK

from locoswarm.checkpoint import CHECKPOINT_NAME, load_checkpoint

WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from locoswarm.checkpoint import load_checkpoint, save_checkpoint
    run_dir = Path(sys.argv[1])
    state = load_checkpoint(run_dir)
    n = 0 if state is None else state["n"] + 1
    print("ready", flush=True)
    while n < 10_000:  # bounded: the test kills it long before
        save_checkpoint(run_dir, {"n": n, "big": torch.full((1_000_000,), float(n))})  # 4 MB a write
        n += 1
    """
)


def _kill_at_random(cmd: list[str], rng: random.Random, low: float, high: float, ready=None) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        if ready is not None:
            deadline = time.monotonic() + 240
            while not ready():
                if proc.poll() is not None:
                    return proc.returncode
                assert time.monotonic() < deadline, "the process never got going"
                time.sleep(0.02)
        time.sleep(rng.uniform(low, high))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return proc.returncode
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_checkpoint_writes_survive_kill_9(tmp_path):
    """20 writers killed at random moments (often mid-write): each time the file loads, whole and consistent."""
    rng = random.Random(0)
    seen = []
    path = tmp_path / CHECKPOINT_NAME
    for _ in range(20):
        before = load_checkpoint(tmp_path)
        mtime = path.stat().st_mtime if path.exists() else 0.0

        def wrote(mtime=mtime):  # the writer is past its imports and has finished a write: kill it mid-stream
            return path.exists() and path.stat().st_mtime > mtime

        _kill_at_random([sys.executable, "-c", WRITER, str(tmp_path)], rng, 0.0, 0.3, ready=wrote)
        state = load_checkpoint(tmp_path)
        assert state["big"].eq(float(state["n"])).all(), "a torn checkpoint"
        assert before is None or state["n"] > before["n"]  # the writer got further: nothing written was lost
        seen.append(state["n"])
    assert seen == sorted(seen) and len(set(seen)) > 5  # progress was made, never lost
    assert len(list(tmp_path.glob(f".{CHECKPOINT_NAME}.tmp*"))) <= 1  # stale temporaries are cleaned up


@pytest.mark.slow
def test_training_killed_again_and_again_resumes_to_the_same_numbers(tmp_path):
    args = [*SHRINK, "algorithm=streaming_diloco", "algorithm.fragments=2", "algorithm.overlap_steps=2",
            "compression=topk", "compression.ratio=0.1", "compression.error_feedback=true",
            "train.max_steps=96", "train.checkpoint_every=1", "workers=2", "network.step_seconds=0.01"]  # fmt: skip
    full = subprocess.run([EXE, *args, f"hydra.run.dir={tmp_path / 'full'}"], capture_output=True, text=True,
                          timeout=600, cwd=REPO)  # fmt: skip
    assert full.returncode == 0, full.stderr[-2000:]

    cut = tmp_path / "cut"
    rng = random.Random(1)
    kills = 0
    for attempt in range(8):
        extra = ["resume=true"] if (cut / CHECKPOINT_NAME).exists() else []
        cmd = [EXE, *args, f"hydra.run.dir={cut}", *extra]
        started = time.monotonic()
        mtime = (cut / CHECKPOINT_NAME).stat().st_mtime if extra else 0.0

        def new_checkpoint(mtime=mtime):
            p = cut / CHECKPOINT_NAME
            return p.exists() and p.stat().st_mtime > mtime

        code = _kill_at_random(cmd, rng, 0.0, 1.0, ready=new_checkpoint)
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"attempt {attempt}: exit {code} after {time.monotonic() - started:.1f}s"
        kills += 1
        assert load_checkpoint(cut) is not None  # the last good checkpoint always loads
    else:
        final = subprocess.run([EXE, *args, f"hydra.run.dir={cut}", "resume=true"], capture_output=True, text=True,
                               timeout=600, cwd=REPO)  # fmt: skip
        assert final.returncode == 0, final.stderr[-2000:]
    assert kills >= 3, f"only {kills} kills landed before the run finished"
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert b["status"] == "ok"
    diff = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if k not in TIMING and a.get(k) != b.get(k)}
    assert not diff, diff
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "cut")]
    assert rows[0] == rows[1]
