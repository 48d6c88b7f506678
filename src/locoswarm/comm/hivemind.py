"""``backend=hivemind``: a real peer network. One process per worker; peers meet through a hivemind DHT and
average pseudo-gradients with ``hivemind.averaging.DecentralizedAverager`` (butterfly all-reduce).

Built only on hivemind 1.1.12's public API (submodule imports). The one subclass, ``_StateServer``, overrides
``DecentralizedAverager.get_current_state``, the method its docstring says is "meant to be overridden" (as
hivemind's own ``TrainingAverager`` does); no private attribute is touched.

Rounds
    Peers agree on the round number through the DHT: each round's matchmaking key carries it (group bits), so
    only peers at the same outer step can meet, and every peer publishes ``{round, rank, in_sync, period}``
    under ``<run_id>_progress``. A round's group is whoever is ready within the matchmaking window: the first
    peer to arrive waits ``window`` seconds unless all ``workers`` peers have arrived earlier. The average is
    weighted by the tokens each peer processed.

Groups formed during the phase (``prepare``; bench_allreduce calls it, diloco not yet: see strategies/diloco.py)
    Where the DecentralizedAverager only forms the group (every mode but the butterfly: the payload travels peer to
    peer), a round's matchmaking needs no payload, only its metadata (weight, round, rank, commitment), which is
    known when the phase begins. So the group of a prepared round begins forming a lead (3x the last matchmaking,
    2-10 s) before the payload is due by our measured phase, while the last inner steps run, and the exchange starts
    as soon as the payload is there: matchmaking leaves the round's critical path. Peers still arrive as far apart
    as their payloads do, and a group waits for latecomers until the window has passed after the expected payload,
    as unprepared (a full group forms at once). What changes: a member of a formed group whose payload is then
    later than the window plus the all-reduce allowance fails the round for the group (unprepared, the group would
    have formed without it). Not from a key's first round (its mode and the phase are unknown), nor with a round in
    flight. The sketches of the agreement check then go peer to peer too (one message to each groupmate).

Gossip rounds (``start(..., group=ranks)``: noloco's pairs)
    Only the group's peers meet: the group's tag (its lowest rank) follows the round number in the group bits, and
    the averager's target size is the group's (one averager per size), so a pair forms as soon as both arrive. A
    member whose rank is not in the group is dropped like malformed metadata. A gossip round that fails applies a
    zero update and the peer keeps its own replica (every group averages something else); a group of one
    exchanges nothing. Gossip still runs in lockstep (a phase's groups and its key are the round's), and a failed
    round costs its pair the whole deadline while the other pairs go on, so a pair can fall behind: a peer whose
    round failed while live peers are past it skips to their round at once with its own replica (``Round.skipped``;
    the strategy skips the same phases of its partition), which keeps the swarm in step without a download.

async_diloco's global model (``shared_model``)
    Not a round at all: one live peer holds the model and the others push to and pull from it over the same P2P
    connections, with no barrier; see comm/shared_model.py.

Compression (``compression=...``, the same config as on ``sim``; see ``comm/exchange.py``)
    Every peer encodes its pseudo-gradient once per round with its own codecs (error feedback stays local; the
    codecs are checkpointed with the averager). Random-k's shared indices are keyed by the agreed round number,
    so a peer that missed rounds still picks the group's indices. Then, by codec:

    | codec | what crosses the wire | where it is (de)compressed |
    | --- | --- | --- |
    | none, randomk | the fp32 wire values (random-k: its k values, never an index), butterfly all-reduce | decoded once from the group's mean |
    | fp16 | the same butterfly with hivemind's own ``Float16Compression`` | compressed twice: each part on its way to its owner, and the averaged part on its way back (hivemind's design); our codec's first cast is exactly representable, so stage 1 adds nothing, stage 2 rounds the mean to fp16 |
    | int8, int4, sign, blocktopk | stage 1: each peer's payload slice for the blocks owner j reduces, to owner j; stage 2: each owner's re-encoded chunk mean, to everyone (``comm/hivemind_gather.py``) | compressed twice like hivemind's butterfly: by each peer's codec, then the owner decodes the slices, sums them in rank order and re-encodes the mean; everyone decodes the chunks: the ``sim`` backend's arithmetic on the same chunks, bit for bit |
    | bf16, topk, powersgd | the packed payload, all-gathered (``comm/hivemind_gather.py``) | every peer decodes every groupmate's payload and sums them in rank order: the ``sim`` backend's arithmetic, bit for bit |

    hivemind's butterfly cannot carry the last two rows: its receivers decode only hivemind's built-in
    compression types (a closed protobuf enum), and it sums what it receives, which top-k indices, per-block
    scales and low-rank factors do not allow; bf16 has no hivemind compression for fp32 buffers. For those codecs
    the DecentralizedAverager still forms the group (matchmaking, weights, ranks), averaging a 1-element tensor,
    and the payloads travel over the same libp2p connections, peer to peer.

Robust aggregation (``aggregator=...``, ``aggregator.max_norm_ratio``; comm/aggregate.py)
    The exchange path is the sim's (``aggregate.exchange_path`` of the codec and the aggregator), so the table
    above holds for ``aggregator=mean``; any other aggregator all-gathers the payloads whatever the codec, and every
    member screens and aggregates the same rows in (rank, peer id) order (``aggregate.combine``). Mean over the
    butterfly sees only the sum: a non-finite sum rejects the round (a zero update, every member reported); mean
    over int8/int4 screens the pieces at each chunk's owner, which appends its report to its reduced chunk so every
    member reports the same rejections. Rejections go to ``Round.rejected`` (rank -> reason) and metrics.jsonl.

    Nothing a groupmate sends is trusted. Its matchmaking metadata (``{t, w, round, rank}``) is checked
    (``malformed_metadata``: presence, types, finiteness, the round, a valid rank); a peer whose metadata fails
    is dropped from the round (the payload exchange neither waits for nor uses it) and reported, under the rank
    it claims if no well-formed member holds it, else -1. Every member receives the same metadata from hivemind,
    so all drop the same peers. On the butterfly its values are already inside the sum: the round is rejected.
    A gathered payload that fails to decode drops its sender the same way. A peer whose codec refuses its own input
    (a quantiser and NaN) sends a payload of zeros with weight 0, leaves its codecs as they were and reports
    itself (its groupmates see a member without weight).

Verification by replay (``verify.fraction``; verify.py's ``PeerReplay``, built with ``verify=True``)
    A peer's round metadata carries ``c``, the hash of its phase's start state, which its mailbox serves for two
    rounds (``commit``); payloads are all-gathered whatever the aggregator, and the last round's rows are kept, so
    after the round every member can replay a groupmate and compare with what it really sent (``evidence``). A peer
    that fails is ``exclude``d: screened out of every later round like a peer with malformed metadata.

Deadlines (``RoundClock``)
    Nothing a user must guess: the window is ``deadline_margin`` x the arrival spread measured within groups
    (it jumps up with a larger spread and decays 0.8x per round; a missed round or a group that left live peers
    out doubles it), at least ``min_matchmaking_time`` and at most one round period (the time between the starts
    of consecutive rounds: with streaming fragments a strategy round can be much shorter). The first round
    waits ``deadline_margin`` x our own first phase (peers launched together by ``locoswarm-swarm`` also start
    training together). A round that had to start its averager (a process: seconds on a loaded machine, paid
    unequally) waits ``deadline_margin`` x that start time longer. A peer whose matchmaking fails while every
    other peer has finished that round or left gives up at once (it resyncs) instead of waiting out the deadline.
    The all-reduce allowance is ``deadline_margin`` x the slowest all-reduce measured so
    far (``first_round_timeout`` before the first). ``matchmaking_time`` / ``round_timeout`` override them.

Failures
    ``DecentralizedAverager.step`` raises on failure (its docstring says it returns None) and, worse, a peer that
    dies mid-all-reduce (or a hivemind hiccup: we have seen "received 85% results" with every peer alive) makes
    the others finish with *their own* values for the lost part, silently. So after every all-reduce the group
    compares a sketch of the average (float64 norms of 16 slices of a strided subsample) through the DHT after
    the butterfly, peer to peer after an exchange through the mailbox; if they differ, the whole group re-runs the
    round on its original inputs (up to twice); if they still differ, the majority's average stands and the others
    are marked out of sync. A round that raises or misses its
    deadline applies a *zero* update while other peers are alive (all peers that missed it stay equal to each
    other) and marks the peer out of sync; alone, it is a group of one. A round whose zero update is applied
    rolls its encode back: the codecs go back to their snapshot from before it (error-feedback residuals, PowerSGD's
    warm start), or, if a later round of the same key has encoded already (diloco's outer_delay=1), what it added
    to each residual is taken out again (``_settle``). An out-of-sync peer keeps training and
    downloads the swarm's run state from an in-sync peer at a round boundary (the donor serves it at its next
    boundary, so both are at the same round); with no in-sync donor it continues from its own state.

Joining
    ``attach_run_state(get, set)`` (called by the trainer once the strategy is built) makes the run state
    shareable. If the swarm is already past round 0, the new peer downloads it from a live in-sync peer; the
    donor serialises it at its *next* round boundary, so the joiner starts the next phase together with the
    swarm. The state is opaque bytes to this module (``torch.save`` of what the trainer hands over; loaded with
    ``weights_only=True``, so a malicious peer cannot execute code).

Threads (rounds in flight while the main thread trains)
    ``start`` encodes in the caller's (main) thread, then the network part of the round (matchmaking, exchange,
    agreement check) runs on the averager's one background thread, in start order; streaming DiLoCo trains while
    a fragment's round is in flight and calls ``round_boundary`` between. The design is the simplest that is
    correct: whatever reads or replaces the run state first waits until no round is in flight (``_idle``). That
    happens only at a checkpoint (whose strategy state waits for its rounds anyway), a state request, a resync
    and a new stream's first round, so the overlap is kept everywhere else.

    - The run state (``swarm_state``: params, strategy, counters) is read and written only by the main thread,
      at a boundary. A snapshot for a state request first waits for the rounds in flight, so it holds their
      results (a streaming strategy's ``state_dict`` saves finished rounds) and its ``round`` / ``in_sync``
      metadata count them; a donor serving a request only loses that boundary's overlap. hivemind's
      state-serving thread (``get_current_state``) never builds the state: it only waits for the next snapshot
      (bounded), so it cannot deadlock with the main thread, and the main thread waits only for rounds already
      started, which need nothing from it.
    - A resync applies a downloaded state only after the rounds in flight are done: the strategy's in-flight
      rounds are replaced by the donor's (finished) ones, and no stale round of ours can later mark us out of
      sync or hold up the next. A round that fails in the background marks the peer out of sync; the main thread
      acts on that at the next boundary.
    - Each stream (key) has its own DecentralizedAverager, a process forked at the stream's first round: the
      first start of a new key waits until no round is in flight, since forking while another thread holds a
      lock (logging, a pipe) can leave the child deadlocked.
    - The DHT's request pipe is a multiprocessing pipe, unsafe to write from two threads at once: both threads
      send DHT requests under one lock (``_dht_lock``) and await the answers outside it.
    - The round counter (``round``, rounds *started*, so it counts those in flight) is advanced in the main
      thread; the clock's arrival spread and all-reduce times are written by the background thread, its period
      by the main thread (plain float fields, read by both). ``state_dict`` waits for rounds in flight too, so a
      checkpoint holds settled codec residuals and the round counter (which a resume restores).

Bytes
    hivemind does not expose per-peer byte counters, so ``Round.bytes_sent`` / ``bytes_received`` are computed
    from the pattern: butterfly, with n peers and equal shares, 2(n-1)/n of the wire payload each way; all-gather,
    n-1 payloads each way; reduce-scatter, the slices and chunks this peer really sent. ``Round.seconds`` is measured (matchmaking + exchange).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import signal
import threading
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import msgpack
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage
from hivemind.compression import CompressionBase, Float16Compression, NoCompression
from hivemind.dht import DHT
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from locoswarm.comm.aggregate import WeightedMean, build_aggregator, combine, exchange_path, reject_nonfinite_sum
from locoswarm.comm.base import DEFAULT_KEY, Averager, Evidence, Handle, Round, commitment
from locoswarm.comm.exchange import BadChunk, LocalCodecs, allgather_bytes, merge_dropped, residuals
from locoswarm.comm.hivemind_gather import GatherFailed, PayloadMailbox
from locoswarm.comm.identity import AllowedPeersValidator, fresh_identity, read_allowed_peers, writer
from locoswarm.comm.identity import forget as forget_identity
from locoswarm.comm.identity import load as load_identity
from locoswarm.comm.shared_model import SharedModel, push_codec
from locoswarm.compression import Codec, Payload
from locoswarm.config import AggregatorConfig, BackendConfig, CompressionConfig
from locoswarm.pipeline.remote import Listing, StageLink, read_directory

log = logging.getLogger(__name__)

ROUND_BITS = 24  # the round number lives in the matchmaking key's group bits: 16M rounds before it wraps
REDO_BITS = 2  # ... followed by the re-run count within the round
GROUP_BITS = 16  # ... and, in a gossip round, its group's tag (the group's lowest rank): only the group meets
MAX_REDOS = 2
SKETCH_SLICES = 16
SKETCH_STRIDE = 64
SKETCH_RTOL = 1e-4  # peers' averages differ by float32 rounding (~1e-7); a failed part differs by O(1)
# Wire dtypes of summable codecs that hivemind's butterfly can carry, and the hivemind compression that does it.
BUTTERFLY_WIRE: dict[torch.dtype, CompressionBase] = {
    torch.float32: NoCompression(),
    torch.float16: Float16Compression(),
}


REPORT_LIMIT = 1 << 16  # bytes of screening report an owner may append to its reduced chunk


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def malformed_metadata(info: Any, number: int, workers: int) -> str | None:
    """Why a groupmate's matchmaking metadata (``{"t", "w", "round", "rank"}``, and ``"c"`` where peers verify each
    other) cannot be used, or None if it can.
    It comes from whoever joined the group, so nothing in it is trusted: a peer whose metadata fails this check is
    dropped from the round (its rank and weight would decide the order and the shares)."""
    if not isinstance(info, dict):
        return f"metadata is a {type(info).__name__}, not a dict"
    missing = [k for k in ("t", "w", "round", "rank") if k not in info]
    if missing:
        return f"metadata without {', '.join(map(repr, missing))}"
    if not _is_number(info["t"]):
        return f"t={info['t']!r} is not a finite number"
    if not _is_number(info["w"]) or info["w"] < 0:
        return f"w={info['w']!r} is not a finite non-negative number"
    if not _is_int(info["round"]) or info["round"] != number:
        return f"round={info['round']!r}, expected {number}"
    if not _is_int(info["rank"]) or not 0 <= info["rank"] < workers:
        return f"rank={info['rank']!r} is not a worker rank in [0, {workers})"
    if "c" in info and not (isinstance(info["c"], str) and len(info["c"]) == 64):
        return "c (a commitment to the phase's start state) is not a 64-character hash"
    return None


def _pack_report(report: Sequence[dict[int, str]]) -> bytes:
    """An owner's screening report (per tensor: member index -> reason) as the bytes after its reduced chunk."""
    blob = json.dumps([{str(k): v for k, v in d.items()} for d in report]).encode()
    if len(blob) > REPORT_LIMIT:  # a report that long says the same with shorter reasons
        blob = json.dumps([dict.fromkeys(map(str, d), "screened out") for d in report]).encode()[:REPORT_LIMIT]
    return blob


