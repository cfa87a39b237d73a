"""Growing: schedules, untouched inactive blocks, LR of new blocks, identity start, resume, DDP."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from callbacks import Growing
from lit_nas import NetConfig
from lit_nas.growing import active_blocks_at, identity_init, validate_grow_epochs
from lit_nas.module import MultiExitModule
from lit_nas.optim import LRScheduleConfig, OptimizerConfig
from tests.helpers import TINY, ranks, tiny_module, tiny_trainer
from tests.helpers import tiny_data as data


def block_state(module: MultiExitModule, b: int) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BN statistics) of block ``b`` and its exit, cloned."""
    state = {f"blocks.{b}.{k}": v.clone() for k, v in module.net.blocks[b].state_dict().items()}
    state.update({f"exits.{b}.{k}": v.clone() for k, v in module.net.exits[str(b)].state_dict().items()})
    return state


class Recorder(Callback):
    """Records, at every train epoch start (after Growing ran), the active blocks and block snapshots."""

    def __init__(self) -> None:
        self.active: list[int] = []
        self.snapshots: list[dict[int, dict[str, torch.Tensor]]] = []
        self.exits_seen: list[tuple[int, ...]] = []
        self.lrs: list[float] = []
        self.opt_state_blocks: list[set[int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.active.append(pl_module.active_blocks)
        self.snapshots.append({b: block_state(pl_module, b) for b in range(4)})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.exits_seen.append(pl_module(batch[0]).exits)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        blocks = set()
        for b in range(4):
            params = [*pl_module.net.blocks[b].parameters(), *pl_module.net.exits[str(b)].parameters()]
            if any(p in opt.state and opt.state[p] for p in params):
                blocks.add(b)
        self.opt_state_blocks.append(blocks)


# -- the schedule ---------------------------------------------------------------------------------------
def test_active_blocks_follow_the_schedule():
    assert [active_blocks_at(e, [25, 50, 75]) for e in (0, 24, 25, 49, 50, 75, 249)] == [1, 1, 2, 2, 3, 4, 4]


@pytest.mark.parametrize(
    "epochs, kwargs, message",
    [
        ([25, 50], dict(num_blocks=4), r"has 2 entries but the network has 4 blocks: give one growth epoch"),
        ([25, 25, 75], {}, r"must be strictly increasing; got \[25, 25, 75\]"),
        ([50, 25, 75], {}, "strictly increasing"),
        ([0, 50, 75], {}, r"must be >= 1 \(block 0 trains alone"),
        ([25, 50, 250], dict(max_epochs=250), r"grow_epochs \[250\] are >= max_epochs=250"),
        ([2.5, 50, 75], {}, "must be integers"),
    ],
)
def test_bad_schedules_are_rejected(epochs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_grow_epochs(epochs, **kwargs)


def test_bad_schedules_fail_when_the_trainer_starts(tmp_path):
    with pytest.raises(ValueError, match="has 2 entries but the network has 4 blocks"):
        tiny_trainer(tmp_path, callbacks=[Growing([1, 2])]).fit(tiny_module(seed=None), datamodule=data())
    with pytest.raises(ValueError, match=r"grow_epochs \[3\] are >= max_epochs=3"):
        tiny_trainer(tmp_path, max_epochs=3, callbacks=[Growing([1, 2, 3])]).fit(
            tiny_module(seed=None), datamodule=data()
        )
    no_exits = tiny_module(seed=None, net=NetConfig(**{**TINY, "exits": False}))
    with pytest.raises(ValueError, match=r"growing needs an exit after every block .* blocks \[0, 1, 2\]"):
        tiny_trainer(tmp_path, max_epochs=4, callbacks=[Growing([1, 2, 3])]).fit(no_exits, datamodule=data())
    with pytest.raises(ValueError, match=r"init must be one of \['random', 'identity'\]; got 'zeros'"):
        Growing([1, 2, 3], init="zeros")  # type: ignore[arg-type]


def test_growing_needs_a_lit_nas_module(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0].flatten(1)[:, :2]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"Growing needs a lit_nas model .* Plain lacks \['net', 'arch_spec'"):
        tiny_trainer(tmp_path, callbacks=[Growing([1, 2, 3])]).fit(Plain(), datamodule=data())


# -- training with growth -------------------------------------------------------------------------------
def grow_and_record(tmp_path, **module_kwargs) -> tuple[MultiExitModule, Recorder, dict, Growing]:
    torch.manual_seed(0)
    module = tiny_module(seed=None, **module_kwargs)
    initial = {b: block_state(module, b) for b in range(4)}
    rec, growing = Recorder(), Growing(grow_epochs=[1, 2, 3])
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[growing, rec])
    trainer.fit(module, datamodule=data())
    return module, rec, initial, growing


def test_blocks_activate_at_their_epochs_and_earlier_exits_keep_training(tmp_path):
    module, rec, _, growing = grow_and_record(tmp_path)
    assert rec.active == [1, 2, 3, 4]
    assert rec.exits_seen == [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert growing.history == [(1, 1), (2, 2), (3, 3)]
    assert module.active_blocks == 4
    # earlier exits stay on as output branches: each changed after the next block activated
    for b in range(3):
        before, after = rec.snapshots[b + 1][b], block_state(module, b)
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("exits"))


def test_inactive_blocks_are_untouched_and_have_no_optimizer_state(tmp_path):
    _, rec, initial, _ = grow_and_record(tmp_path)
    for epoch, snapshot in enumerate(rec.snapshots):
        for b in range(epoch + 1, 4):  # still inactive when epoch `epoch` starts (block b activates at b)
            for k, v in initial[b].items():
                assert torch.equal(snapshot[b][k], v), f"{k} changed before block {b} activated"
        # activation epoch: still the initial weights and BN statistics (bit-identical)
        if epoch >= 1:
            for k, v in initial[epoch].items():
                assert torch.equal(snapshot[epoch][k], v), f"{k} changed before its first step"
    # momentum buffers exist exactly for the blocks active so far
    assert rec.opt_state_blocks == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}]


