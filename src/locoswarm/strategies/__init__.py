"""Synchronisation strategies: ``ddp`` (every step) and ``diloco`` (every H steps, outer optimiser)."""

from locoswarm.strategies.base import RoundReport, Strategy
from locoswarm.strategies.ddp import DDP
from locoswarm.strategies.diloco import DiLoCo

__all__ = ["DDP", "DiLoCo", "RoundReport", "Strategy"]
