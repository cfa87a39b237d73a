"""Export a trained lit_nas network to TensorFlow Lite: one model per exit plus the full multi-exit model.

The network is first turned into its inference form (channel gates folded into the BatchNorms, weight masks
applied). Its ArchSpec and the shapes ``lit_nas.arch`` derives from it form the *export plan*; the plan,
the weights (numpy) and calibration images go into a bundle directory, and
:mod:`device_bench.tf_export` builds the Keras mirror (:mod:`device_bench.keras_mirror`) and converts it in
the TensorFlow environment, a separate Python (``make export-env``): TensorFlow pins protobuf and numpy
versions the training stack cannot use, and tflite-runtime must not share a process with it either.

Each model takes one normalised NHWC float32 image named ``image`` and returns float32 logits named
``exit<b>`` (read them by name: :mod:`device_bench.bench_tflite`). ``int8`` models are full-integer
post-training quantized with float32 input and output.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_nas.arch import ArchSpec
from lit_nas.gates import fold_gates
from lit_nas.masks import MASK_SUFFIX, apply_masks, masked_pairs
from lit_nas.nets import ExitHead, MultiExitNet
from lit_nas.paths import REPO_ROOT

PRECISIONS = ("fp32", "int8")
EXPORT_PYTHON_ENV = "LIT_NAS_EXPORT_PYTHON"


class ExportError(RuntimeError):
    """The TensorFlow side could not be run or failed; the message says why and how to fix it."""


@dataclass(frozen=True)
class ExportedModel:
    """One ``.tflite`` file.

    Attributes:
        name: ``<model>_<precision>``, e.g. ``exit0_fp32`` or ``full_int8``.
        model: ``exit<b>`` (the network up to exit ``b``) or ``full`` (every exit).
        precision: ``fp32`` or ``int8``.
        outputs: names of its outputs (``exit<b>``), in depth order.
        path: the file.
        bytes: its size.
    """

    name: str
    model: str
    precision: str
    outputs: tuple[str, ...]
    path: Path
    bytes: int


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_tflite` wrote: the bundle directory, the models, the TensorFlow version."""

    directory: Path
    models: tuple[ExportedModel, ...]
    tensorflow: str

    def by_name(self) -> dict[str, ExportedModel]:
        """Models keyed by name."""
        return {m.name: m for m in self.models}


def find_export_python() -> str | None:
    """The Python of the TensorFlow environment: ``$LIT_NAS_EXPORT_PYTHON``, else ``.venv-export``."""
    env = os.environ.get(EXPORT_PYTHON_ENV)
    if env:
        return env
    local = REPO_ROOT / ".venv-export" / "bin" / "python"
    return str(local) if local.exists() else None


def inference_net(net: MultiExitNet) -> MultiExitNet:
    """A copy of ``net`` in eval mode with gates folded into its BatchNorms and masked weights zeroed."""
    net = copy.deepcopy(net).cpu().float().eval()
    apply_masks(masked_pairs(net))
    fold_gates(net)
    return net


def export_plan(net: MultiExitNet) -> dict[str, Any]:
    """The ArchSpec of ``net`` and the shapes the Keras mirror needs, as JSON-able data."""
    spec: ArchSpec = net.spec
    exits = {}
    for key, head in net.exits.items():
        if not isinstance(head, ExitHead):
            raise ExportError(
                f"exit {key} is a {type(head).__name__}; the mirror knows lit_nas ExitHead only"
            )
        if int(key) >= spec.active_blocks:
            continue
        exits[key] = {
            "kernel": head.kernel,
            "out_size": head.out_size,
            "mixed": head.mixed,
            "channels": head.linear.in_features // head.out_size**2,
        }
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    return {
        "spec": spec.to_dict(),
        "input_shape": [spec.input_size, spec.input_size, spec.in_channels],
        "feature_sizes": spec.feature_sizes(),
        "blocks": [list(spec.cells_of_block(b)) for b in range(spec.num_blocks)],
        "exits": exits,
        "bn_eps": norms[0].eps if norms else 1e-5,
    }


def export_weights(net: MultiExitNet) -> dict[str, np.ndarray]:
    """Float tensors of ``net``'s state dict as numpy arrays (masks and counters left out)."""
    return {
        k: v.detach().cpu().numpy()
        for k, v in net.state_dict().items()
        if v.is_floating_point() and not k.endswith(MASK_SUFFIX)
    }


