"""SWARM-style pipelines on sim (pipeline.stages > 1): stages, routing, failures, pricing, and the identities that
pin them to the whole-model strategies."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import final_params, max_rel_diff, tiny_config

from locoswarm.config import NetworkConfig, validate
from locoswarm.model import GPT, GPTShape
from locoswarm.netsim import NetworkModel
from locoswarm.pipeline import Call, Router, simulate_step, split_stages
from locoswarm.trainer import train

TOL = 1e-5


def run(tmp_path, name: str, **overrides) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    cfg = tiny_config(train__checkpoint_every=1, **overrides)
    summary = train(cfg, tmp_path / name)
    assert summary["status"] == "ok", summary.get("error")
    return summary, {w: final_params(tmp_path / name, w) for w in range(cfg.workers)}


def worst(a: dict, b: dict) -> float:
    return max(max_rel_diff(a[w], b[w]) for w in a)


# ------------------------------------------------------------------ stages
def test_split_balances_contiguous_stages_and_owns_every_parameter_once():
    model = GPT(GPTShape(n_layer=6, n_head=2, d_model=32, seq_len=16, vocab_size=64, tie_embeddings=False))
    names = [n for n, _ in model.named_parameters()]
    for stages in (1, 2, 3, 6):
        specs = split_stages(model, stages)
        owned = sorted(i for s in specs for i in s.params)
        assert owned == list(range(len(names)))  # every parameter in exactly one stage
        assert [s.blocks[0] for s in specs] == [0] + [s.blocks[1] for s in specs[:-1]]  # contiguous
        assert all(s.blocks[1] > s.blocks[0] for s in specs)  # at least one block each
        assert {names[i] for i in specs[0].params} >= {"tok_emb.weight", "pos_emb.weight"}
        assert {names[i] for i in specs[-1].params} >= {"head.weight", "ln_f.weight"}
    # balanced: no other contiguous cut of 6 blocks into 2 stages has a smaller largest stage
    sizes = [s.numel for s in split_stages(model, 2)]
    per_block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.0."))
    assert abs(sizes[0] - sizes[1]) <= per_block


def test_a_tied_model_cannot_be_cut():
    tied = GPT(GPTShape(n_layer=2, n_head=2, d_model=16, seq_len=8, vocab_size=32))
    with pytest.raises(ValueError, match="tie_embeddings"):
        split_stages(tied, 2)


def test_untied_model_starts_from_the_tied_weights():
    torch.manual_seed(0)
    untied = GPT(GPTShape(n_layer=2, n_head=2, d_model=16, seq_len=8, vocab_size=32, tie_embeddings=False))
    assert untied.head.weight is not untied.tok_emb.weight
    assert torch.equal(untied.head.weight, untied.tok_emb.weight)


# ------------------------------------------------------------------ identities
@pytest.mark.parametrize(
    "algorithm",
    [
        dict(algorithm__name="ddp"),  # SWARM
        dict(algorithm__name="diloco"),  # DiLoCo-SWARM
        dict(
            algorithm__name="streaming_diloco",
            algorithm__fragments=2,
            algorithm__overlap_steps=1,
            algorithm__mixing=0.5,
        ),  # fmt: skip
    ],
    ids=["ddp", "diloco", "streaming"],
)
def test_two_stages_with_fixed_routing_equal_the_unsplit_model(tmp_path, algorithm):
    """A pipeline with fixed routing is data parallelism over the same micro-batches: S=2 equals S=1 (untied head)
    under every strategy, with no change to the strategies (no clipping: a stage peer clips its own stage)."""
    common = dict(train__max_steps=9, train__grad_clip=0.0, **algorithm)
    _, whole = run(tmp_path, "whole", model__tie_embeddings=False, **common)
    _, piped = run(tmp_path, "piped", pipeline__stages=2, **common)
    assert worst(piped, whole) <= TOL


def test_stochastic_routing_with_ddp_is_still_exact(tmp_path):
    """Every stage accumulates each micro-batch once and ddp averages the sums: the routing cannot change the
    gradient, only who computed it. Speeds make the draw uneven; 4 micro-batches per worker."""
    common = dict(algorithm__name="ddp", train__max_steps=6, pipeline__stages=2, pipeline__microbatches=4)
    speeds = dict(network__compute_speed=[1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 0.5, 1.0])
    fixed_summary, fixed = run(tmp_path, "fixed", **common)
    summary, stochastic = run(tmp_path, "stochastic", pipeline__routing="stochastic", **common, **speeds)
    assert worst(stochastic, fixed) <= TOL
    assert summary["stage_load"] != fixed_summary["stage_load"]  # the work really moved between peers
    assert [sum(row) for row in summary["stage_load"]] == [6 * 4 * 4] * 2


def test_failed_calls_are_retried_and_every_micro_batch_counts_once(tmp_path):
    """Peers fail 15% of their calls; each failed call is retried on another peer of its stage. With ddp every peer
    of a stage holds the same parameters, so a run with failures must equal one without, to float rounding: a
    micro-batch lost or counted twice would change the averaged gradient."""
    common = dict(algorithm__name="ddp", train__max_steps=6, pipeline__stages=2, pipeline__microbatches=2)
    _, clean = run(tmp_path, "clean", **common)
    summary, failing = run(tmp_path, "failing", pipeline__failure_prob=0.15, **common)
    assert summary["stage_failures"] > 5
    assert [sum(row) for row in summary["stage_load"]] == [6 * 4 * 2] * 2  # each stage: every micro-batch once
    assert worst(failing, clean) <= TOL


def test_microbatches_do_not_change_the_gradient(tmp_path):
    common = dict(algorithm__name="ddp", train__max_steps=5, pipeline__stages=2, train__grad_clip=0.0)
    _, one = run(tmp_path, "one", **common)
    _, four = run(tmp_path, "four", pipeline__microbatches=4, **common)
    assert worst(four, one) <= TOL


# ------------------------------------------------------------------ routing
def test_stochastic_routing_sends_work_in_proportion_to_throughput():
    router = Router("stochastic", peers=3, seed=7)
    for peer, seconds in enumerate([1.0, 0.5, 0.25]):  # throughput 1 : 2 : 4
        router.observe(peer, seconds)
    n = 7000
    picks = [router.pick(0, 0, [0, 1, 2], (step, 0, 0, 0)) for step in range(n)]
    shares = [picks.count(p) / n for p in range(3)]
    for share, expected in zip(shares, [1 / 7, 2 / 7, 4 / 7], strict=True):
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert router.pick(0, 0, [0, None, None], (0, 0, 0, 0)) == 0  # only live peers are picked


def test_a_heterogeneous_stage_gets_work_by_speed_in_a_run(tmp_path):
    """In a run, stage 1's peer 1 computes 3x faster than its peers; the router measures it and sends it about
    3/6 of stage 1's micro-batches."""
    summary, _ = run(tmp_path, "hetero", algorithm__name="ddp", train__max_steps=10, pipeline__stages=2,
                     pipeline__routing="stochastic", pipeline__microbatches=4, network__step_seconds=0.1,
                     network__compute_speed=[1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0])  # fmt: skip
    load = summary["stage_load"]
    n = sum(load[1])
    assert n == 10 * 4 * 4
    assert abs(load[1][1] / n - 0.5) < 4 * math.sqrt(0.25 / n)
    assert max(load[0]) / n < 0.4  # stage 0's peers are alike: no one gets stage 1's favourite's share