def _unpack_report(blob: bytes, owners: int, sender: Any) -> list[dict[int, str]]:
    """The report after an owner's chunk; a malformed one is ignored (logged): the chunk itself is what counts."""
    try:
        report = json.loads(blob.decode()) if blob else []
        out = [{int(k): str(v) for k, v in d.items()} for d in report]
        if any(not 0 <= k < owners for d in out for k in d):
            raise ValueError("a member index outside the group")
        return out
    except (ValueError, TypeError, AttributeError, RecursionError) as e:  # deep nesting: json's RecursionError
        log.warning("ignoring a malformed screening report from %s: %s", sender, e)
        return []


class RoundFailed(Exception):
    """An averaging round that did not complete within its deadline, or whose all-reduce raised. ``rejected``:
    the groupmates (rank -> reason) whose bad input failed it, reported in the failed round."""

    def __init__(self, message: str, rejected: dict[int, str] | None = None):
        super().__init__(message)
        self.rejected = dict(rejected or {})


@dataclasses.dataclass
class _EarlyGroup:
    """The group of a round formed before its payload exists (``HivemindAverager.prepare``)."""

    key: str
    number: int  # the round it is for
    weight: float  # the weight its matchmaking metadata announced
    averager: DecentralizedAverager
    limit: int  # the mailbox's limit for the round (``_mailbox_limit``), from the key's last round
    due: threading.Event  # set when the round starts or is abandoned: forming the group may wait no longer
    abandoned: bool = False
    control: Any = None  # hivemind's StepControl, once matchmaking has begun
    began: float = 0.0  # time.monotonic() when matchmaking began


class RoundClock:
    """Deadlines from measured round times (see the module docstring)."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.spread: float | None = None  # arrival spread of a group: jumps up at once, decays 0.8x per round
        self.max_allreduce: float | None = None  # slowest all-reduce seen (seconds)
        self.period: float | None = None  # EMA of the time between the starts of consecutive rounds
        self.first_phase: float | None = None
        self._last_boundary = time.monotonic()
        self._last_start: float | None = None
        self._startup = 0.0  # seconds spent starting an averager for the coming round (once)
        self.phase: float | None = None  # EMA of the seconds from ``prepare`` to its round's start (the inner steps)
        self.matchmaking: float | None = None  # the last round's matchmaking seconds

    def started_averager(self, seconds: float) -> None:
        self._startup = seconds

    def matchmaking_began(self) -> None:
        self._startup = 0.0  # paid once, by the round that started the averager

    def window(self) -> float:
        if self.cfg.matchmaking_time is not None:
            return self.cfg.matchmaking_time
        if self.spread is None:
            # Nothing measured between peers yet (launched peers start together, see attach_run_state): wait
            # margin x our own first phase, so a peer up to that much slower still makes the first round.
            phase = self.first_phase if self.first_phase is not None else time.monotonic() - self._last_boundary
            measured = self.cfg.deadline_margin * phase
        else:
            measured = self.cfg.deadline_margin * self.spread
            if self.period is not None:  # a straggler more than a whole round behind is a round behind: no wait
                measured = min(measured, self.period)
        return max(self.cfg.min_matchmaking_time, measured) + self.cfg.deadline_margin * self._startup

    def allreduce_allowance(self) -> float:
        if self.cfg.round_timeout is not None:
            return self.cfg.round_timeout
        if self.max_allreduce is None:
            return self.cfg.first_round_timeout
        # Floor: chunk_timeout. Giving up sooner gains nothing: a cancelled all-reduce keeps the buffers locked in
        # hivemind's process until its chunk timeouts fire, so the next round would wait for it anyway.
        return max(self.cfg.chunk_timeout, self.cfg.deadline_margin * self.max_allreduce)

    def phase_started(self) -> None:
        self._last_boundary = time.monotonic()

    def entering_round(self) -> None:
        now = time.monotonic()
        if self.first_phase is None:
            self.first_phase = now - self._last_boundary
        if self._last_start is not None:
            dt = now - self._last_start
            self.period = dt if self.period is None else 0.7 * self.period + 0.3 * dt
        self._last_start = now

    def observe(self, spread: float | None, allreduce_seconds: float | None) -> None:
        if spread is not None:
            self.spread = spread if self.spread is None else max(spread, 0.8 * self.spread)
        if allreduce_seconds is not None:
            self.max_allreduce = max(self.max_allreduce or 0.0, allreduce_seconds)

    def observe_phase(self, seconds: float) -> None:
        self.phase = seconds if self.phase is None else 0.7 * self.phase + 0.3 * seconds

    def early_start(self, prepared_at: float) -> tuple[float, float] | None:
        """When to begin forming a prepared round's group (``HivemindAverager.prepare``), and when its payload is
        expected (our measured phase after ``prepared_at``): a lead before it, so the group is formed when the
        payload is ready, and peers still arrive in matchmaking as far apart as their payloads are (the window's
        spread stays meaningful). None: no phase measured yet (the group forms when the round starts)."""
        if self.phase is None:
            return None
        # hivemind took up to 1.2 s to form a group of 4 whose expiration lay seconds ahead (bench_allreduce)
        lead = min(10.0, max(2.0, 3 * (self.matchmaking or 0.0)))
        expected = prepared_at + self.phase
        return max(prepared_at, expected - lead), expected

    def missed(self) -> None:
        """Our round failed or left out live peers: the spread was larger than we thought; double the window."""
        floor = self.cfg.min_matchmaking_time / self.cfg.deadline_margin
        self.spread = 2 * max(self.spread or 0.0, floor)


def _mailbox_limit(mode: str, payloads: Sequence[Payload]) -> int:
    """The most bytes a groupmate may send us in a round of ``mode`` (the mailbox refuses more): no slice or chunk is
    larger than the whole payload; a reduced chunk carries its owner's screening report."""
    if mode == "ring":
        return 4 * sum(p.buffers["values"].numel() for p in payloads)
    return sum(p.nbytes for p in payloads) + (REPORT_LIMIT if mode == "reduce" else 0)


