"""``locoswarm-netem``: an emulated WAN on one Linux box with a real hivemind swarm inside it (root only).

  locoswarm-netem --peers N --out DIR [overrides...]             build the testbed, run N peers, tear down
  locoswarm-netem --peers N --out DIR --validate [overrides...]  ... then run the same config on sim and compare
                                                                  (round time, bytes, the training loop's wall time)
  locoswarm-netem cleanup                                        remove namespaces a SIGKILLed run left behind

Overrides are locoswarm-train's (``backend=hivemind`` and ``workers=N`` are implied). The links come from the
same network config the ``sim`` backend prices (``network=<preset>``, per-worker lists included), so one config
is both simulated and emulated.

The testbed (all names carry a unique run prefix ``lsn<6 hex>``, and everything is deleted by name):
    <prefix>-h        hub namespace holding bridge br0
    <prefix>-p<i>     peer i's namespace: eth0 = 10.213.0.<i+1>/24, a veth whose other end (v<i>) is in br0
Nothing is created in the host's namespace and no namespace has a default route, so the run's traffic can only
reach the run's other namespaces. Shaping is ``tc tbf`` on egress: peer i's uplink on its eth0, its downlink
on v<i> in the hub. GSO is capped at one MTU so tbf and the byte counters see real frames.

Latency is NOT emulated: this kernel has no netem qdisc, and hivemind's sockets give no hook for an
application-level delay. A config with latency_ms > 0 runs with the testbed's own (~0.05 ms) latency, and
``--validate`` prices the sim side with latency 0 to match.

Measured: on-wire bytes from each peer's eth0 counters (Ethernet frames: headers, ACKs and DHT traffic
included, hence network.wire_overhead in the matching model), and round times from the moment each sync row
appears in a peer's metrics.jsonl (the first round, which includes start-up and matchmaking, and the last,
which includes the final evaluation, are left out). With overlap (algorithm.outer_delay, streaming_diloco's
overlap_steps) a round is no fixed unit, so the training loop is timed whole: from each peer's first sync row
(a barrier: its all-reduce waits for every peer, so start-up is behind all of them) to its last
(``loop_span``). The peers also report the compute time per inner step they measured (under the box's real
load), and ``--validate`` prices the sim's compute at those times, so the model is judged on how it combines
compute and exchanges, not on guessing this box's CPU speed. Results go to DIR/netem.json.

Teardown runs on every exit path (normal end, exception, SIGINT/SIGTERM/SIGHUP): peers get SIGINT, then their
process groups SIGKILL after a grace period, then every process still inside a run namespace is killed by pid
and the namespaces are deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SUBNET = "10.213.0"  # a /24 that exists only inside the run's namespaces
NAME_RE = re.compile(r"^lsn[0-9a-f]{6}-(h|p\d+)$")
MADDR_FILE = "dht_maddrs.txt"  # written by each `locoswarm-swarm peer` into its run dir
GRACE = 30.0  # seconds peers get to leave after SIGINT
MTU_FRAME = 1514


class NetemError(RuntimeError):
    """A testbed problem with a message for the user."""


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetemError(f"`{' '.join(cmd)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def preflight() -> None:
    """Clear errors for the two things a testbed needs: root and iproute2."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise NetemError(
            f"{' and '.join(missing)} not found: locoswarm-netem needs iproute2 (apt-get install -y iproute2)"
        )
    if os.geteuid() != 0:
        raise NetemError("locoswarm-netem needs root (network namespaces and tc); run it with sudo")


