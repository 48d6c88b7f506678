"""backend=hivemind rounds that go wrong, with real HivemindAverager objects (their DHT, matchmaking and P2P on
127.0.0.1) in spawned processes, as a locoswarm-swarm peer runs them:

- a round that fails after encoding rolls the error-feedback residual back (to the snapshot taken before the
  encode; with a later round of the same key already encoded, by taking this round's share out of the residual);
- a groupmate whose matchmaking metadata is malformed (no ``t``) is dropped from the round and reported in
  ``Round.rejected``; the honest peers neither crash nor hang, and their result is the sim's mean of the honest
  contributions (all-gather) or a rejected round (butterfly all-reduce: the outsider is inside the sum).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

pytestmark = [pytest.mark.network, pytest.mark.slow]

SHAPES = [(16, 8), (40,)]


def _inputs(rank: int, round_: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * round_ + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _run(target, *args, peers: int = 1, timeout: float = 150.0) -> list:
    """Run ``target(index, *args, peers_q, out_q)`` in ``peers`` spawned processes; returns their results by index."""
    ctx = mp.get_context("spawn")
    peers_q, out_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(i, *args, peers_q, out_q)) for i in range(peers)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(peers):
            index, result, error = out_q.get(timeout=timeout)
            assert error is None, f"peer {index} failed:\n{error}"
            got[index] = result
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [got[i] for i in range(peers)]


# ---------------------------------------------------------------------------------------------- EF rollback
def _lonely_peer(index: int, run_id: str, peers_q, out_q) -> None:
    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig, CompressionConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)  # hivemind forks its background processes, as in a swarm peer
    cfg = BackendConfig(name="hivemind", run_id=run_id, matchmaking_time=0.5, min_matchmaking_time=0.5,
                        round_timeout=1.0)  # fmt: skip
    averager = None
    try:
        averager = HivemindAverager(
            cfg, workers=2, rank=0, compression=CompressionConfig(name="topk", ratio=0.25, error_feedback=True)
        )
        weight = torch.tensor([1.0])

        def residuals() -> list[torch.Tensor]:
            return [r.clone() for r in averager.codecs["all"].residuals()]

        checks: dict[str, object] = {}
        # alone, a failed round is a group of one: its own payload is applied, so the residual advances
        first = averager.average([t.unsqueeze(0) for t in _inputs(0, 0)], weight)
        before = residuals()
        checks["alone: own payload applied"] = first.group_size == 1 and any(
            bool(t.abs().sum() > 0) for t in first.tensors
        )
        checks["alone: residual advanced"] = all(r.abs().sum() > 0 for r in before)

        # another peer is (said to be) alive: a failed round applies a zero update and rolls the residual back
        averager._others = lambda: [{"round": averager.round, "rank": 1, "in_sync": True}]
        failed = averager.average([t.unsqueeze(0) for t in _inputs(0, 1)], weight)
        checks["failed: zero update"] = failed.group_size == 0 and all(not t.any() for t in failed.tensors)
        checks["failed: residual restored exactly"] = all(
            torch.equal(a, b) for a, b in zip(residuals(), before, strict=True)
        )
        checks["failed: out of sync"] = averager.in_sync is False

        # two rounds of the key in flight (diloco's outer_delay=1 starts the next before waiting for this one):
        # the second encodes on top of the first's residual before the first fails; both fail
        t0 = time.monotonic()
        one = averager.start([t.unsqueeze(0) for t in _inputs(0, 2)], weight)
        two = averager.start([t.unsqueeze(0) for t in _inputs(0, 3)], weight)
        checks["queued: second encoded while the first was in flight"] = not one.done()
        mid = residuals()
        checks["queued: residual moved by both encodes"] = not all(
            torch.equal(a, b) for a, b in zip(mid, before, strict=True)
        )
        r1, r2 = one.wait(), two.wait()
        checks["queued: both failed"] = r1.group_size == 0 and r2.group_size == 0
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(residuals(), before, strict=True))
        checks["queued: residual back to before both (float rounding)"] = worst <= 1e-6
        checks["queued: nothing pending"] = not averager._pending.get("all")
        checks["seconds"] = time.monotonic() - t0
        out_q.put((index, checks, None))
    except BaseException:  # noqa: BLE001 - report to the test instead of dying silently
        out_q.put((index, None, traceback.format_exc()))
    finally:
        if averager is not None:
            averager.close()


def test_a_failed_round_rolls_the_error_feedback_residual_back():
    (checks,) = _run(_lonely_peer, f"rollback{os.getpid()}")
    print("rollback checks:", checks)
    assert all(v for k, v in checks.items() if k != "seconds"), checks


# ---------------------------------------------------------------------------------------------- malformed metadata
def _group_peer(index: int, run_id: str, codec: str, peers: int, peers_q, out_q) -> None:
    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig, CompressionConfig

    class NoTime(HivemindAverager):
        """An outsider whose matchmaking metadata lacks ``t`` (everything else is a well-behaved peer's)."""

        def _metadata(self, number: int, weight: float) -> dict:
            meta = super()._metadata(number, weight)
            del meta["t"]
            return meta

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)
    averager = None
    try:
        initial = [] if index == 0 else peers_q.get(timeout=120)
        cfg = BackendConfig(name="hivemind", run_id=run_id, initial_peers=initial, matchmaking_time=6.0,
                            first_round_timeout=60.0)  # fmt: skip
        kind = NoTime if index == peers - 1 else HivemindAverager
        averager = kind(cfg, workers=peers, rank=index, compression=CompressionConfig(name=codec, ratio=0.25), seed=7)
        if index == 0:
            for _ in range(peers - 1):
                peers_q.put(averager.maddrs)
        out = averager.average([t.unsqueeze(0) for t in _inputs(index, 0)], torch.tensor([float(index + 1)]))
        result = {"tensors": [t.numpy().copy() for t in out.tensors], "group": out.group_size,
                  "members": out.members, "rejected": out.rejected}  # fmt: skip
        out_q.put((index, result, None))
    except BaseException:  # noqa: BLE001
        out_q.put((index, None, traceback.format_exc()))
    finally:
        if averager is not None:
            averager.close()


