"""The averaging contract every backend implements (sim, torch.distributed, hivemind).

A process hosts L local workers (L = K in the ``sim`` backend, 1 on a real network). It hands the averager
one stacked tensor per parameter, shape (L, *param_shape), and a weight per local worker (the tokens that
worker processed). The averager returns the weighted mean over every worker in the round's group. What
crosses the wire is decided by the averager's codec, so bytes are counted where they are produced.
A backend never knows which algorithm runs over it.

Rounds are asynchronous and keyed (``../shared/ROUNDS.md``):

- ``start(tensors, weights, key=...)`` begins a round and returns a ``Handle`` at once; ``Handle.wait()`` gives
  its ``Round``. ``average`` is ``start(...).wait()``. Inner steps may run while a round is in flight; the caller
  must not modify the tensors it passed until the round is done.
- ``key`` scopes everything that is per stream of rounds: codecs and their error-feedback residuals, the round
  counter (random-k's shared indices), and on hivemind the DHT prefix. A streaming fragment uses its own key;
  a strategy with one stream uses the default ``"all"``.
- Rounds run in the order they were started, one at a time, on every backend (a real backend runs them on one
  background thread): every peer starts the same keys in the same order, so collectives always match up.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

DEFAULT_KEY = "all"


@dataclass
class Round:
    """The outcome of one averaging round, as seen by this process."""

    tensors: list[torch.Tensor]  # weighted mean over the group, one per parameter, shape = param shape
    group_size: int  # workers whose contributions are in the mean
    bytes_sent: float  # per worker (mean over this process's workers), this round
    bytes_received: float
    seconds: float  # the exchange's wall-clock: measured on a real network, modelled by the network model on sim
    compression_ratio: float = 1.0  # payload bytes / uncompressed fp32 bytes
    payload_bytes: float = 0.0  # encoded payload per worker (before the topology multiplies it)
    total_weight: float = 0.0
    allgather: bool = False  # the payloads were all-gathered (not summable on the wire): priced as such
    key: str = DEFAULT_KEY  # the stream of rounds this one belongs to
    members: list[int] = field(default_factory=list)  # global ranks whose contributions are in the mean
    rejected: dict[int, str] = field(default_factory=dict)  # global rank -> why its contribution was dropped
    skipped: int = 0  # later rounds of the swarm this peer skips, left behind after a failed gossip round (hivemind)


def parallel_round(rounds: Sequence[Round]) -> Round:
    """One phase's group rounds as one exchange: they ran side by side, so it lasts as long as the slowest, and a
    worker's bytes are the mean over the workers that took part (a round's bytes are per member, as the sim's)."""
    members = sorted(r for rnd in rounds for r in rnd.members)
    sent = sum(r.bytes_sent * r.group_size for r in rounds)
    received = sum(r.bytes_received * r.group_size for r in rounds)
    payload = sum(r.payload_bytes * r.group_size for r in rounds)
    taking_part = max(1, sum(r.group_size for r in rounds))
    return Round(
        tensors=[],
        group_size=max((r.group_size for r in rounds), default=0),
        bytes_sent=sent / taking_part,
        bytes_received=received / taking_part,
        seconds=max((r.seconds for r in rounds), default=0.0),
        compression_ratio=sum(r.compression_ratio * r.group_size for r in rounds) / taking_part,
        payload_bytes=payload / taking_part,
        total_weight=sum(r.total_weight for r in rounds),
        allgather=any(r.allgather for r in rounds),
        key=rounds[0].key if rounds else DEFAULT_KEY,
        members=members,
        rejected=dict(sorted({k: v for r in rounds for k, v in r.rejected.items()}.items())),
    )


def commitment(blob: bytes) -> str:
    """What a peer commits to in a round's metadata: the SHA-256 of its phase's start state, hex."""
    return hashlib.sha256(blob).hexdigest()


@dataclass
class Evidence:
    """A groupmate's part in the last round, for verification by replay on a real swarm (verify.py)."""

    rank: int
    weight: float  # the tokens it claimed
    row: list[torch.Tensor]  # the pseudo-gradient it sent, as this peer received it (one per parameter)
    commitment: str  # the hash of its phase's start state, from its round metadata
    fetch: Callable[[], bytes | None]  # asks it for that start state (None: it did not serve it in time)