def list_run_namespaces() -> list[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    names = [n["name"] for n in json.loads(out)] if out else []
    return [n for n in names if NAME_RE.match(n)]


def kill_namespace_processes(ns: str, wait: float = 10.0) -> None:
    """Kill every process still inside a namespace this tool created (by pid), and wait until none is left."""
    end = time.monotonic() + wait
    while pids := [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > end:
            break
        time.sleep(0.1)


def delete_namespace(ns: str) -> None:
    kill_namespace_processes(ns)
    _run(["ip", "netns", "del", ns], check=False)


class Testbed:
    """One hub namespace with a bridge, one namespace per peer, tbf-shaped veths in between."""

    def __init__(self, links: list, prefix: str | None = None):
        self.links = links  # per peer: netsim.Link (up_bps, down_bps, latency_s)
        self.prefix = prefix or f"lsn{secrets.token_hex(3)}"
        self.created: list[str] = []

    @property
    def hub(self) -> str:
        return f"{self.prefix}-h"

    def ns(self, i: int) -> str:
        return f"{self.prefix}-p{i}"

    @staticmethod
    def ip_of(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def _netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    @staticmethod
    def _shape(ns: str, dev: str, bps: float) -> None:
        rate_bytes = bps / 8
        # A 50 ms bucket: on a loaded (virtual) machine tbf's watchdog timer fires late, and tokens that overflow a
        # small bucket are lost rate. Over a transfer of seconds the excess it allows is <1%.
        burst = int(max(4 * MTU_FRAME, rate_bytes / 20))
        limit = int(max(64 * 1024, rate_bytes / 10))  # ~100 ms of queue
        _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(bps)}bit",
              "burst", str(burst), "limit", str(limit)])  # fmt: skip

    def up(self) -> None:
        self._netns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i, link in enumerate(self.links):
            ns, hub_end = self.ns(i), f"v{i}"
            self._netns(ns)
            # created directly inside the two namespaces: never visible in the host's
            _run(["ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", hub_end,
                  "netns", self.hub])  # fmt: skip
            for n, dev in ((ns, "eth0"), (self.hub, hub_end)):
                _run(["ip", "-n", n, "link", "set", "dev", dev, "gso_max_size", "1500"])
            _run(["ip", "-n", self.hub, "link", "set", hub_end, "master", "br0"])
            _run(["ip", "-n", self.hub, "link", "set", hub_end, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.ip_of(i)}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._shape(ns, "eth0", link.up_bps)  # peer -> anyone: its uplink
            self._shape(self.hub, hub_end, link.down_bps)  # anyone -> peer: its downlink

    def peer_counters(self, i: int) -> dict[str, int]:
        """On-wire bytes peer i has sent (tx) and received (rx) on its eth0 (Ethernet frames)."""
        info = json.loads(_run(["ip", "-j", "-s", "-n", self.ns(i), "link", "show", "dev", "eth0"]).stdout)[0]
        stats = info["stats64"]
        return {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}

    def counters(self) -> list[dict[str, int]]:
        return [self.peer_counters(i) for i in range(len(self.links))]

    def down(self) -> None:
        for ns in reversed(self.created):
            delete_namespace(ns)
        self.created.clear()


# ---------------------------------------------------------------------------------------------- the swarm
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from locoswarm.cli.train import CONF_DIR, to_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def with_defaults(overrides: list[str], peers: int) -> list[str]:
    from locoswarm.cli.swarm import pipeline_stages

    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    stages = pipeline_stages(overrides)
    if peers % stages:
        raise NetemError(f"--peers {peers} must be a multiple of pipeline.stages={stages} (the same peers per stage)")
    extra = ["backend=hivemind"] if "backend" not in keys else []
    extra += [f"workers={peers // stages}"] if "workers" not in keys else []  # a pipeline's: peers per stage
    extra += ["train.progress=false"] if "train.progress" not in keys else []
    # Matchmaking RPCs share the shaped links with bulk all-reduce traffic (and a loaded box's CPUs): hivemind's
    # request timeout is half this window, capped at 3 s; the default 1 s loses groups on slow links.
    extra += ["backend.min_matchmaking_time=6"] if "backend.min_matchmaking_time" not in keys else []
    # Peers start seconds apart on one (loaded) box; a fixed 30 s window lets the first round gather all of them
    # instead of splitting into sub-swarms that never meet again. A full group starts at once, so steady-state
    # rounds do not wait for it.
    extra += ["backend.matchmaking_time=30"] if "backend.matchmaking_time" not in keys else []
    return extra + overrides


class Interrupted(Exception):
    pass


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds while a run lasts."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.samples.append(os.getloadavg()[0])


def run_measured(argv: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """``locoswarm-netem ARGV`` as a subprocess, as a study or benchmark runs it (one at a time: runs share the box's
    CPUs): (the finished process, its wall seconds, the box's mean 1-minute load average while it ran)."""
    sampler = LoadSampler()
    sampler.start()
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "locoswarm.cli.netem", *argv], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True)  # fmt: skip
    sampler.done.set()
    return p, time.monotonic() - t0, statistics.mean(sampler.samples) if sampler.samples else os.getloadavg()[0]


