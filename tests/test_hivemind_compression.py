"""Compression on backend=hivemind: 3 real peer processes on 127.0.0.1 average pseudo-gradients through their
codecs, two rounds each, and must agree with the sim backend's ``SimAverager`` on the same inputs.

all-gathered codecs (topk, powersgd, ...) decode every payload on every peer in rank order, and reduce-scattered
ones (int8, int4) re-quantise each chunk's mean at its owner exactly as sim does, so both equal sim bit for bit; butterfly codecs (none, randomk) equal it to float32 rounding; fp16 is compressed a second
time by hivemind (the averaged part on its way back), so it is within fp16 rounding of the mean.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import pytest
import torch

from locoswarm.comm.exchange import LocalCodecs
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory
from locoswarm.config import BackendConfig, CompressionConfig, NetworkConfig
from locoswarm.netsim import NetworkModel

pytestmark = [pytest.mark.network, pytest.mark.slow]

PEERS = 3
ROUNDS = 2
SHAPES = [(64, 48), (48,), (3000,)]  # a matrix (PowerSGD factorises it), a vector, a longer vector
WEIGHTS = [1.0, 2.0, 3.0]  # tokens per peer: shares 1/6, 2/6, 3/6


def inputs(rank: int, round_: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * round_ + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def compression(name: str) -> CompressionConfig:
    c = CompressionConfig(name=name, ratio=0.25, rank=2)
    c.error_feedback = name in ("topk", "powersgd", "sign")
    return c


def backend_cfg(run_id: str, initial_peers: list[str]) -> BackendConfig:
    return BackendConfig(
        name="hivemind",
        run_id=run_id,
        initial_peers=initial_peers,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        matchmaking_time=6.0,  # all three peers start together; a fixed window keeps the test simple
        first_round_timeout=60.0,
    )


def peer(rank: int, name: str, run_id: str, peers_q, out_q) -> None:
    from locoswarm.comm.hivemind import HivemindAverager

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)  # hivemind forks its background processes, as in a locoswarm-swarm peer
    averager = None
    try:
        initial = [] if rank == 0 else peers_q.get(timeout=120)
        averager = HivemindAverager(
            backend_cfg(run_id, initial),
            workers=PEERS,
            rank=rank,
            compression=compression(name),
            seed=7,
        )
        if rank == 0:
            for _ in range(PEERS - 1):
                peers_q.put(averager.maddrs)
        results = []
        for r in range(ROUNDS):
            out = averager.average([t.unsqueeze(0) for t in inputs(rank, r)], torch.tensor([WEIGHTS[rank]]))
            results.append(
                {
                    # numpy arrays travel by value; torch tensors would be shared through file descriptors that keep
                    # this process alive (multiprocessing's resource sharer) until a 60 s timeout
                    "tensors": [t.numpy().copy() for t in out.tensors],
                    "group": out.group_size,
                    "bytes_sent": out.bytes_sent,
                    "payload_bytes": out.payload_bytes,
                    "allgather": out.allgather,
                }
            )
        out_q.put((rank, results, None))
    except BaseException:  # noqa: BLE001 - report to the test instead of dying silently
        out_q.put((rank, None, traceback.format_exc()))
    finally:
        if averager is not None:
            averager.close()


def sim_reference(name: str) -> list[list[torch.Tensor]]:
    avg = SimAverager(codec_factory(compression(name), 7), NetworkModel(NetworkConfig(), PEERS))
    out = []
    for r in range(ROUNDS):
        stacked = [torch.stack(ts) for ts in zip(*(inputs(k, r) for k in range(PEERS)), strict=True)]
        out.append(avg.average(stacked, torch.tensor(WEIGHTS)).tensors)
    return out


@pytest.mark.parametrize(
    ("name", "tolerance", "exchange"),
    [
        ("topk", 0.0, "gather"),  # all-gathered: the sim's arithmetic, bit for bit
        ("int8", 0.0, "reduce"),  # reduce-scattered and re-quantised per chunk: the sim's chunks, bit for bit
        ("sign", 0.0, "reduce"),  # re-sparsified per chunk, the same way
        ("blocktopk", 0.0, "reduce"),
        ("powersgd", 0.0, "gather"),
        ("randomk", 1e-6, "butterfly"),  # butterfly over the k shared-index values: float32 rounding of the sum
        ("fp16", 2**-10, "butterfly"),  # hivemind re-casts the averaged part to fp16: one more rounding of the mean
    ],
)
def test_peers_average_through_their_codecs_like_sim(name, tolerance, exchange):
    ctx = mp.get_context("spawn")
    peers_q, out_q = ctx.Queue(), ctx.Queue()
    run_id = f"cmp{os.getpid()}{name}"
    procs = [ctx.Process(target=peer, args=(r, name, run_id, peers_q, out_q)) for r in range(PEERS)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(PEERS):
            rank, results, error = out_q.get(timeout=300)
            assert error is None, f"peer {rank} failed:\n{error}"
            got[rank] = results
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    reference = sim_reference(name)
    for rank, results in got.items():
        for r, res in enumerate(results):
            assert res["group"] == PEERS, (rank, r, res["group"])
            assert res["allgather"] == (exchange == "gather")
            payload = res["payload_bytes"]
            if exchange == "reduce":  # its slices to the 2 other owners, then its reduced chunk to both of them
                like = LocalCodecs(compression(name), 7).encode(inputs(rank, r))
                own = LocalCodecs(compression(name), 7).chunk_sizes(like, PEERS)[rank]
                expected = payload - own + (PEERS - 1) * own
            elif exchange == "gather":
                expected = (PEERS - 1) * payload
            else:
                expected = 2 * (PEERS - 1) / PEERS * payload
            assert res["bytes_sent"] == pytest.approx(expected)
            assert res["payload_bytes"] < sum(torch.Size(s).numel() * 4 for s in SHAPES)  # really compressed
            for mine, ref in zip(map(torch.from_numpy, res["tensors"]), reference[r], strict=True):
                err = ((mine - ref).abs().max() / ref.abs().max()).item()
                assert err <= tolerance, (name, rank, r, err)
    # every peer holds the same average (fp16: each part's owner may keep its part un-recast)
    for r in range(ROUNDS):
        for i in range(len(SHAPES)):
            a = torch.from_numpy(got[0][r]["tensors"][i])
            for k in got:
                assert ((torch.from_numpy(got[k][r]["tensors"][i]) - a).abs().max() / a.abs().max()).item() <= tolerance