class Handle(Protocol):
    """A round in flight."""

    def done(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Round: ...


class Finished:
    """A handle whose round completed when it was started (the ``sim`` backend)."""

    def __init__(self, result: Round):
        self._round = result

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> Round:
        return self._round


class Pending:
    """A handle on a round running in the averager's background thread; ``wait`` re-raises its error."""

    def __init__(self, future: Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Round:
        return self._future.result(timeout=timeout)


class Averager(ABC):
    """Start keyed rounds; a backend implements ``_round`` (one blocking round) and says whether it runs them in
    the background (``asynchronous``)."""

    asynchronous = False  # real backends: True (rounds run on one background thread, in start order)

    _executor: ThreadPoolExecutor | None = None
    _executor_lock = threading.Lock()

    def start(
        self,
        tensors: Sequence[torch.Tensor],
        weights: torch.Tensor,
        *,
        key: str = DEFAULT_KEY,
        ranks: Sequence[int] | None = None,
        group: Sequence[int] | None = None,
    ) -> Handle:
        """Begin averaging ``tensors`` (per parameter (L, *shape)) weighted by ``weights`` (L,) in the stream
        ``key``. ranks: the global rank of each row (default: the averager's own). group: the global ranks of a
        gossip round's members (noloco's pairs), None for the whole swarm. A backend that holds every worker (sim)
        needs only the weights (a non-member's is 0); a real swarm meets only the group's peers."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"key={key!r} is invalid: a non-empty string names a stream of rounds")
        if not self.asynchronous:
            return Finished(self._round(list(tensors), weights, key, ranks))
        return self._submit(self._round, list(tensors), weights, key, ranks)

    def _submit(self, fn, *args) -> Handle:
        """Run ``fn(*args)`` (the blocking part of a round) on the averager's one background thread."""
        with self._executor_lock:
            if self._executor is None:
                # One thread: rounds run in start order on every peer, so their collectives match up.
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__)
        return Pending(self._executor.submit(fn, *args))

    def prepare(self, weights: torch.Tensor, *, key: str = DEFAULT_KEY) -> None:  # noqa: B027 - optional hook
        """A hint, given when a phase begins: the next round started is a swarm round of ``key`` with ``weights``. A
        real swarm may form that round's group while the phase runs (comm/hivemind.py); the result is the same."""

    def average(self, tensors: Sequence[torch.Tensor], weights: torch.Tensor, **kw) -> Round:
        """tensors: per parameter (L, *shape); weights: (L,) non-negative. Returns the group's weighted mean."""
        return self.start(tensors, weights, **kw).wait()

    @abstractmethod
    def _round(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, ranks: Sequence[int] | None
    ) -> Round:
        """One blocking round of the stream ``key``."""

    # A real swarm shares the run state with joiners and resyncs stragglers (comm/hivemind.py); others need not.
    shares_run_state = False

    def attach_run_state(self, get_state, set_state, rounds: int = 0) -> None:  # noqa: B027 - optional hook
        """Make the run state (``get_state() -> dict``, ``set_state(dict)``) shareable with other peers."""

    def round_boundary(self) -> None:  # noqa: B027 - optional hook
        """Called after every round: a real swarm serves state requests, publishes progress, resyncs."""

    # Verification by replay on a real swarm (verify.py's PeerReplay); the sim verifies its own workers instead.
    def commit(self, start_state: bytes) -> None:
        """The next round this process starts carries a commitment to ``start_state`` and serves it on request."""
        raise NotImplementedError(f"{type(self).__name__} cannot verify peers (verify.fraction needs sim or hivemind)")

    def evidence(self) -> list[Evidence]:
        """The other members of the last finished round, with what they sent and committed to."""
        raise NotImplementedError(f"{type(self).__name__} cannot verify peers (verify.fraction needs sim or hivemind)")

    def exclude(self, rank: int, why: str) -> None:
        """Drop ``rank``'s contributions from every later round (it failed a verification)."""
        raise NotImplementedError(f"{type(self).__name__} cannot verify peers (verify.fraction needs sim or hivemind)")

    def board(self, key: str, values: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """A small per-peer vector every peer can read (noloco's replica sketches on a real swarm): store ours under
        ``key`` (if given) and return every one stored there so far, by rank. A backend that holds every worker
        needs none."""
        raise NotImplementedError(f"{type(self).__name__} has no board (a process here holds every worker)")

    def shared_model(self, params, apply, outer_state, load_outer_state):
        """async_diloco's global model on a real swarm, held by one live peer (comm/shared_model.py)."""
        raise NotImplementedError(f"{type(self).__name__} holds no shared model (async_diloco needs sim or hivemind)")

    def state_dict(self) -> dict:
        """What a resume needs (codecs' residuals, the round sequence number)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - stateless averagers need nothing
        pass

    def close(self) -> None:
        """Release resources (rounds still in flight are abandoned); safe to call twice."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
