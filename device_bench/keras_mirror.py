"""The Keras mirror of a lit_nas network, built from its export plan (runs in the TensorFlow environment).

This module imports TensorFlow and numpy only, never torch or ``lit_nas``: TensorFlow lives in its own
virtual environment (``make export-env``) because its pinned protobuf/numpy clash with the training stack.
The torch side (:mod:`device_bench.export`) writes the *plan*, the ArchSpec plus the shapes derived from it by
``lit_nas.arch``, and the network's weights with gates folded and masks applied; this module rebuilds the
same computation layer by layer:

- tensors are NHWC, so conv kernels go ``(O, I, kh, kw) -> (kh, kw, I, O)`` and a linear layer reading a
  flattened ``(C, s, s)`` map has its columns permuted to the NHWC flattening order ``(s, s, C)``;
- a 3x3 conv at stride 2 gets an explicit 1-pixel zero padding and ``valid`` convolution: TensorFlow's
  ``same`` pads only bottom/right on even inputs where PyTorch pads all four sides;
- BatchNorm keeps its running statistics and PyTorch's epsilon (the converter folds it into the conv).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

keras = tf.keras


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)


class _Builder:
    """Creates Keras layers named after the PyTorch modules they mirror and loads their weights."""

    def __init__(self, weights: dict[str, np.ndarray], eps: float) -> None:
        self.w = weights
        self.eps = eps

    def conv(self, x: Any, name: str, stride: int = 1, bias: bool = False) -> Any:
        w = self.w[f"{name}.weight"]
        k = w.shape[-1]
        padding = "valid"
        if k > 1 and stride == 1:
            padding = "same"  # identical to PyTorch's symmetric padding at stride 1
        elif k > 1:
            x = keras.layers.ZeroPadding2D(k // 2, name=f"{name}.pad")(x)
        layer = keras.layers.Conv2D(w.shape[0], k, strides=stride, padding=padding, use_bias=bias, name=name)
        y = layer(x)
        layer.set_weights([_conv_kernel(w)] + ([self.w[f"{name}.bias"]] if bias else []))
        return y

    def bn(self, x: Any, name: str) -> Any:
        layer = keras.layers.BatchNormalization(epsilon=self.eps, name=name)
        y = layer(x, training=False)
        layer.set_weights([self.w[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")])
        return y

    def depthwise(self, x: Any, name: str, stride: int = 1) -> Any:
        w = self.w[f"{name}.weight"]  # (C, 1, kh, kw)
        k = w.shape[-1]
        padding = "same"
        if stride > 1:
            x = keras.layers.ZeroPadding2D(k // 2, name=f"{name}.pad")(x)
            padding = "valid"
        layer = keras.layers.DepthwiseConv2D(k, strides=stride, padding=padding, use_bias=False, name=name)
        y = layer(x)
        layer.set_weights([np.transpose(w, (2, 3, 0, 1))])  # -> (kh, kw, C, 1)
        return y

    def relu(self, x: Any, name: str, act: str = "relu") -> Any:
        return keras.layers.ReLU(max_value=6.0 if act == "relu6" else None, name=name)(x)

    def stem(self, x: Any, name: str, act: str = "relu") -> Any:
        return self.relu(self.bn(self.conv(x, f"{name}.conv"), f"{name}.bn"), f"{name}.relu", act)

    def squeeze_excite(self, x: Any, name: str) -> Any:
        s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}.pool")(x)
        s = self.relu(self.conv(s, f"{name}.fc1", bias=True), f"{name}.relu")
        s = keras.layers.Activation("sigmoid", name=f"{name}.sigmoid")(self.conv(s, f"{name}.fc2", bias=True))
        return keras.layers.Multiply(name=f"{name}.scale")([x, s])

    def cell(self, x: Any, residual: Any, name: str, cell: dict[str, Any]) -> Any:
        out = self.relu(
            self.bn(self.conv(x, f"{name}.conv1", cell["stride"]), f"{name}.bn1"), f"{name}.relu1"
        )
        out = self.bn(self.conv(out, f"{name}.conv2"), f"{name}.bn2")
        if cell.get("se", 0):
            out = self.squeeze_excite(out, f"{name}.se")
        short = residual
        if cell["projection"]:
            short = self.bn(self.conv(residual, f"{name}.shortcut.0", cell["stride"]), f"{name}.shortcut.1")
        return self.relu(keras.layers.Add(name=f"{name}.add")([out, short]), f"{name}.relu2")

    def dwsep_cell(self, x: Any, name: str, cell: dict[str, Any], act: str) -> Any:
        out = self.relu(
            self.bn(self.depthwise(x, f"{name}.dw", cell["stride"]), f"{name}.bn1"), f"{name}.act1", act
        )
        out = self.relu(self.bn(self.conv(out, f"{name}.pw"), f"{name}.bn2"), f"{name}.act2", act)
        return self.squeeze_excite(out, f"{name}.se") if cell.get("se", 0) else out

    def inverted_cell(self, x: Any, name: str, cell: dict[str, Any], act: str) -> Any:
        out = self.relu(self.bn(self.conv(x, f"{name}.expand"), f"{name}.bn1"), f"{name}.act1", act)
        out = self.relu(
            self.bn(self.depthwise(out, f"{name}.dw", cell["stride"]), f"{name}.bn2"), f"{name}.act2", act
        )
        out = self.bn(self.conv(out, f"{name}.project"), f"{name}.bn3")
        if cell.get("se", 0):
            out = self.squeeze_excite(out, f"{name}.se")
        return keras.layers.Add(name=f"{name}.add")([out, x]) if cell["residual"] else out

    def any_cell(self, x: Any, residual: Any, name: str, cell: dict[str, Any], act: str) -> Any:
        op = cell.get("op", "basic")
        if op == "dwsep":
            return self.dwsep_cell(x, name, cell, act)
        if op == "inverted":
            return self.inverted_cell(x, name, cell, act)
        return self.cell(x, residual, name, cell)

    def dense_input(self, feats: list[Any], sizes: list[int], name: str, reads: list[int] | None) -> Any:
        # a cell concatenates only the sources it still reads (CellSpec.reads; None: every earlier one)
        size = sizes[len(feats) - 1]
        pooled = []
        for j, f in enumerate(feats):
            if reads is not None and j not in reads:
                continue
            k = sizes[j] // size
            pooled.append(f if k == 1 else keras.layers.AveragePooling2D(k, name=f"{name}.pool{j}")(f))
        return (
            keras.layers.Concatenate(axis=-1, name=f"{name}.concat")(pooled) if len(pooled) > 1 else pooled[0]
        )

    def exit_head(self, x: Any, name: str, head: dict[str, Any], out_name: str) -> Any:
        k = head["kernel"]
        avg = keras.layers.AveragePooling2D(k, name=f"{name}.avg")(x) if k > 1 else x
        if head["mixed"]:
            a = float(1.0 / (1.0 + np.exp(-float(self.w[f"{name}.mix"]))))
            mx = keras.layers.MaxPooling2D(k, name=f"{name}.max")(x) if k > 1 else x
            avg = keras.layers.Add(name=f"{name}.mix")(
                [
                    keras.layers.Rescaling(a, name=f"{name}.mix_max")(mx),
                    keras.layers.Rescaling(1.0 - a, name=f"{name}.mix_avg")(avg),
                ]
            )
        w, b = self.w[f"{name}.linear.weight"], self.w[f"{name}.linear.bias"]
        s, c = head["out_size"], head["channels"]
        # PyTorch flattens (C, s, s); NHWC flattens (s, s, C): permute the columns to match
        kernel = w.reshape(w.shape[0], c, s, s).transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T
        flat = keras.layers.Flatten(name=f"{name}.flatten")(avg)
        layer = keras.layers.Dense(w.shape[0], name=out_name)
        y = layer(flat)
        layer.set_weights([kernel, b])
        return y


def build_mirror(plan: dict[str, Any], weights: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """Build the Keras mirror of the network described by ``plan`` with ``weights``.

    Args:
        plan: the export plan written by :func:`device_bench.export.export_plan` (ArchSpec and derived
            shapes).
        weights: the network's state dict as numpy arrays (PyTorch names), gates folded, masks applied.

    Returns:
        The input tensor and ``{"exit<b>": logits tensor}`` for every active exit, in depth order; a Keras
        model over any subset of the outputs computes only the layers that subset needs.
    """
    spec = plan["spec"]
    build = _Builder(weights, plan["bn_eps"])
    h, w, c = plan["input_shape"]
    image = keras.Input((h, w, c), batch_size=1, name="image")
    sizes = plan["feature_sizes"]
    feats: list[Any] = []
    outputs: dict[str, Any] = {}
    for b, cells in enumerate(plan["blocks"][: spec["active_blocks"]]):
        act = spec.get("activation", "relu")
        if b == 0:
            feats.append(build.stem(image, "blocks.0.stem", act))
        for k, i in enumerate(cells):
            name = f"blocks.{b}.cells.{k}"
            prev = feats[-1]
            reads = spec["cells"][i].get("reads")
            x = build.dense_input(feats, sizes, name, reads) if spec["dense"] else prev
            feats.append(build.any_cell(x, prev, name, spec["cells"][i], act))
        head = plan["exits"].get(str(b))
        if head is not None:
            outputs[f"exit{b}"] = build.exit_head(feats[-1], f"exits.{b}", head, f"exit{b}")
    return image, outputs


def build_layer(cfg: dict[str, Any], seed: int = 0) -> Any:
    """A one-layer Keras model for a latency look-up table entry, with random weights.

    ``cfg`` (from :func:`device_bench.lut.table_layers`): ``op`` is ``conv`` (``k``, ``stride``,
    ``relu``, ``act``: conv -> BN [-> ReLU or ReLU6], as in the network), ``dw`` (depthwise ``k`` x ``k``
    conv -> BN -> ``act`` over ``cin`` channels), ``add`` (residual addition, and its ReLU unless ``relu``
    is false), ``se`` (Squeeze-and-Excitation over ``cin`` channels, ``cout`` hidden), ``concat`` (the
    concatenation of two ``cin``-channel halves: a table entry of ``2 cin`` channels), ``pool`` (average
    pooling ``k``) or ``head`` (an exit head: ``kernel``, ``mixed``, ``classes``), at input resolution
    ``res`` with ``cin`` input and ``cout`` output channels.
    """
    rng = np.random.default_rng(seed)
    res, cin, cout = cfg["res"], cfg["cin"], cfg["cout"]
    x = keras.Input((res, res, cin), batch_size=1, name="image")
    w: dict[str, np.ndarray] = {}
    build = _Builder(w, 1e-5)
    if cfg["op"] == "conv":
        k = cfg["k"]
        w["l.weight"] = rng.standard_normal((cout, cin, k, k)).astype(np.float32) * 0.1
        w.update({f"n.{n}": np.ones(cout, np.float32) for n in ("weight", "running_var")})
        w.update({f"n.{n}": np.zeros(cout, np.float32) for n in ("bias", "running_mean")})
        y = build.bn(build.conv(x, "l", cfg["stride"]), "n")
        if cfg["relu"]:
            y = build.relu(y, "r", cfg.get("act", "relu"))
    elif cfg["op"] == "dw":
        k = cfg["k"]
        w["l.weight"] = rng.standard_normal((cin, 1, k, k)).astype(np.float32) * 0.1
        w.update({f"n.{n}": np.ones(cin, np.float32) for n in ("weight", "running_var")})
        w.update({f"n.{n}": np.zeros(cin, np.float32) for n in ("bias", "running_mean")})
        y = build.relu(build.bn(build.depthwise(x, "l", cfg["stride"]), "n"), "r", cfg["act"])
    elif cfg["op"] == "add":
        y = keras.layers.Add(name="add")([x, x])
        if cfg.get("relu", True):
            y = build.relu(y, "r")
    elif cfg["op"] == "se":  # Squeeze-and-Excitation over cin channels with cout hidden units
        for n, shape in (("fc1", (cout, cin, 1, 1)), ("fc2", (cin, cout, 1, 1))):
            w[f"s.{n}.weight"] = rng.standard_normal(shape).astype(np.float32) * 0.1
            w[f"s.{n}.bias"] = np.zeros(shape[0], np.float32)
        y = build.squeeze_excite(x, "s")
    elif cfg["op"] == "concat":  # a dense cell's concatenation, cin channels in all, of two equal halves
        y = keras.layers.Concatenate(axis=-1, name="cat")([x, x])
    elif cfg["op"] == "pool":  # the average pooling of a dense cell's larger source
        y = keras.layers.AveragePooling2D(cfg["k"], name="pool")(x)
    elif cfg["op"] == "head":
        s = res // cfg["kernel"]
        w["h.linear.weight"] = rng.standard_normal((cfg["classes"], cin * s * s)).astype(np.float32) * 0.1
        w["h.linear.bias"] = np.zeros(cfg["classes"], np.float32)
        w["h.mix"] = np.float32(0.0)
        head = {"kernel": cfg["kernel"], "mixed": cfg["mixed"], "out_size": s, "channels": cin}
        y = build.exit_head(x, "h", head, "out")
    else:
        ops = ["add", "concat", "conv", "dw", "head", "pool", "se"]
        raise ValueError(f"unknown layer op {cfg['op']!r}; valid choices: {ops}")
    return keras.Model(x, {"out": y})
