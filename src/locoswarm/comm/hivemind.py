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

Compression (``compression=...``, the same config as on ``sim``; see ``comm/exchange.py``)
    Every peer encodes its pseudo-gradient once per round with its own codecs (error feedback stays local; the
    codecs are checkpointed with the averager). Random-k's shared indices are keyed by the agreed round number,
    so a peer that missed rounds still picks the group's indices. Then, by codec:

    | codec | what crosses the wire | where it is (de)compressed |
    | --- | --- | --- |
    | none, randomk | the fp32 wire values (random-k: its k values, never an index), butterfly all-reduce | decoded once from the group's mean |
    | fp16 | the same butterfly with hivemind's own ``Float16Compression`` | compressed twice: each part on its way to its owner, and the averaged part on its way back (hivemind's design); our codec's first cast is exactly representable, so stage 1 adds nothing, stage 2 rounds the mean to fp16 |
    | int8, int4 | stage 1: each peer's payload slice for the blocks owner j reduces, to owner j; stage 2: each owner's re-encoded chunk mean, to everyone (``comm/hivemind_gather.py``) | compressed twice like hivemind's butterfly: by each peer's codec, then the owner decodes the slices, sums them in rank order and re-encodes the mean; everyone decodes the chunks: the ``sim`` backend's arithmetic on the same chunks, bit for bit |
    | bf16, sign, topk, powersgd | the packed payload, all-gathered (``comm/hivemind_gather.py``) | every peer decodes every groupmate's payload and sums them in rank order: the ``sim`` backend's arithmetic, bit for bit |

    hivemind's butterfly cannot carry the last two rows: its receivers decode only hivemind's built-in
    compression types (a closed protobuf enum), and it sums what it receives, which top-k indices, per-block
    scales and low-rank factors do not allow; bf16 has no hivemind compression for fp32 buffers. For those codecs
    the DecentralizedAverager still forms the group (matchmaking, weights, ranks), averaging a 1-element tensor,
    and the payloads travel over the same libp2p connections, peer to peer.

Deadlines (``RoundClock``)
    Nothing a user must guess: the window is ``deadline_margin`` x the arrival spread measured within groups
    (it jumps up with a larger spread and decays 0.8x per round; a missed round or a group that left live peers
    out doubles it), at least ``min_matchmaking_time`` and at most one round period. The first round waits
    ``deadline_margin`` x our own first phase (peers launched together by ``locoswarm-swarm`` also start
    training together). The all-reduce allowance is ``deadline_margin`` x the slowest all-reduce measured so
    far (``first_round_timeout`` before the first). ``matchmaking_time`` / ``round_timeout`` override them.

Failures
    ``DecentralizedAverager.step`` raises on failure (its docstring says it returns None) and, worse, a peer that
    dies mid-all-reduce (or a hivemind hiccup: we have seen "received 85% results" with every peer alive) makes
    the others finish with *their own* values for the lost part, silently. So after every all-reduce the group
    compares a sketch of the average through the DHT (float64 norms of 16 slices of a strided subsample); if
    they differ, the whole group re-runs the round on its original inputs (up to twice); if they still differ,
    the majority's average stands and the others are marked out of sync. A round that raises or misses its
    deadline applies a *zero* update while other peers are alive (all peers that missed it stay equal to each
    other) and marks the peer out of sync; alone, it is a group of one. An out-of-sync peer keeps training and
    downloads the swarm's run state from an in-sync peer at a round boundary (the donor serves it at its next
    boundary, so both are at the same round); with no in-sync donor it continues from its own state.

Joining
    ``attach_run_state(get, set)`` (called by the trainer once the strategy is built) makes the run state
    shareable. If the swarm is already past round 0, the new peer downloads it from a live in-sync peer; the
    donor serialises it at its *next* round boundary, so the joiner starts the next phase together with the
    swarm. The state is opaque bytes to this module (``torch.save`` of what the trainer hands over; loaded with
    ``weights_only=True``, so a malicious peer cannot execute code).

