"""backend=hivemind on 127.0.0.1: real peer processes started by ``locoswarm-swarm``, no mocks.

(a) 3 peers average exactly like ``sim`` (same seeds, no compression): final params within 1e-5 relative; for
    diloco and for streaming_diloco (fragments in flight while peers train).
(c) SIGKILL of 1 of 4 peers mid-run: the other 3 finish every outer step with status ok, still in sync.
(d) a late joiner downloads the swarm's state and ends with the swarm's params.
(e) nothing is left running: no peer, DHT, averager or p2pd process survives a test.
(f) noloco's gossip pairs: 4 peers end where the sim's 4 replicas do; a kill and a rejoin with the dead rank.
(g) async_diloco's shared model: one peer is diloco on sim; 3 peers apply every update exactly once (any codec);
    its holder SIGKILLed, a survivor takes over and a replacement joins.
(h) a pipeline of stage peers: 2 stages x 2 peers end with the sim pipeline's parameters; a stage peer SIGKILLed
    mid-step has its micro-batches re-sent and every micro-batch counts once.
"""

from __future__ import annotations

import contextlib
import json
import math
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


def global_model(run_dir: Path) -> list[torch.Tensor]:
    """diloco's anchor, or streaming's per-fragment anchors (the model every peer agrees on)."""
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    strategy = ckpt["strategy"]
    return strategy["anchor"] if "anchor" in strategy else [a for frag in strategy["anchors"] for a in frag]


def anchor_and_params(run_dir: Path, worker: int = 0) -> list[torch.Tensor]:
    """The global model and the worker's params."""
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return [*global_model(run_dir), *ckpt["group"]["workers"][worker]["model"].values()]


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
        # honest peers verifying each other by replay every phase: all-gathered rows, nobody flagged, sim's numbers
        ["verify.fraction=1.0"],
        # fp32 by locoswarm's reduce-scatter over hivemind's P2P instead of the butterfly (issue 15: link rate)
        ["backend.allreduce=mailbox"],
        # fp32 by a pipelined ring over hivemind's P2P (issue 15: the exchange that reaches link rate)
        ["backend.allreduce=ring"],
    ],
    ids=["none", "topk", "verified", "mailbox", "ring"],
)
def test_three_peers_match_sim(tmp_path, swarms, codec):
    """(a): 3 hivemind peers vs the sim backend, same seeds, 3 outer steps; uncompressed, top-k, and with every
    peer verifying both groupmates after every round (verify.py's PeerReplay; the sim replays its workers)."""
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
        if "verify.fraction=1.0" in codec:
            assert [r["verified"] for r in rows] == [2, 2, 2] and s["rejections"] == 0, rows
            assert not any("verification_failed" in r for r in rows), rows
        diff = max_rel_diff(anchor_and_params(run), anchor_and_params(tmp_path / "sim", worker=i))
        worst = max(worst, diff)
    print(f"hivemind vs sim: max relative difference {worst:.2e}")
    assert worst <= 1e-5


