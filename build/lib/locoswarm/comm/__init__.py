"""Averaging backends behind one interface (``locoswarm.comm.base.Averager``)."""

from locoswarm.comm.base import Averager, Round

__all__ = ["Averager", "Round"]