@pytest.mark.parametrize("codec", ["topk", "none"])
def test_a_peer_with_malformed_metadata_is_dropped_not_a_crash(codec):
    """3 peers, the last sends metadata without ``t``. topk (all-gathered): the two honest peers average each other
    exactly as the sim does, and report rank 2; none (butterfly): its values are inside the sum, so the round is
    rejected (zeros, everyone reported). Nobody crashes, nobody hangs."""
    from locoswarm.comm.sim import SimAverager
    from locoswarm.compression import codec_factory
    from locoswarm.config import CompressionConfig, NetworkConfig
    from locoswarm.netsim import NetworkModel

    peers = 3
    got = _run(_group_peer, f"malformed{os.getpid()}{codec}", codec, peers, peers=peers)
    honest = got[: peers - 1]
    for res in honest:
        assert 2 in res["rejected"] and "without 't'" in res["rejected"][2], res["rejected"]
    if codec == "topk":
        sim = SimAverager(codec_factory(CompressionConfig(name=codec, ratio=0.25), 7), NetworkModel(NetworkConfig(), 2))
        stacked = [torch.stack(ts) for ts in zip(*(_inputs(k, 0) for k in range(2)), strict=True)]
        ref = sim.average(stacked, torch.tensor([1.0, 2.0])).tensors
        for res in honest:
            assert res["group"] == 2 and res["members"] == [0, 1], res
            assert set(res["rejected"]) == {2}
            for mine, expected in zip(res["tensors"], ref, strict=True):
                assert torch.equal(torch.from_numpy(mine), expected)
    else:
        for res in honest:
            assert all(not t.any() for t in res["tensors"]), "the round's sum must not be used"
            assert set(res["rejected"]) == {0, 1, 2}, res["rejected"]


