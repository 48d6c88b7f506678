"""The modelled wall-clock of one process's workers, on which a strategy places its compute and its exchanges.

Only the strategy knows what overlapped (an exchange started before the next inner steps and awaited τ steps
later; a fragment of the model in flight while another trains), so it books both here and the timeline says
how long the round took:

- ``compute(plan, measured)``: an inner phase; the workers run in parallel, so it lasts as long as the slowest
  (its modelled time: ``NetworkModel.phase_cost``; a pipeline's is its schedule's) and adds their mean busy time.
- ``exchange(started_at, seconds)``: an averaging started at ``started_at`` that occupies the network for
  ``seconds`` (the network model's price on sim, the measured time on a real backend). Exchanges share the
  link one after another: one starts when it was started or when the previous one is done, whichever is later.
  Returns when it ends.
- ``wait(until)``: the workers block until then (an exchange whose result the next step needs): idle time.

A blocking DiLoCo round is compute, then exchange, then wait: compute + comm. With ``network.overlap`` (the
price-only approximation of an overlapped schedule, for strategies that do not overlap themselves) ``wait``
does not block; whatever is still on the network when the run ends is waited for by ``drain``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from locoswarm.faults import PhasePlan
from locoswarm.netsim import NetworkModel


@dataclass
class Cost:
    """What a stretch of the timeline cost (seconds)."""

    seconds: float = 0.0  # modelled wall-clock
    busy_seconds: float = 0.0  # mean modelled compute of the workers that took part (for utilisation)
    comm_seconds: float = 0.0  # time the network was busy with exchanges

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.seconds + other.seconds,
            self.busy_seconds + other.busy_seconds,
            self.comm_seconds + other.comm_seconds,
        )


class Timeline:
    def __init__(self, network: NetworkModel):
        self.network = network
        self.now = 0.0
        self.busy = 0.0
        self.comm = 0.0
        self.network_free_at = 0.0
        self._mark = Cost()

    def compute(self, plan: PhasePlan, measured: Sequence[float]) -> None:
        seconds, busy = self.network.phase_cost(plan, measured)
        self.now += seconds
        self.busy += busy

    def exchange(self, started_at: float, seconds: float) -> float:
        begin = max(started_at, self.network_free_at)
        self.network_free_at = begin + seconds
        self.comm += seconds
        return self.network_free_at

    def wait(self, until: float) -> None:
        if not self.network.cfg.overlap:
            self.now = max(self.now, until)

    def event(self, at: float, busy: float = 0.0, comm: float = 0.0) -> None:
        """An event-driven strategy's clock (async_diloco): the run has reached ``at``; ``busy`` seconds of mean
        worker compute and ``comm`` seconds of exchanges were booked with it."""
        self.now = max(self.now, at)
        self.busy += busy
        self.comm += comm

    def drain(self) -> None:
        """The end of the run: everything still on the network is waited for."""
        self.now = max(self.now, self.network_free_at)

    def total(self) -> Cost:
        return Cost(self.now, self.busy, self.comm)

    def since_mark(self) -> Cost:
        """The cost since the last call (one round's), and set a new mark."""
        total = self.total()
        delta = Cost(total.seconds - self._mark.seconds, total.busy_seconds - self._mark.busy_seconds,
                     total.comm_seconds - self._mark.comm_seconds)  # fmt: skip
        self._mark = total
        return delta

    def state_dict(self) -> dict:
        return {"now": self.now, "busy": self.busy, "comm": self.comm, "network_free_at": self.network_free_at}

    def load_state_dict(self, s: dict) -> None:
        self.now, self.busy, self.comm = float(s["now"]), float(s["busy"]), float(s["comm"])
        self.network_free_at = float(s["network_free_at"])
        self._mark = self.total()
