"""All-reduce round time on emulated links (100 Mbit/s each way by default), against the bandwidth bound
2(N-1)/N * S/B, for the same fp32 tensor:

- gloo's ``all_reduce`` (a ring, in C++): the reference;
- plain TCP from Python, three patterns over one connection per pair of peers: "reduce-scatter" (the mailbox's
  pattern: every peer sends to all others at once, twice), "shifted" (the same in n - 1 steps of one flow per
  link) and "ring" (a pipelined ring, ``ring_plan``): what each pattern reaches without hivemind in the way;
- raw hivemind ``DecentralizedAverager`` (its butterfly);
- locoswarm's hivemind averager (``backend=hivemind``: matchmaking, agreement check) with
  ``backend.allreduce=butterfly`` (hivemind's), ``mailbox`` (our reduce-scatter over hivemind's P2P) and ``ring``
  (our pipelined ring over hivemind's P2P), with each round split into matchmaking and exchange; and the ring
  "prepared": each round announced 3 s before its payload (``Averager.prepare``, as diloco does when a phase
  begins), so its group forms during the (idle) phase; round 1 has no phase measured yet and forms it as usual.

    sudo .venv/bin/python benchmarks/bench_allreduce.py            # 2 and 4 peers, 50 MB, 100 Mbit/s links
    sudo .venv/bin/python benchmarks/bench_allreduce.py --mb 100 --peers 2
    sudo .venv/bin/python benchmarks/bench_allreduce.py --peers 4 --rate 25   # slower links, same tensor
    sudo .venv/bin/python benchmarks/bench_allreduce.py --peers 4 --only ring # gloo and the rings only (1 min)

Root only. It builds its own network namespaces (named ``lsbench<pid>-*``): one per peer plus one holding a
Linux bridge; each peer is wired to the bridge by a veth pair shaped with ``tc qdisc ... tbf rate 100mbit`` in
both directions (peer egress = uplink, bridge-side egress = downlink); netem is not needed. Nothing leaves the
namespaces (they have no default route). Everything is torn down by name on exit, error or Ctrl+C.

Per method and peer count it runs two rounds (the first also opens connections) and reports, per round, the
slowest peer's time from a common barrier to holding the average (hivemind: matchmaking included), and
bound / measured (1.0 = the link is saturated in both directions for the whole round). Under each method it
gives how busy this box's CPUs were in round 2 (from its barrier until every peer held the average), in all and
by kind of process (the libp2p daemons ``p2pd``, python, the rest): every peer shares this box, so a method that
is short of CPU here would show it there. Comparing ``--rate`` values tells a cost per byte (worse at higher
rates) from a cost per round (the same in seconds at any rate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFIX = f"lsbench{os.getpid()}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------- network
class Testbed:
    """N namespaces on a shaped bridge: peer i is 10.77.<net>.<i+1>."""

    def __init__(self, peers: int, net: int, rate_mbit: float, queue_ms: float = 50.0):
        self.peers, self.net, self.rate_mbit, self.queue_ms = peers, net, rate_mbit, queue_ms
        self.bridge_ns = f"{PREFIX}-br{net}"
        self.names = [f"{PREFIX}-n{net}p{i}" for i in range(peers)]

    def ip(self, i: int) -> str:
        return f"10.77.{self.net}.{i + 1}"

    def up(self) -> None:
        sh("ip", "netns", "add", self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        sh("ip", "-n", self.bridge_ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.names):
            sh("ip", "netns", "add", ns)
            peer_side, bridge_side = f"lsb{self.net}p{i}", f"lsb{self.net}b{i}"
            sh("ip", "link", "add", peer_side, "type", "veth", "peer", "name", bridge_side)
            sh("ip", "link", "set", peer_side, "netns", ns)
            sh("ip", "link", "set", bridge_side, "netns", self.bridge_ns)
            sh("ip", "-n", ns, "link", "set", peer_side, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.bridge_ns, "link", "set", bridge_side, "master", "br0")
            sh("ip", "-n", self.bridge_ns, "link", "set", bridge_side, "up")
            # Shape both directions: the peer's egress (uplink) and the bridge port's egress (downlink). A burst
            # well above a GSO super-packet (64 KB) so tbf never drops a packet for being larger than the bucket.
            tbf = [
                "root",
                "tbf",
                "rate",
                f"{self.rate_mbit:g}mbit",
                "burst",
                "256kb",
                "latency",
                f"{self.queue_ms:g}ms",
            ]
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", *tbf)
            sh("ip", "netns", "exec", self.bridge_ns, "tc", "qdisc", "add", "dev", bridge_side, *tbf)

    def down(self) -> None:
        for ns in [*self.names, self.bridge_ns]:
            sh("ip", "netns", "del", ns, check=False)  # deleting a namespace deletes its veth ends and qdiscs


def cleanup_all() -> None:
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX + "-"):
            sh("ip", "netns", "del", name, check=False)


# ---------------------------------------------------------------------------------------------- CPU
def cpu_sample() -> tuple[list[int], dict[str, int]]:
    """This box's CPU time so far (``/proc/stat``: busy and total jiffies over all cores) and, per kind of process
    (the libp2p daemon ``p2pd``, ``python``, everything else), the jiffies they used: every peer's processes share
    this box's PID namespace, so one peer sees them all."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    per_kind: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
            kind = "p2pd" if comm.startswith("p2pd") else "python" if comm.startswith("python") else "other"
            per_kind[kind] = per_kind.get(kind, 0) + int(rest[11]) + int(rest[12])  # utime + stime
    return [sum(fields) - idle, sum(fields)], per_kind


