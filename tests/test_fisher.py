"""FisherPruning: the signal is eq. 4.10 (tied groups summed), the selection, and training runs."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks import FisherPruning, GarbageCollection
from lit_nas import DataShape, NetConfig, build_net
from lit_nas.fisher import FisherAccumulator, l1_scores, select_channels
from lit_nas.gates import attach_gates, gated_groups
from tests.helpers import TINY, tiny_module, tiny_trainer
from tests.helpers import tiny_data as data


def test_accumulated_signal_is_the_per_sample_gradient_of_the_shared_channel_mask():
    """Delta_k == 1/(2N) sum_n (d loss_n / d m_k)^2 with m the group's gate: a residual stream's gate
    multiplies several BatchNorms, so the signal of a tied group is summed over them before squaring."""
    torch.manual_seed(0)
    net = build_net(NetConfig(**TINY).build_spec(DataShape(3, 16, 10))).double().eval()  # samples independent
    names = [g.name for g in net.channel_groups()]
    assert any(
        len([p for p in g.producers if "bn" in p.module or "shortcut.1" in p.module]) > 2
        for g in net.channel_groups()
    )  # fmt: skip  (a stream with several producing BNs)
    gates = attach_gates(net, names)
    acc = FisherAccumulator(net, names)
    acc.attach()
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (6,))

    def loss_of(out, target, reduction):
        return sum(nn.functional.cross_entropy(lg, target, reduction=reduction) for lg in out.logits)

    for _ in range(2):  # two steps: the sums accumulate
        loss_of(net(x), y, "mean").backward()
        acc.end_step()
    scores = acc.scores()
    acc.detach()
    for g in gates.values():
        g.requires_grad_(True)
    per_sample = []
    for n in range(len(x)):
        grads = torch.autograd.grad(loss_of(net(x[n : n + 1]), y[n : n + 1], "sum"), list(gates.values()))
        per_sample.append(grads)
    for i, name in enumerate(gates):
        g = torch.stack([p[i] for p in per_sample])  # (N, C)
        direct = g.pow(2).sum(0) / (2 * len(x))  # the same batch twice: the mean is unchanged
        torch.testing.assert_close(scores[name], direct, rtol=1e-9, atol=1e-12, msg=name)


def test_selection_takes_the_lowest_ratio_and_never_empties_a_group():
    scores = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.05, 5.0, 6.0, 0.01])}
    live = {"a": torch.tensor([True, True]), "b": torch.tensor([True, True, True, False])}
    assert select_channels(scores, live, 2) == [("b", 0), ("a", 0)]  # b3 is already pruned
    # every group keeps one live channel, whatever is asked
    assert sorted(select_channels(scores, live, 10)) == [("a", 0), ("b", 0), ("b", 1)]
    # with a cost, the ratio ranks: a channel of b saves 100x more, so b goes first
    costs = {"a": 1.0, "b": 100.0}
    assert select_channels(scores, live, 3, costs) == [("b", 0), ("b", 1), ("a", 0)]
    with pytest.raises(ValueError, match="group 'a': 3 live flags for 2 scores"):
        select_channels(scores, {**live, "a": torch.ones(3, dtype=torch.bool)}, 1)


class LiveProbe(L.Callback):
    """Live channels per group, the widths and ``val/acc_full`` at the end of every epoch."""

    def __init__(self) -> None:
        self.live, self.sizes, self.acc_full = [], [], []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        gates = gated_groups(pl_module.net)
        self.live.append({g: int((p != 0).sum()) for g, p in gates.items()})
        self.sizes.append({g.name: g.size for g in pl_module.channel_groups()})

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged its epoch
        if not trainer.sanity_checking:
            self.acc_full.append(float(trainer.callback_metrics["val/acc_full"]))


def test_fisher_prunes_to_the_channel_target_and_gc_collects_each_event(tmp_path):
    module = tiny_module()
    total = sum(g.size for g in module.channel_groups())  # 48
    fisher = FisherPruning(every_n_steps=2, per_step=2, stop_at="channels", target_fraction=0.6)
    probe = LiveProbe()
    trainer = tiny_trainer(
        tmp_path, max_epochs=5, callbacks=[fisher, GarbageCollection(after_prune=True), probe]
    )
    trainer.fit(module, datamodule=data())
    assert fisher.done and fisher.initial == total and fisher.target == pytest.approx(0.6 * total)
    pruned = [ch for _, chans, _ in fisher.history for ch in chans]
    assert len(pruned) == math.ceil(0.4 * total) and len(fisher.history) == len(pruned) // 2
    assert [v for _, _, v in fisher.history] == [total - 2 * i for i in range(1, len(fisher.history) + 1)]
    sizes = {g.name: g.size for g in module.channel_groups()}
    # collected after each event: the network has exactly the live channels, each group at least one
    assert sum(sizes.values()) == total - len(pruned) and min(sizes.values()) >= 1
    assert all(bool((p != 0).all()) for p in gated_groups(module.net).values())
    assert sizes == probe.sizes[-1] == probe.live[-1]
    # model selection waited: acc_full NaN while pruning (events end in epoch 3), real afterwards
    assert math.isnan(probe.acc_full[0]) and not math.isnan(probe.acc_full[-1])
    assert "fisher/params" in trainer.callback_metrics and "fisher/mflops" in trainer.callback_metrics


def test_inner_scope_gates_only_the_cells_inner_widths(tmp_path):
    module = tiny_module()
    streams = {g.name: g.size for g in module.channel_groups() if g.name.startswith("stream")}
    fisher = FisherPruning(every_n_steps=1, per_step=1, target_value=20, scope="inner")
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[fisher, GarbageCollection(after_prune=True)])
    trainer.fit(module, datamodule=data())
    assert set(gated_groups(module.net)) == {f"cell{i}.mid" for i in range(4)}
    assert {g.name: g.size for g in module.channel_groups() if g.name.startswith("stream")} == streams
    assert fisher.done and sum(g.size for g in module.channel_groups() if g.name.endswith(".mid")) == 20


def run(tmp_path, module, callbacks, max_epochs, ckpt_path=None):
    trainer = tiny_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, datamodule=data(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("criterion", ["fisher", "random"])
def test_flops_pruning_resumes_exactly_from_a_collected_checkpoint(tmp_path, criterion):
    """Stop after epoch 1 (two events collected, one half-accumulated window), resume: bit-identical."""

    def callbacks(d):
        fisher = FisherPruning(
            every_n_steps=3,
            per_step=1,
            cost="flops",
            stop_at="flops",
            target_fraction=0.8,
            criterion=criterion,
        )
        return fisher, [fisher, GarbageCollection(after_prune=True), ModelCheckpoint(d, save_top_k=-1)]

    ref = tiny_module(net=dict(dense=True))
    fisher_ref, cbs = callbacks(tmp_path / "a")
    run(tmp_path / "a", ref, cbs, max_epochs=5)
    assert len(fisher_ref.history) >= 3
    resumed = tiny_module(net=dict(dense=True))  # full size: the checkpoint's ArchSpec rebuilds it smaller
    fisher_b, cbs = callbacks(tmp_path / "b")
    run(tmp_path / "b", resumed, cbs, max_epochs=5, ckpt_path=str(tmp_path / "a" / "epoch=1-step=8.ckpt"))
    assert resumed.arch_spec == ref.arch_spec
    assert fisher_b.history == fisher_ref.history
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # the FLOPs logged are those of the collected network
    assert fisher_ref.history[-1][2] == pytest.approx(
        ref.costs().flops_to_exit(ref.arch_spec.num_blocks - 1) / 1e6
    )


def test_l1_scores_sum_each_channels_filters_over_the_producing_convolutions():
    module = tiny_module(net=dict(dense=False))
    net = module.net
    groups = {g.name: g for g in net.channel_groups()}
    attach_gates(net, list(groups))
    scores = l1_scores(net, list(groups))
    modules = dict(net.named_modules())
    for name, g in groups.items():
        convs = [modules[w.module] for w in g.producers if isinstance(modules[w.module], torch.nn.Conv2d)]
        assert convs, name
        manual = sum(c.weight.detach().abs().sum(dim=(1, 2, 3)).double() for c in convs)
        torch.testing.assert_close(scores[name], manual)


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_the_controls_choose_the_lowest_of_their_own_scores(tmp_path, monkeypatch, criterion):
    import callbacks.fisher as cb

    seen = []
    real = cb.l1_scores if criterion == "l1" else cb.random_scores

    def spy(*args):
        seen.append({g: v.clone() for g, v in real(*args).items()})
        return seen[-1]

    monkeypatch.setattr(cb, f"{criterion}_scores", spy)
    fisher = FisherPruning(every_n_steps=2, per_step=2, target_fraction=0.8, criterion=criterion)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[fisher]).fit(tiny_module(), datamodule=data())
    assert len(seen) == len(fisher.history) >= 2
    for i, (scores, (_, chosen, _)) in enumerate(zip(seen, fisher.history)):
        live = {g: torch.ones_like(v, dtype=torch.bool) for g, v in scores.items()}
        for _, earlier, _ in fisher.history[:i]:  # closed by earlier events (no GC: the widths stay)
            for g, k in earlier:
                live[g][k] = False
        assert [tuple(c) for c in chosen] == select_channels(scores, live, 2)
    if criterion == "random":  # the run's seed decides: another seed, other channels
        again = FisherPruning(every_n_steps=2, per_step=2, target_fraction=0.8, criterion=criterion)
        module = tiny_module()  # the same start (tiny_module seeds its weights), another run seed
        torch.manual_seed(123)
        tiny_trainer(tmp_path / "b", max_epochs=2, callbacks=[again]).fit(module, datamodule=data())
        assert again.history[0][1] != fisher.history[0][1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(criterion="taylor"), r"FisherPruning criterion must be one of \['fisher', 'l1', 'random'\]"),
        (
            dict(cost="params"),
            r"FisherPruning cost must be one of \['none', 'flops', 'latency'\]; got 'params'",
        ),
        (dict(stop_at="accuracy"), r"FisherPruning stop_at must be one of \[.*\]; got 'accuracy'"),
        (dict(cost="latency"), r"cost: latency needs lut: the path of latency look-up"),
        (dict(every_n_steps=0), "every_n_steps must be an integer >= 1; got 0"),
        (dict(per_step=0), "per_step must be an integer >= 1; got 0"),
        (dict(target_fraction=None), "exactly one of target_fraction and target_value"),
        (dict(target_value=100), "exactly one of target_fraction and target_value"),
        (dict(target_fraction=1.0), r"target_fraction must lie in \(0, 1\); got 1.0"),
        (dict(target_fraction=None, target_value=-3), "target_value must be > 0; got -3"),
        (dict(scope="outer"), r"FisherPruning scope must be one of \['all', 'inner'\]; got 'outer'"),
        (dict(start_epoch=-1), "start_epoch must be an integer >= 0; got -1"),
    ],
)
def test_bad_fisher_configs_name_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FisherPruning(**{"target_fraction": 0.5, **kwargs})


def test_a_target_already_met_is_refused_at_fit_start(tmp_path):
    fisher = FisherPruning(stop_at="params", target_value=10_000_000)
    with pytest.raises(ValueError, match=r"target already met: params is [\d,]+, target_value 10,000,000"):
        tiny_trainer(tmp_path, callbacks=[fisher]).fit(tiny_module(), datamodule=data())
