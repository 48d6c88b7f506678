"""RunLog: ``metrics.jsonl`` is the source of truth; ``summary.json`` closes the run; wandb is a mirror.

Rows are flushed as they are written, so a crash or Ctrl+C loses nothing already logged. On resume the
rows past the checkpoint are dropped so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from locoswarm.config import Config, LoggerName, to_dict


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def git_sha() -> str:
    """The commit of the locoswarm source that ran (``unknown`` outside a git checkout)."""
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _row_step(line: str) -> float:
    """A row's step; a line cut short by a kill -9 mid-write (not valid JSON) sorts after every step: dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class RunLog:
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if _row_step(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        self._f = open(self.path, "a")
        self._wandb = None
        if LoggerName(cfg.logger.name) == LoggerName.wandb:
            self._wandb = self._init_wandb(cfg)

    def _init_wandb(self, cfg: Config):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        return wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=cfg.logger.mode,
            dir=str(self.run_dir),
            name=cfg.name,
            config=to_dict(cfg),
            resume="allow" if cfg.resume else None,
            id=(self.run_dir.resolve().as_posix().replace("/", "_")[-60:] if cfg.resume else None),
        )

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _jsonable(v) for k, v in row.items()}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if v is not None}, step=row["step"])

    def write_summary(self, summary: dict[str, Any]) -> None:
        summary = {k: _jsonable(v) for k, v in summary.items()}
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if self._wandb is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self._wandb.summary[k] = v

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