# ---------------------------------------------------------------------------------------------- a peer left behind
def _keep_log_messages() -> list[str]:
    """The messages locoswarm.comm.hivemind logs at INFO and above in this process, as they come."""
    import logging

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("locoswarm.comm.hivemind").addHandler(Keep())
    logging.getLogger("locoswarm.comm.hivemind").setLevel(logging.INFO)
    return messages


def _behind_peer(index: int, run_id: str, peers_q, out_q) -> None:
    from dataclasses import replace

    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)
    messages = _keep_log_messages()
    # a deadline far beyond the test's: only giving up early can end the round in time
    cfg = BackendConfig(name="hivemind", run_id=run_id, min_matchmaking_time=0.5, round_timeout=600.0)
    ahead = behind = None
    try:
        ahead = HivemindAverager(cfg, workers=2, rank=1)
        ahead.round = ahead.finished = 3  # it has finished rounds 1-3 and trains on; it will not meet round 1 again
        ahead._publish_progress()
        behind = HivemindAverager(replace(cfg, initial_peers=ahead.maddrs), workers=2, rank=0)
        end = time.monotonic() + 60
        while len(behind.progress()) < 1 and time.monotonic() < end:
            time.sleep(0.2)
        got = behind.average([t.unsqueeze(0) for t in _inputs(0, 0)], torch.tensor([1.0]))
        out_q.put((index, {"group": got.group_size, "zero": all(not t.any() for t in got.tensors),
                           "in_sync": behind.in_sync, "finished": behind.finished, "log": messages}, None))  # fmt: skip
    except BaseException:  # noqa: BLE001
        out_q.put((index, None, traceback.format_exc()))
    finally:
        for a in (behind, ahead):
            if a is not None:
                a.close()


def test_a_peer_behind_the_swarm_gives_up_its_round_at_once():
    """A peer whose matchmaking fails while every other peer has already finished that round cannot meet anyone:
    it gives up at once (not after its 600 s deadline), applies a zero update and resyncs at the boundary. This is
    how a peer that starts a round late (a slow process start on a loaded machine) catches up with the swarm."""
    (res,) = _run(_behind_peer, f"behind{os.getpid()}", timeout=120.0)
    assert res["group"] == 0 and res["zero"] and res["in_sync"] is False and res["finished"] == 1, res
    assert any("every other peer is past round 1 or has left" in m for m in res["log"]), res["log"]


# ---------------------------------------------------------------------------------------------- groups formed early
def _early_peer(index: int, run_id: str, peers_q, out_q) -> None:
    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)
    messages = _keep_log_messages()
    averager = None
    try:
        initial = [] if index == 0 else peers_q.get(timeout=120)
        cfg = BackendConfig(name="hivemind", run_id=run_id, initial_peers=initial, allreduce="ring",
                            first_round_timeout=60.0)  # fmt: skip
        averager = HivemindAverager(cfg, workers=2, rank=index)
        if index == 0:
            peers_q.put(averager.maddrs)
        # both up before round 1 (as locoswarm-swarm's launched peers wait for each other): on a loaded box the
        # second peer's start-up outlasted the first's round-1 window, which then ran alone (a group of 1)
        averager._publish_progress()
        end = time.monotonic() + 120
        while len(averager.progress()) < 2 and time.monotonic() < end:
            time.sleep(0.2)
        weight = torch.tensor([float(index + 1)])
        rounds = []
        for r in range(3):
            averager.prepare(weight)  # as diloco does when a phase begins
            time.sleep(1.0)  # the phase's inner steps
            out = averager.average([t.unsqueeze(0) for t in _inputs(index, r)], weight)
            averager.round_boundary()
            rounds.append({"tensors": [t.numpy().copy() for t in out.tensors], "group": out.group_size})
        out_q.put((index, {"rounds": rounds, "early": averager.early_groups, "log": messages}, None))
    except BaseException:  # noqa: BLE001
        out_q.put((index, None, traceback.format_exc()))
    finally:
        if averager is not None:
            averager.close()


