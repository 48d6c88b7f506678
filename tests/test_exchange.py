"""comm/exchange.py without a network: the two ways a real backend turns peers' payloads into the weighted mean
(sum the wire buffers, or gather and decode) give what the sim backend computes."""

from __future__ import annotations

import pytest
import torch

from locoswarm.comm.exchange import LocalCodecs, allgather_bytes
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory, make_codec
from locoswarm.config import CompressionConfig, NetworkConfig
from locoswarm.netsim import NetworkModel

SHAPES = [(32, 24), (24,), (500,)]
WEIGHTS = [1.0, 3.0, 2.0]
SUMMABLE = {"none", "fp16", "bf16", "randomk"}


def cfg(name: str) -> CompressionConfig:
    return CompressionConfig(name=name, ratio=0.2, rank=2, error_feedback=name in ("topk", "sign", "powersgd"))


def peer_inputs(round_: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(round_)
    return [[torch.randn(s, generator=g) for s in SHAPES] for _ in WEIGHTS]


def sim_rounds(name: str, rounds: int) -> list[list[torch.Tensor]]:
    avg = SimAverager(codec_factory(cfg(name), 3), NetworkModel(NetworkConfig(), len(WEIGHTS)))
    out = []
    for r in range(rounds):
        stacked = [torch.stack(ts) for ts in zip(*peer_inputs(r), strict=True)]
        out.append(avg.average(stacked, torch.tensor(WEIGHTS)).tensors)
    return out


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "int8", "int4", "sign", "topk", "randomk", "powersgd"])
def test_the_exchange_computes_the_sims_mean(name):
    peers = [LocalCodecs(cfg(name), run_seed=3) for _ in WEIGHTS]
    assert all(p.summable == (name in SUMMABLE) for p in peers)
    assert make_codec(cfg(name)).summable == (name in SUMMABLE)
    shares = (torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)).tolist()
    reference = sim_rounds(name, 3)
    for r in range(3):
        payloads = [p.encode(x, round_=r) for p, x in zip(peers, peer_inputs(r), strict=True)]
        blobs = [LocalCodecs.pack(ps) for ps in payloads]
        assert all(len(b) == peers[0].packed_size(peer_inputs(r)[0]) for b in blobs)
        # gather-and-decode is the sim's arithmetic exactly, for every codec
        gathered = peers[1].decode_mean(blobs, shares, payloads[1])
        for mine, ref in zip(gathered, reference[r], strict=True):
            assert torch.equal(mine, ref), (name, r)
        if name in SUMMABLE:  # summing the wire buffers: equal up to rounding in the wire dtype
            wire = [p.wire_values(ps) for p, ps in zip(peers, payloads, strict=True)]
            summed = sum(w.double() * s for w, s in zip(wire, shares, strict=True))
            decoded = peers[0].decode_values(summed.to(wire[0].dtype), payloads[0])
            tol = {"fp16": 2**-10, "bf16": 2**-7}.get(name, 1e-6)
            for mine, ref in zip(decoded, reference[r], strict=True):
                assert ((mine - ref).abs().max() / ref.abs().max()).item() <= tol, (name, r)


def test_a_bad_blob_is_refused_before_anything_is_accumulated():
    codecs = LocalCodecs(cfg("topk"), run_seed=0)
    x = [torch.randn(s) for s in SHAPES]
    payloads = codecs.encode(x, round_=0)
    blob = LocalCodecs.pack(payloads)
    with pytest.raises(ValueError, match="expected"):
        codecs.decode_mean([blob, blob[:-1]], [0.5, 0.5], payloads)
    bad = bytearray(blob)
    bad[:4] = (10**9).to_bytes(4, "little")  # the first top-k index far outside the tensor
    with pytest.raises(ValueError, match="outside"):
        codecs.decode_mean([blob, bytes(bad)], [0.5, 0.5], payloads)


def test_random_k_follows_the_agreed_round_not_its_own_count():
    """A peer that skipped rounds (or joined late) must pick the group's indices: they are keyed by the round."""
    late, punctual = LocalCodecs(cfg("randomk"), 1), LocalCodecs(cfg("randomk"), 1)
    x = [torch.randn(s) for s in SHAPES]
    for r in range(3):
        punctual.encode(x, round_=r)
    a, b = late.encode(x, round_=3), punctual.encode(x, round_=3)
    assert all(torch.equal(p.buffers["values"], q.buffers["values"]) for p, q in zip(a, b, strict=True))


def test_allgather_bytes():
    assert allgather_bytes(1, 100) == 0
    assert allgather_bytes(4, 100) == 300
