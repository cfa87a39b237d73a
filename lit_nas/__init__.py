"""lit_nas: grow, prune and export multi-exit (Shallow-Deep) CNNs with PyTorch Lightning."""

# Must run before anything imports torchvision (lightning -> torchmetrics -> torchvision).
from lit_nas import _torchvision_compat  # noqa: F401  isort: skip
from lit_nas.arch import ArchSpec, CellSpec, DataShape, NetConfig
from lit_nas.module import MultiExitModule
from lit_nas.nets import ExitLogits, build_net

__all__ = ["ArchSpec", "CellSpec", "DataShape", "ExitLogits", "MultiExitModule", "NetConfig", "build_net"]
