"""The training loop: build the run, then hand every round's report to the books until the steps are done.

One loop for every algorithm and backend. What a round is (steps, exchanges, what overlapped, its cost) is
the strategy's business (``strategies/``); counters, rows, evaluation, checkpoints, resume and the summary
are the bookkeeper's (``bookkeeping.py``); building the components is ``build.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from locoswarm.bookkeeping import REQUIRED_SUMMARY_KEYS, Bookkeeper
from locoswarm.build import build_run
from locoswarm.comm.base import Averager
from locoswarm.config import Config, validate
from locoswarm.strategies import RoundReport

__all__ = ["REQUIRED_SUMMARY_KEYS", "train"]


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    ranks: Sequence[int] | None = None,
    averager: Averager | None = None,
    stop_after_step: int | None = None,
    on_round: Callable[[RoundReport, int], None] | None = None,
) -> dict[str, Any]:
    """Run one training job; returns the summary (also written to ``run_dir/summary.json``).

    ranks: the workers this process hosts (default all K, the ``sim`` backend); a peer on a real network
    hosts one. averager: overrides the backend's averager (real backends pass theirs). stop_after_step:
    raise KeyboardInterrupt once this inner step is done, exactly like a Ctrl+C (used to test resume).
    """
    validate(cfg)
    with Bookkeeper(cfg, run_dir, stop_after_step=stop_after_step, on_round=on_round, averager=averager) as book:
        run = build_run(cfg, ranks, averager)
        book.attach(run)
        while run.group.step < cfg.train.max_steps:
            book.record(run.strategy.round(cfg.train.max_steps - run.group.step))
        return book.finish()
