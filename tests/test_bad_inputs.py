"""The bad-input matrix: each case fails with a message naming the bad value, before any training, and
leaves an earlier run's directory, checkpoints and the published teacher exactly as they were."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_nas import DataShape, NetConfig
from lit_nas.data import CIFAR10DataModule, FashionMNISTDataModule, SyntheticDataModule, read_idx
from lit_nas.module import MultiExitModule
from lit_nas_cli import REPO_ROOT, LitNASCLI, resolve_config_args, warn_changed_settings
from tests.conftest import TINY, tiny_data, tiny_trainer
from tests.dataset_files import FILES, skip_md5, write_idx, write_tiny_cifar10

TINY_SNIP = str(REPO_ROOT / "tests" / "configs" / "tiny_snip.yaml")


# -- the earlier run that no failure may touch --------------------------------------------------------------
@pytest.fixture
def earlier(tmp_path, monkeypatch):
    """cwd = tmp_path holding runs/tiny_snip (a finished run) and a published teacher; yields a checker."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "tiny_snip"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, run / "checkpoints" / "last.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}}, run / "checkpoints" / "best-epoch=003.ckpt")
    (run / "lit_nas_config.yaml").write_text("seed_everything: 0\n")
    teacher = tmp_path / "runs" / "teachers" / "t"
    teacher.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}}, teacher / "best.ckpt")
    (teacher / "best.ckpt.json").write_text('{"score": 0.9}')
    before = snapshot(tmp_path / "runs")

    def unchanged() -> None:
        after = snapshot(tmp_path / "runs")
        assert {k: after.get(k) for k in before} == before, "an earlier run's files were modified"

    return unchanged


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- ways to fail ---------------------------------------------------------------------------------------
def cli(*args: str) -> LitNASCLI:
    """Build the CLI for fit (no training) on the tiny config."""
    return LitNASCLI(args=resolve_config_args(["--config", TINY_SNIP, *args]), run=False)


def cli_parse(*args: str) -> Callable[[], object]:
    return lambda: cli("--trainer.max_epochs", "4", *args)


def cli_fit(*args: str) -> Callable[[], object]:
    """Build and fit; the failure must come before the first training step."""

    def go() -> None:
        c = LitNASCLI(args=resolve_config_args(["--config", TINY_SNIP, *args]), run=False)
        try:
            c.trainer.fit(c.model, datamodule=c.datamodule)
        finally:
            assert c.trainer.global_step == 0, "failed after training had started"

    return go


def fit_plain(module_kwargs: dict, callbacks: list, data=None, max_epochs: int = 4) -> Callable[[], object]:
    def go() -> None:
        dm = data or tiny_data()
        model = MultiExitModule(net=NetConfig(**TINY), data_shape=dm.data_shape, **module_kwargs)
        trainer = tiny_trainer(Path.cwd() / "plain", max_epochs=max_epochs, callbacks=callbacks)
        try:
            trainer.fit(model, datamodule=dm)
        finally:
            assert trainer.global_step == 0, "failed after training had started"

    return go


def fashion(root: Path, **kwargs) -> Callable[[], object]:
    def go() -> None:
        dm = FashionMNISTDataModule(root=str(root), **kwargs)
        dm.prepare_data()

    return go


def fashion_files(tmp: Path, train_n: int = 8, labels_n: int = 8, gz: bool = True) -> Path:
    root = tmp / "fm"
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 255, (train_n, 28, 28)), gz)
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (labels_n,)), gz)
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 255, (4, 28, 28)), gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (4,)), gz)
    return root


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def bad_idx(kind: str) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        root = fashion_files(tmp, gz=kind == "gz")
        target = root / ("train-images-idx3-ubyte" + (".gz" if kind == "gz" else ""))
        if kind == "truncated":
            truncate(target, 1000)
        elif kind == "empty":
            target.write_bytes(b"")
        elif kind == "gz":
            truncate(target, 200)
        elif kind == "magic":
            target.write_bytes(b"\x00\x00\x0d\x03" + target.read_bytes()[4:])
        elif kind == "long":
            target.write_bytes(target.read_bytes() + b"\x00" * 10)
        elif kind == "header":
            target.write_bytes(target.read_bytes()[:6])
        return fashion(root)

    return make


