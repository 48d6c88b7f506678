"""backend=torch: ``torchrun --nproc_per_node=3 -m locoswarm.cli.train backend=torch`` over gloo on 127.0.0.1
must give the sim backend's numbers (same seeds) to 1e-5 relative without compression, and leave no process;
with a codec, all-gathered payloads (topk, int8, powersgd) give sim's numbers bit for bit, all-reduced ones
(randomk, fp16) to float32 rounding or the wire dtype's own precision, and the bytes are the exchange's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import TINY_OVERRIDES

from locoswarm.checkpoint import load_checkpoint

pytestmark = [pytest.mark.network, pytest.mark.slow]

TINY = TINY_OVERRIDES  # each inner step takes milliseconds, so rounds dominate
RUN_LIMIT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state(run_dir: Path, worker: int = 0) -> list[torch.Tensor]:
    """The global model (diloco's anchor, or streaming's per-fragment anchors) and the worker's params."""
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    strategy = ckpt["strategy"]
    anchors = strategy["anchor"] if "anchor" in strategy else [a for frag in strategy["anchors"] for a in frag]
    return [*anchors, *ckpt["group"]["workers"][worker]["model"].values()]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item() for x, y in zip(a, b, strict=True))  # fmt: skip


def torchrun(nproc: int, args: list[str]) -> tuple[int, str, int]:
    """torchrun in its own session; everything it started is killed by process group afterwards."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "locoswarm.cli.train", "backend=torch", *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=RUN_LIMIT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, proc.pid


def test_torchrun_gloo_matches_sim(tmp_path):
    """(b) and (e) for the torch backend."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [*TINY, "workers=3", "seed=7", "train.max_steps=9"]
    run = tmp_path / "torch"
    rc, out, session = torchrun(3, [*overrides, f"hydra.run.dir={run}"])
    assert rc == 0, out[-4000:]

    sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    assert sim["outer_steps"] == 3
    worst = 0.0
    for r in range(3):
        rank_dir = run if r == 0 else run / f"rank-{r}"
        s = json.loads((rank_dir / "summary.json").read_text())
        assert s["status"] == "ok" and s["outer_steps"] == 3, s
        rows = [json.loads(x) for x in (rank_dir / "metrics.jsonl").read_text().splitlines() if x]
        syncs = [row for row in rows if "group_size" in row]
        assert [row["group_size"] for row in syncs] == [3, 3, 3]
        assert all(row["bytes_sent"] > 0 for row in syncs)
        worst = max(worst, rel(state(rank_dir), state(tmp_path / "sim", worker=r)))
    print(f"torch (gloo) vs sim: max relative difference {worst:.2e}")
    assert worst <= 1e-5

    # (e): nothing of the run survives it.
    end = time.monotonic() + 10
    left: list[str] = []
    while time.monotonic() < end:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(" ".join(p.info["cmdline"] or []))
        if not left:
            break
        time.sleep(0.5)
    assert not left, left


