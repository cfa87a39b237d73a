"""device_bench: TFLite parity of every block type, the runners (local, SSH, emulated Pi), DeviceBench."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import DeviceBench
from device_bench.export import (
    ExportError,
    export_tflite,
    find_export_python,
    load_manifest,
    nhwc,
    run_tf_side,
    torch_outputs,
    write_bundle,
)
from device_bench.pipeline import expected_latency
from device_bench.runners import BenchSettings, DeviceError, LocalRunner, SSHRunner, make_runner
from lit_nas import DataShape, MultiExitModule, NetConfig, build_net
from lit_nas.gates import attach_gates
from lit_nas.masks import attach_masks
from lit_nas.surgery import collect_gated, remove_edges
from tests.helpers import TINY, tiny_data, tiny_trainer
from tests.wandb_records import history

REPO = Path(__file__).resolve().parent.parent
FAKE_SSH = str(Path(__file__).with_name("fake_ssh.sh"))
HOSTILE = "a b'c\"d;$(touch pwned)`touch pwned2`&|*.tflite"

needs_tf = pytest.mark.skipif(
    find_export_python() is None, reason="no TensorFlow environment: run `make export-env` (.venv-export)"
)


def _has_tflite_runtime() -> bool:
    import importlib.util

    return importlib.util.find_spec("tflite_runtime") is not None


needs_tflite = pytest.mark.skipif(not _has_tflite_runtime(), reason="tflite-runtime is not installed")


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and exit mixes, so a wrong transposition or padding shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
        for head in net.exits.values():
            if head.mix is not None:
                head.mix.fill_(0.8)
    return net.eval()


@dataclass
class Case:
    """A network to export and compare: its input shape, precisions and whether each exit is a model too."""

    net: torch.nn.Module
    shape: DataShape
    precisions: tuple[str, ...] = ("fp32",)
    per_exit: bool = False


def _plain_resnet() -> Case:
    # 30 -> 15 -> 8: stride 2 on an even and on an odd map (TF "same" would pad differently on the even one)
    shape = DataShape(3, 30, 10)
    net = randomize(build_net(NetConfig(**TINY).build_spec(shape)))
    return Case(net, shape, ("fp32", "int8"), per_exit=True)


def _wide_resnet_se() -> Case:
    shape = DataShape(1, 28, 10)
    spec = NetConfig(
        kind="wide_resnet", depth=10, widen_factor=1, se_reduction=4, exit_depths=[1.0]
    ).build_spec(shape)
    return Case(randomize(build_net(spec)), shape)


def _mobile(kind: str, shape: DataShape, precisions: tuple[str, ...] = ("fp32",)):
    def make() -> Case:
        spec = NetConfig(
            kind=kind, blocks=6, width=8, se_reduction=2, dropout=0.2, exit_depths=[0.5, 1.0]
        ).build_spec(shape)
        return Case(randomize(build_net(spec)), shape, precisions)

    return make


def _grown_pruned_collected_dense() -> Case:
    shape = DataShape(3, 16, 10)
    spec = NetConfig(**TINY, dense=True).build_spec(shape).with_active_blocks(3)  # grown to 3 of 4 blocks
    net = randomize(build_net(spec))
    g = torch.Generator().manual_seed(3)
    weights = {k: p for k, p in net.named_parameters() if p.dim() == 4 and "blocks" in k}
    attach_masks(net, {k: (torch.rand(p.shape, generator=g) > 0.5).float() for k, p in weights.items()})
    groups = [grp.name for grp in net.channel_groups()]
    gates = attach_gates(net, groups)
    with torch.no_grad():
        for gate in gates.values():
            gate[: max(1, len(gate) // 3)] = 0.0  # a third of every group gated off
    collect_gated(net)
    remove_edges(net, [(0, 1), (0, 2), (1, 2)])  # cell 2 reads only cell 1's output: a single source
    assert net.spec.stem_width < spec.stem_width and net.spec.active_blocks == 3
    assert net.spec.cell_reads(2) == [2] and net.spec.cell_reads(1) == [1]
    return Case(randomize(net, seed=5), shape, per_exit=True)


def _tiny() -> Case:
    shape = DataShape(1, 12, 10)
    spec = NetConfig(stage_widths=[4, 8], cells_per_stage=[1, 1], exit_depths=[0.5, 1.0]).build_spec(shape)
    return Case(randomize(build_net(spec)), shape, ("fp32", "int8"), per_exit=True)


#: every parity network (and the runners' tiny one); all are converted in one TensorFlow process (its start-up
#: is the slow part)
CASES = {
    "tiny": _tiny,
    "plain_resnet": _plain_resnet,
    "wide_resnet_se": _wide_resnet_se,
    "mobilenet_v1": _mobile("mobilenet_v1", DataShape(1, 28, 10)),  # no shortcuts; Fashion-MNIST's shape
    "mobilenet_v2": _mobile("mobilenet_v2", DataShape(3, 32, 10), ("fp32", "int8")),  # CIFAR-10's shape
    "mnasnet": _mobile("mnasnet", DataShape(3, 30, 10)),  # 5x5 depthwise kernels at stride 2 on an even map
    "dense": _grown_pruned_collected_dense,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``name -> (case, export result, inputs)`` of every case in :data:`CASES`, converted at once."""
    root = tmp_path_factory.mktemp("parity")
    cases, inputs, bundles = {}, {}, []
    for name, make in CASES.items():
        case = cases[name] = make()
        torch.manual_seed(1)
        c, size = case.shape.in_channels, case.shape.input_size
        inputs[name] = torch.randn(8, c, size, size)
        calib = torch.randn(16, c, size, size)
        bundles.append(write_bundle(case.net, root / name, calib, case.precisions, case.per_exit))
    run_tf_side(bundles)
    return {name: (cases[name], load_manifest(root / name), inputs[name]) for name in CASES}


