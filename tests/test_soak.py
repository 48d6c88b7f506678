"""benchmarks/soak_swarm.py for ~2 minutes: a real 4-peer hivemind swarm under churn (SIGKILLed honest peers,
replacements joining with ``locoswarm-swarm join``) with one NaN-sending peer and aggregator=median.

Asserts what the soak reports in soak.json (never wall-clock times): peers were killed and at least one replacement
loaded the swarm's state; every honest peer that survived finished with status ok and a finite loss; the malicious
rank was excluded (median all-gathers the rows, so a NaN row is always screened out and logged); no honest rank was
excluded; the honest final val loss is near the clean (sim, no attacker, no churn) run's; nothing was left running.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.network, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_swarm.py"
# A bound on the whole soak, not a measurement: up to 2 minutes of churn, the finish (bounded by --finish-timeout 90,
# then SIGINT and up to 75 s), the clean sim reference (~10 s). Typically 2-3 minutes.
HARD_LIMIT = 420.0
# |honest val loss - clean val loss|. Measured on a busy 2-core box: budgets of 95-230 rounds, the honest survivors
# ended 0.02-0.13 from the clean run (1.40-1.97). Nearly all of it is the attacker's share, not churn's: the median of
# the 3 honest rows is noisier than the median of all 4 (the sim with the attacker and no churn ends 0.11 above clean
# at 230 rounds; the soak ended 0.014 above that). Bigger budgets widen it. An attack that got through ends
# non-finite (caught above) or far off (an untrained model is ~4.1). 0.3 is about 2x the largest measured gap.
LOSS_BOUND = 0.3


def test_soak_two_minutes(tmp_path):
    out = tmp_path / "soak"
    # A fixed budget of 150 rounds (no calibration run: ~45-100 s of rounds here, longer on a slower box), churn for
    # up to 2 minutes of it: a kill 8-15 s after the swarm is whole, none once ~30 s of rounds are left.
    cmd = [sys.executable, str(SCRIPT), "--minutes", "2", "--rounds", "150", "--attack", "nan", "--seed", "1",
           "--out", str(out), "--kill-interval", "8", "15", "--rejoin-delay", "3", "--tail-seconds", "30",
           "--finish-timeout", "90", "--heartbeat", "20", "--references", "clean"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=HARD_LIMIT)
    except subprocess.TimeoutExpired:
        # SIGTERM: the soak kills every session it started on its way out; then its own group, to be sure.
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the soak ran past {HARD_LIMIT:.0f}s; tail:\n{log[-6000:]}")
    (tmp_path / "soak.log").write_text(log)
    print(log[-4000:])
    assert (out / "soak.json").exists(), f"no report (exit {proc.returncode}); tail:\n{log[-6000:]}"
    r = json.loads((out / "soak.json").read_text())
    tail = log[-6000:]

    assert r["leftovers"] == [], tail  # every peer, DHT and p2pd process was gone before the final sweep
    assert r["stopped"] == "natural", tail  # every peer reached the step budget on its own
    assert r["kills"] >= 1, tail
    assert r["rejoins_ok"] >= 1, tail  # a replacement downloaded the swarm's state
    assert r["honest_survivors"], tail
    assert r["honest_bad"] == [], tail  # every honest survivor: status ok, finite losses
    for p in r["peers"]:
        if p["survivor"]:
            assert p["status"] == "ok" and math.isfinite(p["final_val_loss"]), p
    # The malicious rank's NaN rows were screened out; no honest rank's ever was.
    assert r["malicious_excluded"] >= 1, r["exclusions_by_rank"]
    assert r["honest_excluded"] == 0, r["exclusions_by_rank"]
    assert set(r["exclusions_by_reason"]) == {"non-finite values"}, r["exclusions_by_reason"]
    clean = r["clean"]["final_val_loss"]
    assert r["clean"]["status"] == "ok" and math.isfinite(clean), r["clean"]
    assert r["honest_max_abs_delta_vs_clean"] < LOSS_BOUND, (r["honest_max_abs_delta_vs_clean"], clean, tail)
