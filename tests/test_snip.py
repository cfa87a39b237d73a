"""SNIP pruning: scores, per-block sparsity, schedules, masks that stay applied, resume, connectivity."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from callbacks import Growing, SnipPruning
from lit_nas.masks import attach_masks, connectivity_map, get_masks, load_masks
from lit_nas.module import MultiExitModule
from lit_nas.optim import OptimizerConfig
from lit_nas.snip import (
    PruneSchedule,
    keep_ratio_steps,
    reinitialized,
    snip_block_masks,
    snip_scores,
)
from lit_nas.surgery import remove_channels
from tests.helpers import ranks as run_ranks
from tests.helpers import tiny_data as data
from tests.helpers import tiny_module, tiny_trainer
from tests.test_growing import StopAfter


def make_module(dense: bool = False, **kwargs) -> MultiExitModule:
    """The tiny SDN (plain or dense) with the optimizer SNIP's tests train with."""
    kwargs.setdefault("optimizer", OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4))
    return tiny_module(seed=None, net={"dense": dense}, **kwargs)


def block_totals(module: MultiExitModule) -> dict[int, int]:
    return {b: sum(p.numel() for p in ws.values()) for b, ws in module.prunable_weights().items()}


def block_kept(module: MultiExitModule) -> dict[int, int]:
    masks = module.masks()
    return {
        b: sum(int(masks[n].count_nonzero()) if n in masks else p.numel() for n, p in ws.items())
        for b, ws in module.prunable_weights().items()
    }


class MaskRecorder(Callback):
    """Masks at the end of every training epoch (after that epoch's pruning)."""

    def __init__(self) -> None:
        self.masks: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.masks.append({n: m.clone() for n, m in pl_module.masks().items()})


# -- scores ------------------------------------------------------------------------------------------------
def test_snip_scores_equal_g_times_w_by_hand():
    # y = w . x, loss = mean((y - t)^2); dL/dw = 2 (w.x - t) x averaged over the batch
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0]])  # w.x = 1, -1
    t = torch.tensor([[0.0], [1.0]])  # residuals 1, -2
    # g = mean(2*1*[3,1], 2*(-2)*[1,1]) = mean([6,2], [-4,-4]) = [1, -1]; |g * w| = [1, 2]
    scores = snip_scores(lin, [(x, t)], nn.functional.mse_loss)
    assert torch.equal(scores["weight"], torch.tensor([[1.0, 2.0]]))
    # two batches of one image score like their union: g = mean([6,2], [-4,-4]) again
    scores2 = snip_scores(lin, [(x[:1], t[:1]), (x[1:], t[1:])], nn.functional.mse_loss)
    assert torch.equal(scores2["weight"], scores["weight"])


def test_snip_scores_are_the_gradient_of_a_multiplicative_mask():
    torch.manual_seed(0)
    module = make_module()
    module.train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    params = module.prunable_weights()[1]  # block 1
    names = list(params)
    bn_before = copy.deepcopy(dict(module.named_buffers()))

    def loss_fn(out, target):
        return sum(nn.functional.cross_entropy(lg, target) for lg in out.logits)

    scores = snip_scores(module, [(x, y)], loss_fn, params)
    # reference: differentiate w.r.t. masks c (at 1) multiplying the weights, via torch.func
    masks = {n: torch.ones_like(params[n], requires_grad=True) for n in names}
    full = dict(module.named_parameters())
    bufs = copy.deepcopy(bn_before)
    masked = {**{k: v.detach() for k, v in full.items()}, **{n: params[n].detach() * masks[n] for n in names}}
    out = torch.func.functional_call(module, {**masked, **bufs}, (x,))
    ref = torch.autograd.grad(loss_fn(out, y), [masks[n] for n in names])
    for n, r in zip(names, ref):
        torch.testing.assert_close(scores[n], r.abs(), rtol=1e-5, atol=1e-8)
    # BN statistics untouched, no .grad left behind
    for k, v in module.named_buffers():
        assert torch.equal(v, bn_before[k]), k
    assert all(p.grad is None for p in module.parameters())


