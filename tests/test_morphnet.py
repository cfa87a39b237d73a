"""MorphNet (Liège thesis section 4.7): group-LASSO penalty and gradient, dead channels, the expand step."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import GarbageCollection, MorphNet
from lit_nas import DataShape, MultiExitModule, NetConfig, build_net
from lit_nas.cost import spec_cost
from lit_nas.gates import attach_gates, close_channels
from lit_nas.morphnet import dead_channels, expand, penalty, producer_norms
from lit_nas.nets.base import MultiExitNet
from lit_nas.surgery import collect_gated
from tests.helpers import TINY, tiny_data, tiny_trainer

SHAPE = DataShape(3, 16, 10)


def tiny_net():
    torch.manual_seed(0)
    return build_net(NetConfig(**TINY).build_spec(SHAPE))


def test_penalty_and_gradient_equal_the_formula_on_a_tied_group():
    net = tiny_net().double()
    tied = next(g for g in net.channel_groups() if len(net.gated_norms(g.name)) >= 2)  # a residual stream
    norms = net.gated_norms(tied.name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.randn(tied.size, generator=gen, dtype=torch.float64))
    gammas = torch.stack([n.weight.detach() for n in norms])  # (producers, channels)
    cost = 0.37
    value = penalty(net, {tied.name: cost})
    expected = cost * gammas.abs().max(0).values.sum()  # L-infinity over the tied channels, L1 over channels
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-12)
    value.backward()
    winner = gammas.abs().argmax(0)
    for p, norm in enumerate(norms):
        want = torch.where(winner == p, cost * gammas[p].sign(), torch.zeros_like(gammas[p]))
        torch.testing.assert_close(norm.weight.grad, want, rtol=0, atol=1e-12)
    # a closed channel is dead already: it no longer counts
    attach_gates(net, [tied.name])
    close_channels(net, [(tied.name, 0)])
    torch.testing.assert_close(
        penalty(net, {tied.name: cost}), expected - cost * gammas[:, 0].abs().max(), rtol=0, atol=1e-12
    )


def test_dead_channels_are_those_below_the_threshold_in_every_producer_and_a_group_keeps_one():
    net = tiny_net()
    tied = next(g for g in net.channel_groups() if len(net.gated_norms(g.name)) >= 2)
    norms = net.gated_norms(tied.name)
    with torch.no_grad():
        for norm in norms:
            norm.weight.fill_(1e-3)
        norms[-1].weight[1] = 0.5  # channel 1 lives through one producer: the L-infinity keeps it
    dead = dead_channels(net, [tied.name], threshold=1e-2)
    assert sorted(k for _, k in dead) == [k for k in range(tied.size) if k != 1]
    with torch.no_grad():
        norms[-1].weight[1] = 1e-3
    dead = dead_channels(net, [tied.name], threshold=1e-2)
    assert len(dead) == tied.size - 1  # all below: one channel stays


@pytest.mark.parametrize("factor", [0.6, 1.7])
def test_the_expand_step_lands_within_one_channel_per_group_of_the_budget(factor):
    net = tiny_net()
    cost = lambda spec: spec_cost(spec, "flops")  # noqa: E731
    budget = factor * cost(net.spec)
    spec, omega = expand(net, cost, budget)
    assert cost(spec) <= budget
    wider = build_net(spec).resized_spec_all({g.name: g.size + 1 for g in build_net(spec).channel_groups()})
    assert cost(wider) > budget  # one more channel in every group is over the budget
    assert (omega > 1) == (factor > 1)
    sizes = {g.name: g.size for g in build_net(spec).channel_groups()}
    start = {g.name: g.size for g in net.channel_groups()}
    assert all(sizes[g] == max(1, int(n * omega + 1e-9)) for g, n in start.items())
    # capped groups stop at their cap; the others still widen to the budget
    caps = {name: n for name, n in start.items() if name.endswith(".mid")}
    capped, omega = expand(net, cost, budget, caps)
    capped_sizes = {g.name: g.size for g in build_net(capped).channel_groups()}
    assert cost(capped) <= budget and all(capped_sizes[g] <= n for g, n in caps.items())


def test_morphnet_closes_dead_channels_gc_removes_them_and_the_expansion_meets_the_budget(tmp_path):
    torch.manual_seed(0)
    m = MultiExitModule(net=NetConfig(**TINY), data_shape=SHAPE, optimizer={"name": "sgd", "lr": 0.1})
    start_cost = spec_cost(m.arch_spec, "flops")
    search = MorphNet(strength=30.0, threshold=0.2, until_epoch=3, expand_epochs=[2], budget_fraction=1.0)
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=4,
        callbacks=[search, GarbageCollection(), ModelCheckpoint(tmp_path / "c")],
        enable_checkpointing=True,
    )
    trainer.fit(m, datamodule=tiny_data())
    assert search.closed > 0
    assert [e for e, _ in search.expanded] == [2]
    end = spec_cost(m.arch_spec, "flops")
    assert end < start_cost  # shrunk again after the expansion
    assert len(trainer.callback_metrics) and "morphnet/penalty" in trainer.callback_metrics
    back = MultiExitModule.load_from_checkpoint(next((tmp_path / "c").glob("*.ckpt")), weights_only=False)
    assert back.arch_spec == m.arch_spec


class _CostSpy(Callback):
    """After MorphNet's epoch start: its cached costs equal fresh ones; no training step walks the net."""

    def __init__(self, search: MorphNet) -> None:
        self.search, self.checked, self.lookups_in_steps, self._before = search, [], 0, 0

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.search._active(trainer.current_epoch):
            return
        probe = copy.deepcopy(pl_module.net)
        collect_gated(probe)
        assert self.search._costs == self.search._channel_costs(probe)
        for group, norms in self.search._norms.items():
            assert all(a is b for a, b in zip(norms, pl_module.net.gated_norms(group), strict=True))
        self.checked.append(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = _LOOKUPS[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lookups_in_steps += _LOOKUPS[0] - self._before


_LOOKUPS = [0]


def test_the_penalty_reads_costs_and_norms_cached_at_epoch_start_equal_to_fresh_ones(tmp_path, monkeypatch):
    lookup = MultiExitNet.gated_norms

    def counted(self, group):
        _LOOKUPS[0] += 1
        return lookup(self, group)

    monkeypatch.setattr(MultiExitNet, "gated_norms", counted)
    torch.manual_seed(0)
    m = MultiExitModule(net=NetConfig(**TINY), data_shape=SHAPE, optimizer={"name": "sgd", "lr": 0.1})
    search = MorphNet(strength=30.0, threshold=0.2, until_epoch=3, expand_epochs=[2], budget_fraction=1.0)
    spy = _CostSpy(search)
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[search, GarbageCollection(), spy])
    trainer.fit(m, datamodule=tiny_data())
    assert spy.checked == [0, 1, 2, 3]  # after closings and collections (1, 3) and the expansion (2)
    assert search.closed > 0
    assert spy.lookups_in_steps == 0
    # the cached producers give the same penalty as looking them up
    net = m.net
    costs = dict(search._costs)
    torch.testing.assert_close(
        penalty(net, costs, producer_norms(net, costs)), penalty(net, costs), rtol=0, atol=0
    )


def test_an_expansion_after_the_search_ends_it_with_the_network_that_meets_the_budget(tmp_path):
    torch.manual_seed(0)
    m = MultiExitModule(net=NetConfig(**TINY), data_shape=SHAPE, optimizer={"name": "sgd", "lr": 0.1})
    start_cost = spec_cost(m.arch_spec, "flops")
    search = MorphNet(strength=30.0, threshold=0.2, until_epoch=1, expand_epochs=[2], budget_fraction=0.5)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[search, GarbageCollection()])
    trainer.fit(m, datamodule=tiny_data())
    assert search.closed > 0 and [e for e, _ in search.expanded] == [2]
    assert search.last_search_epoch() == 2.0
    end = spec_cost(m.arch_spec, "flops")
    wider = m.net.resized_spec_all({g.name: g.size + 1 for g in m.channel_groups()})
    assert end <= 0.5 * start_cost < spec_cost(wider, "flops")  # the budget, to one channel per group
    assert not m.pending_searches()  # the last epoch trained the final network: model selection sees it
    assert torch.isfinite(trainer.callback_metrics["val/acc_full"])


