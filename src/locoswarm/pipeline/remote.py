"""How a pipeline's stage peers find and call each other on a real swarm (``backend=hivemind``, pipeline.stages > 1).

Transport: hivemind's P2P protobuf handlers (one stream handler, ``<run_id>_stage<s>_call``, on a replica of the DHT's
P2P client), not its ``moe`` Server/RemoteExpert machinery. A stage peer needs its own accumulation semantics: a
micro-batch counts at a stage peer only once its driver confirms that peer's answer was the one it used, which gives
exactly-once across retries and a SIGKILLed peer; hivemind's MoE task pools apply each backward as it comes and
have no notion of a step, a driver or a confirmation.

Messages are ``averaging_pb2.AveragingData``: the first carries a JSON header in ``group_id``, every one a chunk of
the body in ``tensor_part.buffer``. The body is tensors, each announced in the header by its shape and kind:
activations and their gradients go through ``pipeline.activation_codec`` (``Codec.payload_from_bytes``), token ids
travel as int64. Nothing a caller sends is trusted: a malformed header or body is refused (PROTOCOL_VIOLATION).

Directory: every stage peer stores ``{stage, index, rate, joined}`` under ``<run_id>_pipeline`` (a signed record,
subkey its peer id) every ``REFRESH_SECONDS`` with a ``DIRECTORY_TTL`` expiry; ``rate`` is its measured micro-batches
per second. Drivers route by it, stage peers count the live drivers a step's barrier waits for by it, and a joiner
picks the stage with the least throughput by it.

Calls are served by the stage peer's main thread (``requests``): the handler only queues them, so a call never races
the main thread's optimiser step or averaging, and a call for a later step waits in the queue until the peer gets
there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from locoswarm.comm.hivemind_gather import close_replica, stop_loop
from locoswarm.compression import Codec

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
HEADER_LIMIT = 1 << 16
DIRECTORY_TTL = 10.0  # a stage peer's record lives this long unless refreshed: how long a dead peer stays listed
REFRESH_SECONDS = 2.0
CALL_TIMEOUT = 120.0  # a call waits in the peer's queue while it averages: generous, a dead peer fails at once
NOT_YET = 1 << 40  # ``joined`` of a driver that has not started: no barrier waits for it yet
KINDS = ("act", "ids")  # a body tensor: an activation or gradient (the activation codec), or token ids (int64)


class CallFailed(Exception):
    """The stage peer did not answer (gone, stuck) or refused the call."""


# ---------------------------------------------------------------------------------------------- wire format
def pack(codec: Codec, tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[list[dict], bytes, int]:
    """Tensors on the wire: (their header entries, the body, the activation bytes in it)."""
    entries, parts, act_bytes = [], [], 0
    for kind, t in tensors:
        if kind == "act":
            blob = codec.encode(t.detach().to("cpu", torch.float32)).to_bytes()
            act_bytes += len(blob)
        else:
            blob = t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
        entries.append({"kind": kind, "shape": list(t.shape), "bytes": len(blob)})
        parts.append(blob)
    return entries, b"".join(parts), act_bytes


def unpack(codec: Codec, entries: Any, body: bytes, limit: int) -> list[torch.Tensor]:
    """The tensors of a message; ValueError if the header does not describe the body."""
    if not isinstance(entries, list) or len(entries) > 4:
        raise ValueError("tensors: not a short list")
    out, offset = [], 0
    for e in entries:
        if not isinstance(e, dict) or e.get("kind") not in KINDS:
            raise ValueError(f"tensor entry {e!r:.80} has no valid kind")
        shape, size = e.get("shape"), e.get("bytes")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 < d <= limit for d in shape):
            raise ValueError(f"tensor shape {shape!r:.80} is invalid")
        if not isinstance(size, int) or not 0 <= size <= len(body) - offset or math.prod(shape) > limit:
            raise ValueError(f"tensor of {size!r:.20} bytes does not fit the message")
        blob = body[offset : offset + size]
        offset += size
        if e["kind"] == "ids":
            if size != 8 * math.prod(shape):
                raise ValueError(f"token ids of shape {shape} in {size} bytes")
            out.append(torch.frombuffer(bytearray(blob), dtype=torch.int64).reshape(shape).clone())
        else:
            t = codec.decode(codec.payload_from_bytes(blob, tuple(shape), torch.float32)).reshape(shape)
            if not torch.isfinite(t).all():
                raise ValueError("an activation or gradient with non-finite values")
            out.append(t)
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes past the announced tensors")
    return out


@dataclass
class Request:
    """A call waiting for the stage peer's main thread: reply with ``answer`` (header, tensors) or ``refuse``."""

    header: dict
    tensors: list[torch.Tensor]
    reply: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def answer(self, header: dict, tensors: Sequence[tuple[str, torch.Tensor]] = ()) -> None:
        if not self.reply.done():
            self.reply.set_result((header, list(tensors)))

    def refuse(self, why: str) -> None:
        if not self.reply.done():
            self.reply.set_exception(CallFailed(why))