class _LenientSerializer(MSGPackSerializer):
    """hivemind's msgpack, but a map key need not be a string. Every member deserialises everyone's gathered
    metadata; with msgpack's strict_map_key one groupmate's ``{2: 3.0}`` failed the whole round for all of them.
    Loaded, such metadata is screened like any other malformed metadata (its sender alone is dropped)."""

    @classmethod
    def loads(cls, buf: bytes) -> object:
        return msgpack.loads(buf, ext_hook=cls._decode_ext_types, raw=False, strict_map_key=False)


class _SwarmAverager(DecentralizedAverager):
    """A DecentralizedAverager that answers no request of a peer outside ``allowed`` (None: anyone's): it never
    accepts it into a group it leads, takes no part of an all-reduce from it and serves it no state. (As a
    follower it only asks leaders the DHT offers, and this peer's DHT node keeps no outsider's record.)"""

    serializer = _LenientSerializer

    def __init__(self, *args: Any, allowed: frozenset[PeerID] | None = None, **kwargs: Any):
        self._allowed = allowed
        super().__init__(*args, **kwargs)

    def _refuses(self, context: P2PContext, what: str) -> bool:
        if self._allowed is None or context.remote_id in self._allowed:
            return False
        log.warning("refused %s from %s: not in backend.allowed_peers", what, context.remote_id)
        return True

    # hivemind registers rpc_* handlers from their type hints, and wants typing's AsyncIterator (it reads ``_name``)
    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self._refuses(context, "a join request"):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(
        self, stream: typing.AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        if self._refuses(context, "an all-reduce part"):
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_aggregate_part(stream, context):
            yield response

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.DownloadData]:
        if self._refuses(context, "a state request"):
            return
        async for response in super().rpc_download_state(request, context):
            yield response


class _StateServer(_SwarmAverager):
    """An averager used only to serve run state to peers (it never averages).

    Overrides ``get_current_state``, hivemind's documented extension point; everything else is stock.
    """

    def __init__(self, *args: Any, provide: Callable[[], tuple[dict, list[torch.Tensor]]], **kwargs: Any):
        self._provide = provide
        super().__init__(*args, **kwargs)

    def get_current_state(self):  # noqa: D102 - runs in hivemind's background thread of the host process
        metadata, tensors = self._provide()
        return metadata, tensors, None


def _started(make: Callable[[], Any]) -> Any:
    """Start a hivemind background process without losing Ctrl+C: ``run_in_background`` sets SIGINT to SIG_IGN
    in the *calling* process (so the child ignores it) and never restores it."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        return make()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def _sketch(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Norms of 16 slices of a strided subsample: cheap for large models, and a lost all-reduce part (a
    contiguous run of >= 128k values) always changes some slice."""
    flat = torch.cat([t.reshape(-1)[::SKETCH_STRIDE] for t in tensors]).double()
    return [float(s.norm()) for s in flat.tensor_split(SKETCH_SLICES)]


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        abs(x - y) <= SKETCH_RTOL * max(abs(x), abs(y), 1e-30) for x, y in zip(a, b, strict=True)
    )


def _value_dict(result: Any) -> dict:
    """``dht.get(key)`` of a dictionary-valued key -> {subkey: value} for unexpired entries."""
    if result is None or not isinstance(result.value, dict):
        return {}
    return {k: v.value for k, v in result.value.items()}


