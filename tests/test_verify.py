"""Verification by replay: a lazy worker is caught and excluded; an honest one is never flagged."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import final_params, tiny_config

from locoswarm.config import validate
from locoswarm.trainer import train


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_honest_workers_pass_every_check_and_the_check_changes_nothing(tmp_path):
    common = dict(workers=3, train__max_steps=12, train__checkpoint_every=1, network__step_seconds=0.01)
    plain = train(tiny_config(**common), tmp_path / "plain")
    checked = train(tiny_config(verify__fraction=1.0, **common), tmp_path / "checked")
    sync = [r for r in _rows(tmp_path / "checked") if "verified" in r]
    assert [r["verified"] for r in sync] == [3, 3, 3, 3]  # every worker, every phase
    assert not any("verification_failed" in r for r in _rows(tmp_path / "checked"))
    assert checked["final_val_loss"] == plain["final_val_loss"] and checked["rejections"] == 0
    a, b = final_params(tmp_path / "plain"), final_params(tmp_path / "checked")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lazy_worker_is_caught_and_excluded(tmp_path):
    common = dict(workers=4, train__max_steps=24, faults__lazy=1, faults__lazy_fraction=0.5)
    unchecked = train(tiny_config(**common), tmp_path / "unchecked")
    checked = train(tiny_config(verify__fraction=0.5, **common), tmp_path / "checked")
    assert unchecked["status"] == checked["status"] == "ok"
    rows = _rows(tmp_path / "checked")
    failed = [r["verification_failed"] for r in rows if "verification_failed" in r]
    assert len(failed) == 1 and list(failed[0]) == ["3"]  # rank 3 (JSON keys are strings), caught once
    assert "2 claimed steps" not in failed[0]["3"] and "3 claimed steps" in failed[0]["3"]  # H=3 claimed, 2 run
    caught_at = next(i for i, r in enumerate(rows) if "verification_failed" in r)
    # excluded from then on: every later sync has the 3 honest workers only
    assert {r["group_size"] for r in rows[caught_at:] if "group_size" in r} == {3}
    assert {r["group_size"] for r in rows[:caught_at] if "group_size" in r} <= {4}


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(verify__fraction=1.5), "verify.fraction"),
        (dict(verify__fraction=0.5, algorithm__name="ddp"), "verify.fraction"),
        (dict(verify__fraction=0.5, backend__execution="batched"), "verify.fraction"),
        (dict(faults__lazy=4), "faults.lazy"),
        (dict(faults__lazy=1, faults__lazy_fraction=0.0), "faults.lazy_fraction"),
        (dict(verify__fraction=0.5, backend__name="torch"), "verify.fraction"),
        # on a real swarm a peer compares its replay with the row it received, for the round it just finished
        (dict(verify__fraction=0.5, backend__name="hivemind", compression__name="int8"), "compression=none"),
        (dict(verify__fraction=0.5, backend__name="hivemind", algorithm__outer_delay=1), "outer_delay=0"),
    ],
)
def test_bad_values_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(tiny_config(**overrides))


def _peer_phase(cfg, rank: int, steps: int):
    """A real worker's phase as a peer commits to it: (its serialised start state, the anchor, the row it sends)."""
    from locoswarm.build import build_worker
    from locoswarm.data import build_token_data
    from locoswarm.model import GPT, GPTShape

    data = build_token_data(cfg.data, cfg.workers, cfg.seed, cfg.model.seq_len)
    m = cfg.model
    torch.manual_seed(0)
    base = GPT(GPTShape(m.n_layer, m.n_head, m.d_model, m.seq_len, data.vocab_size, m.dropout))

    def replica(r):
        return build_worker(cfg, data, base, r, torch.device("cpu"))

    worker = replica(rank)
    worker.inner_steps(2)  # some history: optimiser moments, a data position, a scheduler step
    anchor = [p.detach().clone() for p in worker.params]
    buf = io.BytesIO()
    torch.save(worker.state_dict(), buf)
    worker.inner_steps(steps)
    row = [(a - p).detach().clone() for a, p in zip(anchor, worker.params, strict=True)]
    return buf.getvalue(), anchor, row, replica, worker.tokens_per_step


def test_a_peer_is_checked_against_the_start_state_it_committed_to():
    """PeerReplay's check of one groupmate (what every member runs after a round on hivemind), on real workers: an
    honest phase passes; a lazy one, served bytes that are not the committed ones, an impossible claim or a state
    that does not load fail with the reason; a peer that serves nothing is not checked (it may have died)."""
    from locoswarm.comm.base import Evidence, commitment
    from locoswarm.verify import PeerReplay

    cfg = tiny_config(workers=3)
    H = cfg.algorithm.inner_steps
    start, anchor, row, replica, per_step = _peer_phase(cfg, rank=1, steps=H)
    verifier = PeerReplay(1.0, 1e-5, 0, averager=None, replica=replica, inner_steps=H)

    def check(blob, sent=row, weight=H * per_step, committed=commitment(start)):
        return verifier._check(Evidence(1, float(weight), sent, committed, lambda: blob), anchor, phase=4)

    assert check(start) is None  # honest: the replay gives what it sent
    _, _, lazy_row, _, _ = _peer_phase(cfg, rank=1, steps=H - 1)  # the same start, H - 1 steps run, H claimed
    why = check(start, sent=lazy_row)
    assert why is not None and why.startswith(f"verification failed in phase 4: the replay of its {H} claimed steps")
    assert "not the one it committed to" in check(start + b"\0")  # served after the fact, not what it committed to
    assert "not a whole number of steps" in check(start, weight=(H + 1) * per_step)  # more than a phase has
    assert "not a whole number of steps" in check(start, weight=per_step * 1.5)
    assert "does not load" in check(b"not a state", committed=commitment(b"not a state"))
    assert check(None) is None  # not served: not checked this time
    assert verifier.checks == 2
