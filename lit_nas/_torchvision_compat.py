"""Make a CUDA-built torchvision importable next to a CPU-only torch.

The torchvision wheel on the package registry is linked against CUDA. Next to the CPU build of torch its
compiled extension does not load, so the operators ``torchvision::nms`` and ``torchvision::qnms`` are never
defined, and ``torchvision/_meta_registrations.py`` fails at import when it registers fake kernels for them.
torchmetrics imports torchvision, and lightning imports torchmetrics, so without this nothing starts.

We only *define the two schemas* (no kernels), which is what the meta registrations need. lit_nas never
calls these detection ops. The patch is applied only when the mismatch is detected (CPU torch, CUDA
torchvision, operators missing) and must run before the first ``import torchvision``; ``lit_nas/__init__``
imports this module first for that reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB: torch.library.Library | None = None  # kept alive: dropping it would undefine the schemas


def _op_exists(name: str) -> bool:
    return bool(torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"))


def _extension_loads() -> bool:
    """Try to load torchvision's compiled extension the way torchvision itself does."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to patch
    libs = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except OSError:  # e.g. libcudart.so.13 missing next to a CPU-only torch
        return False
    return True


def needs_patch() -> bool:
    """True when torchvision's operators are undefined because its extension cannot load."""
    if all(_op_exists(n) for n in _SCHEMAS):
        return False
    return not _extension_loads()


def apply() -> bool:
    """Define the missing schemas if needed. Returns whether it patched anything."""
    global _LIB
    if not needs_patch():
        return False
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not _op_exists(name):
            _LIB.define(schema)
    return True


apply()