Bytes
    hivemind does not expose per-peer byte counters, so ``Round.bytes_sent`` / ``bytes_received`` are computed
    from the pattern: butterfly, with n peers and equal shares, 2(n-1)/n of the wire payload each way; all-gather,
    n-1 payloads each way; reduce-scatter, the slices and chunks this peer really sent. ``Round.seconds`` is measured (matchmaking + exchange).
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage
from hivemind.compression import CompressionBase, Float16Compression, NoCompression
from hivemind.dht import DHT
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from locoswarm.comm.base import Averager, Round
from locoswarm.comm.exchange import LocalCodecs, allgather_bytes
from locoswarm.comm.hivemind_gather import GatherFailed, PayloadMailbox
from locoswarm.compression import Payload
from locoswarm.config import BackendConfig, CompressionConfig

log = logging.getLogger(__name__)

ROUND_BITS = 24  # the round number lives in the matchmaking key's group bits: 16M rounds before it wraps
REDO_BITS = 2  # ... followed by the re-run count within the round
MAX_REDOS = 2
SKETCH_SLICES = 16
SKETCH_STRIDE = 64
SKETCH_RTOL = 1e-4  # peers' averages differ by float32 rounding (~1e-7); a failed part differs by O(1)
# Wire dtypes of summable codecs that hivemind's butterfly can carry, and the hivemind compression that does it.
BUTTERFLY_WIRE: dict[torch.dtype, CompressionBase] = {
    torch.float32: NoCompression(),
    torch.float16: Float16Compression(),
}


class RoundFailed(Exception):
    """An averaging round that did not complete within its deadline, or whose all-reduce raised."""


class RoundClock:
    """Deadlines from measured round times (see the module docstring)."""

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.spread: float | None = None  # arrival spread of a group: jumps up at once, decays 0.8x per round
        self.max_allreduce: float | None = None  # slowest all-reduce seen (seconds)
        self.period: float | None = None  # EMA of boundary-to-boundary time
        self.first_phase: float | None = None
        self._last_boundary = time.monotonic()

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
        return max(self.cfg.min_matchmaking_time, measured)

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
        if self.first_phase is None:
            self.first_phase = time.monotonic() - self._last_boundary

    def observe(self, spread: float | None, allreduce_seconds: float | None) -> None:
        if spread is not None:
            self.spread = spread if self.spread is None else max(spread, 0.8 * self.spread)
        if allreduce_seconds is not None:
            self.max_allreduce = max(self.max_allreduce or 0.0, allreduce_seconds)

    def missed(self) -> None:
        """Our round failed or left out live peers: the spread was larger than we thought; double the window."""
        floor = self.cfg.min_matchmaking_time / self.cfg.deadline_margin
        self.spread = 2 * max(self.spread or 0.0, floor)

    def boundary(self) -> None:
        now = time.monotonic()
        dt = now - self._last_boundary
        self.period = dt if self.period is None else 0.7 * self.period + 0.3 * dt
        self._last_boundary = now


