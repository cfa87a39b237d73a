"""lit_nas: grow, prune and export multi-exit (Shallow-Deep) CNNs with PyTorch Lightning."""

# Must run before anything imports torchvision (lightning -> torchmetrics -> torchvision).
from lit_nas import _torchvision_compat  # noqa: F401  isort: skip
from lit_nas.arch import ArchSpec, CellSpec, DataShape
from lit_nas.module import MultiExitModule
from lit_nas.nets import ExitLogits, build_net
from lit_nas.nets.recipe import NetConfig

__all__ = ["ArchSpec", "CellSpec", "DataShape", "ExitLogits", "MultiExitModule", "NetConfig", "build_net"]