def test_pruned_weights_score_zero_and_are_never_revived():
    scores = {"a": torch.tensor([5.0, 4.0, 3.0, 2.0]), "b": torch.tensor([[9.0, 1.0], [0.5, 8.0]])}
    first = snip_block_masks(scores, 4)
    assert first["a"].tolist() == [1, 1, 0, 0] and first["b"].tolist() == [[1, 0], [0, 1]]
    # weights pruned before keep losing even when they now score highest; keep_count capped at survivors
    rescored = {"a": torch.tensor([0.1, 0.2, 99.0, 99.0]), "b": torch.tensor([[0.3, 99.0], [99.0, 0.4]])}
    second = snip_block_masks(rescored, 2, current=first)
    assert second["a"].tolist() == [0, 0, 0, 0] and second["b"].tolist() == [[1, 0], [0, 1]]
    capped = snip_block_masks(rescored, 10, current=first)
    assert sum(int(m.sum()) for m in capped.values()) == 4


def test_keep_ratio_steps():
    geo = keep_ratio_steps(0.5, 3)
    assert geo[-1] == pytest.approx(0.5) and geo[0] == pytest.approx(0.5 ** (1 / 3))
    assert geo[1] / geo[0] == pytest.approx(geo[2] / geo[1])  # same fraction of survivors each step
    assert keep_ratio_steps(0.4, 3, "linear") == pytest.approx([0.8, 0.6, 0.4])
    assert keep_ratio_steps(0.3, 1) == [0.3]


def test_schedule_reproduces_the_thesis():
    growth = [0, 25, 50, 75]
    assert PruneSchedule(1, 10).plan(growth, 250) == [(10, [0]), (35, [1]), (60, [2]), (85, [3])]
    iterative = [(10, [0]), (35, [0, 1]), (60, [0, 1, 2]), (85, [1, 2, 3]), (95, [2, 3]), (105, [3])]
    assert PruneSchedule(3, 10).plan(growth, 250) == iterative
    # the thesis's explicit list: 115 prunes nothing, every block has had its 3 steps
    assert PruneSchedule(3, 10, (10, 35, 60, 85, 95, 105, 115)).plan(growth, 250) == iterative
    # without growth every block is pruned together
    assert PruneSchedule(2, 3).plan([0, 0, 0, 0], 20) == [(3, [0, 1, 2, 3]), (6, [0, 1, 2, 3])]


def test_reinit_scores_a_fresh_initialisation_and_restores_the_weights():
    torch.manual_seed(0)
    module = make_module()
    params = module.prunable_weights()[0]
    masks = {n: (torch.rand_like(p) > 0.5).float() for n, p in params.items()}
    attach_masks(module, masks)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    def loss_fn(out, target):
        return nn.functional.cross_entropy(out.logits[-1], target)

    trained = snip_scores(module, [(x, y)], loss_fn, params)
    with reinitialized(params, masks, torch.Generator().manual_seed(1)):
        seen = {n: p.detach().clone() for n, p in params.items()}
        fresh = snip_scores(module, [(x, y)], loss_fn, params)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN statistics exactly restored
    for n in params:
        assert not torch.equal(seen[n], before[n])  # the scoring did see other weights...
        assert torch.all(seen[n][masks[n] == 0] == 0)  # ...with the pruned ones still zero
        assert not torch.allclose(fresh[n], trained[n])


