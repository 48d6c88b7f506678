"""ddp: the synchronous baseline, gradients averaged every step (what DDP/all-reduce training does)."""

from __future__ import annotations

from locoswarm.strategies.base import RoundReport, Strategy


class DDP(Strategy):
    def round(self, remaining: int) -> RoundReport:
        report = self._sync_round()
        report.outer_step = True  # for ddp every synchronisation is the round that counts
        return report
