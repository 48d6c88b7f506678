"""Progress of a run, readable wherever its output goes.

On a terminal: a tqdm bar. Anywhere else (CI, SLURM, ``| tee``), a bar's carriage-return frames would fill the log
with thousands of lines, so a plain log line is written instead at most every ``every`` seconds (and at the end):
``name: step 1200/5000 (24%) | 3.1 steps/s | eta 20m | loss=2.712 val=2.805``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

log = logging.getLogger("locoswarm.progress")


class Progress:
    def __init__(self, total: int, initial: int, name: str, enabled: bool, every: float,
                 stream: TextIO | None = None):  # fmt: skip
        stream = stream if stream is not None else sys.stderr
        self.total, self.step, self.name, self.every = total, initial, name, every
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", file=stream) if (
            enabled and stream.isatty()) else None  # fmt: skip
        self._postfix: dict[str, str] = {}
        self._t0 = self._last = time.monotonic()
        self._start = initial

    def update(self, steps: int, **postfix: str) -> None:
        self.step += steps
        self._postfix = postfix
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix)
        elif self.enabled and (time.monotonic() - self._last >= self.every or self.step >= self.total):
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._last = now
        rate = (self.step - self._start) / max(now - self._t0, 1e-9)
        eta = (self.total - self.step) / rate if rate > 0 else float("inf")
        tail = " ".join(f"{k}={v}" for k, v in self._postfix.items())
        log.info("%s: step %d/%d (%.0f%%) | %.2f steps/s | eta %s%s", self.name, self.step, self.total,
                 100 * self.step / max(self.total, 1), rate, _duration(eta), f" | {tail}" if tail else "")  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
