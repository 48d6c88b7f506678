"""The notebooks execute end to end (papermill, a real kernel) on the committed fixture sweep.

The fixture (tests/fixtures/sweep/) is a real `locoswarm-train -m` sweep on a tiny model; regenerate it with
``LOCOSWARM_REGEN_FIXTURES=1 pytest tests/test_notebooks.py`` or ``python tests/fixtures/make_sweep.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIXTURE = REPO / "tests" / "fixtures" / "sweep"


@pytest.fixture(scope="session")
def sweep_fixture() -> Path:
    if os.environ.get("LOCOSWARM_REGEN_FIXTURES") == "1":
        subprocess.run([sys.executable, str(FIXTURE.parent / "make_sweep.py")], check=True, cwd=REPO)
    return FIXTURE


def test_fixture_sweep_is_small_real_and_complete(sweep_fixture: Path) -> None:
    size = sum(p.stat().st_size for p in sweep_fixture.rglob("*") if p.is_file())
    assert size < 1_000_000, f"fixture sweep is {size} bytes; keep it under 1 MB"
    manifest = json.loads((sweep_fixture / "sweep.json").read_text())
    assert len(manifest["jobs"]) == 7 and {j["status"] for j in manifest["jobs"]} == {"ok"}
    for job in manifest["jobs"]:
        run = sweep_fixture / job["run_dir"]
        assert (run / ".hydra" / "config.yaml").exists() and (run / "metrics.jsonl").stat().st_size > 0


def test_notebooks_are_committed_without_outputs() -> None:
    assert len(NOTEBOOKS) >= 2
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs: clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_on_the_fixture_sweep(path: Path, sweep_fixture: Path, tmp_path: Path) -> None:
    import papermill

    out = tmp_path / path.name
    papermill.execute_notebook(str(path), str(out), parameters={"runs_root": str(sweep_fixture)}, kernel_name="python3",
                               cwd=str(path.parent), progress_bar=False, execution_timeout=300)  # fmt: skip
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, f"{path.name} drew {len(images)} figures"
