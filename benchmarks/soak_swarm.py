"""Soak test of a real hivemind swarm: churn (SIGKILLed peers, replacements joining) with one malicious peer.

    .venv/bin/python benchmarks/soak_swarm.py --minutes 30 --out runs/soak
    .venv/bin/python benchmarks/soak_swarm.py --minutes 2 --attack nan --kill-interval 15 30 --out runs/soak-2m
    .venv/bin/python benchmarks/soak_swarm.py --minutes 10 --out runs/soak aggregator=centered_clip   # overrides

What it does, every step bounded in time:

1. calibration: a short ``locoswarm-swarm --peers N`` run of the same config (attacker included, no churn) to
   measure seconds per round; the soak's budget is ``(minutes x 60 + --tail-seconds) x --churn-speed / (seconds
   per round)`` rounds (``--rounds`` skips this). Churn slows the swarm down (a round with a peer missing waits out
   the matchmaking window), so a lower ``--churn-speed`` ends sooner; churn always stops at ``--minutes``.
2. soak: ``locoswarm-swarm --peers N`` (peer i hosts rank i; the peer hosting the last rank is malicious:
   ``faults.byzantine=1 faults.attack=<--attack>``, a test-only peer mode). While churn is open, once every honest
   rank has a live peer that has averaged or loaded the swarm's state, after a random interval (``--kill-interval``,
   seeded by ``--seed``) it SIGKILLs the process group of a random live honest peer (a launched one or an earlier
   replacement), then after a random delay (``--rejoin-delay``) starts ``locoswarm-swarm join <a live peer's
   address> --rank <the dead peer's rank>`` (``--auto-rank``: let the joiner pick). Churn closes when ``--minutes``
   are up or when the swarm has less than ``--tail-seconds`` left to run (a replacement must arrive before the
   swarm ends); then the run finishes on its own (each peer stops at the budget), bounded by ``--finish-timeout``,
   past which the soak stops it with SIGINT (summaries record ``failed``, interrupted) and then SIGKILL.
3. references: ``backend=sim`` runs of the same config and budget, no churn: ``clean`` (no attacker; the reference
   the honest peers are judged against) and ``attacked`` (the same attacker, no churn).

Reported (stdout table and ``<out>/soak.json``): rounds per peer (sync rows; averaged with others / alone /
failed), kills, rejoins started and successful (the joiner loaded the swarm's state), exclusions from
metrics.jsonl's ``rejected`` (per round, counted once however many peers logged it, by reason and by rank), each
honest surviving peer's status and final val loss against the clean run, whether any honest peer ended non-finite
or with a status other than ok, and whether the honest survivors agree on the final global model. One progress
line per event on stdout (no TTY needed); every log lands under ``<out>/logs``.

Processes: the soak starts each ``locoswarm-swarm`` supervisor in its own session and records the session of every
peer those supervisors start (peers run in their own sessions). On any exit (end, Ctrl+C, SIGTERM, a crash) every
one of those sessions is killed by process group, and what is still alive in them afterwards is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil

# The tiny run of tests/helpers.py (TINY_OVERRIDES): each inner step takes milliseconds, so rounds dominate. A
# checkpoint only at the end (checkpoint_every > the budget) lets the soak compare the survivors' final models.
TINY = [
    "data=synthetic", "data.synthetic_tokens=60000", "data.chunk_tokens=1024", "device=cpu",
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
    "train.batch_size=4", "train.warmup_steps=2", "train.log_interval=3", "train.eval_interval=6",
    "train.eval_batches=2", "train.checkpoint_every=1000000", "train.progress=false",
    "algorithm=diloco", "algorithm.inner_steps=3", "algorithm.warmup_sync_steps=0",
]  # fmt: skip
ATTACKS = ("nan", "scale", "signflip", "random")  # backend=hivemind's test-only attackers (alie is sim-only)
START_LIMIT = 300.0  # seconds for a swarm to reach its first round on a loaded box (imports, DHT bootstrap)
INTERRUPT_WAIT = 75.0  # after SIGINT: locoswarm-swarm gives its peers 60 s, then SIGKILLs them itself
ROUND_RE = re.compile(r"^\[peer-(\S+)\] .* round (\d+): (looking for a group|group of)")
RANK_RE = re.compile(r"^\[peer-(\S+)\] .* joining as worker rank (\d+)")
LOADED_RE = re.compile(r"^\[peer-(\S+)\] .* loaded the swarm's state at round (\d+)")
# Log lines worth an event line of their own (the first few of each kind; all are counted).
NOTABLE = {
    "round failed": re.compile(r"round \d+ failed"),
    "averages disagree": re.compile(r"averages disagree"),
    "resync attempt": re.compile(r"resync|out of sync|no in-sync peer"),
    "join download": re.compile(r"joining a swarm at round|could not download"),
    "error line": re.compile(r"\] .* (ERROR|CRITICAL)|locoswarm.swarm \w+: failed:|Traceback"),
    "malformed": re.compile(r"malformed|refused"),
}
NOTABLE_SHOWN = 5


# ---------------------------------------------------------------------------------------------- output
class Events:
    """One line per event on stdout (flushed: readable in a non-TTY log), all kept for soak.json."""

    def __init__(self, out: Path):
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.file = open(out / "events.jsonl", "a", buffering=1)  # noqa: SIM115 - closed by close()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, kind: str, msg: str = "", **fields) -> None:
        t = self.now()
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        print(f"[soak {t:8.1f}s] {kind:<12} {msg} {extra}".rstrip(), flush=True)
        row = {"t": round(t, 2), "kind": kind, "msg": msg, **fields}
        self.rows.append(row)
        self.file.write(json.dumps(row, default=str) + "\n")

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------- processes
class LogTail:
    """The complete lines a supervisor has appended to its log since the last read."""

    def __init__(self, path: Path):
        self.path, self.pos, self.partial = path, 0, b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        *done, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in done]


class Sessions:
    """Every session this soak created: each supervisor's (started here with start_new_session) and each of its
    peers' (locoswarm-swarm starts every peer in a session of its own). Only these are ever killed."""

    def __init__(self) -> None:
        self.supervisors: list[subprocess.Popen] = []
        self.sids: set[int] = set()
        self.pruned = time.monotonic()

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "locoswarm.cli.swarm", *args],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.supervisors.append(proc)
        self.sids.add(proc.pid)
        self.track()
        return proc

    def track(self) -> None:
        """Record the sessions of the supervisors' children (the peers). Called often: a supervisor reaps its own
        dead peers, but if it dies itself its peers' sessions are known only from here."""
        for sup in self.supervisors:
            if sup.poll() is not None:
                continue
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(sup.pid).children(recursive=False):
                    with contextlib.suppress(psutil.Error, OSError):
                        self.sids.add(os.getsid(child.pid))
        if time.monotonic() - self.pruned > 5.0:
            self.prune()

    def prune(self) -> None:
        """Forget the sessions with no process left. Linux never hands out a pid still in use as a session id, but an
        emptied session's id may come back as someone else's: only live sessions stay ours to kill."""
        self.pruned = time.monotonic()
        live = set()
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                live.add(os.getsid(p.pid))
        self.sids &= live | {s.pid for s in self.supervisors if s.poll() is None}

    def peer_pid(self, sup: subprocess.Popen, index: str) -> int | None:
        """The pid of supervisor ``sup``'s peer ``--index <index>`` while it runs."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(sup.pid).children(recursive=False):
                with contextlib.suppress(psutil.Error):
                    cmd = child.cmdline()
                    if "--index" in cmd and cmd[cmd.index("--index") + 1] == index:
                        if child.status() != psutil.STATUS_ZOMBIE:
                            return child.pid
        return None

    def interrupt(self) -> None:
        """SIGINT to every live supervisor: each forwards it to its peers, which leave and write summary.json."""
        for sup in self.supervisors:
            if sup.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sup.pid, signal.SIGINT)

    def wait(self, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            self.track()
            if all(s.poll() is not None for s in self.supervisors):
                return True
            time.sleep(0.25)
        return False

    def alive(self) -> list[str]:
        left = []
        for p in psutil.process_iter(["pid", "name", "cmdline"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) in self.sids and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {p.info['name']} {' '.join(p.info['cmdline'] or [])[:140]}")
        return left

    def kill_all(self) -> list[str]:
        """SIGKILL every session this soak created; returns what was still alive in them just before (empty after
        a clean end). Processes are matched by session id, never by name."""
        self.track()
        self.prune()
        left = self.alive()
        for sid in self.sids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sid, signal.SIGKILL)
        for p in psutil.process_iter(["pid"]):  # anything that left its group but not its session
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) in self.sids:
                    p.kill()
        for sup in self.supervisors:
            with contextlib.suppress(subprocess.TimeoutExpired):
                sup.wait(timeout=5)
        return left


# ---------------------------------------------------------------------------------------------- peers
@dataclass
class Peer:
    name: str  # peer-<i> (launched) or join-<k>
    rank: int
    run_dir: Path
    sup: subprocess.Popen  # the supervisor that started it
    index: str  # its --index: "<i>" for launched peers, "join" for joiners
    malicious: bool
    started: float
    pid: int | None = None
    last_round: int = 0
    active: bool = False  # averaged at least once, or loaded the swarm's state
    loaded_round: int | None = None
    loaded_at: float | None = None
    killed_at: float | None = None
    exited_at: float | None = None
    resyncs: int = 0  # states downloaded after falling out of sync (a replacement's first download excluded)
    retried: bool = False  # a replacement that died before loading: its rank got another attempt (or not)

    @property
    def joiner(self) -> bool:
        return self.name.startswith("join-")

    def alive(self) -> bool:
        if self.exited_at is not None:
            return False
        if self.pid is None:  # not started yet (or already gone): judged by its supervisor
            return self.sup.poll() is None
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        return False


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def read_summary(run_dir: Path) -> dict | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads((run_dir / "summary.json").read_text())
    return None


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------- the soak
class Soak:
    def __init__(
        self, args: argparse.Namespace, overrides: list[str], rounds: int, per_round: float | None, ev: Events
    ):
        self.args, self.overrides, self.rounds, self.per_round, self.ev = args, overrides, rounds, per_round, ev
        self.samples: list[tuple[float, int]] = []  # (time, swarm round): the recent rate
        self.sessions = Sessions()
        self.rng = random.Random(args.seed)
        self.peers: list[Peer] = []
        self.tails: dict[int, LogTail] = {}  # supervisor pid -> its log
        self.malicious_rank = args.peers - 1
        self.honest_ranks = list(range(args.peers - 1))
        self.kills: list[dict] = []
        self.joins: list[dict] = []
        self.notable: Counter = Counter()
        self.rejections_seen = 0
        self.resyncs = 0
        self.main: subprocess.Popen | None = None
        self.churn_closed: str | None = None
        self.churn_seconds: float | None = None  # from the launch to the end of churn
        self.launched_at = 0.0
        self.stopped = "natural"

    # ------------------------------------------------------------------ starting and killing
    def launch(self) -> None:
        out = self.args.out / "swarm"
        log = self.args.out / "logs" / "swarm.log"
        self.main = self.sessions.start(["--peers", str(self.args.peers), "--out", str(out), *self.overrides], log)
        self.tails[self.main.pid] = LogTail(log)
        for i in range(self.args.peers):
            malicious = i == self.malicious_rank
            self.peers.append(Peer(f"peer-{i}", i, out / f"peer-{i}", self.main, str(i), malicious, self.ev.now()))
        self.ev("launch", f"{self.args.peers} peers, rank {self.malicious_rank} malicious "
                f"(attack={self.args.attack}), budget {self.rounds} rounds", pid=self.main.pid)  # fmt: skip

    def kill(self, victim: Peer) -> bool:
        pid = victim.pid or self.sessions.peer_pid(victim.sup, victim.index)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # the peer's whole group: its averagers, DHT and p2pd too
        victim.killed_at = victim.exited_at = self.ev.now()
        self.kills.append({"t": victim.killed_at, "peer": victim.name, "rank": victim.rank, "pid": pid,
                           "round": victim.last_round})  # fmt: skip
        self.ev("kill", f"SIGKILL {victim.name} (rank {victim.rank}, pid group {pid}) at its round {victim.last_round}")
        return True

    def join(self, rank: int) -> Peer | None:
        donors = [p for p in self.peers if p.alive() and p.active and (p.run_dir / "dht_maddrs.txt").exists()]
        if not donors:
            self.ev("join-skip", f"rank {rank}: no live peer to join through")
            return None
        via = self.rng.choice(donors)
        maddr = (via.run_dir / "dht_maddrs.txt").read_text().split()[0]
        k = len(self.joins) + 1
        run_dir = self.args.out / f"join-{k}"
        log = self.args.out / "logs" / f"join-{k}.log"
        cmd = ["join", maddr, "--out", str(run_dir), *([] if self.args.auto_rank else ["--rank", str(rank)])]
        sup = self.sessions.start([*cmd, *self.overrides], log)
        self.tails[sup.pid] = LogTail(log)
        peer = Peer(f"join-{k}", rank, run_dir, sup, "join", False, self.ev.now())
        self.peers.append(peer)
        self.joins.append({"t": peer.started, "peer": peer.name, "rank": rank, "via": via.name, "loaded": None})
        self.ev("join", f"{peer.name} for rank {rank} via {via.name}" + (" (auto rank)" if self.args.auto_rank else ""),
                pid=sup.pid)  # fmt: skip
        return peer

    # ------------------------------------------------------------------ watching
    def peer_for(self, sup_pid: int, index: str) -> Peer | None:
        for p in self.peers:
            if p.sup.pid == sup_pid and p.index == index:
                return p
        return None

    def poll(self) -> None:
        self.sessions.track()
        for sup_pid, tail in self.tails.items():
            for line in tail.lines():
                self.on_line(sup_pid, line)
        for p in self.peers:
            if p.exited_at is None and p.pid is None and p.sup.poll() is None:
                p.pid = self.sessions.peer_pid(p.sup, p.index)
            if p.exited_at is None and not p.alive():
                p.exited_at = self.ev.now()
                s = read_summary(p.run_dir) or {}
                error = f" error={s['error']!r}" if s.get("error") else ""
                self.ev("exit", f"{p.name} (rank {p.rank}) status={s.get('status')} outer_steps={s.get('outer_steps')}"
                        f" val_loss={s.get('final_val_loss')}{error}")  # fmt: skip
                if p.joiner and not p.active:
                    self.ev("join-failed", f"{p.name} (rank {p.rank}) exited before loading the swarm's state")

    def on_line(self, sup_pid: int, line: str) -> None:
        if m := ROUND_RE.match(line):
            p = self.peer_for(sup_pid, m.group(1))
            if p is not None:
                p.last_round = max(p.last_round, int(m.group(2)))  # the round it is in (finished or not)
                p.active = p.active or m.group(3) == "group of"
            return
        if m := RANK_RE.match(line):  # a joiner that picked its own rank (--auto-rank)
            p = self.peer_for(sup_pid, m.group(1))
            if p is not None and p.rank != int(m.group(2)):
                self.ev("rank", f"{p.name} picked rank {m.group(2)} (rank {p.rank} was free)")
                p.rank = int(m.group(2))
            return
        if m := LOADED_RE.match(line):
            p = self.peer_for(sup_pid, m.group(1))
            if p is None:
                return
            p.last_round = max(p.last_round, int(m.group(2)))
            if p.joiner and p.loaded_round is None:  # a replacement's first download: it has (re)joined
                p.loaded_round, p.loaded_at, p.active = int(m.group(2)), self.ev.now(), True
                for j in self.joins:
                    if j["peer"] == p.name:
                        j["loaded"] = {"round": p.loaded_round, "after_s": round(p.loaded_at - p.started, 1)}
                self.ev("rejoined", f"{p.name} (rank {p.rank}) loaded the swarm's state at round {p.loaded_round}, "
                        f"{p.loaded_at - p.started:.1f}s after its start")  # fmt: skip
            else:  # an out-of-sync peer caught up from a groupmate
                p.resyncs += 1
                self.resyncs += 1
                self.ev("resync", f"{p.name} (rank {p.rank}) loaded the swarm's state at round {m.group(2)}")
            return
        if "contribution rejected" in line:
            self.rejections_seen += 1
            return
        for kind, pattern in NOTABLE.items():
            if pattern.search(line):
                self.notable[kind] += 1
                if self.notable[kind] <= NOTABLE_SHOWN:
                    more = " (further ones are only counted)" if self.notable[kind] == NOTABLE_SHOWN else ""
                    self.ev("log", f"{kind}{more}: {line.strip()[:300]}")
                return

    def swarm_round(self) -> int:
        return max((p.last_round for p in self.peers if p.alive()), default=0)

    def heartbeat(self) -> None:
        live = " ".join(f"{p.name}:r{p.last_round}{'*' if p.malicious else ''}" for p in self.peers if p.alive())
        self.ev("status", f"round {self.swarm_round()}/{self.rounds} live [{live}]", kills=len(self.kills),
                joins=len(self.joins), rejoined=sum(1 for j in self.joins if j["loaded"]),
                rejections_logged=self.rejections_seen)  # fmt: skip

    def finished(self) -> bool:
        return all(s.poll() is not None for s in self.sessions.supervisors)

    def seconds_left(self, now: float, rnd: int) -> float:
        """How long the swarm will still run: the rounds left at the faster of the rate over the last 30 s and the
        calibrated churn-free rate (the estimate errs short, so churn stops early enough for a replacement to
        arrive and average before the end)."""
        self.samples.append((now, rnd))
        while len(self.samples) > 2 and self.samples[1][0] < now - 30.0:
            self.samples.pop(0)
        t0, r0 = self.samples[0]
        rates = [1 / self.per_round] if self.per_round else []
        if now - t0 >= 10.0 and rnd > r0:
            rates.append((rnd - r0) / (now - t0))
        return (self.rounds - rnd) / max(rates) if rates else math.inf

    # ------------------------------------------------------------------ the churn loop
    def run(self) -> None:
        a = self.args
        self.launch()
        self.launched_at = self.ev.now()
        churn_end = self.launched_at + a.minutes * 60
        last_beat = self.ev.now()
        next_kill: float | None = None
        rejoin_due: list[tuple[float, int]] = []  # (when, rank)
        attempts: Counter = Counter()  # rank -> replacement attempts since its last kill
        start_deadline = self.ev.now() + START_LIMIT
        finish_deadline: float | None = None
        while not self.finished():
            self.poll()
            now = self.ev.now()
            if now - last_beat >= a.heartbeat:
                self.heartbeat()
                last_beat = now
            rnd = self.swarm_round()
            left = self.seconds_left(now, rnd)
            if now > start_deadline and not any(p.active for p in self.peers):
                self.ev("error", f"the swarm did not reach its first round within {START_LIMIT:.0f}s")
                self.stopped = "no start"
                return
            if self.churn_closed is None:
                if now >= churn_end:
                    self.churn_closed = f"time up ({a.minutes:g} min)"
                elif left < a.tail_seconds:
                    self.churn_closed = f"round {rnd}/{self.rounds}: about {left:.0f}s of rounds left"
                if self.churn_closed is not None:
                    self.churn_seconds = round(now - self.launched_at, 1)
                    self.ev("churn-end", self.churn_closed, kills=len(self.kills), joins=len(self.joins))
                    finish_deadline = now + a.finish_timeout
            live = [p for p in self.peers if p.alive()]
            held = {p.rank for p in live if p.active}
            joining = [p for p in live if p.joiner and not p.active]
            # A rank whose replacement died before loading the state gets another (bounded) attempt.
            for p in self.peers:
                if p.joiner and not p.active and p.exited_at is not None and p.killed_at is None and not p.retried:
                    p.retried = True
                    rejoin_due.append((now + 1.0, p.rank))
            for when, rank in list(rejoin_due):
                if now < when:
                    continue
                rejoin_due.remove((when, rank))
                if left < a.tail_seconds / 2 or attempts[rank] >= a.join_attempts:
                    self.ev("join-skip", f"rank {rank}: no replacement (attempts {attempts[rank]}, round "
                            f"{rnd}/{self.rounds}, about {left:.0f}s of rounds left)")  # fmt: skip
                    continue
                attempts[rank] += 1
                if self.join(rank) is None:
                    rejoin_due.append((now + 2.0, rank))
            whole = all(r in held for r in self.honest_ranks) and not joining and not rejoin_due
            if self.churn_closed is None and rnd >= 1 and whole and len(self.kills) < a.max_kills:
                if next_kill is None:
                    next_kill = now + self.rng.uniform(*a.kill_interval)
                elif now >= next_kill:
                    victims = [p for p in live if not p.malicious and p.active]
                    victim = self.rng.choice(victims)
                    if self.kill(victim):
                        attempts[victim.rank] = 0
                        rejoin_due.append((now + self.rng.uniform(0, a.rejoin_delay), victim.rank))
                    next_kill = None
            if finish_deadline is not None and now > finish_deadline:
                self.ev("stop", f"the run did not finish within {a.finish_timeout:.0f}s after churn ended: SIGINT")
                self.stopped = "interrupted (finish timeout)"
                self.sessions.interrupt()
                self.sessions.wait(INTERRUPT_WAIT)
                return
            time.sleep(0.25)
        self.poll()
        self.ev("finished", f"every supervisor exited (swarm: {self.main.returncode if self.main else None})")


# ---------------------------------------------------------------------------------------------- analysis
def global_model(run_dir: Path) -> list | None:
    from locoswarm.checkpoint import load_checkpoint

    with contextlib.suppress(Exception):
        ckpt = load_checkpoint(run_dir)
        if ckpt is not None:
            s = ckpt["strategy"]
            return s["anchor"] if "anchor" in s else [a for frag in s["anchors"] for a in frag]
    return None


def max_rel_diff(a: list, b: list) -> float:
    return max(
        ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()
        for x, y in zip(a, b, strict=True)
    )


def sim_reference(overrides: list[str], out: Path) -> dict:
    """A backend=sim run of these overrides (in this process): its summary, or the error."""
    import torch

    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    # One thread, like the peers (OMP_NUM_THREADS=1): torch's default (all cores) runs this tiny model ~5x slower on
    # a busy 2-core box.
    torch.set_num_threads(1)
    try:
        return train(compose_config([*overrides, "backend=sim"]), out)
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the soak's own figures stand without it
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "final_val_loss": None}


def analyse(soak: Soak, clean: dict, attacked: dict) -> dict:
    peers = []
    excl: dict[tuple, dict] = {}  # (key, step, rank, reason) -> one exclusion, however many peers logged it
    for p in soak.peers:
        rows = read_rows(p.run_dir)
        sync = [r for r in rows if "group_size" in r]
        sizes = [r["group_size"] for r in sync]
        for r in sync:
            for x in r.get("rejected", []):
                excl.setdefault((x.get("key"), r.get("step"), x.get("rank"), x.get("reason")), x)
        s = read_summary(p.run_dir) or {}
        loss = s.get("final_val_loss")
        peers.append({
            "peer": p.name, "rank": p.rank, "malicious": p.malicious, "joiner": p.joiner,
            "started_s": round(p.started, 1), "killed_s": None if p.killed_at is None else round(p.killed_at, 1),
            "loaded_round": p.loaded_round, "resyncs": p.resyncs,
            "rounds": len(sync), "rounds_averaged": sum(1 for n in sizes if n >= 2),
            "rounds_alone": sizes.count(1), "rounds_failed": sizes.count(0),
            "mean_group": round(statistics.mean(sizes), 2) if sizes else None,
            "rejections_logged": sum(len(r.get("rejected", [])) for r in sync),
            "status": s.get("status"), "error": s.get("error"), "outer_steps": s.get("outer_steps"),
            "final_val_loss": loss, "loss_finite": finite(loss) and all(finite(r["loss"]) for r in rows if "loss" in r),
            "survivor": p.killed_at is None and not p.malicious,
        })  # fmt: skip
    clean_loss = clean.get("final_val_loss")
    honest = [p for p in peers if p["survivor"]]
    for p in peers:
        p["delta_vs_clean"] = (
            p["final_val_loss"] - clean_loss if finite(p["final_val_loss"]) and finite(clean_loss) else None
        )
    bad = [p["peer"] for p in honest if p["status"] != "ok" or not p["loss_finite"]]
    models = {p["peer"]: global_model(soak.peers[i].run_dir) for i, p in enumerate(peers) if p["survivor"]}
    models = {k: v for k, v in models.items() if v is not None}
    agree = None
    if len(models) >= 2:
        ref = next(iter(models.values()))
        agree = max(max_rel_diff(m, ref) for m in models.values())
    # "norm 83.57 > 10 x the median 0.8169" -> "norm # > # x the median #": one key per kind of reason
    by_reason = Counter(re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", str(x.get("reason"))) for x in excl.values())
    by_rank = Counter(str(k[2]) for k in excl)
    deltas = [p["delta_vs_clean"] for p in honest if p["delta_vs_clean"] is not None]
    ref = attacked.get("final_val_loss")
    churn_deltas = [p["final_val_loss"] - ref for p in honest if finite(p["final_val_loss"]) and finite(ref)]
    return {
        "peers": peers,
        "kills": len(soak.kills),
        "kill_log": soak.kills,
        "rejoins_started": len(soak.joins),
        "rejoins_ok": sum(1 for j in soak.joins if j["loaded"]),
        "join_log": soak.joins,
        "resyncs": soak.resyncs,
        "joiners_finished_ok": sum(1 for p in peers if p["joiner"] and p["status"] == "ok"),
        "exclusions": len(excl),
        "exclusions_by_reason": dict(by_reason),
        "exclusions_by_rank": dict(by_rank),
        "malicious_rank": soak.malicious_rank,
        "malicious_excluded": by_rank.get(str(soak.malicious_rank), 0),
        "honest_excluded": sum(n for r, n in by_rank.items() if r != str(soak.malicious_rank)),
        "honest_survivors": [p["peer"] for p in honest],
        "honest_bad": bad,
        "honest_max_abs_delta_vs_clean": max((abs(d) for d in deltas), default=None),
        "honest_max_abs_delta_vs_attacked_no_churn": max((abs(d) for d in churn_deltas), default=None),
        "honest_models_max_rel_diff": agree,
        "notable_log_lines": dict(soak.notable),
        "clean": {"backend": "sim", "status": clean.get("status"), "final_val_loss": clean_loss,
                  "outer_steps": clean.get("outer_steps"), "error": clean.get("error")},
        "attacked_no_churn": {"backend": "sim", "status": attacked.get("status"),
                              "final_val_loss": attacked.get("final_val_loss"), "error": attacked.get("error")},
    }  # fmt: skip


def fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def print_report(r: dict) -> None:
    print(f"\n# soak report: {r['minutes']:g} min of churn requested, {fmt(r['churn_seconds'], '.0f')}s done "
          f"({r['churn_closed']}); the run took {r['run_seconds']:.0f}s and ended: {r['stopped']}",
          flush=True)  # fmt: skip
    head = (f"{'peer':<8}{'rank':>5}{'role':>10}{'start':>7}{'killed':>8}{'loaded@':>8}{'rounds':>7}"
            f"{'avg':>5}{'alone':>6}{'fail':>5}{'rsy':>4}{'group':>6}{'rej':>5}{'status':>8}{'val loss':>10}"
            f"{'vs clean':>10}")  # fmt: skip
    print(head)
    for p in r["peers"]:
        role = "malicious" if p["malicious"] else "joiner" if p["joiner"] else "honest"
        print(f"{p['peer']:<8}{p['rank']:>5}{role:>10}{p['started_s']:>7.0f}{fmt(p['killed_s'], '.0f'):>8}"
              f"{fmt(p['loaded_round']):>8}{p['rounds']:>7}{p['rounds_averaged']:>5}{p['rounds_alone']:>6}"
              f"{p['rounds_failed']:>5}{p['resyncs']:>4}{fmt(p['mean_group'], '.2f'):>6}{p['rejections_logged']:>5}"
              f"{fmt(p['status']):>8}{fmt(p['final_val_loss']):>10}{fmt(p['delta_vs_clean'], '+.4f'):>10}")  # fmt: skip
    print("# rounds: sync rows (avg: averaged with others, alone: a group of one, fail: a zero update); group: mean "
          "group size;\n# rsy: states downloaded after falling out of sync; rej: rejections this peer logged; "
          "start/killed: seconds into the soak; loaded@: the round a replacement joined at")  # fmt: skip
    c, a = r["clean"], r["attacked_no_churn"]
    print(f"\nbudget: {r['rounds_budget']} rounds ({r['rounds_budget'] * r['inner_steps']} steps); calibration: "
          f"{fmt(r['calibration_seconds_per_round'], '.3f')} s/round")  # fmt: skip
    print(f"kills: {r['kills']}   rejoins: {r['rejoins_started']} started, {r['rejoins_ok']} loaded the swarm's state, "
          f"{r['joiners_finished_ok']} joiners finished ok;  resyncs: {r['resyncs']}")  # fmt: skip
    print(f"exclusions (once per round): {r['exclusions']}  by reason {r['exclusions_by_reason']}  "
          f"by rank {r['exclusions_by_rank']} (malicious rank {r['malicious_rank']})")  # fmt: skip
    print(f"clean reference (backend=sim, no attacker, no churn): val loss {fmt(c['final_val_loss'])} ({c['status']})"
          f";  attacked, no churn (sim): {fmt(a['final_val_loss'])} ({a['status']})")  # fmt: skip
    print(f"honest survivors: {', '.join(r['honest_survivors']) or '-'};  max |val loss - clean| "
          f"{fmt(r['honest_max_abs_delta_vs_clean'])}, - attacked (no churn) "
          f"{fmt(r['honest_max_abs_delta_vs_attacked_no_churn'])};  final global models agree to "
          f"{fmt(r['honest_models_max_rel_diff'], '.1e')} (max relative difference)")  # fmt: skip
    print(f"honest peers non-finite or not ok: {r['honest_bad'] or 'none'}")
    if r["notable_log_lines"]:
        print(f"notable log lines (counts): {r['notable_log_lines']}")
    print(
        f"left running after the end: {len(r['leftovers'])} processes"
        + (f": {r['leftovers']}" if r["leftovers"] else "")
    )


# ---------------------------------------------------------------------------------------------- main
def calibrate(args: argparse.Namespace, overrides: list[str], ev: Events) -> float | None:
    """Seconds per round of the swarm without churn: a short run of the same config (rounds 2.. of peer 0)."""
    rounds = args.calibration_rounds
    out = args.out / "calibration"
    sessions = Sessions()
    ev("calibrate", f"{args.peers} peers, {rounds} rounds, no churn")
    try:
        sup = sessions.start(["--peers", str(args.peers), "--out", str(out), *overrides,
                              f"train.max_steps={rounds * args.inner_steps}"],
                             args.out / "logs" / "calibration.log")  # fmt: skip
        if not sessions.wait(START_LIMIT + 10 * rounds):
            ev("calibrate", "did not finish in time")
            return None
        sync = [r for r in read_rows(out / "peer-0") if "group_size" in r]
        if sup.returncode != 0 or len(sync) < 3:
            ev("calibrate", f"failed (exit {sup.returncode}, {len(sync)} rounds); see logs/calibration.log")
            return None
        sync = sync[1:] if len(sync) >= 4 else sync  # round 1 includes the launched peers' start-up spread
        per_round = (sync[-1]["sim_seconds"] - sync[0]["sim_seconds"]) / (len(sync) - 1)
        ev("calibrate", f"{per_round:.3f} s/round over {len(sync) - 1} rounds")
        return per_round
    finally:
        sessions.interrupt()
        sessions.wait(5)
        sessions.kill_all()


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long churn goes on (default 30)")
    ap.add_argument("--out", type=Path, default=Path("runs/soak_swarm"))
    ap.add_argument("--peers", type=int, default=4, help="launched peers; the last rank's peer is malicious")
    ap.add_argument("--seed", type=int, default=0, help="seeds the churn schedule and the run (seed=...)")
    ap.add_argument("--attack", choices=ATTACKS, default="scale", help="the malicious peer's attack (default scale)")
    ap.add_argument("--aggregator", default="median", help="aggregator=... (default median)")
    ap.add_argument("--max-norm-ratio", type=float, default=10.0,
                    help="aggregator.max_norm_ratio: norm screening, which excludes (and logs) a scaled "
                         "contribution; 0: off (median then outvotes it silently)")  # fmt: skip
    ap.add_argument("--kill-interval", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"),
                    help="seconds from a whole swarm to the next kill, uniform (default 20 60)")  # fmt: skip
    ap.add_argument("--rejoin-delay", type=float, default=5.0, help="replacement starts U(0, this) s after a kill")
    ap.add_argument("--max-kills", type=int, default=1000)
    ap.add_argument("--join-attempts", type=int, default=3, help="replacements tried per kill")
    ap.add_argument("--auto-rank", action="store_true", help="joiners pick their rank (default: the dead one's)")
    ap.add_argument("--rounds", type=int, default=None, help="round budget (default: from a calibration run)")
    # Measured (10 min, seed 2, kills 20-60 s after the swarm is whole): 0.48 s per round under churn against 0.30 calibrated, i.e.
    # 0.62 of the churn-free rate; at 1.0 the budget outran the finish timeout and the soak had to stop the swarm.
    ap.add_argument("--churn-speed", type=float, default=0.55,
                    help="the budget assumes the swarm runs at this fraction of its churn-free rate")  # fmt: skip
    ap.add_argument("--calibration-rounds", type=int, default=15)
    ap.add_argument("--tail-seconds", type=float, default=60.0,
                    help="no kills once the swarm has about this long left to run; no replacements in the last "
                         "half of it (a joiner takes ~15 s to load the state)")  # fmt: skip
    ap.add_argument("--finish-timeout", type=float, default=None,
                    help="seconds the run may take after churn ends (default max(180, 15 x minutes))")  # fmt: skip
    ap.add_argument("--heartbeat", type=float, default=30.0, help="seconds between status lines")
    ap.add_argument("--inner-steps", type=int, default=3, help="algorithm.inner_steps")
    ap.add_argument("--references", default="clean,attacked",
                    help="backend=sim references: clean (always) and attacked (the attacker, no churn)")  # fmt: skip
    ap.add_argument("--force", action="store_true", help="delete --out first if it is not empty")
    ap.add_argument("overrides", nargs="*", help="more locoswarm-train overrides for every peer and the references")
    args = ap.parse_args(argv)
    if args.peers < 3:
        ap.error("--peers must be >= 3 (two honest peers, so one can die, and the malicious one)")
    if args.finish_timeout is None:
        args.finish_timeout = max(180.0, 15.0 * args.minutes)
    attack = [] if args.attack is None else ["faults.byzantine=1", f"faults.attack='{args.attack}'"]
    base = [*TINY, f"algorithm.inner_steps={args.inner_steps}", f"workers={args.peers}", f"seed={args.seed}",
            f"aggregator={args.aggregator}"]  # fmt: skip
    if args.max_norm_ratio > 0:
        base.append(f"aggregator.max_norm_ratio={args.max_norm_ratio:g}")
    return args, [*base, *args.overrides, *attack]


def _terminate(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        if not args.force:
            sys.exit(f"soak_swarm: {args.out} is not empty (peers would resume from it); pass --force to replace it")
        shutil.rmtree(args.out)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    ev = Events(args.out)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl+C, through the finally blocks that kill every session.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    soak: Soak | None = None
    leftovers: list[str] = []
    try:
        per_round = None
        rounds = args.rounds
        if rounds is None:
            per_round = calibrate(args, overrides, ev)
            if per_round is None:
                return 1
            rounds = max(30, round((args.minutes * 60 + args.tail_seconds) * args.churn_speed / per_round))
        ev("budget", f"{rounds} rounds = train.max_steps={rounds * args.inner_steps}")
        overrides = [*overrides, f"train.max_steps={rounds * args.inner_steps}"]
        soak = Soak(args, overrides, rounds, per_round, ev)
        t_start = ev.now()
        try:
            soak.run()
        finally:
            run_seconds = ev.now() - t_start  # launch to the end of the finish
            if not soak.finished():
                soak.sessions.interrupt()
                with contextlib.suppress(KeyboardInterrupt):
                    soak.sessions.wait(10)
            soak.poll()
            leftovers = soak.sessions.kill_all()
            if leftovers:
                ev("sweep", f"{len(leftovers)} processes still alive at the final sweep: SIGKILLed", first=leftovers[0])
        ev("reference", "backend=sim: clean (no attacker, no churn)" + (
            " and attacked (no churn)" if "attacked" in args.references else ""))  # fmt: skip
        clean_overrides = [o for o in overrides if not o.startswith("faults.")]
        clean = sim_reference(clean_overrides, args.out / "clean-sim")
        attacked = {"status": "skipped", "final_val_loss": None}
        if "attacked" in args.references:
            attacked = sim_reference(overrides, args.out / "attacked-sim")
        report = analyse(soak, clean, attacked)
        report.update(
            minutes=args.minutes, seed=args.seed, attack=args.attack, aggregator=args.aggregator,
            max_norm_ratio=args.max_norm_ratio or None, launched_peers=args.peers, rounds_budget=rounds,
            inner_steps=args.inner_steps, calibration_seconds_per_round=per_round, churn_closed=soak.churn_closed,
            churn_seconds=soak.churn_seconds, run_seconds=round(run_seconds, 1), stopped=soak.stopped,
            leftovers=leftovers, overrides=overrides, events=ev.rows,
        )  # fmt: skip
        (args.out / "soak.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print_report(report)
        print(f"# written: {args.out / 'soak.json'}", flush=True)
        return 0 if soak.stopped == "natural" else 1
    except KeyboardInterrupt as e:
        ev("interrupted", str(e) or "Ctrl+C")
        return 130
    finally:
        if soak is not None:
            soak.sessions.kill_all()  # idempotent: anything started after the first sweep
        ev.close()


if __name__ == "__main__":
    sys.exit(main())
