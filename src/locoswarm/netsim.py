"""NetworkModel: prices a synchronisation round on a modelled network, for the ``sim`` backend.

A round is an inner phase (compute) followed by an averaging (communication). Compute: worker i's modelled
time is its step count x step time (``network.step_seconds``, or what was measured) x its straggler slowdown
/ its compute speed; the phase lasts as long as the slowest worker. Communication is priced per topology from
per-worker links (uplink u_i, downlink d_i, one-way latency l_i; a message i -> j waits (l_i + l_j) / 2),
over the workers that take part (n of them, in rank order), for a payload of P bits each (x 1 + wire_overhead,
/ link_efficiency: the share of the link rate the all-reduce code sustains, measured per implementation):

- ``ring``: reduce-scatter then all-gather, 2(n-1) steps; in each step every worker sends P/n to its successor,
  and the step lasts as long as its slowest hop: max_i (P/n / min(u_i, d_i+1) + lat(i, i+1)).
  Uniform links: 2(n-1)/n P/b + 2(n-1) l.
- ``butterfly`` (hivemind's all-reduce): the reduce-scatter is one all-to-all (each worker sends the n-1
  parts it does not own straight to their owners), the all-gather another; each lasts as long as its busiest
  link, (n-1)/n P / min(u_i, d_i), plus the largest latency. Uniform links: 2(n-1)/n P/b + 2 l.
- ``parameter_server``: every worker pushes P, the server returns the mean; the server's link (server_mbps)
  carries nP each way: 2 (max(P / b_worker, nP / b_server) + l). Uniform links, b_server = b: 2nP/b + 2l.
- blockwise quantisers (int8, int4: ``Codec.reducible``) are averaged by a re-quantising reduce-scatter and
  all-gather of the payload (``comm/exchange.py``): priced as an all-reduce of P, like summable codecs.
- codecs whose payloads can be neither summed on the wire nor re-quantised per chunk (sign, topk, powersgd)
  are all-gathered on ring and butterfly instead (what the real backends do, see ``comm/exchange.py``):
  ring: n-1 steps, each worker forwarding one whole payload to its successor, max_i (P / min(u_i, d_i+1) + lat);
  butterfly: every worker sends its payload straight to the n-1 others, (n-1) P / min(u_i, d_i) on the busiest
  link plus the largest latency. Uniform links: (n-1) P/b, i.e. n/2 times an all-reduce of the same payload.
- ``gossip``: one exchange, each worker sends P to its successor: max_i (P / min(u_i, d_i+1) + lat). The sim
  averager still computes the exact mean; this prices one round of a gossip strategy.

Overlap (``network.overlap``): a round costs max(compute, comm) instead of compute + comm, as when the sync of
round r runs during the inner phase of round r+1 (streaming / overlapped DiLoCo). It prices the schedule only:
the algorithm still applies every update synchronously unless its strategy implements the delay.

``compute_utilisation`` = modelled busy compute of the workers that took part (mean over them) / wall-clock,
summed over rounds: waiting for the network *and* for stragglers both count as idle.

``python -m locoswarm.netsim plan ...`` prices a model that was never run: what bandwidth keeps compute
utilisation at the target for ddp and diloco at each H, for each codec (see ``required_bandwidth``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from locoswarm.config import CompressionConfig, NetworkConfig, Topology
from locoswarm.faults import FaultSchedule, PhasePlan


def wire_bytes(
    topology: Topology | str, workers: int, payload_bytes: float, allgather: bool = False
) -> tuple[float, float]:
    """Bytes one worker sends and receives to all-reduce a payload of ``payload_bytes`` with ``workers`` peers.

    ring / butterfly: reduce-scatter then all-gather, 2(K-1)/K of the payload each way (bandwidth-optimal); with
    ``allgather`` (payloads that cannot be summed on the wire) K-1 payloads each way.
    parameter_server: the payload up, the averaged payload down. gossip: one exchange with one peer.
    """
    k = workers
    topo = Topology(topology)
    if k <= 1:
        return 0.0, 0.0
    if topo in (Topology.ring, Topology.butterfly):
        b = (k - 1) * payload_bytes if allgather else 2.0 * (k - 1) / k * payload_bytes
        return b, b
    return float(payload_bytes), float(payload_bytes)


def _cycled(values: Sequence[float], i: int, default: float) -> float:
    return float(values[i % len(values)]) if len(values) else float(default)


@dataclass(frozen=True)
class Link:
    """One worker's access link: bits per second each way and one-way latency in seconds."""

    up_bps: float
    down_bps: float
    latency_s: float


