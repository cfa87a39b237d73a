"""round_to: every channel search ends each group a multiple of the step (or narrower than one step), on
the WRN, dense and MobileNetV2 families; the rounding rules themselves."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from callbacks import FisherPruning, GarbageCollection, MorphNet, NetAdapt, SnipPruning, SwitchL1
from lit_nas import DataShape, MultiExitModule, NetConfig
from lit_nas.align import (
    align_down,
    align_removal,
    align_up,
    aligned_keep,
    check_round_to,
    is_aligned,
    resolve_round_to,
    smaller_sizes,
)
from lit_nas.cost import spec_cost
from lit_nas.data import SyntheticDataModule
from lit_nas.fisher import select_channels
from lit_nas.gates import attach_gates, close_channels, gated_groups
from lit_nas.morphnet import expand, scaled_sizes
from lit_nas.netadapt import channels_to_cut
from lit_nas.nets import build_net
from lit_nas.nets.recipe import scale_widths
from lit_nas.surgery import collect_gated
from tests.helpers import tiny_data, tiny_trainer

SHAPE = DataShape(3, 16, 10)
STEP = 8
#: the three families of the acceptance, at widths of two and three steps
FAMILIES = {
    "wrn": NetConfig(stage_widths=[16, 16, 24], cells_per_stage=[1, 1, 1], exit_depths=[0.5, 1.0]),
    "dense": NetConfig(stage_widths=[16, 16, 24], cells_per_stage=[1, 1, 1], exit_depths=[1.0], dense=True),
    "mobilenet_v2": NetConfig(
        kind="mobilenet_v2", stage_widths=[16, 24], cells_per_stage=[1, 2], exit_depths=[1.0]
    ),
}


def sizes_of(net) -> dict[str, int]:
    return {g.name: g.size for g in net.channel_groups()}


def assert_aligned(sizes: dict[str, int], step: int = STEP) -> None:
    bad = {g: n for g, n in sizes.items() if not is_aligned(n, step)}
    assert not bad, f"unaligned groups: {bad}"


# -- the rules --------------------------------------------------------------------------------------------
def test_the_rounding_rules():
    assert [align_up(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert [align_down(n, 8) for n in (3, 8, 9, 17)] == [3, 8, 8, 16]
    assert aligned_keep(9, 24, 8) == 16 and aligned_keep(24, 24, 8) == 24 and aligned_keep(3, 24, 8) == 8
    assert aligned_keep(9, 10, 8) == 8  # rounding up would keep the unaligned group whole: down instead
    assert smaller_sizes(24, 8) == [16, 8] and smaller_sizes(10, 8) == [8] and smaller_sizes(8, 8) == []
    assert smaller_sizes(4, 1) == [3, 2, 1]
    removed = [("a", 0), ("a", 1), ("b", 5), ("a", 2)]
    # a (16 channels) keeps 13 -> 16: all put back; b (16) keeps 15 -> 16
    assert align_removal(removed, {"a": 16, "b": 16}, 8) == []
    many = [("a", k) for k in range(10)]  # keeps 6 -> 8: the two last-ranked come back
    assert align_removal(many, {"a": 16}, 8) == many[:8]
    # an unaligned group of 10 that loses one must go down to 8: the next-ranked channel joins
    assert align_removal([("c", 3)], {"c": 10}, 8, {"c": [7, 1]}) == [("c", 3), ("c", 7)]
    assert resolve_round_to(None, None) == 1 and resolve_round_to(4, None) == 4
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        check_round_to("X", 0)
    with pytest.raises(ValueError, match=r"got 2\.5"):
        FisherPruning(round_to=2.5)


def test_width_baselines_sit_on_the_steps():
    net = {"stage_widths": [16, 32, 64], "cells_per_stage": [1, 1, 1]}
    assert scale_widths(net, 0.625)["stage_widths"] == [10, 20, 40]
    assert scale_widths(net, 0.625, 8)["stage_widths"] == [8, 16, 40]
    assert scale_widths(net, 0.3, 8)["stage_widths"] == [5, 8, 16]  # under one step: stays narrow


# -- every search's core, on every family ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_units_leave_every_group_aligned(family):
    net = build_net(FAMILIES[family].build_spec(SHAPE))
    sizes = sizes_of(net)
    g = torch.Generator().manual_seed(0)
    scores = {name: torch.rand(n, generator=g) for name, n in sizes.items()}
    live = {name: torch.ones(n, dtype=torch.bool) for name, n in sizes.items()}
    for count in (1, 5, 40):
        chosen = select_channels(scores, live, count, step=STEP)
        assert len(chosen) >= min(count, 1)
        after = dict(sizes)
        for name, _ in chosen:
            after[name] -= 1
        assert_aligned(after)
        assert all(after[n] >= min(sizes[n], STEP) for n in sizes)  # never below one step
    # a unit is the group's lowest-scored channels
    (name, _), *_ = select_channels(scores, live, 1, step=STEP)
    unit = [c for n, c in select_channels(scores, live, 1, step=STEP) if n == name]
    assert set(unit) == set(torch.argsort(scores[name])[: len(unit)].tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_netadapt_proposals_and_morphnet_expansion_are_aligned(family):
    spec = FAMILIES[family].build_spec(SHAPE)
    net = build_net(spec)

    def cost(s):
        return spec_cost(s, "flops")

    start = cost(spec)
    for name in sizes_of(net):
        prop = channels_to_cut(net, name, cost, start, 0.02 * start, allow_small=True, round_to=STEP)
        if prop is not None:
            assert is_aligned(sizes_of(net)[name] - prop.remove, STEP)
            # the fewest in multiples: one step fewer would not meet the target
            if prop.remove > STEP and prop.meets_step:
                fewer = net.resized_spec(name, sizes_of(net)[name] - prop.remove + STEP)
                assert cost(fewer) > start - 0.02 * start
    widened, _ = expand(net, cost, 1.7 * start, round_to=STEP)
    wide = sizes_of(build_net(widened))
    assert_aligned(wide)
    assert cost(widened) <= 1.7 * start
    for name, n in wide.items():  # no single group can take one more step
        assert cost(build_net(widened).resized_spec(name, align_down(n, STEP) + STEP)) > 1.7 * start
    assert scaled_sizes({"a": 16, "b": 5}, 1.3, round_to=STEP) == {"a": 16, "b": 6}


@pytest.mark.parametrize("family", FAMILIES)
def test_snip_filter_removals_round_every_touched_group(family):
    sizes = sizes_of(build_net(FAMILIES[family].build_spec(SHAPE)))
    g = torch.Generator().manual_seed(2)
    for frac in (0.2, 0.5, 0.8):
        ranked = {n: torch.randperm(k, generator=g).tolist() for n, k in sizes.items()}
        removed = [(n, c) for n, order in ranked.items() for c in order[: int(frac * len(order))]]
        rest = {n: order[int(frac * len(order)) :] for n, order in ranked.items()}
        kept = align_removal(removed, sizes, STEP, rest)
        after = {n: k - sum(1 for m, _ in kept if m == n) for n, k in sizes.items()}
        assert_aligned(after)
        assert all(a >= 1 for a in after.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_gc_keeps_silent_channels_to_fill_the_tile_and_stays_exact(family):
    torch.manual_seed(0)
    net = build_net(FAMILIES[family].build_spec(SHAPE)).eval()
    groups = list(sizes_of(net))
    attach_gates(net, groups)
    # close 3 channels of every group, and a whole step and 1 more of the first
    closed = [(g, k) for g in groups for k in range(3)] + [(groups[0], k) for k in range(3, 3 + STEP + 1)]
    close_channels(net, closed)
    x = torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in net(x).items()}
    removed = collect_gated(net, round_to=STEP)
    assert_aligned(sizes_of(net))
    assert removed[groups[0]] == STEP  # 12 of 24/16 closed: one tile goes, silent ones fill the other
    for k, v in net(x).items():
        assert_close(v, before[k])
    live = {g: int((t != 0).sum()) for g, t in gated_groups(net).items()}
    assert all(sizes_of(net)[g] == align_up(live[g], STEP) for g in live)


# -- the callbacks, end to end (one fit each, the families in turn) ---------------------------------------
def fit(tmp_path, family, callbacks, epochs=3, data=None):
    torch.manual_seed(0)
    m = MultiExitModule(net=FAMILIES[family], data_shape=SHAPE, optimizer={"name": "sgd", "lr": 0.1})
    trainer = tiny_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks)
    trainer.fit(m, datamodule=data or tiny_data())
    return m


def test_fisher_with_round_to_ends_aligned_on_mobilenet_v2(tmp_path):
    search = FisherPruning(every_n_steps=1, per_step=1, target_fraction=0.6, round_to=STEP)
    m = fit(tmp_path, "mobilenet_v2", [search, GarbageCollection(after_prune=True)])
    assert search.history and all(len(c) >= 1 for _, c, _ in search.history)
    assert_aligned(sizes_of(m.net))
    start = sizes_of(build_net(FAMILIES["mobilenet_v2"].build_spec(SHAPE)))
    assert sum(sizes_of(m.net).values()) < sum(start.values())


def test_switch_kills_collected_with_round_to_end_aligned_on_the_dense_net(tmp_path):
    gc = GarbageCollection(round_to=STEP)
    m = fit(tmp_path, "dense", [SwitchL1(lam=1.0, until_epoch=3), gc], epochs=4)
    assert gc.history and sum(n for _, n, _ in gc.history) > 0  # the switches killed, GC removed
    assert_aligned(sizes_of(m.net))


def test_netadapt_with_round_to_ends_aligned_on_the_wrn(tmp_path):
    start = spec_cost(FAMILIES["wrn"].build_spec(SHAPE), "flops")
    search = NetAdapt(
        stop_at="flops",
        target_value=0.6 * start,
        step_fraction=0.1,
        start_epoch=1,
        iterations_per_epoch=3,
        short_term_batches=1,
        allow_small_prunings=True,
        round_to=STEP,
    )
    data = SyntheticDataModule(num_train=208, num_test=64, input_size=16, batch_size=32, holdout_size=48)
    m = fit(tmp_path, "wrn", [search, GarbageCollection()], data=data)
    assert search.iteration > 0
    assert_aligned(sizes_of(m.net))


def test_morphnet_with_round_to_ends_aligned_on_the_wrn(tmp_path):
    search = MorphNet(
        strength=30.0, threshold=0.2, until_epoch=1, expand_epochs=[2], budget_fraction=0.8, round_to=STEP
    )
    m = fit(tmp_path, "wrn", [search, GarbageCollection(round_to=STEP)])
    assert search.expanded
    assert_aligned(sizes_of(m.net))


def test_snip_filters_with_round_to_end_aligned_on_mobilenet_v2(tmp_path):
    search = SnipPruning(keep_ratio=0.55, granularity="filter", after_epochs=1, round_to=STEP)
    m = fit(tmp_path, "mobilenet_v2", [search], epochs=2)
    start = sizes_of(build_net(FAMILIES["mobilenet_v2"].build_spec(SHAPE)))
    assert sizes_of(m.net) != start
    assert_aligned(sizes_of(m.net))
    with pytest.raises(ValueError, match="round_to aligns channel counts: it needs granularity 'filter'"):
        SnipPruning(keep_ratio=0.5, round_to=8)


def test_fisher_lands_the_event_that_reaches_the_target_on_the_closest_unit():
    torch.manual_seed(0)
    m = MultiExitModule(net=FAMILIES["wrn"], data_shape=SHAPE)
    fisher = FisherPruning(stop_at="flops", target_fraction=0.9, round_to=STEP)
    attach_gates(m.net, fisher.groups(m))
    sizes = sizes_of(m.net)
    fisher.target = 0.97 * spec_cost(m.arch_spec, "flops")
    g = torch.Generator().manual_seed(1)
    scores = {name: torch.rand(n, generator=g) for name, n in sizes.items()}
    live = {name: torch.ones(n, dtype=torch.bool) for name, n in sizes.items()}

    def value(cut):
        return spec_cost(m.net.resized_spec_all({k: sizes[k] - cut.get(k, 0) for k in sizes}), "flops")

    def alone(name):
        unit = select_channels({name: scores[name]}, {name: live[name]}, 1, step=STEP)
        return value({name: len(unit)}) if unit else None

    chosen = select_channels(scores, live, 40, step=STEP)  # many units: far past the target
    landed = fisher._landing(fisher._collected(m), scores, live, None, chosen)
    (group,) = {k for k, _ in landed}  # one unit of one group
    v = value({group: len(landed)})
    assert value({k: sum(1 for c, _ in chosen if c == k) for k in sizes}) < v <= fisher.target
    assert all(a is None or a > fisher.target or a <= v for a in map(alone, sizes))  # the closest below
    few = select_channels(scores, live, 1, step=STEP)
    fisher.target = 0.5 * spec_cost(m.arch_spec, "flops")  # an event that does not reach it: unchanged
    assert fisher._landing(fisher._collected(m), scores, live, None, few) == few
