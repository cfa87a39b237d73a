"""One conformance test over every network in the registry (plain, dense where the family allows it)."""

import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_nas import DataShape, NetConfig, build_net
from lit_nas.cost import count_costs
from lit_nas.nets import NETWORKS
from lit_nas.nets.base import MultiExitNet
from lit_nas.surgery import remove_edges
from tests.helpers import TINY

#: a 4-block recipe of each registered network (WRN-16-1 with Squeeze-and-Excitation: every layer kind)
RECIPES = {
    "resnet_sdn": TINY,
    "wide_resnet": dict(depth=16, widen_factor=1, se_reduction=4),
    # the mobile families: every cell kind, with and without shortcut, SE, dropout and 5x5 kernels
    "mobilenet_v1": dict(TINY, se_reduction=2, dropout=0.2),
    "mobilenet_v2": dict(TINY, expansion=3, se_reduction=2, dropout=0.2),
    "mnasnet": dict(TINY, expansion=4, dropout=0.2),
}
#: dense connections are defined between basic residual cells only
DENSE_KINDS = ("resnet_sdn", "wide_resnet")
#: dense ones also with edges removed by surgery (cell 2 then reads one feature, cell 3 three)
VARIANTS = [
    (kind, dense) for kind in NETWORKS for dense in (False, True, "edges") if kind in DENSE_KINDS or not dense
]
REMOVED_EDGES = [(0, 1), (0, 2), (1, 2), (2, 3)]


def make(kind, dense, **kw):
    torch.manual_seed(0)
    cfg = NetConfig(kind=kind, dense=bool(dense), **{**RECIPES[kind], **kw})
    net = build_net(cfg.build_spec(DataShape(3, 16, 10)))
    if dense == "edges":
        remove_edges(net, REMOVED_EDGES)
        net = build_net(net.spec)  # rebuilt from the spec alone, as a checkpoint is
    return net


@pytest.fixture(
    params=VARIANTS,
    ids=[f"{k}-{'edges' if d == 'edges' else 'dense' if d else 'plain'}" for k, d in VARIANTS],
)
def net(request) -> MultiExitNet:
    return make(*request.param)


def test_forward_returns_every_active_exit(net):
    x = torch.randn(3, 3, 16, 16)
    for active in range(1, net.spec.num_blocks + 1):
        out = net(x, active_blocks=active)
        assert out.exits == tuple(range(active))
        assert all(lg.shape == (3, 10) for lg in out.logits)
        assert out.final is out.logits[-1]
        assert out[active - 1] is out.final


def test_inactive_blocks_are_not_executed(net):
    calls = []
    for b, block in enumerate(net.blocks):
        block.cells[0].register_forward_hook(lambda *_, b=b: calls.append(b))
    net.spec.active_blocks = 2
    net(torch.randn(2, 3, 16, 16)).final.sum().backward()
    assert calls == [0, 1]
    for b in (2, 3):
        assert all(p.grad is None for p in net.blocks[b].parameters())
        assert all(p.grad is None for p in net.exits[str(b)].parameters())


def test_baseline_has_only_the_final_exit():
    for kind in NETWORKS:
        net = make(kind, False, exits=False)
        assert list(net.exits) == ["3"]
        assert net(torch.randn(2, 3, 16, 16)).exits == (3,)


def test_prunable_weights_cover_blocks_and_exclude_exits(net):
    groups = net.prunable_weights()
    layers = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    in_blocks = {n for n in layers if n.startswith("blocks.")}
    named = {k.removesuffix(".weight") for ws in groups.values() for k in ws}
    assert named == in_blocks
    for b, ws in groups.items():
        assert all(k.startswith(f"blocks.{b}.") for k in ws)
    with_exits = net.prunable_weights(include_exits=True)
    assert {k.removesuffix(".weight") for ws in with_exits.values() for k in ws} == layers


