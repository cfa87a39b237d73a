"""The CLI: every config runs, bare config names resolve, bad input fails before training, W&B offline."""

import itertools
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from callbacks import Distillation, LastCheckpoint
from lit_nas_cli import CONFIG_DIR, LitNASCLI, resolve_config_args
from tests.dataset_files import skip_md5, write_idx, write_tiny_cifar10
from tests.run_helpers import train_py
from tests.wandb_records import history

CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


@pytest.fixture
def tiny_fashion(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for name, shape in [
        ("train-images-idx3-ubyte", (96, 28, 28)),
        ("train-labels-idx1-ubyte", (96,)),
        ("t10k-images-idx3-ubyte", (32, 28, 28)),
        ("t10k-labels-idx1-ubyte", (32,)),
    ]:
        write_idx(root / f"{name}.gz", rng.integers(0, 10 if len(shape) == 1 else 256, shape), gz=True)
    return root


def data_args(config: str, tmp_path: Path, tiny_fashion: Path, monkeypatch) -> list[str]:
    text = (CONFIG_DIR / config).read_text()
    if "holdout_size" in text:  # a search's held-out split, sized for the tiny data
        return ["--data.init_args.holdout_size=16", *data_args_of(text, tmp_path, tiny_fashion, monkeypatch)]
    return data_args_of(text, tmp_path, tiny_fashion, monkeypatch)


def data_args_of(text: str, tmp_path: Path, tiny_fashion: Path, monkeypatch) -> list[str]:
    if "CIFAR10DataModule" in text:
        write_tiny_cifar10(tmp_path / "cifar", per_batch=20)
        skip_md5(monkeypatch)
        return [f"--data.init_args.root={tmp_path / 'cifar'}", "--data.init_args.download=false"]
    if "FashionMNISTDataModule" in text:
        return [f"--data.init_args.root={tiny_fashion}"]
    return []


def test_configs_exist():
    assert {
        "quickstart.yaml",
        "resnet_ic.yaml",
        "baseline_resnet.yaml",
        "growing.yaml",
        "growing_fast.yaml",
    } <= set(CONFIGS)


def tiny_teacher(tmp_path: Path, shape) -> Path:
    """A lit_nas checkpoint of a tiny network for data of ``shape`` (one training step)."""
    import lightning as L
    import torch

    from lit_nas import MultiExitModule, NetConfig
    from lit_nas.data import SyntheticDataModule

    torch.manual_seed(0)
    recipe = NetConfig(stage_widths=[4, 8, 8], cells_per_stage=[1, 1, 1], exit_depths=[1.0])
    teacher = MultiExitModule(net=recipe, data_shape=shape)
    data = SyntheticDataModule(
        num_train=64,
        num_test=32,
        in_channels=shape.in_channels,
        input_size=shape.input_size,
        num_classes=shape.num_classes,
        batch_size=16,
    )
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(teacher, datamodule=data)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses_and_trains_a_few_batches(config, tmp_path, tiny_fashion, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "--config",
        config,  # bare name: resolved under configs/
        "--trainer.fast_dev_run=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=8",
        "--data.init_args.val_size=16",
        *data_args(config, tmp_path, tiny_fashion, monkeypatch),
    ]
    cli = LitNASCLI(args=resolve_config_args(args), run=False)
    # every shipped config writes <default_root_dir>/<name>/checkpoints/last.ckpt every epoch, whatever its
    # monitor does
    (last,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, LastCheckpoint)]
    assert last.path == tmp_path / Path(config).stem / "checkpoints" / "last.ckpt"
    for cb in cli.trainer.callbacks:
        if isinstance(cb, Distillation) and cb.teacher_path is not None:  # the teacher of a previous run
            cb.teacher_path = str(tiny_teacher(tmp_path, cli.datamodule.data_shape))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 2
    shape = cli.datamodule.data_shape
    assert cli.model.arch_spec.in_channels == shape.in_channels  # linked from the datamodule
    assert cli.model.arch_spec.input_size == shape.input_size


def test_bare_config_names_resolve_under_configs(tmp_path):
    assert resolve_config_args(["fit", "--config", "quickstart.yaml"]) == [
        "fit",
        "--config",
        str(CONFIG_DIR / "quickstart.yaml"),
    ]
    assert resolve_config_args(["fit", "--config=quickstart"]) == [
        "fit",
        f"--config={CONFIG_DIR / 'quickstart.yaml'}",
    ]
    own = tmp_path / "mine.yaml"
    own.write_text("trainer: {}\n")
    assert resolve_config_args(["fit", "-c", str(own)]) == ["fit", "-c", str(own)]  # existing paths win
    assert resolve_config_args(["fit", "--config", "nope.yaml"])[-1] == "nope.yaml"  # left for the parser


