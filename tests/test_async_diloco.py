"""async_diloco: delayed Nesterov pinned to torch's Nesterov (N=1) and to a hand computation (N=2); the event-driven
schedule pinned to a hand-computed sequence of stale updates; dynamic local updates; determinism, exact resume and
validated keys."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_test_group, final_params, max_rel_diff, tiny_config

from locoswarm.checkpoint import load_checkpoint
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import CompressionConfig, CompressionName, OuterOptimizerConfig, validate
from locoswarm.faults import PhasePlanner
from locoswarm.netsim import NetworkModel
from locoswarm.outer import DelayedNesterov
from locoswarm.strategies import AsyncDiLoCo
from locoswarm.trainer import train


def _arrivals(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [a for r in rows for a in r.get("arrivals", [])]


def test_delayed_nesterov_with_no_delay_is_torch_nesterov():
    torch.manual_seed(0)
    cfg = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9)
    ours, ref = [torch.randn(5, 3)], [torch.randn(5, 3)]
    ref[0].copy_(ours[0])
    dn = DelayedNesterov(ours, cfg, delay=1)
    sgd = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(6):
        g = torch.randn(5, 3)
        dn.step([g])
        ref[0].grad = g.clone()
        sgd.step()
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)


def test_delayed_nesterov_applies_momentum_once_per_n_updates():
    cfg = OuterOptimizerConfig(name="nesterov", lr=0.5, momentum=0.8)
    theta = [torch.zeros(2)]
    dn = DelayedNesterov(theta, cfg, delay=2)
    g1, g2, g3 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 0.5])
    dn.step([g1])
    torch.testing.assert_close(theta[0], -0.5 * g1)  # no momentum yet
    dn.step([g2])
    m = g1 + g2  # the sum of the two (already share-weighted) updates
    torch.testing.assert_close(theta[0], -0.5 * g1 - 0.5 * g2 - 0.5 * 0.8 * m)
    dn.step([g3])
    torch.testing.assert_close(theta[0], -0.5 * (g1 + g2 + g3) - 0.5 * 0.8 * m)


def test_equal_speeds_match_a_hand_computed_sequence():
    """K=3, H=3, 6 steps, equal speeds and links, no churn, momentum_delay=1: every phase ends at the same instant,
    so the updates land in rank order, each worker pulling right after its own: phase 1 from phi_0 for all; phase 2
    worker j from phi after update j. Each update is the worker's pseudo-gradient times its share (1/3)."""
    cfg = tiny_config(workers=3, backend__execution="sequential", network__step_seconds=0.01)
    outer_cfg = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.5)
    group = build_test_group(cfg)[0]
    network = NetworkModel(cfg.network, 3)  # step_seconds 0.01: modelled, equal compute
    averager = SimAverager(codec_factory(CompressionConfig(), 0), network)
    anchor = [p.detach().clone() for p in group.params(0)]
    planner = PhasePlanner(network, group.ranks, 3)
    strategy = AsyncDiLoCo(group, averager, anchor, outer_cfg, inner_steps=3, planner=planner)
    while group.step < 6:
        strategy.round(6 - group.step)

    ref = build_test_group(cfg)[0]
    phi = [p.detach().clone() for p in ref.params(0)]
    sgd = torch.optim.SGD(phi, lr=0.7, momentum=0.5, nesterov=True)
    start = [[p.clone() for p in phi] for _ in range(3)]
    for _phase in range(2):
        ref.load_params_each([torch.stack([start[j][i] for j in range(3)]) for i in range(len(phi))])
        ref.inner_steps(3)
        deltas = [[s - p for s, p in zip(start[j], ref.params(j), strict=True)] for j in range(3)]
        for j in range(3):  # rank order; worker j pulls right after its own update
            for p, d in zip(phi, deltas[j], strict=True):
                p.grad = d.detach() / 3
            sgd.step()
            start[j] = [p.detach().clone() for p in phi]
    assert strategy.version == 6
    for got, want in zip(strategy.global_params(), phi, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)


