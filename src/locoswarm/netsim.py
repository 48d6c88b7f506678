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
- blockwise codecs (int8, int4, sign, blocktopk: ``Codec.reducible``) are averaged by a re-quantising
  reduce-scatter and all-gather of the payload (``comm/exchange.py``): priced as an all-reduce of P, like
  summable codecs.
- codecs whose payloads can be neither summed on the wire nor re-quantised per chunk (topk, powersgd)
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
utilisation at the target for ddp, diloco and streaming DiLoCo (P fragments, τ overlapped steps) at each H, for
each codec (see ``required_bandwidth``). Streaming DiLoCo is priced in steady state as ``locoswarm.timeline``
books it: one fragment (payload / P) is averaged every I = H·t / P seconds of compute, the exchanges share the
link one after another, and the workers block τ steps after an exchange started until it is done, so an
interval lasts W = max(I + max(0, c - τ·t), c) and utilisation is I / W (``interval_seconds``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from locoswarm.config import MODEL_PRESETS, CompressionConfig, NetworkConfig, Topology
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

    def __init__(self, cfg: NetworkConfig, workers: int, seed: int = 0, call_failure_prob: float = 0.0):
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
        self.faults = FaultSchedule(cfg, workers, seed, call_failure_prob)

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

    def push_pull_seconds(self, worker: int, push_bytes: float, pull_bytes: float) -> tuple[float, float]:
        """(push, pull): one worker sends ``push_bytes`` to whoever holds the global model and fetches
        ``pull_bytes`` back over its own link (asynchronous rounds; the holder's side is not the bottleneck)."""
        link = self.links[worker]
        scale = 8 * (1 + self.cfg.wire_overhead) / self.cfg.link_efficiency
        return push_bytes * scale / link.up_bps + link.latency_s, pull_bytes * scale / link.down_bps + link.latency_s

    def transfer_seconds(self, sender: int, receiver: int, nbytes: float) -> float:
        """One message from ``sender`` to ``receiver`` (a pipeline's activations) on idle links: its time on the
        wire plus the latency between them (``wire_seconds``)."""
        wire, latency = self.wire_seconds(sender, receiver, nbytes)
        return wire + latency

    def wire_seconds(self, sender: int, receiver: int, nbytes: float) -> tuple[float, float]:
        """(seconds the message occupies the sender's uplink and the receiver's downlink, at the slower of the
        two; the latency between them, which occupies neither)."""
        bits = nbytes * 8 * (1 + self.cfg.wire_overhead) / self.cfg.link_efficiency
        return bits / min(self.links[sender].up_bps, self.links[receiver].down_bps), self._latency(sender, receiver)

    def phase_cost(self, plan: PhasePlan, measured: Sequence[float]) -> tuple[float, float]:
        """(wall-clock, mean busy compute of the workers that took part) of an inner phase run in parallel."""
        busy = self.worker_compute_seconds(plan, measured)
        taking_part = sum(1 for c in plan.counts if c > 0)
        return max(busy, default=0.0), sum(busy) / taking_part if taking_part else 0.0

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


def _fragment_schedule(
    compute_seconds: float, payload_bytes: float, fragments: int, overlap_steps: int, inner_steps: int | None
) -> tuple[float, float, float]:
    """(I, fragment payload, τ·t): the compute between two fragment syncs, one fragment's payload, and the compute
    that overlaps one fragment's exchange, for a round of ``compute_seconds`` = H·t and a ``payload_bytes`` model."""
    if fragments < 1:
        raise ValueError(f"fragments={fragments} is invalid: need at least 1 fragment")
    if overlap_steps < 0:
        raise ValueError(f"overlap_steps={overlap_steps} is invalid: need tau >= 0")
    if overlap_steps and not inner_steps:
        raise ValueError(f"overlap_steps={overlap_steps} needs inner_steps (H) to know the seconds per step")
    if inner_steps is not None and inner_steps < 1:
        raise ValueError(f"inner_steps={inner_steps} is invalid: need H >= 1")
    slack = overlap_steps * compute_seconds / inner_steps if overlap_steps else 0.0
    return compute_seconds / fragments, payload_bytes / fragments, slack


def interval_seconds(compute: float, comm: float, slack: float = 0.0, overlap: bool = False) -> float:
    """Steady-state wall-clock between two fragment syncs: ``compute`` (I) of training, one exchange of ``comm``
    (c) seconds that the workers need ``slack`` (τ·t) seconds of compute after it started.

    The workers block for what is left of the exchange when they need it, and the exchanges share the link one
    after another, so W = max(I + max(0, c - τ·t), c) (the second term: the link itself cannot keep up). With
    ``overlap`` (``network.overlap``: the workers never block) W = max(I, c). τ = 0: W = I + c, DiLoCo's round."""
    if overlap:
        return max(compute, comm)
    return max(compute + max(0.0, comm - slack), comm)


def steady_round(
    cfg: NetworkConfig,
    workers: int,
    compute_seconds: float,
    payload_bytes: float,
    allgather: bool = False,
    *,
    fragments: int = 1,
    overlap_steps: int = 0,
    inner_steps: int | None = None,
) -> RoundCost:
    """One steady-state sync interval of ``workers`` identical workers.

    ``compute_seconds`` is the compute between two syncs of the *same* parameters (H·t) and ``payload_bytes`` the
    whole model's payload. With P = ``fragments`` the interval is H·t / P of compute and one fragment's averaging
    (payload / P); with τ = ``overlap_steps`` (needs ``inner_steps`` = H) the workers train τ steps while it is in
    flight (``interval_seconds``). P = 1, τ = 0: compute then average, DiLoCo's (or ddp's, H = 1) round.
    """
    interval, frag_payload, slack = _fragment_schedule(
        compute_seconds, payload_bytes, fragments, overlap_steps, inner_steps
    )
    # compute_seconds is the phase's length: network.step_seconds (which the model would charge per step) must not
    # replace it
    model = NetworkModel(dataclasses.replace(cfg, step_seconds=None), workers)
    plan = PhasePlan(round=0, ranks=list(range(workers)), counts=[1] * workers, slowdown=[1.0] * workers,
                     present=[True] * workers)  # fmt: skip
    cost = model.price_round(plan, [interval] * workers, frag_payload, allgather=allgather)
    cost.seconds = interval_seconds(cost.compute_seconds, cost.comm_seconds, slack, cfg.overlap)
    return cost


def utilisation(
    cfg: NetworkConfig,
    workers: int,
    compute_seconds: float,
    payload_bytes: float,
    allgather: bool = False,
    *,
    fragments: int = 1,
    overlap_steps: int = 0,
    inner_steps: int | None = None,
) -> float:
    """Steady-state compute utilisation: busy compute / wall-clock of one interval (see ``steady_round``)."""
    cost = steady_round(cfg, workers, compute_seconds, payload_bytes, allgather,
                        fragments=fragments, overlap_steps=overlap_steps, inner_steps=inner_steps)  # fmt: skip
    return cost.busy_seconds / cost.seconds if cost.seconds > 0 else 0.0


def required_bandwidth(
    cfg: NetworkConfig,
    workers: int,
    compute_seconds: float,
    payload_bytes: float,
    target: float = 0.95,
    allgather: bool = False,
    *,
    fragments: int = 1,
    overlap_steps: int = 0,
    inner_steps: int | None = None,
) -> float:
    """The uniform link bandwidth (Mbit/s) at which training reaches ``target`` compute utilisation (inf: latency
    alone prevents it), for ``compute_seconds`` = H·t of compute between two syncs of the same parameters and a
    whole-model payload of ``payload_bytes``; with P = ``fragments`` and τ = ``overlap_steps`` (Streaming DiLoCo,
    needs ``inner_steps`` = H for τ), priced as ``steady_round``.

    Every topology's comm time on uniform links is A / b + B (bandwidth term + latency term), so two prices of
    the model itself (for one fragment's payload) give A and B, and the target fixes the comm time c one fragment
    may take, from W = I / u (``interval_seconds``, I = H·t / P): c = τ·t + I (1/u - 1), at most I / u (the link
    must keep up); c = I / u with ``network.overlap``. P = 1, τ = 0: C (1/u - 1), DiLoCo's answer.

    So with τ = 0 and no latency P leaves the answer unchanged (c and I both shrink by P: the peak bandwidth
    drops, the need for a target utilisation does not), latency makes more fragments cost more (each pays it),
    and τ > 0 lowers it: the budget P τ t + C (1/u - 1) for a whole model's worth of exchanges grows with P τ."""
    if not 0 < target <= 1:
        raise ValueError(f"target={target} is invalid: a utilisation in (0, 1]")
    interval, frag_payload, slack = _fragment_schedule(
        compute_seconds, payload_bytes, fragments, overlap_steps, inner_steps
    )
    if workers <= 1 or payload_bytes <= 0:
        return 0.0
    t1 = steady_round(uniform_network(cfg, 1.0), workers, 0.0, frag_payload, allgather).comm_seconds
    t2 = steady_round(uniform_network(cfg, 2.0), workers, 0.0, frag_payload, allgather).comm_seconds
    a, b = 2 * (t1 - t2), 2 * t2 - t1  # comm(x Mbit/s) = a / x + b
    if cfg.overlap:
        allowed = interval / target
    else:
        allowed = min(slack + interval * (1 / target - 1), interval / target)
    return a / (allowed - b) if allowed > b else math.inf


GPT2_VOCAB = 50257  # the GPT-2 tokenizer's vocabulary, as benchmarks/bench_utilisation.py prices the presets


def preset_params(name: str, vocab_size: int = GPT2_VOCAB, seq_len: int = 1024) -> int:
    """Parameter count of a ``model=<name>`` preset (``locoswarm.model.PRESETS``), built on the meta device (no
    memory): tied embedding of ``vocab_size`` tokens, ``seq_len`` positions (1024: the GPU presets' context)."""
    import torch

    from locoswarm.model import GPT, PRESETS, GPTShape

    if name not in PRESETS:
        raise ValueError(f"model={name} is not a preset: allowed {', '.join(PRESETS)}")
    with torch.device("meta"):
        model = GPT(GPTShape(**PRESETS[name], seq_len=seq_len, vocab_size=vocab_size))
    return sum(p.numel() for p in model.parameters())


def schedule_label(inner_steps: int, fragments: int = 1, overlap_steps: int = 0) -> str:
    """'ddp', 'diloco H=100', 'streaming P=4 H=100', 'streaming P=4 H=100 τ=5'."""
    if inner_steps == 1:
        return "ddp"
    if fragments == 1 and overlap_steps == 0:
        return f"diloco H={inner_steps}"
    return f"streaming P={fragments} H={inner_steps}" + (f" τ={overlap_steps}" if overlap_steps else "")


def plan_table(
    params: float,
    step_seconds: float,
    workers: int,
    network: NetworkConfig,
    inner_steps: Sequence[int],
    codecs: Sequence[str],
    target: float,
    fragments: Sequence[int] = (1,),
    overlap_steps: Sequence[int] = (0,),
) -> list[dict]:
    """Rows of (algorithm, codec, payload, bandwidth for target utilisation), for every H, P, τ and codec.

    H = 1 is ddp (one row, whatever P and τ); combinations the streaming strategy rejects (τ >= H) are left out."""
    rows = []
    for h in inner_steps:
        schedules = [(1, 0)] if h == 1 else [(p, tau) for p in fragments for tau in overlap_steps if tau < h]
        for p, tau in schedules:
            for name in codecs:
                comp = CompressionConfig(name=name.split(":")[0])
                if ":" in name:
                    comp.ratio = float(name.split(":")[1])
                payload = codec_payload_bytes(comp, params)
                need = required_bandwidth(network, workers, h * step_seconds, payload, target,
                                          codec_allgathers(comp), fragments=p, overlap_steps=tau, inner_steps=h)  # fmt: skip
                rows.append({"algorithm": schedule_label(h, p, tau), "codec": name, "payload_MB": payload / 1e6,
                             "fragment_MB": payload / p / 1e6, "compute_s": h * step_seconds,
                             "interval_s": h * step_seconds / p, "inner_steps": h, "fragments": p,
                             "overlap_steps": tau, "mbps": need})  # fmt: skip
    return rows


def _fmt_mbps(x: float) -> str:
    if math.isinf(x):
        return "unreachable"
    return f"{x / 1e3:.3g} Gbit/s" if x >= 1e3 else f"{x:.3g} Mbit/s"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m locoswarm.netsim", description="Price a model on a network.")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("plan", help="bandwidth that keeps compute utilisation at --target, per algorithm and codec")
    size = q.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=float, help="parameter count, e.g. 124e6")
    size.add_argument("--model", choices=[m for m in MODEL_PRESETS if m != "custom"],
                      help="take the parameter count from a model preset (see --vocab-size, --seq-len)")  # fmt: skip
    q.add_argument("--vocab-size", type=int, default=GPT2_VOCAB, help="with --model: vocabulary (GPT-2's by default)")
    q.add_argument("--seq-len", type=int, default=1024, help="with --model: context length (position embedding)")
    q.add_argument("--step-seconds", type=float, required=True, help="measured seconds per inner step")
    q.add_argument("--tokens-per-step", type=float, default=None, help="tokens per worker per step (for tok/s)")
    q.add_argument("--workers", type=int, default=8)
    q.add_argument("--topology", default="ring", choices=[t.value for t in Topology])
    q.add_argument("--latency-ms", type=float, default=0.0)
    q.add_argument("--overlap", action="store_true", help="network.overlap: communication never blocks compute")
    q.add_argument("--target", type=float, default=0.95)
    q.add_argument("--inner-steps", default="1,50,500", help="comma list of H; 1 = ddp")
    q.add_argument("--fragments", default="1", help="comma list of P (streaming DiLoCo fragments); 1 = diloco")
    q.add_argument("--overlap-steps", default="0", help="comma list of tau, inner steps that overlap a fragment's "
                   "exchange (streaming DiLoCo); combinations with tau >= H are left out")  # fmt: skip
    q.add_argument("--codecs", default="none,bf16,int8,int4,topk:0.01", help="comma list; topk:0.01 sets the ratio")
    args = p.parse_args(argv)
    fragments, taus = _ints(args.fragments), _ints(args.overlap_steps)
    if any(f < 1 for f in fragments) or any(t < 0 for t in taus):
        p.error(f"--fragments {args.fragments} / --overlap-steps {args.overlap_steps}: need P >= 1 and tau >= 0")
    if args.model:
        from locoswarm.model import PRESETS

        n_layer = PRESETS[args.model]["n_layer"]
        if max(fragments) > n_layer:
            p.error(f"--fragments {args.fragments}: model {args.model} has {n_layer} blocks, P <= {n_layer}")
        params = float(preset_params(args.model, args.vocab_size, args.seq_len))
        what = f"model {args.model}: {params / 1e6:.1f}M params (vocab {args.vocab_size}, seq_len {args.seq_len})"
    else:
        params = args.params
        what = f"{params / 1e6:.1f}M params"
    net = NetworkConfig(name="plan", latency_ms=args.latency_ms, topology=Topology(args.topology),
                        overlap=args.overlap)  # fmt: skip
    rows = plan_table(params, args.step_seconds, args.workers, net, _ints(args.inner_steps), args.codecs.split(","),
                      args.target, fragments, taus)  # fmt: skip
    print(f"# {what}, {args.step_seconds * 1e3:.1f} ms/step, K={args.workers} {args.topology}, latency "
          f"{args.latency_ms} ms, overlap={args.overlap}: bandwidth per worker link for {args.target:.0%} compute "
          f"utilisation")  # fmt: skip
    print("# a fragment (1/P of the payload) is averaged every H/P steps; tau: steps trained while it is in flight")
    if args.tokens_per_step:
        print(f"# compute-bound throughput: {args.workers * args.tokens_per_step / args.step_seconds:,.0f} tok/s")
    width = max([len("algorithm")] + [len(r["algorithm"]) for r in rows]) + 2
    print(f"{'algorithm':<{width}}{'codec':<12}{'payload':>12}{'per sync':>12}{'sync every':>12}{'bandwidth':>16}")
    for r in rows:
        print(f"{r['algorithm']:<{width}}{r['codec']:<12}{r['payload_MB']:>9.1f} MB{r['fragment_MB']:>9.1f} MB"
              f"{r['interval_s']:>11.3g}s{_fmt_mbps(r['mbps']):>16}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