def test_three_peers_streaming_match_sim(tmp_path, swarms):
    """(a) for streaming_diloco: 2 fragments (keys fragment0/fragment1: their own hivemind averagers), each round
    in flight for 1 inner step while the peer trains and passes round boundaries, merged half-and-half. Every
    merge is a round of all 3 peers, and params, anchors, every logged loss and the val loss equal sim's."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [
        *(o for o in TINY if o != "algorithm=diloco"), "algorithm=streaming_diloco", "algorithm.fragments=2",
        "algorithm.overlap_steps=1", "algorithm.mixing=0.5", "train.log_interval=1", "workers=3", "seed=5",
        "train.max_steps=9",
    ]  # fmt: skip
    swarm = swarms(["--peers", "3", "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    assert sim["status"] == "ok" and sim["outer_steps"] == 6
    sim_rows = [json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines() if line]
    merges = [(2, [1]), (4, [0]), (5, [1]), (7, [0]), (8, [1]), (9, [0, 1])]  # (step, fragments merged)
    assert [(r["step"], r["fragments_merged"]) for r in sim_rows if "group_size" in r] == merges
    worst = worst_loss = 0.0
    for i in range(3):
        run = tmp_path / "swarm" / f"peer-{i}"
        s = summary(run)
        assert s["status"] == "ok" and s["outer_steps"] == 6, s
        rows = sync_rows(run)
        assert [(r["step"], r["fragments_merged"], r["group_size"]) for r in rows] == [(*m, 3) for m in merges], rows
        assert all(r["bytes_sent"] > 0 and r["comm_seconds"] > 0 for r in rows), rows
        every = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        losses = [(x["loss"], y["worker_loss"][i]) for x, y in zip(every, sim_rows, strict=True)]
        losses.append((s["final_val_loss"], sim["final_val_loss"]))
        worst_loss = max(worst_loss, *(abs(a - b) / abs(b) for a, b in losses))
        worst = max(worst, max_rel_diff(anchor_and_params(run), anchor_and_params(tmp_path / "sim", worker=i)))
    print(f"streaming: hivemind vs sim: params {worst:.2e}, losses {worst_loss:.2e} relative")
    assert worst <= 1e-5 and worst_loss <= 1e-5


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


# streaming_diloco with a round in flight at every boundary after the first: H=2, fragments at offsets 0 and 1, each
# merged one step after it starts, when the other fragment's round starts. A donor's snapshot then always waits for
# a round in flight, and the joiner takes that round's result with the state.
ALWAYS_IN_FLIGHT = [
    "algorithm=streaming_diloco", "algorithm.fragments=2", "algorithm.inner_steps=2", "algorithm.overlap_steps=1",
    "algorithm.mixing=0.5",
]  # fmt: skip


@pytest.mark.parametrize("algorithm", ["diloco", "streaming"])
def test_late_joiner_gets_the_swarms_state(tmp_path, swarms, algorithm):
    """(d): 2 peers of a workers=3 run; a third joins after round 1 (taking the free rank 2), downloads the
    swarm's state, and from then on averages with the others: it ends with exactly the swarm's params. With
    streaming, the state is served while a fragment's round is in flight, and the swarm agrees on the anchors
    (mixing=0.5 keeps half of each worker's own params in its local model)."""
    # 30 rounds: the two peers' rounds each wait the matchmaking window for the missing third, which leaves the
    # joiner (a fresh process: imports, DHT bootstrap) time to arrive well before the end.
    overrides = [*TINY, "workers=3", "seed=4", "train.max_steps=90"]
    if algorithm == "streaming":  # 30 steps, 31 averaging rounds
        overrides = [o for o in TINY if o not in ("algorithm=diloco", "algorithm.inner_steps=3")]
        overrides += [*ALWAYS_IN_FLIGHT, "workers=3", "seed=4", "train.max_steps=30"]
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
    assert j["outer_steps"] == s0["outer_steps"] == (30 if algorithm == "diloco" else 29)
    assert j["steps"] == s0["steps"] == (90 if algorithm == "diloco" else 30)
    rows = sync_rows(tmp_path / "joiner")
    assert any(r["group_size"] == 3 for r in rows), rows  # it averaged with both swarm peers
    agreed = anchor_and_params if algorithm == "diloco" else global_model
    ref = agreed(tmp_path / "swarm" / "peer-0")
    assert max_rel_diff(agreed(tmp_path / "swarm" / "peer-1"), ref) <= 1e-5
    assert max_rel_diff(agreed(tmp_path / "joiner"), ref) <= 1e-5
    assert "rank 2" in "".join(joiner.lines)


def all_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.parametrize(
    "robust",
    [
        ["aggregator=median"],  # all-gathered plain fp32 payloads
        ["aggregator=centered_clip", "aggregator.max_norm_ratio=10", "compression=int8"],  # int8, all-gathered too
    ],
    ids=["median", "centered_clip-int8"],
)
def test_robust_aggregators_match_sim(tmp_path, swarms, robust):
    """aggregator=median / centered_clip on 3 hivemind peers: the payloads are all-gathered whatever the codec and
    every peer combines the same rows as the sim: params within 1e-5 relative, nothing rejected on a clean run."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [*TINY, "workers=3", "seed=5", "train.max_steps=9", *robust]
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
        assert [r["group_size"] for r in rows] == [3, 3, 3] and not any("rejected" in r for r in rows), rows
        assert all(r["bytes_sent"] > 0 for r in rows), rows
        worst = max(worst, max_rel_diff(anchor_and_params(run), anchor_and_params(tmp_path / "sim", worker=i)))
    print(f"{robust[0]}: hivemind vs sim: max relative difference {worst:.2e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("aggregator", ["median", "mean"])
def test_a_nan_peer_in_a_real_swarm(tmp_path, swarms, aggregator):
    """faults.byzantine=1 faults.attack=nan on hivemind: the peer hosting rank 2 sends NaN (a test-only peer mode).
    median (all-gathered): every peer screens it out each round, logs the rejection in metrics.jsonl, and the
    honest peers end where the sim's attacked run ends (1e-5), finite. mean over the butterfly all-reduce: only the
    NaN sum is seen, so every round is rejected whole (a zero update): the honest peers end finite, as the sim
    does, never NaN with status ok."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    # quoted: Hydra reads a bare nan as a float
    overrides = [*TINY, "workers=3", "seed=5", "train.max_steps=9", f"aggregator={aggregator}",
                 "faults.byzantine=1", "faults.attack='nan'"]  # fmt: skip
    swarm = swarms(["--peers", "3", "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    assert sim["status"] == "ok" and sim["outer_steps"] == 3
    clean = train(compose_config([*overrides[:-3], "backend=sim"]), tmp_path / "clean")  # no attacker, mean
    worst, report = 0.0, []
    for i in range(2):  # the honest peers
        run = tmp_path / "swarm" / f"peer-{i}"
        s = summary(run)
        assert s["status"] == "ok" and s["outer_steps"] == 3, s
        assert math.isfinite(s["final_val_loss"]) and all(math.isfinite(r["loss"]) for r in all_rows(run))
        rows = sync_rows(run)
        assert [r["group_size"] for r in rows] == [3, 3, 3], rows
        rejected = [x for r in rows for x in r.get("rejected", [])]
        if aggregator == "median":
            assert [(x["rank"], x["reason"]) for x in rejected] == [(2, "non-finite values")] * 3, rejected
        else:
            assert sorted(x["rank"] for x in rejected) == [0, 0, 0, 1, 1, 1, 2, 2, 2], rejected
            assert all("non-finite sum" in x["reason"] for x in rejected)
        assert s["rejections"] == len(rejected)
        worst = max(worst, max_rel_diff(anchor_and_params(run), anchor_and_params(tmp_path / "sim", worker=i)))
        report.append((s["final_val_loss"], len(rejected)))
        if aggregator == "median":  # the NaN peer excluded: training goes on near the clean run
            assert abs(s["final_val_loss"] - clean["final_val_loss"]) < 0.05
        else:  # every round rejected: nothing is learned, but nothing is NaN
            assert s["final_val_loss"] > clean["final_val_loss"] + 0.2
    print(f"nan peer, {aggregator}: honest (val loss, rejections) {report}, sim {sim['final_val_loss']:.4f}, "
          f"clean {clean['final_val_loss']:.4f}; params vs sim {worst:.2e}")  # fmt: skip
    assert worst <= 1e-5


def test_a_lazy_peer_is_caught_by_replay_and_excluded(tmp_path, swarms):
    """verify.fraction=1 on hivemind: each peer commits to its phase's start state in the round metadata and, after
    every round, verifies each groupmate by replay from what it committed to (verify.py's PeerReplay). Rank 2 runs 2
    of its 3 steps (faults.lazy) and claims 3: both honest peers catch it after the first round, with the same
    evidence, and drop it from every later round; no honest peer is ever flagged (each also replays the other, and
    the lazy peer replays both), and the two honest peers end with the same model."""
    overrides = [*TINY, "workers=3", "seed=3", "train.max_steps=6", "faults.lazy=1", "faults.lazy_fraction=0.5",
                 "verify.fraction=1.0"]  # fmt: skip
    swarm = swarms(["--peers", "3", "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    peers = [tmp_path / "swarm" / f"peer-{i}" for i in range(3)]
    evidence = []
    for run in peers[:2]:
        s = summary(run)
        assert s["status"] == "ok" and s["outer_steps"] == 2, s
        rows = sync_rows(run)
        assert [r["group_size"] for r in rows] == [3, 2], rows
        assert [r["verified"] for r in rows] == [2, 1], rows  # both groupmates, then the other honest peer
        assert list(rows[0]["verification_failed"]) == ["2"] and "verification_failed" not in rows[1], rows
        evidence.append(rows[0]["verification_failed"]["2"])
        assert evidence[-1].startswith("verification failed in phase 0: the replay of its 3 claimed steps"), evidence
        assert [x["rank"] for x in rows[1]["rejected"]] == [2], rows[1]
        assert rows[1]["rejected"][0]["reason"] == f"excluded: {evidence[-1]}"
    assert evidence[0] == evidence[1]  # the same replay, the same verdict on every member
    a, b = anchor_and_params(peers[0]), anchor_and_params(peers[1])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    lazy = sync_rows(peers[2])
    assert lazy[0]["verified"] == 2 and not any("verification_failed" in r for r in lazy), lazy


def test_a_closed_swarm_from_the_cli(tmp_path, swarms):
    """The README's recipe: ``locoswarm-swarm keygen`` the launched peers' identities (DIR/peer-<i>/identity.key),
    list them in a file, launch with ``backend.allowed_peers=FILE``: the listed peers meet and finish as usual,
    each under the identity made for it."""
    out = tmp_path / "swarm"
    keys = [out / f"peer-{i}" / "identity.key" for i in range(2)]
    made = subprocess.run([sys.executable, "-m", "locoswarm.cli.swarm", "keygen", *map(str, keys)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    (tmp_path / "allowed.txt").write_text(made.stdout)
    swarm = swarms(["--peers", "2", "--out", str(out), *TINY, "train.max_steps=9",
                    f"backend.allowed_peers={tmp_path / 'allowed.txt'}"])  # fmt: skip
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    ids = made.stdout.split()
    story = "".join(line for line in swarm.lines if "round 1" in line or "launched" in line or "WARNING" in line)
    for i in range(2):
        s = summary(out / f"peer-{i}")
        assert s["status"] == "ok" and s["outer_steps"] == 3, s
        # The listed peers meet. Not "every round": under CI load one peer's first round once timed out ([0, 2, 2];
        # a failed round applies a zero update and resyncs, see comm/hivemind.py), which says nothing of the
        # allow-list; a swarm whose peers refused each other would show no group of 2 at all.
        groups = [r["group_size"] for r in sync_rows(out / f"peer-{i}")]
        assert groups.count(2) >= 2 and set(groups) <= {0, 2}, (groups, story)
    a, b = anchor_and_params(out / "peer-0"), anchor_and_params(out / "peer-1")
    assert max_rel_diff(a, b) <= 1e-6, story  # and end with one model (the butterfly's rounding differs per half)
    addresses = [line for line in swarm.lines if "DHT address:" in line]
    assert any(ids[0] in line for line in addresses), addresses  # peer-0 runs under the key made for it


NOLOCO = [*(o for o in TINY if o != "algorithm=diloco"), "algorithm=noloco", "algorithm.group_size=2", "workers=4"]


def replica(run_dir: Path, worker: int = 0) -> list[torch.Tensor]:
    """noloco: a worker's own replica of the outer model (its anchor) and its params."""
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return [*(a[worker] for a in ckpt["strategy"]["anchors"]), *ckpt["group"]["workers"][worker]["model"].values()]


def test_noloco_pairs_match_sim(tmp_path, swarms):
    """algorithm=noloco on 4 hivemind peers: each phase every peer meets only its drawn partner (the pair's tag in
    the matchmaking key, an averager of target size 2), and every replica ends where the sim's does."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [*NOLOCO, "seed=5", "train.max_steps=12"]
    swarm = swarms(["--peers", "4", "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    assert sim["status"] == "ok" and sim["outer_steps"] == 4
    pairs = [r["gossip_groups"] for r in sync_rows(tmp_path / "sim")]
    spread = [r["replica_spread"] for r in sync_rows(tmp_path / "sim")]
    assert len({repr(p) for p in pairs}) > 1  # the partners change from phase to phase
    worst, estimates = 0.0, []
    for i in range(4):
        run = tmp_path / "swarm" / f"peer-{i}"
        s = summary(run)
        assert s["status"] == "ok" and s["outer_steps"] == 4, s
        rows = sync_rows(run)
        assert [r["gossip_groups"] for r in rows] == pairs, rows
        assert [r["group_size"] for r in rows] == [2, 2, 2, 2], rows
        assert all(r["bytes_sent"] > 0 and r["group_distance"] > 0 for r in rows), rows
        assert not any("replica_spread" in r for r in rows)  # one replica per peer: only the sim sees them all
        # ... and estimates the previous phase's from the 2048-coordinate samples the peers publish
        estimates += [(r["replica_spread_estimate"], spread[r["replica_spread_estimate_phase"]]) for r in rows
                      if r.get("replica_spread_estimate_peers") == 4]  # fmt: skip
        diff = max_rel_diff(replica(run), replica(tmp_path / "sim", worker=i))
        worst = max(worst, diff)
    error = max((abs(e - x) / x for e, x in estimates), default=math.inf)
    print(f"noloco: hivemind vs sim: max relative difference {worst:.2e}; spread estimates {estimates}")
    assert worst <= 1e-5
    assert len(estimates) >= 4 and error <= 0.1, estimates  # measured: 2.3% at worst


def test_noloco_survives_a_kill_and_a_rejoin(tmp_path, swarms):
    """SIGKILL peer 3 as it looks for its round-2 partner: that partner's round fails and it keeps its own replica
    (a zero update; a peer left behind by the others resyncs); a replacement joins with rank 3, takes a live peer's
    state and pairs again. Every survivor and the joiner finish every round with status ok."""
    overrides = [*NOLOCO, "seed=2", "train.max_steps=60"]  # 20 rounds: time for the joiner to arrive
    swarm = swarms(["--peers", "4", "--out", str(tmp_path / "swarm"), *overrides])
    maddr = swarm.wait_for(r"peer-0 DHT address: (\S+)", limit=RUN_LIMIT).group(1)
    swarm.wait_for(r"\[peer-3\].*round 1: group of", limit=RUN_LIMIT)
    swarm.wait_for(r"\[peer-3\].*round 2: looking for a group", limit=RUN_LIMIT)
    os.killpg(swarm.peer_pid("3"), signal.SIGKILL)
    joiner = swarms(["join", maddr, "--rank", "3", "--out", str(tmp_path / "joiner"), *overrides])
    # Slower than diloco's kill test (50-110 s here): a round whose partner is gone waits out its deadline while the
    # other pairs go on, and a peer left behind then skips to the slowest live peer's round (comm/hivemind.py's
    # "Gossip rounds"), so the bound is twice a swarm run's.
    assert joiner.wait(2 * RUN_LIMIT) == 0, "".join(joiner.lines[-60:])
    assert swarm.wait(2 * RUN_LIMIT) == 1  # the killed peer did not finish ok
    assert "SIGKILL" in summary(tmp_path / "swarm" / "peer-3")["error"]
    failed = 0
    for run in [*(tmp_path / "swarm" / f"peer-{i}" for i in range(3)), tmp_path / "joiner"]:
        s = summary(run)
        assert s["status"] == "ok" and s["steps"] == 60 and math.isfinite(s["final_val_loss"]), s
        sizes = [r["group_size"] for r in sync_rows(run)]
        assert set(sizes) <= {0, 2} and sizes.count(2) >= 3, sizes
        failed += sizes.count(0)
    assert failed >= 1  # the dead peer's partner in round 2 met no one
    loaded = joiner.wait_for(r"loaded the swarm's state at round (\d+)", limit=1)
    assert 2 <= int(loaded.group(1)) < 20


ASYNC = [*(o for o in TINY if o != "algorithm=diloco"), "algorithm=async_diloco"]


def applied(run_dir: Path) -> list[int]:
    """The versions this peer's updates became when the holder applied them."""
    return [a["applied_as"] for r in sync_rows(run_dir) for a in r.get("arrivals", [])]


def test_async_one_peer_is_diloco(tmp_path, swarms):
    """Identity: async_diloco on a one-peer hivemind swarm (the peer holds the global model; its pushes and pulls
    are local calls through the codec) is diloco with one worker on sim, to float rounding."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [*ASYNC, "workers=1", "seed=3", "train.max_steps=12"]
    swarm = swarms(["--peers", "1", "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    sim = train(compose_config([*overrides, "algorithm=diloco", "backend=sim"]), tmp_path / "sim")
    run = tmp_path / "swarm" / "peer-0"
    s = summary(run)
    assert s["status"] == "ok" and s["steps"] == 12 and applied(run) == [1, 2, 3, 4], sync_rows(run)
    ckpt, ref = load_checkpoint(run), load_checkpoint(tmp_path / "sim")
    mine = [*(p[0] for p in ckpt["strategy"]["pulled"]), *ckpt["group"]["workers"][0]["model"].values()]
    theirs = [*ref["strategy"]["anchor"], *ref["group"]["workers"][0]["model"].values()]
    diff = max_rel_diff(mine, theirs)
    print(f"async_diloco on one hivemind peer vs diloco on sim: {diff:.2e}; val loss {s['final_val_loss']} vs "
          f"{sim['final_val_loss']}")  # fmt: skip
    assert diff <= 1e-6 and s["final_val_loss"] == pytest.approx(sim["final_val_loss"], rel=1e-6)


@pytest.mark.parametrize("codec", [[], ["compression=int8"], ["algorithm.dynamic_steps=true",
                                                              "algorithm.momentum_delay=3"]], ids=["none", "int8", "dylu-dn"])  # fmt: skip
def test_async_peers_share_one_model(tmp_path, swarms, codec):
    """3 peers, no barrier: every update reaches the one global model exactly once (the versions they became are
    1..30 across the peers, whoever held it, through the end-of-run handoffs), staleness is logged, and the codec's
    payload is what crosses the wire."""
    overrides = [*ASYNC, "workers=3", "seed=5", "train.max_steps=30", *codec]
    swarm = swarms(["--peers", "3", "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    versions, steps = [], 0
    for i in range(3):
        run = tmp_path / "swarm" / f"peer-{i}"
        s = summary(run)
        assert s["status"] == "ok" and s["steps"] == 30 and math.isfinite(s["final_val_loss"]), s
        rows = sync_rows(run)
        assert all(a["staleness"] >= 0 for r in rows for a in r["arrivals"]), rows
        versions += applied(run)
        steps += sum(a["steps"] for r in rows for a in r["arrivals"])
        if "compression=int8" in codec:
            assert all(r["compression_ratio"] < 0.3 for r in rows), rows
    assert steps == 90  # every step of every peer is in an applied update
    assert sorted(versions) == list(range(1, len(versions) + 1)), versions  # one sequence, nothing applied twice
    if "algorithm.dynamic_steps=true" not in codec:
        assert len(versions) == 30


def test_async_survives_its_holder_killed_and_a_rejoin(tmp_path, swarms):
    """SIGKILL the holder of the global model (rank 0, the first to claim it) once it has applied 10 updates: the
    others find it gone, one of them takes over from the newest model it pulled, and training goes on; a
    replacement joins with rank 0, pulls the model and pushes updates. Everyone alive finishes with status ok."""
    overrides = [*ASYNC, "workers=3", "seed=2", "train.max_steps=900"]
    swarm = swarms(["--peers", "3", "--out", str(tmp_path / "swarm"), *overrides])
    maddr = swarm.wait_for(r"peer-1 DHT address: (\S+)", limit=RUN_LIMIT).group(1)
    swarm.wait_for(r"\[peer-0\].*global model: version 10 \(held by rank 0\)", limit=RUN_LIMIT)
    os.killpg(swarm.peer_pid("0"), signal.SIGKILL)
    joiner = swarms(["join", maddr, "--rank", "0", "--out", str(tmp_path / "joiner"), *overrides])
    assert joiner.wait() == 0, "".join(joiner.lines[-60:])
    assert swarm.wait() == 1  # the killed peer did not finish ok
    assert "SIGKILL" in summary(tmp_path / "swarm" / "peer-0")["error"]
    took = [re.search(r"rank (\d) holds it from version (\d+)", line) for line in swarm.lines]
    took = [(int(m.group(1)), int(m.group(2))) for m in took if m]
    # a survivor took over from the newest model it had pulled (not the initial one: nothing trained is thrown away
    # but the updates it had not yet pulled)
    assert any(rank in (1, 2) and version > 0 for rank, version in took), took
    for run in [tmp_path / "swarm" / "peer-1", tmp_path / "swarm" / "peer-2", tmp_path / "joiner"]:
        s = summary(run)
        assert s["status"] == "ok" and s["steps"] == 900 and math.isfinite(s["final_val_loss"]), s
    since = max(version for _, version in took)
    assert any(v > since for v in applied(tmp_path / "joiner")), applied(tmp_path / "joiner")  # its updates landed


# ------------------------------------------------------------------ (h) a pipeline of stage peers (pipeline/peer.py)
PIPE = [
    *(o for o in TINY if o not in ("algorithm=diloco", "train.log_interval=3")), "pipeline.stages=2",
    "pipeline.microbatches=2", "train.grad_clip=0", "train.log_interval=1",
]  # fmt: skip


def stage_params(run_dir: Path, stage: int, worker: int = 0, stages: int = 2) -> dict[str, torch.Tensor]:
    """A model of one block per stage: stage s holds block s, the first also the embeddings, the last ln_f and the
    head."""
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"

    def owner(name: str) -> int:
        if name.startswith(("tok_emb.", "pos_emb.")):
            return 0
        return int(name.split(".")[1]) if name.startswith("blocks.") else stages - 1

    return {k: v for k, v in ckpt["group"]["workers"][worker]["model"].items() if owner(k) == stage}


def stage_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max_rel_diff(list(a.values()), list(b.values()))


@pytest.mark.parametrize(
    "stages, per_stage, algorithm",
    [
        (2, 2, ["algorithm=ddp"]),
        (2, 2, ["algorithm=diloco", "algorithm.inner_steps=2"]),
        (3, 2, ["algorithm=ddp"]),
        (2, 2, ["algorithm=ddp", "pipeline.routing=stochastic", "pipeline.activation_codec=fp16"]),
        (2, 1, ["algorithm=diloco", "algorithm.inner_steps=2"]),
    ],
    ids=["swarm", "diloco-swarm", "swarm-3-stages", "swarm-stochastic", "one-peer-per-stage"],
)
def test_pipeline_stage_peers_match_sim(tmp_path, swarms, stages, per_stage, algorithm):
    """`locoswarm-swarm --peers SK pipeline.stages=S`: S stages x K peers over hivemind's P2P, fixed routing, 2
    micro-batches per batch (S=3: a middle stage's forward and backward calls). Every stage peer ends with the sim
    pipeline's parameters for its stage (which equal the unsplit model's: tests/test_pipeline.py), and the pipelined
    validation loss equals the sim's. Under ddp the stage average is the mean over every micro-batch whatever the
    routing, so stochastic routing (with fp16 activations, as on sim) ends there too. K=1: a stage's round is a group
    of one (workers=1), which averages nothing and waits for no one."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    base = [o for o in PIPE if not o.startswith(("pipeline.stages=", "model.n_layer="))]
    overrides = [*base, *algorithm, "seed=4", "train.max_steps=4", "train.eval_interval=4", f"pipeline.stages={stages}",
                 f"model.n_layer={stages}"]  # fmt: skip
    swarm = swarms(["--peers", str(per_stage * stages), "--out", str(tmp_path / "swarm"), *overrides])
    assert swarm.wait() == 0, "".join(swarm.lines[-60:])
    sim = train(compose_config([*overrides, "backend=sim", f"workers={per_stage}"]), tmp_path / "sim")
    assert sim["status"] == "ok"
    worst, per_stage_counted = 0.0, [0] * stages
    rerouted = any("did not answer" in line for line in swarm.lines)
    for peer in range(per_stage * stages):
        stage, index = divmod(peer, per_stage)
        run = tmp_path / "swarm" / f"peer-{peer}"
        s = summary(run)
        assert s["status"] == "ok" and s["final_val_loss"] == pytest.approx(sim["final_val_loss"], rel=1e-5), s
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        counted = sum(r.get("microbatches", 0) for r in rows)
        per_stage_counted[stage] += counted
        # fixed routing: its own 2 a step, unless a call failed and was re-routed to the stage's other peer (logged;
        # seen under CPU load: a stream ended without the reply, and the step's micro-batches went to the other peer)
        assert counted == 2 * 4 or "pipeline.routing=stochastic" in algorithm or rerouted, rows
        assert sum(r.get("activation_bytes", 0) for r in rows) > 0
        assert per_stage > 1 or all(r.get("group_size", 1) == 1 and r.get("bytes_sent", 0) == 0 for r in rows), rows
        ours, sims = stage_params(run, stage, stages=stages), stage_params(tmp_path / "sim", stage, index, stages)
        worst = max(worst, stage_diff(ours, sims))
    print(f"pipeline on hivemind vs sim: max relative difference {worst:.2e}; micro-batches per stage "
          f"{per_stage_counted}")  # fmt: skip
    assert per_stage_counted == [per_stage * 2 * 4] * stages  # every micro-batch of every step, once per stage
    # Routed stochastically, a stage's mean is summed in another order than the sim's (weights by work vs rows scaled
    # by work): seen 2.1e-7 absolute, 1.5e-5 relative to a layer-norm bias of norm 0.015 after 4 steps.
    assert worst <= (1e-4 if "pipeline.routing=stochastic" in algorithm else 1e-5)


def test_pipeline_survives_a_stage_peer_killed_mid_step(tmp_path, swarms):
    """SIGKILL one of 3 peers of stage 1 while it serves a step: its micro-batches are re-sent to the others and
    training goes on. Every step counts every one of the 3 x 2 micro-batches exactly once at stage 1 (summed over
    the stage's peers' rows, the dead one's included up to its death; in the step it died in, what it already owned
    is counted nowhere else), no driver lost one, and the survivors of each stage end in sync."""
    overrides = [*PIPE, "algorithm=ddp", "seed=6", "train.max_steps=10", "train.eval_interval=100"]
    swarm = swarms(["--peers", "6", "--out", str(tmp_path / "swarm"), *overrides])
    victim = tmp_path / "swarm" / "peer-4"  # stage 1, index 1: driver 1's peer under fixed routing
    end = time.monotonic() + RUN_LIMIT
    while time.monotonic() < end:  # kill it right after it logs a step: it is then serving the next one
        metrics = victim / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.killpg(swarm.peer_pid("4"), signal.SIGKILL)
    assert swarm.wait(2 * RUN_LIMIT) == 1  # one peer did not finish ok
    peers = {p: tmp_path / "swarm" / f"peer-{p}" for p in range(6)}
    for p, run in peers.items():
        if p != 4:
            s = summary(run)
            assert s["status"] == "ok" and s["outer_steps"] == 10, (p, s)
    rows = {
        p: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x] for p, run in peers.items()
    }
    per_step: dict[int, float] = {}
    for p in (3, 4, 5):
        for r in rows[p]:
            per_step[r["step"]] = per_step.get(r["step"], 0) + r["microbatches"]
    # The step the victim died in: if driver 1 (whose 2 micro-batches it serves) saw a call fail then, the victim died
    # before its "done" and they were re-sent (6 counted by the rest); if not, it died owning them, after the "done"
    # and before its stage's round: the one gap of the protocol (peer.py), and those 2 are counted nowhere else.
    died = len(rows[4]) + 1
    resent = next(r["stage_failures"] for r in rows[1] if r["step"] == died) > 0
    assert per_step == {t: 6 if t != died or resent else 4 for t in range(1, 11)}, (died, resent, per_step)
    failures = sum(r["stage_failures"] for p in (0, 1, 2) for r in rows[p])
    assert failures >= 1 and all(r["lost_microbatches"] == 0 for p in (0, 1, 2) for r in rows[p])
    for stage, group in ((0, (0, 1, 2)), (1, (3, 5))):
        ref = stage_params(peers[group[0]], stage)
        assert all(stage_diff(stage_params(peers[p], stage), ref) <= 1e-5 for p in group[1:])
    print(f"failed calls retried: {failures}; the victim died in step {died}, its micro-batches re-sent: {resent}")
