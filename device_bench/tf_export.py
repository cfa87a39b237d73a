"""Convert an export bundle to ``.tflite`` files (runs in the TensorFlow environment, never imports torch).

``python -m device_bench.tf_export BUNDLE...`` reads ``BUNDLE/plan.json``, ``BUNDLE/weights.npz`` and, for
int8, ``BUNDLE/calib.npy`` (NHWC float32 training images), then writes one model per requested subset of exits
(``plan["models"]``: name -> output names) and precision into ``BUNDLE/tflite/`` and lists them in
``BUNDLE/tflite/manifest.json``. :func:`device_bench.export.export_tflite` is the caller. A plan with
``layers`` instead asks for the one-layer models of a latency look-up table (:mod:`device_bench.lut`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's INFO chatter on every conversion

import numpy as np
import tensorflow as tf

from device_bench.keras_mirror import build_layer, build_mirror


def convert(model: tf.keras.Model, precision: str, calib: np.ndarray | None) -> bytes:
    """Convert ``model`` to TFLite: ``fp32``, or ``int8`` (full-integer post-training quantization).

    int8 quantizes weights per channel and activations per tensor, calibrated on ``calib`` one image at a
    time (the models take batch 1); inputs and outputs stay float32 so every model is fed the same way.
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if precision == "int8":
        if calib is None or not len(calib):
            raise ValueError("int8 conversion needs calibration images (calib.npy)")

        def representative():
            for img in calib:
                yield [img[None].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; valid choices: ['fp32', 'int8']")
    return converter.convert()


def convert_layers(root: Path, plan: dict) -> None:
    """Write one float32 model per look-up-table layer (``plan["layers"]``: ``{name: layer config}``)."""
    out_dir = root / "tflite"
    out_dir.mkdir(exist_ok=True)
    manifest = []
    for i, (name, cfg) in enumerate(plan["layers"].items()):
        path = out_dir / f"{name}.tflite"
        path.write_bytes(convert(build_layer(cfg, seed=i), "fp32", None))
        manifest.append(
            {
                "name": name,
                "model": name,
                "precision": "fp32",
                "outputs": ["out"],
                "file": path.name,
                "bytes": path.stat().st_size,
            }
        )
    (out_dir / "manifest.json").write_text(json.dumps({"tensorflow": tf.__version__, "models": manifest}))


def main(bundle: str) -> None:
    """Convert every model of the bundle's plan at every requested precision."""
    root = Path(bundle)
    plan = json.loads((root / "plan.json").read_text())
    if "layers" in plan:
        convert_layers(root, plan)
        return
    with np.load(root / "weights.npz") as f:
        weights = {k: f[k] for k in f.files}
    calib = np.load(root / "calib.npy") if "int8" in plan["precisions"] else None
    image, outputs = build_mirror(plan, weights)
    out_dir = root / "tflite"
    out_dir.mkdir(exist_ok=True)
    manifest = []
    for name, wanted in plan["models"].items():
        model = tf.keras.Model(image, {o: outputs[o] for o in wanted}, name=name)
        for precision in plan["precisions"]:
            path = out_dir / f"{name}_{precision}.tflite"
            path.write_bytes(convert(model, precision, calib))
            manifest.append(
                {
                    "name": f"{name}_{precision}",
                    "model": name,
                    "precision": precision,
                    "outputs": list(wanted),
                    "file": path.name,
                    "bytes": path.stat().st_size,
                }
            )
    info = {"tensorflow": tf.__version__, "models": manifest}
    (out_dir / "manifest.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m device_bench.tf_export BUNDLE_DIR [BUNDLE_DIR ...]")
    for arg in sys.argv[1:]:  # one TensorFlow start-up for many bundles
        main(arg)
