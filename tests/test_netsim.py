"""NetworkModel against hand-written formulas; the bandwidth planner by plugging its answer back in."""

from __future__ import annotations

import math

import pytest
import torch

from locoswarm.config import CompressionConfig, NetworkConfig
from locoswarm.faults import PhasePlan
from locoswarm.netsim import (
    NetworkModel,
    codec_payload_bytes,
    plan_table,
    required_bandwidth,
    steady_round,
    utilisation,
    wire_bytes,
)

P = 10e6  # payload bytes per worker
BITS = P * 8


def net(**kw) -> NetworkConfig:
    return NetworkConfig(**kw)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_uniform_topology_formulas(k):
    b, l = 100e6, 0.05  # 100 Mbit/s, 50 ms
    for topo, expected in [
        ("ring", 2 * (k - 1) / k * BITS / b + 2 * (k - 1) * l),
        ("butterfly", 2 * (k - 1) / k * BITS / b + 2 * l),
        ("parameter_server", 2 * k * BITS / b + 2 * l),
        ("gossip", BITS / b + l),
    ]:
        m = NetworkModel(net(bandwidth_mbps=100, latency_ms=50, topology=topo), k)
        assert m.comm_seconds(P) == pytest.approx(expected, rel=1e-12), topo


def test_single_worker_and_wire_bytes():
    assert NetworkModel(net(), 1).comm_seconds(P) == 0.0
    assert wire_bytes("ring", 4, 100.0) == (150.0, 150.0)
    assert wire_bytes("butterfly", 4, 100.0) == (150.0, 150.0)
    assert wire_bytes("parameter_server", 4, 100.0) == (100.0, 100.0)
    assert wire_bytes("gossip", 4, 100.0) == (100.0, 100.0)
    assert wire_bytes("ring", 1, 100.0) == (0.0, 0.0)


def test_parameter_server_link():
    # A 10x faster server link stops being the bottleneck for K=4: each phase is one worker link's payload.
    m = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, topology="parameter_server", server_mbps=1000), 4)
    assert m.comm_seconds(P) == pytest.approx(2 * BITS / 100e6)
    m = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, topology="parameter_server", server_mbps=200), 4)
    assert m.comm_seconds(P) == pytest.approx(2 * 4 * BITS / 200e6)


def test_asymmetric_links_home():
    # home: 20 up / 100 down: every transfer is limited by the sender's uplink.
    m = NetworkModel(net(bandwidth_mbps=100, uplink_mbps=20, downlink_mbps=100, latency_ms=20), 4)
    assert m.comm_seconds(P) == pytest.approx(2 * 3 / 4 * BITS / 20e6 + 6 * 0.02)
    # With the downlink the narrow side, it sets the pace instead.
    m = NetworkModel(net(bandwidth_mbps=100, uplink_mbps=100, downlink_mbps=10, latency_ms=0, topology="gossip"), 3)
    assert m.comm_seconds(P) == pytest.approx(BITS / 10e6)


def test_per_worker_links_ring_by_hand():
    cfg = net(worker_uplink_mbps=[100, 10, 50], worker_downlink_mbps=[100, 100, 20], worker_latency_ms=[10, 30, 50])
    m = NetworkModel(cfg, 3)
    chunk = BITS / 3
    # hops 0->1, 1->2, 2->0: min(sender up, receiver down) and the mean of the two latencies
    hops = [chunk / min(100e6, 100e6) + 0.020, chunk / min(10e6, 20e6) + 0.040, chunk / min(50e6, 100e6) + 0.030]
    assert m.comm_seconds(P) == pytest.approx(2 * 2 * max(hops))
    # without the slow worker 1 (e.g. it dropped out): ring 0 -> 2 -> 0
    hops = [chunk * 3 / 2 / min(100e6, 20e6) + 0.030, chunk * 3 / 2 / min(50e6, 100e6) + 0.030]
    assert m.comm_seconds(P, active=[0, 2]) == pytest.approx(2 * 1 * max(hops))


def test_per_worker_lists_cycle_for_any_k():
    cfg = net(worker_uplink_mbps=[10, 20], compute_speed=[1.0, 0.5, 0.25])
    m = NetworkModel(cfg, 7)
    assert [lk.up_bps for lk in m.links] == [10e6, 20e6] * 3 + [10e6]
    assert [m.speed(i) for i in range(7)] == [1.0, 0.5, 0.25] * 2 + [1.0]
    assert m.links[3].down_bps == cfg.bandwidth_mbps * 1e6  # unset lists fall back to the scalar fields