def cifar(kind: str) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        root = tmp / "cifar"
        if kind != "missing":
            write_tiny_cifar10(root)
            folder = root / "cifar-10-batches-py"
            if kind == "corrupt":
                truncate(folder / FILES[2], 50)
            elif kind == "labels":
                with open(folder / FILES[1], "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                entry["labels"] = entry["labels"][:-3]
                with open(folder / FILES[1], "wb") as f:
                    pickle.dump(entry, f, protocol=2)
        return lambda: CIFAR10DataModule(root=str(root), download=False).prepare_data()

    return make


def arch_ckpt(kind: str) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        model = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10))
        ckpt = {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": "2.6.6",
        }
        if kind == "corrupt":
            ckpt["lit_nas_arch_spec"] = {"kind": "resnet_sdn", "bogus": 1}
        path = tmp / f"{kind}.ckpt"
        torch.save(ckpt, path)
        return lambda: MultiExitModule.load_from_checkpoint(path, weights_only=True)

    return make


def unreadable_resume(tmp: Path) -> Callable[[], object]:
    path = tmp / "broken" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    return lambda: warn_changed_settings({}, str(path))  # what fit --ckpt_path does before loading


def masks_other_arch(tmp: Path) -> Callable[[], object]:
    from lit_nas.masks import save_masks

    spec = NetConfig(stage_widths=[4, 8, 16], cells_per_stage=[1, 1, 2]).build_spec(DataShape(3, 16, 10))
    path = save_masks(tmp / "m.pt", spec, {})
    return lambda: MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10), masks=str(path))


