"""locoswarm-netem: clear errors without root or iproute2; an isolated, shaped testbed that is always torn down;
and the issue's validation: a 4-peer hivemind DiLoCo run on the testbed agrees with the sim's NetworkModel
(round time within 20%, bytes within 10%)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locoswarm.cli import netem
from locoswarm.netsim import Link

CLI = [sys.executable, "-m", "locoswarm.cli.netem"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# ~2.6M parameters (10 MB of fp32 pseudo-gradient per round) but only 16 tokens per step: the rounds are
# dominated by the shaped links, not by the (shared, loaded) CPUs.
SWARM = [
    "data=synthetic", "data.synthetic_tokens=60000", "data.chunk_tokens=1024", "device=cpu",
    "model.n_layer=2", "model.n_head=4", "model.d_model=320", "model.seq_len=16", "train.batch_size=1",
    "train.warmup_steps=2", "train.log_interval=1000", "train.eval_interval=10000", "train.eval_batches=1",
    "algorithm=diloco", "algorithm.inner_steps=2", "algorithm.warmup_sync_steps=0", "train.max_steps=10",
    "network=testbed",
]  # fmt: skip


def test_needs_iproute2(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    p = subprocess.run([*CLI, "--peers", "2", "--out", str(tmp_path / "o")], env={**ENV, "PATH": str(empty)},
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "iproute2" in p.stderr and "apt-get install -y iproute2" in p.stderr


def test_needs_root(tmp_path):
    cmd = [*CLI, "--peers", "2", "--out", str(tmp_path / "o")]
    if os.geteuid() == 0:  # drop to nobody for this one command
        assert shutil.which("setpriv"), "util-linux's setpriv is needed to run a command as non-root"
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "needs root" in p.stderr, p.stderr


def _host_links() -> set[str]:
    return {
        x["ifname"] for x in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
    }


@pytest.mark.network
@pytest.mark.slow
def test_testbed_is_isolated_shaped_and_torn_down():
    host = _host_links()
    bed = netem.Testbed([Link(8e6, 16e6, 0.0), Link(8e6, 16e6, 0.0)])
    try:
        bed.up()
        assert set(netem.list_run_namespaces()) >= {bed.hub, bed.ns(0), bed.ns(1)}
        assert _host_links() == host  # nothing of the testbed lives in the host's namespace
        routes = subprocess.run(["ip", "-j", "-n", bed.ns(0), "route"], capture_output=True, text=True).stdout
        assert [r["dst"] for r in json.loads(routes)] == ["10.213.0.0/24"]  # no default route: nowhere else to go
        out = subprocess.run(["ip", "-n", bed.ns(0), "route", "get", "1.1.1.1"], capture_output=True, text=True)
        assert out.returncode != 0 and "unreachable" in out.stderr.lower()
        up = json.loads(subprocess.run(["tc", "-j", "-n", bed.ns(0), "qdisc", "show", "dev", "eth0"],
                                       capture_output=True, text=True).stdout)  # fmt: skip
        down = json.loads(subprocess.run(["tc", "-j", "-n", bed.hub, "qdisc", "show", "dev", "v0"],
                                         capture_output=True, text=True).stdout)  # fmt: skip
        assert up[0]["kind"] == "tbf" and up[0]["options"]["rate"] == 1_000_000  # bytes/s = 8 Mbit/s
        assert down[0]["kind"] == "tbf" and down[0]["options"]["rate"] == 2_000_000
        # peer 0 -> peer 1 over the bridge: the counters see every payload byte plus framing
        before = bed.counters()
        server = subprocess.Popen(["ip", "netns", "exec", bed.ns(1), sys.executable, "-c",
            "import socket; s = socket.socket(); s.bind(('0.0.0.0', 5001)); s.listen(1); c, _ = s.accept(); n = 0\n"
            "while (b := c.recv(65536)): n += len(b)\nprint(n)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(1.0)
        subprocess.run(["ip", "netns", "exec", bed.ns(0), sys.executable, "-c",
            "import socket, time\nfor _ in range(50):\n  try: s = socket.create_connection(('10.213.0.2', 5001)); break\n"
            "  except OSError: time.sleep(0.1)\ns.sendall(b'x' * 400_000); s.close()"], check=True, timeout=60)  # fmt: skip
        got = int(server.communicate(timeout=60)[0])
        after = bed.counters()
        assert got == 400_000
        assert 400_000 < after[0]["tx"] - before[0]["tx"] < 400_000 * 1.1
        assert 400_000 < after[1]["rx"] - before[1]["rx"] < 400_000 * 1.1
    finally:
        bed.down()
    assert not {bed.hub, bed.ns(0), bed.ns(1)} & set(netem.list_run_namespaces())


def _new_namespaces(before: set[str]) -> set[str]:
    return set(netem.list_run_namespaces()) - before


@pytest.mark.network
@pytest.mark.slow
def test_sigterm_tears_everything_down(tmp_path):
    before = set(netem.list_run_namespaces())
    proc = subprocess.Popen([*CLI, "--peers", "2", "--out", str(tmp_path), *SWARM], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    end = time.monotonic() + 240
    while not (tmp_path / "peer-1" / "peer.log").exists():  # both peers are running inside the testbed
        assert proc.poll() is None and time.monotonic() < end, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    ours = _new_namespaces(before)
    assert len(ours) == 3
    pids = {int(p) for ns in ours for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                           text=True).stdout.split()}  # fmt: skip
    assert pids
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert not ours & set(netem.list_run_namespaces())
    assert not [p for p in pids if _running(p)], "processes left from the testbed"


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.network
@pytest.mark.slow
def test_failed_peers_still_tear_down(tmp_path):
    before = set(netem.list_run_namespaces())
    p = subprocess.run([*CLI, "--peers", "2", "--out", str(tmp_path), *SWARM, "data=text",
                        f"data.path={tmp_path / 'missing.txt'}"], env=ENV, capture_output=True, text=True,
                       timeout=400)  # fmt: skip
    assert p.returncode in (1, 2), p.stderr
    assert "did not finish ok" in p.stderr or "did not start" in p.stderr
    assert not _new_namespaces(before)


@pytest.mark.network
@pytest.mark.slow
def test_a_swarm_past_its_timeout_is_still_reported(tmp_path):
    """--timeout stops the swarm, and what its peers did is still written to netem.json (with the error), so a
    run that hung can be understood afterwards; the testbed is torn down."""
    before = set(netem.list_run_namespaces())
    p = subprocess.run([*CLI, "--peers", "2", "--out", str(tmp_path), "--timeout", "25", *SWARM,
                        "train.max_steps=100000"], env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 2 and "did not finish within 25s" in p.stderr, p.stderr
    result = json.loads((tmp_path / "netem.json").read_text())
    assert "did not finish within 25s" in result["error"]
    assert len(result["peers"]) == 2 and all(q["returncode"] != 0 for q in result["peers"])
    assert not _new_namespaces(before)


def _validate(out: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Run ``locoswarm-netem --validate`` on 4 peers; returns the process, its netem.json and, for assertion
    messages, its stderr with the tail of every peer's log (what a failure in CI needs to be understood)."""
    p = subprocess.run([*CLI, "--peers", "4", "--out", str(out), "--validate", "--timeout", "300", *overrides],
                       env=ENV, capture_output=True, text=True, timeout=560)  # fmt: skip
    print(p.stdout)
    logs = "".join(f"\n--- {q}:\n" + "".join(q.read_text(errors="replace").splitlines(True)[-25:])
                   for q in sorted(out.glob("peer-*/peer.log")))  # fmt: skip
    why = p.stderr[-3000:] + logs
    assert (out / "netem.json").exists(), why
    result = json.loads((out / "netem.json").read_text())
    assert result["error"] is None and all(q["status"] == "ok" for q in result["peers"]), why
    return p, result, why


