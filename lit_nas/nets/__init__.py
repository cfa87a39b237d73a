"""Network registry: every network is built from an :class:`~lit_nas.arch.ArchSpec` by its ``kind``."""

from __future__ import annotations

from collections.abc import Callable

from lit_nas.nets.base import (
    ChannelGroup,
    ChannelSlice,
    DenseSource,
    ExitHead,
    ExitLogits,
    MultiExitNet,
)
from lit_nas.nets.resnet_sdn import ResNetSDN, WideResNetSDN

NETWORKS: dict[str, Callable[..., MultiExitNet]] = {
    "resnet_sdn": ResNetSDN,
    "wide_resnet": WideResNetSDN,
}


def build_net(spec) -> MultiExitNet:
    """Build the network described by ``spec`` (an :class:`~lit_nas.arch.ArchSpec`)."""
    if spec.kind not in NETWORKS:
        raise ValueError(f"unknown network kind {spec.kind!r}; valid choices: {sorted(NETWORKS)}")
    return NETWORKS[spec.kind](spec)


__all__ = [
    "NETWORKS",
    "ChannelGroup",
    "ChannelSlice",
    "DenseSource",
    "ExitHead",
    "ExitLogits",
    "MultiExitNet",
    "build_net",
]