def cpu_shares(before, after) -> dict[str, float]:
    """Between two ``cpu_sample``s: the share of the box's CPU time that was busy ("box"), and the share each kind
    of process used (of the same total: a process that exited in between is missed)."""
    total = max(1, after[0][1] - before[0][1])
    out = {"box": (after[0][0] - before[0][0]) / total}
    for kind in after[1]:
        out[kind] = max(0, after[1][kind] - before[1].get(kind, 0)) / total
    return out


# ---------------------------------------------------------------------------------------------- plain TCP
def tcp_mesh(rank: int, ips: list[str], port: int) -> dict[int, socket.socket]:
    """One TCP connection between every two peers (as libp2p keeps one per pair), used both ways."""
    import torch.distributed as dist

    server = socket.create_server((ips[rank], port + rank), backlog=len(ips))
    dist.barrier()  # everyone listens
    conns = {}
    for j in range(rank + 1, len(ips)):
        conns[j] = socket.create_connection((ips[j], port + j))
        conns[j].sendall(bytes([rank]))
    for _ in range(rank):
        conn, _ = server.accept()
        conns[conn.recv(1)[0]] = conn
    server.close()
    return conns


def tcp_allreduce(data, conns: dict[int, socket.socket], rank: int, shifted: bool = False) -> None:
    """Average ``data`` (fp32) over the mesh: send peer j its part j and sum the parts we own, then send our part to
    everyone and collect theirs; every send and receive of a stage at once, one thread each."""
    import threading

    world = len(conns) + 1
    flat = memoryview(data.numpy()).cast("B")
    bounds = [len(flat) // 4 * j // world * 4 for j in range(world + 1)]
    part = {j: flat[bounds[j] : bounds[j + 1]] for j in range(world)}

    def stage(send: dict[int, memoryview], receive: dict[int, int]) -> dict[int, bytearray]:
        if shifted:  # world - 1 steps: in step r send to rank + r, receive from rank - r (one flow per link)
            got = {}
            for r in range(1, world):
                to, frm = (rank + r) % world, (rank - r) % world
                got.update(all_at_once({to: send[to]}, {frm: receive[frm]}))
            return got
        return all_at_once(send, receive)

    def all_at_once(send: dict[int, memoryview], receive: dict[int, int]) -> dict[int, bytearray]:
        got = {j: bytearray(n) for j, n in receive.items()}

        def recv(j: int) -> None:
            view, at = memoryview(got[j]), 0
            while at < len(view):
                n = conns[j].recv_into(view[at:])
                if not n:
                    raise ConnectionError(f"peer {j} hung up")
                at += n

        threads = [threading.Thread(target=conns[j].sendall, args=(b,)) for j, b in send.items()]
        threads += [threading.Thread(target=recv, args=(j,)) for j in receive]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    import numpy as np

    others = [j for j in range(world) if j != rank]
    got = stage({j: part[j] for j in others}, {j: len(part[rank]) for j in others})
    mine = np.frombuffer(part[rank], dtype=np.float32).copy()
    for j in others:
        mine += np.frombuffer(got[j], dtype=np.float32)
    mine /= world
    got = stage({j: memoryview(mine).cast("B") for j in others}, {j: len(part[j]) for j in others})
    for j in others:
        part[j][:] = got[j]
    part[rank][:] = memoryview(mine).cast("B")


def tcp_ring_allreduce(data, conns: dict[int, socket.socket], rank: int, piece: int = 1 << 18) -> None:
    """Average ``data`` (fp32) in place by a ring over the mesh's connections to the two neighbours, pipelined: a
    piece of ``piece`` elements goes on as soon as it has arrived (and been added to)."""
    import queue
    import threading

    import numpy as np

    from locoswarm.comm.hivemind_gather import ring_plan

    world = len(conns) + 1
    flat = data.numpy()
    succ, pred = conns[(rank + 1) % world], conns[(rank - 1) % world]
    outbox: queue.Queue = queue.Queue()

    def send() -> None:
        while (item := outbox.get()) is not None:
            succ.sendall(item)

    sender = threading.Thread(target=send)
    sender.start()
    mine, theirs = ring_plan(flat.size, world, rank, piece), ring_plan(flat.size, world, (rank - 1) % world, piece)
    first = sum(1 for *_, step in mine if step == 0)
    for start, stop, _ in mine[:first]:
        outbox.put(flat[start:stop].tobytes())
    buf = bytearray(piece * 4)
    for k, (start, stop, step) in enumerate(theirs):
        view, at, n = memoryview(buf)[: (stop - start) * 4], 0, (stop - start) * 4
        while at < n:
            got = pred.recv_into(view[at:])
            if not got:
                raise ConnectionError("predecessor hung up")
            at += got
        values = np.frombuffer(view, dtype=np.float32)
        if step < world - 1:  # a running sum: add ours; the last one completes the chunk we average
            flat[start:stop] += values
            if step == world - 2:
                flat[start:stop] /= world
        else:
            flat[start:stop] = values
        if first + k < len(mine):
            assert mine[first + k][:2] == (start, stop)
            outbox.put(flat[start:stop].tobytes())
    outbox.put(None)
    sender.join()


# ---------------------------------------------------------------------------------------------- one peer
def worker(args: argparse.Namespace) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.INFO, format=f"[rank {args.rank}] %(asctime)s %(name)s: %(message)s")
    logging.getLogger("locoswarm.comm.hivemind_gather").setLevel(logging.DEBUG)  # the ring's timings
    rank, world = args.rank, args.world
    os.environ.update(MASTER_ADDR=args.master, MASTER_PORT=str(args.port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["GLOO_SOCKET_IFNAME"] = "eth0"  # the shaped link, not the namespace's loopback
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    numel = int(args.mb * 1e6) // 4
    gen = torch.Generator().manual_seed(rank)
    data = torch.randn(numel, generator=gen)
    results: dict[str, list[float]] = {}

    def timed(name: str, fn, before=None) -> None:
        if args.only and args.only not in name and not name.startswith("gloo"):
            return
        for _ in range(2):
            if before is not None:
                before()
            dist.barrier()
            cpu0 = cpu_sample() if rank == 0 else None
            t0 = time.perf_counter()
            fn()
            results.setdefault(name, []).append(time.perf_counter() - t0)
            dist.barrier()  # every peer is done: rank 0's sample covers the whole round
            if cpu0 is not None:
                for kind, share in cpu_shares(cpu0, cpu_sample()).items():
                    results.setdefault(f"_cpu {kind} {name}", []).append(share)

    # gloo ring all-reduce of the same tensor.
    buf = data.clone()
    timed("gloo all_reduce", lambda: dist.all_reduce(buf))

    # The mailbox's pattern (reduce-scatter, then all-gather, each peer sending to all others at once) over plain
    # TCP from Python: what that pattern reaches on these links without hivemind's P2P in the way.
    ips: list = [None] * world
    dist.all_gather_object(ips, args.ip)
    conns = tcp_mesh(rank, ips, args.port + 100)
    timed("python TCP reduce-scatter", lambda: tcp_allreduce(data.clone(), conns, rank))
    timed("python TCP shifted", lambda: tcp_allreduce(data.clone(), conns, rank, shifted=True))
    timed("python TCP ring", lambda: tcp_ring_allreduce(data.clone(), conns, rank))
    for c in conns.values():
        c.close()

    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import NoCompression
    from hivemind.dht import DHT

    def dht_for(tag: str) -> DHT:
        maddrs: list = [None]
        if rank == 0:
            node = DHT(start=True, host_maddrs=[f"/ip4/{args.ip}/tcp/0"])
            maddrs = [[str(m) for m in node.get_visible_maddrs()]]
        dist.broadcast_object_list(maddrs, src=0)
        if rank != 0:
            node = DHT(start=True, host_maddrs=[f"/ip4/{args.ip}/tcp/0"], initial_peers=maddrs[0])
        return node

    # Raw hivemind: DecentralizedAverager.step() with a full group (it starts as soon as all N have joined).
    if not args.only or args.only in "hivemind DecentralizedAverager":
        dht = dht_for("raw")
        raw = DecentralizedAverager(
            [data.clone()],
            dht,
            start=True,
            prefix="bench_raw",
            target_group_size=world,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            compression=NoCompression(),
        )
        timed("hivemind DecentralizedAverager", lambda: raw.step(timeout=300))
        raw.shutdown()
        dht.shutdown()

    # locoswarm's averager (the backend=hivemind round: matchmaking key per round, agreement check, copies), with
    # hivemind's butterfly and with our reduce-scatter over hivemind's P2P (backend.allreduce=mailbox). Its log
    # line splits each round into matchmaking and exchange: kept to show where the time goes.
    import re

    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig

    phases: list[tuple[float, float]] = []

    class Phases(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = re.search(r"matchmaking ([\d.]+)s, all-reduce ([\d.]+)s", record.getMessage())
            if m:
                phases.append((float(m[1]), float(m[2])))

    logging.getLogger("locoswarm.comm.hivemind").addHandler(Phases())
    weight = torch.ones(1)
    stacked = [data.clone().unsqueeze(0)]
    groups: list[int] = []
    for method in ("butterfly", "mailbox", "ring", "ring, prepared"):
        name = f"locoswarm hivemind {method}"
        if args.only and args.only not in name:
            continue
        allreduce = method.split(",")[0]
        maddrs: list = [None]
        run_id = f"benchls{method.replace(', ', '')}"
        cfg = BackendConfig(name="hivemind", host_maddrs=[f"/ip4/{args.ip}/tcp/0"], run_id=run_id)
        cfg.allreduce = allreduce
        if rank == 0:
            ours = HivemindAverager(cfg, workers=world, rank=rank)
            maddrs = [ours.maddrs]
        dist.broadcast_object_list(maddrs, src=0)
        if rank != 0:
            cfg.initial_peers = maddrs[0]
            ours = HivemindAverager(cfg, workers=world, rank=rank)
        phases.clear()
        prepare = None
        if method.endswith("prepared"):

            def prepare(ours=ours) -> None:
                """As diloco when a phase begins (Averager.prepare); then 3 s of inner steps (idle here). Round 1
                has no phase measured yet, so only round 2 forms its group during the phase."""
                ours.prepare(weight)
                time.sleep(3.0)

        def one_round(ours=ours) -> None:
            groups.append(ours.average(stacked, weight).group_size)
            ours.round_boundary()  # as the trainer after every round

        timed(name, one_round, prepare)
        ours.close()
        results[f"_exchange {name}"] = [exchange for _, exchange in phases]
        results[f"_matchmaking {name}"] = [matchmaking for matchmaking, _ in phases]
    results["_groups"] = [float(g) for g in groups]
    Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver
def run(peers: int, mb: float, rate_mbit: float, queue_ms: float, tmp: Path, only: str = "") -> dict[str, list[float]]:
    bed = Testbed(peers, net=peers, rate_mbit=rate_mbit, queue_ms=queue_ms)
    procs: list[subprocess.Popen] = []
    try:
        bed.up()
        port = 29500 + peers
        for i, ns in enumerate(bed.names):
            out = tmp / f"n{peers}-r{i}.json"
            cmd = ["ip", "netns", "exec", ns, sys.executable, __file__, "--worker", "--rank", str(i)]
            cmd += ["--world", str(peers), "--master", bed.ip(0), "--port", str(port), "--ip", bed.ip(i)]
            cmd += ["--mb", str(mb), "--out", str(out), "--only", only]
            log = open(tmp / f"n{peers}-r{i}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        end = time.monotonic() + 900
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
        bad = sorted(range(peers), key=lambda i: procs[i].poll() in (None, 0))  # crashed peers first
        bad = [i for i in bad if procs[i].poll() != 0]
        if bad:
            tail = (tmp / f"n{peers}-r{bad[0]}.log").read_text()[-3000:]
            raise RuntimeError(f"{peers} peers: peer {bad[0]} failed or timed out:\n{tail}")
        per_peer = [json.loads((tmp / f"n{peers}-r{i}.json").read_text()) for i in range(peers)]
        keys = dict.fromkeys(k for p in per_peer for k in p)  # rank 0 alone samples the CPU
        return {k: [max(vals) for vals in zip(*(p[k] for p in per_peer if k in p), strict=True)] for k in keys}
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        bed.down()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--mb", type=float, default=50.0, help="tensor size in MB (fp32)")
    p.add_argument("--rate", type=float, default=100.0, help="each link's rate in Mbit/s, both ways")
    p.add_argument(
        "--queue-ms",
        type=float,
        default=50.0,
        help="tbf's queue limit, as the delay a full queue adds (ms): deep queues delay acknowledgements",
    )
    p.add_argument("--logs", type=Path, default=None, help="keep each peer's log in this folder")
    p.add_argument("--only", default="", help="run only the methods whose name holds this (and gloo, the reference)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--rank", "--world", "--port"):
        p.add_argument(a, type=int, help=argparse.SUPPRESS)
    for a in ("--master", "--ip", "--out"):
        p.add_argument(a, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if os.geteuid() != 0:
        sys.exit("bench_allreduce: needs root (network namespaces and tc)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (cleanup_all(), sys.exit(130)))
    size = args.mb * 1e6
    print(
        f"tensor {args.mb:g} MB fp32, links {args.rate:g} Mbit/s each way (tc tbf, queue {args.queue_ms:g} ms), bound = 2(N-1)/N * S/B"
    )
    print(f"{'peers':>5}  {'method':<32} {'bound s':>8} {'round 1 s':>10} {'round 2 s':>10} {'bound/round 2':>14}")
    try:
        with tempfile.TemporaryDirectory(prefix="lsbench") as d:
            for n in args.peers:
                if args.logs is not None:
                    args.logs.mkdir(parents=True, exist_ok=True)
                res = run(n, args.mb, args.rate, args.queue_ms, args.logs or Path(d), args.only)
                bound = 2 * (n - 1) / n * size * 8 / (args.rate * 1e6)
                for name, times in res.items():
                    if name.startswith("_") and not name.startswith("_exchange"):
                        continue
                    if name.startswith("_exchange"):  # the slowest peer's exchange alone (matchmaking excluded)
                        name = "  exchange only" + name[len("_exchange locoswarm hivemind") :]
                    print(
                        f"{n:>5}  {name:<32} {bound:>8.2f} {times[0]:>10.2f} {times[1]:>10.2f} {bound / times[1]:>14.2f}"
                    )
                    if f"_cpu box {name}" in res:  # round 2, from its barrier until every peer held the average
                        kinds = ", ".join(
                            f"{k} {res.get(f'_cpu {k} {name}', [0, 0])[1]:.0%}" for k in ("p2pd", "python", "other")
                        )
                        print(f"{n:>5}    (CPU busy, round 2: {res[f'_cpu box {name}'][1]:.0%} of the box: {kinds})")
                    if name.startswith("locoswarm"):  # a failed round logs no split: fewer entries
                        mm = ", ".join(f"{t:.2f} s" for t in res[f"_matchmaking {name}"])
                        print(f"{n:>5}    (matchmaking, slowest peer, rounds that completed: {mm})")
                print(f"{n:>5}  (locoswarm group sizes: {[int(g) for g in res['_groups']]})")
    finally:
        cleanup_all()


if __name__ == "__main__":
    main()
