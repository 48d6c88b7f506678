"""``locoswarm-swarm``: run peers of a real hivemind swarm (``backend=hivemind``).

  locoswarm-swarm --peers N --out DIR [overrides...]      N local peers of one config; peer i hosts worker rank i
                                                          (its data shard) and writes DIR/peer-<i>/
  locoswarm-swarm join MULTIADDR [--out DIR] [--rank R] [--identity FILE] [overrides...]
                                                          one more peer for a running swarm (any machine)
  locoswarm-swarm keygen FILE [FILE...]                   new peer identities; prints their peer ids, one a line

A pipeline (``pipeline.stages=S``): N = S x K peers, K = ``workers`` per stage; peer i serves stage i // K as that
stage's peer i % K (stage 0 drives worker i % K's data through the others; see pipeline/peer.py). ``join --stage S``
serves stage S; without it a joiner serves the stage with the least throughput.

Every peer has an identity (a libp2p key: its peer id, and the key that signs its DHT records): DIR/peer-<i>/
identity.key for launched peers and <run dir>/identity.key for a joiner (``--identity`` elsewhere), made on first
use and kept, so a restarted peer is the same peer. To admit only known peers, list their ids in a file and pass
``backend.allowed_peers=FILE`` to every peer, e.g.
``locoswarm-swarm keygen run/peer-0/identity.key run/peer-1/identity.key > allowed.txt``.

Overrides are locoswarm-train's (``backend=hivemind`` is implied; ``workers`` defaults to N). Peer 0 starts the
DHT and prints its multiaddr; the others bootstrap from it. A joiner hosts the lowest worker rank that no live
peer holds (a departed peer's shard; ``--rank`` overrides), downloads the swarm's state from a live peer, then
trains. To accept peers from other machines, listen on a routable address:
``backend.host_maddrs=[/ip4/0.0.0.0/tcp/31337]`` (and ``backend.announce_maddrs=[/ip4/<public ip>/tcp/31337]``
behind NAT). All peers of a swarm must use the same overrides apart from those addresses.

Robust aggregation (``aggregator=median`` ...) works as on ``backend=sim``. For tests of it, ``faults.byzantine=n
faults.attack=nan|scale|signflip|random`` makes the peers that host the last n worker ranks malicious (what they
send is replaced before it is encoded, exactly as the sim's simulated attackers): a test-only peer mode, never
for a real swarm. ``alie`` needs every honest contribution in one process and stays sim-only.

This process supervises its peers: each runs in its own session, Ctrl+C is forwarded to them (each writes
summary.json with its status and shuts its DHT and p2pd down), and whatever a peer leaves behind when it dies
(a SIGKILLed peer's averager, DHT and p2pd processes) is killed by process group.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MADDR_FILE = "dht_maddrs.txt"
PEER_START_TIMEOUT = 300.0  # bound on peer 0's start-up (imports, DHT bootstrap) on a loaded machine
INTERRUPT_GRACE = 60.0  # after Ctrl+C, how long peers get to write their summaries and shut down
log = logging.getLogger("locoswarm.swarm")


# ---------------------------------------------------------------------------------------------- one peer
def compose_config(overrides: list[str]):
    """Hydra's compose API over conf/ (the same config tree as locoswarm-train), then typed and validated."""
    from hydra import compose, initialize_config_dir

    from locoswarm.cli.train import CONF_DIR, to_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