def cli_error(args, capsys) -> str:
    """Build the CLI (no training); return the error text."""
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as err:
        LitNASCLI(
            args=resolve_config_args(["--config", "quickstart.yaml", "--trainer.logger=false", *args]),
            run=False,
        )
    return str(err.value) + capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.init_args.net.kind=vgg"],
            "kind 'vgg'; valid choices: ['mnasnet', 'mobilenet_v1', 'mobilenet_v2', 'resnet_sdn', "
            "'wide_resnet']",
        ),
        (["--model.init_args.net.stage_widths=[16,32]"], "must have the same length"),
        (["--model.init_args.net.block_cells=[3,3,2,2]"], "sum to 10 but there are 9 cells"),
        (
            [
                "--model.init_args.lr_schedule.name=multistep",
                "--model.init_args.lr_schedule.milestones=[60,35]",
            ],
            "strictly increasing",
        ),
        (
            ["--model.init_args.lr_schedule.name=multistep", "--model.init_args.lr_schedule.gammas=[0.1]"],
            "one gamma per milestone",
        ),
        (["--model.init_args.exit_loss.weights=[1,1]"], "have 2 entries; the network has 4 blocks"),
        (["--model.init_args.optimizer.name=rmsprop"], "rmsprop"),
    ],
)
def test_bad_input_fails_before_training(args, message, capsys):
    assert message in cli_error(args, capsys)


def test_missing_dataset_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr("lit_nas.data.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    cli = LitNASCLI(
        args=resolve_config_args(
            ["--config", "quickstart.yaml", "--trainer.logger=false", f"--data.init_args.root={tmp_path}"]
        ),
        run=False,
    )
    from lit_nas.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def run_train(tmp_path: Path, *extra: str, config: str = "quickstart.yaml") -> subprocess.CompletedProcess:
    """``train.py fit`` as a new user runs it: a fresh environment, W&B not logged in."""
    return train_py(tmp_path, "--config", config, *extra, timeout=600, home=tmp_path)


