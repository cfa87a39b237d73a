"""The command line as users run it: named callback keys, run directories, resume warnings, quiet runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from callbacks import NAMED_CALLBACKS, DeviceBench, Growing, LastCheckpoint, PublishBest, SnipPruning
from lit_nas.data import SyntheticDataModule
from lit_nas_cli import (
    CONFIG_DIR,
    REPO_ROOT,
    LitNASCLI,
    resolve_config_args,
    resolve_run,
    warn_changed_settings,
)
from tests.helpers import tiny_data, tiny_trainer
from tests.run_helpers import train_py as train

TINY_SNIP = str(REPO_ROOT / "tests" / "configs" / "tiny_snip.yaml")


def build(*args: str) -> LitNASCLI:
    return LitNASCLI(args=resolve_config_args(["--trainer.logger=false", *args]), run=False)


def of(cli: LitNASCLI, cls: type) -> list:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]


def test_every_callback_is_tuned_switched_off_and_on_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(
        "--config",
        "dense_iterative_fast.yaml",
        "--snip.keep_ratio",
        "0.5",
        "--growing.grow_epochs",
        "[2,4,6]",
        "--device_bench",
        "null",
    )
    (snip,), (grow,) = of(cli, SnipPruning), of(cli, Growing)
    assert snip.keep_ratio == [0.5] and snip.mode == "iterative"  # the rest of the YAML stays
    assert grow.grow_epochs == [2, 4, 6]
    assert not of(cli, DeviceBench)
    quick = build("--config", "quickstart.yaml", "--device_bench", "null", "--snip", "{keep_ratio: 0.4}")
    assert not of(quick, DeviceBench) and of(quick, SnipPruning)[0].keep_ratio == [0.4]
    assert of(build("--config", "quickstart.yaml"), DeviceBench)


def test_print_config_shows_the_named_callbacks(tmp_path):
    out = train(
        tmp_path,
        "--config",
        "dense_iterative_fast.yaml",
        "--snip.keep_ratio",
        "0.5",
        "--device_bench",
        "null",
        "--print_config",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["snip"]["class_path"] == "callbacks.SnipPruning"
    assert config["snip"]["init_args"]["keep_ratio"] == 0.5
    assert config["device_bench"] is None
    assert set(NAMED_CALLBACKS) <= set(config)


def test_no_shipped_config_lists_a_lit_nas_callback_under_trainer_callbacks():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        listed = [c["class_path"] for c in config["trainer"].get("callbacks", [])]
        assert not [c for c in listed if c.startswith("callbacks.")], path.name
        for cb in config["trainer"].get("callbacks", []):
            assert not cb.get("init_args", {}).get("save_last"), f"{path.name}: LastCheckpoint owns last.ckpt"


def test_every_fit_gets_a_last_checkpoint_in_its_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build("--config", TINY_SNIP)
    (last,) = of(cli, LastCheckpoint)
    assert last.path == Path("runs/tiny_snip/checkpoints/last.ckpt")
    assert cli.trainer.checkpoint_callback.dirpath == "runs/tiny_snip/checkpoints"
    own = build("--config", TINY_SNIP, "--run_dir", str(tmp_path / "mine"))
    assert of(own, LastCheckpoint)[0].path == tmp_path / "mine" / "checkpoints" / "last.ckpt"


def test_default_root_dir_is_where_the_run_directories_go(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    first = build("--config", TINY_SNIP, "--trainer.default_root_dir", str(root))
    run_dir = root / "tiny_snip"
    assert of(first, LastCheckpoint)[0].path == run_dir / "checkpoints" / "last.ckpt"
    assert Path(first.trainer.default_root_dir) == run_dir  # what Lightning writes goes into the run
    assert not (tmp_path / "runs").exists()
    # --ckpt_path last looks there too: it finds this run's last.ckpt, not one under ./runs
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")  # found by name; resume is tested elsewhere
    from lit_nas.runs import release_unused_run_dirs

    release_unused_run_dirs()
    again = resolve_run(None, "last", "tiny_snip", root)
    assert again == (str(run_dir), str(run_dir / "checkpoints" / "last.ckpt"))
    # a second new run under the same root is numbered beside the first (which is held by this process)
    second = build("--config", TINY_SNIP, "--trainer.default_root_dir", str(root))
    assert of(second, LastCheckpoint)[0].path.parent.parent.name == "tiny_snip_1"


def test_resuming_with_changed_settings_names_each_value_and_uses_the_checkpoints(tmp_path):
    base = ["--config", TINY_SNIP, "--growing", "null", "--test_after_fit", "false"]
    wandb = ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.save_dir", "runs"]
    first = train(tmp_path, *base, "--trainer.max_epochs", "1", *wandb)
    assert first.returncode == 0, first.stderr[-3000:]
    noises = (
        "LightningCLI's args parameter",
        "litlogger",
        "LeafSpec",
        "`weights_only` was not set",
        "WARNING",
    )
    for noise in noises:  # "WARNING": wandb's "git root runs does not exist" and "anonymous setting"
        assert noise not in first.stderr + first.stdout, noise
    changed = ["--model.init_args.optimizer.lr", "0.5", "--model.init_args.net.stage_widths", "[4,8,16]"]
    resumed = train(tmp_path, *base, "--trainer.max_epochs", "2", "--ckpt_path", "last", *changed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "settings that differ from the checkpoint's; the checkpoint's values are used" in resumed.stderr
    assert "model.optimizer.lr: config/command line 0.5, checkpoint 0.05" in resumed.stderr
    assert "model.net.stage_widths: config/command line [4, 8, 16], checkpoint [4, 8, 8]" in resumed.stderr
    last = torch.load(tmp_path / "runs/tiny_snip/checkpoints/last.ckpt", weights_only=True)
    assert last["hyper_parameters"]["optimizer"]["lr"] == 0.05 and last["epoch"] == 1


def test_a_resume_with_the_same_settings_warns_about_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build("--config", TINY_SNIP, "--growing", "null", "--trainer.max_epochs", "1")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    same = build("--config", TINY_SNIP, "--growing", "null", "--run_dir", "elsewhere")
    assert warn_changed_settings(same.config, "runs/tiny_snip/checkpoints/last.ckpt") == []


def test_cifar10_missing_offline_is_one_short_message_and_leaves_no_run_directory(tmp_path):
    out = train(
        tmp_path,
        "--config",
        "resnet_ic.yaml",
        "--data.init_args.root",
        str(tmp_path / "data"),
        "--data.init_args.download",
        "false",
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "error: CIFAR-10 not found in" in out.stderr and "NAME_fast.yaml" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 6, out.stderr
    assert not list(tmp_path.rglob("offline-run-*")) and not list(tmp_path.rglob("*.ckpt"))
    assert not (tmp_path / "runs" / "resnet_ic").exists()


def test_synthetic_data_defaults_hold_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(
        "--config", TINY_SNIP, "--data", "lit_nas.data.SyntheticDataModule", "--data.num_train", "200"
    )
    assert isinstance(cli.datamodule, SyntheticDataModule)
    assert cli.datamodule.val_size == 20 and cli.datamodule.augment is False


# -- PublishBest: a teacher is only ever replaced by a better one ------------------------------------------
def publish_run(
    tmp_path: Path, name: str, target: Path, lr: float = 0.05, monitor: str = "val/acc", mode: str = "max"
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_nas import MultiExitModule, NetConfig
    from lit_nas.optim import OptimizerConfig
    from tests.helpers import TINY

    dm = tiny_data()
    model = MultiExitModule(net=NetConfig(**TINY), data_shape=dm.data_shape, optimizer=OptimizerConfig(lr=lr))
    publish = PublishBest(str(target), mode=mode)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, monitor=monitor, mode=mode)
    trainer = tiny_trainer(
        tmp_path / name, max_epochs=2, enable_checkpointing=True, callbacks=[ckpt, publish]
    )
    trainer.fit(model, datamodule=dm)
    return publish, ckpt


def test_publish_best_writes_only_a_better_teacher(tmp_path):
    target = tmp_path / "teachers" / "t" / "best.ckpt"
    publish, ckpt = publish_run(tmp_path, "a", target)
    assert publish.outcome == "published"
    assert target.read_bytes() == Path(ckpt.best_model_path).read_bytes()
    assert publish.published_score() == pytest.approx(float(ckpt.best_model_score))
    good = target.read_bytes()
    # a worse rerun: the published score is higher than anything this run reaches
    record = target.with_name("best.ckpt.json")
    record.write_text(record.read_text().replace(f'"score": {publish.published_score()}', '"score": 2.0'))
    again, _ = publish_run(tmp_path, "b", target)
    assert again.outcome == "kept" and target.read_bytes() == good
    # a diverging rerun fails before fit end: nothing is published
    from lit_nas.runs import NonFiniteError

    with pytest.raises(NonFiniteError):
        publish_run(tmp_path, "c", target, lr=1e8)
    assert target.read_bytes() == good
    assert not list(target.parent.glob(".*tmp*"))


def test_publish_best_never_compares_scores_of_two_monitors(tmp_path, capsys):
    """A teacher published for val/acc (max) is not replaced by a run whose val/loss (min) is lower."""
    target = tmp_path / "teachers" / "t" / "best.ckpt"
    first, _ = publish_run(tmp_path, "a", target)
    assert first.outcome == "published"
    good = target.read_bytes()
    record = target.with_name("best.ckpt.json")
    record.write_text(record.read_text().replace(f'"score": {first.published_score()}', '"score": 50.0'))
    other, ckpt = publish_run(tmp_path, "b", target, monitor="val/loss", mode="min")
    assert float(ckpt.best_model_score) < 50.0  # "better" if compared as numbers
    assert other.outcome == "kept" and target.read_bytes() == good
    assert "published for val/acc (max), this run monitors val/loss (min)" in capsys.readouterr().out
    # a record that is not one is named, and the published checkpoint stays
    target.with_name("best.ckpt.json").write_text("[1, 2]")
    third, _ = publish_run(tmp_path, "c", target)
    assert third.outcome == "kept" and target.read_bytes() == good
    assert "best.ckpt.json is not a score record" in capsys.readouterr().out


def test_a_setting_refused_at_fit_start_is_one_message_and_exit_1(tmp_path):
    out = train(tmp_path, "--config", TINY_SNIP, "--snip.prune_epochs", "[0]")
    assert out.returncode == 1
    assert "error: SnipPruning can never finish" in out.stderr and "refused before training" in out.stderr
    assert "Traceback" not in out.stderr