@dataclass
class RoundCost:
    """The modelled wall-clock of one round and its parts (seconds)."""

    compute_seconds: float  # the inner phase: its slowest worker
    busy_seconds: float  # mean modelled compute of the workers that took part (for utilisation)
    comm_seconds: float  # the averaging
    seconds: float  # the round: compute + comm, or max(compute, comm) with overlap


class NetworkModel:
    """Links, compute speeds, stragglers and churn of ``workers`` workers (see the module docstring)."""

    def __init__(self, cfg: NetworkConfig, workers: int, seed: int = 0):
        self.cfg = cfg
        self.workers = workers
        self.topology = Topology(cfg.topology)
        up = cfg.uplink_mbps or cfg.bandwidth_mbps
        down = cfg.downlink_mbps or cfg.bandwidth_mbps
        self.links = [
            Link(
                _cycled(cfg.worker_uplink_mbps, i, up) * 1e6,
                _cycled(cfg.worker_downlink_mbps, i, down) * 1e6,
                _cycled(cfg.worker_latency_ms, i, cfg.latency_ms) / 1e3,
            )
            for i in range(workers)
        ]
        self.server_bps = (cfg.server_mbps or cfg.bandwidth_mbps) * 1e6
        self.faults = FaultSchedule(cfg, workers, seed)

    def speed(self, worker: int) -> float:
        """Compute-speed multiplier of a worker (1.0 = as measured / network.step_seconds)."""
        return _cycled(self.cfg.compute_speed, worker, 1.0)

    def _latency(self, a: int, b: int) -> float:
        return (self.links[a].latency_s + self.links[b].latency_s) / 2

    # ------------------------------------------------------------------ communication
    def comm_seconds(self, payload_bytes: float, active: Sequence[int] | None = None, allgather: bool = False) -> float:
        """Modelled time of one averaging in which every worker of ``active`` (default: all) sends
        ``payload_bytes``; ``allgather``: the payloads cannot be summed on the wire (see the module docstring)."""
        ws = sorted(range(self.workers) if active is None else active)
        n = len(ws)
        if n <= 1:
            return 0.0
        bits = payload_bytes * 8 * (1 + self.cfg.wire_overhead) / self.cfg.link_efficiency
        links = self.links
        succ = list(zip(ws, ws[1:] + ws[:1], strict=True))
        if allgather and self.topology == Topology.ring:
            step = max(bits / min(links[a].up_bps, links[b].down_bps) + self._latency(a, b) for a, b in succ)
            return (n - 1) * step
        if allgather and self.topology == Topology.butterfly:
            busiest = max(bits * (n - 1) / min(links[w].up_bps, links[w].down_bps) for w in ws)
            return busiest + max(self._latency(a, b) for a in ws for b in ws if a != b)
        if self.topology == Topology.ring:
            step = max(bits / n / min(links[a].up_bps, links[b].down_bps) + self._latency(a, b) for a, b in succ)
            return 2 * (n - 1) * step
        if self.topology == Topology.butterfly:
            share = bits * (n - 1) / n
            busiest = max(share / min(links[w].up_bps, links[w].down_bps) for w in ws)
            return 2 * (busiest + max(self._latency(a, b) for a in ws for b in ws if a != b))
        if self.topology == Topology.parameter_server:
            server_latency = self.cfg.latency_ms / 1e3
            lat = max((links[w].latency_s + server_latency) / 2 for w in ws)
            push = max(max(bits / links[w].up_bps for w in ws), n * bits / self.server_bps)
            pull = max(max(bits / links[w].down_bps for w in ws), n * bits / self.server_bps)
            return push + pull + 2 * lat
        # gossip
        return max(bits / min(links[a].up_bps, links[b].down_bps) + self._latency(a, b) for a, b in succ)

    def round_seconds(self, payload_bytes: float) -> float:
        """Modelled time of one averaging of all workers (``comm_seconds`` over everyone)."""
        return self.comm_seconds(payload_bytes)

    # ------------------------------------------------------------------ compute
    def worker_compute_seconds(self, plan: PhasePlan, measured: Sequence[float]) -> list[float]:
        """Modelled compute of each local worker in the plan's round (0 for a masked worker)."""
        out = []
        for w, c, s, m in zip(plan.ranks, plan.counts, plan.slowdown, measured, strict=True):
            if c == 0:
                out.append(0.0)
                continue
            base = c * self.cfg.step_seconds if self.cfg.step_seconds is not None else m
            out.append(base * s / self.speed(w))
        return out

    def phase_seconds(self, measured_seconds: Sequence[float]) -> float:
        """A synchronous phase lasts as long as its slowest worker (measured time / speed multiplier)."""
        return max((t / self.speed(w) for w, t in enumerate(measured_seconds)), default=0.0)

    def combine(self, compute: float, comm: float) -> float:
        return max(compute, comm) if self.cfg.overlap else compute + comm

    def price_round(
        self,
        plan: PhasePlan,
        measured: Sequence[float],
        payload_bytes: float,
        comm_seconds: float | None = None,
        allgather: bool = False,
    ) -> RoundCost:
        """The round's modelled cost. ``comm_seconds`` overrides the modelled averaging (a real backend's)."""
        busy = self.worker_compute_seconds(plan, measured)
        taking_part = [w for w, c in zip(plan.ranks, plan.counts, strict=True) if c > 0]
        compute = max(busy, default=0.0)
        mean_busy = sum(busy) / len(taking_part) if taking_part else 0.0
        if comm_seconds is None:
            comm = self.comm_seconds(payload_bytes, taking_part, allgather)
        else:
            comm = comm_seconds
        return RoundCost(compute, mean_busy, comm, self.combine(compute, comm))


