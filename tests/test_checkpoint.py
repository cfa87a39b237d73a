"""The ArchSpec travels with every checkpoint and the module rebuilds itself from it on load."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_nas import ArchSpec, DataShape
from lit_nas.data import SyntheticDataModule
from lit_nas.module import ARCH_KEY, CheckpointArchError, MultiExitModule
from tests.helpers import tiny_module, tiny_trainer


def data():
    return SyntheticDataModule(num_train=128, num_test=64, input_size=16, batch_size=32)


def narrowed(module: MultiExitModule) -> ArchSpec:
    spec = ArchSpec.from_dict(module.arch_spec.to_dict())
    spec.cells[1].mid = 3  # inner width of the second cell: 8 -> 3 (as channel pruning would)
    return spec


def train_and_save(tmp_path, module, epochs=1):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(module, datamodule=data())
    return tmp_path / "ckpt" / "last.ckpt"


def test_width_change_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    m = tiny_module(seed=None)
    m.set_arch_spec(narrowed(m), rebuild=True)
    path = train_and_save(tmp_path, m)

    raw = torch.load(path, weights_only=True)  # plain data only: safe loading works
    assert raw[ARCH_KEY]["cells"][1]["mid"] == 3

    loaded = MultiExitModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.arch_spec == m.arch_spec
    assert loaded.net.blocks[1].cells[0].conv1.out_channels == 3
    x = torch.randn(4, 3, 16, 16)
    m.eval(), loaded.eval()
    for a, b in zip(m(x).logits, loaded(x).logits):
        torch.testing.assert_close(a, b)
    assert MultiExitModule.spec_from_checkpoint(path) == m.arch_spec


def test_fit_resumes_on_a_changed_network(tmp_path):
    m = tiny_module(seed=None)
    m.set_arch_spec(narrowed(m), rebuild=True)
    path = train_and_save(tmp_path, m, epochs=1)

    fresh = tiny_module(seed=None)  # built from the YAML recipe: the original, wider network
    assert fresh.net.blocks[1].cells[0].conv1.out_channels == 8
    trainer = tiny_trainer(tmp_path / "resume", max_epochs=2)
    trainer.fit(fresh, datamodule=data(), ckpt_path=path)
    assert trainer.current_epoch == 2
    assert fresh.net.blocks[1].cells[0].conv1.out_channels == 3
    # the optimizer was built on the rebuilt parameters and its restored momentum fits them
    opt = trainer.optimizers[0]
    params = {id(p) for p in fresh.parameters()}
    assert all(id(p) in params for g in opt.param_groups for p in g["params"])
    w = fresh.net.blocks[1].cells[0].conv1.weight
    assert opt.state[w]["momentum_buffer"].shape == w.shape


def test_resume_matches_uninterrupted_training(tmp_path):
    """Stop after one epoch and resume: same weights as two epochs straight (negative control: seed)."""

    def run(seed, root, resume_from=None, epochs=2):
        L.seed_everything(seed)
        m = tiny_module(seed=None)
        m.set_arch_spec(narrowed(m), rebuild=True)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer = tiny_trainer(root, max_epochs=epochs, enable_checkpointing=True, callbacks=[ckpt])
        trainer.fit(m, datamodule=data(), ckpt_path=resume_from)
        return m, root / "ckpt" / "last.ckpt"

    straight, _ = run(0, tmp_path / "a")
    _, half = run(0, tmp_path / "b", epochs=1)
    resumed, _ = run(0, tmp_path / "c", resume_from=half)
    other, _ = run(1, tmp_path / "d")
    for (k, a), b, _c in zip(
        straight.state_dict().items(), resumed.state_dict().values(), other.state_dict().values()
    ):
        torch.testing.assert_close(a, b, msg=k)
    assert any(not torch.equal(a, c) for a, c in zip(straight.parameters(), other.parameters()))


def test_checkpoint_without_arch_spec_is_rejected(tmp_path):
    path = train_and_save(tmp_path, tiny_module(seed=None))
    ckpt = torch.load(path, weights_only=True)
    del ckpt[ARCH_KEY]
    torch.save(ckpt, tmp_path / "no_spec.ckpt")
    with pytest.raises(CheckpointArchError, match="has no 'lit_nas_arch_spec' entry"):
        MultiExitModule.load_from_checkpoint(tmp_path / "no_spec.ckpt")

    ckpt = torch.load(path, weights_only=True)
    ckpt[ARCH_KEY]["block_cells"] = [1, 1]
    torch.save(ckpt, tmp_path / "corrupt.ckpt")
    with pytest.raises(
        CheckpointArchError, match=r"entry is corrupt: block_cells \[1, 1\] sum to 2 but there are 4 cells"
    ):
        MultiExitModule.load_from_checkpoint(tmp_path / "corrupt.ckpt")


def test_module_trains_a_saved_arch_spec(tmp_path):
    m = tiny_module(seed=None)
    spec = narrowed(m)
    spec.save(tmp_path / "found.yaml")
    trained = MultiExitModule(arch_spec=str(tmp_path / "found.yaml"), data_shape=DataShape(3, 16, 10))
    assert trained.arch_spec == spec
    with pytest.raises(ValueError, match="was built for other data"):
        MultiExitModule(arch_spec=str(tmp_path / "found.yaml"), data_shape=DataShape(1, 28, 10))