class BadTerm:
    """A loss term that goes to ``value`` at the first step (a diverging regulariser)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.add_loss_term("custom/penalty", lambda x, y, out: torch.tensor(self.value))


def numeric(kind: str) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        from lightning.pytorch.callbacks import Callback

        dm = tiny_data()
        model = MultiExitModule(net=NetConfig(**TINY), data_shape=dm.data_shape)
        if kind == "weights":
            with torch.no_grad():
                next(model.net.parameters())[0] = float("nan")
            return lambda: model.on_save_checkpoint({"state_dict": model.state_dict()})

        class Term(BadTerm, Callback):
            pass

        term = Term(float("nan") if kind == "nan_term" else float("inf"))

        def go() -> None:
            trainer = tiny_trainer(tmp / "plain", max_epochs=2, callbacks=[term], enable_checkpointing=True)
            try:
                trainer.fit(model, datamodule=dm)
            finally:
                assert trainer.global_step == 0
                assert not list((tmp / "plain").rglob("*.ckpt"))

        return go

    return make


def sigterm_before_first_epoch(tmp: Path) -> Callable[[], object]:
    def go() -> None:
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO_ROOT)}
        out = subprocess.run(
            [
                sys.executable,
                str(REPO_ROOT / "train.py"),
                "fit",
                "--config",
                TINY_SNIP,
                "--run_dir",
                str(tmp / "sig"),
                "--trainer.callbacks+=tests.run_helpers.SignalAt",
                "--trainer.callbacks.epoch=0",
                "--trainer.callbacks.signum=15",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        raise RuntimeError(f"exit {out.returncode}: {out.stderr[-400:]}")

    return go


def ok(fn: Callable[[], object]) -> Callable[[Path], Callable[[], object]]:
    return lambda tmp: fn


CASES: list[tuple[str, Callable[[Path], Callable[[], object]], str]] = [
    # configs (parsed and built, nothing trained)
    ("net kind", ok(cli_parse("--model.init_args.net.kind=vgg")), r"kind 'vgg'; valid choices"),
    ("widths length", ok(cli_parse("--model.init_args.net.stage_widths=[4,8]")), "same length"),
    (
        "milestones",
        ok(
            cli_parse(
                "--model.init_args.lr_schedule.name=multistep",
                "--model.init_args.lr_schedule.milestones=[3,2]",
            )
        ),
        "strictly increasing",
    ),
    (
        "gammas",
        ok(
            cli_parse(
                "--model.init_args.lr_schedule.name=multistep",
                "--model.init_args.lr_schedule.milestones=[1,2]",
                "--model.init_args.lr_schedule.gammas=[0.1]",
            )
        ),
        "one gamma per milestone",
    ),
    ("loss weights", ok(cli_parse("--model.init_args.exit_loss.weights=[1,1]")), "have 2 entries"),
    ("optimizer", ok(cli_parse("--model.init_args.optimizer.name=rmsprop")), "rmsprop"),
    ("thresholds", ok(cli_parse("--model.init_args.thresholds=[0.5,1.5]")), r"\[0.5, 1.5\]"),
    (
        "dense shape",
        ok(
            lambda: MultiExitModule(
                net=NetConfig(stage_widths=[4, 6, 8], cells_per_stage=[1, 1, 2], dense=True),
                data_shape=DataShape(1, 14, 10),
            )
        ),
        r"cannot run on 14x14 inputs: feature 2 \(7x7\)",
    ),
    ("unknown callback key", ok(cli_parse("--snipp.keep_ratio=0.5")), "snipp"),
    ("unknown callback arg", ok(cli_parse("--snip.keep_ratoi=0.5")), "keep_ratoi"),
    ("snip keep_ratio", ok(cli_parse("--snip.keep_ratio=1.5")), r"keep_ratio must be in \(0, 1\].*got 1.5"),
    ("snip mode", ok(cli_parse("--snip.mode=oneshot")), "oneshot"),
    ("growing init", ok(cli_parse("--growing.init=zeros")), "zeros"),
    ("growing epochs", ok(cli_parse("--growing.grow_epochs=[2,1,3]")), r"\[2, 1, 3\]"),
    ("fisher cost", ok(cli_parse("--fisher", "{target_fraction: 0.5, cost: joules}")), "joules"),
    (
        "fisher targets",
        ok(cli_parse("--fisher", "{target_fraction: 0.5, target_value: 3}")),
        "exactly one of target_fraction and target_value",
    ),
    ("switch update", ok(cli_parse("--switch_l1", "{update: newton}")), "newton"),
    ("switch gamma", ok(cli_parse("--switch_l1", "{gamma: 2.0}")), "got 2.0"),
    ("retrain epoch", ok(cli_parse("--retrain", "{epoch: 0}")), "got 0"),
    ("retrain rewind", ok(cli_parse("--retrain", "{epoch: 2, init: rewind}")), "needs rewind_epoch"),
    ("device precision", ok(cli_parse("--device_bench", "{precisions: [fp16]}")), "fp16"),
    ("device runner", ok(cli_parse("--device_bench", "{runner: telnet}")), "telnet"),
    ("publish mode", ok(cli_parse("--publish", "{path: x.ckpt, mode: best}")), "'best'"),
    ("run_dir taken", ok(cli_parse("--run_dir", "runs/tiny_snip")), "runs/tiny_snip already holds a run"),
    ("val_size", ok(lambda: SyntheticDataModule(num_train=16, val_size=16).setup()), "val_size=16"),
    # schedules and devices checked at fit start, before the first step
    (
        "snip before growth",
        ok(cli_fit("--snip.prune_epochs=[0]")),
        r"SnipPruning can never finish.*\[1, 2, 3\]",
    ),
    ("snip past the end", ok(cli_fit("--snip.prune_epochs=[1,9]")), r"reach past the last epoch \(3\)"),
    ("growing past the end", ok(cli_fit("--growing.grow_epochs=[1,2,7]")), "7"),
    (
        "retrain while snip prunes",
        ok(cli_fit("--retrain", "{epoch: 2}", "--trainer.max_epochs=5")),
        r"restarts while a search still changes the network "
        r"\(Growing until epoch 3, SnipPruning until epoch 3",
    ),
    ("retrain past the end", ok(cli_fit("--growing", "null", "--retrain", "{epoch: 9}")), "max_epochs=4"),
    (
        "retrain vs switches",
        ok(
            cli_fit(
                "--growing", "null", "--snip", "null", "--switch_l1", "{lam: 0.1}", "--retrain", "{epoch: 2}"
            )
        ),
        "SwitchL1 until the end",
    ),
    (
        "device unreachable",
        ok(cli_fit("--device_bench", "{runner: ssh, host: '127.0.0.1:1'}")),
        "DeviceBench: the device is not usable, checked before training",
    ),
    (
        "fisher lut missing",
        ok(cli_parse("--fisher", "{target_fraction: 0.5, cost: latency, lut: no.json}")),
        "no.json",
    ),
    # data files
    ("idx truncated", bad_idx("truncated"), r"train-images-idx3-ubyte: truncated: header dims \[8, 28, 28\]"),
    ("idx empty", bad_idx("empty"), r"train-images-idx3-ubyte: 0 bytes"),
    ("idx gz truncated", bad_idx("gz"), r"train-images-idx3-ubyte.gz: cannot be decompressed"),
    ("idx magic", bad_idx("magic"), "is not a uint8 IDX file"),
    ("idx too long", bad_idx("long"), "longer than its header says"),
    ("idx header", bad_idx("header"), "header truncated"),
    (
        "image/label counts",
        lambda tmp: fashion(fashion_files(tmp, train_n=8, labels_n=7)),
        "Fashion-MNIST train split: 8 images but 7 labels",
    ),
    (
        "fashion root",
        lambda tmp: lambda: FashionMNISTDataModule(root=str(tmp / "nope")),
        r"root '.*nope' is not a directory",
    ),
    ("cifar corrupt", cifar("corrupt"), r"data_batch_3 is corrupt or truncated"),
    ("cifar labels", cifar("labels"), r"data_batch_2: 61440 values for 17 labels"),
    ("cifar missing", cifar("missing"), r"CIFAR-10 not found in '.*cifar/cifar-10-batches-py'"),
    # checkpoints
    ("ckpt without arch", arch_ckpt("missing"), "has no 'lit_nas_arch_spec' entry"),
    ("ckpt corrupt arch", arch_ckpt("corrupt"), r"entry is corrupt: unknown ArchSpec keys \['bogus'\]"),
    ("ckpt unreadable", unreadable_resume, r"cannot read checkpoint .*broken/checkpoints/last.ckpt"),
    ("masks of another net", masks_other_arch, r"masks file '.*m.pt' was found for another architecture"),
    # numeric faults
    ("nan loss term", numeric("nan_term"), r"global step 0 \(epoch 0, batch 0\): custom/penalty = nan"),
    ("inf loss term", numeric("inf_term"), r"custom/penalty = inf"),
    ("nan weights", numeric("weights"), r"weight net\.blocks\.0\.stem\.\S+ \(NaN\) is not finite"),
    # signals
    ("sigterm", sigterm_before_first_epoch, r"exit 143: .*stopped by SIGTERM"),
]


@pytest.mark.parametrize(("name", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_touches_no_earlier_run(
    name, make, message, earlier, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("lit_nas.data.DEBIAN_FASHION_MNIST", tmp_path / "no-system-copy")
    if name.startswith("cifar"):
        skip_md5(monkeypatch)
    fn = make(tmp_path)
    with pytest.raises((Exception, SystemExit)) as info:
        fn()
    text = f"{info.value}\n{capsys.readouterr().err}"
    assert re.search(message, text, re.S), text[-2000:]
    earlier()


def test_the_matrix_has_at_least_40_cases():
    assert len(CASES) >= 40
    kinds = {"config": 0, "data": 0}
    for name, _, _ in CASES:
        kinds["data" if name.startswith(("idx", "cifar", "image", "fashion")) else "config"] += 1
    assert kinds["data"] >= 8


def test_truncated_gz_and_mismatch_name_the_file_not_a_reshape(tmp_path):
    """The raw errors of the old code (EOFError, reshape) never surface."""
    root = fashion_files(tmp_path)
    path = root / "train-labels-idx1-ubyte.gz"
    truncate(path, 30)
    with pytest.raises(Exception) as info:
        read_idx(path)
    assert type(info.value).__name__ == "DataFileError"
    assert str(path) in str(info.value)
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
        assert len(f.read()) == 8 + 4


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file if code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_cifar_batch_that_fails_its_checksum_is_never_unpickled(tmp_path):
    """A batch file that fails the MD5 check is read only by the restricted unpickler: its code never runs."""
    root = tmp_path / "cifar"
    write_tiny_cifar10(root)
    marker = tmp_path / "code-ran"
    with open(root / "cifar-10-batches-py" / FILES[0], "wb") as f:
        pickle.dump({"data": _Payload(marker), "labels": []}, f, protocol=2)
    with pytest.raises(Exception) as info:
        CIFAR10DataModule(root=str(root), download=False).prepare_data()
    assert not marker.exists(), "unpickling the crafted file ran its code"
    assert type(info.value).__name__ == "DataFileError"
    assert f"{FILES[0]} is corrupt or truncated" in str(info.value)
    assert re.search(r"refers to \S*open, which a CIFAR-10 batch never holds", str(info.value))
