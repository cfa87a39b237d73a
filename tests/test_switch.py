"""SwitchL1: proximal and subgradient updates, the killing rules, frozen dead switches, GC, folding."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from callbacks import GarbageCollection, SwitchL1
from lit_nas.gates import gated_groups
from lit_nas.surgery import fold_gates
from lit_nas.switches import (
    SignWindow,
    sign_change_kills,
    sign_variance_kills,
    soft_threshold,
    threshold_kills,
)
from tests.helpers import tiny_data as data
from tests.helpers import tiny_module, tiny_trainer


def test_soft_threshold_is_the_l1_proximal_step():
    theta = torch.tensor([1.0, -0.3, 0.05, -0.05, 0.0])
    torch.testing.assert_close(soft_threshold(theta, 0.1), torch.tensor([0.9, -0.2, 0.0, 0.0, 0.0]))
    # it minimises 1/2 (x - θ)^2 + t|x| : compare with a dense grid search
    grid = torch.linspace(-2, 2, 400_001)
    for v in theta:
        best = grid[(0.5 * (grid - v) ** 2 + 0.1 * grid.abs()).argmin()]
        assert abs(float(best) - float(soft_threshold(v, 0.1))) < 1e-4


def test_threshold_and_sign_change_rules():
    theta = torch.tensor([0.5, -0.0005, 0.002, -0.4, 0.0])
    assert threshold_kills(theta, 1e-3).tolist() == [False, True, False, False, True]
    previous = torch.tensor([1.0, 1.0, 1.0, -1.0, 1.0])
    assert sign_change_kills(theta, previous).tolist() == [False, True, False, False, True]


def test_sign_variance_waits_for_a_full_window_and_kills_oscillating_switches():
    window = SignWindow(3, window=4)
    steps = [[0.5, 0.1, -0.2], [0.4, -0.1, -0.3], [0.3, 0.1, -0.1], [0.2, -0.1, -0.2]]
    for i, values in enumerate(steps):
        assert not sign_variance_kills(window, 0.5).any()  # not before the window is full
        window.push(torch.tensor(values))
        assert window.full == (i == 3)
    # signs (+,+,+,+) -> 0, (+,-,+,-) -> 1, (-,-,-,-) -> 0
    torch.testing.assert_close(window.variance(), torch.tensor([0.0, 1.0, 0.0]))
    assert sign_variance_kills(window, 0.5).tolist() == [False, True, False]
    window.push(torch.tensor([0.1, 0.1, 0.3]))  # oldest step replaced: (+,+,+,+),(-,+,-,+),(-,-,-,+)
    torch.testing.assert_close(window.variance(), torch.tensor([0.0, 1.0, 0.75]))
    window.keep(torch.tensor([True, False, True]))
    torch.testing.assert_close(window.variance(), torch.tensor([0.0, 0.75]))


class SwitchProbe(L.Callback):
    """After every step (listed after SwitchL1): the switches, and their optimizer state."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.momentum: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        gates = gated_groups(pl_module.net)
        self.steps.append({g: p.detach().clone() for g, p in gates.items()})
        opt = trainer.optimizers[0]
        self.momentum.append(
            {g: opt.state[p]["momentum_buffer"].clone() for g, p in gates.items() if p in opt.state}
        )


@pytest.mark.parametrize(
    ("kwargs", "dies"),
    [
        (dict(update="proximal", kill="threshold", lam=0.3, tau=1e-3), "every step's zeros"),
        (dict(update="subgradient", kill="threshold", lam=2.0, tau=0.05), "below tau"),
        (dict(update="subgradient", kill="sign_change", lam=0.1), "crossing zero"),
        (dict(update="subgradient", kill="sign_variance", lam=0.2, window=4, gamma=0.8), "oscillating"),
    ],
    ids=[
        "proximal-threshold",
        "subgradient-threshold",
        "subgradient-sign_change",
        "subgradient-sign_variance",
    ],
)
def test_killed_switches_are_exactly_zero_and_stay_frozen(tmp_path, kwargs, dies):
    module = tiny_module()
    switch, probe = SwitchL1(**kwargs), SwitchProbe()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[switch, probe])
    trainer.fit(module, datamodule=data())
    first, last = probe.steps[0], probe.steps[-1]
    killed = sum(int((t == 0).sum()) for t in last.values())
    assert 0 < killed < 48 - 7, f"{killed} switches died ({dies}): the run should kill some, not all"
    for before, after, mom in zip(probe.steps, probe.steps[1:], probe.momentum[1:]):
        for g in before:
            dead = before[g] == 0
            assert torch.all(after[g][dead] == 0), g  # a dead switch never comes back
            assert torch.all(mom[g][after[g] == 0] == 0), g  # nor has momentum to come back with
            assert int((after[g] != 0).sum()) >= 1, g  # no group loses its last channel
    assert set(first) == {g.name for g in module.channel_groups()}
    # switches have no weight decay: their param group says so
    opt = trainer.optimizers[0]
    for p in gated_groups(module.net).values():
        group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
        assert group["weight_decay"] == 0.0
    live = trainer.callback_metrics["switch/live_channels"]
    assert int(live) == sum(int((t != 0).sum()) for t in last.values())


def test_subgradient_adds_lambda_l1_to_the_loss_and_proximal_does_not(tmp_path):
    for update in ("subgradient", "proximal"):
        module = tiny_module()
        trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[SwitchL1(lam=0.01, update=update)])
        trainer.fit(module, datamodule=data())
        if update == "subgradient":
            # the loss term's last value is lambda * ||theta||_1 of the switches it saw (before the last step)
            assert "switch/l1_step" in trainer.callback_metrics
            assert float(trainer.callback_metrics["switch/l1_step"]) > 0
        else:
            assert "switch/l1_step" not in trainer.callback_metrics
        assert module._loss_terms == {}  # removed at fit end