def test_new_blocks_train_at_the_learning_rate_in_force(tmp_path):
    """Plain SGD (no momentum): a new block's first update is exactly -lr * (grad + wd * w)."""

    class FirstStep(Callback):
        def __init__(self) -> None:
            self.seen: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
            self.after: dict[int, torch.Tensor] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            b = pl_module.active_blocks - 1
            if trainer.current_epoch == b and b not in self.seen:
                w = pl_module.net.blocks[b].cells[0].conv1.weight
                self.seen[b] = (w.detach().clone(), w.grad.clone(), optimizer.param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            b = pl_module.active_blocks - 1
            if batch_idx == 0 and b in self.seen and b not in self.after:
                self.after[b] = pl_module.net.blocks[b].cells[0].conv1.weight.detach().clone()

    torch.manual_seed(0)
    wd = 5e-4
    module = tiny_module(
        seed=None,
        optimizer=OptimizerConfig(lr=0.1, momentum=0.0, nesterov=False, weight_decay=wd),
        lr_schedule=LRScheduleConfig(name="multistep", milestones=[1, 3], gammas=[0.1, 0.5]),
    )
    rec, first = Recorder(), FirstStep()
    tiny_trainer(tmp_path, max_epochs=4, callbacks=[Growing([1, 2, 3]), rec, first]).fit(
        module, datamodule=data()
    )
    expected_lr = [0.1, 0.01, 0.01, 0.005]  # the schedule keeps its milestones through growth
    assert rec.lrs == pytest.approx(expected_lr)
    for b in (1, 2, 3):
        w, g, lr = first.seen[b]
        assert lr == pytest.approx(expected_lr[b])
        torch.testing.assert_close(first.after[b], w - lr * (g + wd * w))


def test_identity_init_makes_a_new_block_pass_its_input_through():
    torch.manual_seed(0)
    net = tiny_module(seed=None).net.train()
    x = torch.randn(8, 3, 16, 16)
    feats = net.run_block(2, net.run_block(1, net.run_block(0, [], x)))
    scales = identity_init(net, 3)
    assert scales and all(torch.count_nonzero(s) == 0 for s in scales)
    # TINY's block 3 is one cell with an identity shortcut: the block computes its input
    torch.testing.assert_close(net.run_block(3, feats)[-1], feats[-1])
    # a projection cell (block 1: stride 2) starts as its shortcut
    identity_init(net, 1)
    cell = net.blocks[1].cells[0]
    out = net.run_block(1, feats[:2])[-1]
    torch.testing.assert_close(out, torch.relu(cell.shortcut(feats[1])))


def test_identity_option_zeroes_scales_at_activation_only(tmp_path):
    class Scales(Callback):
        def __init__(self) -> None:
            self.zero: list[list[bool]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.zero.append(
                [bool((pl_module.net.blocks[b].cells[0].bn2.weight == 0).all()) for b in range(4)]
            )

    torch.manual_seed(0)
    scales = Scales()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[Growing([1, 2, 3], init="identity"), scales])
    trainer.fit(tiny_module(seed=None), datamodule=data())
    # zeroed exactly when a block activates (then the scales learn), never before
    assert scales.zero == [
        [False, False, False, False],
        [False, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]


# -- resume ---------------------------------------------------------------------------------------------
class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resume_after_a_growth_matches_an_uninterrupted_run(tmp_path):
    def run(seed, root, resume_from=None, stop_after=None):
        L.seed_everything(seed)
        module, growing = tiny_module(seed=None), Growing([1, 2, 3])
        extra = [StopAfter(stop_after)] if stop_after is not None else []
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        trainer = tiny_trainer(
            root, max_epochs=4, enable_checkpointing=True, callbacks=[growing, ckpt, *extra]
        )
        trainer.fit(module, datamodule=data(), ckpt_path=resume_from)
        return module, growing, root / "ckpt" / "last.ckpt"

    straight, g_straight, _ = run(0, tmp_path / "a")
    half, _, last = run(0, tmp_path / "b", stop_after=1)  # stopped after the first growth (epoch 1)
    assert half.active_blocks == 2
    assert MultiExitModule.spec_from_checkpoint(last).active_blocks == 2
    resumed, g_resumed, _ = run(0, tmp_path / "c", resume_from=last)
    other, _, _ = run(1, tmp_path / "d")

    assert resumed.active_blocks == straight.active_blocks == 4
    assert g_resumed.history == g_straight.history == [(1, 1), (2, 2), (3, 3)]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a, c) for a, c in zip(straight.parameters(), other.parameters()))


