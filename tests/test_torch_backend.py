"""backend=torch: ``torchrun --nproc_per_node=3 -m locoswarm.cli.train backend=torch`` over gloo on 127.0.0.1
must give the sim backend's numbers (same seeds, no compression) to 1e-5 relative, and leave no process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import TINY_OVERRIDES

from locoswarm.checkpoint import load_checkpoint

pytestmark = [pytest.mark.network, pytest.mark.slow]

TINY = TINY_OVERRIDES  # each inner step takes milliseconds, so rounds dominate
RUN_LIMIT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state(run_dir: Path, worker: int = 0) -> list[torch.Tensor]:
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return [*ckpt["strategy"]["anchor"], *ckpt["group"]["workers"][worker]["model"].values()]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item() for x, y in zip(a, b, strict=True))  # fmt: skip


def torchrun(nproc: int, args: list[str]) -> tuple[int, str, int]:
    """torchrun in its own session; everything it started is killed by process group afterwards."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "locoswarm.cli.train", "backend=torch", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=RUN_LIMIT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, proc.pid


def test_torchrun_gloo_matches_sim(tmp_path):
    """(b) and (e) for the torch backend."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [*TINY, "workers=3", "seed=7", "train.max_steps=9"]
    run = tmp_path / "torch"
    rc, out, session = torchrun(3, [*overrides, f"hydra.run.dir={run}"])
    assert rc == 0, out[-4000:]

    sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    assert sim["outer_steps"] == 3
    worst = 0.0
    for r in range(3):
        rank_dir = run if r == 0 else run / f"rank-{r}"
        s = json.loads((rank_dir / "summary.json").read_text())
        assert s["status"] == "ok" and s["outer_steps"] == 3, s
        rows = [json.loads(x) for x in (rank_dir / "metrics.jsonl").read_text().splitlines() if x]
        syncs = [row for row in rows if "group_size" in row]
        assert [row["group_size"] for row in syncs] == [3, 3, 3]
        assert all(row["bytes_sent"] > 0 for row in syncs)
        worst = max(worst, rel(state(rank_dir), state(tmp_path / "sim", worker=r)))
    print(f"torch (gloo) vs sim: max relative difference {worst:.2e}")
    assert worst <= 1e-5

    # (e): nothing of the run survives it.
    end = time.monotonic() + 10
    left: list[str] = []
    while time.monotonic() < end:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(p.info["cmdline"] or []))
        if not left:
            break
        time.sleep(0.5)
    assert not left, left


def test_world_size_must_match_workers(tmp_path):
    """workers=K must equal torchrun's world size, and the error names the key."""
    rc, out, _ = torchrun(2, [*TINY, "workers=3", "train.max_steps=3", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert rc != 0
    assert "workers=3 is invalid" in out