class _StateServer(DecentralizedAverager):
    """A DecentralizedAverager used only to serve run state to peers (it never averages).

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
        codecs: LocalCodecs | None = None,
    ):
        """expected_peers: peers launched together (locoswarm-swarm --peers N): they start training together.
        codecs: this peer's codecs (``LocalCodecs(cfg.compression, cfg.seed)``); default: no compression."""
        self.cfg = cfg
        self.expected_peers = expected_peers
        self.workers = workers
        self.rank = rank
        self.codecs = codecs if codecs is not None else LocalCodecs(CompressionConfig(), 0)
        self._mailbox: PayloadMailbox | None = None
        self.clock = RoundClock(cfg)
        self.round = 0  # rounds completed by this peer (== the swarm's, while in sync)
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
        self._closed = False
        self.dht = _started(
            lambda: DHT(
                initial_peers=list(cfg.initial_peers),
                host_maddrs=list(cfg.host_maddrs),
                announce_maddrs=list(cfg.announce_maddrs) or None,
                start=True,
            )
        )
        self.maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        if not cfg.initial_peers:
            log.info("started a new swarm; others join with: locoswarm-swarm join %s", self.maddrs[0])
        log.info("DHT address: %s", " ".join(self.maddrs))

    # ------------------------------------------------------------------ swarm bookkeeping (DHT)
    @property
    def _progress_key(self) -> str:
        return f"{self.cfg.run_id}_progress"

    def progress(self) -> dict[str, dict]:
        """Live peers' latest records: {peer id (hex): {round, rank, in_sync, period}}."""
        return {
            bytes(k).hex() if isinstance(k, bytes) else str(k): v
            for k, v in _value_dict(self.dht.get(self._progress_key, latest=True)).items()
            if isinstance(v, dict)
        }

    def _publish_progress(self) -> None:
        period = self.clock.period or self.clock.first_phase or 10.0
        ttl = max(60.0, 4 * period)
        record = {
            "round": self.round,
            "rank": self.rank,
            "in_sync": self.in_sync,
            "period": period,
            "launched": self.expected_peers or 0,
        }
        self.dht.store(
            self._progress_key,
            record,
            expiration_time=get_dht_time() + ttl,
            subkey=self.dht.peer_id.to_bytes(),
            return_future=True,  # fire and forget: a lost record only delays a joiner
        )

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

    def _averager_for(self, tensors: Sequence[torch.Tensor], compression: CompressionBase) -> DecentralizedAverager:
        key = (*((tuple(t.shape), str(t.dtype)) for t in tensors), type(compression).__name__)
        if key not in self._averagers:
            # One DecentralizedAverager (background process) per tensor schema; diloco/ddp need exactly one.
            prefix = f"{self.cfg.run_id}_avg{len(self._averagers)}"
            buffers = [torch.zeros(t.shape, dtype=t.dtype) for t in tensors]
            request_timeout = self._request_timeout
            self._averagers[key] = _started(
                lambda: DecentralizedAverager(
                    buffers,
                    self.dht,
                    start=True,
                    prefix=prefix,
                    target_group_size=self.workers,
                    min_group_size=2,
                    min_matchmaking_time=self.cfg.min_matchmaking_time,
                    request_timeout=request_timeout,
                    compression=compression,
                    next_chunk_timeout=self.cfg.chunk_timeout,
                    allow_state_sharing=False,
                )
            )
        return self._averagers[key]

    @torch.no_grad()
    def average(self, tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> Round:
        if weights.numel() != 1 or any(t.shape[0] != 1 for t in tensors):
            raise ValueError("backend=hivemind hosts exactly one worker per process (got a stacked batch > 1)")
        weight = float(weights[0])
        local = [t[0].detach().to("cpu", torch.float32) for t in tensors]
        devices = [t.device for t in tensors]
        self.clock.entering_round()
        number = self.round + 1
        t0 = time.monotonic()
        # once per round (error feedback advances here); rounds are counted from 0, as on sim and torch
        payloads = self.codecs.encode(local, round_=self.round)
        payload_bytes = sum(p.nbytes for p in payloads)
        if self.codecs.summable and self.codecs.wire_values(payloads).dtype in BUTTERFLY_WIRE:
            mode = "butterfly"
        else:
            mode = "reduce" if self.codecs.reducible else "gather"
        try:
            mean, group, total_weight, sent = self._run_round(number, payloads, weight, mode)
        except RoundFailed as e:
            self.clock.missed()
            if self._others():
                # Others are alive: apply a zero update (every peer that missed this round moves its state the
                # same way, so they stay equal to each other) and take the swarm's state at the boundary.
                log.warning("round %d failed (%s); skipping its update, resyncing at the boundary", number, e)
                self.in_sync = False
                mean, group = [torch.zeros_like(t) for t in local], 0
            else:  # nobody else is left: we are the swarm, a group of one (its update went through the codec too)
                log.warning("round %d failed (%s) and no other peer is alive; continuing alone", number, e)
                mean, group = self.codecs.decode_mean([self.codecs.pack(payloads)], [1.0], payloads), 1
            total_weight, sent = weight, 0.0
        self.round = number
        return Round(
            tensors=[m.to(d) for m, d in zip(mean, devices, strict=True)],
            group_size=group,
            bytes_sent=sent,
            bytes_received=sent,
            seconds=time.monotonic() - t0,
            compression_ratio=payload_bytes / max(1, sum(t.numel() * 4 for t in local)),
            payload_bytes=float(payload_bytes),
            total_weight=total_weight,
            allgather=mode == "gather",
        )

    def _run_round(self, number: int, payloads: list[Payload], weight: float, mode: str):
        """One round: find a group, exchange, check the group agrees. Returns (mean, group size, total weight,
        bytes sent). ``mode``: "butterfly" all-reduces the summable wire values in the DecentralizedAverager;
        "gather" (all-gather) and "reduce" (re-quantising reduce-scatter) send the payloads peer to peer
        (comm/hivemind_gather.py) and the DecentralizedAverager only forms the group."""
        if mode != "butterfly":
            local = [torch.zeros(1)]  # matchmaking only; the payloads travel through the mailbox
            averager = self._averager_for(local, NoCompression())
            blob = self.codecs.pack(payloads)
            mailbox = self._mailbox_for()
            mailbox.expect(number, len(blob))  # no slice or chunk is larger than the whole payload
        else:
            wire = self.codecs.wire_values(payloads)
            local = [wire.to(torch.float32)]  # exact: fp16 values widen to fp32 and Float16Compression narrows back
            averager = self._averager_for(local, BUTTERFLY_WIRE[wire.dtype])
        payload_bytes = sum(p.nbytes for p in payloads)
        window = self.clock.window()
        allowance = self.clock.allreduce_allowance()
        give_up = time.monotonic() + window + allowance
        log.info("round %d: looking for a group (window %.1fs, all-reduce allowance %.1fs)", number, window, allowance)
        attempt = 0
        redo = 0  # re-runs after the group's averages disagreed; the whole group counts them in lockstep
        while True:
            attempt += 1
            # Copy in every attempt: a failed all-reduce may have left a partial average in the buffers.
            with averager.get_tensors() as buffers:
                for b, t in zip(buffers, local, strict=True):
                    b.copy_(t)
            key = (number % (1 << ROUND_BITS)) << REDO_BITS | min(redo, (1 << REDO_BITS) - 1)
            averager.set_group_bits(format(key, f"0{ROUND_BITS + REDO_BITS}b"))
            arrived = get_dht_time()
            remaining = give_up - time.monotonic()
            if remaining <= 1.0:
                raise RoundFailed(f"no time left for attempt {attempt}")
            wait = min(window, remaining / 2)
            # Finding a group may take the window plus a few request round-trips, not the all-reduce allowance:
            # a peer that arrives after its group has left should give up and resync, not wait it out.
            find_timeout = min(remaining, wait + 4 * self._request_timeout + 1.0)
            try:
                control = averager.step(
                    gather={"t": arrived, "w": weight, "round": number, "rank": self.rank},
                    scheduled_time=arrived + wait,
                    weight=weight,
                    timeout=find_timeout,
                    allow_retries=False,  # hivemind's retry would re-run on a half-averaged buffer
                    wait=False,
                )
            except Exception as e:  # noqa: BLE001 - the step's setup failed (averager process gone)
                raise RoundFailed(f"could not start: {type(e).__name__}: {e}") from e
            started_allreduce = None
            t_step = time.monotonic()
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
                    if started_allreduce is None and time.monotonic() + 1.0 < give_up:
                        log.info("round %d: matchmaking attempt %d failed (%r); retrying", number, attempt, e)
                        break
                    raise RoundFailed(f"{type(e).__name__}: {e}") from e
            if gathered is None:
                continue
            done = time.monotonic()
            infos = [v for v in gathered.values() if isinstance(v, dict)]
            rounds = {i.get("round") for i in infos}
            if rounds != {number}:
                raise RoundFailed(f"group mixed rounds {sorted(map(str, rounds))}")
            spread = max(i["t"] for i in infos) - min(i["t"] for i in infos) if infos else None
            n = len(gathered)
            if mode != "butterfly":
                if started_allreduce is None:
                    started_allreduce = done
                try:
                    if mode == "gather":
                        mean = self._gather_mean(number, redo, gathered, blob, payloads, give_up)
                        sent = allgather_bytes(n, payload_bytes)
                    else:
                        mean, sent = self._reduce_mean(number, redo, gathered, payloads, give_up)
                except (GatherFailed, ValueError) as e:
                    raise RoundFailed(f"{mode} of the payloads: {e}") from e
                done = time.monotonic()  # the exchange is the peer-to-peer one: its time sets the next allowance
            else:
                with averager.get_tensors() as buffers:
                    mean = self.codecs.decode_values(buffers[0].detach().clone(), payloads)
                sent = round_bytes(n, payload_bytes)
            self.clock.observe(spread, done - started_allreduce if started_allreduce is not None else None)
            t_check = time.monotonic()
            agreed = self._check_agreement(f"{number}_{redo}", mean, [p.to_bytes() for p in gathered])
            if not agreed and redo < MAX_REDOS and time.monotonic() + 1.0 < give_up:
                # Every member saw the same sketches, so all re-run the round together on their original inputs.
                redo += 1
                log.warning("round %d: the group's averages disagree (a part was lost); re-running it", number)
                continue
            if not agreed:
                self._adopt_majority(number)
            matched = started_allreduce if started_allreduce is not None else done
            log.info(
                "round %d: group of %d (ranks %s): matchmaking %.2fs, all-reduce %.2fs, check %.2fs (window %.1fs)",
                number,
                n,
                sorted(i.get("rank") for i in infos),
                matched - t_step,
                done - matched,
                time.monotonic() - t_check,
                window,
            )
            expected = 1 + sum(1 for r in self._others() if int(r.get("round", -1)) >= number - 1)
            if n < expected:
                self.clock.missed()  # live peers were left out: widen the window for the next round
            return mean, n, float(sum(i["w"] for i in infos)), sent

    def _mailbox_for(self) -> PayloadMailbox:
        if self._mailbox is None:
            self._mailbox = PayloadMailbox(self.dht, f"{self.cfg.run_id}_payloads")
        return self._mailbox

    def _gather_mean(
        self, number: int, redo: int, gathered: dict, blob: bytes, payloads: list[Payload], give_up: float
    ) -> list[torch.Tensor]:
        """All-gather the group's payloads and return sum_j share_j decode(payload_j), in (rank, peer id) order:
        the sim backend's arithmetic, so every member computes the same mean."""
        assert self._mailbox is not None
        order = sorted(gathered, key=lambda p: (gathered[p].get("rank") or 0, p.to_bytes()))
        got = self._mailbox.exchange(number, redo, order, blob, deadline=give_up)
        weights = torch.tensor([float(gathered[p]["w"]) for p in order], dtype=torch.float64)
        shares = (weights / weights.sum()).tolist()
        return self.codecs.decode_mean([got[p] for p in order], shares, payloads)

    def _reduce_mean(
        self, number: int, redo: int, gathered: dict, payloads: list[Payload], give_up: float
    ) -> tuple[list[torch.Tensor], float]:
        """Re-quantising reduce-scatter (comm/exchange.py): the members with weight own the blocks in (rank, peer id)
        order; each sends every owner its slice, each owner re-encodes its chunk's weighted mean for everyone.
        Returns (mean, bytes this peer sent)."""
        assert self._mailbox is not None
        me = self._mailbox.peer_id
        order = sorted(gathered, key=lambda p: (gathered[p].get("rank") or 0, p.to_bytes()))
        weights = torch.tensor([float(gathered[p]["w"]) for p in order], dtype=torch.float64)
        shares = dict(zip(order, (weights / weights.sum()).tolist(), strict=True))
        owners = [p for p in order if shares[p] != 0.0]
        n = len(owners)
        sizes = self.codecs.chunk_sizes(payloads, n)
        reduced: dict[PeerID, bytes] = {}
        to_send: dict[PeerID, bytes] = {}
        sent = 0.0
        if me in owners:
            j = owners.index(me)
            pieces = self.codecs.split(payloads, n)
            if n == 1:
                reduced[me] = pieces[0]  # nothing to average: the payload as is (sim decodes it once too)
            else:
                got = self._mailbox.send_and_receive(
                    number, redo, "scatter", dict(zip(owners, pieces, strict=True)), owners, give_up
                )
                got[me] = pieces[j]
                blobs = [got[p] for p in owners]
                reduced[me] = self.codecs.reduce_owned(j, n, blobs, [shares[p] for p in owners], payloads)
                sent += sum(sizes) - sizes[j]
            to_send = {p: reduced[me] for p in order if p != me}
            sent += len(to_send) * sizes[j]
        reduced.update(self._mailbox.send_and_receive(number, redo, "reduced", to_send, owners, give_up))
        return self.codecs.assemble([reduced[p] for p in owners], payloads), sent

    def state_dict(self) -> dict:
        """The codecs' state (error-feedback residuals, PowerSGD's warm start): checkpointed with the run."""
        return {"codecs": self.codecs.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "codecs" in state:
            self.codecs.load_state_dict(state["codecs"])

    def _check_agreement(self, tag: str, mean: list[torch.Tensor], group: list[bytes]) -> bool:
        """Compare sketches of the average with the group (a peer lost mid-all-reduce leaves them different);
        returns whether every groupmate that answered holds the same average. Remembers the clusters."""
        key = f"{self.cfg.run_id}_sketch{tag}"
        mine = _sketch(mean)
        me = self.dht.peer_id.to_bytes()
        self.dht.store(key, mine, expiration_time=get_dht_time() + 300, subkey=me)
        wait_until = time.monotonic() + max(2.0, 2 * (self.clock.max_allreduce or 1.0))
        seen: dict[bytes, list[float]] = {}
        while True:
            seen = {bytes(k): v for k, v in _value_dict(self.dht.get(key, latest=True)).items() if bytes(k) in group}
            seen[me] = mine
            if len(seen) == len(group) or time.monotonic() > wait_until:
                break
            time.sleep(0.02)
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
        """Make the run state shareable; if the swarm is already past our round (``rounds``, nonzero after a
        resume), download it first (joining)."""
        self._get_state, self._set_state = get_state, set_state
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
            )
        )
        others = [r for r in self._others() if r.get("round", 0) > self.round]
        if others:
            swarm_round = max(r["round"] for r in others)
            period = max(float(r.get("period") or 0.0) for r in others)
            timeout = self.cfg.join_timeout or max(60.0, self.cfg.deadline_margin * 2 * period)
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
        buf = io.BytesIO()
        torch.save(self._get_state(), buf)
        blob = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        meta = {"round": self.round, "in_sync": self.in_sync, "rank": self.rank, "t": get_dht_time()}
        with self._cond:
            self._snapshot = (meta, [blob])
            self._requests = 0
            self._cond.notify_all()

    def _apply(self, meta: dict, tensors: Sequence[torch.Tensor]) -> None:
        state = torch.load(io.BytesIO(tensors[0].numpy().tobytes()), map_location="cpu", weights_only=True)
        assert self._set_state is not None
        self._set_state(state)
        self.round = int(meta["round"])
        self.in_sync = True
        log.info("loaded the swarm's state at round %d from rank %s", self.round, meta.get("rank"))

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
                if isinstance(meta, dict) and meta.get("in_sync") and int(meta.get("round", -1)) >= min_round:
                    self._apply(meta, tensors)
                    self._server.allow_state_sharing = True
                    return True
                log.info("state from a peer was stale or out of sync (%s); asking again", meta)
            time.sleep(0.5)
        self._server.allow_state_sharing = True
        return False

    def round_boundary(self) -> None:
        """Called by the trainer after every round: serve waiting state requests, publish progress, resync."""
        self.clock.boundary()
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
        if isinstance(meta, dict) and meta.get("in_sync") and int(meta.get("round", -1)) >= self.round:
            self._apply(meta, tensors)
        else:
            log.info("resync: state from a peer was stale (%s); trying again next boundary", meta)

    def _others(self) -> list[dict]:
        """Progress records of the other live peers (peers that finished or left say so on the way out)."""
        me = self.dht.peer_id.to_bytes().hex()
        return [r for k, r in self.progress().items() if k != me and not r.get("left")]

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        with contextlib.suppress(Exception):  # tell stragglers we are gone, so they do not wait for us
            self.dht.store(
                self._progress_key,
                {"round": self.round, "rank": self.rank, "left": True},
                expiration_time=get_dht_time() + 60,
                subkey=self.dht.peer_id.to_bytes(),
            )
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


def round_bytes(group_size: int, payload_bytes: float) -> float:
    """Bytes one peer sends (and receives) in a butterfly all-reduce with equal shares."""
    return 0.0 if group_size <= 1 else 2.0 * (group_size - 1) / group_size * payload_bytes


__all__ = ["HivemindAverager", "RoundClock", "RoundFailed", "round_bytes"]