def _cfg(**kw):
    common = dict(workers=4, algorithm__name="async_diloco", train__max_steps=16, algorithm__inner_steps=4,
                  train__checkpoint_every=1, network__step_seconds=0.01)  # fmt: skip
    return tiny_config(**{**common, **kw})


def test_staleness_is_logged_per_arrival(tmp_path):
    s = train(_cfg(), tmp_path / "run")
    assert s["status"] == "ok" and s["outer_steps"] > 0
    arrivals = _arrivals(tmp_path / "run")
    assert len(arrivals) == 16  # 4 workers x 4 phases, every update applied once
    assert [a["staleness"] for a in arrivals[:4]] == [0, 1, 2, 3]  # phase 1: all land at once, in rank order
    assert [a["worker"] for a in arrivals[:4]] == [0, 1, 2, 3]
    # phase 2: worker j pulled right after its own update (version j + 1) and lands after the 3 others' and its own
    # phase-1 updates plus the phase-2 updates of the workers before it: 3 each
    assert [a["staleness"] for a in arrivals[4:8]] == [3, 3, 3, 3]


def test_batched_execution_gives_the_same_schedule(tmp_path):
    """The schedule is on the modelled clock, so execution=batched and sequential land the same updates in the same
    order; the numbers agree to float rounding."""
    kw = dict(network__compute_speed=[1.0, 0.5, 0.75], workers=3, algorithm__dynamic_steps=True)
    seq = train(_cfg(backend__execution="sequential", **kw), tmp_path / "seq")
    bat = train(_cfg(backend__execution="batched", **kw), tmp_path / "bat")
    assert _arrivals(tmp_path / "seq") == _arrivals(tmp_path / "bat")
    assert bat["final_val_loss"] == pytest.approx(seq["final_val_loss"], rel=1e-4)
    assert bat["sim_seconds"] == pytest.approx(seq["sim_seconds"], rel=1e-9)


def test_unequal_speeds_and_dynamic_steps(tmp_path):
    """A half-speed worker lands half as often; with dynamic_steps it runs H/2 steps and lands with the others."""
    speeds = dict(network__compute_speed=[1.0, 0.5])
    train(_cfg(workers=2, **speeds), tmp_path / "fixed")
    train(_cfg(workers=2, algorithm__dynamic_steps=True, **speeds), tmp_path / "dynamic")
    fixed, dynamic = _arrivals(tmp_path / "fixed"), _arrivals(tmp_path / "dynamic")
    assert [a["worker"] for a in fixed].count(0) == 4 and [a["worker"] for a in fixed].count(1) == 2
    assert {a["worker"]: a["steps"] for a in dynamic} == {0: 4, 1: 2}
    assert [a["worker"] for a in dynamic] == [0, 1] * 4  # they land together, rank order


def test_deterministic_with_churn_and_stragglers(tmp_path):
    faults = dict(network__compute_speed=[1.0, 0.5, 0.75], network__churn__drop_prob=0.3,
                  network__stragglers__kind="lognormal", network__stragglers__sigma=0.5, workers=3)  # fmt: skip
    a = train(_cfg(**faults), tmp_path / "a")
    b = train(_cfg(**faults), tmp_path / "b")
    assert a["status"] == b["status"] == "ok"
    assert a["final_val_loss"] == b["final_val_loss"] and a["sim_seconds"] == b["sim_seconds"]
    assert _arrivals(tmp_path / "a") == _arrivals(tmp_path / "b")
    assert max_rel_diff(final_params(tmp_path / "a"), final_params(tmp_path / "b")) == 0.0


def test_resume_is_exact_with_phases_in_flight(tmp_path):
    kw = dict(network__compute_speed=[1.0, 0.5, 0.75], workers=3, algorithm__momentum_delay=2)
    full = train(_cfg(**kw), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(**kw), tmp_path / "cut", stop_after_step=9)
    resumed = train(_cfg(resume=True, **kw), tmp_path / "cut")
    assert resumed["status"] == full["status"] == "ok"
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert resumed["sim_seconds"] == pytest.approx(full["sim_seconds"], rel=1e-12)
    assert _arrivals(tmp_path / "cut") == _arrivals(tmp_path / "full")
    for w in range(3):
        assert max_rel_diff(final_params(tmp_path / "cut", w), final_params(tmp_path / "full", w)) == 0.0


