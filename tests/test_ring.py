"""The ring all-reduce of ``backend.allreduce=ring`` (comm/hivemind_gather.py): its plan, run in memory, sums what
every peer holds, and two real mailboxes sum over hivemind's P2P (three real peers against the sim:
tests/test_hivemind.py::test_three_peers_match_sim[ring])."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest
import torch

from locoswarm.comm.hivemind_gather import ring_plan


def ring_in_memory(values: list[torch.Tensor], piece: int) -> tuple[list[torch.Tensor], list[int]]:
    """Run every peer's ``ring_plan`` with queues for links, as ``PayloadMailbox.ring_sum`` does on the wire.
    Returns (each peer's result, pieces each peer sent)."""
    world, numel = len(values), values[0].numel()
    flats = [v.clone() for v in values]
    plans = [ring_plan(numel, world, r, piece) for r in range(world)]
    links = [deque() for _ in range(world)]  # links[r]: what r sent its successor, not yet read
    first = [sum(1 for *_, step in plan if step == 0) for plan in plans]
    sent = list(first)
    for r in range(world):
        links[r].extend(flats[r][a:b].clone() for a, b, _ in plans[r][: first[r]])
    read = [0] * world
    while any(links):
        for r in range(world):
            pred = (r - 1) % world
            while links[pred]:
                got = links[pred].popleft()
                a, b, step = plans[pred][read[r]]
                assert got.numel() == b - a
                if step < world - 1:
                    flats[r][a:b] += got
                else:
                    flats[r][a:b] = got
                if sent[r] < len(plans[r]):
                    assert plans[r][sent[r]][:2] == (a, b), "a peer forwards exactly the range it received"
                    links[r].append(flats[r][a:b].clone())
                    sent[r] += 1
                read[r] += 1
    assert read == [len(plans[(r - 1) % world]) for r in range(world)], "every piece sent was read"
    return flats, sent


@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize(("numel", "piece"), [(1, 4), (3, 1), (1000, 64), (1003, 37), (4096, 4096)])
def test_the_ring_plan_sums_every_peers_values(world, numel, piece):
    g = torch.Generator().manual_seed(world * 10_000 + numel)
    values = [torch.randn(numel, generator=g, dtype=torch.float64) for _ in range(world)]
    results, sent = ring_in_memory(values, piece)
    want = torch.stack(values).sum(0)
    for r in results:
        assert torch.allclose(r, want, rtol=0, atol=1e-12)
    # 2(world - 1) chunks of numel / world each: the bandwidth-optimal all-reduce's volume
    for r in range(world):
        sizes = [b - a for a, b, _ in ring_plan(numel, world, r, piece)]
        assert all(0 < s <= piece for s in sizes) and sent[r] == len(sizes)
        assert sum(sizes) <= 2 * (world - 1) * -(-numel // world)


@pytest.mark.network
def test_two_real_mailboxes_sum_by_the_ring_and_a_missing_member_fails_the_round():
    from hivemind.dht import DHT

    from locoswarm.comm.hivemind_gather import CHUNK_BYTES, GatherFailed, PayloadMailbox

    dhts = [DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)]
    dhts.append(DHT(initial_peers=dhts[0].get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))
    boxes = [PayloadMailbox(d, "ringtest") for d in dhts]
    try:
        members = [b.peer_id for b in boxes]
        g = torch.Generator().manual_seed(0)
        numel = 3 * CHUNK_BYTES // 4 + 5  # several pieces per chunk, and a short last one
        values = [torch.randn(numel, generator=g) for _ in boxes]
        before = [v.clone() for v in values]
        out: dict[int, torch.Tensor] = {}

        def run(i: int) -> None:
            out[i] = boxes[i].ring_sum(1, 0, members, values[i], deadline=time.monotonic() + 60)

        for b in boxes:
            b.expect(1, 4 * numel)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert sorted(out) == [0, 1]
        assert torch.equal(out[0], out[1]), "both hold the same sum (a ring of two adds each chunk once)"
        assert torch.allclose(out[0], values[0] + values[1], rtol=0, atol=1e-6)
        assert all(torch.equal(v, b) for v, b in zip(values, before, strict=True)), "the callers' tensors are unchanged"
        # one element between two: one member has nothing to forward and ends its stream at once, the other after
        # its only piece; both still hold the sum
        tiny = [torch.tensor([1.5]), torch.tensor([-4.0])]
        for b in boxes:
            b.expect(3, 4)
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, boxes[i].ring_sum(
            3, 0, members, tiny[i], deadline=time.monotonic() + 60))) for i in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert out[0].tolist() == out[1].tolist() == [-2.5]
        # the other member never enters round 2: the ring fails by its deadline instead of hanging
        boxes[0].expect(2, 4 * numel)
        t0 = time.monotonic()
        with pytest.raises(GatherFailed):
            boxes[0].ring_sum(2, 0, members, values[0], deadline=time.monotonic() + 3)
        assert time.monotonic() - t0 < 30
        # what a stranger's raw stream gets: a tag that does not parse, a round we are not in
        assert raw_ring_call(boxes[1], boxes[0], b"not a tag") == "PROTOCOL_VIOLATION"
        assert raw_ring_call(boxes[1], boxes[0], b"99:0") == "BAD_GROUP_ID"
        assert raw_ring_call(boxes[1], boxes[0], f"2:{10**6}".encode()) == "BAD_GROUP_ID"  # a redo past RING_REDOS
    finally:
        for b in boxes:
            b.close()
        for d in dhts:
            d.shutdown()


def raw_ring_call(sender, receiver, tag: bytes) -> str:
    """One message with ``tag`` into ``receiver``'s ring handler; the code it answers."""
    import asyncio

    from hivemind.proto import averaging_pb2, runtime_pb2

    async def stream():
        yield averaging_pb2.AveragingData(group_id=tag, tensor_part=runtime_pb2.Tensor(buffer=b"1234"))

    call = sender._p2p.call_protobuf_handler(receiver.peer_id, f"{receiver.name}_ring", stream(),
                                             averaging_pb2.AveragingData)  # fmt: skip
    reply = asyncio.run_coroutine_threadsafe(call, sender._loop).result(30)
    return averaging_pb2.MessageCode.Name(reply.code)
