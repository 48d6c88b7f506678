"""Streaming DiLoCo: pinned to DiLoCo, to a hand-computed overlapped schedule, and to itself across a resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import build_test_group, final_params, max_rel_diff, tiny_config

from locoswarm.checkpoint import load_checkpoint
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import CompressionConfig, OuterOptimizerConfig, validate
from locoswarm.netsim import NetworkModel
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies import StreamingDiLoCo, fragment_indices
from locoswarm.trainer import train

NUMBERS = ("final_val_loss", "tokens", "outer_steps", "bytes_sent_total", "sim_seconds", "compute_utilisation")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_one_fragment_without_overlap_is_diloco(tmp_path, codec):
    """fragments=1 overlap_steps=0 mixing=0 is DiLoCo, warm-up, outer Nesterov and codec included."""
    common = dict(workers=3, train__max_steps=14, train__checkpoint_every=1, algorithm__inner_steps=4,
                  algorithm__warmup_sync_steps=2, compression__name=codec, network__step_seconds=0.01)  # fmt: skip
    diloco = train(tiny_config(algorithm__name="diloco", **common), tmp_path / "diloco")
    streaming = train(tiny_config(algorithm__name="streaming_diloco", **common), tmp_path / "streaming")
    assert diloco["status"] == streaming["status"] == "ok"
    for key in NUMBERS:
        assert streaming[key] == pytest.approx(diloco[key], rel=1e-6), key
    for w in range(3):
        assert max_rel_diff(final_params(tmp_path / "streaming", w), final_params(tmp_path / "diloco", w)) <= 1e-6
    ref, got = _rows(tmp_path / "diloco"), _rows(tmp_path / "streaming")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6)


def test_identity_is_not_vacuous(tmp_path):
    """Two fragments or an overlap do change the numbers: the tolerance above can see a difference."""
    common = dict(workers=3, train__max_steps=14, train__checkpoint_every=1, algorithm__inner_steps=4)
    ref = train(tiny_config(algorithm__name="diloco", **common), tmp_path / "diloco")
    for name, extra in {"p2": dict(algorithm__fragments=2), "tau1": dict(algorithm__overlap_steps=1)}.items():
        s = train(tiny_config(algorithm__name="streaming_diloco", **common, **extra), tmp_path / name)
        assert s["status"] == "ok"
        assert max_rel_diff(final_params(tmp_path / name), final_params(tmp_path / "diloco")) > 1e-4
        assert s["final_val_loss"] != ref["final_val_loss"]


def test_overlap_matches_a_hand_computed_schedule():
    """H=4, tau=2, alpha=0.5, one fragment, 10 steps: syncs start at 4 and 8, their averages are merged at 6 and
    10 (the end), and the end syncs once more; computed here by hand from the same workers."""
    cfg = tiny_config(workers=2, backend__execution="sequential")
    outer_cfg = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.5)
    group, base = build_test_group(cfg)
    net = NetworkModel(cfg.network, 2)
    averager = SimAverager(codec_factory(CompressionConfig(), 0), net)
    everything = [list(range(len(group.params(0))))]
    strategy = StreamingDiLoCo(group, averager, everything, outer_cfg, inner_steps=4, overlap_steps=2, mixing=0.5)
    steps = []
    while group.step < 10:
        steps.append(strategy.round(10 - group.step).steps)
    assert steps == [4, 2, 2, 2]  # events: sync at 4, merge at 6, sync at 8, merge + final sync at 10

    ref, _ = build_test_group(cfg)
    anchor = [p.detach().clone() for p in ref.params(0)]
    outer = OuterOptimizer(anchor, outer_cfg)

    def mean_pg():
        return [pg.mean(0) for pg in ref.pseudo_gradients(anchor)]

    def merge(avg):
        outer.step(avg)
        with torch.no_grad():
            for w in ref.workers:
                for p, a in zip(w.params, anchor, strict=True):
                    p.copy_(0.5 * p + 0.5 * a)

    ref.inner_steps(4)
    first = mean_pg()  # sync 1 starts at step 4 ...
    ref.inner_steps(2)
    merge(first)  # ... and is merged at step 6
    ref.inner_steps(2)
    second = mean_pg()  # sync 2 starts at step 8 ...
    ref.inner_steps(2)
    merge(second)  # ... merged at the end (step 10), where the last steps sync once more
    merge(mean_pg())
    for a, r in zip(strategy.global_params(), anchor, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
    for w, rw in zip(group.workers, ref.workers, strict=True):
        for p, r in zip(w.params, rw.params, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)


def _resume_cfg(**kw):
    return tiny_config(workers=3, algorithm__name="streaming_diloco", algorithm__fragments=2,
                       algorithm__inner_steps=4, algorithm__overlap_steps=3, algorithm__mixing=0.3,
                       train__max_steps=16, train__checkpoint_every=1, compression__name="topk",
                       compression__error_feedback=True, network__step_seconds=0.01, **kw)  # fmt: skip


def test_resume_is_exact_with_fragments_in_flight(tmp_path):
    full = train(_resume_cfg(), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(_resume_cfg(), tmp_path / "cut", stop_after_step=9)
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt["group"]["workers"][0]["step"] == 9
    assert [x["fragment"] for x in ckpt["strategy"]["in_flight"]] == [0]  # fragment 0's round started at step 8
    resumed = train(_resume_cfg(resume=True), tmp_path / "cut")
    assert resumed["status"] == full["status"] == "ok"
    for key in NUMBERS:
        assert resumed[key] == full[key], key
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    for w in range(3):
        a, b = final_params(tmp_path / "full", w), final_params(tmp_path / "cut", w)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fragments_split_blocks_strided_or_sequential():
    names = ["tok_emb.weight", "pos_emb.weight"]
    names += [f"blocks.{b}.{n}" for b in range(4) for n in ("ln1.weight", "attn.qkv.weight")]
    names += ["ln_f.weight", "ln_f.bias"]
    strided = fragment_indices(names, 2, "strided")
    assert [[names[i] for i in f] for f in strided] == [
        ["tok_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight", "blocks.0.attn.qkv.weight",
         "blocks.2.ln1.weight", "blocks.2.attn.qkv.weight"],
        ["blocks.1.ln1.weight", "blocks.1.attn.qkv.weight", "blocks.3.ln1.weight", "blocks.3.attn.qkv.weight",
         "ln_f.weight", "ln_f.bias"],
    ]  # fmt: skip
    sequential = fragment_indices(names, 2, "sequential")
    assert [names[i] for i in sequential[0]][-1] == "blocks.1.attn.qkv.weight"
    assert fragment_indices(names, 1, "strided") == [list(range(len(names)))]
    with pytest.raises(ValueError, match="algorithm.fragments"):
        fragment_indices(names, 5, "strided")


def test_streaming_cuts_peak_bytes_by_the_fragment_count(tmp_path):
    """Each sync moves one fragment: with P=2 a round's bytes are about half of DiLoCo's, the total about equal."""
    common = dict(workers=2, train__max_steps=16, algorithm__inner_steps=4, model__n_layer=4)
    train(tiny_config(algorithm__name="diloco", **common), tmp_path / "diloco")
    s = train(tiny_config(algorithm__name="streaming_diloco", algorithm__fragments=2, **common), tmp_path / "s")
    assert s["status"] == "ok"
    peak = max(b for r in _rows(tmp_path / "s") for b in r.get("fragment_bytes_sent", []))
    diloco_peak = max(r["bytes_sent"] for r in _rows(tmp_path / "diloco") if "bytes_sent" in r)
    assert 0.3 < peak / diloco_peak < 0.7


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("algorithm__fragments", 0, "algorithm.fragments"),
        ("algorithm__fragments", 3, "algorithm.fragments"),  # the tiny model has 2 blocks
        ("algorithm__overlap_steps", 3, "algorithm.overlap_steps"),  # H = 3
        ("algorithm__overlap_steps", -1, "algorithm.overlap_steps"),
        ("algorithm__mixing", 1.5, "algorithm.mixing"),
        ("algorithm__mixing", -0.1, "algorithm.mixing"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(tmp_path, key, value, match):
    cfg = tiny_config(algorithm__name="streaming_diloco", **{key: value})
    with pytest.raises(ValueError, match=match):
        train(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_streaming_keys_are_refused_by_other_algorithms():
    with pytest.raises(ValueError, match="algorithm.fragments"):
        validate(tiny_config(algorithm__name="diloco", algorithm__fragments=2))
    cfg = copy.deepcopy(tiny_config(algorithm__name="streaming_diloco", algorithm__fragments=2))
    assert validate(cfg) is cfg