def test_fixed_routing_falls_back_to_the_next_live_peer():
    router = Router("fixed", peers=8, seed=0)
    assert router.pick(1, 2, [4, 5, 6, 7], (0, 0, 0, 0)) == 2
    assert router.pick(1, 2, [4, 5, None, None], (0, 0, 0, 0)) == 0


# ------------------------------------------------------------------ rebalancing
SLOW_STAGE = [1.0] * 4 + [0.25] * 4  # stage 1's peers compute 4x slower than stage 0's


def test_peers_move_to_the_slow_stage_and_the_pipeline_speeds_up(tmp_path):
    """Stage 1 is 4x slower: rebalancing moves stage-0 peers there (downloading its state) until the slowest
    stage's throughput stops rising; the run takes less simulated time for the same work."""
    common = dict(algorithm__name="ddp", train__max_steps=12, pipeline__stages=2, pipeline__routing="stochastic",
                  pipeline__microbatches=2, network__step_seconds=0.1, network__compute_speed=SLOW_STAGE)  # fmt: skip
    still, _ = run(tmp_path, "still", **common)
    moving, _ = run(tmp_path, "moving", pipeline__rebalance_every=2, **common)
    load = moving["stage_load"]
    peers = moving["stage_peers"]
    assert peers[1] > 4 and peers[0] < 4 and sum(peers) == 8  # stage 1 gained peers, stage 0 gave them
    assert sum(1 for c in load[1] if c > 0) > 4  # and they served it
    assert moving["stage_moves"] >= 1 and moving["rebalance_bytes"] > 0
    assert [sum(row) for row in load] == [12 * 4 * 2] * 2  # every micro-batch once per stage
    assert moving["sim_seconds"] < 0.8 * still["sim_seconds"]