def run_peer(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="locoswarm-swarm peer")
    p.add_argument("--index", default="join")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--stage", type=int, default=None)
    p.add_argument("--initial-peer", action="append", default=[])
    p.add_argument("--expect", type=int, default=None, help="peers launched together (they start together)")
    p.add_argument("--identity", type=Path, default=None, help="identity file (made if missing)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # hivemind's background processes (DHT, averagers) and its own logger write to fd 2, including tracebacks of
    # rounds cut short on purpose (Ctrl+C, a dead groupmate). They go to <run dir>/hivemind.log; this peer's own
    # log lines (rounds, group sizes, failures, joins) stay on the terminal.
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    hivemind_log = open(args.out / "hivemind.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(hivemind_log.fileno(), 2)
    logging.basicConfig(
        stream=terminal,
        level=logging.INFO,
        format=f"[peer-{args.index}] %(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    for name in filter(None, os.environ.get("LOCOSWARM_DEBUG", "").split(",")):  # e.g. locoswarm.pipeline
        logging.getLogger(name).setLevel(logging.DEBUG)
    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.pipeline.remote import pick_stage
    from locoswarm.runlog import atomic_write_text
    from locoswarm.trainer import train

    try:
        cfg = compose_config(args.overrides)
    except ValueError as e:
        print(f"locoswarm-swarm: error: {e}", file=terminal)
        return 2
    if args.rank is not None and not 0 <= args.rank < cfg.workers:
        print(f"locoswarm-swarm: error: --rank {args.rank} is outside workers={cfg.workers}", file=terminal)
        return 2
    # The bootstrap address is runtime wiring, like a port: it is not part of the run's config (or its hash).
    backend = dataclasses.replace(cfg.backend, initial_peers=args.initial_peer or list(cfg.backend.initial_peers))
    new_identity = False
    if backend.identity is None and args.identity is not None:  # an explicit backend.identity wins
        from locoswarm.comm.identity import generate

        if not args.identity.exists():
            log.info("new peer identity %s in %s", generate(args.identity), args.identity)
            new_identity = True
        backend = dataclasses.replace(backend, identity=str(args.identity))
    run_dir = args.out
    averager = None
    try:
        averager = HivemindAverager(
            backend,
            workers=cfg.workers,
            rank=args.rank,
            expected_peers=args.expect,
            compression=cfg.compression,
            seed=cfg.seed,
            aggregator=cfg.aggregator,
            new_identity=new_identity,
            verify=cfg.verify.fraction > 0,
        )
        atomic_write_text(run_dir / MADDR_FILE, "\n".join(averager.maddrs) + "\n")
        print(f"locoswarm-swarm: peer-{args.index} DHT address: {averager.maddrs[0]}", flush=True)
        if cfg.pipeline.stages > 1:  # a stage peer: it averages and counts its rank within its stage
            stages = cfg.pipeline.stages
            stage = args.stage if args.stage is not None else pick_stage(averager.stage_directory(), stages)
            if not 0 <= stage < stages:
                print(f"locoswarm-swarm: error: --stage {stage} is outside pipeline.stages={stages}", file=terminal)
                return 2
            averager.join_stage(stage)
            log.info("serving pipeline stage %d of %d", stage, stages)
        if averager.rank is None:
            averager.rank = averager.pick_rank()
            log.info("joining as worker rank %d", averager.rank)
        summary = train(cfg, run_dir, ranks=[averager.rank], averager=averager)
        log.info(
            "done: status=%s outer_steps=%s val_loss=%s -> %s",
            summary["status"],
            summary["outer_steps"],
            summary["final_val_loss"],
            run_dir,
        )
        return 0
    except KeyboardInterrupt:
        log.info("interrupted: left the swarm; summary.json records the status")
        return 130
    except Exception as e:  # noqa: BLE001 - the trainer already wrote summary.json with the error
        log.error("failed: %s: %s", type(e).__name__, e)
        return 1
    finally:
        if averager is not None:
            averager.close()  # train() closes it too; closing twice is a no-op


# ---------------------------------------------------------------------------------------------- supervisor
class Supervisor:
    def __init__(self) -> None:
        self.peers: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.interrupted = 0
        self.reaped: set[str] = set()

    def spawn(
        self,
        name: str,
        run_dir: Path,
        overrides: list[str],
        initial: list[str],
        rank: int | None,
        expect: int | None,
        identity: Path | None = None,
        stage: int | None = None,
    ) -> None:
        cmd = [sys.executable, "-m", "locoswarm.cli.swarm", "peer", "--index", name.removeprefix("peer-")]
        cmd += ["--out", str(run_dir)]
        if expect is not None:
            cmd += ["--expect", str(expect)]
        for m in initial:
            cmd += ["--initial-peer", m]
        if rank is not None:
            cmd += ["--rank", str(rank)]
        if stage is not None:
            cmd += ["--stage", str(stage)]
        cmd += ["--identity", str(identity if identity is not None else run_dir / "identity.key")]
        cmd += ["--", *overrides]
        # Own session: a terminal's Ctrl+C reaches only us, and we can kill everything a peer started by group.
        self.peers[name] = (subprocess.Popen(cmd, start_new_session=True), run_dir)

    def on_signal(self, signum: int, _frame) -> None:
        self.interrupted += 1
        for proc, _ in self.peers.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if self.interrupted == 1:
                        os.kill(proc.pid, signal.SIGINT)  # the peer leaves cleanly and writes its summary
                    else:
                        os.killpg(proc.pid, signal.SIGKILL)

    def reap(self, name: str) -> None:
        """Kill what a finished peer left in its process group (a SIGKILLed peer's averager, DHT, p2pd)."""
        if name in self.reaped:
            return
        self.reaped.add(name)
        proc, run_dir = self.peers[name]
        for sig, pause in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(pause)
        if proc.returncode is not None and proc.returncode < 0:
            self._record_death(run_dir, -proc.returncode)

    @staticmethod
    def _record_death(run_dir: Path, signum: int) -> None:
        from locoswarm.runlog import atomic_write_text
        from locoswarm.trainer import REQUIRED_SUMMARY_KEYS

        path = run_dir / "summary.json"
        if path.exists() and json.loads(path.read_text()).get("status") in ("ok", "failed"):
            return
        summary = dict.fromkeys(REQUIRED_SUMMARY_KEYS)
        summary.update(status="failed", error=f"peer process killed by signal {signal.Signals(signum).name}")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def wait_for_maddrs(self, name: str) -> list[str]:
        proc, run_dir = self.peers[name]
        path = run_dir / MADDR_FILE
        end = time.monotonic() + PEER_START_TIMEOUT
        while time.monotonic() < end and not self.interrupted:
            if path.exists():
                return [m for m in path.read_text().split() if m]
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        return []

    def wait(self) -> int:
        deadline = None
        while True:
            alive = [n for n, (p, _) in self.peers.items() if p.poll() is None]
            for n in self.peers:
                if n not in alive:
                    self.reap(n)
            if not alive:
                break
            if self.interrupted and deadline is None:
                deadline = time.monotonic() + INTERRUPT_GRACE
            if deadline is not None and time.monotonic() > deadline:
                for n in alive:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.peers[n][0].pid, signal.SIGKILL)
            time.sleep(0.2)
        codes = {n: p.returncode for n, (p, _) in self.peers.items()}
        bad = {n: c for n, c in codes.items() if c != 0}
        if self.interrupted:
            print("locoswarm-swarm: interrupted; each peer's summary.json records its status", file=sys.stderr)
            return 130
        if bad:
            print(f"locoswarm-swarm: peers that did not finish ok: {bad}", file=sys.stderr)
        return 0 if not bad else 1


def _with_defaults(overrides: list[str], peers: int | None) -> list[str]:
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = []
    if "backend" not in keys:
        extra.append("backend=hivemind")
    if peers is not None and "workers" not in keys:
        extra.append(f"workers={peers}")
    if "train.progress" not in keys:
        extra.append("train.progress=false")  # N progress bars in one terminal are unreadable
    return extra + overrides


def pipeline_stages(overrides: list[str]) -> int:
    """pipeline.stages of the config these overrides compose (an experiment config may set it; 1: no pipeline).
    Raises ValueError naming a bad key or value."""
    return compose_config(_with_defaults(overrides, None)).pipeline.stages


def keygen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="locoswarm-swarm keygen", description="Write new peer identities.")
    p.add_argument("files", nargs="+", type=Path, help="where to write each identity (never overwritten)")
    args = p.parse_args(argv)
    from locoswarm.comm.identity import generate

    for path in args.files:
        try:
            peer_id = generate(path)
        except (FileExistsError, OSError) as e:
            print(f"locoswarm-swarm keygen: error: {e}", file=sys.stderr)
            return 1
        print(peer_id)  # stdout: a backend.allowed_peers file, one line per peer
        print(f"locoswarm-swarm keygen: {path}: peer id {peer_id}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "peer":  # internal: one peer process, started by the supervisor below
        return run_peer(argv[1:])
    if argv and argv[0] == "keygen":
        return keygen(argv[1:])
    joining = bool(argv) and argv[0] == "join"
    p = argparse.ArgumentParser(
        prog="locoswarm-swarm join" if joining else "locoswarm-swarm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if joining:
        p.add_argument("multiaddr", help="the DHT address a live peer printed")
        p.add_argument("--out", type=Path, default=None, help="this peer's run dir (default runs/join-<time>)")
        p.add_argument("--rank", type=int, default=None, help="worker rank (data shard); default: a free one")
        p.add_argument("--identity", type=Path, default=None, help="identity file (default <out>/identity.key)")
        p.add_argument("--stage", type=int, default=None,
                       help="a pipeline's stage to serve; default: the one with the least throughput")  # fmt: skip
    else:
        p.add_argument("--peers", type=int, required=True, help="local peers to start")
        p.add_argument("--out", type=Path, required=True, help="peer i writes DIR/peer-<i>/")
    p.add_argument("overrides", nargs="*", help="locoswarm-train overrides, e.g. algorithm.inner_steps=50")
    args = p.parse_intermixed_args(argv[1:] if joining else argv)
    sup = Supervisor()
    signal.signal(signal.SIGINT, sup.on_signal)
    signal.signal(signal.SIGTERM, sup.on_signal)
    if joining:
        overrides = _with_defaults(args.overrides, None)
        out = args.out or Path("runs") / time.strftime("join-%Y%m%d-%H%M%S")
        sup.spawn("peer-join", out, overrides, [args.multiaddr], args.rank, None, args.identity, args.stage)
        return sup.wait()
    if args.peers < 1:
        p.error("--peers must be >= 1")
    try:
        stages = pipeline_stages(args.overrides)
    except ValueError as e:
        p.error(str(e))
    if stages > 1 and args.peers % stages:
        p.error(f"--peers {args.peers} must be a multiple of pipeline.stages={stages} (the same peers per stage)")
    per_stage = args.peers // stages  # a pipeline's workers: peers per stage; peer i serves stage i // K
    stage = (lambda i: i // per_stage) if stages > 1 else (lambda i: None)
    overrides = _with_defaults(args.overrides, per_stage)
    args.out.mkdir(parents=True, exist_ok=True)
    sup.spawn("peer-0", args.out / "peer-0", overrides, [], 0, per_stage, stage=stage(0))
    maddrs = sup.wait_for_maddrs("peer-0")
    if not maddrs:
        print("locoswarm-swarm: peer-0 did not start its DHT; see its output above", file=sys.stderr)
        sup.on_signal(signal.SIGINT, None)
        sup.wait()
        return 1
    for i in range(1, args.peers):
        sup.spawn(f"peer-{i}", args.out / f"peer-{i}", overrides, maddrs, i % per_stage, per_stage, stage=stage(i))
    return sup.wait()


if __name__ == "__main__":
    sys.exit(main())