def test_overlap_prices_max_instead_of_sum():
    plan = PhasePlan(0, [0, 1], [5, 5], [1.0, 1.0], [True, True])
    seq = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, step_seconds=0.1), 2)
    ovl = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, step_seconds=0.1, overlap=True), 2)
    comm = BITS / 100e6  # ring, K=2: 2(1)/2 P / b
    for payload, compute in [(P, 0.5), (P / 100, 0.5)]:
        c = comm * payload / P
        assert seq.price_round(plan, [0.0, 0.0], payload).seconds == pytest.approx(compute + c)
        assert ovl.price_round(plan, [0.0, 0.0], payload).seconds == pytest.approx(max(compute, c))


def test_compute_pricing_speed_stragglers_and_masking():
    cfg = net(bandwidth_mbps=1e9, latency_ms=0, step_seconds=0.1, compute_speed=[1.0, 0.5, 2.0])
    m = NetworkModel(cfg, 3)
    plan = PhasePlan(0, [0, 1, 2], [4, 4, 0], [1.0, 3.0, 1.0], [True, True, False])
    busy = m.worker_compute_seconds(plan, [9.0, 9.0, 9.0])  # measured is ignored when step_seconds is set
    assert busy == pytest.approx([0.4, 0.4 * 3 / 0.5, 0.0])
    cost = m.price_round(plan, [9.0, 9.0, 9.0], payload_bytes=0.0)
    assert cost.compute_seconds == pytest.approx(2.4)
    assert cost.busy_seconds == pytest.approx((0.4 + 2.4) / 2)  # mean over the two workers that took part
    # measured compute is used when step_seconds is unset: measured x slowdown / speed
    m2 = NetworkModel(net(compute_speed=[1.0, 0.5, 2.0]), 3)
    assert m2.worker_compute_seconds(plan, [1.0, 1.0, 1.0]) == pytest.approx([1.0, 6.0, 0.0])


def test_wire_overhead_is_charged_to_time():
    a = NetworkModel(net(bandwidth_mbps=100, latency_ms=0), 4).comm_seconds(P)
    b = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, wire_overhead=0.07), 4).comm_seconds(P)
    assert b == pytest.approx(1.07 * a)


def test_link_efficiency_divides_transfer_time_not_latency():
    a = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, topology="butterfly"), 4).comm_seconds(P)
    b = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, topology="butterfly", link_efficiency=0.5), 4)
    assert b.comm_seconds(P) == pytest.approx(2 * a)
    lat = NetworkModel(net(bandwidth_mbps=100, latency_ms=50, topology="butterfly", link_efficiency=0.5), 4)
    assert lat.comm_seconds(P) == pytest.approx(2 * a + 2 * 0.05)


@pytest.mark.parametrize("topology", ["ring", "butterfly", "parameter_server", "gossip"])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("latency_ms", [0.0, 5.0])
def test_planner_answer_plugged_back_gives_target(topology, overlap, latency_ms):
    cfg = net(topology=topology, overlap=overlap, latency_ms=latency_ms)
    for compute, payload, target in [(1.75, 496e6, 0.95), (0.035, 131.75e6, 0.95), (17.5, 5e6, 0.5)]:
        mbps = required_bandwidth(cfg, 8, compute, payload, target)
        if math.isinf(mbps):  # latency alone breaks the target: even a near-infinite link misses it
            assert latency_ms > 0
            assert utilisation(net(topology=topology, overlap=overlap, latency_ms=latency_ms, bandwidth_mbps=1e15),
                               8, compute, payload) < target  # fmt: skip
            continue
        assert mbps > 0
        cfg_at = net(topology=topology, overlap=overlap, latency_ms=latency_ms, bandwidth_mbps=mbps)
        assert utilisation(cfg_at, 8, compute, payload) == pytest.approx(target, abs=1e-6)
        # a little less bandwidth misses the target
        cfg_less = net(topology=topology, overlap=overlap, latency_ms=latency_ms, bandwidth_mbps=mbps * 0.99)
        assert utilisation(cfg_less, 8, compute, payload) < target


def test_planner_unreachable_when_latency_alone_costs_too_much():
    # ddp, 35 ms steps, ring of 8 with 50 ms latency: 14 hops of latency already exceed the budget
    assert required_bandwidth(net(latency_ms=50), 8, 0.035, 1e6, 0.95) == math.inf