def test_channel_groups_match_layer_shapes_and_cover_every_channel(net):
    modules = dict(net.named_modules())
    covered_in: dict[str, list[tuple[int, int]]] = {}
    covered_out: dict[str, int] = {}
    for g in net.channel_groups():
        for s in g.producers:
            m = modules[s.module]
            assert s.dim == 0
            size = m.weight.shape[0]
            assert size == g.size, (g.name, s)
            covered_out[s.module] = covered_out.get(s.module, 0) + 1
        for s in g.consumers:
            m = modules[s.module]
            assert s.dim == 1
            covered_in.setdefault(s.module, []).append((s.start, s.start + g.size * s.per_channel))
    layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    for name in layers:
        if getattr(modules[name], "groups", 1) > 1:  # depthwise: one filter per channel of its group
            assert modules[name].groups == modules[name].in_channels == modules[name].out_channels
            assert covered_out.get(name) == 1 and name not in covered_in, name
            continue
        m = modules[name]
        # an SE's hidden width is fixed: fc1's outputs and fc2's inputs belong to no group
        assert covered_out.get(name) == 1 or isinstance(m, nn.Linear) or name.endswith("se.fc1"), (
            f"{name} output not in exactly one group"
        )
        if (
            isinstance(m, (nn.Conv2d, nn.Linear))
            and name != "blocks.0.stem.conv"
            and not name.endswith("se.fc2")
        ):
            spans = sorted(covered_in[name])
            # the consumer slices tile the layer's input exactly
            assert spans[0][0] == 0 and spans[-1][1] == m.weight.shape[1], name
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), name


def test_channel_group_roles_say_which_channels_a_shortcut_or_later_cell_reads(net):
    # inner: produced and read inside one cell; stream: the features the stem and the cells pass on
    def cell_of(module: str) -> str:
        return ".".join(module.split(".")[:4])  # blocks.<b>.cells.<k>

    roles = {g.name: g.role for g in net.channel_groups()}
    assert set(roles.values()) <= {"inner", "stream"}
    assert "stream" in roles.values()
    for g in net.channel_groups():
        slices = [*g.producers, *g.consumers]
        one_cell = len({cell_of(s.module) for s in slices}) == 1 and "stem" not in slices[0].module
        assert (g.role == "inner") == one_cell, (g.name, g.role)
    streams = [g for g in net.channel_groups() if g.role == "stream"]
    assert sum(any(p.module == "blocks.0.stem.conv" for p in g.producers) for g in streams) == 1


def test_channel_group_zeroing_silences_the_channels(net):
    """Zeroing a group's producer BNs must zero those channels wherever they are read."""
    net.eval()
    modules = dict(net.named_modules())
    stream = next(g for g in net.channel_groups() if g.name == "stream0")
    with torch.no_grad():
        for s in stream.producers:
            if isinstance(modules[s.module], nn.BatchNorm2d):
                modules[s.module].weight[0] = 0
                modules[s.module].bias[0] = 0
    feats = net.run_block(0, [], torch.randn(2, 3, 16, 16))
    streams = net._streams()
    for j, f in enumerate(feats):  # stem and every cell of stream 0 (identity shortcuts carry the zero along)
        if streams[j] == 0:
            assert torch.all(f[:, 0] == 0)
    # a depthwise-separable cell reading stream 0 carries the zero through its depthwise conv too
    for name, m in net.named_modules():
        if name.startswith("blocks.0.cells.0.dw") and net.spec.cells[0].op == "dwsep":
            dw_out: dict[str, torch.Tensor] = {}
            m.register_forward_hook(lambda mod, i, o, seen=dw_out: seen.update(x=o))
            bn1 = dict(net.named_modules())["blocks.0.cells.0.bn1"]
            net.run_block(0, [], torch.randn(2, 3, 16, 16))
            assert torch.all(bn1(dw_out["x"])[:, 0] == 0)


