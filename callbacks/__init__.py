"""Lightning callbacks that change the network while it trains (growing, pruning, surgery, distillation).

Each callback lives in its own module, reaches the model only through ``lit_nas.protocol.NASModule`` and
imports ``lit_nas`` (never the other way round).
"""

import lit_nas  # noqa: F401  (first: makes torchvision importable next to a CPU torch)
from callbacks.device_bench import DeviceBench
from callbacks.distillation import Distillation
from callbacks.fisher import FisherPruning
from callbacks.garbage_collection import GarbageCollection
from callbacks.growing import Growing
from callbacks.retrain import RetrainFromScratch
from callbacks.snip import SnipPruning
from callbacks.switch_l1 import SwitchL1

__all__ = [
    "DeviceBench",
    "Distillation",
    "FisherPruning",
    "GarbageCollection",
    "Growing",
    "RetrainFromScratch",
    "SnipPruning",
    "SwitchL1",
]