def test_shrinking_then_collecting_then_folding_keeps_the_function(tmp_path):
    module = tiny_module()
    switch = SwitchL1(lam=0.3, until_epoch=3)
    gc = GarbageCollection()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[switch, gc])
    trainer.fit(module, datamodule=data())
    sizes = {g.name: g.size for g in module.channel_groups()}
    assert sum(sizes.values()) < 48 and min(sizes.values()) >= 1
    assert gc.history and all(bool((p != 0).all()) for p in gated_groups(module.net).values())
    # frozen after until_epoch: no gradient, no change, and model selection no longer waits
    assert switch.stopped and all(not p.requires_grad for p in gated_groups(module.net).values())
    assert [e for e, _ in switch.history] == [0, 1, 2, 3]
    assert switch.history[-1][1] == sizes  # logged live channels == the collected widths
    # switch values are arbitrary reals: folding them into the BatchNorms keeps every exit (float64: any
    # difference is a bug, not rounding; the float32 1e-5 check is in test_gates)
    net = copy.deepcopy(module.net).double().eval()
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    before = net(x).logits
    fold_gates(net)
    assert len(net.gates) == 0 and net.spec.gated == {}
    for a, b in zip(before, net(x).logits):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kill", ["sign_change", "sign_variance"])
def test_a_resume_after_collections_continues_bit_identically(tmp_path, kill):
    """Stop after epoch 1 (switches killed and collected at its end), resume into a full-size module."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks(d):
        switch = SwitchL1(update="subgradient", kill=kill, lam=0.2, window=4, gamma=0.8)
        return switch, [switch, GarbageCollection(), ModelCheckpoint(d, save_top_k=-1)]

    ref = tiny_module()
    switch_ref, cbs = callbacks(tmp_path / "a")
    tiny_trainer(tmp_path / "a", max_epochs=4, callbacks=cbs, enable_checkpointing=True).fit(
        ref, datamodule=data()
    )
    sizes = [sum(h.values()) for _, h in switch_ref.history]
    assert sizes[1] < 48 and sizes[-1] < sizes[1]  # collected before the checkpoint and after the resume
    resumed = tiny_module()
    switch_b, cbs = callbacks(tmp_path / "b")
    tiny_trainer(tmp_path / "b", max_epochs=4, callbacks=cbs, enable_checkpointing=True).fit(
        resumed, datamodule=data(), ckpt_path=str(tmp_path / "a" / "epoch=1-step=8.ckpt")
    )
    assert resumed.arch_spec == ref.arch_spec and switch_b.history == switch_ref.history
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lam=-0.1), r"lam \(the L1 strength\) must be >= 0; got -0.1"),
        (
            dict(update="adam"),
            r"update must be one of \['proximal', 'subgradient'\]; got 'adam'",
        ),
        (
            dict(kill="magnitude"),
            r"kill must be one of \['threshold', 'sign_change', 'sign_variance'\]; got 'magnitude'",
        ),
        (dict(tau=0), "tau must be > 0; got 0"),
        (dict(gamma=1.5), r"gamma \(a variance of signs\) must lie in \(0, 1\); got 1.5"),
        (dict(window=1), "window must be an integer >= 2; got 1"),
        (dict(scope="outer"), r"SwitchL1 scope must be one of \['all', 'inner'\]; got 'outer'"),
        (dict(init=0.0), "init must be nonzero"),
        (dict(until_epoch=0), "until_epoch must be an integer >= 1 or null; got 0"),
    ],
)
def test_bad_switch_configs_name_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SwitchL1(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(update="proximal", kill="threshold", lam=50.0, tau=1e-3),
        dict(update="proximal", kill="sign_change", lam=50.0),
        dict(update="proximal", kill="sign_variance", lam=50.0, window=2, gamma=0.1),
        dict(update="subgradient", kill="threshold", lam=50.0, tau=10.0),
        dict(update="subgradient", kill="sign_change", lam=50.0),
        dict(update="subgradient", kill="sign_variance", lam=50.0, window=2, gamma=0.1),
    ],
    ids=lambda k: f"{k['update']}-{k['kill']}",
)
def test_a_strong_penalty_never_empties_a_group_on_any_path(tmp_path, kwargs):
    """The guard holds even when the soft-threshold zeroed every switch of a group in one step."""
    module = tiny_module()
    switch, probe = SwitchL1(**kwargs), SwitchProbe()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[switch, probe])
    trainer.fit(module, datamodule=data())
    for step in probe.steps:
        for g, theta in step.items():
            assert int((theta != 0).sum()) >= 1, (g, theta)
    # a penalty this strong kills all but the last switch of every group: the guard is what is tested
    assert all(int((t != 0).sum()) == 1 for t in probe.steps[-1].values())


def test_keep_one_alive_restores_the_strongest_switch_the_update_zeroed():
    from lit_nas.switches import keep_one_alive

    before = torch.tensor([0.2, -0.9, 0.0, 0.5])
    theta = soft_threshold(before, 1.0)  # every switch to exactly 0
    dead = keep_one_alive(theta, before, theta == 0)
    assert dead.tolist() == [True, False, True, True]
    assert theta[1] == -0.9
    some = torch.tensor([False, True, True, True])
    assert keep_one_alive(theta, before, some) is some  # one still alive: unchanged