def test_dense_sources_partition_the_first_conv_input(net):
    for i in range(net.spec.num_cells):
        srcs = net.dense_sources(i)
        first = dict(net.named_modules())[net.cell_input_layer(i)]
        assert srcs[0].start == 0 and srcs[-1].stop == first.in_channels
        assert all(a.stop == b.start for a, b in itertools.pairwise(srcs))
        if net.spec.dense:
            live = [j for j in range(i + 1) if (j, i) not in REMOVED_EDGES or net.spec.cells[i].reads is None]
            assert [s.feature for s in srcs] == live == net.spec.cell_reads(i)
            assert [s.source for s in srcs] == ["stem" if j == 0 else f"cell{j - 1}" for j in live]
        else:
            assert len(srcs) == 1


@pytest.mark.parametrize("dense", [True, "edges"])
def test_dense_input_slices_really_come_from_their_sources(dense):
    net = make("resnet_sdn", dense)
    net.eval()
    seen = {}
    cell = net.blocks[3].cells[-1]  # the last cell reads everything (cell 3, minus the edge from cell 1)
    cell.conv1.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    x = torch.randn(2, 3, 16, 16)
    feats = []
    for b in range(4):
        feats = net.run_block(b, feats, x)
    last = net.spec.num_cells - 1
    for src in net.dense_sources(last):
        f = feats[src.feature]
        k = f.shape[-1] // seen["x"].shape[-1]
        expected = torch.nn.functional.avg_pool2d(f, k) if k > 1 else f
        torch.testing.assert_close(seen["x"][:, src.start : src.stop], expected)


def test_costs_are_measured_per_block_and_exit(net):
    costs = count_costs(net)
    assert len(costs.block_flops) == net.spec.num_blocks and all(f > 0 for f in costs.block_flops)
    assert set(costs.exit_flops) == {0, 1, 2, 3}
    assert costs.total_params == sum(p.numel() for p in net.parameters())
    # blocks + all heads == one full forward with every exit, counted in one go
    with FlopCounterMode(display=False) as fc:
        net.eval()
        net(torch.zeros(1, 3, 16, 16))
    assert sum(costs.block_flops) + sum(costs.exit_flops.values()) == fc.get_total_flops()
    assert (
        costs.early_exit_costs([0, 1, 2, 3])[1]
        == sum(costs.block_flops[:2]) + costs.exit_flops[0] + costs.exit_flops[1]
    )


def test_count_costs_does_not_touch_bn_statistics(net):
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    count_costs(net)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dense_net_has_more_conv1_inputs_than_plain():
    plain, dense = make("resnet_sdn", False), make("resnet_sdn", True)
    assert dense.blocks[3].cells[-1].conv1.in_channels == sum(dense.spec.feature_widths()[:-1])
    assert plain.blocks[3].cells[-1].conv1.in_channels == plain.spec.cells[-2].out


def test_residual_scales_close_every_residual_branch(net):
    """Zeroing a block's residual scales leaves each of its cells computing only its shortcut."""
    x = torch.randn(2, 3, 16, 16)
    net.train()
    for b in range(net.spec.num_blocks):
        scales = net.residual_scales(b)
        # a cell without a shortcut has no identity to start from
        assert len(scales) == sum(net.spec.cells[i].residual for i in net.spec.cells_of_block(b))
        assert all(isinstance(s, nn.Parameter) and s.ndim == 1 for s in scales)
    block = max(range(net.spec.num_blocks), key=lambda b: len(net.residual_scales(b)))
    feats = net.run_block(0, [], x)
    for b in range(1, block):
        feats = net.run_block(b, feats)
    if block == 0:
        feats = []
    with torch.no_grad():
        for s in net.residual_scales(block):
            s.zero_()
    out = net.run_block(block, feats, x)
    for cell, i in zip(net.blocks[block].cells, net.spec.cells_of_block(block)):
        c = net.spec.cells[i]
        if c.op == "basic":
            torch.testing.assert_close(out[i + 1], torch.relu(cell.shortcut(out[i])))
        elif c.residual:  # an inverted residual adds no activation: exactly its input
            torch.testing.assert_close(out[i + 1], out[i])