@pytest.mark.parametrize("k", [2, 4, 7])
def test_allgather_pricing(k):
    """Payloads that cannot be summed on the wire are all-gathered: K-1 payloads each way."""
    P = 1e6
    assert wire_bytes("ring", k, P, allgather=True) == ((k - 1) * P, (k - 1) * P)
    assert wire_bytes("butterfly", k, P, allgather=True) == ((k - 1) * P, (k - 1) * P)
    assert wire_bytes("parameter_server", k, P, allgather=True) == (P, P)
    for topology, latencies in (("ring", k - 1), ("butterfly", 1)):
        m = NetworkModel(net(bandwidth_mbps=100, latency_ms=10, topology=topology), k)
        assert m.comm_seconds(P, allgather=True) == pytest.approx((k - 1) * P * 8 / 1e8 + latencies * 0.01)


def test_sim_prices_what_the_real_backends_send():
    """topk's payloads are all-gathered on a real network, randomk's all-reduced, int8's reduce-scattered and
    gathered (re-quantised, as much as an all-reduce): the sim counts them so."""
    from locoswarm.comm.sim import SimAverager
    from locoswarm.compression import codec_factory

    model = NetworkModel(net(bandwidth_mbps=100, latency_ms=0, topology="butterfly"), 4)
    x = [torch.randn(4, 1000)]
    for name, allgather in (
        ("topk", True),
        ("randomk", False),
        ("int8", False),
        ("int4", False),
        ("sign", False),  # re-sparsified per chunk, like int8
        ("blocktopk", False),
        ("fp16", False),
    ):
        r = SimAverager(codec_factory(CompressionConfig(name=name, ratio=0.1), 0), model).average(x, torch.ones(4))
        assert r.allgather == allgather
        assert r.bytes_sent == pytest.approx(r.payload_bytes * (3 if allgather else 1.5))


def test_codec_payload_sizes_come_from_the_codecs():
    n = 1e6
    assert codec_payload_bytes("none", n) == pytest.approx(4 * n)
    assert codec_payload_bytes("bf16", n) == pytest.approx(2 * n)
    assert codec_payload_bytes("int8", n) == pytest.approx((1 + 4 / 64) * n)  # + an fp32 scale per 64-block
    assert codec_payload_bytes("int4", n) == pytest.approx((0.5 + 4 / 64) * n)
    assert codec_payload_bytes(CompressionConfig(name="topk", ratio=0.01), n) == pytest.approx(0.01 * 8 * n, rel=1e-3)


def test_plan_table_rows_and_cli(capsys):
    rows = plan_table(124e6, 0.035, 8, net(latency_ms=0), [1, 50], ["none", "int8"], 0.95)
    assert [(r["algorithm"], r["codec"]) for r in rows] == [
        ("ddp", "none"), ("ddp", "int8"), ("diloco H=50", "none"), ("diloco H=50", "int8"),
    ]  # fmt: skip
    # H=50 needs 1/50 of ddp's bandwidth (no latency); int8 payloads are (1 + 4/64)/4 of fp32's and are
    # reduce-scattered and gathered, re-quantised, like an all-reduce: the same factor in bandwidth
    assert rows[2]["mbps"] == pytest.approx(rows[0]["mbps"] / 50)
    assert rows[1]["mbps"] == pytest.approx(rows[0]["mbps"] * (1 + 4 / 64) / 4)
    # sign is reduce-scattered like int8; topk's payloads can only be all-gathered: (K-1) payloads instead of
    # 2(K-1)/K, K/2 = 4x more per byte
    sign = plan_table(124e6, 0.035, 8, net(latency_ms=0), [1], ["sign"], 0.95)[0]
    assert sign["mbps"] == pytest.approx(rows[0]["mbps"] * (1 / 8 + 4 / 64) / 4)
    topk = plan_table(124e6, 0.035, 8, net(latency_ms=0), [1], ["topk:0.01"], 0.95)[0]
    assert topk["mbps"] == pytest.approx(rows[0]["mbps"] * 0.01 * 8 / 4 * 8 / 2, rel=1e-3)
    from locoswarm.netsim import main

    assert main(["plan", "--params", "124e6", "--step-seconds", "0.035", "--codecs", "none,int8"]) == 0
    out = capsys.readouterr().out
    assert "diloco H=500" in out and "int8" in out


def test_steady_round_utilisation_matches_definition():
    cfg = net(bandwidth_mbps=1000, latency_ms=1)
    cost = steady_round(cfg, 4, 2.0, 50e6)
    comm = 2 * 3 / 4 * 50e6 * 8 / 1e9 + 6 * 0.001
    assert cost.comm_seconds == pytest.approx(comm)
    assert utilisation(cfg, 4, 2.0, 50e6) == pytest.approx(2.0 / (2.0 + comm))