class HivemindAverager(Averager):
    """An ``Averager`` for one local worker per process, over a hivemind DHT (see the module docstring)."""

    def __init__(
        self,
        cfg: BackendConfig,
        *,
        workers: int,
        rank: int | None = None,
        expected_peers: int | None = None,
        compression: CompressionConfig | None = None,
        seed: int = 0,
        aggregator: AggregatorConfig | None = None,
        new_identity: bool = False,
        verify: bool = False,
    ):
        """expected_peers: peers launched together (locoswarm-swarm --peers N): they start training together.
        compression, seed: the run's codec config and seed (the sim backend's codec seeds); default: none.
        aggregator: how the group's contributions are screened and combined (comm/aggregate.py); default mean.
        new_identity: ``cfg.identity`` was just made for this peer, so no other peer can be using it (hivemind's
        check for that, a probe of the swarm, is skipped). verify: peers verify each other by replay (verify.py's
        ``PeerReplay``): payloads are all-gathered whatever the aggregator, so every member has every row, and the
        last round's rows are kept for the check."""
        self.cfg = cfg
        self.expected_peers = expected_peers
        self.workers = workers
        self.rank = rank
        self.compression = compression if compression is not None else CompressionConfig()
        self.seed = seed
        self.codecs: dict[str, LocalCodecs] = {}  # per stream of rounds (key)
        agg = aggregator if aggregator is not None else AggregatorConfig()
        self.aggregator, self.max_norm_ratio, self.mean = build_aggregator(agg), agg.max_norm_ratio, WeightedMean()
        # Rounds whose encode may still be rolled back, per key, in start order (``_settle``); with the codecs they
        # are touched by the main thread (encode) and the background thread (roll back): under this lock.
        self._pending: dict[str, list[dict]] = {}
        self._rollback_lock = threading.Lock()
        self._mailbox: PayloadMailbox | None = None
        self._shared: SharedModel | None = None
        self._link: StageLink | None = None
        self.stage: int | None = None  # a pipeline's stage peer: its stage (``join_stage``)
        self.base_run_id = cfg.run_id
        self.clock = RoundClock(cfg)
        self.verify = verify
        self.excluded: dict[int, str] = {}  # rank -> why: failed a verification, dropped from every round (``exclude``)
        self._commit: tuple[int, str, int] | None = None  # (round, hash, size) of the start state we committed to
        self._evidence: tuple[int, list[tuple[PeerID, dict, list[torch.Tensor]]]] | None = None  # last round's rows
        self.round = 0  # rounds started by this peer (== the swarm's, while in sync); a resume restores it
        self.finished = 0  # the last round whose network part is over (set by the background thread)
        self._round_restored = False
        self.in_sync = True
        self._averagers: dict[tuple, DecentralizedAverager] = {}
        self._server: _StateServer | None = None
        self._get_state: Callable[[], dict] | None = None
        self._set_state: Callable[[dict], None] | None = None
        self._cond = threading.Condition()
        self._requests = 0  # state requests waiting for our next round boundary
        self._snapshot: tuple[dict, list[torch.Tensor]] | None = None
        self._resync: Any = None  # MPFuture of a state download in flight
        self._clusters: list[list[bytes]] = []
        # ``prepare``: per key, the last swarm round's (mode, averager, mailbox limit); the next round's early group
        self._swarm_rounds: dict[str, tuple[str, DecentralizedAverager, int]] = {}
        self._early: _EarlyGroup | None = None
        self._prepared_at: float | None = None
        self.early_groups = 0  # rounds whose group formed before their payload existed
        self._closed = False
        self._dht_lock = threading.Lock()  # see "Threads" in the module docstring
        # Who we are and whom we admit (comm/identity.py): our records are signed with our libp2p key.
        self.allowed = read_allowed_peers(cfg.allowed_peers) if cfg.allowed_peers else None
        identity = load_identity(cfg.identity) if cfg.identity else fresh_identity()
        if self.allowed is not None and identity.peer_id not in self.allowed:
            raise ValueError(
                f"backend.allowed_peers: {cfg.allowed_peers} does not list this peer ({identity.peer_id}, "
                f"backend.identity={cfg.identity}): a peer outside its own allow-list can meet no one"
            )
        validators = [identity.validator, *([AllowedPeersValidator(self.allowed)] if self.allowed else [])]
        self._owner = identity.owner
        try:
            self.dht = _started(
                lambda: DHT(
                    initial_peers=list(cfg.initial_peers),
                    host_maddrs=list(cfg.host_maddrs),
                    announce_maddrs=list(cfg.announce_maddrs) or None,
                    identity_path=str(identity.path),
                    check_if_identity_free=not (identity.fresh or new_identity),  # a new key is nobody else's
                    record_validators=validators,
                    start=True,
                )
            )
        finally:
            forget_identity(identity)  # a per-process key's file is not needed once the daemon has read it
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if not cfg.initial_peers:
            log.info("started a new swarm; others join with: locoswarm-swarm join %s", self.maddrs[0])
        log.info("DHT address: %s", " ".join(self.maddrs))

    # ------------------------------------------------------------------ swarm bookkeeping (DHT)
    @property
    def _progress_key(self) -> str:
        return f"{self.cfg.run_id}_progress"

    def _dht_get(self, key: str) -> dict:
        """``dht.get(key, latest=True)`` of a dictionary-valued key -> {writer's peer id (bytes): value}, of the
        records signed by their writer (comm/identity.py; unsigned ones are anyone's, so no one's); thread-safe."""
        with self._dht_lock:  # only the request is sent under the lock; its answer is awaited outside it
            future = self.dht.get(key, latest=True, return_future=True)
        signed = {}
        for subkey, value in _value_dict(future.result()).items():
            peer = writer(bytes(subkey)) if isinstance(subkey, bytes) else None
            if peer is not None and (self.allowed is None or peer in self.allowed):
                signed[peer.to_bytes()] = value
        return signed

    def _dht_store(self, key: str, value: Any, ttl: float, wait: bool = True) -> None:
        """Store ``value`` under ``key``, subkey our peer id, for ``ttl`` seconds; thread-safe. ``wait=False``:
        fire and forget."""
        with self._dht_lock:
            future = self.dht.store(
                key, value, expiration_time=get_dht_time() + ttl, subkey=self._owner, return_future=True
            )
        if wait:
            future.result()

    def progress(self) -> dict[str, dict]:
        """Live peers' latest records: {peer id (hex): {round, rank, in_sync, period}}."""
        return {
            bytes(k).hex() if isinstance(k, bytes) else str(k): v
            for k, v in self._dht_get(self._progress_key).items()
            if isinstance(v, dict)
        }

    def _publish_progress(self) -> None:
        period = self.clock.period or self.clock.first_phase or 10.0
        ttl = max(60.0, 4 * period)
        record = {
            "round": self.round,
            "rank": self.rank,
            "in_sync": self.in_sync,
            "finished": self.finished,
            "period": period,
            "launched": self.expected_peers or 0,
        }
        # fire and forget: a lost record only delays a joiner
        self._dht_store(self._progress_key, record, ttl, wait=False)

    def pick_rank(self) -> int:
        """A joiner's worker rank (its data shard): the lowest rank no live peer holds."""
        records = [r for r in self.progress().values() if not r.get("left")]
        taken = {r.get("rank") for r in records}
        if max((int(r.get("round", 0)) for r in records), default=0) < 1:
            # Before the first round, launched peers may still be starting: their ranks 0..N-1 are not free.
            taken |= set(range(max((int(r.get("launched") or 0) for r in records), default=0)))
        for r in range(self.workers):
            if r not in taken:
                return r
        raise RuntimeError(
            f"the swarm already has a live peer for every one of its workers={self.workers} ranks ({sorted(taken)}); "
            "pass --rank R to share a shard deliberately"
        )

    # ------------------------------------------------------------------ averaging
    @property
    def _request_timeout(self) -> float:
        # hivemind warns (and can deadlock) unless a join request times out well within the matchmaking time.
        return min(3.0, self.cfg.min_matchmaking_time / 2)

    def _codecs_for(self, key: str) -> LocalCodecs:
        if key not in self.codecs:
            self.codecs[key] = LocalCodecs(self.compression, self.seed, key)
        return self.codecs[key]

    def _averager_for(
        self, stream: str, tensors: Sequence[torch.Tensor], compression: CompressionBase, target: int | None = None
    ) -> DecentralizedAverager:
        """target: a gossip round's group size (its own averager: hivemind fixes the target size per averager, and a
        leader waits for it); None: the whole swarm (``workers``)."""
        key = (stream, *((tuple(t.shape), str(t.dtype)) for t in tensors), type(compression).__name__)
        if target is not None:
            key = (*key, target)
        if key not in self._averagers:
            t0 = time.monotonic()
            # One DecentralizedAverager (background process) per stream and tensor schema: its DHT prefix carries
            # the stream, so rounds of different keys (streaming fragments) never meet. diloco/ddp need one.
            # It is forked from this thread: not while the background thread runs a round (see the docstring).
            self._idle()
            # The prefix names the schema, not the order in which this peer met the streams: a joiner whose first
            # round is another fragment's must still meet the swarm's averager of each stream.
            schema = hashlib.sha1(repr(key[1 : 1 + len(tensors) + 1]).encode()).hexdigest()[:12]
            prefix = f"{self.cfg.run_id}_{stream}_avg{schema}" + (f"_g{target}" if target is not None else "")
            buffers = [torch.zeros(t.shape, dtype=t.dtype) for t in tensors]
            request_timeout = self._request_timeout
            self._averagers[key] = _started(
                lambda: _SwarmAverager(
                    buffers,
                    self.dht,
                    start=True,
                    prefix=prefix,
                    target_group_size=target if target is not None else self.workers,
                    min_group_size=2,
                    min_matchmaking_time=self.cfg.min_matchmaking_time,
                    request_timeout=request_timeout,
                    compression=compression,
                    next_chunk_timeout=self.cfg.chunk_timeout,
                    allow_state_sharing=False,
                    allowed=self.allowed,
                )
            )
            # Starting one (a process and its P2P replica) takes seconds on a loaded machine, and groupmates pay it
            # unequally: the round that started it waits that much longer for them (RoundClock.window).
            self.clock.started_averager(time.monotonic() - t0)
        return self._averagers[key]

    asynchronous = True  # rounds run on one background thread, in start order (the same order on every peer)
    shares_run_state = True

    def start(
        self,
        tensors: Sequence[torch.Tensor],
        weights: torch.Tensor,
        *,
        key: str = DEFAULT_KEY,
        ranks: Sequence[int] | None = None,
        group: Sequence[int] | None = None,
    ) -> Handle:
        # Encoding and building hivemind's averager process happen here, in the caller's thread: hivemind starts
        # its processes with signal.signal, which only the main thread may call. The network part runs behind.
        return self._submit(self._finish, self._prepare(list(tensors), weights, key, group))

    def prepare(self, weights: torch.Tensor, *, key: str = DEFAULT_KEY) -> None:
        """The next round started is a swarm round of ``key`` with ``weights``: form its group while the phase's last
        inner steps run, not after them (matchmaking is 0.15-0.4 s of a 7 s round on 100 Mbit/s links:
        benchmarks/bench_allreduce.py). Only where the group forms apart from the payload (every mode but the
        butterfly, whose all-reduce needs the payload at matchmaking), from the key's second round (the mode is its
        last round's, and ``RoundClock.early_start`` needs a measured phase), with no round in flight. A start that
        does not match it (another key or round; another weight) abandons the early group."""
        if self._early is not None:
            self._abandon_early(self._early, "prepared again before its round started")
        self._prepared_at = time.monotonic()
        swarm_round = self._swarm_rounds.get(key)
        when = self.clock.early_start(self._prepared_at)
        if swarm_round is None or swarm_round[0] == "butterfly" or when is None or weights.numel() != 1:
            return
        with self._rollback_lock:
            if any(self._pending.values()):  # a round in flight: the next start need not be this one
                return
        self._early = _EarlyGroup(key, self.round + 1, float(weights[0]), *swarm_round[1:], threading.Event())
        self._submit(self._form_early, self._early, *when)

    def _form_early(self, early: _EarlyGroup, begin: float, expected: float) -> None:
        """Background thread: at ``begin`` (or when the round starts, if sooner) begin its matchmaking. The group
        waits for latecomers until the window has passed after the payload is ``expected``, as it would unprepared
        (a peer that did not prepare, a joiner's first round, arrives then); a full group forms at once."""
        early.due.wait(timeout=max(0.0, begin - time.monotonic()))
        if early.abandoned or self._closed:
            return
        wait = self.clock.window() + max(0.0, expected - time.monotonic())
        try:
            # A groupmate whose payload is ready first sends as soon as the group forms: expect its bytes from now
            # on (a mailbox refuses a round it does not expect, and both sides of the ring then waited out the
            # deadline), as an unprepared round expects them before it looks for its group.
            self._mailbox_for().expect(early.number, early.limit)
            early.control = self._matchmake(early.averager, [torch.zeros(1)], early.number, 0, None, early.weight,
                                            wait, wait + 4 * self._request_timeout + 1.0)  # fmt: skip
            early.began = time.monotonic()
        except Exception as e:  # noqa: BLE001 - the averager process is gone: the round looks for its group itself
            log.info("round %d: could not begin forming its group early: %s", early.number, e)

    def _abandon_early(self, early: _EarlyGroup, why: str) -> None:
        """Main thread: the early group will not be used; the background thread cancels its matchmaking."""
        early.abandoned = True
        early.due.set()
        if self._early is early:
            self._early = None
        self._submit(self._drop_early, early, why)

    @staticmethod
    def _drop_early(early: _EarlyGroup, why: str) -> None:
        if early.control is None:
            return
        formed = early.control.stage not in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)
        early.control.cancel()
        # its other members wait for us until their deadline and fail the round: rare (a strategy's start that
        # does not match its prepare), and never a wrong average
        (log.warning if formed else log.info)("round %d: abandoned the group formed early (%s)", early.number, why)

    def _take_early(self, number: int, averager: DecentralizedAverager, weight: float) -> _EarlyGroup | None:
        """Background thread, a round's first attempt: the group formed early for it, if it can be used."""
        early = self._early
        if early is None or early.number != number:
            return None
        self._early = None
        if early.abandoned or early.control is None or early.averager is not averager or early.weight != weight:
            self._drop_early(early, f"round {number} has weight {weight}, not the {early.weight} announced"
                             if early.weight != weight else "it could not begin")  # fmt: skip
            return None
        self.early_groups += 1
        return early

    def _round(self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, ranks) -> Round:
        return self._finish(self._prepare(tensors, weights, key))

    @torch.no_grad()
    def _prepare(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, group: Sequence[int] | None = None
    ) -> dict:
        """Encode this peer's contribution (error feedback advances here: the codecs are snapshotted first, so a
        round that then fails can roll it back) and pick the exchange (``aggregate.exchange_path``). group: a
        gossip round's member ranks (None: the swarm)."""
        if weights.numel() != 1 or any(t.shape[0] != 1 for t in tensors):
            raise ValueError("backend=hivemind hosts exactly one worker per process (got a stacked batch > 1)")
        if self.rank is None:
            raise ValueError("this peer has no worker rank yet (pick_rank() before averaging)")
        members = sorted({int(r) for r in group}) if group is not None else None
        if members is not None and self.rank not in members:
            raise ValueError(f"a gossip round's group {members} does not hold this peer's rank {self.rank}")
        weight = float(weights[0])
        local = [t[0].detach().to("cpu", torch.float32) for t in tensors]
        codecs = self._codecs_for(key)
        self.clock.entering_round()
        number = self.round + 1  # every peer starts the same rounds in the same order: a swarm-wide sequence
        self.round = number
        if self._prepared_at is not None:
            self.clock.observe_phase(time.monotonic() - self._prepared_at)
            self._prepared_at = None
        if self._early is not None:
            if (self._early.key, self._early.number, group) != (key, number, None):
                self._abandon_early(self._early, f"the round started is {key!r} {number}")
            else:
                self._early.due.set()  # the payload is here: begin forming the group now if not yet begun
        job: dict[str, Any] = {"key": key, "number": number, "codecs": codecs, "unsent": None, "group": members}
        # rounds are counted from 0 for shared randomness, as on sim and torch
        with self._rollback_lock:  # the background thread may be rolling back an earlier round of this key
            job["snapshot"] = codecs.snapshot(len(local))
            try:
                payloads = codecs.encode(local, round_=number - 1)
            except ValueError as e:  # e.g. a quantiser refuses NaN: we send nothing this round (as on sim)
                log.warning("round %d (%s): could not encode our contribution: %s", number, key, e)
                job["unsent"] = f"could not encode: {e}"
                codecs.restore(copy.deepcopy(job["snapshot"]))
                # a valid payload of zeros with weight 0 keeps us in step with the group; our codecs stay as they were
                throwaway = copy.deepcopy(codecs)
                payloads, weight = throwaway.encode([torch.zeros_like(t) for t in local], round_=number - 1), 0.0
            self._pending.setdefault(key, []).append(job)  # with the encode: no roll back may slip in between
        # every member needs every row to verify it: all-gathered, whatever the codec and the aggregator
        path = "allgather" if self.verify else exchange_path(codecs.summable, codecs.reducible, self.aggregator)
        target = len(members) if members is not None else None
        try:
            if (members or list(range(self.workers))) == [self.rank]:  # a group of one (gossip, or workers=1: a
                mode, averager = "alone", None  # pipeline stage of one peer): our own contribution, nothing to send
            elif path == "allreduce" and self.cfg.allreduce == "mailbox" and codecs.reducible:
                mode = "reduce"  # fp32: reduce-scatter over our mailbox (comm/exchange.py), not the butterfly
                averager = self._averager_for(key, [torch.zeros(1)], NoCompression(), target)
            elif path == "allreduce" and self.cfg.allreduce == "ring" and codecs.wire_dtype(payloads) == torch.float32:
                mode = "ring"  # fp32: a pipelined ring over our mailbox's streams (comm/hivemind_gather.py)
                averager = self._averager_for(key, [torch.zeros(1)], NoCompression(), target)
            elif path == "allreduce" and codecs.wire_dtype(payloads) in BUTTERFLY_WIRE:
                mode = "butterfly"
                wire = codecs.wire_values(payloads)
                averager = self._averager_for(key, [wire.to(torch.float32)], BUTTERFLY_WIRE[wire.dtype], target)
            else:  # a summable wire hivemind cannot carry (bf16) is all-gathered, and summed as the all-reduce would
                mode = "reduce" if path == "reduce_scatter" else "gather"
                averager = self._averager_for(key, [torch.zeros(1)], NoCompression(), target)
        except BaseException:
            self._settle(job, rolled_back=True)  # the round never starts: nothing of its encode was sent
            raise
        if members is None and averager is not None:  # what ``prepare`` forms the next round's group with
            self._swarm_rounds[key] = (mode, averager, _mailbox_limit(mode, payloads))
        job.update(weight=weight, local=local, devices=[t.device for t in tensors], payloads=payloads, mode=mode,
                   path=path, averager=averager, t0=time.monotonic())  # fmt: skip
        return job

    def _metadata(self, number: int, weight: float) -> dict:
        """What this peer tells its group in matchmaking (checked by every member: ``malformed_metadata``)."""
        info = {"t": get_dht_time(), "w": weight, "round": number, "rank": self.rank}
        if self._commit is not None and self._commit[0] == number:
            info["c"] = self._commit[1]
        return info

    @torch.no_grad()
    def _finish(self, job: dict) -> Round:
        """The network part of a round (runs in the background thread)."""
        number, local, payloads, weight, codecs = (
            job["number"],
            job["local"],
            job["payloads"],
            job["weight"],
            job["codecs"],
        )
        mode = job["mode"]
        payload_bytes = sum(p.nbytes for p in payloads)
        failed, skipped = False, 0
        try:
            if mode == "alone":
                mean, members, total_weight, sent, rejected = self._alone(codecs, payloads), [self.rank], weight, 0, {}
            else:
                mean, members, total_weight, sent, rejected = self._run_round(
                    number, payloads, weight, mode, codecs, job["averager"], job["path"], job["group"]
                )
        except RoundFailed as e:
            self.clock.missed()
            rejected = e.rejected
            for rank, why in sorted(rejected.items()):
                log.warning("round %d: rank %d's contribution rejected: %s", number, rank, why)
            if job["group"] is not None:
                # A gossip round: every group averages something else, so a peer whose partner is gone keeps its own
                # replica (a zero update: the strategy skips a round without members). Gossip runs in step (a
                # phase's groups and key are the round's), so a peer the others have left behind skips to their
                # round at once, keeping its replica (``Round.skipped``; the strategy skips the same phases).
                mean, members, failed = [torch.zeros_like(t) for t in local], [], True
                # as far as the slowest live peer that is not behind us (a peer behind us is dead or catching up):
                # skipping further would strand the partners still in the rounds we skip
                ahead = min((int(r["round"]) for r in self._others()
                             if _is_int(r.get("round")) and int(r["round"]) >= number), default=number)  # fmt: skip
                if ahead > number:
                    skipped = ahead - number
                    log.warning("round %d (group %s) failed (%s); the swarm is at round %d: skipping to it with our "
                                "replica", number, job["group"], e, ahead)  # fmt: skip
                else:
                    log.warning("round %d (group %s) failed (%s); keeping our replica", number, job["group"], e)
            elif self._others():
                # Others are alive: apply a zero update (every peer that missed this round moves its state the
                # same way, so they stay equal to each other) and take the swarm's state at the boundary. Nothing
                # of our encode reached anyone: roll the codecs back (error feedback) to before it.
                log.warning("round %d failed (%s); skipping its update, resyncing at the boundary", number, e)
                self.in_sync = False
                mean, members, failed = [torch.zeros_like(t) for t in local], [], True
            else:  # nobody else is left: we are the swarm, a group of one (its update went through the codec too)
                log.warning("round %d failed (%s) and no other peer is alive; continuing alone", number, e)
                mean, members = self._alone(codecs, payloads), [self.rank]
            total_weight, sent = weight, 0.0
        finally:
            self._settle(job, rolled_back=failed)  # also when something else raised: the job is no longer pending
            self.round += skipped  # no round of ours runs in between: noloco waits for each before the next
            self.finished = number + skipped
            if failed and self._evidence is not None and self._evidence[0] == number:
                self._evidence = None  # a failed round verifies no one
        if job["unsent"] is not None:
            rejected[self.rank] = job["unsent"]
        return Round(
            tensors=[m.to(d) for m, d in zip(mean, job["devices"], strict=True)],
            group_size=len(members),
            bytes_sent=sent,
            bytes_received=sent,
            seconds=time.monotonic() - job["t0"],
            compression_ratio=payload_bytes / max(1, sum(t.numel() * 4 for t in local)),
            payload_bytes=float(payload_bytes),
            total_weight=total_weight,
            allgather=mode == "gather",
            key=job["key"],
            members=members,
            rejected=dict(sorted(rejected.items())),
            skipped=skipped,
        )

    @staticmethod
    def _alone(codecs: LocalCodecs, payloads: list[Payload]) -> list[torch.Tensor]:
        """The mean of a group of one: our own contribution, through the codec as the group's would be."""
        return codecs.decode_mean([codecs.pack(payloads)], [1.0], payloads)

    def _settle(self, job: dict, rolled_back: bool) -> None:
        """A round of ``job["key"]`` is over (rounds finish in start order, so it is the oldest pending one of its
        key). ``rolled_back``: its update was not applied, so undo its encode. If no later round of the key has
        encoded yet, the codecs go back to the snapshot taken before it, exactly. Otherwise (diloco's
        outer_delay=1 starts the next round first) the later encode built on our residual: subtract what ours
        added to each error-feedback residual (the difference between the next round's snapshot and ours), from
        the codecs and from the later rounds' snapshots, so the residual again holds what was encoded minus what
        was applied; other codec state (PowerSGD's warm start: any start is valid) stays."""
        with self._rollback_lock:
            pending = self._pending.get(job["key"], [])
            i = next((i for i, j in enumerate(pending) if j is job), None)
            if i is None:
                return
            later = pending[i + 1 :]
            del pending[i]
            if not rolled_back:
                return
            codecs: LocalCodecs = job["codecs"]
            if not later:
                codecs.restore(job["snapshot"])
                log.info("round %d (%s): the codecs' state is back to before its encode", job["number"], job["key"])
                return
            before, after = residuals(job["snapshot"]), residuals(later[0]["snapshot"])
            for i, (b, a) in enumerate(zip(before, after, strict=False)):
                if a is None:
                    continue
                added = a - b if b is not None else a.clone()
                for res in (codecs.residuals()[i], *(residuals(j["snapshot"])[i] for j in later)):
                    if res is not None:
                        res.sub_(added.to(res.device, res.dtype))
            log.info("round %d (%s): its error-feedback contribution is taken out of the residuals (%d later "
                     "round(s) of the key had encoded already)", job["number"], job["key"], len(later))  # fmt: skip

    def _run_round(
        self,
        number: int,
        payloads: list[Payload],
        weight: float,
        mode: str,
        codecs: LocalCodecs,
        averager: DecentralizedAverager,
        path: str = "allreduce",
        gossip: list[int] | None = None,
    ):
        """One round: find a group, exchange, screen and aggregate, check the group agrees. Returns (result, the
        members' worker ranks, total weight, bytes sent, rejected rank -> reason). ``mode``: "butterfly"
        all-reduces the summable wire values in the DecentralizedAverager; "gather" (all-gather), "reduce"
        (re-quantising reduce-scatter) and "ring" (fp32 ring all-reduce) send the payloads peer to peer
        (comm/hivemind_gather.py) and the DecentralizedAverager only forms the group. ``path``:
        ``aggregate.exchange_path``'s, which decides how the gathered rows are combined. ``gossip``: a gossip round's
        member ranks (only they meet), None: the swarm."""
        if mode != "butterfly":
            local = [torch.zeros(1)]  # matchmaking only; the payloads travel through the mailbox
            mailbox = self._mailbox_for()
            # ring: fp32 wire values, never packed (a 2x copy of the payload on the critical path)
            blob = b"" if mode == "ring" else codecs.pack(payloads)
            mailbox.expect(number, _mailbox_limit(mode, payloads))
        else:
            # exact: fp16 values widen to fp32 and Float16Compression narrows back
            local = [codecs.wire_values(payloads).to(torch.float32)]
        payload_bytes = sum(p.nbytes for p in payloads)
        window = self.clock.window()
        self.clock.matchmaking_began()
        allowance = self.clock.allreduce_allowance()
        give_up = time.monotonic() + window + allowance
        log.info("round %d: looking for a group (window %.1fs, all-reduce allowance %.1fs)", number, window, allowance)
        attempt = 0
        redo = 0  # re-runs after the group's averages disagreed; the whole group counts them in lockstep
        while True:
            attempt += 1
            remaining = give_up - time.monotonic()
            if remaining <= 1.0:
                raise RoundFailed(f"no time left for attempt {attempt}")
            early = self._take_early(number, averager, weight) if attempt == 1 else None
            t_step = time.monotonic()
            if early is not None:  # ``prepare``: the group has been forming since before the payload existed
                control = early.control
                log.info("round %d: its group began forming %.2fs before the round", number, t_step - early.began)
            else:
                wait = min(window, remaining / 2)
                # Finding a group may take the window plus a few request round-trips, not the all-reduce allowance:
                # a peer that arrives after its group has left should give up and resync, not wait it out.
                find_timeout = min(remaining, wait + 4 * self._request_timeout + 1.0)
                try:
                    control = self._matchmake(averager, local, number, redo, gossip, weight, wait, find_timeout)
                except Exception as e:  # noqa: BLE001 - the step's setup failed (averager process gone)
                    raise RoundFailed(f"could not start: {type(e).__name__}: {e}") from e
            started_allreduce = None
            gathered = None
            while gathered is None:
                try:
                    gathered = control.result(timeout=0.05)
                    if gathered is None:
                        raise RoundFailed("the averager returned no group")
                except FutureTimeout:
                    if started_allreduce is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                        started_allreduce = time.monotonic()
                    if time.monotonic() > give_up:
                        control.cancel()
                        raise RoundFailed(f"deadline: window {window:.1f}s + all-reduce {allowance:.1f}s") from None
                except (KeyboardInterrupt, SystemExit):
                    control.cancel()
                    raise
                except RoundFailed:
                    raise
                except BaseException as e:  # noqa: BLE001 - hivemind raises anything from MatchmakingException to CancelledError
                    if started_allreduce is None and self._swarm_is_past(number, gossip):
                        who = "peer" if gossip is None else f"member of group {gossip}"
                        raise RoundFailed(f"every other {who} is past round {number} or has left") from e
                    if started_allreduce is None and time.monotonic() + 1.0 < give_up:
                        log.info("round %d: matchmaking attempt %d failed (%r); retrying", number, attempt, e)
                        break
                    raise RoundFailed(f"{type(e).__name__}: {e}") from e
            if gathered is None:
                continue
            done = time.monotonic()
            # Every member gets the same gathered metadata from hivemind, so all drop the same malformed peers.
            group, rejected = self._screen_metadata(number, gathered, gossip)
            infos = list(group.values())
            spread = max(i["t"] for i in infos) - min(i["t"] for i in infos)
            n = len(group)
            members = sorted(int(i["rank"]) for i in infos if i["w"] > 0)
            if mode != "butterfly":
                if started_allreduce is None:
                    started_allreduce = done
                try:
                    if mode == "gather":
                        mean, dropped = self._gather_mean(codecs, number, redo, group, blob, payloads, give_up, path)
                        sent = allgather_bytes(n, payload_bytes)
                    elif mode == "ring":
                        mean, dropped = self._ring_mean(codecs, number, redo, group, payloads, members, give_up)
                        sent = round_bytes(n, payload_bytes)
                    else:
                        mean, sent, dropped = self._reduce_mean(codecs, number, redo, group, payloads, give_up)
                except (GatherFailed, ValueError) as e:
                    raise RoundFailed(f"{mode} of the payloads: {e}") from e
                done = time.monotonic()  # the exchange is the peer-to-peer one: its time sets the next allowance
            else:
                with averager.get_tensors() as buffers:
                    mean = codecs.decode_values(buffers[0].detach().clone(), payloads)
                sent = round_bytes(n, payload_bytes)
                if rejected:  # an outsider's values are in the sum and cannot be taken out: nothing of it is used
                    why = "the all-reduce's sum includes a peer with malformed metadata (the round is rejected)"
                    mean, dropped = [torch.zeros_like(t) for t in mean], dict.fromkeys(members, why)
                else:  # summed on the wire: only the sum can be screened (comm/aggregate.py)
                    mean, dropped = reject_nonfinite_sum(mean, members)
            rejected = {**dropped, **rejected}
            self.clock.observe(spread, done - started_allreduce if started_allreduce is not None else None)
            t_check = time.monotonic()
            agreed = self._check_agreement(number, redo, mean, list(group))
            if not agreed and redo < MAX_REDOS and time.monotonic() + 1.0 < give_up:
                # Every member saw the same sketches, so all re-run the round together on their original inputs.
                redo += 1
                log.warning("round %d: the group's averages disagree (a part was lost); re-running it", number)
                continue
            if not agreed:
                self._adopt_majority(number)
            matched = started_allreduce if started_allreduce is not None else done
            if early is None:  # the time forming a group takes: ``prepare`` begins that much (x3) ahead
                self.clock.matchmaking = matched - t_step
            log.info(
                "round %d: group of %d (ranks %s): matchmaking %.2fs, all-reduce %.2fs, check %.2fs (window %.1fs)",
                number,
                n,
                sorted(int(i["rank"]) for i in infos),
                matched - t_step,
                done - matched,
                time.monotonic() - t_check,
                window,
            )
            for rank, why in sorted(rejected.items()):
                log.warning("round %d: rank %d's contribution rejected: %s", number, rank, why)
            expected = 1 + sum(1 for r in self._others() if int(r.get("round", -1)) >= number - 1
                               and (gossip is None or r.get("rank") in gossip))  # fmt: skip
            if n < expected:
                self.clock.missed()  # live peers were left out: widen the window for the next round
            return mean, members, float(sum(i["w"] for i in infos)), sent, rejected

    def _matchmake(
        self,
        averager: DecentralizedAverager,
        local: list[torch.Tensor],
        number: int,
        redo: int,
        gossip: list[int] | None,
        weight: float,
        wait: float,
        timeout: float,
    ) -> Any:
        """Begin looking for the group of round ``number`` (its ``redo``-th re-run) and all-reducing ``local`` in it;
        returns hivemind's StepControl."""
        # Copy in every attempt: a failed all-reduce may have left a partial average in the buffers.
        with averager.get_tensors() as buffers:
            for b, t in zip(buffers, local, strict=True):
                b.copy_(t)
        key = (number % (1 << ROUND_BITS)) << REDO_BITS | min(redo, (1 << REDO_BITS) - 1)
        bits = format(key, f"0{ROUND_BITS + REDO_BITS}b")
        if gossip is not None:
            bits += format(min(gossip) % (1 << GROUP_BITS), f"0{GROUP_BITS}b")
        averager.set_group_bits(bits)
        return averager.step(
            gather=self._metadata(number, weight),
            scheduled_time=get_dht_time() + wait,
            weight=weight,
            timeout=timeout,
            allow_retries=False,  # hivemind's retry would re-run on a half-averaged buffer
            wait=False,
        )

    def _screen_metadata(
        self, number: int, gathered: dict, gossip: list[int] | None = None
    ) -> tuple[dict, dict[int, str]]:
        """The group's metadata, checked (``malformed_metadata``): (peer -> metadata of the well-formed members,
        rejected rank -> reason for the others). A malformed peer, or one outside ``backend.allowed_peers``, is
        dropped from the round: the payload exchange neither waits for it nor uses what it sends. A malformed peer
        is reported under the rank it claims if that is a valid rank no well-formed member holds, else (and an
        outsider always) under -1 (no trustworthy rank; the reason names its peer id)."""
        me = self.dht.peer_id  # the averager's and the mailbox's P2P are replicas of the DHT's: one peer id
        group: dict[PeerID, dict] = {}
        bad: dict[PeerID, str] = {}
        for peer, info in gathered.items():
            if self.allowed is not None and peer not in self.allowed:
                bad[peer] = f"peer {peer} is not in backend.allowed_peers"
            elif (why := malformed_metadata(info, number, self.workers)) is not None:
                bad[peer] = f"malformed round metadata from peer {peer}: {why}"
            elif info["rank"] in self.excluded and peer != me:
                bad[peer] = f"excluded: {self.excluded[info['rank']]}"
            elif gossip is not None and info["rank"] not in gossip:
                bad[peer] = f"rank {info['rank']} is not in this gossip round's group {gossip}"
            else:
                group[peer] = info
        if me not in group:
            raise RoundFailed(f"our own metadata was refused: {bad}")
        taken = {int(i["rank"]) for i in group.values()}
        rejected: dict[int, str] = {}
        for peer, why in bad.items():
            info = gathered[peer]
            admitted = self.allowed is None or peer in self.allowed  # an outsider holds no rank of this run
            claimed = info.get("rank") if isinstance(info, dict) and admitted else None
            rank = claimed if _is_int(claimed) and 0 <= claimed < self.workers and claimed not in taken else -1
            rejected[rank] = f"{rejected[rank]}; {why}" if rank in rejected else why
        return group, rejected

    def board(self, key: str, values: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        full = f"{self.cfg.run_id}_board_{key}"
        mine = None if values is None else values.detach().to("cpu", torch.float32).reshape(-1)
        if mine is not None:
            self._dht_store(full, {"rank": self.rank, "v": mine.numpy().tobytes()}, ttl=600, wait=False)
        seen: dict[int, torch.Tensor] = {}
        for record in self._dht_get(full).values():  # signed records; a malformed one is skipped
            rank, blob = (record.get("rank"), record.get("v")) if isinstance(record, dict) else (None, None)
            if _is_int(rank) and 0 <= rank < self.workers and isinstance(blob, bytes) and len(blob) % 4 == 0:
                seen[rank] = torch.frombuffer(bytearray(blob), dtype=torch.float32)
        if mine is not None:
            seen[self.rank] = mine
        return seen

    def shared_model(
        self,
        params: Sequence[torch.Tensor],
        apply: Callable[[list[torch.Tensor], dict], dict],
        outer_state: Callable[[], dict],
        load_outer_state: Callable[[dict | None], None],
    ) -> SharedModel:
        """async_diloco's global model (comm/shared_model.py): pushes go through the run's codec (key "async"),
        its claims are signed DHT records, and a clean exit hands it to the lowest live rank."""
        if self._shared is not None:
            return self._shared
        encode, decode, size = push_codec(self.compression, self.seed, [p.shape for p in params])

        def live() -> list[tuple[PeerID, int]]:
            me = self.dht.peer_id.to_bytes().hex()
            return [(PeerID(bytes.fromhex(k)), int(r["rank"])) for k, r in self.progress().items()
                    if k != me and not r.get("left") and _is_int(r.get("rank"))]  # fmt: skip

        with self._dht_lock:  # it replicates the DHT's P2P client through the DHT's pipe
            self._shared = SharedModel(
                self.dht, f"{self.cfg.run_id}_model", self.rank, self.workers, params,
                encode=encode, decode=decode, payload_limit=size, apply=apply, outer_state=outer_state,
                load_outer_state=load_outer_state,
                store=lambda key, value, ttl: self._dht_store(key, value, ttl, wait=False), get=self._dht_get,
                live=live, patience=max(120.0, self.cfg.first_round_timeout),
            )  # fmt: skip
        return self._shared

    def join_stage(self, stage: int) -> None:
        """Serve pipeline stage ``stage`` (pipeline/peer.py): from now on this peer averages, shares its run state
        and counts its rank among that stage's peers only (run id ``<run_id>_stage<s>``). Call before the first round."""
        if self.round or self._averagers:
            raise RuntimeError("join_stage after averaging began")
        self.stage = stage
        self.cfg = dataclasses.replace(self.cfg, run_id=f"{self.base_run_id}_stage{stage}")

    def stage_directory(self) -> list[Listing]:
        """The pipeline's live stage peers (pipeline/remote.py), e.g. to pick a joiner's stage."""
        return [r for r in read_directory(self._dht_get, self.base_run_id).values() if r is not None]

    def stage_link(self, codec: Codec, limit: int, joined: int) -> StageLink:
        """This stage peer's calls to and from the other stages (pipeline/remote.py); closed before the DHT."""
        if self.stage is None or self.rank is None:
            raise RuntimeError("stage_link needs join_stage and a rank first")
        if self._link is None:
            with self._dht_lock:  # it replicates the DHT's P2P client through the DHT's pipe
                self._link = StageLink(self.dht, self.base_run_id, self.stage, self.rank, codec, limit,
                                       store=lambda key, value, ttl: self._dht_store(key, value, ttl, wait=False),
                                       get=self._dht_get, joined=joined)  # fmt: skip
        return self._link

    def _mailbox_for(self) -> PayloadMailbox:
        if self._mailbox is None:
            with self._dht_lock:  # it replicates the DHT's P2P client through the DHT's pipe
                self._mailbox = PayloadMailbox(self.dht, f"{self.cfg.run_id}_payloads")
        return self._mailbox

    @staticmethod
    def _order(group: dict) -> list[PeerID]:
        """The group's members in (rank, peer id) order: the order every member aggregates in."""
        return sorted(group, key=lambda p: (int(group[p]["rank"]), p.to_bytes()))

    def _gather_mean(
        self,
        codecs: LocalCodecs,
        number: int,
        redo: int,
        group: dict,
        blob: bytes,
        payloads: list[Payload],
        give_up: float,
        path: str = "allgather",
    ) -> tuple[list[torch.Tensor], dict[int, str]]:
        """All-gather the group's payloads; decode them in (rank, peer id) order and combine them as the sim does:
        screened and aggregated (``aggregate.combine``), or, where the sim all-reduces (``path`` "allreduce": a
        summable codec hivemind's butterfly cannot carry), summed and only the sum screened. A payload that fails
        to decode drops its sender from the round. Returns (result, rejected rank -> reason)."""
        assert self._mailbox is not None
        order = self._order(group)
        got = self._mailbox.exchange(number, redo, order, blob, deadline=give_up)
        weights = torch.tensor([float(group[p]["w"]) for p in order], dtype=torch.float64)
        if not weights.sum() > 0:
            raise RoundFailed("no member of the group has a positive weight")
        shares = (weights / weights.sum()).tolist()
        rows, kept, rejected = [], [], {}
        for j, p in enumerate(order):
            try:
                rows.append(codecs.decode_row(got[p], payloads))
                kept.append(j)
            except ValueError as e:
                rejected[int(group[p]["rank"])] = f"malformed payload: {e}"
        if not kept:
            raise RoundFailed(f"no payload of the group could be decoded: {rejected}")
        if self.verify:  # what each groupmate sent, for verification by replay (``evidence``)
            me = self.dht.peer_id
            rows_of = [(order[j], group[order[j]], row) for j, row in zip(kept, rows, strict=True) if order[j] != me]
            self._evidence = (number, rows_of)
        if rejected:
            total = sum(shares[j] for j in kept)
            shares = [shares[j] / total for j in kept]
        ranks = [int(group[order[j]]["rank"]) for j in kept]
        if path == "allreduce":
            mean, dropped = reject_nonfinite_sum(self.mean(rows, shares), range(len(rows)))
        else:
            mean, dropped = combine(self.aggregator, rows, shares, self.max_norm_ratio)
        return mean, {**{ranks[j]: why for j, why in dropped.items()}, **rejected}

    def _ring_mean(
        self,
        codecs: LocalCodecs,
        number: int,
        redo: int,
        group: dict,
        payloads: list[Payload],
        members: list[int],
        give_up: float,
    ) -> tuple[list[torch.Tensor], dict[int, str]]:
        """``backend.allreduce=ring``: each member scales its fp32 wire values by its share of the group's weight
        and the ring sums them (``PayloadMailbox.ring_sum``), in (rank, peer id) order. Summed on the wire, as by the
        butterfly: only the sum can be screened. Returns (mean, rejected rank -> reason)."""
        assert self._mailbox is not None
        order = self._order(group)
        weights = torch.tensor([float(group[p]["w"]) for p in order], dtype=torch.float64)
        if not weights.sum() > 0:
            raise RoundFailed("no member of the group has a positive weight")
        share = float(group[self._mailbox.peer_id]["w"]) / float(weights.sum())
        values = codecs.wire_values(payloads).to(torch.float32).mul_(share)  # a fresh tensor: summed into in place
        total = self._mailbox.ring_sum(number, redo, order, values, give_up, in_place=True)
        return reject_nonfinite_sum(codecs.decode_values(total, payloads), members)

    def _reduce_mean(
        self, codecs: LocalCodecs, number: int, redo: int, group: dict, payloads: list[Payload], give_up: float
    ) -> tuple[list[torch.Tensor], float, dict[int, str]]:
        """Re-quantising reduce-scatter (comm/exchange.py): the members with weight own the blocks in (rank, peer id)
        order; each sends every owner its slice, each owner screens the slices of its chunk and re-encodes their
        weighted mean for everyone, followed by its screening report (so every member reports the same rejections,
        merged in the sim's order). Returns (mean, bytes this peer sent, rejected rank -> reason)."""
        assert self._mailbox is not None
        me = self._mailbox.peer_id
        order = self._order(group)
        weights = torch.tensor([float(group[p]["w"]) for p in order], dtype=torch.float64)
        if not weights.sum() > 0:
            raise RoundFailed("no member of the group has a positive weight")
        shares = dict(zip(order, (weights / weights.sum()).tolist(), strict=True))
        owners = [p for p in order if shares[p] != 0.0]
        n = len(owners)
        sizes = codecs.chunk_sizes(payloads, n)
        reduced: dict[PeerID, bytes] = {}
        reports: dict[PeerID, list[dict[int, str]]] = {}
        to_send: dict[PeerID, bytes] = {}
        sent = 0.0
        if me in owners:
            j = owners.index(me)
            pieces = codecs.split(payloads, n)
            if n == 1:
                reduced[me] = pieces[0]  # nothing to average: the payload as is (sim decodes it once too)
            else:
                got = self._mailbox.send_and_receive(
                    number, redo, "scatter", dict(zip(owners, pieces, strict=True)), owners, give_up
                )
                got[me] = pieces[j]
                blobs = [got[p] for p in owners]
                reduced[me], reports[me] = codecs.reduce_owned_screened(
                    j, n, blobs, [shares[p] for p in owners], payloads, self.max_norm_ratio, drop_malformed=True
                )
                sent += sum(sizes) - sizes[j]
            to_send = {p: reduced[me] + _pack_report(reports.get(me, [])) for p in order if p != me}
            sent += len(to_send) * sizes[j]  # the report is metadata, like the weights: not counted
        for p, blob in self._mailbox.send_and_receive(number, redo, "reduced", to_send, owners, give_up).items():
            size = sizes[owners.index(p)]
            reduced[p], reports[p] = blob[:size], _unpack_report(blob[size:], n, p)
        try:
            mean = codecs.assemble([reduced[p] for p in owners], payloads)
        except BadChunk as e:  # without that owner's chunk there is no mean: the round fails, blaming its sender
            rank = int(group[owners[e.owner]]["rank"])
            raise RoundFailed(f"reduce of the payloads: {e}", {rank: f"malformed reduced chunk: {e}"}) from e
        dropped = merge_dropped([reports.get(p, []) for p in owners]) if n > 1 else {}
        return mean, sent, {int(group[owners[j]]["rank"]): why for j, why in dropped.items()}

    # ------------------------------------------------------------------ verification by replay (verify.py)
    def commit(self, start_state: bytes) -> None:
        if not self.verify:
            raise ValueError("this averager was built without verify=True: its rows are not kept for checks")
        number = self.round + 1  # the next round this peer starts
        self._mailbox_for().serve(number, start_state)
        self._commit = (number, commitment(start_state), len(start_state))

    def evidence(self) -> list[Evidence]:
        if self._evidence is None or self._evidence[0] != self.finished:
            return []
        number, rows = self._evidence
        assert self._mailbox is not None and self._commit is not None
        # a worker's state is the same size on every peer, up to a few bytes of pickled integers
        limit, timeout = 2 * self._commit[2] + (1 << 20), max(5.0, 4 * self._request_timeout)
        out = []
        for peer, info, row in sorted(rows, key=lambda x: int(x[1]["rank"])):
            if "c" not in info:  # it made no commitment: nothing to hold it to (it is still averaged, unverified)
                log.warning(
                    "round %d: rank %d committed to no start state; it cannot be verified", number, info["rank"]
                )
                continue
            fetch = functools.partial(self._mailbox.fetch, peer, number, limit, timeout)
            out.append(Evidence(int(info["rank"]), float(info["w"]), row, info["c"], fetch))
        return out

    def exclude(self, rank: int, why: str) -> None:
        if rank != self.rank:  # the others exclude us; we cannot leave our own rounds
            self.excluded[rank] = why

    def state_dict(self) -> dict:
        """The codecs' state (error-feedback residuals, PowerSGD's warm start) and the round counter (random-k's
        indices, the matchmaking key): checkpointed with the run, once the rounds in flight are done."""
        self._idle()
        return {"codecs": {k: c.state_dict() for k, c in self.codecs.items()}, "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        for k, c in state.get("codecs", {}).items():
            self._codecs_for(k).load_state_dict(c)
        if "round" in state:  # rounds started, which a strategy's round count need not equal (streaming)
            self.round, self._round_restored = int(state["round"]), True
            self.finished = self.round

    def _idle(self) -> None:
        """Wait until every round started so far has finished (the background thread runs them in start order).
        Never called from the background thread."""
        if self._executor is not None:
            self._submit(_nothing).wait()

    def _check_agreement(self, number: int, redo: int, mean: list[torch.Tensor], group: list[PeerID]) -> bool:
        """Compare sketches of the average with the group (a peer lost mid-all-reduce leaves them different);
        returns whether every groupmate that answered holds the same average. Remembers the clusters. Where the
        payloads went peer to peer, so do the sketches (one message to each groupmate: no DHT round trips on the
        round's critical path); after the butterfly, through the DHT."""
        mine = _sketch(mean)
        me = self.dht.peer_id.to_bytes()
        wait_until = time.monotonic() + max(2.0, 2 * (self.clock.max_allreduce or 1.0))
        if self._mailbox is not None and self._mailbox.expecting(number):
            blob = torch.tensor(mine, dtype=torch.float64).numpy().tobytes()
            got = self._mailbox.send_and_receive(number, redo, "sketch", dict.fromkeys(group, blob), group,
                                                 wait_until, partial=True)  # fmt: skip
            # a malformed sketch (empty, or not whole float64s) is an empty one: it agrees with no one
            seen = {p.to_bytes(): torch.frombuffer(bytearray(b), dtype=torch.float64).tolist()
                    if b and len(b) % 8 == 0 else [] for p, b in got.items()}  # fmt: skip
        else:
            seen = self._sketches_via_dht(f"{self.cfg.run_id}_sketch{number}_{redo}", mine, group, wait_until)
        seen[me] = mine
        clusters: list[list[bytes]] = []
        for peer in sorted(seen):
            for c in clusters:
                if _same(seen[c[0]], seen[peer]):
                    c.append(peer)
                    break
            else:
                clusters.append([peer])
        self._clusters = clusters
        return len(clusters) == 1

    def _sketches_via_dht(
        self, key: str, mine: list[float], group: list[PeerID], wait_until: float
    ) -> dict[bytes, list[float]]:
        members = {p.to_bytes() for p in group}
        me = self.dht.peer_id.to_bytes()
        self._dht_store(key, mine, ttl=300)
        while True:
            seen = {bytes(k): v for k, v in self._dht_get(key).items() if bytes(k) in members}
            if len(seen | {me: mine}) == len(members) or time.monotonic() > wait_until:
                return seen
            time.sleep(0.02)

    def _adopt_majority(self, number: int) -> None:
        """After the re-runs are used up: the majority cluster's average stands (a tie goes to the cluster with
        the smallest peer id: deterministic, so every member agrees); the others resync at the boundary."""
        me = self.dht.peer_id.to_bytes()
        best = max(self._clusters, key=lambda c: (len(c), [-b for b in min(c)]))
        if me not in best:
            log.warning(
                "round %d: our average differs from %d groupmates'; resyncing at the boundary", number, len(best)
            )
            self.in_sync = False

    # ------------------------------------------------------------------ run state (join / resync)
    def attach_run_state(
        self, get_state: Callable[[], dict], set_state: Callable[[dict], None], rounds: int = 0
    ) -> None:
        """Make the run state shareable; if the swarm is already past our round (``rounds``, the strategy rounds
        of a resumed run, used only if the checkpoint did not restore the averager's own count), download it first
        (joining)."""
        self._get_state, self._set_state = get_state, set_state
        if not self._round_restored:  # a checkpoint without the averager's round: the strategy's count (diloco's)
            self.round = rounds
        self._server = _started(
            lambda: _StateServer(
                [torch.zeros(1)],
                self.dht,
                start=True,
                prefix=f"{self.cfg.run_id}_state",
                min_matchmaking_time=self.cfg.min_matchmaking_time,
                request_timeout=self._request_timeout,
                allow_state_sharing=True,
                provide=self._provide,
                allowed=self.allowed,
            )
        )
        others = [r for r in self._others() if r.get("round", 0) > self.round]
        if others:
            swarm_round = max(r["round"] for r in others)
            period = max(float(r.get("period") or 0.0) for r in others)
            # State is served at the swarm's next round boundary, and the round in progress may stall for up to its
            # all-reduce allowance first (first_round_timeout before anything is measured): CI once saw a joiner
            # give up after 60 s while its swarm's round 2 took 62 s to fail and resync.
            timeout = self.cfg.join_timeout or max(60.0, self.cfg.first_round_timeout,
                                                   self.cfg.deadline_margin * 2 * period)  # fmt: skip
            log.info("joining a swarm at round %d: downloading its state (up to %.0fs)", swarm_round, timeout)
            self.in_sync = False
            if not self._download(min_round=swarm_round, timeout=timeout):
                raise RuntimeError(
                    f"could not download the swarm's state within {timeout:.0f}s "
                    "(set backend.join_timeout to wait longer)"
                )
        self._server.state_sharing_priority = float(self.round)
        self._publish_progress()
        if self.expected_peers and not others:
            self._await_launched_peers()
        self.clock.phase_started()

    def _await_launched_peers(self) -> None:
        """Peers launched together start training together (a bounded wait until all have registered), so
        their first round is not decided by who imported torch fastest."""
        assert self.expected_peers is not None
        end = time.monotonic() + self.cfg.first_round_timeout
        seen = 0
        while time.monotonic() < end:
            seen = len(self.progress())
            if seen >= self.expected_peers:
                log.info("all %d launched peers are up; training", seen)
                return
            self._publish_progress()
            time.sleep(0.25)
        log.warning("%d of %d launched peers registered; training anyway", seen, self.expected_peers)

    def _provide(self) -> tuple[dict, list[torch.Tensor]]:
        """Serve our run state to a peer: the snapshot taken at our *next* round boundary (joiners then start
        the following phase in lockstep with the swarm)."""
        wait = 2 * self.clock.window() + self.clock.allreduce_allowance() + 4 * (self.clock.period or 30.0)
        with self._cond:
            self._requests += 1
            before = self._snapshot
            self._cond.wait_for(lambda: self._snapshot is not before or self._closed, timeout=wait)
            if self._snapshot is None or self._snapshot is before:
                self._requests = max(0, self._requests - 1)
                raise RuntimeError("no fresh run state to serve")
            return self._snapshot

    def _take_snapshot(self) -> None:
        self._idle()  # the state and its metadata include the rounds in flight (see the module docstring)
        buf = io.BytesIO()
        torch.save(self._get_state(), buf)
        blob = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        meta = {"round": self.round, "in_sync": self.in_sync, "rank": self.rank, "t": get_dht_time()}
        with self._cond:
            self._snapshot = (meta, [blob])
            self._requests = 0
            self._cond.notify_all()

    @staticmethod
    def _usable_state(meta: Any, min_round: int) -> bool:
        """Whether a donor's state metadata says: in sync, at round ``min_round`` or later (a peer's word only; the
        state itself is checked by ``_apply``)."""
        return isinstance(meta, dict) and meta.get("in_sync") is True and _is_int(meta.get("round")) and (
            meta["round"] >= min_round)  # fmt: skip

    def _apply(self, meta: dict, tensors: Sequence[torch.Tensor]) -> bool:
        """Load a donor's state; False (logged, nothing changed) unless it is what ``_take_snapshot`` sends: one
        uint8 tensor that ``torch.load(weights_only=True)`` reads as a dict. A donor is any peer: its bytes are
        untrusted (weights_only also means they cannot run code)."""
        if len(tensors) != 1 or not isinstance(tensors[0], torch.Tensor) or tensors[0].dtype != torch.uint8:
            log.warning("refused a state from rank %s: not one byte tensor", meta.get("rank"))
            return False
        try:
            state = torch.load(io.BytesIO(tensors[0].numpy().tobytes()), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever the unpickler raises, these bytes are not a state
            log.warning("refused a state from rank %s: %s", meta.get("rank"), f"{type(e).__name__}: {e}"[:200])
            return False
        if not isinstance(state, dict):
            log.warning("refused a state from rank %s: a %s, not a dict", meta.get("rank"), type(state).__name__)
            return False
        assert self._set_state is not None
        self._set_state(state)
        self.round = self.finished = int(meta["round"])
        self.in_sync = True
        log.info("loaded the swarm's state at round %d from rank %s", self.round, meta.get("rank"))
        return True

    def _download(self, min_round: int, timeout: float) -> bool:
        assert self._server is not None
        self._server.allow_state_sharing = False  # never hand out a state we are replacing
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            future = self._server.load_state_from_peers(wait=False)
            try:
                result = future.result(timeout=max(0.1, end - time.monotonic()))
            except FutureTimeout:
                future.cancel()
                break
            if result is not None:
                meta, tensors = result
                if self._usable_state(meta, min_round):
                    if self._apply(meta, tensors):
                        self._server.allow_state_sharing = True
                        return True
                else:
                    log.info("state from a peer was stale or out of sync (%s); asking again", str(meta)[:200])
            time.sleep(0.5)
        self._server.allow_state_sharing = True
        return False

    def round_boundary(self) -> None:
        """Called by the trainer after every round (main thread): serve waiting state requests, publish progress,
        resync."""
        if self._server is None:
            return
        with self._cond:
            requested = self._requests > 0
        if requested:  # an out-of-sync snapshot says so in its metadata; the asker then tries another peer
            self._take_snapshot()
        if not self.in_sync:
            self._try_resync()
        if self._server is not None:
            self._server.allow_state_sharing = self.in_sync
            self._server.state_sharing_priority = float(self.round)
        self._publish_progress()
        self.clock.phase_started()

    def _try_resync(self) -> None:
        assert self._server is not None
        self._server.allow_state_sharing = False
        if self._resync is None:
            self._resync = self._server.load_state_from_peers(wait=False)
        # Peers that finished this round with us serve at once; if they are already training the next phase
        # the state arrives at their next boundary, i.e. about our next boundary: check again then.
        # Wait about as long as groupmates' boundaries are apart (the arrival spread), not a whole window: a
        # peer that blocks here would miss the next round.
        spread = self.clock.spread if self.clock.spread is not None else self.cfg.min_matchmaking_time
        try:
            result = self._resync.result(timeout=max(0.5, self.cfg.deadline_margin * spread))
        except FutureTimeout:
            return
        self._resync = None
        if result is None:
            if not any(r.get("in_sync") and r.get("round", 0) >= self.round for r in self._others()):
                log.warning("no in-sync peer to resync from; continuing from our own state")
                self.in_sync = True
            return
        meta, tensors = result
        if self._usable_state(meta, self.round):
            self._idle()  # nothing of ours may still run once the state is replaced (see the module docstring)
            self._apply(meta, tensors)  # refused (logged): we stay out of sync and ask again next boundary
        else:
            log.info("resync: state from a peer was stale (%s); trying again next boundary", str(meta)[:200])

    def _swarm_is_past(self, number: int, gossip: list[int] | None = None) -> bool:
        """Whether no one is left to meet in round ``number``: every other peer we know of (in a gossip round, of
        the group's ranks) has finished it or left. A groupmate with no record at all while others have one is gone
        too (a SIGKILLed peer's record expires; until then its partners wait out their deadline, which is what keeps
        a gossiping swarm in step: a peer merely behind is waited for, never given up on). No record at all proves
        nothing, e.g. a DHT hiccup: then we keep trying until the deadline."""
        me = self.dht.peer_id.to_bytes().hex()
        records = [r for k, r in self.progress().items() if k != me]
        mates = records if gossip is None else [r for r in records if r.get("rank") in gossip]
        return bool(records) and all(r.get("left") or _is_int(r.get("finished")) and r["finished"] >= number
                                     for r in mates)  # fmt: skip

    def _others(self) -> list[dict]:
        """Progress records of the other live peers (peers that finished or left say so on the way out)."""
        me = self.dht.peer_id.to_bytes().hex()
        return [r for k, r in self.progress().items() if k != me and not r.get("left")]

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._early is not None:  # its matchmaking, if waiting to begin, gives up at once
            self._early.abandoned = True
            self._early.due.set()
        super().close()
        if self._shared is not None:  # first: a holder hands the global model over while the DHT is up
            with contextlib.suppress(Exception):
                self._shared.close()
            self._shared = None
        if self._link is not None:  # drivers waiting on us get a refusal now, not a timeout
            with contextlib.suppress(Exception):
                self._link.close()
            self._link = None
        with self._cond:
            self._cond.notify_all()
        with contextlib.suppress(Exception):  # tell stragglers we are gone, so they do not wait for us
            self._dht_store(self._progress_key, {"round": self.round, "rank": self.rank, "left": True}, ttl=60)
        for a in [*self._averagers.values(), *([self._server] if self._server is not None else [])]:
            try:
                if a.is_alive():
                    a.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("averager shutdown: %r", e)
        self._averagers.clear()
        self._server = None
        if self._mailbox is not None:
            with contextlib.suppress(Exception):
                self._mailbox.close()
            self._mailbox = None
        try:
            if self.dht.is_alive():
                self.dht.shutdown()
        except Exception as e:  # noqa: BLE001
            log.debug("dht shutdown: %r", e)


def _nothing() -> None:
    return None


def round_bytes(group_size: int, payload_bytes: float) -> float:
    """Bytes one peer sends (and receives) in a butterfly all-reduce with equal shares."""
    return 0.0 if group_size <= 1 else 2.0 * (group_size - 1) / group_size * payload_bytes


__all__ = ["HivemindAverager", "RoundClock", "RoundFailed", "round_bytes"]
