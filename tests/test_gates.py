"""Channel gates: a gated-off channel is removable exactly, gates fold into BatchNorm, persist as data."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import GarbageCollection
from lit_nas import ArchSpec, DataShape, MultiExitModule, NetConfig, build_net
from lit_nas.gates import attach_gates, fold_gates, gated_groups
from lit_nas.surgery import remove_channels
from tests.helpers import TINY, tiny_data, tiny_trainer
from tests.test_surgery import group_names, make


@pytest.mark.parametrize("dense", [False, True], ids=["plain", "dense"])
def test_channels_gated_off_are_removed_without_changing_any_exit(dense):
    x = torch.randn(4, 3, 16, 16)
    for name in group_names(make(dense)):
        net = make(dense).eval()
        gate = attach_gates(net, [name])[name]
        dead = list(range(0, gate.numel(), 2))
        with torch.no_grad():
            gate[dead] = 0
        before = net(x).logits
        assert any(not torch.allclose(a, b) for a, b in zip(before, make(dense).eval()(x).logits)), name
        keep = [k for k in range(gate.numel()) if k not in dead]
        remove_channels(net, name, keep)
        assert gate.shape == (len(keep),) and torch.all(gate == 1)  # the gate is sliced with its group
        for a, b in zip(before, net(x).logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("dense", [False, True], ids=["plain", "dense"])
def test_fold_gates_keeps_outputs_and_removes_every_gate(dense):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    net = make(dense)
    gates = attach_gates(net, group_names(net), trainable=True)
    with torch.no_grad():
        for g in gates.values():
            g.copy_(torch.randn_like(g))  # any value, not just 0/1 (switches are real-valued)
    for mode in ("eval", "train"):
        getattr(net, mode)()
        ref = copy.deepcopy(net)
        before = ref(x).logits
        fold_gates(ref)
        assert gated_groups(ref) == {} and len(ref.gates) == 0 and ref.spec.gated == {}
        assert all(not m._forward_hooks and "gate" not in m.__dict__ for m in ref.modules())
        for a, b in zip(before, ref(x).logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gates_are_data_in_the_spec_live_in_checkpoints_and_copies_are_independent():
    net = make(False).eval()
    gates = attach_gates(net, ["cell0.mid", "stream0"])
    attach_gates(net, ["cell1.mid"], trainable=True)
    with torch.no_grad():
        gates["stream0"][1] = 0
    assert not gates["stream0"].requires_grad and gates["stream0"].no_weight_decay
    assert net.spec.gated == {"cell0.mid": "mask", "stream0": "mask", "cell1.mid": "switch"}
    assert all(not m._forward_hooks for m in net.modules())  # the gated norms apply them, no hooks
    state = net.state_dict()
    assert {"gates.cell0__mid", "gates.stream0", "gates.cell1__mid"} <= set(state)
    # the spec alone rebuilds the gates (their kind too), so the state dict loads into them
    fresh = build_net(ArchSpec.from_dict(net.spec.to_dict())).eval()
    assert fresh.gates["cell1__mid"].requires_grad and not fresh.gates["stream0"].requires_grad
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    for a, b in zip(net(x).logits, fresh(x).logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.gates["stream0"].zero_()
    assert torch.equal(net.gates["stream0"], state["gates.stream0"])  # the copy's gate is its own
    assert all(torch.equal(a, b) for a, b in zip(net(x).logits, fresh(x).logits))


def test_trainable_gate_and_its_optimizer_state_are_sliced_and_the_module_reloads_them(tmp_path):
    torch.manual_seed(0)
    module = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10))
    gate = attach_gates(module.net, ["cell1.mid"], trainable=True)["cell1.mid"]
    assert any(gate is p for g in module.param_groups() if g.get("weight_decay") == 0.0 for p in g["params"])
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.randn(4, 3, 16, 16)).logits[-1].sum().backward()
    opt.step()
    momentum = opt.state[gate]["momentum_buffer"].clone()
    spec = remove_channels(module.net, "cell1.mid", [0, 2, 5], [opt])
    module.set_arch_spec(spec)
    assert torch.equal(opt.state[gate]["momentum_buffer"], momentum[[0, 2, 5]])
    path = tmp_path / "gated.ckpt"
    torch.save({"state_dict": module.state_dict(), "lit_nas_arch_spec": spec.to_dict()}, path)
    fresh = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10))
    ckpt = torch.load(path, weights_only=True)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert torch.equal(fresh.net.gates["cell1__mid"], gate.detach())
    assert fresh.net.gates["cell1__mid"].requires_grad  # a switch is rebuilt trainable, from the spec


# -- GarbageCollection on a training run -------------------------------------------------------------------
DEAD = {"cell0.mid": [0, 2], "stream1": [1, 3, 5], "cell3.mid": [0, 1, 2, 3, 4, 5, 6, 7]}  # cell3: all off


def gated_module() -> MultiExitModule:
    torch.manual_seed(0)
    module = MultiExitModule(net=NetConfig(**TINY, dense=True), data_shape=DataShape(3, 16, 10))
    for name, gate in attach_gates(module.net, list(DEAD)).items():
        with torch.no_grad():
            gate[DEAD[name]] = 0
    return module


class EvalLogits(L.Callback):
    """Eval-mode logits of a fixed batch at the end of each training epoch."""

    def __init__(self) -> None:
        self.x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        self.logits: list[tuple[torch.Tensor, ...]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.eval()
        with torch.no_grad():
            self.logits.append(tuple(t.clone() for t in pl_module(self.x).logits))
        pl_module.train()


def fit(tmp_path, module, callbacks, max_epochs=6, ckpt_path=None):
    trainer = tiny_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=tiny_data(), ckpt_path=ckpt_path)
    return trainer


def test_garbage_collection_is_exact_in_eval_in_training_and_across_a_resume(tmp_path):
    before, after = EvalLogits(), EvalLogits()
    module = gated_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "a", save_last=True, save_top_k=-1)
    gc = GarbageCollection(epochs=[0])
    fit(tmp_path, module, [before, gc, after, ckpt])
    # (a) the collection at the end of epoch 0 changed no output
    for a, b in zip(before.logits[0], after.logits[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    sizes = {g.name: g.size for g in module.channel_groups()}
    assert sizes["cell0.mid"] == 2 and sizes["stream1"] == 5 and sizes["cell3.mid"] == 1  # never 0 channels
    assert gc.history[0][:2] == (0, 2 + 3 + 7)
    # (b) 20 more steps follow the trajectory of the uncollected network, on the kept weights
    reference = gated_module()
    fit(tmp_path, reference, [ModelCheckpoint(dirpath=tmp_path / "b")])
    keep = {n: [k for k in range(g.numel()) if k not in DEAD[n] or (n == "cell3.mid" and k == 0)]
            for n, g in gated_groups(reference.net).items()}  # fmt: skip
    for name, idx in keep.items():
        remove_channels(reference.net, name, idx)
    for (k, v), (k2, v2) in zip(module.state_dict().items(), reference.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=0, msg=k)
    # (c) resume from the post-collection checkpoint: a fresh (full-size) module is rebuilt smaller
    resumed = gated_module()
    fit(tmp_path / "c", resumed, [GarbageCollection(epochs=[0]), ModelCheckpoint(dirpath=tmp_path / "c")],
        ckpt_path=str(tmp_path / "a" / "epoch=0-step=4.ckpt"))  # fmt: skip
    assert resumed.arch_spec == module.arch_spec
    for (k, v), (k2, v2) in zip(module.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    loaded = MultiExitModule.load_from_checkpoint(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert loaded.arch_spec == module.arch_spec and set(gated_groups(loaded.net)) == set(DEAD)


def test_garbage_collection_rejects_bad_epochs():
    with pytest.raises(ValueError, match=r"strictly increasing; got \[3, 1\]"):
        GarbageCollection(epochs=[3, 1])
