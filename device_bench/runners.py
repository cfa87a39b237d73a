"""Run :mod:`device_bench.bench_tflite` on a device: this machine (``local``) or a host over SSH (``ssh``).

Both runners give the same :class:`BenchReport`: the script's JSON report, keyed by the models' own names,
and the outputs on the given inputs. The local runner starts the script in its own process (tflite-runtime
must not share one with TensorFlow). The SSH runner sends the script, the models under neutral names and the
inputs as one tar stream, runs the script in a fresh remote temporary directory that is removed on exit,
and reads the results back from the same connection; no local path or name ever reaches a shell.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCRIPT = Path(__file__).with_name("bench_tflite.py")
INTERPRETERS = ("tflite_runtime", "ai_edge_litert", "tensorflow")
STATISTICS = ("mean", "median")


class DeviceError(RuntimeError):
    """The device could not be reached, or the timing script failed there; the message says which."""


@dataclass(frozen=True)
class BenchSettings:
    """The timing protocol (Liège thesis section 2.3).

    Attributes:
        runs: timed single-image inferences per model and pass.
        passes: passes over the models, each in a new shuffled order (0: outputs only, no timing).
        warmup_s: warm-up before each model's timed runs, in seconds.
        sleep_s: pause between models; ``None`` takes the runner's default (10 s over SSH, 0 locally).
        threads: interpreter threads (1 unless you measure multi-threaded inference on purpose).
        seed: seed of the shuffles and of the timing input.
        interpreter: ``tflite_runtime``; ``ai_edge_litert`` or ``tensorflow`` only when asked.
    """

    runs: int = 50
    passes: int = 3
    warmup_s: float = 1.0
    sleep_s: float | None = None
    threads: int = 1
    seed: int = 0
    interpreter: str = "tflite_runtime"

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1; got {self.runs}")
        if self.passes < 0:
            raise ValueError(f"passes must be >= 0 (0: no timing); got {self.passes}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1; got {self.threads}")
        if self.warmup_s < 0 or (self.sleep_s is not None and self.sleep_s < 0):
            raise ValueError(f"warmup_s and sleep_s must be >= 0; got {self.warmup_s}, {self.sleep_s}")
        if self.interpreter not in INTERPRETERS:
            raise ValueError(f"unknown interpreter {self.interpreter!r}; valid choices: {list(INTERPRETERS)}")

    def args(self, default_sleep_s: float) -> list[str]:
        """Command-line arguments of the timing script."""
        sleep = default_sleep_s if self.sleep_s is None else self.sleep_s
        return [
            f"--runs={self.runs}",
            f"--passes={self.passes}",
            f"--warmup-s={self.warmup_s}",
            f"--sleep-s={sleep}",
            f"--threads={self.threads}",
            f"--seed={self.seed}",
            f"--interpreter={self.interpreter}",
        ]


@dataclass
class BenchReport:
    """What the timing script reported.

    Attributes:
        report: the script's JSON (``machine``, ``interpreter``, ``runs``, ``models`` with
            ``mean_ms``/``median_ms``/``std_ms`` per model, ...).
        outputs: ``{model name: {output name: (N, classes)}}`` on the inputs, when inputs were given.
    """

    report: dict[str, Any]
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def latency_ms(self, name: str, statistic: str = "mean") -> float:
        """Latency of model ``name`` in milliseconds: the ``mean`` or ``median`` of its timed runs."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; valid choices: {list(STATISTICS)}")
        return float(self.report["models"][name][f"{statistic}_ms"])


def model_name(path: str | Path) -> str:
    """A model's name: its file name without ``.tflite``."""
    name = Path(path).name
    return name[: -len(".tflite")] if name.endswith(".tflite") else name


def _check_models(models: Sequence[str | Path]) -> list[Path]:
    paths = [Path(m) for m in models]
    if not paths:
        raise ValueError("no models to run")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"model files not found: {missing}")
    # a TFLite flatbuffer starts with its root offset and the identifier "TFL3" at bytes 4..8
    for p in paths:
        with p.open("rb") as f:
            head = f.read(8)
        if len(head) < 8 or head[4:8] != b"TFL3":
            what = (
                "is empty" if not head else f"is not a TFLite model ({len(head)}+ bytes, no TFL3 identifier)"
            )
            raise ValueError(f"model file {p} {what}; export it again (python -m device_bench export)")
    names = [model_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"model names (file names without .tflite) must be distinct; got {names}")
    return paths