def test_a_checkpoint_holds_the_phases_in_flight(tmp_path):
    kw = dict(network__compute_speed=[1.0, 0.5, 0.75], workers=3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(**kw), tmp_path / "cut", stop_after_step=9)
    state = load_checkpoint(tmp_path / "cut")["strategy"]
    assert state["flights"] and all(f["arrives_at"] >= state["timeline"]["now"] for f in state["flights"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(algorithm__name="async_diloco", algorithm__momentum_delay=0), "algorithm.momentum_delay"),
        (
            dict(algorithm__name="async_diloco", algorithm__momentum_delay=2, outer_optimizer__name="sgd"),
            "algorithm.momentum_delay",
        ),  # fmt: skip
        (dict(algorithm__name="diloco", algorithm__momentum_delay=2), "algorithm.momentum_delay"),
        (dict(algorithm__name="diloco", algorithm__dynamic_steps=True), "algorithm.dynamic_steps"),
        (dict(algorithm__name="async_diloco", algorithm__time_budget=1.0), "algorithm.time_budget"),
        (dict(algorithm__name="async_diloco", backend__name="torch"), "algorithm"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=rf"^{key}="):
        validate(tiny_config(workers=4, **{"network__step_seconds": 0.01, **overrides}))


@pytest.mark.parametrize("name", [c.value for c in CompressionName])
def test_the_holder_decodes_every_codecs_push(name):
    """A real swarm's push (comm/shared_model.py): the holder, with a fresh codec and only the push's number,
    decodes exactly what the pusher's codec (error feedback and PowerSGD state advancing over three pushes) sent."""
    from locoswarm.comm.exchange import LocalCodecs
    from locoswarm.comm.shared_model import push_codec

    cfg = CompressionConfig(name=name, ratio=0.1, error_feedback=True)
    shapes = [torch.Size([16, 8]), torch.Size([8])]
    encode, decode, size = push_codec(cfg, 7, shapes)
    mirror = LocalCodecs(cfg, 7, "async")  # the pusher's codec state, to read what it sent
    g = torch.Generator().manual_seed(0)
    for number in (0, 5, 6):
        update = [torch.randn(s, generator=g) for s in shapes]
        blob = encode(update, number)
        payloads = mirror.encode(update, round_=number)
        assert len(blob) == size and blob == mirror.pack(payloads)
        got, sent = decode(blob, number), mirror.decode_row(blob, payloads)
        assert all(torch.equal(a, b) for a, b in zip(got, sent, strict=True))
    with pytest.raises(ValueError, match="bytes, expected"):
        decode(blob[:-1], 6)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"version": 9}, "ahead of the model"),
        ({"rank": 3}, "outside the run's 3 workers"),
        ({"tokens": float("nan")}, "tokens is not a finite"),
        ({"steps": -1}, "steps is not a non-negative integer"),
        ({"seconds": "1"}, "seconds is not a finite"),
        ({"rank": True}, "rank is not a non-negative integer"),
    ],
)
def test_a_push_header_is_checked(change, why):
    from locoswarm.comm.shared_model import check_header

    good = {"rank": 2, "version": 4, "tokens": 384.0, "steps": 3, "seconds": 0.1, "number": 4}
    assert check_header(good, version=8, workers=3) is None
    assert why in check_header({**good, **change}, version=8, workers=3)
    assert check_header([1], version=8, workers=3) == "not a dictionary"


def test_the_model_travels_as_fp32_bytes():
    from locoswarm.comm.shared_model import pack_params, unpack_params

    like = [torch.randn(3, 4), torch.randn(5)]
    blob = pack_params(like)
    assert len(blob) == 4 * 17 and all(torch.equal(a, b) for a, b in zip(unpack_params(blob, like), like, strict=True))
    with pytest.raises(ValueError, match="expected 68"):
        unpack_params(blob + b"x", like)
