"""RetrainFromScratch: fresh or rewound weights, masks and widths kept, optimizer and LR restarted, resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import GarbageCollection, RetrainFromScratch
from lit_nas import ArchSpec, DataShape, MultiExitModule, NetConfig
from lit_nas.gates import attach_gates
from lit_nas.masks import save_masks
from lit_nas.optim import LRScheduleConfig
from tests.helpers import TINY, tiny_trainer
from tests.helpers import tiny_data as data


def masked_module() -> MultiExitModule:
    """The tiny SDN with half of every block's weights masked, and LR x0.1 after epoch 1."""
    torch.manual_seed(0)
    module = MultiExitModule(
        net=NetConfig(**TINY),
        data_shape=DataShape(3, 16, 10),
        lr_schedule=LRScheduleConfig(name="multistep", milestones=[1], gammas=[0.1]),
    )
    g = torch.Generator().manual_seed(0)
    masks = {
        n: (torch.rand(p.shape, generator=g) > 0.5).float()
        for ws in module.prunable_weights().values()
        for n, p in ws.items()
    }
    module.set_masks(masks)
    return module


class Snapshots(L.Callback):
    """Listed after RetrainFromScratch: the weights, LR and optimizer state at each epoch start."""

    def __init__(self) -> None:
        self.weights, self.lr, self.opt_state = {}, {}, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        e = trainer.current_epoch
        self.weights[e] = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        self.lr[e] = trainer.optimizers[0].param_groups[0]["lr"]
        self.opt_state[e] = len(trainer.optimizers[0].state)


def test_random_reinit_changes_every_unmasked_weight_and_keeps_the_architecture(tmp_path):
    module = masked_module()
    spec = module.arch_spec
    masks = {k: v.clone() for k, v in module.masks().items()}
    snaps = Snapshots()
    retrain = RetrainFromScratch(epoch=2, seed=7)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[retrain, snaps])
    trainer.fit(module, datamodule=data())
    before, after = snaps.weights[1], snaps.weights[2]
    for name, mask in masks.items():
        key = name.removeprefix("net.")
        kept = mask.bool()
        assert torch.all(after[key][kept] != before[key][kept]), key  # every unmasked weight is new
        assert torch.all(after[key][~kept] == 0), key  # pruned ones stay exactly zero
        assert torch.equal(after[f"{key}_mask"], mask)
    assert module.arch_spec == spec and retrain.restarted
    # optimizer state and LR schedule restart: epoch 2 had decayed to 0.01; after the restart 0.1, no momentum
    assert (
        snaps.lr[1] == pytest.approx(0.01) and snaps.lr[2] == pytest.approx(0.1) and snaps.opt_state[2] == 0
    )
    assert float(trainer.callback_metrics["retrain/started_epoch"]) == 2.0
    # the fresh weights are not the initial ones either
    assert not torch.equal(after["blocks.0.stem.conv.weight"], snaps.weights[0]["blocks.0.stem.conv.weight"])


def test_rewind_restores_the_weights_of_epoch_k_exactly_also_after_a_resume(tmp_path):
    def run(d, ckpt_path=None):
        module, snaps = masked_module(), Snapshots()
        retrain = RetrainFromScratch(epoch=3, init="rewind", rewind_epoch=1)
        cbs = [retrain, snaps, ModelCheckpoint(d, save_top_k=-1)]
        trainer = tiny_trainer(d, max_epochs=4, callbacks=cbs, enable_checkpointing=True)
        trainer.fit(module, datamodule=data(), ckpt_path=ckpt_path)
        return module, snaps

    ref, snaps = run(tmp_path / "a")
    for k, v in snaps.weights[1].items():
        assert torch.equal(snaps.weights[3][k], v), k  # the start of epoch 3 is the start of epoch 1 again
    assert not torch.equal(
        snaps.weights[2]["blocks.0.stem.conv.weight"], snaps.weights[1]["blocks.0.stem.conv.weight"]
    )
    # resumed after the snapshot (end of epoch 1) into a fresh module: the saved weights come from the ckpt
    resumed, snaps_b = run(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "epoch=1-step=8.ckpt"))
    for k, v in snaps.weights[1].items():
        assert torch.equal(snaps_b.weights[3][k], v), k
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


class AcceptFull(L.Callback):
    def __init__(self) -> None:
        self.values = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val/acc_full"]))


def test_model_selection_waits_for_the_restart(tmp_path):
    probe = AcceptFull()
    tiny_trainer(tmp_path, max_epochs=3, callbacks=[RetrainFromScratch(epoch=1, seed=0), probe]).fit(
        masked_module(), datamodule=data()
    )
    assert math.isnan(probe.values[0]) and not any(math.isnan(v) for v in probe.values[1:])