class SwarmRun:
    """Peers in their namespaces; watches their metrics.jsonl to timestamp every sync row."""

    def __init__(self, bed: Testbed, out: Path, overrides: list[str], per_stage: int | None = None):
        """per_stage: a pipeline's peers per stage (None: no pipeline)."""
        self.bed, self.out, self.overrides, self.per_stage = bed, out, overrides, per_stage
        self.procs: list[subprocess.Popen] = []
        self.sync_times: list[list[float]] = [[] for _ in bed.links]
        self.sync_tx: list[list[int]] = [[] for _ in bed.links]  # eth0 tx bytes when each sync row appeared
        self.sync_steps: list[list[int]] = [[] for _ in bed.links]  # the inner step of each sync row
        self._offsets = [0] * len(bed.links)
        self.stop = False

    def peer_dir(self, i: int) -> Path:
        return self.out / f"peer-{i}"

    def spawn(self, i: int, initial: list[str]) -> None:
        cmd = ["ip", "netns", "exec", self.bed.ns(i), sys.executable, "-m", "locoswarm.cli.swarm", "peer",
               "--index", str(i), "--out", str(self.peer_dir(i))]  # fmt: skip
        if self.per_stage:  # a pipeline (as locoswarm-swarm lays it out): peer i serves stage i // K as its peer i % K
            cmd += ["--rank", str(i % self.per_stage), "--stage", str(i // self.per_stage),
                    "--expect", str(self.per_stage)]  # fmt: skip
        else:
            cmd += ["--rank", str(i)]
        for m in initial:
            cmd += ["--initial-peer", m]
        cmd += ["--", *self.overrides, f"backend.host_maddrs=[/ip4/{self.bed.ip_of(i)}/tcp/0]"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.peer_dir(i).mkdir(parents=True, exist_ok=True)
        log = open(self.peer_dir(i) / "peer.log", "w")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env))

    def _poll_metrics(self) -> None:
        now = time.monotonic()
        for i in range(len(self.procs)):
            path = self.peer_dir(i) / "metrics.jsonl"
            if not path.exists():
                continue
            with open(path) as f:
                f.seek(self._offsets[i])
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            self._offsets[i] += len(complete.encode())
            for line in complete.splitlines():
                row = json.loads(line) if line else {}
                if "group_size" in row:
                    self.sync_times[i].append(now)
                    self.sync_tx[i].append(self.bed.peer_counters(i)["tx"])
                    self.sync_steps[i].append(int(row["step"]))

    def run(self, limit: float) -> list[int]:
        self.spawn(0, [])
        path, end = self.peer_dir(0) / MADDR_FILE, time.monotonic() + min(limit, 300.0)
        while not path.exists():
            if self.procs[0].poll() is not None or time.monotonic() > end or self.stop:
                raise NetemError(f"peer 0 did not start its DHT; see {self.peer_dir(0) / 'peer.log'}")
            time.sleep(0.1)
        maddrs = [m for m in path.read_text().split() if m]
        for i in range(1, len(self.bed.links)):
            self.spawn(i, maddrs)
        end = time.monotonic() + limit
        while any(p.poll() is None for p in self.procs):
            if self.stop:
                raise Interrupted()
            if time.monotonic() > end:
                raise NetemError(f"the swarm did not finish within {limit:.0f}s (--timeout); see {self.out}/peer-*")
            self._poll_metrics()
            time.sleep(0.05)
        self._poll_metrics()
        return [p.returncode for p in self.procs]

    def terminate(self) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGINT)  # the peer leaves cleanly and writes its summary
        end = time.monotonic() + GRACE
        while any(p.poll() is None for p in alive) and time.monotonic() < end:
            time.sleep(0.2)
        for p in self.procs:  # whatever a peer started (DHT, averager, p2pd) lives in its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


