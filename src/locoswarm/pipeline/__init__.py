"""SWARM-style pipelines: a model cut into stages, each served by a pool of peers (see ``group.py``)."""

from locoswarm.pipeline.group import PipelineGroup, PipelineNetwork
from locoswarm.pipeline.routing import Router
from locoswarm.pipeline.schedule import Call, simulate_step
from locoswarm.pipeline.stages import StageSpec, split_stages, stage_forward

__all__ = ["Call", "PipelineGroup", "PipelineNetwork", "Router", "StageSpec", "simulate_step", "split_stages",
           "stage_forward"]  # fmt: skip
