"""ddp: the synchronous baseline, gradients averaged every step (what DDP/all-reduce training does)."""

from __future__ import annotations

from locoswarm.comm.base import Averager
from locoswarm.faults import PhasePlanner
from locoswarm.strategies.base import RoundReport, Strategy, sync_step
from locoswarm.worker import WorkerGroup


class DDP(Strategy):
    def __init__(self, group: WorkerGroup, averager: Averager, planner: PhasePlanner | None = None):
        super().__init__(group, averager)
        self.planner = planner  # who takes part in each step (churn); None = everyone

    def round(self, remaining: int) -> RoundReport:
        counts = self.planner.plan(1, sync=True).counts if self.planner is not None else None
        report = sync_step(self.group, self.averager, counts)
        report.outer_step = True  # for ddp every synchronisation is the round that counts
        return report

    def state_dict(self) -> dict:
        return {"planner": self.planner.state_dict()} if self.planner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.planner is not None and "planner" in state:
            self.planner.load_state_dict(state["planner"])