@pytest.mark.network
@pytest.mark.slow
def test_sim_predicts_the_testbed(tmp_path):
    """The issue's validation: the same 4-peer DiLoCo config, real hivemind peers on 10 Mbit/s shaped links vs
    the sim backend's NetworkModel (network=testbed): round time within 20%, on-wire bytes within 10%."""
    before = set(netem.list_run_namespaces())
    # the README's command: conf/experiment/netem_validation.yaml is the SWARM config above, named
    p, result, why = _validate(tmp_path, "experiment=netem_validation")
    assert all(len(q["round_seconds"]) == 3 for q in result["peers"])  # rounds 2-4 of 5 measured on every peer
    c = result["comparison"]
    assert abs(c["bytes_error"]) <= 0.10, c
    # network=testbed prices hivemind's butterfly at the efficiency bench_allreduce.py measured (0.72 of the bound)
    assert abs(c["round_time_error"]) <= 0.20, c
    assert p.returncode == 0, why  # --validate's own 20% / 10% verdict
    assert not _new_namespaces(before)


STREAMING = ["algorithm=streaming_diloco", "algorithm.fragments=2", "algorithm.overlap_steps=22"]


@pytest.mark.network
@pytest.mark.slow
def test_sim_predicts_the_testbed_with_overlap(tmp_path):
    """The validation covers streaming: 4 hivemind peers train while a fragment's all-reduce is in flight (real
    compute, ~6 s per 44-step phase, against ~3.5 s per fragment exchange at 10 Mbit/s). A round is no fixed unit
    then, so the model is held to the training loop's wall time (first to last sync row) with compute priced at
    the step time the peers measured, to the per-round bytes, and to the schedule itself (the same sync rows)."""
    before = set(netem.list_run_namespaces())
    # the command conf/experiment/netem_overlap.yaml names for its streaming run
    p, result, why = _validate(tmp_path, "experiment=netem_overlap", *STREAMING)
    c, pr = result["comparison"], result["predicted"]
    assert pr["overlapped"] and not c["round_time_judged"]
    # the same schedule on both: a sync row at the warm-up step, at every fragment merge, and at the end
    assert c["same_sync_rows"] and pr["sync_row_steps"][0] == 1 and pr["sync_row_steps"][-1] == 177, (result, pr)
    assert all(0 < q["step_seconds"] < 2.0 for q in result["peers"])  # compute was measured, and real
    assert abs(c["bytes_error"]) <= netem.BYTES_TOLERANCE_OVERLAPPED, c  # see there: per-round control traffic
    # Measured -17%, -22%, -27% (quiet box) and -37% (CI): the model has no per-round cost (hivemind's matchmaking
    # and agreement check, 0.5-2 s a round here), which 10 fragment rounds of ~3 s each feel, so beyond noise it can
    # only be optimistic: one-sided, down to --validate's limit for overlapped runs (45%).
    assert -netem.LOOP_TOLERANCE_OVERLAPPED <= c["loop_time_error"] <= 0.10, c
    assert c["loop_time_limit"] == netem.LOOP_TOLERANCE_OVERLAPPED
    assert p.returncode == 0, why  # --validate's own verdict
    assert not _new_namespaces(before)


