"""Ctrl+C on ``locoswarm-swarm``: every peer leaves, each records its status, nothing is left running."""

from __future__ import annotations

import json
import os
import signal

import pytest
from test_hivemind import TINY, swarms  # noqa: F401 - the fixture that starts swarms and proves no leftovers

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_ctrl_c_stops_every_peer_and_records_it(tmp_path, swarms):  # noqa: F811 - the imported fixture
    out = tmp_path / "swarm"
    swarm = swarms(["--peers", "3", "--out", str(out), *TINY, "workers=3", "train.max_steps=3000"])
    swarm.wait_for(r"round 2: looking for a group", limit=180)  # training, past a first averaging round
    os.killpg(swarm.proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C sends to the foreground group
    code = swarm.wait(limit=120)
    assert code == 130, "".join(swarm.lines[-40:])
    for i in range(3):
        summary = json.loads((out / f"peer-{i}" / "summary.json").read_text())
        assert summary["status"] == "failed" and "interrupted" in summary["error"], (i, summary)
        assert 0 < summary["steps"] < 3000
    assert not any("Traceback" in line for line in swarm.lines), "".join(swarm.lines[-60:])
    # the swarms fixture then asserts that no peer, DHT, averager or p2pd process survives
