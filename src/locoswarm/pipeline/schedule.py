"""The modelled wall-clock of one pipeline step: every micro-batch's calls, placed on the peers that ran them.

Each micro-batch is a chain of calls: forward through stage 0..S-1, then backward through S-1..0 (plus any
failed attempt and its retry). A call waits for its predecessor, for its input to cross the link from the peer
that produced it (``NetworkModel.transfer_seconds``: the sender's uplink, the receiver's downlink, latency),
and for its peer, which runs one call at a time, in the order the calls became ready (a backward first on a
tie: it frees memory, as 1F1B schedules do). So the step's makespan shows the pipeline's bubbles (a stage
waiting for the one before it), its slowest stage and its links; each peer's busy time gives utilisation.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from locoswarm.netsim import NetworkModel


@dataclass(frozen=True)
class Call:
    peer: int  # global peer id (stage * workers + index)
    seconds: float  # modelled compute
    backward: bool
    source: int | None = None  # the peer whose output this call needs (None: the data, or the same peer)
    incoming_bytes: float = 0.0  # what crosses the link from ``source``


def simulate_step(chains: Sequence[Sequence[Call]], network: NetworkModel, peers: int) -> tuple[float, list[float]]:
    """(makespan, busy seconds per peer) of one step whose micro-batches are ``chains``, all released at 0."""
    free = [0.0] * peers
    busy = [0.0] * peers
    end = 0.0
    # (ready time, forward after backward, chain, position in chain)
    ready = [(_arrival(chain[0], 0.0, network), not chain[0].backward, m, 0) for m, chain in enumerate(chains) if chain]
    heapq.heapify(ready)
    while ready:
        at, _, m, i = heapq.heappop(ready)
        call = chains[m][i]
        start = max(at, free[call.peer])
        done = start + call.seconds
        free[call.peer] = done
        busy[call.peer] += call.seconds
        end = max(end, done)
        if i + 1 < len(chains[m]):
            nxt = chains[m][i + 1]
            heapq.heappush(ready, (_arrival(nxt, done, network), not nxt.backward, m, i + 1))
    return end, busy


def _arrival(call: Call, sent_at: float, network: NetworkModel) -> float:
    if call.source is None or call.source == call.peer:
        return sent_at
    return sent_at + network.transfer_seconds(call.source, call.peer, call.incoming_bytes)
