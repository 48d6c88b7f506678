"""Synchronisation strategies: ``ddp`` (every step), ``diloco`` (every H steps, outer optimiser) and
``streaming_diloco`` (one fragment at a time, overlapped with training), ``noloco`` (gossip in random groups, no
all-reduce) and ``async_diloco`` (no barrier: each worker's update lands when it is done)."""

from locoswarm.strategies.async_diloco import AsyncDiLoCo
from locoswarm.strategies.async_peer import AsyncDiLoCoPeer
from locoswarm.strategies.base import RoundReport, Strategy
from locoswarm.strategies.ddp import DDP
from locoswarm.strategies.diloco import DiLoCo
from locoswarm.strategies.eager import EagerDiLoCo
from locoswarm.strategies.noloco import NoLoCo
from locoswarm.strategies.streaming import StreamingDiLoCo, fragment_indices

__all__ = [
    "DDP",
    "AsyncDiLoCo",
    "AsyncDiLoCoPeer",
    "DiLoCo",
    "EagerDiLoCo",
    "NoLoCo",
    "RoundReport",
    "Strategy",
    "StreamingDiLoCo",
    "fragment_indices",
]
