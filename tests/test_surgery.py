"""Channel removal is exact: same logits, same training trajectory, optimizer state sliced, spec rebuilt."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lit_nas import DataShape, MultiExitModule, NetConfig, build_net
from lit_nas.data import SyntheticDataModule
from lit_nas.nets.base import MultiExitNet
from lit_nas.surgery import remove_channels
from tests.helpers import TINY, tiny_trainer

WRN_SE = dict(kind="wide_resnet", depth=16, widen_factor=1, se_reduction=4)


def make(dense: bool, **recipe) -> MultiExitNet:
    torch.manual_seed(0)
    return build_net(NetConfig(dense=dense, **(recipe or TINY)).build_spec(DataShape(3, 16, 10)))


def kill(net: MultiExitNet, group: str, dead: list[int]) -> None:
    """Make channels ``dead`` of ``group`` output exactly 0: zero their producing BN's scale and shift."""
    modules = dict(net.named_modules())
    g = next(g for g in net.channel_groups() if g.name == group)
    with torch.no_grad():
        for s in g.producers:
            if isinstance(modules[s.module], nn.BatchNorm2d):
                modules[s.module].weight[dead] = 0
                modules[s.module].bias[dead] = 0


def group_names(net: MultiExitNet) -> list[str]:
    return [g.name for g in net.channel_groups()]


@pytest.mark.parametrize(
    "dense,recipe", [(False, {}), (True, {}), (True, WRN_SE)], ids=["plain", "dense", "wrn-se-dense"]
)
def test_removing_dead_channels_keeps_every_exit_output(dense, recipe):
    x = torch.randn(4, 3, 16, 16)
    for name in group_names(make(dense, **recipe)):
        net = make(dense, **recipe).eval()
        size = next(g.size for g in net.channel_groups() if g.name == name)
        dead = list(range(0, size, 2))
        kill(net, name, dead)
        before = net(x).logits
        keep = [k for k in range(size) if k not in dead]
        spec = remove_channels(net, name, keep)
        after = net(x).logits
        for a, b in zip(before, after):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
        # the sliced network is exactly what its new ArchSpec builds: checkpoints rebuild it
        rebuilt = build_net(spec)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in net.state_dict().items()
        }, name
        rebuilt.load_state_dict(net.state_dict())
        for a, b in zip(after, rebuilt.eval()(x).logits):
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_after_removal_follows_the_uncollected_trajectory(optimizer):
    """20 steps with the dead channels held at zero (a mask) == 20 steps on the collected network."""
    # float64: the collected convs sum in another order, and float32 rounding grows over 20 momentum steps
    # (to ~4e-5 here), which would hide a real error; in float64 any mismatch is a bug
    net = make(dense=True).train().double()
    name, dead = "stream1", [1, 4, 6]
    kill(net, name, dead)

    def make_opt(params):
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        return torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4)

    ref = net
    opt_ref = make_opt(ref.parameters())
    data = [(torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))) for _ in range(25)]

    def step(model, opt, x, y, mask_dead):
        opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(lg, y) for lg in model(x).logits)
        loss.backward()
        opt.step()
        if mask_dead:  # what a gate does: the removed channels stay dead
            kill(model, name, dead)

    for x, y in data[:5]:  # build optimizer state first
        step(ref, opt_ref, x, y, True)
    gc_net = copy.deepcopy(ref)
    opt_gc = make_opt(gc_net.parameters())
    opt_gc.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # load_state_dict would share buffers
    size = next(g.size for g in ref.channel_groups() if g.name == name)
    keep = [k for k in range(size) if k not in dead]
    remove_channels(gc_net, name, keep, [opt_gc])
    for x, y in data[5:]:
        step(ref, opt_ref, x, y, True)
        step(gc_net, opt_gc, x, y, False)

    # every kept weight follows the same trajectory: compare the reference sliced the same way
    sliced = copy.deepcopy(ref)
    remove_channels(sliced, name, keep)
    for (k, a), b in zip(sliced.state_dict().items(), gc_net.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_optimizer_state_is_sliced_with_the_weights():
    net = make(dense=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 16, 16)).final.sum().backward()
    opt.step()
    conv = net.blocks[0].cells[0].conv1
    buf = opt.state[conv.weight]["momentum_buffer"].clone()
    w = conv.weight
    remove_channels(net, "cell0.mid", [0, 2], [opt])
    assert conv.weight is w  # same Parameter object: the optimizer still holds it
    assert conv.out_channels == 2 and net.spec.cells[0].mid == 2
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf[[0, 2]])
    conv2 = net.blocks[0].cells[0].conv2
    assert conv2.in_channels == 2 and conv2.weight.shape[1] == 2


def test_bad_removals_are_rejected():
    net = make(dense=False)
    with pytest.raises(ValueError, match=r"no channel group named 'cell9.mid'; valid choices: \['cell0.mid'"):
        remove_channels(net, "cell9.mid", [0])
    with pytest.raises(ValueError, match="may not be left with 0 channels"):
        remove_channels(net, "cell0.mid", [])
    with pytest.raises(ValueError, match=r"keep_idx must lie in 0..3 for group 'cell0.mid'; got \[0, 4\]"):
        remove_channels(net, "cell0.mid", [0, 4])


class CollectAfterFirstEpoch(L.Callback):
    """Remove half of cell 1's inner channels (and their optimizer state) after epoch 0."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            spec = remove_channels(pl_module.net, "cell1.mid", [0, 2, 4, 6], trainer.optimizers)
            pl_module.set_arch_spec(spec)


def test_training_continues_and_resumes_after_removal(tmp_path):
    """Surgery mid-run: the optimizer keeps going on the sliced tensors; a resume matches a straight run."""

    def run(root, epochs, resume_from=None, seed=0):
        L.seed_everything(seed)
        module = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10))
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer = tiny_trainer(
            root, max_epochs=epochs, enable_checkpointing=True, callbacks=[CollectAfterFirstEpoch(), ckpt]
        )
        trainer.fit(
            module,
            datamodule=SyntheticDataModule(num_train=128, input_size=16, batch_size=32),
            ckpt_path=resume_from,
        )
        return module, trainer, root / "ckpt" / "last.ckpt"

    straight, trainer, _ = run(tmp_path / "a", 3)
    assert straight.arch_spec.cells[1].mid == 4
    w = straight.net.blocks[1].cells[0].conv1.weight
    assert w.shape[0] == 4 and trainer.optimizers[0].state[w]["momentum_buffer"].shape == w.shape
    _, _, half = run(tmp_path / "b", 2)
    assert MultiExitModule.spec_from_checkpoint(half).cells[1].mid == 4
    resumed, _, _ = run(tmp_path / "c", 3, resume_from=half)  # built wide, rebuilt narrow from the checkpoint
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    other, _, _ = run(tmp_path / "d", 3, seed=1)
    assert any(not torch.equal(a, c) for a, c in zip(straight.parameters(), other.parameters()))
