"""The bandwidth planner for Streaming DiLoCo (fragments P, overlap τ): its steady-state formula against a step
by step booking on ``locoswarm.timeline.Timeline``, its answers plugged back in, the relations between P, τ
and latency that follow from W = max(I + max(0, c - τ·t), c), and the ``plan`` CLI."""

from __future__ import annotations

import math
import re

import pytest
import torch

from locoswarm.config import NetworkConfig
from locoswarm.faults import PhasePlan
from locoswarm.model import GPT, PRESETS, GPTShape
from locoswarm.netsim import (
    NetworkModel,
    interval_seconds,
    main,
    plan_table,
    preset_params,
    required_bandwidth,
    schedule_label,
    steady_round,
    utilisation,
)
from locoswarm.timeline import Timeline

K = 4
MB = 1e6


def net(**kw) -> NetworkConfig:
    return NetworkConfig(**kw)


def simulate(cfg: NetworkConfig, workers: int, inner_steps: int, fragments: int, tau: int, payload: float,
             intervals: int, warmup: int = 10) -> tuple[float, float, float]:  # fmt: skip
    """Book a streaming schedule on a Timeline one inner step at a time, as ``strategies/streaming.py`` does:
    every H/P steps a fragment's exchange starts (payload / P, priced by the network model, sharing the link
    with the others in start order) and the workers wait for it τ steps later. Returns (utilisation over the
    ``intervals`` after ``warmup`` intervals, seconds per interval over them, utilisation of the whole run)."""
    assert inner_steps % fragments == 0
    every = inner_steps // fragments
    model = NetworkModel(cfg, workers)
    timeline = Timeline(model)
    step = PhasePlan(0, list(range(workers)), [1] * workers, [1.0] * workers, [True] * workers)
    c = model.comm_seconds(payload / fragments)
    pending: list[tuple[int, float]] = []  # (step at which the result is needed, when the exchange ends)
    marks = {}

    def merge_due(s: int) -> None:
        while pending and pending[0][0] <= s:
            timeline.wait(pending.pop(0)[1])

    total = (warmup + intervals + 1) * every
    for s in range(total + 1):
        merge_due(s)
        if s > 0 and s % every == 0:
            pending.append((s + tau, timeline.exchange(timeline.now, c)))
            merge_due(s)
        if s % every == 0 and s // every in (warmup, warmup + intervals):
            marks[s // every] = timeline.total()
        if s < total:
            timeline.compute(step, [0.0] * workers)  # network.step_seconds charges t per step; measured is unused
    timeline.drain()
    a, b = marks[warmup], marks[warmup + intervals]
    whole = timeline.total()
    return ((b.busy_seconds - a.busy_seconds) / (b.seconds - a.seconds), (b.seconds - a.seconds) / intervals,
            whole.busy_seconds / whole.seconds)  # fmt: skip


CASES = [
    # (P, H, τ, Mbit/s, latency ms): compute-bound, blocking, partly hidden, fully hidden, and link-bound
    (1, 8, 0, 100, 0.0),  # DiLoCo: I + c
    (4, 8, 0, 100, 5.0),  # streaming without overlap: I/P + c/P
    (4, 8, 1, 30, 5.0),  # τ·t hides part of c
    (2, 8, 3, 1000, 1.0),  # c < τ·t: nothing blocks, utilisation 1
    (4, 8, 3, 10, 0.0),  # τ·t > I and c > I: the link cannot keep up, W = c
    (8, 16, 1, 50, 20.0),
]


@pytest.mark.parametrize("fragments,inner_steps,tau,mbps,latency_ms", CASES)
def test_formula_matches_timeline_simulation(fragments, inner_steps, tau, mbps, latency_ms):
    t, payload = 0.05, 8 * MB
    cfg = net(bandwidth_mbps=mbps, latency_ms=latency_ms, step_seconds=t)
    util, per_interval, whole = simulate(cfg, K, inner_steps, fragments, tau, payload, intervals=50)
    c = NetworkModel(cfg, K).comm_seconds(payload / fragments)
    interval = inner_steps / fragments * t
    w = max(interval + max(0.0, c - tau * t), c)
    assert per_interval == pytest.approx(w, rel=1e-9)  # steady state: every interval lasts W
    expected = utilisation(cfg, K, inner_steps * t, payload, fragments=fragments, overlap_steps=tau,
                           inner_steps=inner_steps)  # fmt: skip
    assert util == pytest.approx(interval / w, rel=1e-9)
    assert expected == pytest.approx(util, rel=1e-9)
    assert whole == pytest.approx(expected, rel=0.01)  # the whole run, start-up and drain included
    if (fragments, tau, mbps) == (4, 3, 10):
        assert w == c > interval + max(0.0, c - tau * t)  # link-bound, as meant: blocking alone would give more


@pytest.mark.parametrize("fragments,inner_steps,tau,latency_ms", [(1, 8, 0, 0.0), (4, 8, 1, 2.0), (8, 16, 3, 5.0)])
def test_required_bandwidth_plugged_into_the_timeline_gives_the_target(fragments, inner_steps, tau, latency_ms):
    t, payload, target = 0.05, 8 * MB, 0.9
    base = net(latency_ms=latency_ms, step_seconds=t)
    mbps = required_bandwidth(base, K, inner_steps * t, payload, target, fragments=fragments, overlap_steps=tau,
                              inner_steps=inner_steps)  # fmt: skip
    assert 0 < mbps < math.inf
    at = net(bandwidth_mbps=mbps, latency_ms=latency_ms, step_seconds=t)
    assert simulate(at, K, inner_steps, fragments, tau, payload, intervals=20)[0] == pytest.approx(target, rel=1e-6)
    less = net(bandwidth_mbps=mbps * 0.98, latency_ms=latency_ms, step_seconds=t)
    assert simulate(less, K, inner_steps, fragments, tau, payload, intervals=20)[0] < target - 1e-4


def test_fragments_1_overlap_0_is_the_diloco_answer():
    cfg, compute, payload, target = net(latency_ms=0.0), 3.5, 300 * MB, 0.95
    plain = required_bandwidth(cfg, 8, compute, payload, target)
    explicit = required_bandwidth(cfg, 8, compute, payload, target, fragments=1, overlap_steps=0, inner_steps=100)
    assert explicit == plain
    # ring, uniform links, no latency: 2 (K-1)/K P bits must cross in C (1/u - 1) seconds
    assert plain == pytest.approx(2 * 7 / 8 * payload * 8 / 1e6 / (compute * (1 / target - 1)), rel=1e-9)
    assert steady_round(cfg, 8, compute, payload, fragments=1).seconds == steady_round(cfg, 8, compute, payload).seconds


def test_fragments_alone_do_not_lower_the_need_and_latency_makes_them_cost():
    """τ = 0: utilisation I / (I + c) with I and c both / P (no latency): the same bandwidth. Each fragment's
    averaging pays the latency once, so with latency P raises it, and P·(latency) beyond C (1/u - 1) is fatal."""
    compute, payload, target = 10.0, 300 * MB, 0.95
    flat = [required_bandwidth(net(latency_ms=0.0), 8, compute, payload, target, fragments=p) for p in (1, 2, 4, 8)]
    assert flat == pytest.approx([flat[0]] * 4, rel=1e-9)
    lat = [required_bandwidth(net(latency_ms=5.0), 8, compute, payload, target, fragments=p) for p in (1, 2, 4, 7)]
    assert all(a < b < math.inf for a, b in zip(lat, lat[1:], strict=False))
    assert lat[0] > flat[0]
    # ring of 8: 14 latency hops (70 ms) per averaging, against a budget of 10 s x (1/0.95 - 1) / P = 75 ms at P = 7
    # and 66 ms at P = 8
    assert required_bandwidth(net(latency_ms=5.0), 8, compute, payload, target, fragments=8) == math.inf


def test_overlap_lowers_the_need_and_fragments_multiply_it():
    """τ > 0, no latency: b = A / (P τ t + C (1/u - 1)), A = the whole payload's bandwidth term, while τ t <= I."""
    h, t, payload, target = 100, 0.1, 300 * MB, 0.95
    cfg = net(latency_ms=0.0)
    compute = h * t

    def need(p: int, tau: int) -> float:
        return required_bandwidth(cfg, 8, compute, payload, target, fragments=p, overlap_steps=tau, inner_steps=h)

    a = 2 * 7 / 8 * payload * 8 / 1e6
    for p in (1, 4, 10):
        assert need(p, 1) < need(p, 0)
        for tau in (0, 1, 5):
            assert need(p, tau) == pytest.approx(a / (p * tau * t + compute * (1 / target - 1)), rel=1e-9)
    assert need(10, 5) < need(4, 5) < need(1, 5)
    # τ t beyond I = H t / P: only the link's own rate is left, c <= I / u
    assert need(50, 5) == pytest.approx(a / 50 / (compute / 50 / target), rel=1e-9)


def test_network_overlap_prices_max_compute_comm_whatever_tau():
    compute, payload = 10.0, 300 * MB
    cfg = net(latency_ms=0.0, overlap=True)
    base = required_bandwidth(cfg, 8, compute, payload, 0.95)
    assert required_bandwidth(cfg, 8, compute, payload, 0.95, fragments=4, overlap_steps=3, inner_steps=100) == (
        pytest.approx(base, rel=1e-9)
    )
    assert interval_seconds(2.0, 3.0, 1.0, overlap=True) == 3.0
    assert interval_seconds(2.0, 3.0, 1.0) == 4.0  # I + (c - τt)
    assert interval_seconds(2.0, 5.0, 4.0) == 5.0  # the link: c


def test_steady_round_ignores_network_step_seconds():
    """compute_seconds is the phase's length; a network.step_seconds in the config must not replace it."""
    a = utilisation(net(bandwidth_mbps=100, step_seconds=0.001), 4, 5.0, 8 * MB)
    b = utilisation(net(bandwidth_mbps=100), 4, 5.0, 8 * MB)
    assert a == b
    assert a == pytest.approx(5.0 / (5.0 + NetworkModel(net(bandwidth_mbps=100), 4).comm_seconds(8 * MB)))


def test_invalid_schedules_raise():
    cfg = net()
    with pytest.raises(ValueError, match="inner_steps"):
        required_bandwidth(cfg, 4, 1.0, MB, fragments=2, overlap_steps=1)
    with pytest.raises(ValueError, match="fragments"):
        required_bandwidth(cfg, 4, 1.0, MB, fragments=0)
    with pytest.raises(ValueError, match="overlap_steps"):
        utilisation(cfg, 4, 1.0, MB, overlap_steps=-1, inner_steps=10)


def test_plan_table_rows_for_each_schedule():
    # τ = 100 >= H is not a schedule the streaming strategy accepts: left out
    rows = plan_table(150e6, 0.1, 8, net(latency_ms=0.0), [1, 100], ["bf16", "int4"], 0.95, [1, 4], [0, 5, 100])
    labels = [(r["algorithm"], r["codec"]) for r in rows]
    assert labels == [
        ("ddp", "bf16"), ("ddp", "int4"),
        ("diloco H=100", "bf16"), ("diloco H=100", "int4"),
        ("streaming P=1 H=100 τ=5", "bf16"), ("streaming P=1 H=100 τ=5", "int4"),
        ("streaming P=4 H=100", "bf16"), ("streaming P=4 H=100", "int4"),
        ("streaming P=4 H=100 τ=5", "bf16"), ("streaming P=4 H=100 τ=5", "int4"),
    ]  # fmt: skip
    by = {k: r for k, r in zip(labels, rows, strict=True)}
    assert by[("streaming P=4 H=100", "bf16")]["mbps"] == pytest.approx(by[("diloco H=100", "bf16")]["mbps"])
    assert by[("streaming P=4 H=100 τ=5", "bf16")]["mbps"] < by[("streaming P=1 H=100 τ=5", "bf16")]["mbps"]
    assert by[("streaming P=4 H=100 τ=5", "bf16")]["fragment_MB"] == pytest.approx(
        by[("streaming P=4 H=100 τ=5", "bf16")]["payload_MB"] / 4
    )
    assert by[("streaming P=4 H=100 τ=5", "int4")]["interval_s"] == pytest.approx(2.5)
    # int4: 4 bits + an fp32 scale per 64 entries, vs bf16's 16 bits, an all-reduce either way
    assert by[("diloco H=100", "int4")]["mbps"] == pytest.approx(by[("diloco H=100", "bf16")]["mbps"] * 4.5 / 16)
    assert schedule_label(100, 4, 0) == "streaming P=4 H=100"


def test_preset_params_counts_the_gpt():
    shape = GPTShape(**PRESETS["tiny"], seq_len=1024, vocab_size=50257)
    with torch.device("meta"):
        expected = GPT(shape).num_params()
    assert preset_params("tiny") == expected
    assert preset_params("tiny", vocab_size=256, seq_len=128) < expected
    with pytest.raises(ValueError, match="not a preset"):
        preset_params("huge")


def test_cli_plans_streaming_rows(capsys):
    assert main(["plan", "--model", "150m", "--step-seconds", "0.1", "--inner-steps", "100", "--fragments", "1,4",
                 "--overlap-steps", "0,1,5", "--codecs", "bf16,int4", "--workers", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"{preset_params('150m') / 1e6:.1f}M params" in out
    lines = out.splitlines()
    for label in ("diloco H=100", "streaming P=4 H=100", "streaming P=4 H=100 τ=1", "streaming P=4 H=100 τ=5"):
        rows = [ln for ln in lines if re.split(r"\s{2,}", ln)[0] == label]
        assert len(rows) == 2 and "bf16" in rows[0] and "int4" in rows[1], label
    assert "streaming P=1 H=100 τ=5" in out
    assert "Gbit/s" in out or "Mbit/s" in out


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--params", "1e8", "--model", "150m", "--step-seconds", "0.1"])
    with pytest.raises(SystemExit):
        main(["plan", "--model", "tiny", "--step-seconds", "0.1", "--fragments", "8"])  # tiny has 4 blocks
    with pytest.raises(SystemExit):
        main(["plan", "--params", "1e8", "--step-seconds", "0.1", "--fragments", "0"])
