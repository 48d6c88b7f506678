"""(f) The README's main command, shrunk: a real `locoswarm-train -m algorithm=ddp,diloco` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from locoswarm.trainer import REQUIRED_SUMMARY_KEYS

REPO = Path(__file__).resolve().parents[1]
SHRINK = [
    "data=synthetic", "data.synthetic_tokens=60000", "data.chunk_tokens=1024", "model.n_layer=2",
    "model.d_model=32", "model.n_head=2", "model.seq_len=32", "train.batch_size=4", "train.max_steps=12",
    "train.eval_interval=6", "train.eval_batches=2", "train.log_interval=3", "algorithm.inner_steps=4",
    "algorithm.warmup_sync_steps=2", "train.progress=false",
]  # fmt: skip


def test_main_command_writes_the_run_dir_contract(tmp_path):
    sweep = tmp_path / "demo"
    exe = Path(sys.executable).with_name("locoswarm-train")
    cmd = [str(exe), "-m", "algorithm=ddp,diloco", f"hydra.sweep.dir={sweep}", *SHRINK]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    # the comparison table
    assert "val loss" in out.stdout and "MB sent/worker" in out.stdout
    assert "ddp" in out.stdout and "diloco" in out.stdout
    # and the sentence that says what the table means, from the same runs (tests/test_analysis.py checks its numbers)
    said = [line for line in out.stdout.splitlines() if line.startswith("diloco sent ")]
    assert len(said) == 1 and "fewer bytes per worker than ddp" in said[0] and "Douillard" in out.stdout
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [j["status"] for j in manifest["jobs"]] == ["ok", "ok"]
    summaries = {}
    for job in manifest["jobs"]:
        run_dir = sweep / job["run_dir"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert set(REQUIRED_SUMMARY_KEYS) <= summary.keys(), set(REQUIRED_SUMMARY_KEYS) - summary.keys()
        assert summary["status"] == "ok" and summary["final_val_loss"] > 0
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all({"step", "outer_step", "tokens", "loss"} <= r.keys() for r in rows)
        assert any("val_loss" in r for r in rows)
        sync = [r for r in rows if "bytes_sent" in r]
        assert sync and all({"bytes_received", "comm_seconds"} <= r.keys() for r in sync)
        # bytes in the rows add up to the summary's total (per worker)
        assert (
            abs(sum(r["bytes_sent"] for r in sync) - summary["bytes_sent_total"]) < 1e-6 * summary["bytes_sent_total"]
        )
        # every outer step logs what the outer optimiser did (the deep-dive notebook plots it); ddp has none
        outer_rows = [r for r in sync if "outer_update_norm" in r]
        assert len(outer_rows) == (3 if cfg["algorithm"]["name"] == "diloco" else 0), sync
        assert all(r["outer_update_norm"] > 0 and r["outer_momentum_norm"] > 0 for r in outer_rows), outer_rows
        summaries[cfg["algorithm"]["name"]] = summary
    ddp, diloco = summaries["ddp"], summaries["diloco"]
    # equal tokens; DiLoCo syncs 2 warm-up steps + ceil(10/4) = 3 outer rounds instead of 12
    assert ddp["tokens"] == diloco["tokens"] == 4 * 12 * 4 * 32
    assert ddp["outer_steps"] == 12 and diloco["outer_steps"] == 3
    assert diloco["bytes_sent_total"] == ddp["bytes_sent_total"] * 5 / 12
