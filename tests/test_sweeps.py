"""Studies in conf/experiment/ compose and validate at every grid point; launchers compose; sweeps write their
manifest even when jobs fail, and re-running a sweep skips the runs that already finished."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from locoswarm.cli.train import CONF_DIR, to_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
# one config each: netem runs, and the demo (it sweeps algorithm on the command line)
SINGLE_RUN = {"netem_validation", "netem_overlap", "netem_swarm", "demo"}
EXE = str(Path(sys.executable).with_name("locoswarm-train"))
SHRINK = [
    "data.synthetic_tokens=60000", "data.chunk_tokens=1024", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
    "model.seq_len=32", "train.batch_size=4", "train.max_steps=8", "train.warmup_steps=2", "train.eval_interval=4",
    "train.eval_batches=2", "train.log_interval=4", "algorithm.warmup_sync_steps=2", "workers=2", "train.progress=false",
]  # fmt: skip


def compose_hydra(overrides: list[str], hydra: bool = True):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def grid(params: dict) -> list[list[str]]:
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*values)]


def test_the_five_studies_exist() -> None:
    assert {"outer_x_compression", "h_sweep", "workers_sweep", "iid_vs_noniid", "outer_lr_momentum"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_every_grid_point_validates(name: str) -> None:
    path = Path(CONF_DIR) / "experiment" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("# @package _global_") and "Hypothesis:" in text
    cfg = compose_hydra([f"experiment={name}"])
    params = dict(cfg.hydra.sweeper.params or {})
    if name in SINGLE_RUN:  # a named configuration for one run (e.g. locoswarm-netem's validation), not a grid
        assert not params and "Run" in text
        to_config(compose_hydra([f"experiment={name}"], hydra=False))  # composes and validates
        return
    assert params, f"{name}: no hydra.sweeper.params, so `-m experiment={name}` would not expand a grid"
    assert cfg.hydra.sweep.dir == f"multirun/{name}"  # a fixed folder: re-running the study skips finished runs
    points = grid(params)
    assert len(points) >= 2
    names = set()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for point in points:
            typed = to_config(compose(config_name="config", overrides=[f"experiment={name}", *point]))
            names.add(typed.name)
            for override in point:  # the grid value reached the typed config
                key, value = override.split("=", 1)
                obj = typed
                for part in key.split("."):
                    obj = getattr(obj, part)
                got = getattr(obj, "name", obj)
                got = getattr(got, "value", got)
                if isinstance(got, bool):
                    assert str(got).lower() == value, (override, got)
                else:
                    assert str(got) == value or float(got) == float(value), (override, got)
    assert len(names) == len(points), f"{name}: run names collide across the grid: {sorted(names)}"


@pytest.mark.parametrize("launcher,target", [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher: str, target: str) -> None:
    cfg = compose_hydra(["experiment=h_sweep", f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "parallel":
        assert cfg.hydra.launcher.n_jobs == 2
    else:
        assert cfg.hydra.launcher.gpus_per_node == 1 and "submitit" in cfg.hydra.launcher.submitit_folder


def run_sweep(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([EXE, "-m", *args], capture_output=True, text=True, timeout=400, cwd=REPO, env=env)


@pytest.mark.slow
def test_rerunning_a_sweep_trains_nothing(tmp_path: Path) -> None:
    sweep = tmp_path / "h_sweep"
    args = ["experiment=h_sweep", "algorithm.inner_steps=2,3", "data=synthetic", f"hydra.sweep.dir={sweep}", *SHRINK]
    first = run_sweep(args)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["counts"] == {"ok": 2, "failed": 0, "missing": 0}
    assert [j["reused"] for j in manifest["jobs"]] == [False, False]
    assert sorted(j["run_dir"].split("-")[1] for j in manifest["jobs"]) == ["H2", "H3"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("*/*.json*")}
    assert len(before) == 4  # summary.json + metrics.jsonl per run

    second = run_sweep(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("already finished") == 2
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("*/*.json*")}
    assert after == before  # nothing retrained, nothing rewritten
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [j["reused"] for j in manifest["jobs"]] == [True, True]
    assert "2 finished runs reused" in second.stdout


@pytest.mark.slow
def test_failed_jobs_do_not_stop_the_sweep_and_are_in_the_manifest(tmp_path: Path) -> None:
    """Through the joblib launcher: one job trains, one crashes in training, two fail validation."""
    sweep = tmp_path / "partly_failed"
    args = ["hydra/launcher=parallel", "data=synthetic,text", "data.path=/nonexistent/corpus.txt",
            "outer_optimizer.lr=0.7,-1", "name=${data.name}-lr${outer_optimizer.lr}", f"hydra.sweep.dir={sweep}", *SHRINK]  # fmt: skip
    out = run_sweep(args)
    assert out.returncode == 1, out.stderr[-3000:]  # the sweep finished but says that jobs failed
    assert "3 of 4 jobs did not finish" in out.stdout
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert manifest["counts"] == {"ok": 1, "failed": 3, "missing": 0}
    assert len({j["run_dir"] for j in manifest["jobs"]}) == 4
    for job in manifest["jobs"]:
        summary = json.loads((sweep / job["run_dir"] / "summary.json").read_text())
        assert summary["status"] == job["status"]
        if "data=synthetic" in job["overrides"] and "outer_optimizer.lr=0.7" in job["overrides"]:
            assert job["status"] == "ok" and summary["final_val_loss"] > 0
        elif "outer_optimizer.lr=-1" in job["overrides"]:
            assert job["status"] == "failed" and "outer_optimizer.lr=-1.0 is invalid" in job["error"]
        else:
            assert job["status"] == "failed" and "does not exist" in job["error"]