def round_intervals(marks: list[float]) -> list[float]:
    """Differences between consecutive sync rows (times or byte counts), i.e. one per round from the second,
    without the last round (it includes the final evaluation); the first round includes start-up."""
    return [b - a for a, b in zip(marks[:-2], marks[1:-1], strict=True)] if len(marks) >= 3 else []


def loop_span(marks: list[float]) -> float | None:
    """The training loop's wall time as a peer lived it: from its first sync row to its last.

    The first sync row is the first moment all peers provably share a clock: its round's all-reduce is a
    barrier, so start-up (imports, DHT, peers launched one after another, the first matchmaking window) is
    behind every peer. With ``algorithm.warmup_sync_steps=1`` that row is step 1 for every algorithm, so runs
    of different algorithms are measured over the same steps (equal tokens). The last sync row is written after
    the final merge (everything in flight is awaited at the end) and the final evaluation (keep it small:
    ``train.eval_batches``). Whole-run time, not per round: with overlap a "round" is no fixed unit any more."""
    return marks[-1] - marks[0] if len(marks) >= 2 else None


def pipeline_tokens_per_second(peers: list[dict], per_stage: int, tokens_per_step: int) -> float | None:
    """A pipeline's training throughput: the tokens its K drivers (stage 0: peers 0 .. K-1) push through every
    stage per second, each from its first sync row to its second-to-last (the last includes the final, pipelined
    evaluation), summed over drivers. None if a driver logged fewer than 3 sync rows."""
    rates = []
    for p in peers[:per_stage]:
        steps, times = p["sync_row_steps"], p["sync_row_times"]
        if len(steps) < 3 or times[-2] <= times[0]:
            return None
        rates.append((steps[-2] - steps[0]) * tokens_per_step / (times[-2] - times[0]))
    return sum(rates)


def measured_step_seconds(summary: dict) -> float | None:
    """A peer's mean compute seconds per inner step, as it measured them in the swarm (under the testbed's real
    CPU load: every peer, its averager and DHT processes, whatever else runs on the box). On a real backend the
    summary's ``sim_seconds`` is the wall clock and ``compute_utilisation`` = compute / wall, so compute =
    utilisation x sim_seconds."""
    if not summary.get("steps") or summary.get("compute_utilisation") is None:
        return None
    return summary["compute_utilisation"] * summary["sim_seconds"] / summary["steps"]


def overlapped(cfg) -> bool:
    """Whether the algorithm trains while its exchanges are in flight (then a round is no fixed unit)."""
    return cfg.algorithm.outer_delay > 0 or cfg.algorithm.overlap_steps > 0


