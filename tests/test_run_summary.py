"""RunSummary: summary.json holds what was tested, the network as it ships, and the wall time split."""

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import (
    FisherPruning,
    GarbageCollection,
    MorphNet,
    NetAdapt,
    RetrainFromScratch,
    RunSummary,
    SnipPruning,
)
from lit_nas.data import SyntheticDataModule
from lit_nas.summary import shipped_net
from tests.helpers import tiny_data as data
from tests.helpers import tiny_module, tiny_trainer


def fit_and_test(tmp_path, callbacks, max_epochs=3, dm=None, **kwargs):
    module = tiny_module()
    summary = RunSummary(str(tmp_path / "run"), "tiny", overrides=["--x", "1"], seed=0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "run" / "checkpoints"), monitor="val/acc", mode="max")
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=max_epochs,
        callbacks=[*callbacks, ckpt, summary],
        enable_checkpointing=True,
        **kwargs,
    )
    dm = dm or data()
    trainer.fit(module, datamodule=dm)
    fitted = json.loads(summary.path.read_text())
    trainer.test(module, datamodule=dm, ckpt_path=ckpt.best_model_path)
    return module, trainer, summary, fitted, json.loads(summary.path.read_text())


def test_summary_of_a_snip_search_retrained_from_scratch(tmp_path):
    snip = SnipPruning(keep_ratio=0.3, after_epochs=0, criterion_batch_size=16)
    retrain = RetrainFromScratch(epoch=2)
    module, trainer, _, fitted, s = fit_and_test(tmp_path, [snip, retrain], max_epochs=4)
    # written at fit end without the test, then again with it
    assert fitted["tested"] is False and fitted["test_acc"] is None
    assert s["tested"] is True and s["config"] == "tiny" and s["overrides"] == ["--x", "1"] and s["seed"] == 0
    metrics = trainer.callback_metrics
    for b, acc in s["test_acc"].items():
        assert acc == float(metrics[f"test/acc_exit{b}"])
    assert s["checkpoint"] == trainer.checkpoint_callback.best_model_path
    assert s["best_epoch"] == torch.load(s["checkpoint"], weights_only=True)["epoch"]
    # the oracle for the counts: the parameters of the tested network, nonzero ones after masking
    params = [p for p in shipped_net(module.net).parameters()]
    assert s["params"] == sum(p.numel() for p in params)
    zeros = sum(int((m == 0).sum()) for m in module.masks().values())
    assert s["nonzero_params"] == s["params"] - zeros
    assert s["nonzero_params"] >= sum(int(torch.count_nonzero(p)) for p in params)  # a weight may be 0
    assert zeros > 0.3 * s["params"]  # SNIP kept 30% of the prunable weights
    assert len(s["early_exit"]) == len(module.thresholds)
    # the loop time is split at the restart
    wall = s["wall_s"]
    assert wall["search"] > 0 and wall["retrain"] > 0
    assert wall["search"] + wall["retrain"] == wall["fit"]
    assert wall["test"] > 0 and wall["after_fit"] >= 0
    cpu = s["cpu_s"]
    assert cpu["search"] > 0 and cpu["retrain"] > 0 and cpu["search"] + cpu["retrain"] == cpu["fit"]


def test_summary_counts_the_network_after_garbage_collection(tmp_path):
    fisher = FisherPruning(every_n_steps=1, per_step=2, stop_at="channels", target_fraction=0.7)
    module, _, _, _, s = fit_and_test(tmp_path, [fisher, GarbageCollection(after_prune=True)], max_epochs=2)
    full = tiny_module()
    assert s["params"] == sum(p.numel() for p in shipped_net(module.net).parameters())
    assert s["params"] < sum(p.numel() for p in full.net.parameters())
    assert s["nonzero_params"] is None  # no masks
    shipped = {**module.arch_spec.to_dict(), "gated": {}}  # the shipped network: gates folded
    assert s["arch"] == shipped and s["found_arch"].endswith("found_arch.yaml")
    assert s["wall_s"]["search"] == s["wall_s"]["fit"] and s["wall_s"]["retrain"] == 0.0


@pytest.mark.parametrize(
    "search",
    [
        lambda: NetAdapt(
            stop_at="flops", target_fraction=0.9, step_fraction=0.05, start_epoch=1, short_term_batches=1
        ),
        lambda: MorphNet(strength=30.0, threshold=0.2, until_epoch=1, budget_fraction=1.0),
        lambda: None,  # negative control: a plain run has no search time
    ],
    ids=["netadapt", "morphnet", "plain"],
)
def test_every_architecture_search_books_its_time_as_search(tmp_path, search):
    callback = search()
    dm = SyntheticDataModule(num_train=208, num_test=64, input_size=16, batch_size=32, holdout_size=48)
    _, _, _, _, s = fit_and_test(tmp_path, [callback] if callback else [], max_epochs=2, dm=dm)
    wall = s["wall_s"]
    assert wall["fit"] > 0 and wall["retrain"] == 0.0
    assert wall["search"] == (wall["fit"] if callback else 0.0)


class Probe(RunSummary):
    """Records the loop time it starts training with (restored from the checkpoint, or 0)."""

    def on_train_start(self, trainer, pl_module):
        self.start_elapsed = dict(self.elapsed_s)
        super().on_train_start(trainer, pl_module)


def test_a_resumed_run_keeps_the_loop_time_before_its_checkpoint(tmp_path):
    first = Probe(str(tmp_path / "run"), "tiny")  # the same class: callback state is keyed by class
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[ckpt, first], enable_checkpointing=True)
    trainer.fit(tiny_module(), datamodule=data())
    checkpoint = torch.load(ckpt.last_model_path, weights_only=False)
    key = next(k for k in checkpoint["callbacks"] if "Probe" in k)
    elapsed = checkpoint["callbacks"][key]["elapsed_s"]["wall"]
    assert 0 < elapsed <= first.wall["fit"]
    resumed = Probe(str(tmp_path / "run2"), "tiny")
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[resumed], enable_checkpointing=False)
    trainer.fit(tiny_module(), datamodule=data(), ckpt_path=ckpt.last_model_path)
    assert resumed.start_elapsed["wall"] == elapsed and resumed.wall["fit"] > elapsed
    # negative control: the same checkpoint without this callback's state starts counting from 0
    del checkpoint["callbacks"][key]
    torch.save(checkpoint, tmp_path / "stripped.ckpt")
    fresh = Probe(str(tmp_path / "run3"), "tiny")
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[fresh], enable_checkpointing=False)
    trainer.fit(tiny_module(), datamodule=data(), ckpt_path=str(tmp_path / "stripped.ckpt"))
    assert fresh.start_elapsed == {"wall": 0.0, "cpu": 0.0}
