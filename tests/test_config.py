"""(e) Every option of every conf group composes and validates; every bad value fails with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, MissingMandatoryValue, ValidationError

from locoswarm.cli.train import CONF_DIR, to_config
from locoswarm.config import NOT_YET_AVAILABLE, Config, validate

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))
# Options that need a value the user must supply.
REQUIRED_EXTRA = {("data", "text"): ["data.path=README.md"], ("data", "hf"): ["data.path=some.jsonl"]}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def all_options():
    for group in GROUPS:
        for f in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_option_composes_and_validates(group, option):
    cfg = compose_cfg([f"{group}={option}", *REQUIRED_EXTRA.get((group, option), [])])
    if (group, option) in NOT_YET_AVAILABLE:
        with pytest.raises(ValueError, match="not yet available"):
            to_config(cfg)
        return
    typed = to_config(cfg)
    assert isinstance(typed, Config)
    assert str(getattr(typed, group).name) == option


def test_public_override_keys_from_design():
    typed = to_config(compose_cfg([
        "algorithm=diloco", "algorithm.inner_steps=50", "workers=4", "outer_optimizer=nesterov",
        "outer_optimizer.lr=0.5", "inner_optimizer=adamw", "compression=topk", "compression.ratio=0.05",
        "model=tiny", "data=synthetic", "train.max_steps=200", "seed=3", "backend=sim", "network=wan_100mbit",
        "logger=none",
    ]))  # fmt: skip
    assert typed.algorithm.inner_steps == 50 and typed.workers == 4 and typed.outer_optimizer.lr == 0.5
    assert typed.compression.ratio == 0.05 and typed.train.max_steps == 200 and typed.seed == 3
    assert typed.network.bandwidth_mbps == 100 and typed.network.latency_ms == 50


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("algorithm.inner_steps=0", "algorithm.inner_steps", ">= 1"),
        ("workers=0", "workers", ">= 1"),
        ("compression.ratio=0", "compression.ratio", "(0, 1]"),
        ("compression.ratio=1.5", "compression.ratio", "(0, 1]"),
        ("outer_optimizer.lr=0", "outer_optimizer.lr", "> 0"),
        ("outer_optimizer.lr=-1", "outer_optimizer.lr", "> 0"),
        ("inner_optimizer.lr=0", "inner_optimizer.lr", "> 0"),
        ("train.max_steps=0", "train.max_steps", ">= 1"),
        ("model.n_head=5", "model.d_model", "divisible"),
        ("logger.mode=sometimes", "logger.mode", "offline"),
    ],
)
def test_bad_values_name_the_key(override, key, allowed):
    with pytest.raises(ValueError) as e:
        to_config(compose_cfg([override]))
    assert key in str(e.value) and allowed in str(e.value)


def test_unknown_option_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["outer_optimizer=lion"])
    msg = str(e.value)
    assert "outer_optimizer/lion" in msg and "nesterov" in msg and "adam" in msg


def test_bad_enum_value_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["data.split=clustered"])
    msg = f"{e.value} {e.value.__cause__}"
    assert isinstance(e.value.__cause__, ValidationError)
    assert "data.split" in msg and "non_iid" in msg and "clustered" in msg


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["train.max_stpes=5"])
    assert "max_stpes" in str(e.value) or isinstance(e.value.__cause__, ConfigAttributeError)


def test_missing_required_field_names_it():
    cfg = compose_cfg(["data=text"])
    with pytest.raises((MissingMandatoryValue, ValueError)) as e:
        to_config(cfg)
    assert "data.path" in str(e.value)


def test_validate_without_hydra():
    cfg = Config()
    cfg.workers = -1
    with pytest.raises(ValueError, match="workers"):
        validate(cfg)