def check_parity(exported, name: str):
    """Run every model of ``name`` on the host's tflite-runtime and compare with PyTorch per exit."""
    case, result, x = exported[name]
    ref = torch_outputs(case.net, x)
    outs = LocalRunner().run([m.path for m in result.models], BenchSettings(passes=0), inputs=nhwc(x)).outputs
    exits = [f"exit{b}" for b in case.net.spec.exit_blocks()]
    for m in result.models:
        assert list(m.outputs) == (exits if m.model == "full" else [m.model])
        for out in m.outputs:
            got = outs[m.name][out]
            if m.precision == "fp32":
                assert np.abs(got - ref[out]).max() <= 1e-4, (name, m.name, out)
    return result, outs, ref


def int8_agrees(outs, ref, model: str | None = None) -> None:
    """int8 is close to float on random weights, not equal: most predictions of every exit agree.

    ``model``: the int8 model holding every exit (``full``); ``None``: each exit's own model.
    """
    for name in ref:
        agree = (outs[f"{model or name}_int8"][name].argmax(1) == ref[name].argmax(1)).mean()
        assert agree >= 0.5, name


@needs_tf
@needs_tflite
def test_plain_resnet_with_projections_and_odd_stride_two_inputs_matches_pytorch(exported):
    case = exported["plain_resnet"][0]
    assert any(c.projection and c.stride == 2 for c in case.net.spec.cells)
    result, outs, ref = check_parity(exported, "plain_resnet")
    # one model per exit and the full model, in both precisions
    assert {m.name for m in result.models} == {
        f"{n}_{p}" for n in ["exit0", "exit1", "exit2", "exit3", "full"] for p in ("fp32", "int8")
    }
    int8_agrees(outs, ref)


@needs_tf
@needs_tflite
def test_wide_resnet_with_squeeze_excitation_matches_pytorch(exported):
    assert all(c.se for c in exported["wide_resnet_se"][0].net.spec.cells)
    check_parity(exported, "wide_resnet_se")