def _read_outputs(path: Path, rename: dict[str, str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as f:
        for key in f.files:
            model, _, output = key.rpartition(":")
            out.setdefault((rename or {}).get(model, model), {})[output] = f[key]
    return out


class Runner:
    """Where the timing script runs; see :class:`LocalRunner` and :class:`SSHRunner`."""

    default_sleep_s = 0.0
    kind = "runner"

    def run(
        self, models: Sequence[str | Path], settings: BenchSettings, inputs: np.ndarray | None = None
    ) -> BenchReport:
        """Time ``models`` (``.tflite`` paths); with ``inputs`` (NHWC float32) also return their outputs."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the device, for logs."""
        return self.kind

    def probe(self, interpreter: str = "tflite_runtime", timeout_s: float = 60.0) -> str:
        """One short check that the device answers and has numpy and ``interpreter``; its machine name.

        Raises:
            DeviceError: the device cannot be reached, or lacks what the timing script needs.
        """
        raise NotImplementedError

    @staticmethod
    def _probe_code(interpreter: str) -> str:
        module = {"tensorflow": "tensorflow"}.get(interpreter, f"{interpreter}.interpreter")
        return (
            f"import importlib, platform, numpy; importlib.import_module({module!r}); "
            "print(platform.machine())"
        )

    def _probe(self, cmd: list[str], timeout_s: float) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DeviceError(f"{self.describe()}: no answer to the probe ({err})") from err
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["(no message)"]
            raise DeviceError(f"{self.describe()}: probe failed (exit {proc.returncode}): {lines[-1][-500:]}")
        return proc.stdout.strip()


class LocalRunner(Runner):
    """Runs the script on this machine in its own process.

    Args:
        python: interpreter with tflite-runtime and numpy (default: this one).
        timeout_s: limit of one run.
    """

    kind = "local"

    def __init__(self, python: str | None = None, timeout_s: float = 3600.0) -> None:
        self.python = python or sys.executable
        self.timeout_s = timeout_s

    def probe(self, interpreter: str = "tflite_runtime", timeout_s: float = 60.0) -> str:  # noqa: D102
        return self._probe([self.python, "-c", self._probe_code(interpreter)], timeout_s)

    def run(  # noqa: D102
        self, models: Sequence[str | Path], settings: BenchSettings, inputs: np.ndarray | None = None
    ) -> BenchReport:
        paths = _check_models(models)
        with tempfile.TemporaryDirectory(prefix="lit_nas_bench_") as tmp:
            cmd = [self.python, str(SCRIPT), *map(str, paths), *settings.args(self.default_sleep_s)]
            cmd += ["--out", f"{tmp}/results.json"]
            if inputs is not None:
                np.save(f"{tmp}/inputs.npy", np.ascontiguousarray(inputs, dtype=np.float32))
                cmd += ["--inputs", f"{tmp}/inputs.npy", "--save-outputs", f"{tmp}/outputs.npz"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise DeviceError(f"local timing failed: {err}") from err
            if proc.returncode != 0:
                raise DeviceError(f"local timing failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            report = json.loads(Path(tmp, "results.json").read_text())
            outputs = _read_outputs(Path(tmp, "outputs.npz")) if inputs is not None else {}
        return BenchReport(report, outputs)


_PORT = re.compile(r"^(?P<dest>[^:]+):(?P<port>\d+)$")
#: what a Host alias or [user@]host[:port] is made of (IPv6 in brackets, a zone after %)
_HOST = re.compile(r"[A-Za-z0-9._\-@:\[\]%]+")


class SSHRunner(Runner):
    """Runs the script on an SSH host (a Raspberry Pi).

    Args:
        host: a ``Host`` of your ``~/.ssh/config`` (or of ``ssh_config``), or ``[user@]host[:port]``.
        ssh_config: an ssh_config file to use instead of ``~/.ssh/config``.
        python: the device's Python (with numpy and tflite-runtime).
        timeout_s: limit of one whole run (copy, timing, results).
        connect_timeout_s: limit of establishing the connection.
        ssh: the ssh client.
    """

    kind = "ssh"
    default_sleep_s = 10.0  # the thesis's cool-down on a Raspberry Pi

    def __init__(
        self,
        host: str,
        ssh_config: str | None = None,
        python: str = "python3",
        timeout_s: float = 3600.0,
        connect_timeout_s: float = 20.0,
        ssh: str = "ssh",
    ) -> None:
        if not host or host.startswith("-") or not _HOST.fullmatch(host):
            raise ValueError(
                f"invalid ssh host {host!r}: give a Host alias or [user@]host[:port] (letters, digits and "
                "'.-_@:[]%' only: a shell or ssh option character is never passed on)"
            )
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0; got {timeout_s}, {connect_timeout_s}")
        match = _PORT.match(host)
        self.destination = match["dest"] if match else host
        self.port = int(match["port"]) if match else None
        self.host = host
        self.ssh_config = ssh_config
        self.python = python
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.ssh = ssh

    def describe(self) -> str:  # noqa: D102
        return f"ssh {self.host}"

    def ssh_command(self, remote: str) -> list[str]:
        """The ssh invocation running the shell command ``remote`` on the host."""
        cmd = [self.ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(self.connect_timeout_s)}"]
        cmd += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.ssh_config:
            cmd += ["-F", self.ssh_config]
        if self.port is not None:
            cmd += ["-p", str(self.port)]
        return [*cmd, "--", self.destination, remote]

    def probe(self, interpreter: str = "tflite_runtime", timeout_s: float = 60.0) -> str:  # noqa: D102
        remote = f"{shlex.quote(self.python)} -c {shlex.quote(self._probe_code(interpreter))}"
        return self._probe(self.ssh_command(remote), timeout_s + self.connect_timeout_s)

    def run(  # noqa: D102
        self, models: Sequence[str | Path], settings: BenchSettings, inputs: np.ndarray | None = None
    ) -> BenchReport:
        paths = _check_models(models)
        # neutral names on the device: nothing the user named is ever interpreted by a shell
        remote_names = [f"m{i}" for i in range(len(paths))]
        rename = dict(zip(remote_names, (model_name(p) for p in paths)))
        payload = io.BytesIO()
        with tarfile.open(fileobj=payload, mode="w") as tar:
            tar.add(SCRIPT, arcname="bench_tflite.py")
            for name, path in zip(remote_names, paths):
                tar.add(path, arcname=f"{name}.tflite")
            if inputs is not None:
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(inputs, dtype=np.float32))
                info = tarfile.TarInfo("inputs.npy")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
        script_args = [f"{n}.tflite" for n in remote_names] + settings.args(self.default_sleep_s)
        script_args += ["--out", "results.json"]
        results = ["results.json"]
        if inputs is not None:
            script_args += ["--inputs", "inputs.npy", "--save-outputs", "outputs.npz"]
            results.append("outputs.npz")
        remote = (
            'set -e; d=$(mktemp -d "${TMPDIR:-/tmp}/lit_nas_bench.XXXXXX"); trap \'rm -rf "$d"\' EXIT; '
            'tar -xf - -C "$d"; cd "$d"; '
            f"{shlex.quote(self.python)} bench_tflite.py {shlex.join(script_args)} 1>&2; "
            f"tar -cf - {shlex.join(results)}"
        )
        try:
            proc = subprocess.run(
                self.ssh_command(remote),
                input=payload.getvalue(),
                capture_output=True,
                timeout=self.timeout_s,
            )
        except subprocess.TimeoutExpired as err:
            raise DeviceError(f"{self.describe()}: no result within {self.timeout_s:g} s") from err
        except OSError as err:
            raise DeviceError(f"{self.describe()}: cannot run {self.ssh!r}: {err}") from err
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace")[-3000:]
            raise DeviceError(f"{self.describe()} failed (exit {proc.returncode}):\n{stderr}")
        with tempfile.TemporaryDirectory(prefix="lit_nas_bench_") as tmp:
            try:
                with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r") as tar:
                    tar.extractall(tmp, filter="data")
            except tarfile.TarError as err:
                raise DeviceError(f"{self.describe()}: unreadable results ({err})") from err
            report = json.loads(Path(tmp, "results.json").read_text())
            report["models"] = {rename[k]: v for k, v in report["models"].items()}
            report["orders"] = [[rename[k] for k in order] for order in report.get("orders", [])]
            outputs = _read_outputs(Path(tmp, "outputs.npz"), rename) if inputs is not None else {}
        return BenchReport(report, outputs)


RUNNERS = ("local", "ssh")


def make_runner(kind: str, host: str | None = None, ssh_config: str | None = None, **kwargs: Any) -> Runner:
    """A runner by name: ``local``, or ``ssh`` (which needs ``host``)."""
    if kind == "local":
        return LocalRunner(**kwargs)
    if kind == "ssh":
        if not host:
            raise ValueError("the ssh runner needs host: a ~/.ssh/config Host or [user@]host[:port]")
        return SSHRunner(host, ssh_config=ssh_config, **kwargs)
    raise ValueError(f"unknown runner {kind!r}; valid choices: {list(RUNNERS)}")