def test_train_py_end_to_end_with_wandb_offline(tmp_path, tiny_fashion):
    """The user's command: W&B offline by default, per-exit curves in the run, config saved per run."""
    args = [
        f"--data.init_args.root={tiny_fashion}",
        "--data.init_args.val_size=16",
        "--data.init_args.batch_size=16",
        "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    first = run_train(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Early exit on the test set" in first.stdout
    second = run_train(tmp_path, *args)  # a second run must not trip over the first one's files
    assert second.returncode == 0, second.stderr[-3000:]
    run_dirs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    for run in run_dirs:
        rows = history(next(run.glob("run-*.wandb")))
        keys = {k for row in rows for k in row}
        for e in range(4):
            assert {f"val/acc_exit{e}", f"train/acc_exit{e}", f"test/acc_exit{e}"} <= keys
        assert "test/early_exit/acc_q0.9" in keys
        assert sum("val/acc_exit0" in row for row in rows) == 2  # one point per epoch: a curve
        saved = (run / "files" / "lit_nas_config.yaml").read_text()
        assert "lit_nas.module.MultiExitModule" in saved and "FashionMNISTDataModule" in saved


def run_short(tmp_path: Path, config: str, root: Path, epochs: int) -> subprocess.CompletedProcess:
    """``config`` through train.py on the Fashion-MNIST files in ``root``: 2 batches of 16 per epoch."""
    proc = run_train(
        tmp_path,
        f"--data.init_args.root={root}",
        "--data.init_args.val_size=16",
        "--data.init_args.batch_size=16",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        config=config,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_growing_fast_with_train_py_logs_growth_to_wandb(tmp_path, tiny_fashion):
    """growing_fast.yaml through train.py: blocks activate at 2/3/4, grow/* curves and tables in the run."""
    proc = run_short(tmp_path, "growing_fast.yaml", tiny_fashion, epochs=5)
    for block, epoch in [(1, 2), (2, 3), (3, 4)]:
        assert f"Growing: block {block} activated at epoch {epoch} (random init)" in proc.stdout
    assert "active: 4/4 blocks, 311,259 of 311,259 parameters" in proc.stdout
    rows = history(next((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")))
    active = [float(r["grow/active_blocks"]) for r in rows if "grow/active_blocks" in r]
    assert active == [1, 1, 2, 3, 4]
    params = [float(r["grow/active_params"]) for r in rows if "grow/active_params" in r]
    assert params[0] < params[2] < params[3] < params[4] == 311_259
    assert sum("grow/architecture/_type" in r for r in rows) == 3  # one W&B table per growth
    assert sum("val/acc_exit3" in r for r in rows) == 1  # the last exit exists from epoch 4 only
    full = [r["val/acc_full"] for r in rows if "val/acc_full" in r]
    assert full[:4] == ["NaN"] * 4 and full[4] != "NaN"
    # the checkpoint tested after fit is the complete network: the only complete epoch is 4
    assert "best-epoch=004.ckpt" in proc.stdout + proc.stderr
    assert any("test/acc_exit3" in r for r in rows)


def test_dense_iterative_fast_with_train_py_logs_pruning_to_wandb(tmp_path):
    """The flagship's fast twin through train.py: pruning events, snip/* curves, map, found architecture."""
    proc = run_short(tmp_path, "dense_iterative_fast.yaml", fake_fashion(tmp_path), epochs=9)
    for epoch in (1, 3, 4, 5, 6, 7):
        assert f"SnipPruning at epoch {epoch} (iterative, reinit=False):" in proc.stdout
    assert "block 3: step 3/3, keep 0.300" in proc.stdout
    run_dir = next((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    rows = history(next(run_dir.glob("run-*.wandb")))
    kept = [float(r["snip/kept_params"]) for r in rows if "snip/kept_params" in r]
    assert len(kept) == 9 and kept[0] > kept[1] > kept[5] > kept[7] == kept[8]
    sparsity = [float(r["snip/sparsity_block3"]) for r in rows if "snip/sparsity_block3" in r]
    assert sparsity[4] == 0.0 and abs(sparsity[-1] - 0.7) < 1e-3
    assert sum("snip/connectivity/_type" in r for r in rows) == 6  # one image per pruning event
    assert sum("snip/connectivity_table/_type" in r for r in rows) == 6
    assert len(list(run_dir.glob("files/snip/connectivity_epoch00*.png"))) == 6
    full = [r["val/acc_full"] for r in rows if "val/acc_full" in r]
    # the last pruning opens epoch 7: only the finished network (epochs 7, 8) can be the checkpoint tested
    assert full[:7] == ["NaN"] * 7 and "NaN" not in full[7:]
    assert int(re.search(r"best-epoch=(\d+)\.ckpt", proc.stdout + proc.stderr).group(1)) >= 7
    found = list((tmp_path / "runs").glob("dense_iterative_fast/checkpoints/found_arch.yaml"))
    assert found and (found[0].parent / "found_masks.pt").is_file()


def fake_fashion(tmp_path: Path) -> Path:
    """Random images in Fashion-MNIST's IDX files (176 train, 32 test)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for name, n in [("train", 176), ("t10k", 32)]:
        write_idx(root / f"{name}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=False)
        write_idx(root / f"{name}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz=False)
    return root


def test_shrinknet_fast_with_train_py_logs_switches_and_waits_for_them(tmp_path):
    """shrinknet_fast.yaml via train.py: switch/* curves and heatmaps; selection waits for the switches."""
    proc = run_short(tmp_path, "shrinknet_fast.yaml", fake_fashion(tmp_path), epochs=6)
    assert "SwitchL1: switches frozen at epoch 5" in proc.stdout
    run_dir = next((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    rows = history(next(run_dir.glob("run-*.wandb")))
    live = [float(r["switch/live_channels"]) for r in rows if "switch/live_channels" in r]
    assert len(live) == 6 and all(a >= b for a, b in itertools.pairwise(live))
    assert sum("switch/live/_type" in r for r in rows) == 6  # one heatmap per epoch
    assert any("switch/live/cell0.mid" in r for r in rows)
    full = [r["val/acc_full"] for r in rows if "val/acc_full" in r]
    assert full[:5] == ["NaN"] * 5 and full[5] != "NaN"
    assert "best-epoch=005.ckpt" in proc.stdout + proc.stderr


def test_an_unfinished_search_tests_the_final_weights_not_an_arbitrary_checkpoint(tmp_path):
    """fisher_fast.yaml stopped before pruning starts: no real val/acc_full, so no 'best' checkpoint."""
    proc = run_short(tmp_path, "fisher_fast.yaml", fake_fashion(tmp_path), epochs=2)
    assert "no checkpoint has a real val/acc_full" in proc.stderr
    assert "testing the final weights" in proc.stderr
    rows = history(next((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")))
    assert any("test/acc_exit3" in r for r in rows)
