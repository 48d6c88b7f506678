"""comm/exchange.py without a network: the three ways a real backend turns peers' payloads into the weighted mean
(sum the wire buffers, reduce-scatter and re-quantise, or gather and decode) give what the sim backend computes."""

from __future__ import annotations

import pytest
import torch

from locoswarm.comm.aggregate import WeightedMean
from locoswarm.comm.exchange import LocalCodecs, allgather_bytes, owner_blocks
from locoswarm.comm.sim import SimAverager
from locoswarm.compression import codec_factory, make_codec
from locoswarm.config import CompressionConfig, NetworkConfig
from locoswarm.netsim import NetworkModel

SHAPES = [(32, 24), (24,), (500,)]
WEIGHTS = [1.0, 3.0, 2.0]
SUMMABLE = {"none", "fp16", "bf16", "randomk"}
# none: blocks of one entry (backend.allreduce=mailbox on hivemind); sign and blocktopk: re-sparsified per chunk
REDUCIBLE = {"none", "int8", "int4", "sign", "blocktopk"}


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


@pytest.mark.parametrize(
    "name", ["none", "fp16", "bf16", "int8", "int4", "sign", "topk", "blocktopk", "randomk", "powersgd"]
)
def test_the_exchange_computes_the_sims_mean(name):
    peers = [LocalCodecs(cfg(name), run_seed=3) for _ in WEIGHTS]
    assert all(p.summable == (name in SUMMABLE) for p in peers)
    assert all(p.reducible == (name in REDUCIBLE) for p in peers)
    assert make_codec(cfg(name)).summable == (name in SUMMABLE)
    shares = (torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)).tolist()
    reference = sim_rounds(name, 3)
    for r in range(3):
        payloads = [p.encode(x, round_=r) for p, x in zip(peers, peer_inputs(r), strict=True)]
        blobs = [LocalCodecs.pack(ps) for ps in payloads]
        assert all(len(b) == peers[0].packed_size(peer_inputs(r)[0]) for b in blobs)
        if name in REDUCIBLE:  # reduce-scatter, re-quantise, gather: the sim runs the same chunks, bit for bit
            n = len(peers)
            sent = [p.split(ps, n) for p, ps in zip(peers, payloads, strict=True)]  # sent[i][j]: i -> owner j
            reduced = [peers[j].reduce_owned(j, n, [s[j] for s in sent], shares, payloads[j]) for j in range(n)]
            mean = peers[1].assemble(reduced, payloads[1])
            for mine, ref in zip(mean, reference[r], strict=True):
                assert torch.equal(mine, ref), (name, r)
            return_trip = peers[0].chunk_sizes(payloads[0], n)
            assert [len(b) for b in reduced] == return_trip == [len(b) for b in sent[2]]
            assert sum(return_trip) == sum(p.nbytes for p in payloads[0])  # chunks partition the payload
            continue
        # gather-and-decode is the sim's arithmetic exactly, for every other codec
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


