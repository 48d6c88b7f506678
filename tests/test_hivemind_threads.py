"""backend=hivemind with rounds in flight (comm/hivemind.py, "Threads"): whatever reads or replaces the run state
waits for the rounds the background thread still runs, and a resume restores the averager's own round counter
(rounds started, which streaming's strategy rounds do not count). One real peer (its DHT and state server on
127.0.0.1) in a spawned process, as a locoswarm-swarm peer would run it; a slow job on the averager's background
thread stands in for a round in flight."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import time
import traceback

import pytest

pytestmark = [pytest.mark.network, pytest.mark.slow]

SLOW = 1.0  # seconds the stand-in round takes


def _peer(run_id: str, out_q) -> None:
    import torch

    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)  # hivemind forks its background processes, as in a swarm peer
    cfg = BackendConfig(name="hivemind", run_id=run_id, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    averager = None
    try:
        averager = HivemindAverager(cfg, workers=2, rank=0)
        finished: list[float] = []

        def stand_in_round() -> None:  # runs on the averager's one background thread, like a round's network part
            time.sleep(SLOW)
            finished.append(time.monotonic())

        # a checkpoint: the averager's state waits for the round in flight and holds the round counter
        averager.round = 5
        averager._submit(stand_in_round)
        t0 = time.monotonic()
        state = averager.state_dict()
        checks = {"checkpoint waited": len(finished) == 1 and time.monotonic() - t0 >= 0.9 * SLOW}
        checks["checkpoint round"] = state["round"] == 5

        # a resume: the restored count stands, not the strategy's round count handed to attach_run_state
        averager.round = 0
        averager.load_state_dict(state)
        run_state = {"params": torch.arange(3.0)}
        averager.attach_run_state(lambda: dict(run_state), lambda s: None, rounds=2)
        checks["resumed round"] = averager.round == 5

        # a state request served at a boundary with a round in flight: the snapshot is taken once it is done,
        # and its metadata count the rounds started (in flight included)
        averager.round = 6
        averager._submit(stand_in_round)
        averager._requests = 1  # as hivemind's state-serving thread registers a request (``_provide``)
        averager.round_boundary()
        assert averager._snapshot is not None
        meta, tensors = averager._snapshot
        checks["snapshot waited"] = len(finished) == 2
        checks["snapshot meta"] = meta["round"] == 6 and meta["in_sync"] is True
        checks["snapshot state"] = torch.equal(
            torch.load(io.BytesIO(tensors[0].numpy().tobytes()), weights_only=True)["params"],
            run_state["params"],
        )
        out_q.put((checks, None))
    except BaseException:  # noqa: BLE001 - report to the test instead of dying silently
        out_q.put((None, traceback.format_exc()))
    finally:
        if averager is not None:
            averager.close()


def test_state_waits_for_rounds_in_flight_and_a_resume_restores_the_round():
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    proc = ctx.Process(target=_peer, args=(f"threads{os.getpid()}", out_q))
    proc.start()
    try:
        checks, error = out_q.get(timeout=120)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    assert error is None, error
    assert all(checks.values()), checks