@dataclass(frozen=True)
class Listing:
    """A live stage peer as the directory lists it."""

    peer: bytes  # its peer id
    stage: int
    index: int
    rate: float  # micro-batches per second it measured (0: not measured yet)
    joined: int  # the first step it takes part in (a driver owes the barrier from there)


class StageLink:
    """This stage peer's P2P end: its directory record, its handler (queueing calls for the main thread), and calls
    to other stage peers. ``store(key, value, ttl)`` / ``get(key) -> {peer id: value}``: signed DHT records."""

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        stage: int,
        index: int,
        codec: Codec,
        limit: int,
        store: Callable[[str, Any, float], None],
        get: Callable[[str], dict],
        joined: int = NOT_YET,
    ):
        """joined: a driver's first step if it knows it now (a launched driver: 0); a joiner announces it later."""
        self.run_id, self.stage, self.index, self.codec, self.limit = run_id, stage, index, codec, limit
        self._store, self._get = store, get
        self.requests: queue.Queue[Request] = queue.Queue()
        self.rate = 0.0  # our measured micro-batches per second (set by the stage peer)
        self.joined = joined  # a driver's first step, once it knows it (a joiner downloads the swarm's state first)
        self.bytes_received = 0  # activation and gradient bytes that reached us (requests and replies)
        self._suspects: dict[bytes, float] = {}
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="locoswarm-stage", daemon=True)
        self._thread.start()
        self._p2p: P2P = self._run(self._setup(dht), timeout=60)
        self.peer_id = self._p2p.peer_id.to_bytes()
        self._refresher = threading.Thread(target=self._refresh_loop, name="locoswarm-stage-dir", daemon=True)
        self._refresher.start()

    def _handler(self, stage: int) -> str:
        return f"{self.run_id}_stage{stage}_call"

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _setup(self, dht: DHT) -> P2P:
        p2p = await dht.replicate_p2p()
        await p2p.add_protobuf_handler(self._handler(self.stage), self._on_call, averaging_pb2.AveragingData,
                                       stream_input=True, stream_output=True)  # fmt: skip
        return p2p

    # ------------------------------------------------------------------ directory
    def announce(self) -> None:
        record = {"stage": self.stage, "index": self.index, "rate": float(self.rate), "joined": self.joined}
        self._store(f"{self.run_id}_pipeline", record, DIRECTORY_TTL)

    def _refresh_loop(self) -> None:
        with contextlib.suppress(Exception):
            self.announce()
        while not self._stop.wait(REFRESH_SECONDS):
            with contextlib.suppress(Exception):  # a DHT hiccup: the next refresh tries again
                self.announce()

    def directory(self) -> dict[bytes, Listing | None]:
        """The stage peers' current records: {peer id: its listing, or None if it left}."""
        return read_directory(self._get, self.run_id)

    def suspected(self, peer: bytes) -> bool:
        return peer != self.peer_id and self._suspects.get(peer, 0.0) > time.monotonic()

    def suspect(self, peer: bytes, why: str) -> None:
        log.warning("stage peer %s did not answer: %s", PeerID(peer), why[:200])
        self._suspects[peer] = time.monotonic() + DIRECTORY_TTL

    # ------------------------------------------------------------------ serving (the loop thread queues, main serves)
    async def _read(self, messages: AsyncIterator[averaging_pb2.AveragingData]) -> tuple[dict, bytes]:
        header, chunks, size = None, [], 0
        async for msg in messages:
            if header is None:
                if len(msg.group_id) > HEADER_LIMIT:
                    raise ValueError("header too long")
                header = json.loads(msg.group_id.decode())
                if not isinstance(header, dict):
                    raise ValueError("header is not a dictionary")
            chunks.append(msg.tensor_part.buffer)
            size += len(msg.tensor_part.buffer)
            if size > 16 * self.limit + HEADER_LIMIT:
                raise ValueError("message larger than any call's tensors")
        if header is None:
            raise ValueError("empty message")
        return header, b"".join(chunks)

    async def _on_call(self, messages, context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        try:
            header, body = await self._read(messages)
            tensors = unpack(self.codec, header.get("tensors", []), body, self.limit)
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("refused a stage call from %s: %s", context.remote_id, str(e)[:200])
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION, group_id=str(e)[:500].encode())
            return
        self.bytes_received += sum(e["bytes"] for e in header["tensors"] if e["kind"] == "act")
        request = Request(header, tensors)
        log.debug("queued %s from %s", {k: v for k, v in header.items() if k != "tensors"}, context.remote_id)
        self.requests.put(request)
        try:
            reply, out = await asyncio.wait_for(asyncio.wrap_future(request.reply), CALL_TIMEOUT)
        except CallFailed as e:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION, group_id=str(e)[:500].encode())
            return
        entries, blob, _ = pack(self.codec, out)
        for m in _messages({**reply, "tensors": entries}, blob, averaging_pb2.ACCEPTED):
            yield m

    # ------------------------------------------------------------------ calling
    def call(
        self, listing: Listing, header: dict, tensors: Sequence[tuple[str, torch.Tensor]] = ()
    ) -> tuple[dict, list[torch.Tensor], int]:
        """Call a stage peer: (its reply header, its tensors, activation bytes sent). Raises ``CallFailed``."""
        entries, blob, sent = pack(self.codec, tensors)
        log.debug("calling stage %d peer %d: %s", listing.stage, listing.index, header)
        try:
            reply, body = self._run(asyncio.wait_for(self._send(listing, {**header, "tensors": entries}, blob),
                                                     CALL_TIMEOUT), timeout=CALL_TIMEOUT + 5)  # fmt: skip
            out = unpack(self.codec, reply.get("tensors", []), body, self.limit)
        except CallFailed:
            raise
        except Exception as e:  # noqa: BLE001 - a dead or stuck peer: hivemind raises P2PHandlerError, timeouts, ...
            raise CallFailed(f"{type(e).__name__}: {e}") from e
        self.bytes_received += sum(e["bytes"] for e in reply.get("tensors", []) if e["kind"] == "act")
        # An answer is proof of life: a peer suspected after one failed call (hivemind's stream can end without the
        # reply of a call the peer served: seen once in ~600 calls on the testbed) goes back into routing at once.
        self._suspects.pop(listing.peer, None)
        return reply, out, sent

    async def _send(self, listing: Listing, header: dict, blob: bytes) -> tuple[dict, bytes]:
        stream = await self._p2p.iterate_protobuf_handler(
            PeerID(listing.peer), self._handler(listing.stage),
            _aiter(_messages(header, blob, averaging_pb2.ACCEPTED)), averaging_pb2.AveragingData,
        )  # fmt: skip
        async with contextlib.aclosing(stream):  # stopping early closes our side now (and its writer task)
            return await self._receive(stream)

    @staticmethod
    async def _receive(stream) -> tuple[dict, bytes]:
        reply, chunks, size, expected = None, [], 0, None
        async for msg in stream:
            if msg.code != averaging_pb2.ACCEPTED:
                raise CallFailed(f"refused: {msg.group_id.decode(errors='replace')}")
            if reply is None:
                reply = json.loads(msg.group_id.decode())
                entries = reply.get("tensors", []) if isinstance(reply, dict) else []
                expected = (
                    sum(e.get("bytes", 0) for e in entries if isinstance(e, dict)) if isinstance(entries, list) else 0
                )
            chunks.append(msg.tensor_part.buffer)
            size += len(msg.tensor_part.buffer)
            # Stop at the announced size rather than at the stream's end: a process the peer forked while our call
            # was open (hivemind starts an averager's process at a stream's first round) keeps a copy of the stream's
            # socket, so the peer closing its side does not end the stream until that process exits.
            if isinstance(expected, int) and size >= expected:
                break
        if not isinstance(reply, dict):
            raise CallFailed("no reply")
        return reply, b"".join(chunks)

    def close(self) -> None:
        if not self._loop.is_running():
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            self._store(f"{self.run_id}_pipeline", {"left": True}, DIRECTORY_TTL)
        while True:  # whoever still waits for us gets a refusal, not a timeout
            try:
                self.requests.get_nowait().refuse("the stage peer left")
            except queue.Empty:
                break
        handlers = [(self._handler(self.stage), {"stream_input": True, "stream_output": True})]
        stop_loop(self._loop, self._thread, close_replica(self._p2p, handlers))


