"""backend=hivemind on 127.0.0.1: real peer processes started by ``locoswarm-swarm``, no mocks.

(a) 3 peers average exactly like ``sim`` (same seeds, no compression): final params within 1e-5 relative.
(c) SIGKILL of 1 of 4 peers mid-run: the other 3 finish every outer step with status ok, still in sync.
(d) a late joiner downloads the swarm's state and ends with the swarm's params.
(e) nothing is left running: no peer, DHT, averager or p2pd process survives a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import TINY_OVERRIDES

from locoswarm.checkpoint import load_checkpoint

pytestmark = [pytest.mark.network, pytest.mark.slow]

TINY = TINY_OVERRIDES  # each inner step takes milliseconds, so rounds dominate
RUN_LIMIT = 300.0  # seconds: a bound on one swarm run on a loaded 2-core box (typically 30-60 s)


class Swarm:
    """``locoswarm-swarm`` as a subprocess in its own session; remembers every session it and its peers
    started, so teardown can prove (e) and kill anything left."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.lines: list[str] = []
        self.sessions: set[int] = set()
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "locoswarm.cli.swarm", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=full_env,
        )
        self.sessions.add(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.track()

    def track(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=False):
                with contextlib.suppress(psutil.Error, OSError):
                    self.sessions.add(os.getsid(child.pid))

    def peer_pid(self, name: str) -> int:
        for child in psutil.Process(self.proc.pid).children():
            if f"--index {name}" in " ".join(child.cmdline()):
                return child.pid
        raise LookupError(name)

    def wait_for(self, pattern: str, limit: float) -> re.Match:
        end = time.monotonic() + limit
        seen = 0
        while time.monotonic() < end:
            for line in self.lines[seen:]:
                m = re.search(pattern, line)
                if m:
                    return m
            seen = len(self.lines)
            if self.proc.poll() is not None and seen == len(self.lines):
                break
            self.track()
            time.sleep(0.05)
        raise AssertionError(f"never saw {pattern!r}; output tail:\n{''.join(self.lines[-40:])}")

    def dump(self, path: Path) -> None:
        path.write_text("".join(self.lines))

    def wait(self, limit: float = RUN_LIMIT) -> int:
        end = time.monotonic() + limit
        while self.proc.poll() is None and time.monotonic() < end:
            self.track()
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.kill()
            raise AssertionError(f"swarm still running after {limit}s; tail:\n{''.join(self.lines[-40:])}")
        self._reader.join(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        for sid in self.sessions:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, signal.SIGKILL)

    def leftovers(self, grace: float = 15.0) -> list[str]:
        """(e): processes still alive in any session this swarm created (peers, their forks, p2pd)."""
        end = time.monotonic() + grace
        while True:
            left = []
            for p in psutil.process_iter(["pid", "name", "cmdline"]):
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getsid(p.pid) in self.sessions and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(f"{p.pid} {p.info['name']} {' '.join(p.info['cmdline'] or [])[:120]}")
            if not left or time.monotonic() > end:
                return left
            time.sleep(0.5)


@pytest.fixture
def swarms(tmp_path):
    started: list[Swarm] = []

    def start(args: list[str]) -> Swarm:
        s = Swarm(args)
        started.append(s)
        return s

    yield start
    for i, s in enumerate(started):
        s.dump(tmp_path / f"swarm-{i}.log")
    leftovers = [left for s in started for left in s.leftovers()]
    for s in started:
        s.kill()
    assert not leftovers, "processes left behind:\n" + "\n".join(leftovers)  # (e)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def sync_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "group_size" in r]


def anchor_and_params(run_dir: Path, worker: int = 0) -> list[torch.Tensor]:
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    model = ckpt["group"]["workers"][worker]["model"]
    return [*ckpt["strategy"]["anchor"], *model.values()]


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(
        ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    "codec",
    [
        ["compression=none"],
        # all-gathered through hivemind's P2P: every peer decodes every payload, as sim does (residuals local)
        ["compression=topk", "compression.ratio=0.1", "compression.error_feedback=true"],
    ],
    ids=["none", "topk"],
)
def test_three_peers_match_sim(tmp_path, swarms, codec):
    """(a): 3 hivemind peers vs the sim backend, same seeds, 3 outer steps; uncompressed and top-k."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [*TINY, "workers=3", "seed=5", "train.max_steps=9", *codec]
    swarm = swarms(["--peers", "3", "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    assert sim["status"] == "ok" and sim["outer_steps"] == 3
    worst = 0.0
    for i in range(3):
        run = tmp_path / "swarm" / f"peer-{i}"
        s = summary(run)
        assert s["status"] == "ok" and s["outer_steps"] == 3, s
        rows = sync_rows(run)
        assert [r["group_size"] for r in rows] == [3, 3, 3], rows
        assert all(r["bytes_sent"] > 0 and r["comm_seconds"] > 0 for r in rows), rows
        assert (run / ".hydra" / "config.yaml").exists()
        assert s["compression_ratio"] == pytest.approx(sim["compression_ratio"])
        diff = max_rel_diff(anchor_and_params(run), anchor_and_params(tmp_path / "sim", worker=i))
        worst = max(worst, diff)
    print(f"hivemind vs sim: max relative difference {worst:.2e}")
    assert worst <= 1e-5


def test_sigkill_one_of_four(tmp_path, swarms):
    """(c): SIGKILL peer 3 (its whole process group, like a crashed machine) as it enters round 2's averaging;
    the other 3 must finish all 5 outer steps with status ok, and still agree."""
    overrides = [*TINY, "workers=4", "seed=2", "train.max_steps=15"]
    swarm = swarms(["--peers", "4", "--out", str(tmp_path / "swarm"), *overrides])
    swarm.wait_for(r"\[peer-3\].*round 1: group of", limit=RUN_LIMIT)
    swarm.wait_for(r"\[peer-3\].*round 2: looking for a group", limit=RUN_LIMIT)
    os.killpg(swarm.peer_pid("3"), signal.SIGKILL)
    assert swarm.wait() == 1  # one peer did not finish ok
    survivors = [tmp_path / "swarm" / f"peer-{i}" for i in range(3)]
    for run in survivors:
        s = summary(run)
        assert s["status"] == "ok" and s["outer_steps"] == 5, s
    dead = summary(tmp_path / "swarm" / "peer-3")
    assert dead["status"] == "failed" and "SIGKILL" in dead["error"]
    ref = anchor_and_params(survivors[0])
    for run in survivors[1:]:
        assert max_rel_diff(anchor_and_params(run), ref) <= 1e-5
    print("group sizes after the kill:", [[r["group_size"] for r in sync_rows(run)] for run in survivors])


def test_late_joiner_gets_the_swarms_state(tmp_path, swarms):
    """(d): 2 peers of a workers=3 run; a third joins after round 1 (taking the free rank 2), downloads the
    swarm's state, and from then on averages with the others: it ends with exactly the swarm's params."""
    # 30 rounds: the two peers' rounds each wait the matchmaking window for the missing third, which leaves the
    # joiner (a fresh process: imports, DHT bootstrap) time to arrive well before the end.
    overrides = [*TINY, "workers=3", "seed=4", "train.max_steps=90"]
    swarm = swarms(["--peers", "2", "--out", str(tmp_path / "swarm"), *overrides])
    maddr = swarm.wait_for(r"peer-0 DHT address: (\S+)", limit=RUN_LIMIT).group(1)
    swarm.wait_for(r"\[peer-0\].*round 1: group of", limit=RUN_LIMIT)
    joiner = swarms(["join", maddr, "--out", str(tmp_path / "joiner"), *overrides])
    assert joiner.wait() == 0, "".join(joiner.lines[-60:])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    loaded = joiner.wait_for(r"loaded the swarm's state at round (\d+)", limit=1)
    assert 1 <= int(loaded.group(1)) < 30
    j = summary(tmp_path / "joiner")
    s0 = summary(tmp_path / "swarm" / "peer-0")
    assert j["status"] == "ok" and s0["status"] == "ok"
    assert j["outer_steps"] == s0["outer_steps"] == 30
    assert j["steps"] == s0["steps"] == 90
    rows = sync_rows(tmp_path / "joiner")
    assert any(r["group_size"] == 3 for r in rows), rows  # it averaged with both swarm peers
    ref = anchor_and_params(tmp_path / "swarm" / "peer-0")
    assert max_rel_diff(anchor_and_params(tmp_path / "swarm" / "peer-1"), ref) <= 1e-5
    assert max_rel_diff(anchor_and_params(tmp_path / "joiner"), ref) <= 1e-5
    assert "rank 2" in "".join(joiner.lines)
