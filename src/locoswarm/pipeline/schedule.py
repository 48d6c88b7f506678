"""The modelled wall-clock of one pipeline step: every micro-batch's calls, placed on the peers that ran them.

Each micro-batch is a chain of calls: forward through stage 0..S-1, then backward through S-1..0 (plus any
failed attempt and its retry). A call waits for its predecessor, then for its input to cross from the peer that
produced it, then for its peer, which runs one call at a time in the order the calls became ready (a backward
first on a tie: it frees memory, as 1F1B schedules do). A message occupies the sender's uplink and the receiver's
downlink for its time on the wire (messages on one link go one after another, in the order they were sent), then
travels the latency between them (``NetworkModel.wire_seconds``). So the step's makespan shows the pipeline's
bubbles (a stage waiting for the one before it), its slowest stage and its busiest links; each peer's busy time
gives utilisation.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from locoswarm.netsim import NetworkModel


@dataclass(frozen=True)
class Call:
    peer: int  # global peer id
    seconds: float  # modelled compute
    backward: bool
    source: int | None = None  # the peer whose output this call needs (None: the data, or the same peer)
    incoming_bytes: float = 0.0  # what crosses the link from ``source``


_SEND, _RUN = 0, 1  # event kinds: a message leaves its sender; a call is ready to run on its peer


def simulate_step(chains: Sequence[Sequence[Call]], network: NetworkModel, peers: int) -> tuple[float, list[float]]:
    """(makespan, busy seconds per peer) of one step whose micro-batches are ``chains``, all released at 0."""
    free, up, down = [0.0] * peers, [0.0] * peers, [0.0] * peers
    busy = [0.0] * peers
    end = 0.0
    # (time, kind, forward after backward, chain, position): events in time order; each link and peer is FIFO
    events: list[tuple[float, int, bool, int, int]] = []

    def release(at: float, m: int, i: int) -> None:
        call = chains[m][i]
        needs_message = call.source is not None and call.source != call.peer
        heapq.heappush(events, (at, _SEND if needs_message else _RUN, not call.backward, m, i))

    for m, chain in enumerate(chains):
        if chain:
            release(0.0, m, 0)
    while events:
        at, kind, _, m, i = heapq.heappop(events)
        call = chains[m][i]
        if kind == _SEND:
            wire, latency = network.wire_seconds(call.source, call.peer, call.incoming_bytes)
            start = max(at, up[call.source], down[call.peer])
            up[call.source] = down[call.peer] = start + wire
            heapq.heappush(events, (start + wire + latency, _RUN, not call.backward, m, i))
            continue
        start = max(at, free[call.peer])
        done = start + call.seconds
        free[call.peer] = done
        busy[call.peer] += call.seconds
        end = max(end, done)
        if i + 1 < len(chains[m]):
            release(done, m, i + 1)
    return end, busy