def test_rebalancing_under_ddp_changes_nothing_but_who_computes(tmp_path):
    """Under ddp every peer of a stage holds the same parameters and optimiser state, so a moved peer that
    downloaded them, and the uniform average over the new pools, must give the unmoved numbers to float rounding
    (its stage's gradient sum is rescaled to the new pool size)."""
    common = dict(algorithm__name="ddp", train__max_steps=10, pipeline__stages=2, pipeline__routing="stochastic",
                  pipeline__microbatches=2, network__step_seconds=0.1, network__compute_speed=SLOW_STAGE)  # fmt: skip
    _, still = run(tmp_path, "still", **common)
    summary, moving = run(tmp_path, "moving", pipeline__rebalance_every=2, **common)
    assert summary["stage_moves"] >= 1
    assert max(max_rel_diff(moving[0], still[0]), max_rel_diff(moving[1], still[1])) <= TOL


def test_a_moved_peer_downloads_its_new_stages_state_at_a_round_boundary():
    """DiLoCo-SWARM: at a round boundary every peer of a stage holds the averaged model; the peer that moves takes
    a free slot and downloads that stage's parameters and a serving peer's optimiser state (its own old slot is
    freed and takes no part in the old stage's averages any more)."""
    from locoswarm.build import build_run

    cfg = tiny_config(pipeline__stages=2, pipeline__routing="stochastic", pipeline__rebalance_every=1000,
                      network__step_seconds=0.1, network__compute_speed=SLOW_STAGE, device="cpu")  # fmt: skip
    run_ = build_run(validate(cfg))
    group = run_.group
    run_.strategy.round(cfg.train.max_steps)  # one phase of H steps and its outer step: a round boundary
    before = [list(r) for r in group.occupant]
    group._rebalance()
    assert group.moves == 1
    (stage, to), = [(s, c) for s in range(2) for c in range(group.size) if group.occupant[s][c] != before[s][c]
                    and group.occupant[s][c] is not None]  # fmt: skip
    assert stage == 1 and to >= cfg.workers  # into the slow stage, in a slot past the original ones
    moved = group.occupant[1][to]
    assert moved < 4 and group.occupant[0][moved] is None  # a stage-0 peer left its slot (column = its id) free
    dest = group.workers[to]
    serving = [group.workers[c] for c, p in enumerate(before[1]) if p is not None]
    for i in group.specs[1].params:
        assert all(torch.equal(dest.params[i], w.params[i]) for w in serving)  # the averaged stage
    state = lambda w, i: w.optimizer.state[w.params[i]]  # noqa: E731
    i = group.specs[1].params[0]
    assert any(torch.equal(state(dest, i)["exp_avg"], state(w, i)["exp_avg"]) for w in serving)
    assert not any(torch.equal(state(dest, i)["exp_avg"], state(group.workers[c], i)["exp_avg"])
                   for c in range(cfg.workers) if group.occupant[1][c] is None)  # fmt: skip