@needs_tf
@needs_tflite
@pytest.mark.parametrize("kind", ["mobilenet_v1", "mobilenet_v2", "mnasnet"])
def test_mobile_families_with_exits_se_and_dropout_match_pytorch(kind, exported):
    # the full model carries every exit; int8 for one family (the conversions are the slow part)
    result, outs, ref = check_parity(exported, kind)
    precisions = exported[kind][0].precisions
    assert {m.name for m in result.models} == {f"full_{p}" for p in precisions}
    assert set(ref) == {"exit0", "exit1"}
    if "int8" in precisions:
        int8_agrees(outs, ref, "full")


@needs_tf
@needs_tflite
def test_grown_pruned_collected_edge_removed_dense_net_matches_pytorch(exported):
    result, _, _ = check_parity(exported, "dense")
    assert {m.model for m in result.models} == {"exit0", "exit1", "exit2", "full"}  # only active exits


def test_export_refuses_bad_precisions_and_int8_without_calibration(tmp_path):
    net = build_net(NetConfig(**TINY).build_spec(DataShape(3, 16, 10)))
    with pytest.raises(ValueError, match=r"valid choices: \['fp32', 'int8'\]"):
        export_tflite(net, tmp_path, precisions=("fp16",), python="unused")
    with pytest.raises(ValueError, match="calibration images"):
        export_tflite(net, tmp_path, precisions=("int8",), python="unused")
    with pytest.raises(ExportError, match="failed"):
        export_tflite(net, tmp_path, precisions=("fp32",), python=str(tmp_path / "no-python"))


# -- runners --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(request):
    """A two-exit net and its models (each exit and full, fp32 and int8), from the one parity export."""
    if find_export_python() is None or not _has_tflite_runtime():
        pytest.skip("needs the TensorFlow environment and tflite-runtime")
    case, result, _ = request.getfixturevalue("exported")["tiny"]
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    return case.net, result, x


def test_local_runner_follows_the_protocol_and_keeps_hostile_names(tiny_models, tmp_path, monkeypatch):
    _, result, x = tiny_models
    hostile = tmp_path / HOSTILE
    shutil.copy(result.by_name()["exit0_fp32"].path, hostile)
    models = [hostile, result.by_name()["full_int8"].path]
    monkeypatch.chdir(tmp_path)  # where a broken quoting would create "pwned"
    rep = LocalRunner().run(models, BenchSettings(runs=7, passes=2, warmup_s=0.0), inputs=nhwc(x))
    name = HOSTILE[: -len(".tflite")]
    r = rep.report
    assert set(r["models"]) == {name, "full_int8"}
    assert r["runs"] == 7 and r["passes"] == 2 and r["threads"] == 1 and r["interpreter"].startswith("tflite")
    assert all(sorted(o) == sorted(r["models"]) for o in r["orders"]) and len(r["orders"]) == 2
    for stats in r["models"].values():
        assert stats["runs"] == 7 and stats["total_runs"] == 14 and len(stats["per_pass_mean_ms"]) == 2
        # over all runs: at least the spread of the pass means (equal passes), and never less than the
        # mean-median gap (|mean - median| <= sigma for any sample)
        assert 0 < stats["median_ms"] and stats["std_ms"] > 0
        assert stats["std_ms"] >= np.std(stats["per_pass_mean_ms"]) - 1e-12
        assert abs(stats["mean_ms"] - stats["median_ms"]) <= stats["std_ms"] + 1e-12
        assert stats["mean_ms"] == pytest.approx(np.mean(stats["per_pass_mean_ms"]))
    assert rep.outputs[name]["exit0"].shape == (5, 10)
    assert set(rep.outputs["full_int8"]) == {"exit0", "exit1"}
    assert not list(tmp_path.glob("pwned*"))


