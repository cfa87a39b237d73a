"""Registry conformance of the algorithms: every search callback runs on every network family.

``test_nets.py`` checks each family's shapes, channel groups (against Torch-Pruning), FLOPs (against thop)
and surgery; ``test_device_bench.py`` its TFLite parity. Here each family trains, plain and with exits,
under the callbacks that change it: growing, SNIP, Fisher pruning with the latency cost (look-up tables
covering every layer kind of the family), ShrinkNets switches, garbage collection (exact, optimizer state
sliced), retraining from scratch and distillation; every checkpoint reloads into the network it holds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from callbacks import (
    Distillation,
    FisherPruning,
    GarbageCollection,
    Growing,
    RetrainFromScratch,
    SnipPruning,
    SwitchL1,
)
from device_bench.lut import from_measurements, plan_tables
from lit_nas import DataShape, MultiExitModule, NetConfig
from lit_nas.gates import attach_gates, fold_gates, gated_groups
from lit_nas.latency import channel_latency
from lit_nas.nets import NETWORKS, build_net
from lit_nas.surgery import collect_gated
from tests.helpers import tiny_data, tiny_trainer
from tests.test_nets import RECIPES

SHAPE = DataShape(3, 16, 10)
FAMILIES = [(kind, exits) for kind in NETWORKS for exits in (True, False)]
IDS = [f"{kind}-{'exits' if exits else 'plain'}" for kind, exits in FAMILIES]
KINDS = list(NETWORKS)


def recipe(kind: str, exits: bool, **changes) -> NetConfig:
    return NetConfig(kind=kind, exits=exits, **{**RECIPES[kind], **changes})


def module(kind: str, exits: bool, seed: int = 0) -> MultiExitModule:
    torch.manual_seed(seed)
    return MultiExitModule(
        net=recipe(kind, exits),
        data_shape=SHAPE,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        lr_schedule={"name": "cosine"},
    )


def synthetic_lut(kind: str, exits: bool, path, **changes):
    """Look-up tables over every layer key of the family, latency proportional to the work (+ a floor)."""
    spec = recipe(kind, exits, **changes).build_spec(SHAPE)
    tables = plan_tables([spec], channels=(2, 4, 8, 16))
    ms = {}
    for key, t in tables.items():
        cin = np.asarray(t.cin, float)[:, None]
        cout = np.asarray(t.cout, float)[None, :]
        ms[key] = 0.01 + 1e-4 * cin * np.where(cout > 0, cout, 1.0)
    lut = from_measurements(tables, ms, overhead_ms=0.0, sigma=0.0)
    lut.save(path)
    return lut


def reloads_exactly(trainer, fitted: MultiExitModule, tmp_path) -> None:
    """The checkpoint of ``fitted`` rebuilds its (changed) network, gates included, with the same outputs."""
    path = tmp_path / "end.ckpt"
    trainer.save_checkpoint(path)
    back = MultiExitModule.load_from_checkpoint(path, weights_only=False)
    assert back.arch_spec == fitted.arch_spec
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    fitted.eval(), back.eval()
    with torch.no_grad():
        for a, b in zip(fitted(x).logits, back(x).logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def widths(spec) -> int:
    return spec.stem_width + sum(c.out + c.mid for c in spec.cells)


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_with_the_latency_cost_and_garbage_collection(kind, tmp_path):
    """Fisher pruning (Delta loss / Delta latency from tables with the family's layer kinds), every prune
    collected at once, while the network with exits grows block by block (the plain networks' collection
    is checked exactly below; a fit of each would add minutes, not coverage)."""
    exits = True
    lut = synthetic_lut(kind, exits, tmp_path / "lut.json")
    m = module(kind, exits)
    start = copy.deepcopy(m.arch_spec)
    costs = channel_latency(lut, m.net)  # every group of every family has a finite, positive latency cost
    sizes = {g.name: g.size for g in m.channel_groups()}
    assert set(costs) == set(sizes)
    assert all(0 < costs[g] < float("inf") for g, n in sizes.items() if n > 1)
    callbacks = [
        FisherPruning(
            every_n_steps=2,
            per_step=2,
            cost="latency",
            stop_at="latency",
            target_fraction=0.5,
            start_epoch=1,
            lut=str(tmp_path / "lut.json"),
        ),
        GarbageCollection(after_prune=True),
    ]
    if exits:
        callbacks.insert(0, Growing(grow_epochs=[1, 2, 3], init="identity"))
    trainer = tiny_trainer(tmp_path, max_epochs=5, callbacks=callbacks)
    trainer.fit(m, datamodule=tiny_data())
    spec = m.arch_spec
    assert spec.active_blocks == spec.num_blocks
    assert widths(spec) < widths(start)  # channels were removed
    assert lut.predict(spec) < lut.predict(start.with_active_blocks(start.num_blocks))
    assert set(spec.gated) == {g.name for g in m.channel_groups()} and set(spec.gated.values()) == {"mask"}
    assert all(bool((g != 0).all()) for g in gated_groups(m.net).values())  # every closed channel collected
    reloads_exactly(trainer, m, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_switches_collection_retraining_and_self_distillation(kind, tmp_path):
    """ShrinkNets switches (trained gates, kind ``switch`` in the spec) under a strong L1 penalty until
    epoch 1, collected after it; retraining from scratch at epoch 2 keeps the found widths; the exits
    distil from the final one throughout."""
    m = module(kind, exits=True)
    start = copy.deepcopy(m.arch_spec)
    callbacks = [
        SwitchL1(lam=5.0, update="proximal", kill="threshold", tau=1e-3, until_epoch=2),
        GarbageCollection(epochs=[1]),
        RetrainFromScratch(epoch=2, seed=3),
        Distillation(self_distill=True),
    ]
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=callbacks)
    trainer.fit(m, datamodule=tiny_data())
    spec = m.arch_spec
    assert widths(spec) < widths(start)
    assert set(spec.gated.values()) == {"switch"}
    assert not any(p.requires_grad for p in gated_groups(m.net).values())  # frozen after until_epoch
    assert all(torch.isfinite(p).all() for p in m.parameters())
    reloads_exactly(trainer, m, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_snip_masks_stay_applied(kind, tmp_path):
    """SNIP (one shot, half of the weights of every block, depthwise filters included) after epoch 1 of a
    plain network: the pruned weights stay exactly zero through training and the checkpoint."""
    m = module(kind, exits=False)
    trainer = tiny_trainer(
        tmp_path, max_epochs=3, callbacks=[SnipPruning(keep_ratio=0.5, prune_epochs=[1], after_epochs=1)]
    )
    trainer.fit(m, datamodule=tiny_data())
    masks = m.masks()
    weights = dict(m.named_parameters())
    depthwise = [f"{n}.weight" for n, c in m.named_modules() if getattr(c, "groups", 1) > 1]
    assert masks and set(depthwise) <= set(masks)  # depthwise filters are pruned too
    kept = sum(int(v.sum()) for v in masks.values()) / sum(v.numel() for v in masks.values())
    assert kept == pytest.approx(0.5, abs=0.02)
    for name, mask in masks.items():
        assert torch.all(weights[name][mask == 0] == 0), name
    reloads_exactly(trainer, m, tmp_path)


@pytest.mark.parametrize(("kind", "exits"), FAMILIES, ids=IDS)
def test_collection_is_exact_and_follows_the_uncollected_trajectory(kind, exits):
    """Gate a third of every group off, take SGD-momentum steps, collect (optimizer state sliced): the
    collected net equals the gated one in eval and training mode and for 5 more steps; folding the gates
    into the BatchNorms keeps every exit's output (no dropout: its masks would differ in width)."""
    torch.manual_seed(0)
    net = build_net(recipe(kind, exits, dropout=0.0).build_spec(SHAPE)).double()
    gates = attach_gates(net, [g.name for g in net.channel_groups()])
    with torch.no_grad():
        for g in gates.values():
            g[: max(1, g.numel() // 3)] = 0
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))

    def step(n, o):
        o.zero_grad()
        sum(torch.nn.functional.cross_entropy(lg, y) for lg in n(x).logits).backward()
        o.step()

    step(net, opt)
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # without a copy they would share buffers
    removed = collect_gated(net, [opt])
    assert removed and sum(removed.values()) > 0
    for p in net.parameters():  # the optimizer's momentum was sliced with each weight
        if p in opt.state and "momentum_buffer" in opt.state[p]:
            assert opt.state[p]["momentum_buffer"].shape == p.shape
    for mode in ("eval", "train"):
        getattr(net, mode)(), getattr(ref, mode)()
        for a, b in zip(ref(x).logits, net(x).logits):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for _ in range(5):
        step(net, opt), step(ref, ref_opt)
    net.eval(), ref.eval()
    for a, b in zip(ref(x).logits, net(x).logits):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    before = net(x).logits
    fold_gates(net)
    assert net.spec.gated == {} and len(net.gates) == 0
    for a, b in zip(before, net(x).logits):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
