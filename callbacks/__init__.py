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
from callbacks.last_checkpoint import LastCheckpoint
from callbacks.morphnet import MorphNet
from callbacks.netadapt import NetAdapt
from callbacks.publish import PublishBest
from callbacks.retrain import RetrainFromScratch
from callbacks.run_summary import RunSummary
from callbacks.snip import SnipPruning
from callbacks.switch_l1 import SwitchL1

#: The command-line key of every lit_nas callback, in the order they run: ``--snip.keep_ratio 0.5`` tunes
#: one, ``--device_bench null`` switches it off, ``--snip '{keep_ratio: 0.5}'`` switches it on.
NAMED_CALLBACKS = {
    "growing": Growing,
    "snip": SnipPruning,
    "fisher": FisherPruning,
    "switch_l1": SwitchL1,
    "netadapt": NetAdapt,
    "morphnet": MorphNet,
    "gc": GarbageCollection,
    "retrain": RetrainFromScratch,
    "distillation": Distillation,
    "device_bench": DeviceBench,
    "publish": PublishBest,
}

__all__ = [
    "NAMED_CALLBACKS",
    "DeviceBench",
    "Distillation",
    "FisherPruning",
    "GarbageCollection",
    "Growing",
    "LastCheckpoint",
    "MorphNet",
    "NetAdapt",
    "PublishBest",
    "RetrainFromScratch",
    "RunSummary",
    "SnipPruning",
    "SwitchL1",
]