def write_bundle(
    net: MultiExitNet,
    out_dir: str | Path,
    calib: Tensor | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    per_exit: bool = True,
) -> Path:
    """Write the export bundle of ``net`` (plan, weights, calibration images) into ``out_dir``.

    Args:
        net: the trained network; it is copied, not modified.
        out_dir: bundle directory.
        calib: normalised NCHW training images for int8 calibration (about 100-500 are enough).
        precisions: any of ``fp32`` and ``int8``.
        per_exit: also export the network up to each exit (``exit<b>``), not only ``full``.

    Raises:
        ValueError: unknown precision, or int8 without calibration images.
    """
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"precisions {list(precisions)!r} invalid; valid choices: {list(PRECISIONS)}")
    if "int8" in precisions and (calib is None or len(calib) == 0):
        raise ValueError("int8 export needs calibration images (calib): normalised training images")
    net = inference_net(net)
    plan = export_plan(net)
    names = [f"exit{b}" for b in net.spec.exit_blocks()]
    models = {n: [n] for n in names} if per_exit else {}
    if len(names) > 1 or not per_exit:
        models["full"] = names
    plan.update(models=models, precisions=list(precisions))
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "plan.json").write_text(json.dumps(plan, indent=1))
    np.savez(root / "weights.npz", **export_weights(net))
    if calib is not None:
        np.save(root / "calib.npy", nhwc(calib))
    return root


def run_tf_side(bundles: list[Path], python: str | None = None, timeout_s: float = 1800.0) -> None:
    """Convert the ``bundles`` in one TensorFlow process (:mod:`device_bench.tf_export`).

    Raises:
        ExportError: no TensorFlow environment, or the conversion failed (its output is in the message).
    """
    python = python or find_export_python()
    if python is None:
        raise ExportError(
            "no TensorFlow environment for the export: run `make export-env` (creates .venv-export) or set "
            f"{EXPORT_PYTHON_ENV} to a Python with tensorflow-cpu (device_bench/requirements-export.txt)"
        )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    try:
        proc = subprocess.run(
            [python, "-m", "device_bench.tf_export", *map(str, bundles)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ExportError(f"TFLite conversion with {python} failed: {err}") from err
    if proc.returncode != 0:
        raise ExportError(
            f"TFLite conversion with {python} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )


def export_tflite(
    net: MultiExitNet,
    out_dir: str | Path,
    calib: Tensor | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    per_exit: bool = True,
    python: str | None = None,
    timeout_s: float = 1800.0,
) -> ExportResult:
    """Export ``net`` (its active blocks) to ``.tflite`` files under ``out_dir/tflite``.

    Args:
        net: the trained network; it is copied, not modified.
        out_dir: bundle directory (plan, weights, calibration images, and ``tflite/`` with the models).
        calib: normalised NCHW training images for int8 calibration (about 100-500 are enough).
        precisions: any of ``fp32`` and ``int8``.
        per_exit: also export the network up to each exit (``exit<b>``), not only ``full``.
        python: interpreter with TensorFlow; default :func:`find_export_python`.
        timeout_s: limit of the conversion subprocess.

    Raises:
        ValueError: unknown precision, or int8 without calibration images.
        ExportError: no TensorFlow environment, or the conversion failed.
    """
    root = write_bundle(net, out_dir, calib, precisions, per_exit)
    run_tf_side([root], python, timeout_s)
    return load_manifest(root)


def load_manifest(out_dir: str | Path) -> ExportResult:
    """Read the models an earlier :func:`export_tflite` wrote into ``out_dir``."""
    tflite = Path(out_dir) / "tflite"
    info = json.loads((tflite / "manifest.json").read_text())
    models = tuple(
        ExportedModel(
            m["name"], m["model"], m["precision"], tuple(m["outputs"]), tflite / m["file"], m["bytes"]
        )
        for m in info["models"]
    )
    return ExportResult(Path(out_dir), models, info["tensorflow"])


@torch.no_grad()
def torch_outputs(net: MultiExitNet, images: Tensor) -> dict[str, np.ndarray]:
    """Reference logits ``{"exit<b>": (N, classes)}`` of the inference form of ``net`` on NCHW ``images``."""
    net = inference_net(net)
    out = net(images.float())
    return {f"exit{b}": lg.numpy() for b, lg in out.items()}


def nhwc(images: Tensor) -> np.ndarray:
    """NCHW torch images as the NHWC float32 array the TFLite models take."""
    return images.detach().cpu().float().permute(0, 2, 3, 1).contiguous().numpy()