def test_rewinding_across_a_garbage_collection_is_refused(tmp_path):
    module = masked_module()
    with torch.no_grad():
        attach_gates(module.net, ["cell0.mid"])["cell0.mid"][0] = 0
    retrain = RetrainFromScratch(epoch=2, init="rewind", rewind_epoch=0)
    with pytest.raises(ValueError, match=r"cannot rewind to epoch 0: layers changed shape since \(garbage"):
        tiny_trainer(tmp_path, max_epochs=3, callbacks=[retrain, GarbageCollection(epochs=[0])]).fit(
            module, datamodule=data()
        )


def test_a_found_architecture_and_its_masks_train_from_scratch_in_a_new_run(tmp_path):
    """What a search writes (found_arch.yaml, found_masks.pt) is what --model.arch_spec and masks read."""
    module = masked_module()
    with torch.no_grad():
        attach_gates(module.net, ["stream1"])["stream1"][[0, 3]] = 0
    gc = GarbageCollection(epochs=[0])
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, callbacks=[gc, ModelCheckpoint(tmp_path / "ckpt")], enable_checkpointing=True
    )
    trainer.fit(module, datamodule=data())
    spec_path, masks_path = gc.found_paths
    assert spec_path == tmp_path / "ckpt" / "found_arch.yaml" and ArchSpec.load(spec_path) == module.arch_spec
    fresh = MultiExitModule(arch_spec=str(spec_path), masks=str(masks_path), data_shape=DataShape(3, 16, 10))
    assert fresh.arch_spec == module.arch_spec
    for name, mask in module.masks().items():
        assert torch.equal(fresh.masks()[name], mask)
        w = dict(fresh.named_parameters())[name]
        assert torch.all(w[mask == 0] == 0)
    other = tmp_path / "other_masks.pt"
    save_masks(other, masked_module().arch_spec, masked_module().masks())  # the uncollected architecture
    with pytest.raises(ValueError, match="was found for another architecture than the one trained"):
        MultiExitModule(arch_spec=str(spec_path), masks=str(other), data_shape=DataShape(3, 16, 10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(epoch=0), "epoch must be an integer >= 1; got 0"),
        (
            dict(epoch=3, init="lottery"),
            r"RetrainFromScratch init must be one of \['random', 'rewind'\]; got 'lottery'",
        ),
        (
            dict(epoch=3, init="rewind"),
            r"needs rewind_epoch in 0..2 \(before the restart at epoch 3\); got None",
        ),
        (dict(epoch=3, init="rewind", rewind_epoch=3), "got 3"),
        (dict(epoch=3, rewind_epoch=1), "rewind_epoch is only used with init: rewind"),
    ],
)
def test_bad_retrain_configs_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetrainFromScratch(**kwargs)


def test_a_restart_after_the_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="epoch 5 is not before max_epochs=3: it would never restart"):
        tiny_trainer(tmp_path, max_epochs=3, callbacks=[RetrainFromScratch(epoch=5)]).fit(
            masked_module(), datamodule=data()
        )


class PendingUntil(L.Callback):
    """A search whose end depends on training: pending until the start of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl_module.set_search_pending("Pending", trainer.current_epoch < self.epoch)


class RestartEpoch(L.Callback):
    def __init__(self) -> None:
        self.restarted_at = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        retrain = next(cb for cb in trainer.callbacks if isinstance(cb, RetrainFromScratch))
        if retrain.restarted and self.restarted_at is None:
            self.restarted_at = trainer.current_epoch


def test_the_restart_waits_for_a_search_that_is_still_running(tmp_path):
    probe = RestartEpoch()
    retrain = RetrainFromScratch(epoch=1)
    trainer = tiny_trainer(tmp_path, max_epochs=5, callbacks=[PendingUntil(3), retrain, probe])
    with pytest.warns(UserWarning, match=r"epoch 1 reached but \['Pending'\] still searching"):
        trainer.fit(masked_module(), datamodule=data())
    assert probe.restarted_at == 3


def test_the_restart_is_refused_at_fit_start_when_a_schedule_runs_past_it(tmp_path):
    from callbacks import Growing

    trainer = tiny_trainer(
        tmp_path, max_epochs=5, callbacks=[Growing([1, 2, 3]), RetrainFromScratch(epoch=2)]
    )
    with pytest.raises(
        ValueError, match=r"epoch 2 restarts while a search still changes the network \(Growing"
    ):
        trainer.fit(
            MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10)), datamodule=data()
        )
    assert trainer.global_step == 0