# ---------------------------------------------------------------------------------------------- pricing
def codec_payload_bytes(compression: CompressionConfig | str, params: float, shape: tuple[int, int] = (1024, 1024)):
    """Wire bytes of ``params`` fp32 parameters under a codec, asked of the codec itself (``wire_nbytes`` on a
    dummy ``shape`` tensor, scaled): e.g. int8 with 64-entry blocks = 1 + 4/64 bytes per parameter."""
    import torch

    from locoswarm.compression import make_codec

    cfg = CompressionConfig(name=compression) if isinstance(compression, str) else compression
    codec = make_codec(cfg)
    numel = shape[0] * shape[1]
    return codec.wire_nbytes(shape, torch.float32) / numel * params


def uniform_network(cfg: NetworkConfig, bandwidth_mbps: float) -> NetworkConfig:
    """The same network with every link (and the server's) at ``bandwidth_mbps`` both ways, no faults."""
    return dataclasses.replace(
        cfg,
        bandwidth_mbps=bandwidth_mbps,
        uplink_mbps=None,
        downlink_mbps=None,
        worker_uplink_mbps=[],
        worker_downlink_mbps=[],
        server_mbps=None,
        compute_speed=[],
        step_seconds=None,
        stragglers=type(cfg.stragglers)(),
        churn=type(cfg.churn)(),
    )


def codec_allgathers(compression: CompressionConfig | str) -> bool:
    """Whether the codec's payloads are all-gathered (neither summable nor reducible), see ``comm/exchange.py``."""
    from locoswarm.compression import make_codec

    cfg = CompressionConfig(name=compression) if isinstance(compression, str) else compression
    codec = make_codec(cfg)
    return not (codec.summable or codec.reducible)


def steady_round(
    cfg: NetworkConfig, workers: int, compute_seconds: float, payload_bytes: float, allgather: bool = False
) -> RoundCost:
    """One round of ``workers`` identical workers that each compute ``compute_seconds`` then average."""
    model = NetworkModel(cfg, workers)
    plan = PhasePlan(round=0, ranks=list(range(workers)), counts=[1] * workers, slowdown=[1.0] * workers,
                     present=[True] * workers)  # fmt: skip
    return model.price_round(plan, [compute_seconds] * workers, payload_bytes, allgather=allgather)


def utilisation(
    cfg: NetworkConfig, workers: int, compute_seconds: float, payload_bytes: float, allgather: bool = False
) -> float:
    cost = steady_round(cfg, workers, compute_seconds, payload_bytes, allgather)
    return cost.busy_seconds / cost.seconds if cost.seconds > 0 else 0.0


