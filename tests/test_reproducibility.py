"""Same seed + same config => same numbers; a resumed run => exactly the numbers of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import final_params, tiny_config

from locoswarm.trainer import REQUIRED_SUMMARY_KEYS, train

# Measured wall-clock quantities legitimately differ between runs; everything else must not.
TIMING_KEYS = {"wall_seconds", "sim_seconds", "compute_utilisation", "tokens_per_second", "git_sha"}


def numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


def rows(run_dir) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if k not in TIMING_KEYS})
    return out


def cfg_under_test(**kw):
    # dropout exercises the per-worker RNG streams; the warm-up exercises the ddp->diloco switch
    return tiny_config(workers=3, model__dropout=0.1, algorithm__warmup_sync_steps=3, train__max_steps=15,
                       train__checkpoint_every=1, **kw)  # fmt: skip


def test_same_config_twice_gives_identical_numbers(tmp_path):
    a = train(cfg_under_test(), tmp_path / "a")
    b = train(cfg_under_test(), tmp_path / "b")
    assert a["status"] == "ok" and numbers(a) == numbers(b)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    c = train(cfg_under_test(seed=1), tmp_path / "c")
    assert c["final_val_loss"] != a["final_val_loss"]  # the seed matters


def test_resume_equals_uninterrupted(tmp_path):
    full = train(cfg_under_test(), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(cfg_under_test(), tmp_path / "cut", stop_after_step=9)
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert cut["status"] == "failed" and "interrupted" in cut["error"]
    resumed = train(cfg_under_test(resume=True), tmp_path / "cut")
    assert resumed["status"] == "ok"
    assert numbers(resumed) == numbers(full)
    assert rows(tmp_path / "cut") == rows(tmp_path / "full")
    for w in range(3):
        a, b = final_params(tmp_path / "full", w), final_params(tmp_path / "cut", w)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(tiny_config(resume=True), tmp_path / "nothing")


def test_resume_with_other_config_is_refused(tmp_path):
    train(tiny_config(train__checkpoint_every=1), tmp_path / "r")
    with pytest.raises(ValueError, match="different config"):
        train(tiny_config(train__checkpoint_every=1, resume=True, seed=5), tmp_path / "r")


def test_failed_run_records_status_and_error(tmp_path):
    cfg = tiny_config()
    cfg.data.name = "text"
    cfg.data.path = str(tmp_path / "does-not-exist.txt")
    with pytest.raises(Exception):  # noqa: B017 - whichever error the data layer raises, the summary says it
        train(cfg, tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "failed" and "does-not-exist" in s["error"]
    assert set(REQUIRED_SUMMARY_KEYS) <= s.keys()
