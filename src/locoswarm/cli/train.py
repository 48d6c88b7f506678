"""``locoswarm-train``: the Hydra entry point. Composes conf/, validates, hands typed config to ``train``.

locoswarm-train algorithm=diloco workers=4 algorithm.inner_steps=50 compression=int8 train.max_steps=200
locoswarm-train -m algorithm=ddp,diloco          # a sweep; prints a comparison table at the end
locoswarm-train -m experiment=h_sweep            # a study from conf/experiment/; re-running skips finished runs
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from locoswarm.config import Config, config_hash, validate
from locoswarm.sweep import finished_summary, in_multirun, record_failure


def find_conf_dir() -> str:
    """Hydra's config directory: ``$LOCOSWARM_CONF``, else the checkout's ``conf/`` (a source or editable install),
    else the copy a wheel installs under ``<prefix>/share/locoswarm/conf`` (pyproject's data-files)."""
    if os.environ.get("LOCOSWARM_CONF"):
        return os.environ["LOCOSWARM_CONF"]
    candidates = [Path(__file__).resolve().parents[3] / "conf", Path(sys.prefix) / "share" / "locoswarm" / "conf"]
    for path in candidates:
        if (path / "config.yaml").is_file():
            return str(path)
    raise FileNotFoundError(
        "locoswarm: no config directory (conf/config.yaml) in " + " or ".join(map(str, candidates))
        + "; set LOCOSWARM_CONF to the conf/ folder of a locoswarm checkout"
    )  # fmt: skip


CONF_DIR = find_conf_dir()

ConfigStore.instance().store(name="base_config", node=Config)
log = logging.getLogger("locoswarm")


def to_config(cfg: DictConfig) -> Config:
    """The composed DictConfig as typed dataclasses, validated (ValueError names the bad key)."""
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, Config)
    return validate(typed)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from locoswarm.trainer import train

    try:
        config = to_config(cfg)
    except ValueError as e:
        print(f"locoswarm-train: error: {e}", file=sys.stderr)
        if in_multirun():  # one bad grid point must not stop the sweep: record it and go on
            record_failure(HydraConfig.get().runtime.output_dir, f"ValueError: {e}", cfg)
            return None
        raise SystemExit(2) from None
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if in_multirun() and (done := finished_summary(run_dir, config_hash(config))) is not None:
        log.info("%s already finished (status ok, same config_hash) in %s: skipped", config.name, run_dir)
        return done["final_val_loss"]
    ranks, averager = None, None
    if config.backend.name == "torch":
        # Under torchrun: this process is one rank and hosts worker RANK (see comm/torch_dist.py).
        from locoswarm.comm.torch_dist import TorchDistAverager

        try:
            averager = TorchDistAverager(config, aggregator=config.aggregator)
        except ValueError as e:
            print(f"locoswarm-train: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        ranks, run_dir = [averager.rank], averager.run_dir_for(run_dir)
    try:
        summary = train(config, run_dir, ranks=ranks, averager=averager)
    except KeyboardInterrupt:
        # The trainer already wrote summary.json (status failed, "interrupted"); leave without a stack trace.
        print(f"\nlocoswarm-train: interrupted; run dir {run_dir} (resume=true continues from its checkpoint)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(130) from None
    except Exception as e:
        if not in_multirun():
            raise
        # train() already wrote summary.json with status=failed; the sweep's manifest reports it.
        log.exception("%s failed (%s: %s); the sweep goes on", config.name, type(e).__name__, e)
        return None
    log.info(
        "%s done: val_loss=%.4f tokens=%.3g bytes_sent=%.3g wall=%.1fs -> %s",
        config.name,
        summary["final_val_loss"],
        summary["tokens"],
        summary["bytes_sent_total"],
        summary["wall_seconds"],
        run_dir,
    )
    return summary["final_val_loss"]


if __name__ == "__main__":
    main()