def required_bandwidth(
    cfg: NetworkConfig,
    workers: int,
    compute_seconds: float,
    payload_bytes: float,
    target: float = 0.95,
    allgather: bool = False,
) -> float:
    """The uniform link bandwidth (Mbit/s) at which a round of ``compute_seconds`` compute and a
    ``payload_bytes`` averaging reaches ``target`` compute utilisation (inf: latency alone prevents it).

    Every topology's comm time on uniform links is A / b + B (bandwidth term + latency term), so two prices
    of the model itself give A and B, and the target fixes the comm time it may take: C (1/u - 1) in sequence,
    C / u with overlap (u < 1)."""
    if not 0 < target <= 1:
        raise ValueError(f"target={target} is invalid: a utilisation in (0, 1]")
    if workers <= 1 or payload_bytes <= 0:
        return 0.0
    t1 = steady_round(uniform_network(cfg, 1.0), workers, 0.0, payload_bytes, allgather).comm_seconds
    t2 = steady_round(uniform_network(cfg, 2.0), workers, 0.0, payload_bytes, allgather).comm_seconds
    a, b = 2 * (t1 - t2), 2 * t2 - t1  # comm(x Mbit/s) = a / x + b
    allowed = compute_seconds / target if cfg.overlap else compute_seconds * (1 / target - 1)
    if cfg.overlap and target == 1:
        allowed = compute_seconds
    return a / (allowed - b) if allowed > b else math.inf


def plan_table(
    params: float,
    step_seconds: float,
    workers: int,
    network: NetworkConfig,
    inner_steps: Sequence[int],
    codecs: Sequence[str],
    target: float,
) -> list[dict]:
    """Rows of (algorithm, codec, payload, bandwidth for target utilisation)."""
    rows = []
    for h in inner_steps:
        for name in codecs:
            comp = CompressionConfig(name=name.split(":")[0])
            if ":" in name:
                comp.ratio = float(name.split(":")[1])
            payload = codec_payload_bytes(comp, params)
            need = required_bandwidth(network, workers, h * step_seconds, payload, target, codec_allgathers(comp))
            rows.append({"algorithm": "ddp" if h == 1 else f"diloco H={h}", "codec": name, "payload_MB": payload / 1e6,
                         "compute_s": h * step_seconds, "mbps": need})  # fmt: skip
    return rows


def _fmt_mbps(x: float) -> str:
    if math.isinf(x):
        return "unreachable"
    return f"{x / 1e3:.3g} Gbit/s" if x >= 1e3 else f"{x:.3g} Mbit/s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m locoswarm.netsim", description="Price a model on a network.")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("plan", help="bandwidth that keeps compute utilisation at --target, per algorithm and codec")
    q.add_argument("--params", type=float, required=True, help="parameter count, e.g. 124e6")
    q.add_argument("--step-seconds", type=float, required=True, help="measured seconds per inner step")
    q.add_argument("--tokens-per-step", type=float, default=None, help="tokens per worker per step (for tok/s)")
    q.add_argument("--workers", type=int, default=8)
    q.add_argument("--topology", default="ring", choices=[t.value for t in Topology])
    q.add_argument("--latency-ms", type=float, default=0.0)
    q.add_argument("--overlap", action="store_true", help="communication overlaps compute")
    q.add_argument("--target", type=float, default=0.95)
    q.add_argument("--inner-steps", default="1,50,500", help="comma list; 1 = ddp")
    q.add_argument("--codecs", default="none,bf16,int8,int4,topk:0.01", help="comma list; topk:0.01 sets the ratio")
    args = p.parse_args(argv)
    net = NetworkConfig(name="plan", latency_ms=args.latency_ms, topology=Topology(args.topology),
                        overlap=args.overlap)  # fmt: skip
    hs = [int(h) for h in args.inner_steps.split(",")]
    rows = plan_table(args.params, args.step_seconds, args.workers, net, hs, args.codecs.split(","), args.target)
    print(f"# {args.params / 1e6:.1f}M params, {args.step_seconds * 1e3:.1f} ms/step, K={args.workers} "
          f"{args.topology}, latency {args.latency_ms} ms, overlap={args.overlap}: bandwidth per worker link for "
          f"{args.target:.0%} compute utilisation")  # fmt: skip
    if args.tokens_per_step:
        print(f"# compute-bound throughput: {args.workers * args.tokens_per_step / args.step_seconds:,.0f} tok/s")
    print(f"{'algorithm':<16}{'codec':<12}{'payload':>12}{'compute/round':>15}{'bandwidth':>18}")
    for r in rows:
        print(f"{r['algorithm']:<16}{r['codec']:<12}{r['payload_MB']:>9.1f} MB{r['compute_s']:>14.3g}s"
              f"{_fmt_mbps(r['mbps']):>18}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
