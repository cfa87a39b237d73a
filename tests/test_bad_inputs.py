"""The bad-input matrix: each case fails with a message naming the bad value, before any training, and
leaves an earlier run's directory, checkpoints and the published teacher exactly as they were."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_nas import DataShape, NetConfig
from lit_nas.data import CIFAR10DataModule, FashionMNISTDataModule, SyntheticDataModule, read_idx
from lit_nas.module import MultiExitModule
from lit_nas_cli import REPO_ROOT, LitNASCLI, resolve_config_args, warn_changed_settings
from tests.dataset_files import FILES, skip_md5, write_idx, write_tiny_cifar10
from tests.helpers import TINY, tiny_data, tiny_trainer
from tests.run_helpers import train_py

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
        out = train_py(
            tmp,
            "--config",
            TINY_SNIP,
            "--run_dir",
            str(tmp / "sig"),
            "--trainer.callbacks+=tests.run_helpers.SignalAt",
            "--trainer.callbacks.epoch=0",
            "--trainer.callbacks.signum=15",
        )
        raise RuntimeError(f"exit {out.returncode}: {out.stderr[-400:]}")

    return go


def ok(fn: Callable[[], object]) -> Callable[[Path], Callable[[], object]]:
    return lambda tmp: fn


# -- inputs checked where they are read (issue 29) ---------------------------------------------------------
class EditedSynthetic(SyntheticDataModule):
    """Synthetic data with one array edited after loading: how a custom datamodule's bad data looks."""

    def __init__(self, edit: Callable[[list], None], **kwargs) -> None:
        super().__init__(num_train=64, num_test=32, input_size=16, **kwargs)
        self.edit = edit

    def load_arrays(self):
        arrays = [a.clone() for a in super().load_arrays()]
        self.edit(arrays)
        return tuple(arrays)


def edited(edit: Callable[[list], None]) -> Callable[[Path], Callable[[], object]]:
    return lambda tmp: lambda: EditedSynthetic(edit).prepare_data()


def _set(i: int, index: tuple, value: float, dtype=None):
    def edit(arrays: list) -> None:
        if dtype is not None:
            arrays[i] = arrays[i].to(dtype)
        arrays[i][index] = value

    return edit


def fashion_edit(kind: str) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        root = fashion_files(tmp, gz=False)
        rng = np.random.default_rng(1)
        if kind == "label":
            write_idx(root / "t10k-labels-idx1-ubyte", np.array([1, 2, 12, 3]), False)
        elif kind == "size":
            write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 255, (8, 32, 32)), False)
            write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 255, (4, 32, 32)), False)
        kwargs = {"val_size": 8} if kind == "val_size" else {}
        return fashion(root, **kwargs)

    return make


def shipped_lut(tmp: Path, edit: Callable[[dict], None], raw: str | None = None) -> Path:
    import json as _json

    data = _json.loads((REPO_ROOT / "configs" / "luts" / "wrn16_1_fast_local.json").read_text())
    edit(data)
    path = tmp / "edited_lut.json"
    path.write_text(raw if raw is not None else _json.dumps(data))
    return path


def lut(edit: Callable[[dict], None], raw: str | None = None) -> Callable[[Path], Callable[[], object]]:
    from lit_nas.latency import LatencyLUT

    return lambda tmp: lambda: LatencyLUT.load(shipped_lut(tmp, edit, raw))


def first_table(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda data: edit(next(iter(data["tables"].values())))


def arch_file(
    edit: Callable[[dict], None], text: str | None = None
) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        import yaml as _yaml

        from lit_nas.arch import ArchSpec
        from lit_nas.nets import build_net

        spec = NetConfig(**TINY).build_spec(DataShape(3, 16, 10)).to_dict()
        edit(spec)
        path = tmp / "found_arch.yaml"
        path.write_text(text if text is not None else _yaml.safe_dump(spec))
        return lambda: build_net(ArchSpec.load(path))

    return make


def _cell(key: str, value: object) -> Callable[[dict], None]:
    return lambda spec: spec["cells"][0].__setitem__(key, value)


BOMB = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, c in zip(["", *"abcdefgh"], "abcdefghi")
)


def config_file(text: str | bytes) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        from lit_nas_cli import main

        path = tmp / "cfg.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return lambda: main(["fit", "--config", str(path)])

    return make


def checkpoint_for(subcommand: str, kind: str) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        from lit_nas_cli import main

        path = tmp / f"{kind}.ckpt"
        if kind == "truncated":
            model = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10))
            torch.save({"state_dict": model.state_dict()}, path)
            truncate(path, 300)
        elif kind == "text":
            path.write_text("epoch: 3\n")
        elif kind == "nan":
            model = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10))
            state = model.state_dict()
            next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
            torch.save({"state_dict": state, "epoch": 1}, path)
        if subcommand == "export":
            from device_bench.__main__ import cli as bench

            def go() -> None:
                status = bench(["export", str(path), "--out", str(tmp / "out")])
                raise SystemExit(status)

            return go
        return lambda: main([subcommand, "--config", TINY_SNIP, "--ckpt_path", str(path)])

    return make