@pytest.mark.parametrize(("name", "levels"), [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("owners", [1, 2, 3, 5])
def test_reduce_scatter_is_the_requantised_mean(name, levels, owners):
    """Against the definition: owners' chunks together are the weighted mean of the decoded payloads, quantised
    once more, so within half a quantisation step of it (block scales from the mean's own absmax)."""
    weights = torch.rand(owners, generator=torch.Generator().manual_seed(owners)) + 0.1
    shares = (weights.double() / weights.double().sum()).tolist()
    peers = [LocalCodecs(CompressionConfig(name=name, block_size=8), run_seed=0) for _ in range(owners)]
    inputs = [[torch.randn(s) * (i + 1) for s in SHAPES] for i in range(owners)]
    payloads = [p.encode(x) for p, x in zip(peers, inputs, strict=True)]
    sent = [p.split(ps, owners) for p, ps in zip(peers, payloads, strict=True)]
    reduced = [peers[j].reduce_owned(j, owners, [s[j] for s in sent], shares, payloads[j]) for j in range(owners)]
    mean = peers[0].assemble(reduced, payloads[0])
    codec = peers[0].codecs(len(SHAPES))[0]
    for i, shape in enumerate(SHAPES):
        exact = sum(s * codec.decode(ps[i]) for s, ps in zip(shares, payloads, strict=True))
        assert mean[i].shape == exact.shape == shape
        block_absmax = exact.reshape(-1)
        block_absmax = torch.cat([block_absmax, block_absmax.new_zeros(-len(block_absmax) % 8)]).reshape(-1, 8)
        bound = (block_absmax.abs().amax(1) / (2 * levels) * (1 + 1e-5) + 1e-7).repeat_interleave(8)[: exact.numel()]
        assert ((mean[i] - exact).reshape(-1).abs() <= bound).all(), (name, owners, i)
        # and re-quantising is not a no-op: the result is on the mean's own grid, not the inputs'
    assert [lo for lo, _ in owner_blocks(10, 3)] == [0, 3, 6] and owner_blocks(10, 3)[-1] == (6, 10)


@pytest.mark.parametrize("name", ["sign", "blocktopk"])
@pytest.mark.parametrize("owners", [1, 2, 3, 5])
def test_reduce_scatter_is_the_resparsified_mean(name, owners):
    """sign and blocktopk encode each block on its own, so the owners' chunks together are exactly the codec
    applied once more to the weighted mean of the decoded payloads (the mean summed in rank order, as
    comm/aggregate.py does), and nothing is all-gathered."""
    weights = torch.rand(owners, generator=torch.Generator().manual_seed(owners)) + 0.1
    shares = (weights.double() / weights.double().sum()).tolist()
    compression = CompressionConfig(name=name, ratio=0.25, block_size=16, error_feedback=True)
    peers = [LocalCodecs(compression, run_seed=0) for _ in range(owners)]
    inputs = [[torch.randn(s) * (i + 1) for s in SHAPES] for i in range(owners)]
    payloads = [p.encode(x) for p, x in zip(peers, inputs, strict=True)]
    sent = [p.split(ps, owners) for p, ps in zip(peers, payloads, strict=True)]
    reduced = [peers[j].reduce_owned(j, owners, [s[j] for s in sent], shares, payloads[j]) for j in range(owners)]
    mean = peers[0].assemble(reduced, payloads[0])
    again = make_codec(CompressionConfig(name=name, ratio=0.25, block_size=16))  # the owners' stateless re-encode
    for i, shape in enumerate(SHAPES):
        (exact,) = WeightedMean()([[peers[0].codecs(3)[i].decode(ps[i])] for ps in payloads], shares)
        assert torch.equal(mean[i], again.decode(again.encode(exact))), (name, owners, shape)
        if owners > 1:  # re-sparsifying is not a no-op: the members' kept entries or signs differ
            assert not torch.equal(mean[i], exact)


def test_odd_int4_blocks_fall_back_to_the_all_gather():
    """int4 packs two codes per byte: with an odd block size a chunk would start mid-byte, so it is all-gathered."""
    assert not make_codec(CompressionConfig(name="int4", block_size=7)).reducible
    assert make_codec(CompressionConfig(name="int8", block_size=7)).reducible
    assert make_codec(CompressionConfig(name="int4", block_size=8, error_feedback=True)).reducible
    # sign's chunks must start on a byte of its bits too
    assert not make_codec(CompressionConfig(name="sign", block_size=12)).reducible
    assert make_codec(CompressionConfig(name="sign", block_size=16)).reducible


def test_a_bad_chunk_is_refused_before_anything_is_accumulated():
    codecs = LocalCodecs(cfg("int8"), run_seed=0)
    x = [torch.randn(s) for s in SHAPES]
    payloads = codecs.encode(x)
    chunks = codecs.split(payloads, 2)
    with pytest.raises(ValueError, match="expected"):
        codecs.reduce_owned(0, 2, [chunks[0], chunks[0][:-1]], [0.5, 0.5], payloads)
    bad = bytearray(chunks[0])
    bad[-4:] = bytes.fromhex("0000c07f")  # the chunk's last fp32 scale becomes NaN
    with pytest.raises(ValueError, match="NaN"):
        codecs.reduce_owned(0, 2, [chunks[0], bytes(bad)], [0.5, 0.5], payloads)


def test_an_untrusted_owner_drops_a_malformed_slice_and_reports_its_sender():
    """hivemind's owners (``drop_malformed``): a slice that does not parse leaves only its sender out of the chunk,
    reported for every tensor; the others' shares are renormalised, so the chunk is exactly their reduction."""
    peers = [LocalCodecs(cfg("int8"), run_seed=0) for _ in range(3)]
    payloads = [c.encode([torch.randn(s, generator=torch.Generator().manual_seed(k)) for s in SHAPES])
                for k, c in enumerate(peers)]  # fmt: skip
    slices = [c.split(p, 3)[1] for c, p in zip(peers, payloads, strict=True)]
    shares = [0.5, 0.3, 0.2]
    bad = bytearray(slices[2])
    bad[-4:] = bytes.fromhex("0000c07f")  # its last fp32 scale is NaN
    for broken in (slices[2][:-1], bytes(bad)):
        got, report = peers[1].reduce_owned_screened(1, 3, [slices[0], slices[1], broken], shares, payloads[1],
                                                     drop_malformed=True)  # fmt: skip
        want = peers[1].reduce_owned(1, 3, slices[:2], [0.5 / 0.8, 0.3 / 0.8], payloads[1])
        assert got == want
        assert len(report) == len(SHAPES) and all(set(r) == {2} for r in report), report
        assert report[0][2].startswith("malformed slice: "), report
    with pytest.raises(ValueError, match="expected"):  # the owner's own slice is never dropped: it made it
        peers[1].reduce_owned_screened(1, 3, [slices[0], slices[1][:-1], slices[2]], shares, payloads[1],
                                       drop_malformed=True)  # fmt: skip


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
