#!/usr/bin/env python3
"""Time TFLite models on the device this runs on (stand-alone: Python 3.9+, numpy, tflite-runtime).

Protocol of the Liège thesis, section 2.3: for each model, warm up for ``--warmup-s`` seconds, then time
``--runs`` single-image inferences (``invoke`` only) and report their mean, median and standard deviation;
repeat for ``--passes`` passes over the models, each in a new shuffled order, sleeping ``--sleep-s`` seconds
between models so the CPU does not heat up (10 s on a Raspberry Pi; 0 is fine on a desktop). The summary
of a model is over all its timed runs; ``per_pass_mean_ms`` and ``per_pass_median_ms`` keep each pass, and
``load`` the device's load averages before and after the passes (the load guard of the latency tables).

With ``--inputs X.npy`` (NHWC float32 images) every model is also run on every image and its outputs are
saved by name into ``--save-outputs`` (npz keys ``<model>:<output>``), to measure accuracy or compare with
another machine. Outputs are read by their signature names, never by the order of ``get_output_details()``.

Writes JSON (``--out``, default stdout). The interpreter is tflite-runtime; ``--interpreter ai_edge_litert``
or ``tensorflow`` only when asked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import numpy as np

INTERPRETERS = ("tflite_runtime", "ai_edge_litert", "tensorflow")


def load_interpreter_class(which: str):
    """The ``Interpreter`` class of ``which`` and a version string."""
    if which == "tflite_runtime":
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime " + tflite_runtime.__version__
    if which == "ai_edge_litert":
        from ai_edge_litert.interpreter import Interpreter

        try:  # a table belongs to one runtime build: say which
            from importlib.metadata import version

            return Interpreter, "ai_edge_litert " + version("ai-edge-litert")
        except Exception:  # unpacked without its metadata
            return Interpreter, "ai_edge_litert (version unknown)"
    if which == "tensorflow":
        import tensorflow as tf

        return tf.lite.Interpreter, "tensorflow " + tf.__version__
    raise SystemExit(f"unknown interpreter {which!r}; valid choices: {list(INTERPRETERS)}")


class Model:
    """One loaded model: its input, and its outputs by signature name."""

    def __init__(self, interpreter_class, path: str, threads: int) -> None:
        self.it = interpreter_class(model_path=path, num_threads=threads)
        self.it.allocate_tensors()
        runner = self.it.get_signature_runner()
        inputs = runner.get_input_details()
        if len(inputs) != 1:
            raise SystemExit(f"{path}: expected one input, got {sorted(inputs)}")
        (self.input,) = inputs.values()
        self.outputs = dict(runner.get_output_details())

    def set_input(self, image: np.ndarray) -> None:
        """Set the input tensor (quantized when the model takes integers)."""
        d = self.input
        x = image.reshape(d["shape"])
        if np.issubdtype(d["dtype"], np.integer):  # quantized input: scale as the model expects
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.it.set_tensor(d["index"], x.astype(d["dtype"]))

    def outputs_now(self) -> dict[str, np.ndarray]:
        """The outputs of the last invocation, by signature name, dequantized, one row each."""
        out = {}
        for name, d in self.outputs.items():
            y = self.it.get_tensor(d["index"])
            if np.issubdtype(d["dtype"], np.integer):
                scale, zero = d["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            out[name] = np.array(y, dtype=np.float32).reshape(-1)
        return out


def time_model(model: Model, image: np.ndarray, warmup_s: float, runs: int) -> list[float]:
    """Warm up for ``warmup_s`` seconds, then the duration of ``runs`` invocations in milliseconds."""
    model.set_input(image)
    end = time.perf_counter() + warmup_s
    model.it.invoke()
    while time.perf_counter() < end:
        model.it.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.it.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _loadavg() -> list[float]:
    """The device's 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 3) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def summary(times: list[float]) -> dict[str, float]:
    """Mean, median and standard deviation in milliseconds."""
    return {
        "mean_ms": statistics.fmean(times),
        "median_ms": statistics.median(times),
        "std_ms": statistics.pstdev(times),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the protocol; return (and write) the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help=".tflite files; a model's name is its file name without .tflite")
    p.add_argument("--runs", type=int, default=50, help="timed single-image inferences per model and pass")
    p.add_argument(
        "--passes", type=int, default=3, help="passes over the models in shuffled orders (0: no timing)"
    )
    p.add_argument("--warmup-s", type=float, default=1.0, help="warm-up before each model's timed runs")
    p.add_argument("--sleep-s", type=float, default=0.0, help="sleep between models (10 on a Raspberry Pi)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles and of the timing input")
    p.add_argument("--interpreter", default="tflite_runtime", choices=INTERPRETERS)
    p.add_argument("--inputs", help="NHWC float32 .npy images to run every model on")
    p.add_argument("--save-outputs", help="npz to save the outputs on --inputs into")
    p.add_argument("--out", help="JSON report (default: stdout)")
    args = p.parse_args(argv)
    for name, low in (("runs", 1), ("passes", 0), ("threads", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name} must be >= {low}; got {getattr(args, name)}")
    if args.warmup_s < 0 or args.sleep_s < 0:
        p.error("--warmup-s and --sleep-s must be >= 0")

    interpreter_class, version = load_interpreter_class(args.interpreter)
    names = [
        os.path.basename(m)[: -len(".tflite")] if m.endswith(".tflite") else os.path.basename(m)
        for m in args.models
    ]
    if len(set(names)) != len(names):
        p.error(f"model names must be distinct; got {names}")
    models = {n: Model(interpreter_class, path, args.threads) for n, path in zip(names, args.models)}

    outputs = {}
    if args.inputs:
        images = np.load(args.inputs).astype(np.float32)
        for n, m in models.items():
            rows: dict[str, list[np.ndarray]] = {}
            for img in images:
                m.set_input(img)
                m.it.invoke()
                for k, v in m.outputs_now().items():
                    rows.setdefault(k, []).append(v)
            for k, v in rows.items():
                outputs[f"{n}:{k}"] = np.stack(v)
        if args.save_outputs:
            np.savez(args.save_outputs, **outputs)

    load_before = _loadavg()
    rng = random.Random(args.seed)
    image_rng = np.random.default_rng(args.seed)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    order_log = []
    for _ in range(args.passes):
        order = list(names)
        rng.shuffle(order)
        order_log.append(order)
        for i, n in enumerate(order):
            if i and args.sleep_s:
                time.sleep(args.sleep_s)  # the protocol's cool-down between calls, not a synchronisation
            shape = models[n].input["shape"]
            times[n].append(
                time_model(
                    models[n], image_rng.standard_normal(shape).astype(np.float32), args.warmup_s, args.runs
                )
            )
    report = {
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "interpreter": version,
        "numpy": np.__version__,
        "threads": args.threads,
        "runs": args.runs,
        "passes": args.passes,
        "warmup_s": args.warmup_s,
        "sleep_s": args.sleep_s,
        "orders": order_log,
        "load": {"before": load_before, "after": _loadavg(), "cpus": os.cpu_count() or 1},
        "models": {
            n: dict(
                summary([t for run in times[n] for t in run]) if times[n] else {},
                per_pass_mean_ms=[statistics.fmean(run) for run in times[n]],
                per_pass_median_ms=[statistics.median(run) for run in times[n]],
                runs=len(times[n][0]) if times[n] else 0,
                total_runs=sum(len(run) for run in times[n]),
                outputs=sorted(models[n].outputs),
            )
            for n in names
        },
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