def test_a_rerun_round_is_priced_as_one_more_exchange(tmp_path):
    """hivemind re-runs a round whose averages disagree (a lost part): the comparison adds one modelled exchange per
    re-run to the predicted loop, counted from the peers' logs; without re-runs nothing changes."""
    log = tmp_path / "peer.log"
    log.write_text("round 3: group of 4\n[peer-0] round 3: the group's averages disagree (a part was lost); "
                   "re-running it\nround 4: group of 4\n")  # fmt: skip
    assert netem.count_reruns(log) == 1 and netem.count_reruns(tmp_path / "missing.log") == 0
    assert netem.count_reruns(log, after_round=3) == 0  # a re-run of the round whose sync row starts the loop
    predicted = {"round_seconds": 18.0, "round_wire_bytes": 16e6, "loop_seconds": 72.0, "exchange_seconds": 18.0,
                 "sync_row_steps": [1, 2], "overlapped": False, "wire_bytes_per_peer": 1e8}  # fmt: skip
    measured = {
        "round_seconds": 18.0,
        "round_tx_bytes": 16e6,
        "loop_seconds": 90.0,
        "tx_bytes_per_peer": 1e8,
        "peers": [{"sync_row_steps": [1, 2]}],
    }
    assert netem.compare(measured, predicted)["loop_time_error"] == pytest.approx(72 / 90 - 1)
    c = netem.compare({**measured, "reruns": 1}, predicted)
    assert c["loop_time_error"] == pytest.approx(0.0) and c["reruns"] == 1 and c["ok"], c


