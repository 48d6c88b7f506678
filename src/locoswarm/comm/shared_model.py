"""async_diloco's global model on a real swarm (``backend=hivemind``): held by one live peer, versioned, reached over
hivemind's P2P, and surviving its holder leaving.

The holder
    One peer holds the global model φ, its version (updates applied so far) and the outer optimiser's state. Peers
    find it through the DHT: under ``<run_id>_model`` a peer that holds stores ``{rank, version}`` (subkey: its
    signed peer id, a short expiration, refreshed while it holds); the holder is the live claim with the highest
    version, ties to the lowest rank, so every peer that reads the same claims picks the same holder. The first
    peer to find no claim takes the model it starts from (every peer starts from the same seeded φ at version 0);
    of peers that claim together, the rule picks one and the others concede.

A phase
    A worker ``push``es its encoded pseudo-gradient (the run's codec) with the version it started from, its tokens,
    steps and seconds; the holder decodes it and applies it at once (the strategy's ``apply``: the outer step on φ;
    staleness = the version now − the version it started from), and answers with the new version and whatever the
    rule adds (async_diloco's next H). The worker then ``pull``s φ. The holder's own pushes and pulls are local
    calls. Nothing waits for any other worker.

Leaving
    A holder that leaves cleanly (``close``) hands φ, the version and the outer state to the live peer with the
    lowest rank and withdraws its claim (a withdrawn claim has version -1). A holder that dies (SIGKILL) stops
    answering: a peer whose push or pull fails suspects it (its claim is ignored for ``CLAIM_TTL``), and if no other
    live claim exists it takes over with the newest model it has (the one it last pulled). What dies with a holder:
    the updates applied since the new holder's last pull, and the outer optimiser's momentum (restarted; logged).

Nothing a pusher sends is trusted: a header with missing or non-finite fields, a version from the future, or a
payload the codec cannot decode is refused (PROTOCOL_VIOLATION) and changes nothing. Payload sizes are bounded by
the codec's exact size for the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from locoswarm.comm.exchange import LocalCodecs
from locoswarm.comm.hivemind_gather import close_replica, stop_loop
from locoswarm.config import CompressionConfig

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
CLAIM_TTL = 10.0  # seconds a holder's claim lives unless refreshed; a suspected holder is ignored this long
REFRESH_SECONDS = 2.0  # the holder re-stores its claim (and checks for a better one) this often
SETTLE_SECONDS = 1.0  # after claiming, wait this long for concurrent claims before serving
HEADER_LIMIT = 4096  # bytes of JSON header a push may carry


class HolderGone(Exception):
    """No holder answered within the patience: the push or pull is given up."""


class Refused(ValueError):
    """The holder refused the update (a bad header or payload): it changed nothing."""


def pack_params(tensors: Sequence[torch.Tensor]) -> bytes:
    """φ on the wire: fp32, flattened, in parameter order."""
    return torch.cat([t.detach().reshape(-1).to(torch.float32).cpu() for t in tensors]).numpy().tobytes()


def unpack_params(blob: bytes, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    numel = sum(t.numel() for t in like)
    if len(blob) != 4 * numel:
        raise ValueError(f"a model of {len(blob)} bytes, expected {4 * numel}")
    flat = torch.frombuffer(bytearray(blob), dtype=torch.float32)
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].reshape(t.shape).to(t.dtype).clone())
        offset += t.numel()
    return out


def push_codec(
    compression: CompressionConfig, seed: int, shapes: Sequence[torch.Size]
) -> tuple[Callable[[Sequence[torch.Tensor], int], bytes], Callable[[bytes, int], list[torch.Tensor]], int]:
    """The run's codec for pushes (stream "async"): (encode, decode, payload bytes). The pusher's encode keeps its
    error feedback; the holder decodes with a fresh codec's payloads of zeros for the push's number as the template
    (sizes and the agreed meta: random-k's shared indices are keyed by it)."""
    codecs = LocalCodecs(compression, seed, "async")
    zeros = [torch.zeros(s) for s in shapes]

    def encode(tensors: Sequence[torch.Tensor], number: int) -> bytes:
        return codecs.pack(codecs.encode([t.detach().to("cpu", torch.float32) for t in tensors], round_=number))

    def decode(blob: bytes, number: int) -> list[torch.Tensor]:
        fresh = LocalCodecs(compression, seed, "async")
        return fresh.decode_row(blob, fresh.encode(zeros, round_=number))

    return encode, decode, LocalCodecs(compression, seed, "async").packed_size(zeros)


def check_header(header: Any, version: int, workers: int) -> str | None:
    """Why a push's header is unusable, or None."""
    if not isinstance(header, dict):
        return "not a dictionary"
    for k in ("rank", "version", "steps", "number"):
        if not isinstance(header.get(k), int) or isinstance(header.get(k), bool) or header[k] < 0:
            return f"{k} is not a non-negative integer"
    for k in ("tokens", "seconds"):
        if not isinstance(header.get(k), int | float) or not math.isfinite(header[k]) or header[k] < 0:
            return f"{k} is not a finite non-negative number"
    if header["rank"] >= workers:
        return f"rank {header['rank']} outside the run's {workers} workers"
    if header["version"] > version:
        return f"version {header['version']} is ahead of the model's {version}"
    return None


class SharedModel:
    """This peer's end of the shared global model: it pushes and pulls, and holds the model when it is the holder.

    params: the tensors a holder keeps φ in (the strategy's; its outer optimiser steps them). encode(tensors,
    number) -> wire bytes and decode(bytes, number) -> tensors: the run's codec (``number`` keys shared randomness).
    apply(update, header) -> dict: the strategy's rule, run by the holder under its lock (φ in place); what it
    returns goes back to the pusher. outer_state() / load_outer_state(state or None to restart): the rule's state,
    for a handoff. store(key, value, ttl) / get(key) -> {peer id bytes: value}: signed DHT records. live() ->
    [(peer id, rank)]: the other live peers (for a handoff)."""

    def __init__(
        self,
        dht: DHT,
        name: str,
        rank: int,
        workers: int,
        params: Sequence[torch.Tensor],
        *,
        encode: Callable[[Sequence[torch.Tensor], int], bytes],
        decode: Callable[[bytes, int], list[torch.Tensor]],
        payload_limit: int,
        apply: Callable[[list[torch.Tensor], dict], dict],
        outer_state: Callable[[], dict],
        load_outer_state: Callable[[dict | None], None],
        store: Callable[[str, Any, float], None],
        get: Callable[[str], dict],
        live: Callable[[], list[tuple[PeerID, int]]],
        patience: float = 120.0,
        request_timeout: float = 30.0,
    ):
        self.name, self.rank, self.workers = name, rank, workers
        self.params = list(params)
        self._encode, self._decode, self._apply = encode, decode, apply
        self._outer_state, self._load_outer_state = outer_state, load_outer_state
        self._store, self._get, self._live = store, get, live
        self.payload_limit = payload_limit
        self.patience, self.request_timeout = patience, request_timeout
        self.version = 0  # the holder's: updates applied to φ
        self.holding = False
        self.latest: tuple[int, list[torch.Tensor]] = (0, [p.detach().clone() for p in self.params])  # last pull
        self.takeovers = 0
        self._suspects: dict[bytes, float] = {}  # peer id -> until when its claim is ignored
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="locoswarm-model", daemon=True)
        self._thread.start()
        self._p2p: P2P = self._run(self._setup(dht), timeout=60)
        self.peer_id = self._p2p.peer_id
        self._refresher = threading.Thread(target=self._refresh_loop, name="locoswarm-model-claim", daemon=True)
        self._refresher.start()

    @property
    def _key(self) -> str:
        return f"{self.name}_holder"

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _setup(self, dht: DHT) -> P2P:
        p2p = await dht.replicate_p2p()
        await p2p.add_protobuf_handler(f"{self.name}_push", self._on_push, averaging_pb2.AveragingData,
                                       stream_input=True)  # fmt: skip
        await p2p.add_protobuf_handler(f"{self.name}_pull", self._on_pull, averaging_pb2.AveragingData,
                                       stream_output=True)  # fmt: skip
        await p2p.add_protobuf_handler(f"{self.name}_handoff", self._on_handoff, averaging_pb2.AveragingData,
                                       stream_input=True)  # fmt: skip
        return p2p

    # ------------------------------------------------------------------ who holds the model
    def holder(self) -> tuple[bytes, int] | None:
        """(peer id, rank) of the live claim with the highest version (ties: the lowest rank); None if none."""
        now = time.monotonic()
        best = None
        for peer, claim in self._get(self._key).items():
            if not isinstance(claim, dict) or not isinstance(claim.get("version"), int) or claim["version"] < 0:
                continue  # withdrawn or malformed
            if self._suspects.get(peer, 0.0) > now and peer != self.peer_id.to_bytes():
                continue
            rank = claim.get("rank")
            if not isinstance(rank, int):
                continue
            order = (claim["version"], -rank)
            if best is None or order > best[0]:
                best = (order, peer, rank)
        if best is not None and self.holding and best[1] != self.peer_id.to_bytes():
            self._concede(best[2])
        return None if best is None else (best[1], best[2])

    def _claim(self) -> None:
        self._store(self._key, {"rank": self.rank, "version": self.version if self.holding else -1}, CLAIM_TTL)

    def _concede(self, rank: int) -> None:
        with self._lock:
            if not self.holding:
                return
            self.holding = False
            log.warning("the global model is held by rank %d now (our copy at version %d is dropped)", rank,
                        self.version)  # fmt: skip
        self._claim()  # withdrawn

    def _take_over(self) -> None:
        """No live holder: hold the newest model we have (our last pull)."""
        if self.latest[0] == 0 and not self.holding:
            # The start (every peer holds the same φ): the lowest rank claims first, the others a little later, so
            # the first holder is rank 0 if it is up and claimants rarely race.
            time.sleep(min(self.rank, 8) * SETTLE_SECONDS / 2)
            if self.holder() is not None:
                return
        with self._lock:
            if not self.holding:
                version, tensors = self.latest
                with torch.no_grad():
                    for p, t in zip(self.params, tensors, strict=True):
                        p.copy_(t)
                self.version, self.holding = version, True
                self._load_outer_state(None)
                self.takeovers += 1
                lost = "" if version == 0 else "; the outer optimiser's momentum restarts"
                log.warning("no live holder of the global model: rank %d holds it from version %d%s", self.rank,
                            version, lost)  # fmt: skip
        self._claim()
        time.sleep(SETTLE_SECONDS)  # concurrent claimants: the rule picks one of us (``holder``)

    def _suspect(self, peer: bytes, why: str) -> None:
        log.warning("the holder of the global model (%s) did not answer: %s", PeerID(peer), why[:200])
        self._suspects[peer] = time.monotonic() + CLAIM_TTL

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            if self.holding:
                with contextlib.suppress(Exception):  # a DHT hiccup: the next refresh tries again
                    self.holder()  # concedes if someone else's claim is better
                    if self.holding:
                        self._claim()

    # ------------------------------------------------------------------ the holder's side (the loop thread)
    async def _read(self, requests: AsyncIterator[averaging_pb2.AveragingData], limit: int) -> tuple[Any, bytes]:
        header, chunks, size = None, [], 0
        async for msg in requests:
            if header is None:
                if len(msg.group_id) > HEADER_LIMIT:
                    return None, b""
                try:
                    header = json.loads(msg.group_id.decode())
                except ValueError:
                    return None, b""
            chunks.append(msg.tensor_part.buffer)
            size += len(msg.tensor_part.buffer)
            if size > limit:
                return None, b""
        return header, b"".join(chunks)

    async def _on_push(self, requests, context: P2PContext) -> averaging_pb2.AveragingData:
        header, blob = await self._read(requests, self.payload_limit)
        if header is None:
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(None, self.apply_push, blob, header)
        except Refused as e:
            log.warning("refused a push from %s: %s", context.remote_id, str(e)[:200])
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION, group_id=str(e)[:500].encode())
        if reply is None:
            return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)  # we do not hold the model
        return averaging_pb2.AveragingData(code=averaging_pb2.ACCEPTED, group_id=json.dumps(reply).encode())

    def apply_push(self, blob: bytes, header: Any) -> dict | None:
        """Apply one pushed update to φ (None: we do not hold it). A bad header or payload raises ValueError."""
        with self._lock:
            if not self.holding:
                return None
            why = check_header(header, self.version, self.workers)
            if why is not None:
                raise Refused(f"bad header: {why}")
            try:
                update = self._decode(blob, header["number"])
            except ValueError as e:
                raise Refused(f"malformed payload: {e}") from e
            if not all(torch.isfinite(u).all() for u in update):
                raise Refused("non-finite values in the update")
            staleness = self.version - header["version"]
            extras = self._apply(update, header)
            self.version += 1
            reply = {"version": self.version, "staleness": staleness, "holder": self.rank, **extras}
            if self.version % 10 == 0:
                log.info("global model: version %d (held by rank %d)", self.version, self.rank)
        with contextlib.suppress(Exception):
            self._claim()  # the new version, so a claimant never outranks a live holder
        return reply

    async def _on_pull(self, request, context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        with self._lock:
            if not self.holding:
                yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
                return
            version, blob = self.version, pack_params(self.params)
        yield averaging_pb2.AveragingData(group_id=json.dumps({"version": version, "holder": self.rank}).encode())
        for start in range(0, len(blob), CHUNK_BYTES):
            yield averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=blob[start : start + CHUNK_BYTES]))

    async def _on_handoff(self, requests, context: P2PContext) -> averaging_pb2.AveragingData:
        # φ and the outer state (a momentum buffer or two of φ's size), serialised
        header, blob = await self._read(requests, 4 * 4 * sum(p.numel() for p in self.params) + (1 << 20))
        try:
            state = torch.load(io.BytesIO(blob), weights_only=True)
            version = int(header["version"])
            params = [t.to(torch.float32) for t in state["params"]]
            if [t.shape for t in params] != [p.shape for p in self.params] or version < self.latest[0]:
                raise ValueError("a model of another shape or older than ours")
        except Exception as e:  # noqa: BLE001 - anything malformed is refused
            log.warning("refused a handoff from %s: %s", context.remote_id, f"{type(e).__name__}: {e}"[:200])
            return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        with self._lock:
            with torch.no_grad():
                for p, t in zip(self.params, params, strict=True):
                    p.copy_(t)
            self.version, self.holding = version, True
            self._load_outer_state(state["outer"])
            self.latest = (version, [t.clone() for t in params])
        log.info("rank %d holds the global model now (handed over at version %d)", self.rank, version)
        await asyncio.get_running_loop().run_in_executor(None, self._claim)
        return averaging_pb2.AveragingData(code=averaging_pb2.ACCEPTED)

    # ------------------------------------------------------------------ a worker's side
    def _call(self, what: Callable[[PeerID], Any]) -> Any:
        """Run ``what(holder)`` against the current holder (a local one: ``what(None)``), taking over or moving on
        when it is gone, for at most ``patience`` seconds."""
        give_up = time.monotonic() + self.patience
        while time.monotonic() < give_up:
            found = self.holder()
            if found is None:
                self._take_over()
                continue
            peer, _ = found
            try:
                result = what(None if peer == self.peer_id.to_bytes() else PeerID(peer))
            except Refused:
                raise  # it answered: the update is bad, not the holder
            except Exception as e:  # noqa: BLE001 - a dead or stuck holder: hivemind raises P2PHandlerError, ...
                self._suspect(peer, f"{type(e).__name__}: {e}")
                continue
            if result is not None:
                return result
            time.sleep(0.2)  # it stopped holding: its claim is withdrawn or about to be
        raise HolderGone(f"no holder of the global model answered within {self.patience:.0f}s")

    def push(self, update: Sequence[torch.Tensor], header: dict) -> tuple[dict, int]:
        """Send our update (``header``: rank, version it started from, tokens, steps, seconds) and return (the
        holder's reply, payload bytes). Raises ``HolderGone`` when no holder takes it."""
        header = {**header, "number": header["version"]}  # shared randomness (random-k) keyed by the base version
        blob = self._encode(update, header["number"])

        def send(peer: PeerID | None) -> dict | None:
            if peer is None:
                return self.apply_push(blob, header)
            return self._run(asyncio.wait_for(self._send_push(peer, header, blob), self.request_timeout),
                             timeout=self.request_timeout + 5)  # fmt: skip

        return self._call(send), len(blob)

    async def _send_push(self, peer: PeerID, header: dict, blob: bytes) -> dict | None:
        async def messages():
            for i, start in enumerate(range(0, max(1, len(blob)), CHUNK_BYTES)):
                part = runtime_pb2.Tensor(buffer=blob[start : start + CHUNK_BYTES])
                yield averaging_pb2.AveragingData(group_id=json.dumps(header).encode() if i == 0 else b"",
                                                  tensor_part=part)  # fmt: skip

        reply = await self._p2p.call_protobuf_handler(peer, f"{self.name}_push", messages(),
                                                      averaging_pb2.AveragingData)  # fmt: skip
        if reply.code == averaging_pb2.BAD_GROUP_ID:
            return None
        if reply.code != averaging_pb2.ACCEPTED:
            raise Refused(f"the holder refused our update: {reply.group_id.decode(errors='replace')}")
        return json.loads(reply.group_id.decode())

    def pull(self) -> tuple[int, list[torch.Tensor], int]:
        """The global model as the holder has it now: (version, tensors, bytes received)."""

        def fetch(peer: PeerID | None):
            if peer is None:
                with self._lock:
                    if not self.holding:
                        return None
                    return self.version, [p.detach().clone() for p in self.params], 0
            return self._run(asyncio.wait_for(self._fetch(peer), self.request_timeout),
                             timeout=self.request_timeout + 5)  # fmt: skip

        version, tensors, size = self._call(fetch)
        self.latest = (version, [t.clone() for t in tensors])
        return version, tensors, size

    async def _fetch(self, peer: PeerID):
        stream = await self._p2p.iterate_protobuf_handler(peer, f"{self.name}_pull", averaging_pb2.AveragingData(),
                                                          averaging_pb2.AveragingData)  # fmt: skip
        header, parts, size, limit = None, [], 0, 4 * sum(p.numel() for p in self.params)
        async for msg in stream:
            if msg.code == averaging_pb2.BAD_GROUP_ID:
                return None
            if header is None:
                header = json.loads(msg.group_id.decode())
                continue
            parts.append(msg.tensor_part.buffer)
            size += len(msg.tensor_part.buffer)
            if size > limit:
                raise HolderGone("the holder sent a model larger than ours")
        if header is None or not isinstance(header.get("version"), int):
            raise HolderGone("the holder's answer had no version")
        return header["version"], unpack_params(b"".join(parts), self.params), size

    # ------------------------------------------------------------------ leaving
    def _hand_off(self) -> None:
        """A clean exit while holding: give φ, the version and the outer state to the lowest live rank."""
        with self._lock:
            if not self.holding:
                return
            buf = io.BytesIO()
            torch.save({"params": [p.detach().cpu().clone() for p in self.params], "outer": self._outer_state()}, buf)
            version, blob = self.version, buf.getvalue()
            self.holding = False  # pushes arriving from now on are sent to the successor
        live = sorted(self._live(), key=lambda x: x[1])
        if not live:
            log.info("no other live peer: the global model (version %d) leaves with us", version)
            return
        for peer, rank in live:
            try:
                ok = self._run(asyncio.wait_for(self._send_handoff(peer, version, blob), self.request_timeout),
                               timeout=self.request_timeout + 5)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - it left too, or is stuck: try the next
                log.info("handing the global model to rank %d failed: %s", rank, f"{type(e).__name__}: {e}"[:200])
                continue
            if ok:
                log.info("handed the global model (version %d) to rank %d", version, rank)
                return
        log.warning("no live peer took the global model (version %d); the next to push takes over its own copy",
                    version)  # fmt: skip

    async def _send_handoff(self, peer: PeerID, version: int, blob: bytes) -> bool:
        async def messages():
            for i, start in enumerate(range(0, max(1, len(blob)), CHUNK_BYTES)):
                part = runtime_pb2.Tensor(buffer=blob[start : start + CHUNK_BYTES])
                yield averaging_pb2.AveragingData(
                    group_id=json.dumps({"version": version}).encode() if i == 0 else b"", tensor_part=part
                )

        reply = await self._p2p.call_protobuf_handler(peer, f"{self.name}_handoff", messages(),
                                                      averaging_pb2.AveragingData)  # fmt: skip
        return reply.code == averaging_pb2.ACCEPTED

    def close(self) -> None:
        if not self._loop.is_running():
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            self._hand_off()
        with contextlib.suppress(Exception):
            self._claim()  # withdrawn
        handlers = [(f"{self.name}_push", {"stream_input": True}), (f"{self.name}_pull", {"stream_output": True}),
                    (f"{self.name}_handoff", {"stream_input": True})]  # fmt: skip
        stop_loop(self._loop, self._thread, close_replica(self._p2p, handlers))
