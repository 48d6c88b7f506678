"""logger=wandb mirrors the run offline: no network, files under the run dir, same metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_config

from locoswarm.trainer import train


@pytest.mark.slow
def test_wandb_offline_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the config's logger.mode=offline must be what keeps it local
    monkeypatch.setenv("WANDB_API_KEY", "")
    cfg = tiny_config(logger__name="wandb")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "ok"
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb")), "wandb wrote no event file"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == cfg.train.max_steps