# -- DDP (tests/ddp_search.py, run once per session: the ddp_runs fixture) -------------------------------
def test_growth_under_two_process_ddp_keeps_ranks_identical(ddp_runs):
    r0, r1 = ranks(ddp_runs, "growing")
    initial = r0["initial"]
    for r in (r0, r1):
        assert r["active_blocks"] == 3 and r["history"] == [[1, 1], [2, 2]]
        assert r["world_size"] == 2
        assert r["find_unused"] is True  # block 3 is still inactive: DDP must keep looking
    for k, a in r0["state"].items():
        torch.testing.assert_close(a, r1["state"][k], rtol=0, atol=0, msg=k)
    # blocks 0-2 trained, block 3 never activated: bit-identical to its initial weights, no optimizer state
    trained = [
        k for k in initial if k.startswith("net.blocks.2.") and not torch.equal(initial[k], r0["state"][k])
    ]
    assert trained
    for k, v in initial.items():
        if k.startswith(("net.blocks.3.", "net.exits.3.")):
            assert torch.equal(r0["state"][k], v), k
    for r in (r0, r1):
        assert r["blocks_with_state"] == [0, 1, 2]


class _PlainDDP(DistributedDataParallel):
    """Lightning's plain ``ddp`` wrapper as far as Growing looks at it (no process group needed)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.find_unused_parameters = False


def test_ddp_without_find_unused_parameters_fails_clearly():
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=_PlainDDP()))
    with pytest.raises(ValueError, match=r"use strategy 'ddp_find_unused_parameters_true'"):
        Growing([1, 2, 3]).on_fit_start(trainer, tiny_module())  # type: ignore[arg-type]
