"""The registry of network families: every network is built from an ArchSpec by its ``kind``."""

from __future__ import annotations

from collections.abc import Callable

from lit_nas.arch import ArchSpec
from lit_nas.nets.base import MultiExitNet
from lit_nas.nets.mobilenet import MnasNetSDN, MobileNetV1SDN, MobileNetV2SDN
from lit_nas.nets.resnet_sdn import ResNetSDN, WideResNetSDN

NETWORKS: dict[str, Callable[..., MultiExitNet]] = {
    "resnet_sdn": ResNetSDN,
    "wide_resnet": WideResNetSDN,
    "mobilenet_v1": MobileNetV1SDN,
    "mobilenet_v2": MobileNetV2SDN,
    "mnasnet": MnasNetSDN,
}


#: the cell kinds each family is made of: a spec whose cells disagree with its kind is refused (an edited
#: found_arch.yaml that says mobilenet_v2 over basic cells would build another network than it names)
CELL_OPS_OF = {
    "resnet_sdn": ("basic",),
    "wide_resnet": ("basic",),
    "mobilenet_v1": ("dwsep",),
    "mobilenet_v2": ("inverted",),
    "mnasnet": ("dwsep", "inverted"),
}


def build_net(spec: ArchSpec) -> MultiExitNet:
    """Build the network described by ``spec`` (an :class:`~lit_nas.arch.ArchSpec`)."""
    if spec.kind not in NETWORKS:
        raise ValueError(f"unknown network kind {spec.kind!r}; valid choices: {sorted(NETWORKS)}")
    foreign = sorted({c.op for c in spec.cells} - set(CELL_OPS_OF[spec.kind]))
    if foreign:
        raise ValueError(
            f"a {spec.kind} network is made of {list(CELL_OPS_OF[spec.kind])} cells; this spec has "
            f"{foreign} cells: set kind to the family its cells belong to"
        )
    net = NETWORKS[spec.kind](spec)
    net.add_gates(dict(spec.gated))  # the gates the spec names, so a checkpoint's gates load into them
    return net


def check_runs(spec) -> None:
    """Run the complete network once on a shape-only (meta) input; ``ValueError`` if it cannot run.

    ``ArchSpec.validate`` checks the recipe's rules; this catches any shape that still fails in forward
    (a pooling that does not fit, say) when the network is built, not in the first training step.
    """
    import torch

    full = spec.with_active_blocks(spec.num_blocks)
    try:
        with torch.device("meta"):
            build_net(full).eval()(torch.empty(2, spec.in_channels, spec.input_size, spec.input_size))
    except RuntimeError as err:
        raise ValueError(
            f"the {spec.kind} network cannot run on {spec.in_channels}x{spec.input_size}x{spec.input_size} "
            f"inputs: {err}"
        ) from err
