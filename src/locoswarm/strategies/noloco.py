"""noloco: no all-reduce. After each phase a worker averages with a small random group (gossip) and steps its own
replica with NoLoCo's outer step (Kolehmainen et al. 2025, "NoLoCo: No-all-reduce Low Communication Training").

Every worker m keeps its own anchor φ_m (its replica of the outer model) and its own outer-optimiser state. After
H inner steps, the workers are split at random into groups of ``algorithm.group_size`` (a fresh seeded partition
every phase, the same on every peer). Each group averages, token-weighted, its members' pseudo-gradients
Δ_j = φ_j − θ_j and their anchors φ_j (one round per group, over the group only), and every member steps

    g_m = Δ̄_G + c·(φ_m − φ̄_G)          φ_m ← OuterOpt_m(φ_m, g_m)          (c = ``algorithm.consensus``)

The second term is NoLoCo's modification: it pulls a replica towards its group's mean, so replicas that only ever
meet a random partner still stay close. With outer SGD (lr β, momentum α) this is the paper's step
δ_m = α δ_m − β Δ̄_G − β·c·(φ_m − φ̄_G), φ_m ← φ_m + δ_m (c = 1: the authors' code pulls with the outer lr);
any outer optimiser applies (nesterov, the default, is "modified Nesterov").

Identity (tests/test_noloco.py): with ``group_size`` = K every worker is in the one group, every anchor is the
same, φ_m − φ̄ is zero to rounding, and the step is DiLoCo's with the same outer optimiser; nothing here treats
that case apart.

A group whose round is rejected whole (a non-finite sum: a diverged member) gets a zero update, as diloco does; a
group whose members all sat the phase out (churn) exchanges nothing and gets a zero update too (momentum still
moves their replicas, as it moves diloco's anchor). The replicas are averaged uncompressed (``compression=none`` is
required so far: a lossy codec would pull every replica towards a distorted mean).

Groups exchange at the same time over disjoint links, so a phase's exchange lasts as long as its slowest group's
(one booking on the timeline), and its bytes per worker are the mean over the workers that took part. The model
evaluated is the first local worker's replica (a peer has no other); ``replica_spread`` in every sync row is the
mean L2 distance of the replicas to their average, logged where every replica is in this process (sim), and
``group_distance`` is the local replicas' mean distance to their group's mean (any backend).

The partition is drawn over the swarm's ranks (``workers``), so on a real swarm, where a process hosts one worker,
every peer draws the same groups and starts only its own group's round (``Averager.start(group=...)``: hivemind
then meets only that group's peers). A gossip round that fails there (the partner is gone) is a round without
members: a zero update, as above; a peer the swarm has left behind skips the phases it missed (``Round.skipped``)
with its own replica, so it draws the swarm's groups again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locoswarm.comm.base import DEFAULT_KEY, Averager, parallel_round
from locoswarm.config import OuterOptimizerConfig
from locoswarm.faults import PhasePlanner
from locoswarm.outer import OuterOptimizer
from locoswarm.seeding import derive_seed
from locoswarm.strategies.base import ReplicaStrategy, RoundReport, pseudo_gradient_stats, tensor_norm
from locoswarm.timeline import Timeline
from locoswarm.worker import WorkerGroup


def gossip_groups(ranks: Sequence[int], group_size: int, seed: int, phase: int) -> list[list[int]]:
    """This phase's partition of ``ranks`` into groups of ``group_size`` (the last one smaller when it does not
    divide): a permutation drawn from (seed, phase), so every peer that knows the ranks draws the same groups."""
    if group_size < 1:
        raise ValueError(f"algorithm.group_size={group_size} is invalid: need at least 1 worker per group")
    g = torch.Generator().manual_seed(derive_seed(seed, "gossip", phase))
    order = [ranks[i] for i in torch.randperm(len(ranks), generator=g).tolist()]
    return [sorted(order[i : i + group_size]) for i in range(0, len(order), group_size)]


class NoLoCo(ReplicaStrategy):
    def __init__(
        self,
        group: WorkerGroup,
        averager: Averager,
        anchor: Sequence[torch.Tensor],
        outer: OuterOptimizerConfig,
        inner_steps: int,
        group_size: int = 2,
        consensus: float = 1.0,
        seed: int = 0,
        warmup_sync_steps: int = 0,
        planner: PhasePlanner | None = None,
        timeline: Timeline | None = None,
        workers: int | None = None,
    ):
        if group_size < 1:
            raise ValueError(f"algorithm.group_size={group_size} is invalid: need at least 1 worker per group")
        super().__init__(group, averager, anchor, outer, inner_steps, warmup_sync_steps, planner, timeline)
        self.group_size, self.consensus, self.seed = group_size, consensus, seed
        # the swarm's ranks, which every peer partitions the same way (a real peer hosts one of them)
        self.swarm_ranks = list(range(workers)) if workers is not None else list(group.ranks)
        self.phases = 0  # phases synchronised so far: draws each phase's groups
        self._sketch: torch.Tensor | None = None  # the coordinates a real peer publishes (``spread_estimate``)

    def round(self, remaining: int) -> RoundReport:
        if self.group.step < self.warmup_sync_steps:
            return self._warmup_round()
        phase = self._phase(remaining)
        pseudo = self.group.pseudo_gradients_each(self.anchors)  # [(L, *shape)]
        extras = pseudo_gradient_stats(pseudo)
        weights = self.group.tokens_per_step() * torch.tensor(phase.plan.claims, dtype=torch.float64)
        ranks = self.group.ranks
        groups = gossip_groups(self.swarm_ranks, self.group_size, self.seed, self.phases)
        self.phases += 1
        n = len(pseudo)
        started_at = self.timeline.now
        # Every group's round starts now, each over its members only (the others have weight 0 in it). A process
        # takes part in the groups of its own workers: on sim all of them, on a real swarm its peer's one.
        flights = []
        for members in groups:
            mask = torch.tensor([r in members for r in ranks], dtype=torch.float64)
            if not mask.any() or (mask.sum() == len(members) and not float((weights * mask).sum()) > 0):
                continue  # not ours, or every member is ours and sat the phase out: nothing to say
            flights.append((members, self.averager.start([*pseudo, *self.anchors], weights * mask, key=DEFAULT_KEY,
                                                         ranks=ranks, group=members)))  # fmt: skip
        update = [torch.zeros_like(p) for p in pseudo]
        rounds, distances = [], []
        for members, handle in flights:
            result = handle.wait()
            rounds.append(result)
            self.phases += result.skipped  # a real peer left behind by the swarm skips to its phase
            if not result.members or set(result.members) <= set(result.rejected):
                continue  # the whole round was rejected (a non-finite sum): a zero update, as diloco's, not a zero mean
            mean_pseudo, mean_anchor = result.tensors[:n], result.tensors[n:]
            for j, r in enumerate(ranks):
                if r in members:
                    for u, d, a, mine in zip(update, mean_pseudo, mean_anchor, self.anchors, strict=True):
                        u[j] = d + self.consensus * (mine[j] - a)
                    distances.append(tensor_norm([mine[j] - a for mine, a in zip(self.anchors, mean_anchor,
                                                                                    strict=True)]))  # fmt: skip
        comm = parallel_round(rounds)
        self.timeline.wait(self.timeline.exchange(started_at, comm.seconds))
        self.outer.step(update)
        self.group.load_params_each(self.anchors)
        extras["outer_grad_norm"] = tensor_norm([u[0] for u in update])
        extras.update(OuterOptimizer.norms([self.outer]))  # over the L stacked local optimisers
        # the replicas' spread needs every replica: exact where this process holds them all (sim), else estimated
        # from the peers' published sketches; any peer can say how far it was from its group's mean
        if len(ranks) == len(self.swarm_ranks):
            extras["replica_spread"] = self.replica_spread()
        else:
            extras.update(self.spread_estimate(self.phases - 1))
        extras["group_distance"] = sum(distances) / len(distances) if distances else None
        extras["gossip_groups"] = groups
        return self._report(phase.steps, phase.losses, phase.seconds, [comm], True, comm.total_weight, extras)

    @torch.no_grad()
    def replica_spread(self) -> float:
        """Mean over the local replicas of their L2 distance to the replicas' average."""
        sq = sum(((a - a.mean(dim=0, keepdim=True)).double() ** 2).reshape(a.shape[0], -1).sum(dim=1)
                 for a in self.anchors)  # fmt: skip
        return float(torch.as_tensor(sq).sqrt().mean())

    SKETCH = 2048  # coordinates of a replica a real peer publishes each phase for the spread estimate

    @torch.no_grad()
    def spread_estimate(self, phase: int) -> dict:
        """A real swarm, where a peer holds one replica: it publishes a fixed seeded subsample of its replica (after
        this phase's step) on the averager's board, and estimates the previous phase's spread (by now every peer
        has published it, or nearly) from the subsamples there: each replica's distance to their mean on the
        sampled coordinates, scaled by sqrt(parameters / sampled)."""
        flat = torch.cat([a[0].reshape(-1).float().cpu() for a in self.anchors])
        if self._sketch is None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "spread"))
            self._sketch = torch.randperm(flat.numel(), generator=g)[: self.SKETCH]
        self.averager.board(f"spread{phase}", flat[self._sketch])
        seen = self.averager.board(f"spread{phase - 1}") if phase > 0 else {}
        rows = [v for v in seen.values() if v.numel() == self._sketch.numel()]
        if len(rows) < 2:
            return {}
        stacked = torch.stack(rows).double()
        distance = (stacked - stacked.mean(dim=0)).norm(dim=1) * (flat.numel() / self._sketch.numel()) ** 0.5
        return {"replica_spread_estimate": float(distance.mean()), "replica_spread_estimate_phase": phase - 1,
                "replica_spread_estimate_peers": len(rows)}  # fmt: skip

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "phases": self.phases,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.phases = int(state["phases"])