def test_a_peer_steps_only_on_steps_it_got_micro_batches():
    """DiLoCo-SWARM with stochastic routing: a peer that got no micro-batch in a step leaves its parameters and
    optimiser state alone, so its AdamW step count is the number of steps in which it served."""
    from locoswarm.build import build_run

    cfg = tiny_config(pipeline__stages=2, pipeline__routing="stochastic", device="cpu",
                      network__compute_speed=[1.0, 1.0, 1.0, 0.2, 1.0, 0.2, 1.0, 1.0])  # fmt: skip
    group = build_run(validate(cfg)).group
    stepped = [[0] * group.size for _ in range(2)]
    for _ in range(8):
        group.inner_steps(1)
        for s, row in enumerate(group.take_stats()["stage_load"]):
            for c, n in enumerate(row):
                stepped[s][c] += n > 0
    assert any(n < 8 for row in stepped for n in row)  # some peer sat a step out
    for s, spec in enumerate(group.specs):
        for c, w in enumerate(group.workers):
            adam = w.optimizer.state.get(w.params[spec.params[0]], {})
            assert int(adam.get("step", 0)) == stepped[s][c], (s, c)


def test_balanced_stages_never_move(tmp_path):
    """Equal peers and a balanced cut: no move can raise the slowest stage, so rebalancing is a no-op and the
    numbers are exactly those of the run without it (no special case: the rule finds nothing to gain)."""
    common = dict(train__max_steps=9, pipeline__stages=2, pipeline__routing="stochastic", network__step_seconds=0.1)
    _, still = run(tmp_path, "still", **common)
    summary, moving = run(tmp_path, "moving", pipeline__rebalance_every=1, **common)
    assert summary["stage_moves"] == 0
    assert worst({w: moving[w] for w in still}, still) == 0.0


# ------------------------------------------------------------------ pricing
def test_schedule_of_one_micro_batch_is_its_chain_and_two_overlap():
    net = NetworkModel(NetworkConfig(bandwidth_mbps=8.0, latency_ms=0.0), workers=2)  # 1 MB/s links
    hop = net.transfer_seconds(0, 1, 1e6)
    assert hop == pytest.approx(1.0 * (1 + net.cfg.wire_overhead) / net.cfg.link_efficiency)
    one = [Call(0, 1.0, False), Call(1, 1.0, False, 0, 1e6), Call(1, 2.0, True), Call(0, 2.0, True, 1, 1e6)]
    makespan, busy = simulate_step([one], net, 2)
    assert makespan == pytest.approx(6.0 + 2 * hop)
    assert busy == [3.0, 3.0]
    # a second micro-batch: peer 0 runs its forward while its first activations cross and peer 1 works on them;
    # the second's activations wait for the link (sent at 2, on the wire until 2 + hop), then for peer 1, busy
    # with the first's forward and backward until 1 + hop + 3; both backward gradients queue on the link back.
    two, busy = simulate_step([one, one], net, 2)
    assert busy == [6.0, 6.0]
    f0, f1 = 1.0, 1.0 + hop + 3.0  # the first's backward leaves peer 1; the second's forward starts there
    first_back = f1 + hop  # peer 0 runs it at once (its own forwards are done)
    second_back = f1 + 3.0  # peer 1: the second's forward and backward
    expected = max(first_back + 2.0, second_back + hop) + 2.0
    assert f0 == 1.0 and two == pytest.approx(expected)
    # two messages on one uplink go one after another: twice the wire time, not once
    fan = [[Call(0, 0.0, False), Call(1, 0.0, False, 0, 1e6)], [Call(0, 0.0, False), Call(2, 0.0, False, 0, 1e6)]]
    net3 = NetworkModel(NetworkConfig(bandwidth_mbps=8.0, latency_ms=0.0), workers=3)
    shared, _ = simulate_step(fan, net3, 3)
    assert shared == pytest.approx(2 * hop)