def test_a_prepared_round_forms_its_group_during_the_phase_and_averages_the_same():
    """``Averager.prepare`` (diloco calls it when a phase begins): from the second round on (a phase measured, the
    key's mode known), two real peers with ``backend.allreduce=ring`` form each round's group before its payload
    exists, and the round still gives the weighted mean of both peers' inputs (as the sim does, to float rounding:
    the ring sums in its own order). The first round, with nothing measured yet, forms its group when it starts."""
    got = _run(_early_peer, f"early{os.getpid()}", peers=2)
    logs = "\n".join(f"peer {i}: {m}" for i, res in enumerate(got) for m in res["log"])  # both sides of a failure
    for res in got:
        assert res["early"] == 2, logs
        assert sum("began forming" in m for m in res["log"]) == 2, logs
        for r, rnd in enumerate(res["rounds"]):
            assert rnd["group"] == 2, f"round {r + 1}:\n{logs}"
            for mine, a, b in zip(rnd["tensors"], _inputs(0, r), _inputs(1, r), strict=True):
                torch.testing.assert_close(torch.from_numpy(mine), (1 * a + 2 * b) / 3, rtol=1e-6, atol=1e-6)


def _sketch_pair(index: int, run_id: str, peers_q, out_q) -> None:
    import threading
    from dataclasses import replace

    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)
    pair = []
    try:
        cfg = BackendConfig(name="hivemind", run_id=run_id)
        pair.append(HivemindAverager(cfg, workers=2, rank=0))
        pair.append(HivemindAverager(replace(cfg, initial_peers=pair[0].maddrs), workers=2, rank=1))
        group = [a._mailbox_for().peer_id for a in pair]
        mean = _inputs(0, 0)
        results = {}
        for number, shift in ((1, 0.0), (2, 1e-3)):  # the same average; then peer 1's differs in every value
            for a in pair:
                a._mailbox.expect(number, 1 << 16)
            agreed = {}

            def check(i: int, number=number, shift=shift, agreed=agreed) -> None:
                agreed[i] = pair[i]._check_agreement(number, 0, [t + i * shift for t in mean], group)

            threads = [threading.Thread(target=check, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            results[number] = {"agreed": [agreed.get(i) for i in range(2)],
                               "clusters": [len(a._clusters) for a in pair],
                               "in_dht": pair[0].dht.get(f"{run_id}_sketch{number}_0") is not None}  # fmt: skip
        # round 3: peer 1 sends an empty sketch instead of checking: a malformed sketch agrees with no one
        for a in pair:
            a._mailbox.expect(3, 1 << 16)
        pair[1]._mailbox.send_and_receive(3, 0, "sketch", {group[0]: b""}, [], time.monotonic() + 30)
        results[3] = {"agreed": pair[0]._check_agreement(3, 0, mean, group), "clusters": len(pair[0]._clusters)}
        out_q.put((index, results, None))
    except BaseException:  # noqa: BLE001
        out_q.put((index, None, traceback.format_exc()))
    finally:
        for a in pair:
            a.close()


def test_the_agreement_check_goes_peer_to_peer_after_a_mailbox_exchange():
    """After an exchange through the mailbox (ring, reduce-scatter, all-gather), the group compares sketches of its
    average by one message to each groupmate instead of through the DHT: two real peers holding the same average
    agree, and holding different ones both see two clusters (and the round would be re-run); an empty sketch
    agrees with no one (and crashes nothing)."""
    (res,) = _run(_sketch_pair, f"sketch{os.getpid()}")
    assert res[1] == {"agreed": [True, True], "clusters": [1, 1], "in_dht": False}, res
    assert res[2] == {"agreed": [False, False], "clusters": [2, 2], "in_dht": False}, res
    assert res[3] == {"agreed": False, "clusters": 2}, res
