"""NetAdapt (Liège thesis section 4.6, Algorithm 4): candidate steps, the pick, untouched net, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lit_nas.netadapt as netadapt_core
from callbacks import GarbageCollection, NetAdapt, RetrainFromScratch
from lit_nas import DataShape, MultiExitModule, NetConfig
from lit_nas.cost import spec_cost
from lit_nas.data import SyntheticDataModule
from lit_nas.latency import LatencyLUT
from lit_nas.netadapt import channels_to_cut, pick_best, sample_groups
from tests.helpers import TINY, tiny_trainer
from tests.test_families import synthetic_lut

SHAPE = DataShape(3, 16, 10)


def module(seed: int = 0) -> MultiExitModule:
    torch.manual_seed(seed)
    return MultiExitModule(
        net=NetConfig(**{**TINY, "stage_widths": [8, 16, 16]}),
        data_shape=SHAPE,
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
    )


def data(holdout: int = 48) -> SyntheticDataModule:
    return SyntheticDataModule(num_train=208, num_test=64, input_size=16, batch_size=32, holdout_size=holdout)


@pytest.fixture
def lut_path(tmp_path):
    synthetic_lut("resnet_sdn", True, tmp_path / "lut.json", stage_widths=[8, 16, 16])
    return tmp_path / "lut.json"


def netadapt(lut_path, **kw) -> NetAdapt:
    args = dict(
        stop_at="latency",
        target_fraction=0.3,
        step_fraction=0.04,
        start_epoch=1,
        short_term_batches=2,
        lut=str(lut_path),
    )
    return NetAdapt(**{**args, **kw})


def test_every_candidate_meets_its_step_by_the_lut_with_the_fewest_channels(lut_path):
    lut = LatencyLUT.load(lut_path)
    net = module().net
    current = lut.predict(net.spec)
    cost = lambda spec: spec_cost(spec, "latency", lut)  # noqa: E731
    seen = 0
    for step in (0.02 * current, 0.1 * current, 0.4 * current):
        for g in net.channel_groups():
            prop = channels_to_cut(net, g.name, cost, current, step)
            if prop is None:  # even one channel left does not reach the step
                assert g.size == 1 or lut.predict(net.resized_spec(g.name, 1)) > current - step
                continue
            seen += 1
            after = lut.predict(net.resized_spec(g.name, g.size - prop.remove))
            assert prop.meets_step and after <= current - step
            assert prop.cost == pytest.approx(after) and prop.reduction == pytest.approx(current - after)
            if prop.remove > 1:  # one channel fewer would not do (the synthetic tables fall monotonically)
                assert lut.predict(net.resized_spec(g.name, g.size - prop.remove + 1)) > current - step
            small = channels_to_cut(net, g.name, cost, current, step, allow_small=True)
            assert small == prop  # a group that can meet the step is proposed the same way
    assert seen >= 5
    # allow small prunings: a group that cannot meet a big step is proposed pruned to one channel
    big = 0.6 * current
    g = next(
        g
        for g in net.channel_groups()
        if g.size > 1 and channels_to_cut(net, g.name, cost, current, big) is None
    )
    small = channels_to_cut(net, g.name, cost, current, big, allow_small=True)
    assert small is not None and not small.meets_step and small.remove == g.size - 1 and small.reduction > 0


def test_the_pick_follows_the_thesis_rule():
    # nothing beats the network (0.5): the least accuracy lost per unit of cost saved
    assert pick_best(0.5, [0.40, 0.45, 0.30], [1.0, 2.0, 0.5]) == 1  # ratios 0.1, 0.025, 0.4
    assert pick_best(0.5, [0.40, 0.45], [1.0, 0.25]) == 0  # 0.1 vs 0.2: a bigger saving wins
    # one improves on it: the most accurate, whatever it saves
    assert pick_best(0.5, [0.40, 0.60, 0.55], [9.0, 0.1, 5.0]) == 1
    assert pick_best(0.5, [0.45, 0.45], [1.0, 1.0]) == 0  # ties: the first
    with pytest.raises(ValueError, match="one reduction per candidate"):
        pick_best(0.5, [0.4], [])
    # the sampled groups are a deterministic subset, in order
    names = [f"g{i}" for i in range(10)]
    a = sample_groups(names, 0.3, torch.Generator().manual_seed(3))
    assert a == sample_groups(names, 0.3, torch.Generator().manual_seed(3)) and len(a) == 3
    assert a == sorted(a, key=names.index)


class Snapshot(Callback):
    """At each epoch start (before NetAdapt), copy the network's tensors and the optimizer state."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.weights = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
        self.grads = {
            n: None if p.grad is None else p.grad.clone() for n, p in pl_module.net.named_parameters()
        }
        self.opt = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_candidates_leave_the_kept_network_and_its_optimizer_state_untouched(lut_path, tmp_path, monkeypatch):
    snap = Snapshot()
    checks = []
    real = netadapt_core.remove_channels

    def checked(net, group, keep, optimizers=()):
        if not optimizers:  # a candidate's copy (prune_copy): nothing to check
            return real(net, group, keep)
        # what the candidates' evaluation left of the network, right before the winner is applied
        same = all(torch.equal(v, snap.weights[k]) for k, v in net.state_dict().items())
        same &= all(
            (p.grad is None and snap.grads[n] is None) or torch.equal(p.grad, snap.grads[n])
            for n, p in net.named_parameters()
        )
        state = optimizers[0].state_dict()
        same &= state["param_groups"] == snap.opt["param_groups"]
        same &= all(
            torch.equal(v, snap.opt["state"][i][key])
            for i, s in state["state"].items()
            for key, v in s.items()
        )
        checks.append(same)
        return real(net, group, keep, optimizers)

    monkeypatch.setattr(netadapt_core, "remove_channels", checked)
    m = module()
    search = netadapt(lut_path, criterion="fisher")
    tiny_trainer(tmp_path, max_epochs=3, callbacks=[snap, search]).fit(m, datamodule=data())
    assert len(checks) == 2 and all(checks)
    assert [h["cost"] for h in search.history] == sorted([h["cost"] for h in search.history], reverse=True)


