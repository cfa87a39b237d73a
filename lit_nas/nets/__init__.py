"""Network registry: every network is built from an :class:`~lit_nas.arch.ArchSpec` by its ``kind``."""

from __future__ import annotations

from lit_nas.nets.base import (
    ChannelGroup,
    ChannelSlice,
    DenseSource,
    ExitHead,
    ExitLogits,
    MultiExitNet,
)
from lit_nas.nets.recipe import NetConfig
from lit_nas.nets.registry import NETWORKS, build_net, check_runs

__all__ = [
    "NETWORKS",
    "ChannelGroup",
    "ChannelSlice",
    "DenseSource",
    "ExitHead",
    "ExitLogits",
    "MultiExitNet",
    "NetConfig",
    "build_net",
    "check_runs",
]
