"""NetworkModel: prices a synchronisation round on a modelled network, for the ``sim`` backend.

A round moves each worker's payload through an all-reduce (or a parameter server, or one gossip exchange).
We charge the classic bandwidth + latency cost of that pattern, so a simulated run reports ``sim_seconds``,
the wall-clock it would take on that network with workers computing in parallel. Per-worker compute speed
multipliers make the slowest worker set the pace of each synchronous phase.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from locoswarm.config import NetworkConfig, Topology


def wire_bytes(topology: Topology | str, workers: int, payload_bytes: float) -> tuple[float, float]:
    """Bytes one worker sends and receives to all-reduce a payload of ``payload_bytes`` with ``workers`` peers.

    ring / butterfly: reduce-scatter then all-gather, 2(K-1)/K of the payload each way (bandwidth-optimal).
    parameter_server: the payload up, the averaged payload down. gossip: one exchange with one peer.
    """
    k = workers
    topo = Topology(topology)
    if k <= 1:
        return 0.0, 0.0
    if topo in (Topology.ring, Topology.butterfly):
        b = 2.0 * (k - 1) / k * payload_bytes
        return b, b
    return float(payload_bytes), float(payload_bytes)


class NetworkModel:
    def __init__(self, cfg: NetworkConfig, workers: int):
        self.cfg = cfg
        self.workers = workers
        self.topology = Topology(cfg.topology)
        self.up_bps = (cfg.uplink_mbps or cfg.bandwidth_mbps) * 1e6
        self.down_bps = (cfg.downlink_mbps or cfg.bandwidth_mbps) * 1e6
        self.latency_s = cfg.latency_ms / 1e3
        self.speed = list(cfg.compute_speed) or [1.0] * workers

    def round_seconds(self, payload_bytes: float) -> float:
        """Modelled time of one round in which every worker contributes ``payload_bytes``."""
        k = self.workers
        if k <= 1:
            return 0.0
        sent, received = wire_bytes(self.topology, k, payload_bytes)
        transfer = max(sent * 8 / self.up_bps, received * 8 / self.down_bps)
        if self.topology == Topology.ring:
            hops = 2 * (k - 1)  # each of the 2(K-1) ring steps waits one message latency
        elif self.topology == Topology.butterfly:
            hops = 2 * math.ceil(math.log2(k))
        elif self.topology == Topology.parameter_server:
            # the server's own link carries K payloads each way
            transfer = max(transfer, k * payload_bytes * 8 / min(self.up_bps, self.down_bps))
            hops = 2
        else:  # gossip
            hops = 1
        return transfer + hops * self.latency_s

    def phase_seconds(self, measured_seconds: Sequence[float]) -> float:
        """A synchronous phase lasts as long as its slowest worker (measured time / speed multiplier)."""
        return max((t / s for t, s in zip(measured_seconds, self.speed, strict=False)), default=0.0)
