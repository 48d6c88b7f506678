"""streaming_diloco: DiLoCo that averages one fragment of the model at a time, overlapped with training.

Streaming DiLoCo (Douillard et al., 2025). The model's blocks are split into P fragments (``fragment_indices``:
strided, block b in fragment b mod P, as in the paper; or sequential, contiguous runs). Fragment p is
synchronised every H inner steps at offset p·H/P, so one P-th of the model crosses the network every H/P steps
and the peak bandwidth drops by P. Each fragment has its own anchor (the global copy of its parameters), its
own outer optimiser state and its own stream of averaging rounds (key ``fragment<p>``: its own codecs and
error-feedback residuals).

A fragment's sync at step s:
  1. pseudo-gradient = anchor_p − local_p for every worker, weighted by the tokens each trained since the
     fragment's last sync; the averaging round *starts* (``Averager.start``);
  2. the workers train ``overlap_steps`` = τ more steps while it is in flight;
  3. at s + τ the average is needed: the outer optimiser steps anchor_p with it, and every worker merges the
     result into its local fragment: local_p := α·local_p + (1 − α)·anchor_p (``mixing`` = α).
At the end of training every fragment is synchronised once more and everything in flight is merged, so the
final model is the anchors (what ``global_params`` returns once the local phase has begun).

With P = 1, τ = 0, α = 0 every step above is DiLoCo's, and nothing in this file treats that case apart: the
identity test (tests/test_streaming.py) pins it to ``DiLoCo``.

A round of this strategy runs up to the next event (a fragment's sync, a merge that is due, or the end), so
the trainer sees rounds of H/P or fewer steps; an in-flight round survives a checkpoint (its result is saved
with the strategy and merged at its due step after a resume).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from locoswarm.comm.base import Averager, Round
from locoswarm.config import FragmentPattern, OuterOptimizerConfig
from locoswarm.faults import PhasePlanner
from locoswarm.outer import OuterOptimizer
from locoswarm.strategies.base import InFlight, RoundReport, Strategy, pseudo_gradient_stats, tensor_norm
from locoswarm.timeline import Timeline
from locoswarm.worker import WorkerGroup

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def fragment_indices(names: Sequence[str], fragments: int, pattern: FragmentPattern | str) -> list[list[int]]:
    """Parameter indices of each fragment. A block's parameters stay together; a parameter outside the blocks
    joins the fragment of the nearest block before it in parameter order (the first block for the embeddings,
    the last for the final norm). strided: block b -> fragment b mod P; sequential: contiguous runs of blocks."""
    blocks = [int(m.group(1)) if (m := _BLOCK.search(n)) else None for n in names]
    n_blocks = len({b for b in blocks if b is not None})
    if fragments < 1 or fragments > max(1, n_blocks):
        raise ValueError(
            f"algorithm.fragments={fragments} is invalid: need 1 <= P <= the model's {n_blocks} blocks (model.n_layer)"
        )
    first = next((b for b in blocks if b is not None), 0)
    owner, current = [], first
    for b in blocks:
        current = b if b is not None else current
        owner.append(current)
    if FragmentPattern(pattern) == FragmentPattern.strided:
        frag_of = [b % fragments for b in owner]
    else:
        frag_of = [b * fragments // max(1, n_blocks) for b in owner]
    return [[i for i, f in enumerate(frag_of) if f == p] for p in range(fragments)]


@dataclass
class _Sync:
    fragment: int
    due: int  # the inner step at which the result is merged
    flight: InFlight


class StreamingDiLoCo(Strategy):
    def __init__(
        self,
        group: WorkerGroup,
        averager: Averager,
        fragments: Sequence[Sequence[int]],
        outer: OuterOptimizerConfig,
        inner_steps: int,
        overlap_steps: int = 0,
        mixing: float = 0.0,
        warmup_sync_steps: int = 0,
        planner: PhasePlanner | None = None,
        timeline: Timeline | None = None,
    ):
        if inner_steps < 1:
            raise ValueError(f"algorithm.inner_steps={inner_steps} is invalid: H must be >= 1")
        if not 0 <= overlap_steps < inner_steps:
            raise ValueError(
                f"algorithm.overlap_steps={overlap_steps} is invalid: need 0 <= τ < algorithm.inner_steps={inner_steps}"
            )
        if not 0.0 <= mixing <= 1.0:
            raise ValueError(f"algorithm.mixing={mixing} is invalid: α must be in [0, 1]")
        super().__init__(group, averager, planner, timeline, inner_steps)
        self.fragments = [list(f) for f in fragments]
        covered = sorted(i for f in self.fragments for i in f)
        if covered != list(range(len(group.params(0)))):
            raise ValueError("fragments must cover every parameter index exactly once")
        self.inner_steps, self.overlap_steps, self.mixing = inner_steps, overlap_steps, mixing
        self.warmup_sync_steps = warmup_sync_steps
        params = group.params(0)
        self.anchors = [[params[i].detach().clone() for i in f] for f in self.fragments]
        self.outers = [OuterOptimizer(a, outer) for a in self.anchors]
        n = len(self.fragments)
        self.offsets = [p * inner_steps // n for p in range(n)]
        self.since = [torch.zeros(group.size, dtype=torch.float64) for _ in self.fragments]  # tokens since sync
        self.in_flight: list[_Sync] = []

    # ------------------------------------------------------------------ schedule
    def _local_step(self, step: int) -> int:
        return step - self.warmup_sync_steps

    def _syncs_at(self, step: int) -> bool:
        s = self._local_step(step)
        return any(s > 0 and s >= o and (s - o) % self.inner_steps == 0 for o in self.offsets)

    def _next_event(self, step: int, end: int) -> int:
        """The first step after ``step`` at which a fragment syncs, a merge is due, or the run ends."""
        candidates = [end, *(x.due for x in self.in_flight if x.due > step)]
        s = self._local_step(step)
        for o in self.offsets:
            k = max(0, (s - o) // self.inner_steps + 1)  # next sync of this fragment strictly after s
            candidates.append(self.warmup_sync_steps + o + k * self.inner_steps)
        return min(c for c in candidates if c > step)

    # ------------------------------------------------------------------ the round
    def round(self, remaining: int) -> RoundReport:
        step = self.group.step
        if step < self.warmup_sync_steps:
            report = self._sync_round()
            if self.group.step == self.warmup_sync_steps:  # the local phase begins from the warmed-up params
                self._reset_anchors()
            return report
        end = step + remaining
        target = self._next_event(step, end)
        phase = self._phase(target - step)
        tokens = self.group.tokens_per_step() * torch.tensor(phase.counts, dtype=torch.float64)
        for s in self.since:
            s += tokens
        now = self.group.step
        done: list[Round] = []
        extras: dict = {}
        # Merges due now (started earlier, so first: rounds complete in start order), then the syncs due now;
        # with τ = 0 (or at the end of the run) those are merged at once too.
        self._merge_due(now, end, done, extras)
        for p, o in enumerate(self.offsets):
            s = self._local_step(now)
            at_sync = s >= o and (s - o) % self.inner_steps == 0
            if (at_sync or now >= end) and self.since[p].any() and not self._pending(p):
                self._start_sync(p, now, end, extras)
        self._merge_due(now, end, done, extras)
        if len(set(phase.counts)) > 1:
            extras["worker_steps"] = phase.counts
        if done:
            extras["fragment_bytes_sent"] = [r.bytes_sent for r in done]
            extras["outer_grad_norm"] = tensor_norm([t for r in done for t in r.tensors])
            extras.update(OuterOptimizer.norms([self.outers[p] for p in extras["fragments_merged"]]))
        scale = self.planner.network.workers / max(1, self.group.data_workers)  # real backends host one of K workers
        return self._report(phase.steps, phase.losses, phase.seconds, done, bool(done), float(tokens.sum()) * scale,
                             extras)  # fmt: skip

    def _pending(self, p: int) -> bool:
        return any(x.fragment == p for x in self.in_flight)

    def _start_sync(self, p: int, now: int, end: int, extras: dict) -> None:
        pseudo = self.group.pseudo_gradients(self.anchors[p], self.fragments[p])  # [(L, *shape)]
        extras.setdefault("pg_norm_by_fragment", {})[p] = pseudo_gradient_stats(pseudo)["pg_norm"]
        weights, self.since[p] = self.since[p], torch.zeros_like(self.since[p])
        flight = self._start(pseudo, weights, key=f"fragment{p}")
        self.in_flight.append(_Sync(p, min(now + self.overlap_steps, end), flight))

    def _merge_due(self, now: int, end: int, done: list[Round], extras: dict) -> None:
        while self.in_flight and (self.in_flight[0].due <= now or now >= end):
            sync = self.in_flight.pop(0)
            result = self._wait(sync.flight)
            p = sync.fragment
            self.outers[p].step(result.tensors)
            self.group.mix_params(self.anchors[p], self.fragments[p], self.mixing)
            done.append(result)
            extras.setdefault("fragments_merged", []).append(p)

    def _reset_anchors(self) -> None:
        params = self.group.params(0)
        with torch.no_grad():
            for anchor, frag in zip(self.anchors, self.fragments, strict=True):
                for a, i in zip(anchor, frag, strict=True):
                    a.copy_(params[i])

    def global_params(self) -> list[torch.Tensor]:
        """The anchors (the global model) once the local phase has begun; during a warm-up, worker 0's params."""
        if self.group.step <= self.warmup_sync_steps:
            return self.group.params(0)
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.group.params(0))
        for anchor, frag in zip(self.anchors, self.fragments, strict=True):
            for a, i in zip(anchor, frag, strict=True):
                out[i] = a
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        # A round in flight is awaited and its result saved: a resume merges it at its due step, exactly.
        in_flight = [{"fragment": x.fragment, "due": x.due, **x.flight.state_dict()} for x in self.in_flight]
        return {
            **super().state_dict(),
            "anchors": [[a.detach().clone() for a in anchor] for anchor in self.anchors],
            "outers": [o.state_dict() for o in self.outers],
            "since": [s.clone() for s in self.since],
            "in_flight": in_flight,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for anchor, saved in zip(self.anchors, state["anchors"], strict=True):
                for a, s in zip(anchor, saved, strict=True):
                    a.copy_(s)
        for o, s in zip(self.outers, state["outers"], strict=True):
            o.load_state_dict(s)
        self.since = [s.clone() for s in state["since"]]
        self.in_flight = [_Sync(x["fragment"], x["due"], InFlight.from_state(x)) for x in state["in_flight"]]