def test_activation_codecs_shrink_the_bytes_between_stages(tmp_path):
    common = dict(algorithm__name="ddp", train__max_steps=3, pipeline__stages=2)
    fp32, _ = run(tmp_path, "none", **common)
    fp16, _ = run(tmp_path, "fp16", pipeline__activation_codec="fp16", **common)
    int8, _ = run(tmp_path, "int8", pipeline__activation_codec="int8", **common)
    # K=4 workers, 1 micro-batch of 4 x 32 tokens x 32 channels, forward and backward, over 8 peers, 3 steps
    assert fp32["activation_bytes_total"] == 3 * 4 * 2 * (4 * 32 * 32 * 4) / 8
    assert fp16["activation_bytes_total"] == fp32["activation_bytes_total"] / 2
    assert fp32["activation_bytes_total"] / 4 < int8["activation_bytes_total"] < fp32["activation_bytes_total"] / 3
    assert math.isfinite(int8["final_val_loss"])


def test_pipeline_is_priced_by_its_schedule(tmp_path):
    """With network.step_seconds, one micro-batch per worker and fast links, a step is the chain of both stages'
    forward and backward (the pipeline's bubble: each stage idles while the other works), so utilisation is
    about 1/S."""
    summary, _ = run(tmp_path, "priced", algorithm__name="ddp", train__max_steps=4, pipeline__stages=2,
                     network__step_seconds=1.0, network__bandwidth_mbps=1e6, network__latency_ms=0.0)  # fmt: skip
    assert summary["sim_seconds"] == pytest.approx(4.0, rel=0.01)  # 4 steps of 1 s (+ the tiny all-reduces)
    assert summary["compute_utilisation"] == pytest.approx(0.5, rel=0.02)


def test_resume_matches_an_uninterrupted_pipeline(tmp_path):
    """Routing, failures and moved peers all resume exactly: the throughput estimates, who serves which stage and
    the moved peers' downloaded state are in the checkpoint."""
    common = dict(train__max_steps=9, pipeline__stages=2, pipeline__routing="stochastic", pipeline__microbatches=2,
                  pipeline__failure_prob=0.1, pipeline__rebalance_every=6, network__compute_speed=SLOW_STAGE)  # fmt: skip
    summary, straight = run(tmp_path, "straight", **common)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage_moves") for r in rows if r["step"] > 3)  # a peer moves after the interruption
    assert any(r.get("stage_failures") for r in rows if r["step"] > 3)
    cfg = tiny_config(train__checkpoint_every=1, **common)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", stop_after_step=3)
    cfg.resume = True
    assert train(cfg, tmp_path / "resumed")["status"] == "ok"
    resumed = {w: final_params(tmp_path / "resumed", w) for w in range(cfg.workers)}
    assert worst(resumed, straight) == 0.0


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(pipeline__stages=3), "pipeline.stages"),  # more stages than blocks (n_layer=2)
        (dict(pipeline__stages=2, pipeline__microbatches=3), "pipeline.microbatches"),
        (dict(pipeline__routing="stochastic"), "pipeline.routing"),  # a pipeline setting without a pipeline
        (dict(pipeline__stages=2, algorithm__name="noloco"), "algorithm"),
        (dict(pipeline__stages=2, pipeline__rebalance_every=5), "pipeline.rebalance_every"),  # fixed routing
        (dict(pipeline__stages=2, pipeline__failure_prob=1.0), "pipeline.failure_prob"),
        (dict(pipeline__stages=2, model__dropout=0.1), "model.dropout"),
        (dict(pipeline__stages=2, backend__name="torch"), "pipeline.stages"),
        (dict(pipeline__stages=2, backend__name="hivemind", algorithm__name="streaming_diloco"), "algorithm"),
        (
            dict(
                pipeline__stages=2,
                backend__name="hivemind",
                pipeline__routing="stochastic",
                pipeline__rebalance_every=5,
            ),
            "pipeline.rebalance_every",
        ),  # fmt: skip
        (dict(pipeline__stages=2, backend__name="hivemind", pipeline__failure_prob=0.1), "pipeline.failure_prob"),
    ],
)
def test_bad_pipeline_settings_name_their_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(tiny_config(**overrides))