def read_directory(get: Callable[[str], dict], run_id: str) -> dict[bytes, Listing | None]:
    """Every stage peer record of the run: {peer id: its listing, or None if it left}; a malformed one is skipped."""
    out: dict[bytes, Listing | None] = {}
    for peer, r in get(f"{run_id}_pipeline").items():
        if isinstance(r, dict) and r.get("left"):
            out[bytes(peer)] = None
            continue
        if not isinstance(r, dict):
            continue
        stage, index, rate, joined = r.get("stage"), r.get("index"), r.get("rate"), r.get("joined")
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (stage, index, joined))
        if ints and isinstance(rate, int | float) and math.isfinite(rate) and rate >= 0:
            out[bytes(peer)] = Listing(bytes(peer), stage, index, float(rate), joined)
    return out


def pick_stage(listings: Sequence[Listing], stages: int) -> int:
    """A joiner's stage: the one with the least measured throughput (SWARM's rule); unmeasured peers count as their
    stage's mean, and ties go to the stage with fewer peers, then the lower one. Stage 0 drives the data, so a joiner
    serves a later stage unless stage 0 is the slowest."""

    def load(s: int) -> tuple[float, int, int]:
        peers = [r for r in listings if r.stage == s]
        known = [r.rate for r in peers if r.rate > 0]
        mean = sum(known) / len(known) if known else 0.0
        return sum(r.rate if r.rate > 0 else mean for r in peers), len(peers), s

    return min(range(stages), key=load)


def _messages(header: dict, blob: bytes, code) -> list[averaging_pb2.AveragingData]:
    out = []
    for i, start in enumerate(range(0, max(1, len(blob)), CHUNK_BYTES)):
        out.append(averaging_pb2.AveragingData(code=code, group_id=json.dumps(header).encode() if i == 0 else b"",
                                               tensor_part=runtime_pb2.Tensor(buffer=blob[start : start + CHUNK_BYTES])))  # fmt: skip
    return out


async def _aiter(items):
    for x in items:
        yield x