def run_testbed(args, overrides: list[str]) -> dict:
    from locoswarm.netsim import NetworkModel

    cfg = compose(overrides)
    stages = cfg.pipeline.stages
    model = NetworkModel(cfg.network, cfg.workers * stages)  # a pipeline's peers: S x K, one link each
    if any(lk.latency_s > 0 for lk in model.links):
        print("locoswarm-netem: note: latency is not emulated (no netem qdisc in this kernel); links get bandwidth "
              "shaping only", file=sys.stderr)  # fmt: skip
    bed = Testbed(model.links)
    swarm = SwarmRun(bed, args.out, overrides, cfg.workers if stages > 1 else None)
    error = None

    def on_signal(signum, _frame):
        swarm.stop = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        bed.up()
        before = bed.counters()
        t0 = time.monotonic()
        try:
            swarm.run(args.timeout)
        except NetemError as e:  # a swarm that overran --timeout: what its peers wrote is still reported
            error = str(e)
        wall = time.monotonic() - t0
        after = bed.counters()
    finally:
        swarm.terminate()
        bed.down()
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [p.returncode for p in swarm.procs]  # a peer stopped by terminate() has its signal's code
    peers = []
    for i, code in enumerate(codes):
        summary_path = swarm.peer_dir(i) / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        peers.append({
            "returncode": code, "status": summary.get("status"), "rounds": summary.get("rounds"),
            "bytes_sent_total": summary.get("bytes_sent_total"),
            "tx_bytes": after[i]["tx"] - before[i]["tx"], "rx_bytes": after[i]["rx"] - before[i]["rx"],
            "sync_row_times": [t - t0 for t in swarm.sync_times[i]],
            "sync_row_steps": swarm.sync_steps[i],
            "round_seconds": round_intervals(swarm.sync_times[i]),
            "round_tx_bytes": round_intervals(swarm.sync_tx[i]),
            "loop_seconds": loop_span(swarm.sync_times[i]),
            "step_seconds": measured_step_seconds(summary),
            "uplink_mbps": model.links[i].up_bps / 1e6, "downlink_mbps": model.links[i].down_bps / 1e6,
        })  # fmt: skip
    # Per round, the mean over peers: hivemind's butterfly need not split the work evenly (one peer may send
    # 2/3 of what the others do, round after round), but what the peers send together is fixed, and the model
    # prices the mean peer.
    round_tx = [statistics.mean(xs) for xs in zip(*(p["round_tx_bytes"] for p in peers), strict=False)]
    # A round whose averages disagreed (hivemind lost a part) was re-run by the whole group: its interval holds two
    # all-reduces, which the model does not price. The per-round figures leave out as many of the intervals that
    # sent most; ``compare`` adds the re-runs' exchanges to the predicted loop time.
    # Only a re-run after the first sync row lies inside the measured loop (``loop_span``): round 1's sync row *is*
    # that first row, so a round-1 re-run is start-up (CI once added one to the prediction and failed at +28%).
    reruns = max(count_reruns(swarm.peer_dir(i) / "peer.log", after_round=1) for i in range(len(codes))) if codes else 0
    rerun_rounds = set(sorted(range(len(round_tx)), key=lambda k: round_tx[k], reverse=True)[:reruns])
    round_tx = [x for k, x in enumerate(round_tx) if k not in rerun_rounds]
    intervals = [x for p in peers for k, x in enumerate(p["round_seconds"]) if k not in rerun_rounds]
    loops = [p["loop_seconds"] for p in peers if p["loop_seconds"] is not None]
    steps = [p["step_seconds"] for p in peers if p["step_seconds"] is not None]
    return {
        "prefix": bed.prefix,
        "overrides": overrides,
        "wall_seconds": wall,
        "peers": peers,
        # the mean, not the median: a testbed round takes 14-19 s by how the butterfly happens to split the work
        # (one run: 14.8, 18.8, 14.8 s), and a median of three rounds is one of them, not the typical round
        "round_seconds": statistics.mean(intervals) if intervals else None,
        "round_tx_bytes": statistics.median(round_tx) if round_tx else None,
        "loop_seconds": statistics.median(loops) if loops else None,
        "step_seconds": statistics.mean(steps) if steps else None,
        "tx_bytes_per_peer": statistics.mean(p["tx_bytes"] for p in peers),
        "latency_emulated": False,
        "reruns": reruns,
        "error": error,
        "stages": stages,
        "tokens_per_second": pipeline_tokens_per_second(peers, cfg.workers, cfg.train.batch_size * cfg.model.seq_len)
        if stages > 1 else None,
    }  # fmt: skip


RERUN_LINE = re.compile(r"round (\d+): the group's averages disagree")  # comm/hivemind.py's warning on a re-run


def count_reruns(log_path: Path, after_round: int = 0) -> int:
    """Rounds numbered above ``after_round`` that a peer re-ran after its group's averages disagreed (from its log;
    0 if there is none)."""
    if not log_path.exists():
        return 0
    with open(log_path, errors="replace") as f:
        return sum(int(m.group(1)) > after_round for line in f if (m := RERUN_LINE.search(line)))