# streaming_diloco on the tiny model (2 blocks, H=3): 2 fragments synced at offsets 0 and 1, each round in flight
# for 1 inner step (the ranks train while gloo averages in the background thread), merged half-and-half. Rows
# every step, so every merge's sync row is logged.
STREAMING = [
    *(o for o in TINY if o != "algorithm=diloco"), "algorithm=streaming_diloco", "algorithm.fragments=2",
    "algorithm.overlap_steps=1", "algorithm.mixing=0.5", "train.log_interval=1",
]  # fmt: skip


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_torchrun_streaming_matches_sim(tmp_path, codec):
    """streaming_diloco over gloo equals sim (1e-5 relative): params, anchors, every logged loss and the val loss;
    uncompressed (all-reduce) and int8 (the point-to-point reduce-scatter), both run in the background thread while
    the main thread trains."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    overrides = [*STREAMING, "workers=3", "seed=7", "train.max_steps=9", f"compression={codec}"]
    run = tmp_path / "torch"
    rc, out, _ = torchrun(3, [*overrides, f"hydra.run.dir={run}"])
    assert rc == 0, out[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): CPU kernels round alike, so training matches
    try:
        sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    finally:
        torch.set_num_threads(threads)
    sim_rows = rows_of(tmp_path / "sim")
    # merges at steps 2, 4, 5, 7, 8 and 9 (the end: both fragments), each a round of all 3 ranks
    assert sim["status"] == "ok" and sim["outer_steps"] == 6, sim
    assert [(r["step"], r["fragments_merged"]) for r in sim_rows if "group_size" in r] == [
        (2, [1]), (4, [0]), (5, [1]), (7, [0]), (8, [1]), (9, [0, 1])
    ]  # fmt: skip
    worst = worst_loss = 0.0
    sent = []
    for r in range(3):
        rank_dir = run if r == 0 else run / f"rank-{r}"
        s = json.loads((rank_dir / "summary.json").read_text())
        assert s["status"] == "ok" and s["outer_steps"] == sim["outer_steps"], s
        sent.append(s["bytes_sent_total"])
        rows = rows_of(rank_dir)
        assert [(x["step"], x.get("fragments_merged"), x.get("group_size")) for x in rows] == [
            (x["step"], x.get("fragments_merged"), x.get("group_size")) for x in sim_rows
        ]
        losses = [(x["loss"], y["worker_loss"][r]) for x, y in zip(rows, sim_rows, strict=True)]
        losses.append((s["final_val_loss"], sim["final_val_loss"]))
        worst_loss = max(worst_loss, *(abs(a - b) / abs(b) for a, b in losses))
        worst = max(worst, rel(state(rank_dir), state(tmp_path / "sim", worker=r)))
    print(f"streaming {codec}: torch (gloo) vs sim: params {worst:.2e}, losses {worst_loss:.2e} relative")
    assert worst <= 1e-5 and worst_loss <= 1e-5
    # what each rank moved (int8: its own slices and chunk), on average sim's pattern
    assert sum(sent) / 3 == pytest.approx(sim["bytes_sent_total"], rel=1e-12)


# codec overrides, ranks, and the largest relative difference from sim allowed in final params and val loss.
# The sim run uses one CPU thread like each rank, so training rounds alike and any difference is the exchange's.
# All-gathered payloads are decoded and summed in rank order with sim's shares: sim's arithmetic, so 1e-6 is only
# slack (measured: 0, bit for bit). Summable ones are summed by the all-reduce (float32 rounding: 1e-5).
# fp16 / bf16 also round the all-reduced sum (and, with K > 2, every ring hop) to the wire dtype, where sim sums
# fp32 decodes: each averaged entry is off by up to one rounding, 2^-11 (fp16) or 2^-8 (bf16) of it, which the
# outer step carries into params whose norm the updates dominate. Bounds: 2^-11 and 2^-8; measured at these
# settings: fp16 1.7e-4, bf16 1.8e-3 (val loss 1.2e-6 for both), so bf16 would fail fp16's bound.
# Three ranks for topk and randomk: with two, the all-gather's (K-1) payloads equal the ring's 2(K-1)/K.
CODECS = {
    "topk-ef": (["compression=topk", "compression.ratio=0.1", "compression.error_feedback=true"], 3, 1e-6),
    "int8": (["compression=int8"], 3, 1e-6),
    "sign-ef": (["compression=sign", "compression.error_feedback=true"], 3, 1e-6),  # re-sparsifying reduce-scatter
    "blocktopk-ef": (
        ["compression=blocktopk", "compression.block_size=64", "compression.error_feedback=true"],
        3,
        1e-6,
    ),  # fmt: skip
    "int4+EF": (["compression=int4", "compression.error_feedback=true"], 2, 1e-6),
    "powersgd": (["compression=powersgd"], 2, 1e-6),
    "randomk": (["compression=randomk", "compression.ratio=0.25"], 3, 1e-5),
    "fp16": (["compression=fp16"], 2, 2.0**-11),
    "bf16": (["compression=bf16"], 2, 2.0**-8),
}


@pytest.mark.parametrize("codec", list(CODECS))
def test_torchrun_codecs_match_sim(tmp_path, codec):
    """Every rank's params and val loss are sim's (to the codec's tolerance), and the bytes are the exchange's."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.comm.exchange import LocalCodecs, allgather_bytes
    from locoswarm.comm.torch_dist import ring_bytes
    from locoswarm.compression import make_codec
    from locoswarm.trainer import train

    codec_overrides, k, tol = CODECS[codec]
    overrides = [*TINY, f"workers={k}", "seed=11", "train.max_steps=9", *codec_overrides]
    run = tmp_path / "torch"
    rc, out, _ = torchrun(k, [*overrides, f"hydra.run.dir={run}"])
    assert rc == 0, out[-4000:]
    cfg = compose_config([*overrides, "backend=sim"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): CPU kernels round alike, so training matches
    try:
        sim = train(cfg, tmp_path / "sim")
    finally:
        torch.set_num_threads(threads)
    assert sim["outer_steps"] == 3

    # what the exchange moves: every tensor's payload, all-reduced (summable) or all-gathered (the others)
    anchor = load_checkpoint(tmp_path / "sim")["strategy"]["anchor"]
    codec_ = make_codec(cfg.compression)
    payload = sum(codec_.wire_nbytes(tuple(a.shape), a.dtype) for a in anchor)
    ratio = payload / sum(4 * a.numel() for a in anchor)
    per_round = ring_bytes(k, payload) if codec_.summable or codec_.reducible else allgather_bytes(k, payload)
    per_rank = [per_round] * k
    if not codec_.summable and codec_.reducible:  # reduce-scatter: rank r sends the others their slices and its
        # reduced chunk to k-1 ranks: 2(k-1)/k mean
        sizes = LocalCodecs(cfg.compression, cfg.seed).chunk_sizes(LocalCodecs(cfg.compression, 0).encode(anchor), k)
        assert sum(sizes) == payload
        per_rank = [payload - sizes[r] + (k - 1) * sizes[r] for r in range(k)]
        assert sum(per_rank) / k == pytest.approx(per_round, rel=1e-12)
    assert ratio < 1
    assert sim["bytes_sent_total"] == pytest.approx(3 * per_round, rel=1e-12)

    worst, worst_loss = 0.0, 0.0
    for r in range(k):
        rank_dir = run if r == 0 else run / f"rank-{r}"
        s = json.loads((rank_dir / "summary.json").read_text())
        assert s["status"] == "ok" and s["outer_steps"] == 3, s
        assert s["bytes_sent_total"] == pytest.approx(3 * per_rank[r], rel=1e-12), (s["bytes_sent_total"], per_rank)
        rows = [json.loads(x) for x in (rank_dir / "metrics.jsonl").read_text().splitlines() if x]
        syncs = [row for row in rows if "group_size" in row]
        assert [row["group_size"] for row in syncs] == [k] * 3
        assert all(row["compression_ratio"] == pytest.approx(ratio, rel=1e-12) for row in syncs)
        worst = max(worst, rel(state(rank_dir), state(tmp_path / "sim", worker=r)))
        worst_loss = max(worst_loss, abs(s["final_val_loss"] - sim["final_val_loss"]) / sim["final_val_loss"])
    print(f"{codec}: torch (gloo, {k} ranks) vs sim: params {worst:.2e}, val loss {worst_loss:.2e} relative")
    assert worst <= tol and worst_loss <= tol


def test_codec_state_survives_a_resume(monkeypatch):
    """Error-feedback residuals and the round (random-k's indices) come back with the averager's state: a resumed
    averager's next round is the uninterrupted one's (a one-rank gloo group in this process)."""
    import io

    from locoswarm.comm.torch_dist import TorchDistAverager
    from locoswarm.config import Config

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    gen = torch.Generator().manual_seed(0)
    rounds = [[torch.randn(1, 12, 8, generator=gen), torch.randn(1, 20, generator=gen)] for _ in range(3)]
    weight = torch.tensor([7.0], dtype=torch.float64)
    averagers = []
    try:
        for name, ef in (("topk", True), ("randomk", False)):
            cfg = Config()
            cfg.workers, cfg.device = 1, "cpu"
            cfg.compression.name, cfg.compression.ratio, cfg.compression.error_feedback = name, 0.25, ef
            first, resumed, restarted = (TorchDistAverager(cfg) for _ in range(3))
            averagers.append(first)
            for tensors in rounds[:2]:
                first.average(tensors, weight)
            buf = io.BytesIO()
            torch.save(first.state_dict(), buf)  # as the trainer's checkpoint holds it
            buf.seek(0)
            resumed.load_state_dict(torch.load(buf, weights_only=False))
            assert resumed.round == 2
            expected = first.average(rounds[2], weight).tensors
            got = resumed.average(rounds[2], weight).tensors
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), name
            fresh = restarted.average(rounds[2], weight).tensors  # no state: residual 0, round 0
            assert not all(torch.equal(a, b) for a, b in zip(fresh, expected, strict=True)), name
    finally:
        for averager in averagers:
            averager.close()


def test_world_size_must_match_workers(tmp_path):
    """workers=K must equal torchrun's world size, and the error names the key."""
    rc, out, _ = torchrun(2, [*TINY, "workers=3", "train.max_steps=3", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert rc != 0
    assert "workers=3 is invalid" in out


@pytest.mark.parametrize("codec", ["int8", "topk", "none"])
def test_ranks_without_weight_get_the_groups_mean(tmp_path, codec):
    """A rank with weight 0 (a finished or dropped worker) sends nothing of its own but receives the mean of the
    others, as ``sim`` masks that worker: bit for bit, for the reduce-scatter (int8, whose owners are then only
    the ranks with weight) and the all-gather (topk+EF, whose skipped rank keeps its residual); to float32
    rounding for the all-reduce (none). Every rank's ``Round.members`` are the ranks with weight, as on sim."""
    from torch_average_peer import inputs

    from locoswarm.comm.sim import SimAverager
    from locoswarm.compression import codec_factory
    from locoswarm.config import CompressionConfig, NetworkConfig
    from locoswarm.netsim import NetworkModel

    weights = [[1.0, 0.0, 2.0], [0.0, 0.0, 5.0], [3.0, 1.0, 2.0]]
    spec = ";".join(",".join(str(w) for w in row) for row in weights)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(Path(__file__).with_name("torch_average_peer.py")), str(tmp_path), codec,
        spec,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=RUN_LIMIT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]

    cfg = CompressionConfig(name=codec, ratio=0.25, error_feedback=True)
    sim = SimAverager(codec_factory(cfg, 5), NetworkModel(NetworkConfig(), 3))
    for r, row in enumerate(weights):
        stacked = [torch.stack(ts) for ts in zip(*(inputs(k, r) for k in range(3)), strict=True)]
        ref = sim.average(stacked, torch.tensor(row))
        for rank in range(3):
            res = got[rank][r]
            assert res["group"] == sum(w > 0 for w in row) == ref.group_size
            assert res["members"] == [k for k, w in enumerate(row) if w > 0] == ref.members
            for mine, expected in zip(res["tensors"], ref.tensors, strict=True):
                if codec == "none":  # the all-reduce sums in its ring's order
                    torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-7)
                else:
                    assert torch.equal(mine, expected), (codec, r, rank)
        if codec == "int8":  # bytes are what each rank really moved; on average those of the sim's pattern
            sent = [got[rank][r]["sent"] for rank in range(3)]
            if ref.group_size == 1:
                assert sent[row.index(5.0)] == pytest.approx(2 * ref.payload_bytes)  # passed on to both others
            if ref.group_size == 3:
                assert sum(sent) / 3 == pytest.approx(ref.bytes_sent)


# (aggregator, codec, extra overrides): a robust aggregator all-gathers whatever the codec (int8 included), so
# every rank screens and combines the same rows as the sim: equal to it (measured: bit for bit).
ROBUST = {
    "median": (["aggregator=median"], "none"),
    "centered_clip-int8": (["aggregator=centered_clip", "aggregator.max_norm_ratio=10"], "int8"),
}


@pytest.mark.parametrize("case", list(ROBUST))
def test_torchrun_robust_aggregators_match_sim(tmp_path, case):
    """aggregator=median / centered_clip over gloo: every rank's params and val loss equal sim's (1e-5 relative),
    the rounds are all-gathered (bytes as such) and nothing is rejected on a clean run."""
    from locoswarm.cli.swarm import compose_config
    from locoswarm.trainer import train

    extra, codec = ROBUST[case]
    overrides = [*TINY, "workers=3", "seed=7", "train.max_steps=9", f"compression={codec}", *extra]
    run = tmp_path / "torch"
    rc, out, _ = torchrun(3, [*overrides, f"hydra.run.dir={run}"])
    assert rc == 0, out[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1)
    try:
        sim = train(compose_config([*overrides, "backend=sim"]), tmp_path / "sim")
    finally:
        torch.set_num_threads(threads)
    assert sim["status"] == "ok" and sim["outer_steps"] == 3
    worst = worst_loss = 0.0
    for r in range(3):
        rank_dir = run if r == 0 else run / f"rank-{r}"
        s = json.loads((rank_dir / "summary.json").read_text())
        assert s["status"] == "ok" and s["outer_steps"] == 3, s
        assert s["bytes_sent_total"] == pytest.approx(sim["bytes_sent_total"], rel=1e-12)  # the all-gather's
        syncs = [row for row in rows_of(rank_dir) if "group_size" in row]
        assert [row["group_size"] for row in syncs] == [3, 3, 3] and not any("rejected" in row for row in syncs)
        worst = max(worst, rel(state(rank_dir), state(tmp_path / "sim", worker=r)))
        worst_loss = max(worst_loss, abs(s["final_val_loss"] - sim["final_val_loss"]) / sim["final_val_loss"])
    print(f"{case}: torch (gloo) vs sim: params {worst:.2e}, val loss {worst_loss:.2e} relative")
    assert worst <= 1e-5 and worst_loss <= 1e-5


@pytest.mark.parametrize(
    ("codec", "aggregator", "ratio", "attack"),
    [
        ("none", "median", "none", "nan"),  # all-gathered: the NaN rank is screened out by everyone
        ("none", "mean", "none", "nan"),  # all-reduced: only the sum is seen, the round is rejected whole
        ("int8", "mean", "3", "scale"),  # reduce-scattered: each owner screens its chunk's pieces by norm
        ("topk", "centered_clip", "3", "scale"),  # all-gathered, screened by norm before clipping
    ],
)
def test_torch_screens_and_aggregates_like_sim(tmp_path, codec, aggregator, ratio, attack):
    """Rank 2 sends a bad contribution; every rank's result and ``Round.rejected`` (rank -> reason) are the sim's
    on the same inputs: bit for bit on the all-gather and the reduce-scatter, to float32 rounding on the
    all-reduce."""
    from torch_robust_peer import ROUNDS, inputs

    from locoswarm.comm.aggregate import build_aggregator
    from locoswarm.comm.sim import SimAverager
    from locoswarm.compression import codec_factory
    from locoswarm.config import AggregatorConfig, CompressionConfig, NetworkConfig
    from locoswarm.netsim import NetworkModel

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(Path(__file__).with_name("torch_robust_peer.py")), str(tmp_path), codec,
        aggregator, ratio, attack,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=RUN_LIMIT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]
    agg = AggregatorConfig(name=aggregator, max_norm_ratio=float(ratio) if ratio != "none" else None)
    sim = SimAverager(codec_factory(CompressionConfig(name=codec), 5), NetworkModel(NetworkConfig(), 3),
                      build_aggregator(agg), agg.max_norm_ratio)  # fmt: skip
    for r in range(ROUNDS):
        stacked = [torch.stack(ts) for ts in zip(*(inputs(k, r, 3, attack) for k in range(3)), strict=True)]
        ref = sim.average(stacked, torch.tensor([1.0, 2.0, 3.0]))
        assert ref.rejected and 2 in ref.rejected, ref.rejected  # the attack is seen
        for rank in range(3):
            res = got[rank][r]
            assert res["rejected"] == ref.rejected, (rank, r, res["rejected"], ref.rejected)
            assert res["members"] == ref.members and res["allgather"] == ref.allgather
            for mine, expected in zip(res["tensors"], ref.tensors, strict=True):
                assert torch.isfinite(mine).all()
                if codec == "none" and aggregator == "mean":
                    torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-7)
                else:
                    assert torch.equal(mine, expected), (rank, r)