def test_active_costs_sum_the_active_blocks_and_their_exits(net):
    costs = count_costs(net)
    n = net.spec.num_blocks
    assert costs.active_params(n) == costs.total_params
    for k in range(1, n + 1):
        blocks = nn.ModuleList([*net.blocks[:k], *(net.exits[str(b)] for b in range(k))])
        assert costs.active_params(k) == sum(p.numel() for p in blocks.parameters())
        with FlopCounterMode(display=False) as fc:
            net.eval()
            net(torch.zeros(1, 3, 16, 16), active_blocks=k)
        assert costs.active_flops(k) == fc.get_total_flops()


def test_channel_flops_is_what_removing_one_channel_saves(net):
    """The per-channel FLOPs of every group equal count_costs before minus after removing one channel."""
    import copy

    from lit_nas.cost import channel_flops
    from lit_nas.surgery import remove_channels

    def total(n):
        c = count_costs(n)
        return sum(c.block_flops) + sum(c.exit_flops.values())

    per_channel = channel_flops(net)
    assert set(per_channel) == {g.name for g in net.channel_groups()}
    for g in net.channel_groups():
        smaller = copy.deepcopy(net)
        remove_channels(smaller, g.name, range(1, g.size))
        assert total(net) - total(smaller) == per_channel[g.name] > 0, g.name


def test_exit_logits_iterate_over_their_logits():
    import torch

    from lit_nas.nets.base import ExitLogits

    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    out = ExitLogits(exits=(1, 3), logits=(a, b))
    assert [t.sum().item() for t in out] == [0.0, 6.0]  # list(out) used to raise ValueError
    assert out[3] is b and dict(out.items()) == {1: a, 3: b}


class _Logits(nn.Module):
    """The network with its outputs as a tuple of logits (what external tools trace)."""

    def __init__(self, net: MultiExitNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return tuple(self.net(x).logits)


def test_channel_groups_agree_with_torch_pruning_dependency_graph(net):
    """An independent dependency analysis (Torch-Pruning's graph, traced from the forward) finds the same
    layers, and the same dimensions, for every channel group."""
    import warnings

    import torch_pruning as tp

    wrapped = _Logits(net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exits' scalar mix parameters are not channel-wise
        graph = tp.DependencyGraph().build_dependency(wrapped, example_inputs=torch.randn(1, 3, 16, 16))
    names = {m: n.removeprefix("net.") for n, m in wrapped.named_modules()}
    modules = dict(net.named_modules())
    for g in net.channel_groups():
        first = modules[g.producers[0].module]
        if isinstance(first, nn.Conv2d):
            fn = tp.prune_depthwise_conv_out_channels if first.groups > 1 else tp.prune_conv_out_channels
        else:
            fn = tp.prune_batchnorm_out_channels
        found = set()
        for dep, _ in graph.get_pruning_group(first, fn, idxs=[0]):
            m = dep.target.module
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                found.add((names[m], 1 if "in_channels" in dep.handler.__name__ else 0))
        assert {(s.module, s.dim) for s in (*g.producers, *g.consumers)} == found, g.name


def test_layer_flops_agree_with_thop(net):
    """An external counter (thop, forward hooks) gives the conv and linear layers the same multiply-adds."""
    import thop
    from thop.vision.basic_hooks import zero_ops

    net.eval()
    counted = count_costs(net)
    # BatchNorm is not a multiply-add of ours (count_costs counts convs and matrix products only);
    # pooling, activations and the SE's sigmoid are functional calls thop does not see
    macs, _ = thop.profile(
        _Logits(net),
        inputs=(torch.zeros(1, 3, 16, 16),),
        custom_ops={nn.BatchNorm2d: zero_ops},
        verbose=False,
    )
    assert 2 * macs == sum(counted.block_flops) + sum(counted.exit_flops.values())