# -- the callback on a training run ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keep", "mode", "steps", "epochs"),
    [
        (0.3, "one_shot", None, [1]),
        (0.5, "iterative", 3, [1, 2, 3]),
        ([0.8, 0.7, 0.6, 0.5], "one_shot", None, [1]),
    ],
)
def test_exact_per_block_sparsity(tmp_path, keep, mode, steps, epochs):
    module = make_module()
    totals = block_totals(module)
    rec = MaskRecorder()
    cb = SnipPruning(keep_ratio=keep, mode=mode, steps=steps, after_epochs=1, criterion_batch_size=16)
    tiny_trainer(tmp_path, max_epochs=4, callbacks=[cb, rec]).fit(module, datamodule=data())
    ratios = cb.ratios(4)
    n_steps = 1 if mode == "one_shot" else steps
    for j, epoch in enumerate(epochs):
        masks = rec.masks[epoch]
        for b, ws in module.prunable_weights().items():
            kept = sum(int(masks[n].sum()) for n in ws)
            target = keep_ratio_steps(ratios[b], n_steps)[j] * totals[b]
            assert abs(kept - target) <= 1, (epoch, b, kept, target)
        if j:  # no revival: the surviving set only shrinks
            prev = rec.masks[epochs[j - 1]]
            assert all(torch.all(masks[n] <= prev[n]) for n in masks)
    assert rec.masks[0] == {}  # nothing pruned before after_epochs
    assert [h[0] for h in cb.history] == [e for e in epochs for _ in range(4)]


def test_pruning_follows_the_growth(tmp_path):
    module = make_module(dense=True)
    cb = SnipPruning(keep_ratio=0.4, mode="iterative", steps=3, after_epochs=1, criterion_batch_size=16)
    grow = Growing(grow_epochs=[2, 3, 4])
    tiny_trainer(tmp_path, max_epochs=8, callbacks=[cb, grow]).fit(
        module, datamodule=data()
    )  # order on purpose
    events: dict[int, list[int]] = {}
    for epoch, block, *_ in cb.history:
        events.setdefault(epoch, []).append(block)
    assert cb.activated == {0: 0, 1: 2, 2: 3, 3: 4}
    assert events == dict(PruneSchedule(3, 1).plan([0, 2, 3, 4], 8))
    assert events == {1: [0], 3: [0, 1], 4: [0, 1, 2], 5: [1, 2, 3], 6: [2, 3], 7: [3]}
    totals, kept = block_totals(module), block_kept(module)
    assert all(abs(kept[b] - 0.4 * totals[b]) <= 1 for b in range(4))


