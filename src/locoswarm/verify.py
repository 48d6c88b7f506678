"""Verification by replay: did a worker really train the steps it claims, on its own data?

A DiLoCo phase is deterministic on CPU given where it starts: the anchor, the worker's inner-optimiser and
scheduler state, its data position and its dropout stream. A verifier draws ``verify.fraction`` of the
(worker, phase) pairs (seeded per rank and phase, so the choice is reproducible and a worker cannot know it in
advance), takes the chosen worker's start state, re-runs the steps the worker *claims* (its token weight /
tokens per step) on a replica and compares the pseudo-gradient with the one it sent. A relative difference above
``verify.tolerance`` is a failed check: the evidence (rank, phase, claimed steps, difference) is logged, and the
worker is excluded from every later averaging round.

What it catches: a lazy worker (fewer steps than claimed, or another shard), a worker that sends someone else's
or a stale pseudo-gradient. What it cannot: an attack on what crosses the wire (those are the aggregator's job,
comm/aggregate.py), and anything on a GPU, where kernels are not bit-reproducible (use a looser tolerance there).
It costs the replayed compute: ``fraction`` x one phase per worker checked.

Where the start state comes from is the one difference between the two verifiers:

- ``LocalReplay`` (the sim backend, every worker in this process): the chosen workers' state is copied before the
  phase, and each is checked before the round, so a worker caught in phase r is already out of round r.
- ``PeerReplay`` (a real swarm, ``backend=hivemind``): a worker's optimiser state never leaves its peer unasked,
  so every peer *commits* to its phase's start state: when the phase starts it hands the averager the serialised state,
  whose SHA-256 goes into the round's metadata, and serves those bytes on request for the next round. After the
  round every member verifies the chosen groupmates: it fetches the start state, checks it against the
  commitment made before the peer could know it would be checked, replays from the anchor they all shared, and
  compares with the row that peer really sent in the round (the averager keeps the gathered rows of one round).
  A worker caught in round r is excluded from round r + 1 on. Every member draws the same pairs and replays
  deterministically, so all reach the same verdict and exclude the same peer, and their averages keep agreeing. A
  peer that does not serve its state is not checked this time (it may just have died); one that serves bytes that
  do not match its commitment is excluded. The cost grows with the group: ``fraction`` x (group - 1) replays per
  peer per phase.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from locoswarm.comm.base import Averager, Evidence, commitment
from locoswarm.worker import Worker, WorkerGroup

log = logging.getLogger(__name__)


class Verifier:
    """The draw, the comparison and the record of who was excluded and why; the subclasses say where the start
    states come from and when the check runs (see the module docstring)."""

    def __init__(self, fraction: float, tolerance: float = 1e-5, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"verify.fraction={fraction} is invalid: a share in [0, 1]")
        self.fraction, self.tolerance, self.seed = fraction, tolerance, seed
        self.banned: dict[int, str] = {}  # rank -> the evidence that got it excluded
        self.checks = 0

    def chosen(self, phase: int, ranks: Sequence[int]) -> list[int]:
        """Indices into ``ranks`` of the workers to check in this phase (the banned are not checked again)."""
        out = []
        for j, r in enumerate(ranks):
            draw = np.random.default_rng([self.seed & 0xFFFF_FFFF, 0x5E12, r, phase]).random()
            if r not in self.banned and draw < self.fraction:
                out.append(j)
        return out

    # ------------------------------------------------------------------ the strategy's hooks (diloco)
    def phase_starts(self, group: WorkerGroup, phase: int) -> None:
        """Before the phase's inner steps."""

    def before_round(self, group: WorkerGroup, anchor, claimed: Sequence[int], sent, phase: int) -> dict[int, str]:
        """After the phase, before its round starts; returns rank -> evidence for the workers that failed now."""
        return {}

    def after_round(self, anchor, phase: int) -> dict[int, str]:
        """After the round's result is in, before the outer step moves the anchor; as ``before_round``."""
        return {}

    # ------------------------------------------------------------------ one check
    @torch.no_grad()
    def _replay(self, replica: Worker, anchor: Sequence[torch.Tensor], steps: int, sent: Sequence[torch.Tensor],
                phase: int) -> str | None:  # fmt: skip
        """Run ``steps`` on ``replica`` from ``anchor``; the evidence if the result differs from ``sent`` (one row per
        parameter), else None."""
        replica.load_params(anchor)
        with torch.enable_grad():
            replica.inner_steps(steps)
        diff = sq = 0.0
        for a, p, t in zip(anchor, replica.params, sent, strict=True):
            replay = (a - p).double()
            diff += float((t.double() - replay).pow(2).sum())
            sq += float(replay.pow(2).sum())
        rel = math.sqrt(diff / max(sq, 1e-300))
        self.checks += 1
        if rel <= self.tolerance:
            return None
        return (f"verification failed in phase {phase}: the replay of its {steps} claimed steps differs from what it "
                f"sent by {rel:.3g} (relative, tolerance {self.tolerance:g})")  # fmt: skip

    def _ban(self, rank: int, why: str) -> None:
        self.banned[rank] = why
        log.warning("rank %d excluded from now on: %s", rank, why)

    def state_dict(self) -> dict:
        return {"banned": dict(self.banned), "checks": self.checks}

    def load_state_dict(self, state: dict) -> None:
        self.banned, self.checks = {int(r): str(w) for r, w in state["banned"].items()}, int(state["checks"])