def run(tmp_path, callbacks, max_epochs, ckpt_path=None):
    m = module()
    trainer = tiny_trainer(tmp_path, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(m, datamodule=data(), ckpt_path=ckpt_path)
    return m


def strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_a_resume_mid_search_ends_bit_identical_and_needs_the_search_state(lut_path, tmp_path):
    def callbacks(d):
        search = netadapt(lut_path, target_fraction=0.2, iterations_per_epoch=1)
        return search, [search, ModelCheckpoint(d, save_top_k=-1, every_n_epochs=1)]

    ref_search, cbs = callbacks(tmp_path / "a")
    ref = run(tmp_path / "a", cbs, max_epochs=4)
    assert len(ref_search.history) == 3  # iterations at the start of epochs 1, 2, 3
    # each iteration cut at least its step (latency by the tables), the step decaying
    step = ref_search.initial * 0.04
    costs = [ref_search.initial] + [h["cost"] for h in ref_search.history]
    for i in range(3):
        assert costs[i + 1] <= costs[i] - step * 0.96**i + 1e-9
    ckpt = next((tmp_path / "a").glob("epoch=1-*.ckpt"))  # after the first iteration and one epoch on it
    search_b, cbs = callbacks(tmp_path / "b")
    resumed = run(tmp_path / "b", cbs, max_epochs=4, ckpt_path=str(ckpt))
    assert resumed.arch_spec == ref.arch_spec
    assert strip(search_b.history) == strip(ref_search.history)
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    # negative control: the same checkpoint without NetAdapt's state restarts the search from the pruned
    # network (a new start cost and step), and the run ends elsewhere
    state = torch.load(ckpt, weights_only=False)
    state["callbacks"] = {k: v for k, v in state["callbacks"].items() if "NetAdapt" not in k}
    torch.save(state, tmp_path / "no_search_state.ckpt")
    search_c, cbs = callbacks(tmp_path / "c")
    lost = run(tmp_path / "c", cbs, max_epochs=4, ckpt_path=str(tmp_path / "no_search_state.ckpt"))
    assert strip(search_c.history) != strip(ref_search.history)
    assert search_c.initial != ref_search.initial
    assert lost.arch_spec != ref.arch_spec or any(
        not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), lost.state_dict().values())
    )


