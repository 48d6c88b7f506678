"""Averaging in a pipeline (pipeline.stages > 1): each stage's peers average that stage's tensors among
themselves, all stages at once.

A strategy hands over what it would for whole-model workers: per parameter a (C, *shape) stack whose row c is
replica (column) c, i.e. of each parameter the copy held by the peer serving its stage from column c. So one logical
round is S rounds, one per stage, each over the peers serving that stage (their global ids, so the network model
prices it on their links; a free slot takes no part) and its own key (``<key>/stage<s>``: its own codecs and
residuals). Every serving peer takes part (a peer that ran no micro-batch still needs the result) and its
contribution counts by the micro-batches it ran in its stage since this stream's last round (``stage_work``), not by
the strategy's per-worker tokens: a pipeline's work is spread over peers by the routing. So a row is scaled by its
peer's work over the stage's mean work and the peers averaged uniformly: the work-weighted mean. (If a row is
rejected, the rest are renormalised uniformly, not by work.) With equal work (fixed routing, no failures) nothing
is scaled. The round's ``total_weight`` stays the strategy's (the workers' tokens). The stage rounds
run side by side: the round lasts as long as the slowest stage's, its bytes are per stage peer
(``parallel_round``), and its members and rejections are named by peer id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from locoswarm.comm.base import Averager, Round, parallel_round


class StagedAverager(Averager):
    def __init__(
        self,
        inner: Averager,
        stage_params: Sequence[Sequence[int]],
        stage_peers: Callable[[int], list[int | None]],
        stage_work: Callable[[int], list[int]],
        key_params: dict[str, Sequence[int]] | None = None,
    ):
        """inner: averages one stage's tensors (rows ranked by peer id); stage_params: each stage's parameter
        indices; stage_peers(s): per column, the peer serving stage s there (None: a free slot); stage_work(s): per
        column, the micro-batches run in stage s there over the run; key_params: the
        parameter indices of the tensors a stream of rounds carries (streaming's fragments; default every
        parameter, in order)."""
        self.inner = inner
        self.stage_of = {i: s for s, idx in enumerate(stage_params) for i in idx}
        self.stages = len(stage_params)
        self.stage_peers, self.stage_work = stage_peers, stage_work
        self.params = len(self.stage_of)
        self.key_params = {k: list(v) for k, v in (key_params or {}).items()}
        self.counted: dict[str, list[list[int]]] = {}  # per stream: stage_work at its last round

    def _round(self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, ranks) -> Round:
        carried = self.key_params.get(key, range(self.params))  # tensors[j] is parameter carried[j]
        if len(tensors) != len(carried):
            raise ValueError(f"round {key!r}: got {len(tensors)} tensors, expected {len(carried)} (one per parameter "
                             "of the stream; a pipeline needs to know which stage each tensor belongs to)")  # fmt: skip
        handles = []
        counted = self.counted.setdefault(key, [[0] * weights.numel() for _ in range(self.stages)])
        for s in range(self.stages):
            positions = [j for j, i in enumerate(carried) if self.stage_of[i] == s]
            if not positions:  # this stream carries nothing of stage s
                continue
            peers = self.stage_peers(s)
            if len(peers) != weights.numel():
                raise ValueError(f"stage {s} has {len(peers)} slots, the round {weights.numel()} rows")
            work = self.stage_work(s)
            since = [w - c for w, c in zip(work, counted[s], strict=True)]
            counted[s] = work
            serving = torch.tensor([p is not None for p in peers], dtype=torch.float64)
            rows = [tensors[j] for j in positions]
            mean_work = sum(n for n, p in zip(since, peers, strict=True) if p is not None) / float(serving.sum())
            if mean_work > 0 and any(n != mean_work for n, p in zip(since, peers, strict=True) if p is not None):
                # every serving peer takes part (it needs the result), weighted by its work: its row x work / mean
                scale = torch.tensor([n / mean_work for n in since], dtype=torch.float32)
                rows = [t * scale.view(-1, *([1] * (t.dim() - 1))).to(t.dtype) for t in rows]
            ranks_s = [p if p is not None else -1 - c for c, p in enumerate(peers)]  # a free slot sends nothing
            handle = self.inner.start(rows, serving, key=f"{key}/stage{s}", ranks=ranks_s)
            handles.append((s, positions, handle))
        out: list[torch.Tensor | None] = [None] * len(carried)
        rounds = []
        for _, positions, handle in handles:
            rnd = handle.wait()
            rounds.append(rnd)
            for j, t in zip(positions, rnd.tensors, strict=True):
                out[j] = t
        merged = parallel_round(rounds)
        merged.tensors = out
        merged.key = key
        merged.group_size = max(r.group_size for r in rounds)
        merged.total_weight = float(weights.to(torch.float64).sum())
        merged.members = sorted(r for rnd in rounds for r in rnd.members)  # peer ids: unique across stages
        merged.rejected = {
            r: f"stage {s}: {why}" for (s, _, _), rnd in zip(handles, rounds, strict=True)
            for r, why in rnd.rejected.items()
        }  # fmt: skip
        return merged

    def round_boundary(self) -> None:
        self.inner.round_boundary()

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "counted": {k: [list(r) for r in v] for k, v in self.counted.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.counted = {k: [list(r) for r in v] for k, v in state["counted"].items()}

    def close(self) -> None:
        self.inner.close()
        super().close()