# ------------------------------------------------------------------ a real swarm's wire format and directory
@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_stage_calls_carry_activations_and_token_ids(codec):
    """What crosses between stage peers (pipeline/remote.py): activations through the activation codec, exactly as
    the sim's boundary crossing decodes them; token ids as int64; the header describes the body exactly."""
    from locoswarm.compression import make_codec
    from locoswarm.config import CompressionConfig
    from locoswarm.pipeline.remote import pack, unpack

    c = make_codec(CompressionConfig(name=codec))
    torch.manual_seed(0)
    h, ids = torch.randn(2, 8, 16), torch.randint(0, 50, (2, 8))
    entries, body, act_bytes = pack(c, [("act", h), ("ids", ids)])
    out = unpack(c, entries, body, limit=10_000)
    assert torch.equal(out[0], c.decode(c.encode(h)).reshape(h.shape)) and torch.equal(out[1], ids)
    assert act_bytes == c.encode(h).nbytes == entries[0]["bytes"] and len(body) == act_bytes + ids.numel() * 8


@pytest.mark.parametrize(
    "mangle, why",
    [
        (lambda e, b: (e, b + b"x"), "bytes past"),
        (lambda e, b: ([{**e[0], "shape": [2, 8, 15]}, e[1]], b), "expected 960"),
        (lambda e, b: ([{**e[0], "kind": "pickle"}, e[1]], b), "kind"),
        (lambda e, b: ([{**e[0], "shape": [-1]}, e[1]], b), "shape"),
        (lambda e, b: ([e[0], {**e[1], "bytes": 7}], b), "token ids|fit"),
        (lambda e, b: ("x", b), "short list"),
    ],
)
def test_a_malformed_stage_call_is_refused(mangle, why):
    from locoswarm.compression import make_codec
    from locoswarm.config import CompressionConfig
    from locoswarm.pipeline.remote import pack, unpack

    c = make_codec(CompressionConfig(name="none"))
    entries, body, _ = pack(c, [("act", torch.ones(2, 8, 16)), ("ids", torch.zeros(2, 8, dtype=torch.int64))])
    with pytest.raises(ValueError, match=why):
        unpack(c, *mangle(entries, body), limit=10_000)
    nan = pack(c, [("act", torch.full((2, 3), float("nan")))])
    with pytest.raises(ValueError, match="non-finite"):
        unpack(c, nan[0], nan[1], limit=10_000)


def test_a_joiner_picks_the_stage_with_the_least_throughput():
    from locoswarm.pipeline.remote import Listing, pick_stage, read_directory

    def peer(i, stage, rate):
        return Listing(bytes([i]), stage, i, rate, 0)

    # stage 1's two peers do 3 micro-batches/s between them, stage 0's one does 5
    assert pick_stage([peer(0, 0, 5.0), peer(1, 1, 1.0), peer(2, 1, 2.0)], 2) == 1
    assert pick_stage([peer(0, 0, 1.0), peer(1, 1, 4.0)], 2) == 0
    # unmeasured peers count as their stage's mean; with nothing measured, the stage with fewer peers
    assert pick_stage([peer(0, 0, 0.0), peer(1, 1, 0.0), peer(2, 1, 0.0)], 2) == 0
    assert pick_stage([peer(0, 0, 0.0), peer(1, 0, 0.0), peer(2, 1, 0.0)], 3) == 2  # an empty stage first
    records = {b"a": {"stage": 1, "index": 0, "rate": 2.5, "joined": 0}, b"b": {"left": True},
               b"c": {"stage": -1, "index": 0, "rate": 1.0, "joined": 0}, b"d": {"stage": 0, "index": 0,
               "rate": float("nan"), "joined": 0}, b"e": "junk"}  # fmt: skip
    seen = read_directory(lambda key: records, "run")
    assert seen == {b"a": Listing(b"a", 1, 0, 2.5, 0), b"b": None}