def test_with_the_latency_cost_an_expansion_never_leaves_the_look_up_tables(tmp_path):
    """The tables end at the start network's widths: widening to 4x its latency must stop there."""
    from tests.test_families import synthetic_lut

    lut = synthetic_lut("resnet_sdn", True, tmp_path / "lut.json")
    torch.manual_seed(0)
    m = MultiExitModule(net=NetConfig(**TINY), data_shape=SHAPE, optimizer={"name": "sgd", "lr": 0.1})
    start = lut.predict(m.arch_spec)
    start_sizes = {g.name: g.size for g in m.channel_groups()}
    search = MorphNet(
        strength=1000.0,
        threshold=0.2,
        cost="latency",
        lut=str(tmp_path / "lut.json"),
        until_epoch=1,
        expand_epochs=[2],
        budget_fraction=4.0,
    )
    tiny_trainer(tmp_path, max_epochs=3, callbacks=[search, GarbageCollection()]).fit(
        m, datamodule=tiny_data()
    )
    assert [e for e, _ in search.expanded] == [2] and search.expanded[0][1] >= 1
    assert lut.predict(m.arch_spec) <= 4.0 * start  # priced by the tables (it raises outside them)
    assert search.closed > 0  # it had shrunk; the expansion brings every group back to its start width
    assert {g.name: g.size for g in m.channel_groups()} == start_sizes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(strength=0.0), "strength must be > 0; got 0.0"),
        (dict(cost="params"), r"MorphNet cost must be one of \['flops', 'latency'\]; got 'params'"),
        (dict(cost="latency"), "cost: latency needs lut"),
        (dict(expand_epochs=[3]), "expand_epochs need exactly one of budget_fraction and budget_value"),
        (dict(expand_epochs=[3, 2], budget_fraction=1.0), "strictly increasing"),
        (dict(expand_epochs=[6], until_epoch=4, budget_fraction=1.0), "must be at most until_epoch . 1 = 5"),
        (dict(until_epoch=-1), "until_epoch must be an integer >= start_epoch=0; got -1"),
    ],
)
def test_bad_morphnet_configs_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MorphNet(**{"strength": 1.0, **kwargs})