def test_ssh_runner_streams_quotes_and_cleans_up(tiny_models, tmp_path, monkeypatch):
    """The remote side is bash on this machine (tests/fake_ssh.sh): the same command lines and tar streams."""
    net, result, x = tiny_models
    hostile = tmp_path / HOSTILE
    shutil.copy(result.by_name()["exit1_fp32"].path, hostile)
    remote_tmp = tmp_path / "remote"
    remote_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(remote_tmp))
    monkeypatch.chdir(tmp_path)
    runner = SSHRunner("user@example:2201", ssh=FAKE_SSH, python=sys.executable)
    assert runner.ssh_command("true")[-3:] == ["--", "user@example", "true"]
    assert ["-p", "2201"] == runner.ssh_command("x")[-5:-3]
    rep = runner.run(
        [hostile, result.by_name()["full_fp32"].path],
        BenchSettings(runs=5, passes=1, warmup_s=0.0, sleep_s=0.0),
        inputs=nhwc(x),
    )
    name = HOSTILE[: -len(".tflite")]
    assert set(rep.report["models"]) == {name, "full_fp32"}
    assert rep.report["orders"][0] and set(rep.report["orders"][0]) == {name, "full_fp32"}
    ref = torch_outputs(net, x)
    assert np.abs(rep.outputs[name]["exit1"] - ref["exit1"]).max() <= 1e-4
    assert list(remote_tmp.iterdir()) == []  # the remote temporary directory is gone
    assert not list(tmp_path.rglob("pwned*"))


def test_ssh_runner_reports_unreachable_hosts_and_refuses_bad_ones(tiny_models):
    _, result, _ = tiny_models
    runner = SSHRunner("127.0.0.1:1", connect_timeout_s=5, timeout_s=30)  # nothing listens on port 1
    with pytest.raises(DeviceError, match=r"ssh 127\.0\.0\.1:1 failed"):
        runner.run([result.models[0].path], BenchSettings(runs=1, passes=1, warmup_s=0))
    for bad in ("-oProxyCommand=touch x", "a b", ""):
        with pytest.raises(ValueError, match="invalid ssh host"):
            SSHRunner(bad)
    with pytest.raises(ValueError, match=r"valid choices: \['local', 'ssh'\]"):
        make_runner("adb")
    with pytest.raises(ValueError, match="needs host"):
        make_runner("ssh")
    with pytest.raises(ValueError, match="runs must be >= 1"):
        BenchSettings(runs=0)
    with pytest.raises(ValueError, match="valid choices"):
        BenchSettings(interpreter="onnx")


def test_expected_latency_is_the_fraction_weighted_sum_of_exit_latencies():
    # 4 samples: confident at exit 0 (two), at exit 1 (one), never (one: answers at the last exit)
    big = 10.0
    e0 = np.array([[big, 0, 0], [big, 0, 0], [0, 0, 0], [0, 0, 0]])
    e1 = np.array([[0, 0, 0], [0, 0, 0], [0, big, 0], [0, 0, 0]])
    e2 = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    labels = np.array([0, 1, 1, 2])
    rows = expected_latency(
        {"exit0": e0, "exit1": e1, "exit2": e2}, labels, {"exit0": 1.0, "exit1": 3.0, "exit2": 7.0}, [0.9]
    )
    (row,) = rows
    assert row["exit_fractions"] == [0.5, 0.25, 0.25]
    assert row["expected_latency_ms"] == pytest.approx(0.5 * 1 + 0.25 * 3 + 0.25 * 7)
    assert row["latency_fraction"] == pytest.approx(row["expected_latency_ms"] / 7)
    assert row["accuracy"] == pytest.approx(0.75)  # sample 1 stops at exit 0 and is wrong


# -- DeviceBench ----------------------------------------------------------------------------------------
def _fit_with(tmp_path, bench: DeviceBench, logger=False):
    torch.manual_seed(0)
    dm = tiny_data()
    module = MultiExitModule(net=NetConfig(**TINY), data_shape=dm.data_shape)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    trainer = tiny_trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt, bench], logger=logger
    )
    trainer.fit(module, datamodule=dm)
    return trainer, module, ckpt


