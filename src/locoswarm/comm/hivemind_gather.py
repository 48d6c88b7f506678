"""Point-to-point exchange of codec payloads among a hivemind group, over the libp2p connections the DHT already
holds: the all-gather of non-summable payloads and the two stages of the re-quantising reduce-scatter of
reducible ones (``comm/exchange.py``).

Hivemind's butterfly all-reduce can only carry codecs its receivers can decode (``deserialize_torch_tensor``
dispatches on a closed protobuf enum: none, fp16, 8-bit quantile/uniform/blockwise), and it averages what it
receives, so a codec whose payloads cannot be summed (top-k's indices, int8's per-block scales, PowerSGD's
factors) needs another route. ``PayloadMailbox`` is that route: once hivemind's matchmaking has formed a group,
each peer pushes its bytes for each groupmate (the same packed payload to all for an all-gather; a different
chunk to each owner for a reduce-scatter) through a protobuf stream handler on a replica of the DHT's P2P client
(public hivemind API: ``DHT.replicate_p2p``, ``P2P.add_protobuf_handler``, ``P2P.call_protobuf_handler``), and
waits until it holds what it expects from each groupmate for that round and stage.

The sender of a payload is the libp2p peer id of the connection (authenticated by libp2p), not a field the
sender fills in. Payloads for rounds already finished, or for a round this peer has not entered (no ``expect``),
are dropped on arrival without being read. A payload larger than the round allows is read no further than one
byte past the limit and kept as that prefix: it counts as arrived (no one waits for it until the deadline) and
fails the decoder's exact length check (``LocalCodecs``), so its sender alone is dropped from the round, and a
sender cannot make us buffer more than the limit.

The mailbox also runs ``backend.allreduce=ring``: a pipelined ring all-reduce of fp32 values (``ring_sum``) over one
stream to the next member, the exchange that comes nearest link rate (benchmarks/bench_allreduce.py).

The mailbox also serves this peer's committed phase start states to groupmates that verify it (``serve``,
``fetch``; verify.py's ``PeerReplay``): a request names a round, the answer streams the bytes committed for it
(the last two rounds are kept), and the asker reads no more than it expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # stream messages stay far below the daemon's 4 MiB message limit
RING_REDOS = 8  # a ring stream for a redo past this is refused (bounds what one round may hold per sender)


def ring_plan(numel: int, world: int, rank: int, piece: int) -> list[tuple[int, int, int]]:
    """A pipelined ring all-reduce of ``numel`` elements among ``world`` peers: the (start, stop, step) element
    ranges that the peer at ``rank`` in the ring sends its successor, in order, ``piece`` elements or fewer each, over
    2(world - 1) steps of one chunk each. In reduce-scatter step s < world - 1 it sends chunk (rank - s); in
    all-gather step s >= world - 1, chunk (rank + world - s). Its step s + 1 sends the range it received in step s
    (its predecessor's step s): the running sum with its own values added, then, from the last reduce-scatter step
    on, the finished sum. So what a peer receives is ``ring_plan(..., rank - 1, ...)``."""
    bounds = [numel * j // world for j in range(world + 1)]
    plan = []
    for step in range(2 * (world - 1)):
        chunk = (rank - step) % world if step < world - 1 else (rank + world - step) % world
        plan += [(a, min(a + piece, bounds[chunk + 1]), step) for a in range(bounds[chunk], bounds[chunk + 1], piece)]
    return plan


async def close_replica(p2p: P2P, handlers: Sequence[tuple[str, dict]]) -> None:
    """Remove our protobuf handlers (name, its stream flags), close a replica of the DHT's P2P client (our connections
    to the daemon, never the daemon itself) and cancel whatever still runs in this loop."""
    for name, flags in handlers:
        with contextlib.suppress(Exception):
            await p2p.remove_protobuf_handler(name, **flags)
    await p2p.shutdown()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, shutdown) -> None:
    """Run the coroutine ``shutdown`` in ``loop`` (at most 10 s), then stop the loop and join its thread."""
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(shutdown, loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    if not thread.is_alive():
        loop.close()


class GatherFailed(Exception):
    """Some groupmate's payload did not arrive (or ours could not be delivered) before the deadline."""