def test_a_pipelines_throughput_is_its_drivers_tokens_between_sync_rows():
    """tokens/s of a pipeline: each driver's (stage 0's peers') tokens from its first sync row to its second-to-last
    (the last includes the final, pipelined evaluation), summed over the drivers."""
    peers = [
        {"sync_row_steps": [5, 10, 15, 20], "sync_row_times": [10.0, 12.0, 14.0, 30.0]},  # 10 steps in 4 s
        {"sync_row_steps": [5, 10, 15, 20], "sync_row_times": [10.0, 11.0, 12.0, 13.0]},  # 10 steps in 2 s
        {"sync_row_steps": [], "sync_row_times": []},  # a stage-1 peer: not a driver, not counted
    ]
    assert netem.pipeline_tokens_per_second(peers, 2, 100) == pytest.approx(250 + 500)
    assert netem.pipeline_tokens_per_second(peers[:1], 1, 100) == pytest.approx(250)
    short = [{"sync_row_steps": [5, 10], "sync_row_times": [1.0, 2.0]}]
    assert netem.pipeline_tokens_per_second(short, 1, 100) is None  # no interval without the final evaluation


def test_a_pipelines_peers_are_split_among_its_stages():
    """--peers N with pipeline.stages=S (from an override or an experiment config): workers = N / S peers per stage,
    and N must be a multiple of S."""
    assert "workers=3" in netem.with_defaults(["pipeline.stages=2"], 6)
    assert "workers=4" in netem.with_defaults(["experiment=netem_swarm"], 8)
    assert "workers=5" in netem.with_defaults([], 5)
    with pytest.raises(netem.NetemError, match=r"--peers 5 must be a multiple of pipeline.stages=2"):
        netem.with_defaults(["experiment=netem_swarm"], 5)


@pytest.mark.network
@pytest.mark.slow
def test_a_pipeline_runs_on_the_testbed(tmp_path):
    """`locoswarm-netem --peers 4 experiment=netem_swarm`: 2 stages x 2 hivemind peers, each in its own namespace behind
    a 10 Mbit/s link, calls between stages over the shaped links. Every peer finishes ok, stage 1 counts every
    micro-batch of every step exactly once, the pipeline's throughput is reported, and the testbed is torn down.
    --validate refuses a pipeline (the sim's model of calls between stages is not validated yet)."""
    before = set(netem.list_run_namespaces())
    p = subprocess.run([*CLI, "--peers", "4", "--out", str(tmp_path), "--timeout", "300", "experiment=netem_swarm",
                        "train.max_steps=15"], env=ENV, capture_output=True, text=True, timeout=560)  # fmt: skip
    logs = "".join(f"\n--- {q}:\n" + "".join(q.read_text(errors="replace").splitlines(True)[-25:])
                   for q in sorted(tmp_path.glob("peer-*/peer.log")))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:] + logs
    result = json.loads((tmp_path / "netem.json").read_text())
    assert result["error"] is None and all(q["status"] == "ok" for q in result["peers"])
    assert result["stages"] == 2 and result["tokens_per_second"] > 0 and "tokens/s through every stage" in p.stdout
    counted = 0
    for peer in (2, 3):  # stage 1
        rows = [json.loads(x) for x in (tmp_path / f"peer-{peer}" / "metrics.jsonl").read_text().splitlines() if x]
        counted += sum(r["microbatches"] for r in rows)
    assert counted == 2 * 2 * 15  # 2 drivers x 2 micro-batches x 15 steps
    assert not _new_namespaces(before)
    p = subprocess.run([*CLI, "--peers", "4", "--out", str(tmp_path / "v"), "--validate", "experiment=netem_swarm"],
                       env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and "not validated yet" in p.stderr, p.stderr