@needs_tf
@needs_tflite
def test_device_bench_exports_the_best_checkpoint_times_and_writes_the_report(tmp_path, capsys):
    from lightning.pytorch.loggers import WandbLogger

    bench = DeviceBench(runs=5, passes=1, warmup_s=0.0, calib_images=32, thresholds=[0.5, 0.9])
    wandb_logger = WandbLogger(project="test", save_dir=str(tmp_path), offline=True)
    trainer, module, ckpt = _fit_with(tmp_path, bench, logger=wandb_logger)
    wandb_logger.experiment.finish()
    assert trainer.state.finished
    path = Path(ckpt.best_model_path).parent / "device_bench" / "device_bench.json"
    report = json.loads(path.read_text())
    assert report["error"] is None and report["checkpoint"] == ckpt.best_model_path
    exits = module.arch_spec.exit_blocks()
    assert {(r["exit"], r["precision"]) for r in report["exits"]} == {
        (e, p) for e in exits for p in ("fp32", "int8")
    }
    for r in report["exits"]:
        assert r["latency_ms"] > 0 and 0 <= r["accuracy"] <= 1 and r["bytes"] > 0
    # the float exports score what the best checkpoint scores in PyTorch, on the same test images
    best = MultiExitModule.load_from_checkpoint(ckpt.best_model_path, weights_only=True)
    dm = trainer.datamodule
    xs, ys = zip(*(dm.prepare_batch(b, train=False) for b in dm.test_dataloader()))
    logits = torch_outputs(best.net, torch.cat(xs))
    for r in report["exits"]:
        if r["precision"] == "fp32":
            acc = float((logits[f"exit{r['exit']}"].argmax(1) == torch.cat(ys).numpy()).mean())
            assert r["accuracy"] == pytest.approx(acc)
    for p in ("fp32", "int8"):
        lat = [r["latency_ms"] for r in report["exits"] if r["precision"] == p]
        for row in report["early_exit"][p]:
            assert row["expected_latency_ms"] == pytest.approx(np.dot(row["exit_fractions"], lat))
    assert set(report["int8_vs_fp32"]["top1_agreement"]) == {f"exit{e}" for e in exits}
    assert "latency ms" in capsys.readouterr().out
    # the same figures in W&B, with the table and the latency-vs-accuracy picture
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {k: v for row in history(run) for k, v in row.items() if k.startswith("device_bench")}
    for r in report["exits"]:
        key = f"device_bench/exit{r['exit']}_{r['precision']}"
        assert json.loads(logged[f"{key}/latency_ms"]) == pytest.approx(r["latency_ms"])
        assert json.loads(logged[f"{key}/accuracy"]) == pytest.approx(r["accuracy"])
    assert "device_bench/exits/_type" in logged and "device_bench/latency_accuracy/_type" in logged


def test_device_failure_keeps_the_checkpoint_and_ends_the_run_normally(tmp_path):
    bench = DeviceBench(
        runner="ssh",
        host="127.0.0.1:1",
        runs=1,
        passes=1,
        calib_images=16,
        precisions=["fp32"],  # one conversion is enough to show the export's files are kept
        export_python=find_export_python() or str(tmp_path / "no-tensorflow"),
        timeout_s=60,
        check_runner=False,  # the probe would refuse the run before training (tested below)
    )
    trainer, _, ckpt = _fit_with(tmp_path, bench)
    assert trainer.state.finished and not trainer.interrupted
    assert Path(ckpt.best_model_path).is_file()
    report = json.loads(
        (Path(ckpt.best_model_path).parent / "device_bench" / "device_bench.json").read_text()
    )
    assert report["error"]  # recorded, not raised
    if find_export_python() is not None:  # the export happened before the device failed: files are kept
        assert "DeviceError" in report["error"]
        assert all(Path(f).is_file() for f in report["files"].values())
    assert "failed" in bench.summary()


def test_device_bench_validates_its_configuration():
    with pytest.raises(ValueError, match=r"valid choices: \['local', 'ssh'\]"):
        DeviceBench(runner="usb")
    with pytest.raises(ValueError, match="needs host"):
        DeviceBench(runner="ssh")
    with pytest.raises(ValueError, match="unknown precisions"):
        DeviceBench(precisions=["fp16"])
    with pytest.raises(ValueError, match="passes must be >= 1"):
        DeviceBench(passes=0)
    with pytest.raises(ValueError, match="calib_images"):
        DeviceBench(calib_images=0)
    with pytest.raises(ValueError, match="thresholds"):
        DeviceBench(thresholds=[1.5])