def step_time_overrides(step_seconds: list[float]) -> list[str]:
    """Price worker i's compute at ``step_seconds[i]`` per inner step: network.step_seconds = their mean and
    network.compute_speed = mean / t_i (the sim's compute of worker i is steps x step_seconds / speed_i)."""
    mean = statistics.mean(step_seconds)
    speeds = ",".join(f"{mean / t:.6g}" for t in step_seconds)
    return [f"network.step_seconds={mean:.6g}", f"network.compute_speed=[{speeds}]"]


def predict_on_sim(overrides: list[str], out: Path, rounds_measured: int, step_seconds: list[float] | None = None
                   ) -> dict:  # fmt: skip
    """The same config on backend=sim, priced by its NetworkModel (latency 0: the testbed emulates none).

    ``step_seconds``: each worker's seconds per inner step, for the modelled compute (the peers' own measured
    ones, see ``measured_step_seconds``, or a calibration's); None: the sim's own measured compute (its K
    workers run one after another in this process, unloaded: not what the peers saw)."""
    from locoswarm.trainer import train

    keys = {o.split("=", 1)[0] for o in overrides}
    sim_overrides = [o for o in overrides if not o.startswith("backend")] + [
        "backend=sim",
        "backend.execution=sequential",
    ]
    sim_overrides += ["network.latency_ms=0", "network.worker_latency_ms=[]"]
    if step_seconds:
        sim_overrides += step_time_overrides(step_seconds)
    if "device" not in keys:
        sim_overrides.append("device=cpu")
    cfg = compose(sim_overrides)
    summary = train(cfg, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    sync = [r for r in rows if "group_size" in r]
    per_round = [b["sim_seconds"] - a["sim_seconds"] for a, b in zip(sync, sync[1:], strict=False)]
    # the rounds the testbed measured: 2 .. N-1 (1-based)
    used = per_round[: max(1, rounds_measured)] if per_round else [summary["sim_seconds"]]
    round_bytes = [r["bytes_sent"] for r in sync[1 : 1 + max(1, rounds_measured)]]
    exchanges = [r["comm_seconds"] for r in sync[1:] if r.get("comm_seconds")]
    # loop_span's interval: the first sync row to the end (the last row; the summary adds whatever is still in
    # flight then, which every strategy has already awaited)
    loop = summary["sim_seconds"] - sync[0]["sim_seconds"] if len(sync) >= 2 else None
    return {
        "round_seconds": statistics.median(used),
        "round_wire_bytes": statistics.median(round_bytes) * (1 + cfg.network.wire_overhead),
        "loop_seconds": loop,
        "exchange_seconds": statistics.median(exchanges) if exchanges else 0.0,  # one all-reduce, modelled
        "sync_row_steps": [int(r["step"]) for r in sync],
        "step_seconds": list(step_seconds) if step_seconds else None,
        "bytes_sent_per_peer": summary["bytes_sent_total"],
        "wire_bytes_per_peer": summary["bytes_sent_total"] * (1 + cfg.network.wire_overhead),
        "wire_overhead": cfg.network.wire_overhead,
        "sim_seconds": summary["sim_seconds"],
        "compute_utilisation": summary["compute_utilisation"],
        "overlapped": overlapped(cfg),
        "status": summary["status"],
    }


ROUND_TOLERANCE = 0.20  # round time, where a round is a fixed unit (no overlap)
BYTES_TOLERANCE = 0.10  # on-wire bytes per round
# Overlapped streaming runs: -9.3% and -9.5% measured without re-runs. Every round also carries control traffic
# the model does not price (matchmaking, DHT records, the agreement sketch; ~0.25-0.5 MB here), small against a
# 16 MB all-reduce (-3%) but a tenth of a 2.6 MB fragment's. A guard until the model prices a per-round constant.
BYTES_TOLERANCE_OVERLAPPED = 0.15
# Whole-loop wall time (first to last sync row). Measured with experiment=netem_overlap (2 CPUs shared with other
# jobs, load 1-8): diloco -5%, outer_delay=1 -7%; streaming (P=2: 10 fragment rounds) -17%, -22% and, on a quiet
# box (faster compute, so the link-bound fragment rounds set the pace), -27%. The model has no per-round
# constant and hivemind pays one (matchmaking plus the agreement check, 0.5-1 s here): small against a 7 s
# all-reduce, a quarter of a 3 s fragment's. So the model is optimistic, the more so the more and smaller the
# rounds. CI (2 cores, the suite's other tests finishing around it) measured -37% for the streaming run, its fragment
# rounds 35% longer than priced. A blocking run is held to the round time's 20%; an overlapped one to 45%, a guard
# against regressions, not a claim of accuracy: the fix is a per-round constant in the model (not there yet).
LOOP_TOLERANCE = 0.20
LOOP_TOLERANCE_OVERLAPPED = 0.45


def compare(measured: dict, predicted: dict) -> dict:
    """Relative errors of the prediction, per round (time: the mean over peers and rounds; bytes: the median) and
    over the whole run.

    The verdict: bytes per round within 10% and the loop's wall time within LOOP_TOLERANCE (overlapped runs:
    LOOP_TOLERANCE_OVERLAPPED, see there) always; the round time within 20% only where a round is a fixed unit.
    With overlap (outer_delay, overlap_steps) the time between two sync rows depends on where the previous
    exchange ended, so only the whole loop is judged."""
    nan = float("nan")

    def err(p, m):
        return p / m - 1 if p is not None and m else nan

    rt = err(predicted["round_seconds"], measured["round_seconds"])
    by = err(predicted["round_wire_bytes"], measured["round_tx_bytes"])
    # hivemind's re-runs (see run_testbed) are real time the model does not price: predicted with them added
    reruns = measured.get("reruns", 0)
    loop_predicted = predicted.get("loop_seconds")
    if loop_predicted is not None:
        loop_predicted += reruns * predicted.get("exchange_seconds", 0.0)
    loop = err(loop_predicted, measured.get("loop_seconds"))
    total = predicted["wire_bytes_per_peer"] / measured["tx_bytes_per_peer"] - 1
    steps = measured["peers"][0].get("sync_row_steps") if measured.get("peers") else None
    same_rows = steps == predicted.get("sync_row_steps")
    round_ok = predicted.get("overlapped") or abs(rt) <= ROUND_TOLERANCE
    loop_limit = LOOP_TOLERANCE_OVERLAPPED if predicted.get("overlapped") else LOOP_TOLERANCE
    bytes_limit = BYTES_TOLERANCE_OVERLAPPED if predicted.get("overlapped") else BYTES_TOLERANCE
    # NaN compares False: an unmeasured run fails
    ok = round_ok and abs(by) <= bytes_limit and abs(loop) <= loop_limit and same_rows
    return {"round_time_error": rt, "bytes_error": by, "loop_time_error": loop, "run_bytes_error": total,
            "same_sync_rows": same_rows, "round_time_judged": not predicted.get("overlapped"),
            "loop_time_limit": loop_limit, "bytes_limit": bytes_limit, "reruns": reruns, "loop_predicted_with_reruns": loop_predicted,
            "ok": ok}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cleanup":
        try:
            preflight()
        except NetemError as e:
            print(f"locoswarm-netem: error: {e}", file=sys.stderr)
            return 2
        names = list_run_namespaces()
        for ns in names:
            delete_namespace(ns)
        print(f"locoswarm-netem: removed {len(names)} namespace(s): {' '.join(names) or '-'}")
        return 0
    p = argparse.ArgumentParser(prog="locoswarm-netem", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--peers", type=int, required=True, help="hivemind peers, one namespace each")
    p.add_argument("--out", type=Path, required=True, help="peer i writes DIR/peer-<i>/; results in DIR/netem.json")
    p.add_argument("--validate", action="store_true", help="also run the config on sim and compare (20%% / 10%%)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the swarm may run")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="with --validate: price compute at this many seconds per inner step (e.g. a calibration "
                   "run's) instead of each peer's own measured step time")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="locoswarm-train overrides, e.g. network=home algorithm.inner_steps=50")
    args = p.parse_args(argv)
    if args.peers < 2:
        p.error("--peers must be >= 2")
    try:
        preflight()
        overrides = with_defaults(args.overrides, args.peers)
        if args.validate and compose(overrides).pipeline.stages > 1:
            raise NetemError("--validate compares all-reduce rounds with the sim's model; a pipeline's calls between "
                             "stages are not validated yet: run it without --validate")  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        result = run_testbed(args, overrides)
    except Interrupted:
        print("locoswarm-netem: interrupted; testbed torn down", file=sys.stderr)
        return 130
    except (NetemError, ValueError) as e:
        print(f"locoswarm-netem: error: {e}", file=sys.stderr)
        return 2
    if result["error"]:
        (args.out / "netem.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"locoswarm-netem: error: {result['error']}; what the peers did is in {args.out}/netem.json",
              file=sys.stderr)  # fmt: skip
        return 2
    bad = [i for i, q in enumerate(result["peers"]) if q["returncode"] != 0 or q["status"] != "ok"]
    code = 1 if bad else 0
    if bad:
        print(f"locoswarm-netem: peers {bad} did not finish ok; see {args.out}/peer-*/peer.log", file=sys.stderr)
    print(f"locoswarm-netem: {args.peers} peers, wall {result['wall_seconds']:.1f}s, round "
          f"{result['round_seconds'] or float('nan'):.2f}s (mean), {result['tx_bytes_per_peer'] / 1e6:.2f} MB "
          "sent per peer on the wire")  # fmt: skip
    if result["tokens_per_second"] is not None:
        print(f"  pipeline: {result['stages']} stages x {args.peers // result['stages']} peers, "
              f"{result['tokens_per_second']:.1f} tokens/s through every stage")  # fmt: skip
    if args.validate and not bad:
        rounds = len(result["peers"][0]["round_seconds"])
        steps = [args.step_seconds] * args.peers if args.step_seconds else [q["step_seconds"] for q in result["peers"]]
        if None in steps:
            print("locoswarm-netem: error: a peer's summary has no compute time to price the sim's compute with",
                  file=sys.stderr)  # fmt: skip
            return 2
        result["predicted"] = predict_on_sim(overrides, args.out / "sim", rounds, steps)
        result["comparison"] = compare(result, result["predicted"])
        c, pr = result["comparison"], result["predicted"]
        source = "given (--step-seconds)" if args.step_seconds else "measured by the peers"
        print(f"  compute: {statistics.mean(steps) * 1e3:.1f} ms per inner step ({source})")
        print(f"  round time: predicted {pr['round_seconds']:.2f}s measured {result['round_seconds']:.2f}s "
              f"({c['round_time_error']:+.1%}, " + ("limit 20%)" if c["round_time_judged"] else
              "not judged: with overlap a round is no fixed unit)"))  # fmt: skip
        redo = f" + {c['reruns']} re-run exchange(s)" if c["reruns"] else ""
        print(f"  training loop (first to last sync row): predicted {pr['loop_seconds'] or float('nan'):.1f}s{redo} "
              f"measured {result['loop_seconds'] or float('nan'):.1f}s ({c['loop_time_error']:+.1%}, limit "
              f"{c['loop_time_limit']:.0%})" + ("" if c["same_sync_rows"] else "; the sync rows differ from the sim's!"))  # fmt: skip
        print(f"  bytes/round/peer: predicted {pr['round_wire_bytes'] / 1e6:.2f} MB (payload x "
              f"{1 + pr['wire_overhead']:.2f}) measured {result['round_tx_bytes'] / 1e6:.2f} MB "
              f"({c['bytes_error']:+.1%}, limit {c['bytes_limit']:.0%})")  # fmt: skip
        print(f"  bytes/peer, whole run (start-up, DHT and any re-run all-reduce included): predicted "
              f"{pr['wire_bytes_per_peer'] / 1e6:.2f} MB measured {result['tx_bytes_per_peer'] / 1e6:.2f} MB "
              f"({c['run_bytes_error']:+.1%})")  # fmt: skip
        print(f"  validation: {'PASS' if c['ok'] else 'FAIL'}")
        code = code or (0 if c["ok"] else 1)
    (args.out / "netem.json").write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
