"""SNIP at filter and edge granularity, edge surgery and the latency budget (issue 19).

Edge surgery is exact (logits and further training unchanged) on every dense network of the registry; an
edge-removed ArchSpec survives checkpoints, ``found_arch.yaml`` and retraining from scratch; FLOPs follow the
removed slices; filters and edges are pruned to their exact per-block counts or to a predicted-latency budget.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks import Growing, RetrainFromScratch, SnipPruning
from lit_nas import ArchSpec, DataShape, NetConfig, build_net
from lit_nas.cost import count_costs
from lit_nas.masks import apply_masks, attach_masks, connectivity_map, get_masks, mask_grads, masked_pairs
from lit_nas.module import MultiExitModule
from lit_nas.optim import OptimizerConfig
from lit_nas.snip import edge_scores, filter_scores, group_block, rank_units, removal_to_budget
from lit_nas.surgery import dead_edges, edge_removed_spec, remove_edges
from tests.helpers import tiny_data as data
from tests.helpers import tiny_module, tiny_trainer
from tests.test_growing import StopAfter
from tests.test_lut import flops_like_lut
from tests.test_nets import DENSE_KINDS, RECIPES

SHAPE = DataShape(3, 16, 10)


def dense_net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    net = build_net(NetConfig(kind=kind, dense=True, **RECIPES[kind]).build_spec(SHAPE))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a misplaced slice shows in the logits
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def edge_masks(net, edges) -> dict[str, torch.Tensor]:
    """Masks that zero the input slices of ``edges`` (and nothing else)."""
    masks: dict[str, torch.Tensor] = {}
    params = dict(net.named_parameters())
    for j, i in edges:
        name = f"{net.cell_input_layer(i)}.weight"
        m = masks.setdefault(name, torch.ones_like(params[name]))
        src = next(s for s in net.dense_sources(i) if s.feature == j)
        m[:, src.start : src.stop] = 0
    return masks


def some_edges(spec: ArchSpec) -> list[tuple[int, int]]:
    """Every cell but the first loses the stem edge; the last also its predecessor's (the shortcut's own)."""
    last = spec.num_cells - 1
    return [(0, i) for i in range(1, spec.num_cells)] + [(last, last)]


def sgd_steps(net, opt, x, y, steps: int) -> None:
    pairs = masked_pairs(net)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(lg, y) for lg in net(x).logits)
        loss.backward()
        mask_grads(pairs)
        opt.step()
        apply_masks(pairs)


# -- edge surgery ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_edge_removal_is_exact_and_training_continues_identically(kind):
    """Masked edges removed mid-training: same logits, then the same network after more momentum steps."""

    def masked():  # the same masked network and optimizer, built twice (training is deterministic)
        net = dense_net(kind)
        attach_masks(net, edge_masks(net, some_edges(net.spec)))
        return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    torch.manual_seed(2)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    (net, opt), (ref, ref_opt), (bad, bad_opt) = masked(), masked(), masked()
    for n, o in ((net, opt), (ref, ref_opt), (bad, bad_opt)):
        sgd_steps(n, o, x, y, 3)  # momentum built up before the surgery
    edges = some_edges(net.spec)
    assert sorted(dead_edges(net, get_masks(net))) == sorted(edges)
    spec = remove_edges(net, edges, [opt])
    assert spec is net.spec and sorted(spec.removed_edges()) == sorted(edges)
    for i in range(spec.num_cells):
        conv = dict(net.named_modules())[net.cell_input_layer(i)]
        assert conv.in_channels == conv.weight.shape[1] == spec.cell_input_widths()[i]
    net.eval(), ref.eval()
    for a, b in zip(net(x).logits, ref(x).logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    net.train(), ref.train()
    sgd_steps(net, opt, x, y, 3)
    sgd_steps(ref, ref_opt, x, y, 3)
    net.eval(), ref.eval()
    for a, b in zip(net(x).logits, ref(x).logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # negative control: without slicing the optimizer's momentum, the next step cannot even run
    remove_edges(bad, edges)
    with pytest.raises(RuntimeError):
        sgd_steps(bad, bad_opt, x, y, 1)


def test_edge_surgery_refuses_what_cannot_be_removed():
    spec = dense_net("resnet_sdn").spec
    with pytest.raises(ValueError, match=r"edge \(3, 1\) is not a live"):
        edge_removed_spec(spec, [(3, 1)])
    with pytest.raises(ValueError, match="cell 1 would read no feature: keep at least one of"):
        edge_removed_spec(spec, [(0, 1), (1, 1)])
    plain = NetConfig(**RECIPES["resnet_sdn"]).build_spec(SHAPE)
    with pytest.raises(ValueError, match="only be removed from a dense network"):
        edge_removed_spec(plain, [(0, 0)])
    bad = spec.to_dict()
    bad["cells"][2]["reads"] = [2, 0]
    with pytest.raises(ValueError, match=r"cell 2: reads must be increasing features in 0..2"):
        ArchSpec.from_dict(bad)
    bad["dense"] = False
    bad["cells"][2]["reads"] = [2]
    with pytest.raises(ValueError, match="needs dense: true"):
        ArchSpec.from_dict(bad)


def test_flops_and_connectivity_follow_the_removed_edges():
    net = dense_net("resnet_sdn")
    before = count_costs(net)
    spec = net.spec
    edges = some_edges(spec)
    widths, sizes = spec.feature_widths(), spec.feature_sizes()
    # a 3x3 conv reading c fewer channels at output side s saves 2 * mid * c * 9 * s^2 FLOPs
    saved = sum(2 * spec.cells[i].mid * widths[j] * 9 * sizes[i + 1] ** 2 for j, i in edges)
    remove_edges(net, edges)
    after = count_costs(net)
    assert sum(before.block_flops) - sum(after.block_flops) == saved
    removed_params = sum(spec.cells[i].mid * widths[j] * 9 for j, i in edges)
    assert before.total_params - after.total_params == removed_params
    cmap = connectivity_map(net, {})
    assert sorted(cmap.dead_edges) == sorted(
        ("stem" if j == 0 else f"cell{j - 1}", f"cell{i}") for j, i in edges
    )
    assert cmap.num_edges == spec.num_cells * (spec.num_cells + 1) // 2  # removed edges still drawn


# -- scores and ranking ------------------------------------------------------------------------------------
def test_filter_and_edge_scores_sum_the_weight_scores():
    net = dense_net("resnet_sdn")
    torch.manual_seed(3)
    scores = {n: torch.rand_like(p) for n, p in net.named_parameters() if p.dim() == 4}
    groups = net.channel_groups()
    fs = filter_scores(scores, groups)
    stream = next(g for g in groups if g.name == "stream0")
    convs = [w.module for w in stream.producers if f"{w.module}.weight" in scores]
    assert len(convs) >= 2  # the stem and every cell of the stream
    expected = sum(scores[f"{m}.weight"].sum((1, 2, 3)) for m in convs)
    torch.testing.assert_close(fs["stream0"], expected)
    assert group_block(stream) == 0 and group_block(next(g for g in groups if g.name == "cell3.mid")) == 3
    es = edge_scores(scores, net, [2])
    w = scores[f"{net.cell_input_layer(2)}.weight"]
    for src in net.dense_sources(2):
        assert es[(src.feature, 2)] == pytest.approx(float(w[:, src.start : src.stop].sum()))


def test_rank_units_never_removes_an_owners_last_unit_and_budget_bisects():
    scores = {("a", 0): 0.1, ("a", 1): 0.2, ("b", 0): 0.05, ("b", 1): 0.9, ("c", 0): 0.01}
    ranked = rank_units(scores, {u: u[0] for u in scores})
    assert ranked == [("b", 0), ("a", 0)]  # c's only unit and each group's best stay
    costs = [10.0, 7.0, 4.0, 1.0]
    calls = []

    def cost(k):
        calls.append(k)
        return costs[k]

    assert removal_to_budget(["x", "y", "z"], cost, 5.0) == 2
    assert removal_to_budget(["x", "y", "z"], cost, 10.0) == 0
    assert removal_to_budget(["x", "y", "z"], cost, 0.5) == 3  # unreachable: everything removable goes
    assert len(calls) <= 3 + 3 + 1


# -- the callback ------------------------------------------------------------------------------------------
def make_module(**kwargs) -> MultiExitModule:
    kwargs.setdefault("optimizer", OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4))
    return tiny_module(seed=0, net={"dense": True}, **kwargs)


def snip(granularity: str, **kw) -> SnipPruning:
    kw = {"keep_ratio": 0.5, "mode": "iterative", "steps": 2, "after_epochs": 1, **kw}
    return SnipPruning(granularity=granularity, criterion_batch_size=16, **kw)


def test_edge_granularity_keeps_the_exact_share_of_each_blocks_edges(tmp_path):
    module = make_module()
    spec0 = module.arch_spec
    cb, grow = snip("edge"), Growing(grow_epochs=[1, 2, 3])
    tiny_trainer(tmp_path, max_epochs=6, callbacks=[grow, cb]).fit(module, datamodule=data())
    spec = module.arch_spec
    for b in range(spec.num_blocks):
        cells = spec0.cells_of_block(b)
        total = sum(i + 1 for i in cells)
        live = sum(len(spec.cell_reads(i)) for i in cells)
        assert live == max(len(cells), round(0.5 * total)), b  # each cell keeps one source at least
    assert cb.history[-1][4:] == (live, total)
    assert spec.removed_edges() and all(spec.cell_reads(i) for i in range(spec.num_cells))
    module.eval()  # the module's convs are the spec's
    assert build_net(spec).state_dict().keys() == module.net.state_dict().keys()
    shapes = {k: v.shape for k, v in build_net(spec).state_dict().items()}
    assert all(v.shape == shapes[k] for k, v in module.net.state_dict().items())


def test_filter_granularity_narrows_each_block_to_its_share_of_channels(tmp_path):
    module = make_module()
    start = {g.name: g.size for g in module.channel_groups()}
    owner = {g.name: group_block(g) for g in module.channel_groups()}
    params = count_costs(module.net).total_params
    cb = snip("filter", keep_ratio=0.5, mode="one_shot", steps=None, after_epochs=0)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(module, datamodule=data())
    sizes = {g.name: g.size for g in module.channel_groups()}
    for b in range(4):
        total = sum(n for g, n in start.items() if owner[g] == b)
        assert sum(n for g, n in sizes.items() if owner[g] == b) == round(0.5 * total), b
    assert all(n >= 1 for n in sizes.values())
    assert count_costs(module.net).total_params < params


@pytest.mark.parametrize("granularity", ["edge", "filter"])
def test_latency_budget_is_met_with_the_fewest_removals(tmp_path, granularity):
    module = make_module()
    lut = flops_like_lut(module.arch_spec)
    path = lut.save(tmp_path / "lut.json")
    start = [lut.block_ms(module.arch_spec, b) for b in range(4)]
    cb = snip(granularity, keep_ratio=0.6, mode="one_shot", steps=None, after_epochs=0, stop_at="latency",
              lut=str(path))  # fmt: skip
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(module, datamodule=data())
    spec = module.arch_spec
    assert {b: cb.initial[b][1] for b in range(4)} == pytest.approx(dict(enumerate(start)))
    # every block is under its budget, unless nothing more could go (each cell keeps a source, each group a
    # channel); removing units of one block never makes another slower
    owners = len({g.name for g in make_module().channel_groups()})
    met = []
    for b in range(4):
        kept = next(row[4] for row in cb.history if row[1] == b)
        floor = len(spec.cells_of_block(b)) if granularity == "edge" else None
        met.append(lut.block_ms(spec, b) <= 0.6 * start[b] + 1e-9)
        assert met[-1] or kept == floor or (granularity == "filter" and kept <= owners), b
    assert any(met) and sum(lut.block_ms(spec, b) for b in range(4)) < sum(start)


def test_weight_granularity_removes_the_edges_that_die(tmp_path):
    module = make_module()
    cb = SnipPruning(keep_ratio=0.05, after_epochs=0, criterion_batch_size=16)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(module, datamodule=data())
    spec = module.arch_spec
    assert spec.removed_edges(), "at 5% of the weights some edge dies"
    assert dead_edges(module.net, module.masks(), prefix="net.") == []  # every dead one was removed
    off = make_module()
    cb_off = SnipPruning(keep_ratio=0.05, after_epochs=0, criterion_batch_size=16, remove_dead_edges=False)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[cb_off]).fit(off, datamodule=data())
    assert off.arch_spec.removed_edges() == [] and dead_edges(off.net, off.masks(), prefix="net.")


@pytest.mark.parametrize("granularity", ["edge", "filter"])
def test_pruned_architecture_round_trips_checkpoint_found_arch_and_retraining(tmp_path, granularity):
    """Resume after the first prune ends bit-identical; a run that forgets the callback state does not."""

    # linear steps (edges 0.75 then 0.5, filters 0.7 then 0.4): a forgetful resume takes its first step again,
    # of what is left (geometric steps would agree with the right second step)
    keep = 0.5 if granularity == "edge" else 0.4
    kw = dict(keep_ratio=keep, schedule="linear", prune_epochs=[1, 3], after_epochs=0)

    def run(root, max_epochs, ckpt_path=None, stop=None, cb=None, retrain=False):
        torch.manual_seed(0)
        module = make_module()
        cb = cb or snip(granularity, **kw)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1)
        extra = [StopAfter(stop)] if stop is not None else []
        extra += [RetrainFromScratch(epoch=4)] if retrain else []
        trainer = tiny_trainer(
            tmp_path, max_epochs=max_epochs, callbacks=[cb, ckpt, *extra], enable_checkpointing=True
        )
        trainer.fit(module, datamodule=data(), ckpt_path=ckpt_path)
        return module, cb

    full, cb_full = run("a", 5)
    spec = full.arch_spec
    assert spec != make_module().arch_spec
    run("b", 5, stop=2)  # stopped between the two prunings
    stopped = tmp_path / "stopped.ckpt"
    shutil.copy(tmp_path / "b" / "last.ckpt", stopped)
    resumed, cb_res = run("b", 5, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.arch_spec == spec and cb_res.history == cb_full.history
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # negative control: the same resume with a callback that lost its state prunes again from scratch
    fresh = snip(granularity, **kw)
    fresh.load_state_dict = lambda state: None  # type: ignore[method-assign]
    forgot, _ = run("b2", 5, ckpt_path=str(stopped), cb=fresh)
    assert forgot.arch_spec != spec
    # the checkpoint and found_arch.yaml rebuild the architecture
    loaded = MultiExitModule.load_from_checkpoint(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert loaded.arch_spec == spec
    x = torch.randn(4, 3, 16, 16)
    full.eval(), loaded.eval()
    for a, b in zip(full(x).logits, loaded(x).logits):
        torch.testing.assert_close(a, b)
    assert ArchSpec.load(cb_full.found_paths[0]) == spec
    # retraining from scratch keeps the found architecture, with fresh weights
    retrained, _ = run("c", 6, retrain=True)
    assert retrained.arch_spec.to_dict() | {"active_blocks": 0} == spec.to_dict() | {"active_blocks": 0}


def test_structured_granularity_is_validated_when_built_and_at_fit(tmp_path):
    with pytest.raises(ValueError, match=r"granularity must be one of \['weight', 'filter', 'edge'\]"):
        SnipPruning(keep_ratio=0.5, granularity="block")
    with pytest.raises(ValueError, match="stop_at 'latency' needs granularity 'filter' or 'edge'"):
        SnipPruning(keep_ratio=0.5, stop_at="latency", lut="x.json")
    with pytest.raises(ValueError, match="SnipPruning stop_at: latency needs lut"):
        SnipPruning(keep_ratio=0.5, granularity="edge", stop_at="latency")
    with pytest.raises(ValueError, match=r"lut 'missing\.json' does not exist"):
        SnipPruning(keep_ratio=0.5, granularity="edge", stop_at="latency", lut="missing.json")
    with pytest.raises(ValueError, match="include_exits prunes the exits' weights"):
        SnipPruning(keep_ratio=0.5, granularity="filter", include_exits=True)
    with pytest.raises(ValueError, match="granularity 'edge' prunes the edges of the dense concatenation"):
        tiny_trainer(tmp_path, callbacks=[snip("edge", after_epochs=0)]).fit(
            tiny_module(seed=0), datamodule=data()
        )