def tflite_file(content: bytes) -> Callable[[Path], Callable[[], object]]:
    def make(tmp: Path) -> Callable[[], object]:
        from device_bench.runners import BenchSettings, LocalRunner

        path = tmp / "model.tflite"
        path.write_bytes(content)
        return lambda: LocalRunner().run([path], BenchSettings(runs=1, passes=1, warmup_s=0))

    return make


def ssh_host(host: str) -> Callable[[Path], Callable[[], object]]:
    from device_bench.runners import SSHRunner

    return lambda tmp: lambda: SSHRunner(host)


def run_dir_empty(tmp: Path) -> Callable[[], object]:
    from lit_nas_cli import main

    return lambda: main(["fit", "--config", TINY_SNIP, "--run_dir", ""])


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
    # -- issue 29: inputs checked where they are read ----------------------------------------------------
    # data files and arrays: labels, image sizes, pixels, splits, crop
    (
        "data train label",
        edited(_set(1, (3,), 10)),
        r"training set: label 10 of sample 3 is outside \[0, 10\)",
    ),
    ("data test label", edited(_set(3, (0,), -1)), r"test set: label -1 of sample 0 is outside \[0, 10\)"),
    (
        "data float labels",
        edited(_set(1, (0,), 1.5, torch.float32)),
        r"labels must be integers; got torch.float32",
    ),
    (
        "data nan pixel",
        edited(_set(0, (5, 0, 1, 1), float("nan"), torch.float32)),
        "image 5 holds NaN or infinite",
    ),
    (
        "data inf pixel",
        edited(_set(2, (2, 0, 0, 0), float("inf"), torch.float32)),
        "image 2 holds NaN or inf",
    ),
    ("idx label range", fashion_edit("label"), r"test set: label 12 of sample 2 is outside \[0, 10\) .*fm"),
    (
        "idx image size",
        fashion_edit("size"),
        r"images of shape \(1, 32, 32\).*built for \(1, 28, 28\) \(.*fm\)",
    ),
    (
        "data val_size vs files",
        fashion_edit("val_size"),
        r"val_size=8 \+ holdout_size=0 leaves no training.*fm",
    ),
    ("data crop_pad size", ok(lambda: FashionMNISTDataModule(crop_pad=28)), r"crop_pad=28 must be smaller"),
    (
        "data crop_pad negative",
        ok(lambda: FashionMNISTDataModule(crop_pad=-1)),
        r"crop_pad must be .* got -1",
    ),
    (
        "data val_size fraction",
        ok(lambda: SyntheticDataModule(val_size=0.1)),
        r"val_size must be an integer.*0.1",
    ),
    # latency tables
    (
        "lut nan",
        lut(first_table(lambda t: t["ms"][0].__setitem__(0, float("nan")))),
        r"edited_lut.json: table .* ms holds nan",
    ),
    (
        "lut negative",
        lut(first_table(lambda t: t["ms"][0].__setitem__(0, -0.5))),
        r"ms holds -0.5: latencies must be finite and >= 0",
    ),
    (
        "lut raw nan",
        lut(first_table(lambda t: t["raw_ms"][0].__setitem__(0, float("inf")))),
        r"raw_ms holds inf",
    ),
    (
        "lut unsorted grid",
        lut(first_table(lambda t: t["cin"].reverse())),
        r"cin must be a strictly increasing list of positive integers",
    ),
    (
        "lut zero channels",
        lut(first_table(lambda t: t["cin"].__setitem__(0, 0))),
        r"cin must be a strictly increasing",
    ),
    (
        "lut string channels",
        lut(first_table(lambda t: t["cout"].__setitem__(0, "8"))),
        r"cout must be .* got \['8'",
    ),
    (
        "lut shape",
        lut(first_table(lambda t: t["ms"].pop())),
        r"ms must be \d+ x \d+ \(len\(cin\) x len\(cout\)\)",
    ),
    (
        "lut overhead",
        lut(lambda d: d.__setitem__("overhead_ms", -1)),
        r"overhead_ms must be a finite number >= 0; got -1",
    ),
    ("lut scale", lut(lambda d: d.__setitem__("scale", 0)), r"scale must be a finite number > 0; got 0"),
    (
        "lut sigma",
        lut(lambda d: d.__setitem__("sigma", "wide")),
        r"sigma must be a finite number >= 0; got 'wide'",
    ),
    ("lut key", lut(lambda d: d["tables"].__setitem__("Conv 3x3!", {})), r"'Conv 3x3!' is not a layer key"),
    ("lut missing tables", lut(lambda d: d.pop("tables")), r"edited_lut.json has no 'tables'"),
    (
        "lut not json",
        lut(lambda d: None, raw="{tables: nope"),
        r"latency table .*edited_lut.json is not JSON",
    ),
    # architectures from YAML
    (
        "arch string width",
        arch_file(_cell("out", "16")),
        r"found_arch.yaml: cell 0: out must be a whole number; got '16'",
    ),
    ("arch fractional width", arch_file(_cell("mid", 4.5)), r"cell 0: mid must be a whole number; got 4.5"),
    ("arch negative width", arch_file(_cell("out", -4)), r"cell 0: widths must be >= 1"),
    (
        "arch bool stride",
        arch_file(_cell("stride", True)),
        r"cell 0: stride must be a whole number; got True",
    ),
    ("arch unknown cell key", arch_file(_cell("width", 4)), r"cell 0: unknown keys \['width'\]"),
    (
        "arch exits",
        arch_file(lambda s: s.__setitem__("exits", [1, 1, 1, 1])),
        r"ArchSpec exits must be a list\[bool\]",
    ),
    (
        "arch dropout",
        arch_file(lambda s: s.__setitem__("dropout", "none")),
        r"ArchSpec dropout must be a finite number",
    ),
    (
        "arch input size",
        arch_file(lambda s: s.__setitem__("input_size", 0)),
        r"ArchSpec.input_size must be >= 1; got 0",
    ),
    (
        "arch kind vs cells",
        arch_file(lambda s: s.__setitem__("kind", "mobilenet_v2")),
        r"a mobilenet_v2 network is made of \['inverted'\] cells; this spec has \['basic'\]",
    ),
    (
        "arch alias",
        arch_file(lambda s: None, text="a: &x [1]\nb: *x\n"),
        r"architecture file .*found_arch.yaml uses an alias",
    ),
    # YAML
    ("yaml alias bomb", config_file(BOMB), r"config .*cfg.yaml expands into more than 100000 nodes"),
    (
        "yaml not a mapping",
        config_file("- trainer\n- model\n"),
        r"config .*cfg.yaml must be a mapping of keys .* holds a list",
    ),
    (
        "yaml binary",
        config_file(b"\x80\x81secret"),
        r"config .*cfg.yaml is not a text file \(not UTF-8 at byte 0\)",
    ),
    (
        "yaml syntax",
        config_file("trainer: [1, 2\nmodel: x\n"),
        r"cfg.yaml is not valid YAML at line 2, column 6",
    ),
    # checkpoints given to fit, test, validate and device_bench
    (
        "ckpt test truncated",
        checkpoint_for("test", "truncated"),
        r"cannot read checkpoint .*truncated.ckpt: it is truncated or not",
    ),
    ("ckpt validate text", checkpoint_for("validate", "text"), r"cannot read checkpoint .*text.ckpt"),
    (
        "ckpt test nan",
        checkpoint_for("test", "nan"),
        r"checkpoint .*nan.ckpt holds non-finite weights \(.*NaN\)\), so it cannot be tested",
    ),
    ("ckpt fit missing", checkpoint_for("fit", "missing"), r"checkpoint .*missing.ckpt does not exist"),
    (
        "ckpt export truncated",
        checkpoint_for("export", "truncated"),
        r"error: cannot read checkpoint .*truncated.ckpt",
    ),
    # two channel searches in one run
    (
        "snip + fisher",
        ok(cli_fit("--fisher", "{target_fraction: 0.5}")),
        r"SnipPruning and FisherPruning are both channel searches",
    ),
    (
        "fisher + switches",
        ok(cli_fit("--snip", "null", "--fisher", "{target_fraction: 0.5}", "--switch_l1", "{lam: 0.1}")),
        r"(FisherPruning and SwitchL1|SwitchL1 and FisherPruning) are both channel searches",
    ),
    (
        "morphnet + fisher",
        ok(cli_fit("--snip", "null", "--fisher", "{target_fraction: 0.5}", "--morphnet", "{strength: 0.1}")),
        r"(MorphNet and FisherPruning|FisherPruning and MorphNet) are both channel searches",
    ),
    # misc
    ("run_dir empty", run_dir_empty, r"--run_dir is empty"),
    ("tflite empty", tflite_file(b""), r"model file .*model.tflite is empty"),
    ("tflite not a model", tflite_file(b"<html>not found</html>"), r"model.tflite is not a TFLite model"),
    ("host shell characters", ssh_host("pi;reboot"), r"invalid ssh host 'pi;reboot'"),
    ("host command substitution", ssh_host("pi$(id)`id`"), r"invalid ssh host 'pi\$\(id\)`id`'"),
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
    new = CASES[[c[0] for c in CASES].index("data train label") :]
    assert len(new) >= 40, "issue 29: the matrix grows by at least 40 cases"
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