def test_device_bench_refuses_a_model_without_the_protocol(tmp_path):
    class Plain(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="DeviceBench needs a lit_nas model"):
        DeviceBench().setup(tiny_trainer(tmp_path), Plain(), "fit")


# -- the emulated Raspberry Pi ------------------------------------------------------------------------
def _emulated(arch: str) -> str:
    """Build (or reuse) a device of device_bench/emulator/build_pi.sh; skip with its reason."""
    proc = subprocess.run(
        ["bash", str(REPO / "device_bench/emulator/build_pi.sh"), "--arch", arch],  # its cache, shared
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def emulated_pi():
    """The armv7l device: 32-bit Pi OS (bookworm), tflite-runtime 2.14."""
    return _emulated("armv7l")


@pytest.fixture(scope="module")
def emulated_pi64():
    """The aarch64 device: 64-bit Pi OS of today (Debian 13, Python 3.13), LiteRT."""
    return _emulated("aarch64")


def test_ssh_runner_on_the_emulated_armv7l_device(tiny_models, emulated_pi):
    _, result, x = tiny_models
    models = [result.by_name()[n].path for n in ("exit0_fp32", "full_int8")]
    runner = SSHRunner("lit-nas-pi", ssh_config=emulated_pi, timeout_s=900)
    rep = runner.run(models, BenchSettings(runs=50, passes=1, warmup_s=0.1, sleep_s=0.0), inputs=nhwc(x))
    host = LocalRunner().run(models, BenchSettings(passes=0), inputs=nhwc(x))
    assert rep.report["machine"] == "armv7l"
    assert rep.report["interpreter"] == "tflite_runtime 2.14.0"
    for name, stats in rep.report["models"].items():
        assert stats["runs"] == 50 and stats["total_runs"] == 50, name
    for name, outputs in host.outputs.items():
        for out, ref in outputs.items():
            got = rep.outputs[name][out]
            if name.endswith("fp32"):
                np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{name}:{out}")
            else:  # the same integer kernels: the same quantized outputs, up to one step
                np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_ssh_runner_on_the_emulated_aarch64_device_with_litert(tiny_models, emulated_pi64):
    _, result, x = tiny_models
    models = [result.by_name()[n].path for n in ("exit0_fp32", "full_int8")]
    runner = SSHRunner("lit-nas-pi64", ssh_config=emulated_pi64, timeout_s=900)
    assert runner.probe("ai_edge_litert") == "aarch64"
    settings = BenchSettings(runs=20, passes=2, warmup_s=0.1, sleep_s=0.0, interpreter="ai_edge_litert")
    rep = runner.run(models, settings, inputs=nhwc(x))
    host = LocalRunner().run(models, BenchSettings(passes=0), inputs=nhwc(x))
    assert rep.report["machine"] == "aarch64"
    assert rep.report["interpreter"].startswith("ai_edge_litert 2.")
    assert rep.report["python"].startswith("3.13")
    assert rep.report["load"]["cpus"] >= 1 and len(rep.report["load"]["before"]) == 3
    for name, stats in rep.report["models"].items():
        assert stats["total_runs"] == 40 and len(stats["per_pass_median_ms"]) == 2, name
    for name, outputs in host.outputs.items():
        for out, ref in outputs.items():
            got = rep.outputs[name][out]
            if name.endswith("fp32"):
                np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=f"{name}:{out}")
            else:
                np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


def test_the_runner_probe_answers_or_names_what_is_missing(tmp_path):
    import platform

    assert LocalRunner().probe() == platform.machine()
    with pytest.raises(DeviceError, match="no answer to the probe"):
        LocalRunner(python=str(tmp_path / "no-python")).probe()
    with pytest.raises(DeviceError, match=r"probe failed \(exit 1\).*No module named 'ai_edge_litert'"):
        LocalRunner().probe("ai_edge_litert")
    with pytest.raises(DeviceError, match=r"ssh 127\.0\.0\.1:1: probe failed"):
        SSHRunner("127.0.0.1:1", connect_timeout_s=5).probe()