def test_zeros_survive_momentum_weight_decay_and_resume(tmp_path):
    """Pruned at epochs 1, 3 and 6; 52 steps; a run resumed after epoch 4 ends bit-identical."""

    def run(max_epochs, ckpt_path=None, root="a", stop=None):
        torch.manual_seed(0)
        module = make_module()
        cb = SnipPruning(
            keep_ratio=0.3, mode="iterative", steps=3, prune_epochs=[1, 3, 6], after_epochs=0,
            criterion_batch_size=16,
        )  # fmt: skip
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1)
        extra = [StopAfter(stop)] if stop is not None else []
        trainer = tiny_trainer(
            tmp_path, max_epochs=max_epochs, callbacks=[cb, ckpt, *extra], enable_checkpointing=True
        )
        trainer.fit(module, datamodule=data(), ckpt_path=ckpt_path)
        return module, cb, trainer

    full, cb_full, trainer = run(13)
    assert trainer.global_step == 52  # 4 steps per epoch
    masks = full.masks()
    assert len(masks) == sum(len(ws) for ws in full.prunable_weights().values())
    params = dict(full.named_parameters())
    opt = trainer.optimizers[0]
    for n, m in masks.items():
        assert torch.all(params[n][m == 0] == 0), n  # exactly zero after 50 steps of momentum + decay
        assert torch.all(opt.state[params[n]]["momentum_buffer"][m == 0] == 0), n
    assert any(torch.any(params[n][m == 1] != 0) for n, m in masks.items())

    run(13, root="b", stop=4)  # stopped after epoch 4 (pruned at 1 and 3)
    resumed, cb_res, _ = run(13, ckpt_path=str(tmp_path / "b" / "last.ckpt"), root="b")
    assert cb_res.history == cb_full.history
    for (k, v), (k2, v2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # a checkpoint loads into a fresh module with its masks, which stay applied in further training
    loaded = MultiExitModule.load_from_checkpoint(tmp_path / "a" / "last.ckpt", weights_only=True)
    assert set(loaded.masks()) == set(masks)
    assert all(torch.equal(loaded.masks()[n], m) for n, m in masks.items())


def test_set_masks_zeroes_weights_and_optimizer_state():
    torch.manual_seed(0)
    module = make_module()
    name, p = next(iter(module.prunable_weights()[0].items()))
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    p.grad = torch.ones_like(p)
    opt.step()
    mask = (torch.rand_like(p) > 0.5).float()

    class FakeTrainer:
        optimizers = (opt,)

    module._trainer = FakeTrainer()  # type: ignore[assignment]
    module.set_masks({name: mask})
    module._trainer = None
    assert torch.all(p[mask == 0] == 0) and torch.all(opt.state[p]["momentum_buffer"][mask == 0] == 0)
    assert torch.all(opt.state[p]["momentum_buffer"][mask == 1] != 0)
    assert torch.equal(get_masks(module)[name], mask)


def test_surgery_slices_masks_with_their_weights():
    torch.manual_seed(0)
    module = make_module()
    conv = module.net.blocks[0].cells[0].conv1
    mask = (torch.rand_like(conv.weight) > 0.5).float()
    attach_masks(module, {"net.blocks.0.cells.0.conv1.weight": mask})
    remove_channels(module.net, "cell0.mid", [0, 2])
    assert conv.weight_mask.shape == conv.weight.shape == (2, *mask.shape[1:])
    assert torch.equal(conv.weight_mask, mask[[0, 2]])


def test_connectivity_map_on_a_hand_built_dense_net():
    module = make_module(dense=True)
    net = module.net
    # TINY: features stem(4) cell0(4) cell1(8) cell2(8) cell3(8); cell i reads features 0..i
    name2 = f"net.{net.cell_input_layer(2)}.weight"
    name3 = f"net.{net.cell_input_layer(3)}.weight"
    m2 = torch.ones_like(dict(module.named_parameters())[name2])
    m2[:, 0:4] = 0  # cell2 <- stem: dead
    m2[:, 4:8] = 0
    m2[: m2.shape[0] // 2, 4:8] = 1  # cell2 <- cell0: half kept
    m3 = torch.ones_like(dict(module.named_parameters())[name3])
    m3[:, 8:16] = 0  # cell3 <- cell1: dead
    cmap = connectivity_map(net, {name2: m2, name3: m3}, prefix="net.")
    nan = float("nan")
    expected = torch.tensor(
        [
            [1.0, nan, nan, nan],
            [1.0, 1.0, nan, nan],
            [0.0, 0.5, 1.0, nan],
            [1.0, 1.0, 0.0, 1.0],
        ]
    )
    torch.testing.assert_close(cmap.kept, expected, equal_nan=True)
    assert cmap.dead_edges == [("stem", "cell2"), ("cell1", "cell3")]
    assert cmap.num_edges == 10
    assert cmap.rows()[2] == ["cell2", 0.0, 0.5, 1.0, None]
    assert cmap.sources == ["stem", "cell0", "cell1", "cell2"] and cmap.blocks == [0, 1, 2, 3]
    # the plain network has one edge per cell (the previous feature)
    plain = connectivity_map(make_module().net, {})
    assert plain.num_edges == 4 and plain.dead_edges == []


def test_found_architecture_and_masks_are_saved(tmp_path):
    module = make_module(dense=True)
    cb = SnipPruning(keep_ratio=0.5, after_epochs=0, criterion_batch_size=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[cb, ckpt], enable_checkpointing=True).fit(
        module, datamodule=data()
    )
    spec_path, masks_path = cb.found_paths
    assert spec_path == tmp_path / "ckpt" / "found_arch.yaml"
    spec, masks = load_masks(masks_path)
    assert spec == module.arch_spec
    assert set(masks) == set(module.masks()) and all(m.dtype == torch.bool for m in masks.values())
    assert all(torch.equal(masks[n], m.bool()) for n, m in module.masks().items())
    png = sorted((tmp_path / "snip").glob("connectivity_epoch000.png"))
    assert png and png[0].read_bytes()[:4] == b"\x89PNG"


# -- configuration errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep_ratio=0.0), "keep_ratio must be in (0, 1]"),
        (dict(keep_ratio=[0.5, 1.5]), "keep_ratio must be in (0, 1]"),
        (dict(keep_ratio=0.5, mode="greedy"), "mode must be one of ['one_shot', 'iterative']; got 'greedy'"),
        (dict(keep_ratio=0.5, steps=3), "'one_shot' prunes once; got steps=3"),
        (dict(keep_ratio=0.5, mode="iterative", steps=0), "steps must be an integer >= 1; got 0"),
        (dict(keep_ratio=0.5, mode="iterative", schedule="cubic"), "schedule must be one of"),
        (dict(keep_ratio=0.5, after_epochs=-1), "after_epochs must be an integer >= 0; got -1"),
        (dict(keep_ratio=0.5, prune_epochs=[10, 5]), "strictly increasing; got [10, 5]"),
        (dict(keep_ratio=0.5, criterion_loss="mean"), "criterion_loss must be one of ['sum', 'final']"),
        (dict(keep_ratio=0.5, criterion_batches=0), "must be >= 1; got 128, 0"),
    ],
)
def test_bad_configuration_is_rejected_when_built(kwargs, message):
    with pytest.raises(ValueError) as err:
        SnipPruning(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(keep_ratio=[0.5, 0.4]), "keep_ratio has 2 entries; the network has 4 blocks"),
        (dict(keep_ratio=0.5, prune_epochs=[1, 3]), "reach past the last epoch (2) of max_epochs=3"),
    ],
)
def test_bad_configuration_for_the_network_fails_at_fit(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        tiny_trainer(tmp_path, max_epochs=3, callbacks=[SnipPruning(**kwargs)]).fit(
            make_module(), datamodule=data()
        )
    assert message in str(err.value)


def test_needs_a_datamodule_with_criterion_batches(tmp_path):
    dm = data()
    dm.setup()
    loader = dm.train_dataloader()
    with pytest.raises(TypeError, match="criterion_batches"):
        tiny_trainer(tmp_path, callbacks=[SnipPruning(keep_ratio=0.5)]).fit(
            make_module(), train_dataloaders=loader
        )


def test_pruning_under_two_process_ddp_keeps_ranks_identical(ddp_runs):
    """gloo, 2 CPU processes: rank 0's masks reach both ranks, pruned weights stay zero on both."""
    ranks = run_ranks(ddp_runs, "growing_snip")
    assert ranks[0]["snip_history"] == ranks[1]["snip_history"]
    assert [(e, b) for e, b, *_ in ranks[0]["snip_history"]] == [(0, 0), (1, 1), (2, 2)]
    for k, v in ranks[0]["state"].items():
        torch.testing.assert_close(v, ranks[1]["state"][k], rtol=0, atol=0, msg=k)
    state = ranks[0]["state"]
    masks = {k[: -len("_mask")]: v for k, v in state.items() if k.endswith("_mask")}
    assert {k.split(".")[2] for k in masks} == {"0", "1", "2"}  # blocks pruned before the stop
    for name, mask in masks.items():
        assert torch.all(state[name][mask == 0] == 0), name
    for _, _, _, target, kept, total in ranks[0]["snip_history"]:
        assert abs(kept - target * total) <= 1