def test_netadapt_variants_reach_a_params_objective_and_retrain_from_scratch_follows(tmp_path):
    m = module()
    start = spec_cost(m.arch_spec, "params")
    search = NetAdapt(
        stop_at="params",
        target_fraction=0.75,
        step_value=0.1 * start,
        start_epoch=1,
        iterations_per_epoch=5,
        short_term_batches=2,
        criterion="fisher",
        allow_small_prunings=True,
        group_fraction=0.5,
        adopt_finetuned=False,
    )
    retrain = RetrainFromScratch(epoch=2, seed=1)
    ckpt = tmp_path / "ckpt"
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=3,
        callbacks=[search, GarbageCollection(), retrain, ModelCheckpoint(ckpt)],
        enable_checkpointing=True,
    )
    trainer.fit(m, datamodule=data())
    assert search.done and search.cost <= 0.75 * start
    assert spec_cost(m.arch_spec, "params") == search.cost == m.costs().total_params
    assert retrain.restarted
    assert all(h["candidates"] <= 4 for h in search.history)  # half of the tiny net's 8 groups per iteration
    found = MultiExitModule.spec_from_checkpoint(next(ckpt.glob("*.ckpt")))
    assert found == m.arch_spec
    assert (ckpt / "found_arch.yaml").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stop_at="accuracy"), r"NetAdapt stop_at must be one of \['params', 'flops', 'latency'\]"),
        (dict(criterion="random"), r"NetAdapt criterion must be one of \['l2', 'fisher'\]; got 'random'"),
        (dict(lut=None), "stop_at: latency needs lut"),
        (dict(lut="nowhere.json"), "lut 'nowhere.json' does not exist"),
        (dict(target_fraction=None), "exactly one of target_fraction and target_value"),
        (dict(target_fraction=1.5), r"target_fraction must lie in \(0, 1\); got 1.5"),
        (dict(step_fraction=0.0), r"step_fraction must lie in \(0, 1\); got 0.0"),
        (dict(decay=1.5), r"decay must lie in \(0, 1\]; got 1.5"),
        (dict(short_term_batches=0), "short_term_batches must be an integer >= 1; got 0"),
        (dict(group_fraction=0.0), r"group_fraction must lie in \(0, 1\]; got 0.0"),
    ],
)
def test_bad_netadapt_configs_name_the_value(lut_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        netadapt(lut_path, **kwargs)


def test_a_search_without_a_holdout_split_is_refused_before_training(lut_path, tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[netadapt(lut_path)])
    with pytest.raises(ValueError, match="set data holdout_size"):
        trainer.fit(module(), datamodule=data(holdout=0))
    assert trainer.global_step == 0


@pytest.mark.parametrize("kind", ["mobilenet_v1", "mobilenet_v2"])  # dwsep and inverted cells (depthwise)
def test_an_iteration_runs_on_the_mobile_families_and_the_checkpoint_rebuilds_it(kind, tmp_path):
    from tests.test_families import module as family_module
    from tests.test_families import reloads_exactly

    m = family_module(kind, exits=False)
    search = NetAdapt(
        stop_at="flops", target_fraction=0.5, step_fraction=0.1, short_term_batches=1, group_fraction=0.5
    )
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[search])
    before = spec_cost(m.arch_spec, "flops")
    trainer.fit(m, datamodule=data())
    (it,) = search.history
    assert spec_cost(m.arch_spec, "flops") == pytest.approx(it["cost"]) and it["cost"] <= before * 0.9 + 1e-9
    reloads_exactly(trainer, m, tmp_path)
