"""What a non-editable ``pip install`` ships: the package and conf/ (Hydra's config groups), so the console
scripts and experiments/ run without a checkout's source tree (locoswarm.cli.train.find_conf_dir)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def conf_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*") if p.is_file()}


def test_every_config_file_is_listed_in_the_wheels_data_files():
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    listed = {p.relative_to(ROOT).as_posix() for globs in data_files.values() for g in globs for p in ROOT.glob(g)}
    assert conf_files() - listed == set(), "add these folders to [tool.setuptools.data-files] in pyproject.toml"
    for target, globs in data_files.items():  # each lands in the matching folder under share/locoswarm
        assert all(target == "share/locoswarm/" + g.rsplit("/", 1)[0] for g in globs), (target, globs)


@pytest.mark.slow
def test_the_wheel_carries_conf_and_finds_it_without_a_checkout(tmp_path):
    source = tmp_path / "source"  # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "src", "conf"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, source / part)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("locoswarm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {n.split(".data/data/share/locoswarm/", 1)[1] for n in names if ".data/data/share/locoswarm/" in n}
    assert data == conf_files()
    assert "locoswarm/cli/train.py" in names
    # installed like that, conf/ is <prefix>/share/locoswarm/conf: found when no checkout sits above the package
    prefix = tmp_path / "prefix"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "unpacked")
    site = tmp_path / "unpacked"
    for n in data:
        target = prefix / "share" / "locoswarm" / n
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((site / next(m for m in names if m.endswith("share/locoswarm/" + n))).read_bytes())
    probe = (
        "import sys; sys.prefix = sys.argv[1]; sys.path.insert(0, sys.argv[2]);"
        "from locoswarm.cli.train import CONF_DIR; print(CONF_DIR)"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ""}
    found = subprocess.run([sys.executable, "-c", probe, str(prefix), str(site)], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    assert found.returncode == 0, found.stderr[-3000:]
    assert found.stdout.strip() == str(prefix / "share" / "locoswarm" / "conf")