class PayloadMailbox:
    """Sends this peer's round payload to groupmates and collects theirs (see the module docstring)."""

    def __init__(self, dht: DHT, name: str):
        self.name = name
        self._cond = threading.Condition()
        self._inbox: dict[tuple[int, int, str, bytes], bytes] = {}  # (round, redo, stage, sender) -> payload
        self._expect: dict[int, int] = {}  # round -> the largest payload we accept (set before a round's exchange)
        self._oldest_round = 0  # payloads for earlier rounds are dropped
        self._evidence: dict[int, bytes] = {}  # round -> the start state we committed to in it (``serve``)
        # ring all-reduce (``ring_sum``): (round, redo, sender) -> its stream's messages, in the loop's thread
        self._rings: dict[tuple[int, int, bytes], asyncio.Queue] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="locoswarm-gather", daemon=True)
        self._thread.start()
        self._p2p: P2P = self._run(self._setup(dht), timeout=60)
        self.peer_id = self._p2p.peer_id

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _setup(self, dht: DHT) -> P2P:
        p2p = await dht.replicate_p2p()
        await p2p.add_protobuf_handler(self.name, self._receive, averaging_pb2.AveragingData, stream_input=True)
        await p2p.add_protobuf_handler(f"{self.name}_evidence", self._answer, averaging_pb2.AveragingData,
                                       stream_output=True)  # fmt: skip
        await p2p.add_protobuf_handler(f"{self.name}_ring", self._receive_ring, averaging_pb2.AveragingData,
                                       stream_input=True)  # fmt: skip
        return p2p

    # ------------------------------------------------------------------ receiving (runs in the loop thread)
    async def _receive(
        self, requests: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> averaging_pb2.AveragingData:
        header: tuple[int, int, str] | None = None
        size = 0
        chunks: list[bytes] = []
        received = 0
        async for msg in requests:
            if header is None:
                try:
                    round_, redo, stage = msg.group_id.decode().split(":")
                    header = (int(round_), int(redo), stage)
                except ValueError:
                    return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
                with self._cond:
                    limit = self._expect.get(header[0])
                    if header[0] < self._oldest_round or limit is None:  # finished, or a round we are not in
                        log.debug("dropping a payload for round %s from %s", header, context.remote_id)
                        return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
                size = limit
            chunks.append(msg.tensor_part.buffer)
            received += len(msg.tensor_part.buffer)
            if received > size:
                break  # too long for the round: read no further (see the module docstring)
        if header is None:
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        blob = b"".join(chunks)
        oversized = len(blob) > size
        if oversized:
            log.debug("a payload for round %s from %s exceeds %d bytes", header, context.remote_id, size)
            blob = blob[: size + 1]  # arrived, and refused by the decoder's length check
        with self._cond:
            if header[0] < self._oldest_round:  # the round ended while it streamed in
                return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            self._inbox[(*header, context.remote_id.to_bytes())] = blob
            self._cond.notify_all()
        return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID if oversized else averaging_pb2.ACCEPTED)

    async def _answer(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        try:
            blob = self._evidence.get(int(request.group_id.decode()))
        except ValueError:
            blob = None
        if blob is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        for start in range(0, max(1, len(blob)), CHUNK_BYTES):
            yield averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=blob[start : start + CHUNK_BYTES]))

    # ------------------------------------------------------------------ ring all-reduce
    def _ring_queue(self, key: tuple[int, int, bytes]) -> asyncio.Queue:
        if key not in self._rings:
            self._rings[key] = asyncio.Queue()
        return self._rings[key]

    async def _receive_ring(
        self, requests: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> averaging_pb2.AveragingData:
        """A predecessor's ring stream: its messages go to the queue ``ring_sum`` reads, which checks every piece's
        size against the plan. Refused unread: a round we are not in, a redo past ``RING_REDOS``. Read no further
        than the round's limit (twice the values: every piece passes through a peer at most twice)."""
        queue, received, limit = None, 0, 0
        async for msg in requests:
            if queue is None:
                try:
                    round_, redo = (int(x) for x in msg.group_id.decode().split(":"))
                except ValueError:
                    return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
                with self._cond:
                    size = self._expect.get(round_)
                if round_ < self._oldest_round or size is None or not 0 <= redo < RING_REDOS:
                    return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
                queue, limit = self._ring_queue((round_, redo, context.remote_id.to_bytes())), 2 * size
            received += len(msg.tensor_part.buffer)
            if received > limit:
                queue.put_nowait(None)  # the reader fails the round: a piece it did not plan for
                return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            queue.put_nowait(msg.tensor_part.buffer)
        if queue is None:
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        queue.put_nowait(None)  # the end of the stream
        return averaging_pb2.AveragingData(code=averaging_pb2.ACCEPTED)

    def ring_sum(
        self,
        round_: int,
        redo: int,
        members: Sequence[PeerID],
        values: torch.Tensor,
        deadline: float,
        in_place: bool = False,
    ) -> torch.Tensor:
        """The sum of every member's ``values`` (fp32, one flat tensor of the same length on every member) by a ring
        all-reduce (``ring_plan``): one stream to the next member in ``members`` for the whole round, each piece sent
        on as soon as it has arrived from the previous one. Every link carries one long-lived flow each way, as in
        gloo's ring; the all-to-all of the reduce-scatter (n - 1 flows per link, and idle links between its two
        stages) stays well below link rate (benchmarks/bench_allreduce.py). Each chunk is summed in ring order, so
        the result matches another order to float rounding, as hivemind's butterfly does. A member that fails, sends
        a piece of the wrong size or misses ``deadline`` fails it (``GatherFailed``). ``in_place``: sum into
        ``values`` (a contiguous fp32 tensor the caller gives up) instead of a copy."""
        members = list(members)
        world, rank = len(members), members.index(self.peer_id)
        if world == 1 or values.numel() == 0:  # nothing to send (every member has the same length)
            return values.clone()
        flat = values.detach().to(torch.float32).contiguous()
        if not in_place and flat.data_ptr() == values.data_ptr():
            flat = flat.clone()  # the caller's tensor stays as it was
        succ, pred = members[(rank + 1) % world], members[(rank - 1) % world]
        piece = CHUNK_BYTES // 4
        mine = ring_plan(flat.numel(), world, rank, piece)
        theirs = ring_plan(flat.numel(), world, (rank - 1) % world, piece)
        tag = f"{round_}:{redo}".encode()

        async def run() -> None:
            outbox: asyncio.Queue = asyncio.Queue()

            async def messages() -> AsyncIterator[averaging_pb2.AveragingData]:
                first = True
                while (buffer := await outbox.get()) is not None:
                    yield averaging_pb2.AveragingData(group_id=tag if first else b"",
                                                      tensor_part=runtime_pb2.Tensor(buffer=buffer))  # fmt: skip
                    first = False

            sending = asyncio.ensure_future(
                self._p2p.call_protobuf_handler(succ, f"{self.name}_ring", messages(), averaging_pb2.AveragingData)
            )
            inbox = self._ring_queue((round_, redo, pred.to_bytes()))
            t0, first_in = time.monotonic(), None
            try:
                first = sum(1 for *_, step in mine if step == 0)
                for start, stop, _ in mine[:first]:
                    outbox.put_nowait(flat[start:stop].numpy().tobytes())
                if first == len(mine):  # nothing to forward (fewer elements than members): end the stream now
                    outbox.put_nowait(None)
                for k, (start, stop, step) in enumerate(theirs):
                    buffer = await inbox.get()
                    first_in = first_in or time.monotonic() - t0
                    if buffer is None or len(buffer) != 4 * (stop - start):
                        raise GatherFailed(f"ring: {pred}'s stream ended or sent a piece of the wrong size")
                    got = torch.frombuffer(bytearray(buffer), dtype=torch.float32)
                    if step < world - 1:
                        flat[start:stop] += got  # a running sum: ours added
                    else:
                        flat[start:stop] = got  # the finished sum of a chunk
                    if first + k < len(mine):
                        outbox.put_nowait(flat[start:stop].numpy().tobytes())
                        if first + k + 1 == len(mine):
                            # all ours is queued: end the stream now, so its reply comes while we still receive (the
                            # successor's reader counts pieces and never waits for the end)
                            outbox.put_nowait(None)
                received = time.monotonic() - t0
                try:
                    reply = await sending
                except ValueError as e:  # hivemind's asingle(): the reply was lost as the stream closed (``_send``)
                    if "empty iterable" not in str(e):
                        raise
                    return
                if reply.code != averaging_pb2.ACCEPTED:
                    raise GatherFailed(
                        f"ring: {succ} refused our stream ({averaging_pb2.MessageCode.Name(reply.code)})"
                    )
                log.debug("ring of %d: %d pieces out; first piece in after %.2fs, all in after %.2fs, all out after "
                          "%.2fs", world, len(mine), first_in or 0.0, received, time.monotonic() - t0)  # fmt: skip
            finally:
                sending.cancel()
                self._rings.pop((round_, redo, pred.to_bytes()), None)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as e:
            future.cancel()
            raise GatherFailed("ring: the round's deadline passed") from e
        except GatherFailed:
            raise
        except Exception as e:  # noqa: BLE001 - a broken stream, a dead successor
            raise GatherFailed(f"ring: {type(e).__name__}: {e}") from e
        return flat

    # ------------------------------------------------------------------ committed start states (verification)
    def serve(self, round_: int, blob: bytes) -> None:
        """Answer requests for ``round_`` with ``blob`` (rounds before ``round_ - 1`` are forgotten)."""
        with self._cond:
            self._evidence[round_] = blob
            for r in [r for r in self._evidence if r < round_ - 1]:
                del self._evidence[r]

    def fetch(self, peer: PeerID, round_: int, limit: int, timeout: float) -> bytes | None:
        """What ``peer`` serves for ``round_``: None if it has nothing, does not answer within ``timeout`` seconds or
        sends more than ``limit`` bytes (read no further)."""

        async def ask() -> bytes | None:
            request = averaging_pb2.AveragingData(group_id=str(round_).encode())
            stream = await self._p2p.iterate_protobuf_handler(peer, f"{self.name}_evidence", request,
                                                              averaging_pb2.AveragingData)  # fmt: skip
            parts, size = [], 0
            async for msg in stream:
                if msg.code == averaging_pb2.BAD_GROUP_ID:
                    return None
                parts.append(msg.tensor_part.buffer)
                size += len(msg.tensor_part.buffer)
                if size > limit:
                    return None
            return b"".join(parts)

        try:
            return self._run(asyncio.wait_for(ask(), timeout), timeout=timeout + 5)
        except Exception as e:  # noqa: BLE001 - a dead peer, a broken stream, a timeout: it did not serve
            log.info("no start state from %s for round %d: %s", peer, round_, f"{type(e).__name__}: {e}"[:200])
            return None

    # ------------------------------------------------------------------ sending
    async def _send(self, peer: PeerID, tag: bytes, blob: bytes) -> None:
        async def messages() -> AsyncIterator[averaging_pb2.AveragingData]:
            for i, start in enumerate(range(0, max(1, len(blob)), CHUNK_BYTES)):
                part = runtime_pb2.Tensor(buffer=blob[start : start + CHUNK_BYTES])
                yield averaging_pb2.AveragingData(group_id=tag if i == 0 else b"", tensor_part=part)

        try:
            reply = await self._p2p.call_protobuf_handler(peer, self.name, messages(), averaging_pb2.AveragingData)
        except ValueError as e:
            # hivemind's asingle(): the stream ended with no reply at all. Seen on shaped links with multi-MB
            # payloads in a second round: the receiver had stored the whole payload and answered ACCEPTED, and the
            # answer was lost as the stream closed (bench_allreduce, backend.allreduce=mailbox). Every byte was
            # handed to our daemon (hivemind raises the writer's own error otherwise), so count it as delivered: if
            # it was not, the receiver misses it and its round fails as it would have anyway, and the group's
            # agreement check catches any split. Giving up here instead failed the round for the whole group.
            if "empty iterable" not in str(e):
                raise
            log.info("%s: no reply to our payload (stream closed); counted as delivered", peer)
            return
        if reply.code != averaging_pb2.ACCEPTED:
            raise GatherFailed(f"{peer} refused our payload ({averaging_pb2.MessageCode.Name(reply.code)})")

    async def _send_all(self, tag: bytes, blobs: dict[PeerID, bytes]) -> None:
        await asyncio.gather(*(self._send(p, tag, blob) for p, blob in blobs.items()))

    # ------------------------------------------------------------------ one round
    def expect(self, round_: int, size: int) -> None:
        """Accept payloads of at most ``size`` bytes for ``round_`` (and forget rounds before it)."""
        with self._cond:
            self._expect[round_] = size
            self._oldest_round = round_
            for key in [k for k in self._inbox if k[0] < round_]:
                del self._inbox[key]
            for r in [r for r in self._expect if r < round_]:
                del self._expect[r]
        self._loop.call_soon_threadsafe(self._forget_rings, round_)

    def expecting(self, round_: int) -> bool:
        """Whether ``round_`` is the round this mailbox was last told to expect (its payloads went through it)."""
        with self._cond:
            return round_ in self._expect and round_ >= self._oldest_round

    def _forget_rings(self, round_: int) -> None:
        for key in [k for k in self._rings if k[0] < round_]:
            del self._rings[key]

    def exchange(
        self, round_: int, redo: int, group: Sequence[PeerID], blob: bytes, deadline: float
    ) -> dict[PeerID, bytes]:
        """All-gather: send ``blob`` to every other member of ``group`` and return every member's (ours included).
        ``deadline``: ``time.monotonic()`` by which all must have arrived, else ``GatherFailed``."""
        others = [p for p in group if p != self.peer_id]
        got = self.send_and_receive(round_, redo, "gather", dict.fromkeys(others, blob), others, deadline)
        got[self.peer_id] = blob
        return got

    def send_and_receive(
        self,
        round_: int,
        redo: int,
        stage: str,
        send: dict[PeerID, bytes],
        receive_from: Iterable[PeerID],
        deadline: float,
        partial: bool = False,
    ) -> dict[PeerID, bytes]:
        """Send ``send[p]`` to each peer p and wait for one payload of this round and ``stage`` from each of
        ``receive_from``; returns them by sender. Misses ``deadline`` (``time.monotonic()``): ``GatherFailed``, or
        with ``partial`` what arrived by then (and ours go on being sent in the background)."""
        expected = [p for p in receive_from if p != self.peer_id]
        tag = f"{round_}:{redo}:{stage}".encode()
        send = {p: b for p, b in send.items() if p != self.peer_id}
        sending = asyncio.run_coroutine_threadsafe(self._send_all(tag, send), self._loop)
        keys = {p: (round_, redo, stage, p.to_bytes()) for p in expected}
        with self._cond:
            arrived = self._cond.wait_for(
                lambda: all(k in self._inbox for k in keys.values()), timeout=max(0.0, deadline - time.monotonic())
            )
            got = {p: self._inbox.pop(k) for p, k in keys.items() if k in self._inbox}
        if partial:
            return got
        if not arrived:
            sending.cancel()
            missing = [str(p) for p in expected if p not in got]
            raise GatherFailed(
                f"{stage}: no payload from {len(missing)} of {len(expected)} groupmates: {', '.join(missing)}"
            )
        try:
            sending.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as e:  # they sent us theirs, but ours did not all get through: the group cannot agree
            raise GatherFailed(f"{stage}: sending our payload failed: {type(e).__name__}: {e}") from e
        return got

    def close(self) -> None:
        if not self._loop.is_running():
            return
        handlers = [(self.name, {"stream_input": True}), (f"{self.name}_evidence", {"stream_output": True}),
                    (f"{self.name}_ring", {"stream_input": True})]  # fmt: skip
        stop_loop(self._loop, self._thread, close_replica(self._p2p, handlers))
        with self._cond:
            self._inbox.clear()