class LocalReplay(Verifier):
    """Every worker is in this process (the sim backend): their start states are copied before the phase."""

    def __init__(self, fraction: float, tolerance: float = 1e-5, seed: int = 0):
        super().__init__(fraction, tolerance, seed)
        self._snapshots: dict[int, dict] = {}

    def phase_starts(self, group: WorkerGroup, phase: int) -> None:
        if not isinstance(group, WorkerGroup):
            raise ValueError("verify.fraction > 0 needs backend.execution=sequential (a replay runs one worker)")
        self._snapshots = {j: copy.deepcopy(group.workers[j].state_dict()) for j in self.chosen(phase, group.ranks)}

    def before_round(self, group: WorkerGroup, anchor, claimed: Sequence[int], sent, phase: int) -> dict[int, str]:
        failed = {}
        for j, state in self._snapshots.items():
            worker = group.workers[j]
            # the shard is read-only and may be large: the replica shares it
            replica = copy.deepcopy(worker, memo={id(worker.sampler.tokens): worker.sampler.tokens})
            replica.load_state_dict(state)
            why = self._replay(replica, anchor, claimed[j], [t[j] for t in sent], phase)
            if why is not None:
                failed[worker.rank] = why
                self._ban(worker.rank, why)
        self._snapshots = {}
        return failed


class PeerReplay(Verifier):
    """A real swarm (see the module docstring): commit to our start state, verify groupmates after each round.
    ``replica(rank)`` builds a fresh worker on that rank's shard (its state is then the suspect's)."""

    def __init__(self, fraction: float, tolerance: float, seed: int, averager: Averager,
                 replica: Callable[[int], Worker], inner_steps: int):  # fmt: skip
        super().__init__(fraction, tolerance, seed)
        self.averager, self.replica, self.inner_steps = averager, replica, inner_steps

    def phase_starts(self, group: WorkerGroup, phase: int) -> None:
        if not isinstance(group, WorkerGroup) or group.size != 1:
            raise ValueError("verification on a real swarm needs one worker per process, backend.execution=sequential")
        buf = io.BytesIO()
        torch.save(group.workers[0].state_dict(), buf)
        # the round this phase ends in carries its hash and serves it; committed now, not after the phase, since a
        # real swarm may form that round's group (and gather its metadata) while the phase runs (Averager.prepare)
        self.averager.commit(buf.getvalue())

    def after_round(self, anchor, phase: int) -> dict[int, str]:
        evidence = self.averager.evidence()
        failed = {}
        for j in self.chosen(phase, [e.rank for e in evidence]):
            e = evidence[j]
            why = self._check(e, anchor, phase)
            if why is not None:
                failed[e.rank] = why
                self._ban(e.rank, why)
                self.averager.exclude(e.rank, why)
        return failed

    def _check(self, e: Evidence, anchor, phase: int) -> str | None:
        blob = e.fetch()
        if blob is None:
            log.info("phase %d: rank %d did not serve its start state; not checked this time", phase, e.rank)
            return None
        if commitment(blob) != e.commitment:
            return f"verification failed in phase {phase}: the start state it served is not the one it committed to"
        replica = self.replica(e.rank)
        steps = e.weight / replica.tokens_per_step
        if not (steps == int(steps) and 0 <= steps <= self.inner_steps):  # and no replay longer than a phase
            return (f"verification failed in phase {phase}: it claimed {e.weight:g} tokens, not a whole number of "
                    f"steps up to H={self.inner_steps}")  # fmt: skip
        try:
            replica.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
        except Exception as e_:  # noqa: BLE001 - anything the unpickler or the loader raises: not a worker state
            return f"verification failed in phase {phase}: its start state does not load ({type(e_).__name__})"
        return self._replay(replica, anchor, int(steps), e.row, phase)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for rank, why in self.banned.items():  # a resume or a resync: the swarm's exclusions hold for us too
            self.averager.exclude(rank, why)
