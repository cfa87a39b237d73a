import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F

from lit_nas import NetConfig
from lit_nas.data import SyntheticDataModule
from lit_nas.early_exit import early_exit
from lit_nas.module import MultiExitModule
from lit_nas.objectives import ExitLossConfig, exit_weights, multi_exit_loss
from lit_nas.optim import LRScheduleConfig, MultiStepGammaLR, OptimizerConfig
from lit_nas.protocol import NASModule, require_nas_module
from tests.helpers import tiny_module, tiny_trainer


def synthetic(**kw):
    return SyntheticDataModule(num_train=256, num_test=128, input_size=16, batch_size=32, **kw)


# -- loss ----------------------------------------------------------------------------------------------
def test_loss_is_weighted_sum_of_exit_cross_entropies():
    m = tiny_module(exit_loss=ExitLossConfig(weights=[0.1, 0.2, 0.3, 1.0]))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    out = m(x)
    w = exit_weights(m.exit_loss, 4, out.exits, epoch=0, max_epochs=10)
    total, per_exit = multi_exit_loss(out, y, w)
    manual = sum(wi * F.cross_entropy(lg, y) for wi, lg in zip([0.1, 0.2, 0.3, 1.0], out.logits))
    torch.testing.assert_close(total, manual)
    for e, lg in out.items():
        torch.testing.assert_close(per_exit[e], F.cross_entropy(lg, y))


def test_default_weights_are_equal_and_ramp_follows_sdn():
    cfg = ExitLossConfig()
    assert exit_weights(cfg, 4, (0, 1, 2, 3), epoch=5, max_epochs=10) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    ramp = ExitLossConfig(weights=[0.3, 0.6, 0.8, 1.0], sdn_ramp=True)
    at0 = exit_weights(ramp, 4, (0, 1, 2, 3), epoch=0, max_epochs=100)
    assert at0 == {0: 0.01, 1: 0.01, 2: 0.01, 3: 1.0}
    mid = exit_weights(ramp, 4, (0, 1, 2, 3), epoch=20, max_epochs=100)
    assert mid[1] == pytest.approx(0.01 + 20 * 0.6 / 100) and mid[3] == 1.0
    assert exit_weights(ramp, 4, (0, 1, 2, 3), epoch=100, max_epochs=100) == {0: 0.3, 1: 0.6, 2: 0.8, 3: 1.0}
    # growing: only two exits active, the last active one is the output and is not ramped
    assert exit_weights(ramp, 4, (0, 1), epoch=0, max_epochs=100) == {0: 0.01, 1: 0.6}


def test_loss_weights_of_wrong_length_are_rejected():
    with pytest.raises(ValueError, match=r"have 3 entries; the network has 4 blocks"):
        tiny_module(exit_loss=ExitLossConfig(weights=[1, 1, 1]))


def test_training_logs_per_exit_metrics_and_learns(tmp_path):
    m = tiny_module(optimizer=OptimizerConfig(lr=0.05), lr_schedule=LRScheduleConfig(name="constant"))
    logger = CSVLogger(tmp_path, name="run")
    trainer = tiny_trainer(tmp_path, max_epochs=4, logger=logger, log_every_n_steps=1)
    dm = synthetic()
    trainer.fit(m, datamodule=dm)
    metrics = trainer.callback_metrics
    for stage in ("train", "val"):
        for e in range(4):
            assert f"{stage}/acc_exit{e}" in metrics
            assert f"{stage}/loss_exit{e}" in metrics
    assert metrics["val/acc"] == metrics["val/acc_exit3"]
    assert metrics["val/acc_exit3"] > 0.5  # learnable synthetic data; chance is 0.1
    # per-exit accuracy equals the accuracy recomputed by hand on the validation split
    m.eval()
    dm.setup()
    x, y = dm.prepare_batch((dm._splits["val"].x, dm._splits["val"].y), train=False)
    with torch.no_grad():
        out = m(x)
    for e, lg in out.items():
        acc = (lg.argmax(1) == y).float().mean()
        assert metrics[f"val/acc_exit{e}"].item() == pytest.approx(acc.item(), abs=1e-6)
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/acc_exit0" in header and "train/loss" in header and "train/loss_epoch" in header


def test_test_reports_early_exit_table(tmp_path, capsys):
    m = tiny_module(thresholds=[0.0, 0.5, 1.0])
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    dm = synthetic()
    trainer.fit(m, datamodule=dm)
    trainer.test(m, datamodule=dm)
    res = {r.threshold: r for r in m.early_exit_results}
    metrics = trainer.callback_metrics
    # q = 0: everyone leaves at the first exit; q = 1 (unreachable): everyone runs to the end
    assert res[0.0].exit_fractions[0] == 1.0
    assert res[0.0].accuracy == pytest.approx(metrics["test/acc_exit0"].item(), abs=1e-6)
    assert res[1.0].exit_fractions[-1] == 1.0
    assert res[1.0].accuracy == pytest.approx(metrics["test/acc_exit3"].item(), abs=1e-6)
    assert res[0.0].cost_fraction < 1 < res[1.0].cost_fraction  # heads cost extra when nobody exits
    assert "test/early_exit/acc_q0.5" in metrics
    assert "Early exit on the test set" in capsys.readouterr().out


def test_early_exit_on_hand_made_confidences():
    conf = torch.tensor([[0.95, 0.99], [0.40, 0.80], [0.10, 0.20]])
    correct = torch.tensor([[True, False], [False, True], [False, True]])
    (r,) = early_exit(conf, correct, [10, 30], reference_cost=25, thresholds=[0.9])
    # sample 0 stops at exit 0 (right), samples 1 and 2 run to exit 1 (right)
    assert r.exit_fractions == pytest.approx((1 / 3, 2 / 3))
    assert r.accuracy == pytest.approx(1.0)
    assert r.avg_flops == pytest.approx((10 + 30 + 30) / 3)
    assert r.cost_fraction == pytest.approx(r.avg_flops / 25)


# -- optimisation -------------------------------------------------------------------------------------
def test_multistep_gammas_apply_cumulatively_at_every_milestone():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = MultiStepGammaLR(opt, milestones=[120, 160, 180], gammas=[0.1, 0.01, 0.01])
    lrs = []
    for _ in range(250):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[119] == 0.01
    assert lrs[120] == pytest.approx(0.01 * 0.1) and lrs[159] == pytest.approx(1e-3)
    assert lrs[160] == pytest.approx(0.01 * 0.1 * 0.01) and lrs[179] == pytest.approx(1e-5)
    assert lrs[180] == pytest.approx(0.01 * 0.1 * 0.01 * 0.01) and lrs[249] == pytest.approx(1e-7)
    # the thesis's worked example: lr 1, milestones 20/40, gammas 0.1/0.1 -> 0.1 at 20, 0.01 at 40
    assert [
        MultiStepGammaLR(torch.optim.SGD([p], lr=1), [20, 40], [0.1, 0.1]).factor(e) for e in (19, 20, 40)
    ] == [
        1,
        pytest.approx(0.1),
        pytest.approx(0.01),
    ]


def test_schedule_through_the_trainer(tmp_path):
    m = tiny_module(
        optimizer=OptimizerConfig(lr=0.1),
        lr_schedule=LRScheduleConfig(milestones=[1, 2], gammas=[0.5, 0.1]),
    )
    seen = []

    import lightning as L

    class LR(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = tiny_trainer(
        tmp_path, max_epochs=3, callbacks=[LR()], limit_train_batches=2, limit_val_batches=1
    )
    trainer.fit(m, datamodule=synthetic())
    assert seen == pytest.approx([0.1, 0.05, 0.005])


def test_cosine_schedule_reaches_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = OptimizerConfig(lr=0.1).build([{"params": [p]}])
    sched = LRScheduleConfig(name="cosine").build(opt, max_epochs=10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(sched.base_lrs[0], 0.1)


def test_warmup_cosine_per_step_through_the_trainer_and_a_resume(tmp_path):
    """One epoch of warm-up rising linearly, a half cosine to 0 at the last step; a resume continues it."""
    import lightning as L

    seen: list[float] = []

    class LR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    def fit(root, ckpt=None):
        m = tiny_module(
            optimizer=OptimizerConfig(lr=0.1),
            lr_schedule=LRScheduleConfig(name="cosine", interval="step", warmup_epochs=1),
        )
        every = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        trainer = tiny_trainer(
            root,
            max_epochs=3,
            callbacks=[LR(), every],
            limit_train_batches=4,
            limit_val_batches=1,
            enable_checkpointing=True,
        )
        trainer.fit(m, datamodule=synthetic(), ckpt_path=ckpt)
        return trainer

    trainer = fit(tmp_path)
    t = torch.arange(12, dtype=torch.float64)
    expected = torch.where(t < 4, 0.1 * (t + 1) / 4, 0.05 * (1 + torch.cos(math.pi * (t - 4) / 8)))
    assert seen == pytest.approx(expected.tolist(), abs=1e-12)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # a resume from the end of epoch 1 goes on with the same rates (closed form from the saved step)
    seen.clear()
    fit(tmp_path / "resumed", ckpt=str(tmp_path / "epoch=1.ckpt"))
    assert seen == pytest.approx(expected[8:].tolist(), abs=1e-12)


def test_label_smoothing_applies_to_training_only():
    m = tiny_module(exit_loss=ExitLossConfig(label_smoothing=0.1))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        train, out, _ = m._shared_step((x, y), "train")
        val, _, _ = m._shared_step((x, y), "val")
    smooth = sum(F.cross_entropy(lg, y, label_smoothing=0.1) for lg in out.logits)
    plain = sum(F.cross_entropy(lg, y) for lg in out.logits)
    torch.testing.assert_close(train, smooth)
    torch.testing.assert_close(val, plain)
    assert not torch.allclose(train, val)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\); got 1.0"):
        ExitLossConfig(label_smoothing=1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(milestones=[60, 35, 85]), "strictly increasing; got \\[60, 35, 85\\]"),
        (dict(milestones=[35, 60, 85], gammas=[0.1, 0.1]), "one gamma per milestone: got 2 gammas"),
        (dict(name="step"), "must be one of \\['multistep', 'cosine', 'constant'\\]; got 'step'"),
        (
            dict(interval="step"),
            "interval: step and warmup_epochs are for name: cosine; got name 'multistep'",
        ),
        (dict(name="cosine", interval="batch"), "interval must be 'epoch' or 'step'; got 'batch'"),
        (dict(name="cosine", warmup_epochs=0.5), "a whole number with interval: epoch\\); got 0.5"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LRScheduleConfig(**kwargs)


def test_milestone_past_the_run_warns():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.warns(UserWarning, match=r"milestones \[60, 85\] are not before max_epochs=50"):
        LRScheduleConfig().build(opt, max_epochs=50)


def test_bad_optimizer_is_rejected():
    with pytest.raises(ValueError, match="must be one of \\['sgd', 'adam', 'adamw'\\]; got 'sgdd'"):
        OptimizerConfig(name="sgdd")


def test_sgd_settings_and_no_weight_decay_flag():
    m = tiny_module(optimizer=OptimizerConfig(lr=0.05, weight_decay=1e-3))
    m.net.exits["0"].mix.no_weight_decay = True
    opt = m.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert no_decay["params"] == [m.net.exits["0"].mix]


# -- protocol ------------------------------------------------------------------------------------------
def test_module_implements_the_protocol():
    import lit_nas

    assert lit_nas.MultiExitModule is MultiExitModule
    m = tiny_module()
    assert isinstance(m, NASModule)
    assert require_nas_module(m, "Growing") is m
    assert m.active_blocks == 4
    m.set_active_blocks(2)
    assert m.arch_spec.active_blocks == 2 and m(torch.randn(1, 3, 16, 16)).exits == (0, 1)
    with pytest.raises(ValueError, match=r"active_blocks must be in 1\.\.4; got 0"):
        m.set_active_blocks(0)
    weights = m.prunable_weights()
    assert all(k.startswith(f"net.blocks.{b}.") for b, ws in weights.items() for k in ws)
    params = dict(m.named_parameters())
    assert all(params[k] is p for ws in weights.values() for k, p in ws.items())


def test_protocol_check_names_missing_members():
    import lightning as L

    with pytest.raises(TypeError, match=r"SnipPruning needs a lit_nas model .* BoringModel lacks \['net'"):

        class BoringModel(L.LightningModule):
            pass

        require_nas_module(BoringModel(), "SnipPruning")


def test_loss_terms_are_added_and_logged(tmp_path):
    m = tiny_module()
    m.add_loss_term("test/penalty", lambda x, y, out: 0 * out.final.sum() + 2.5)
    with pytest.raises(ValueError, match="already registered"):
        m.add_loss_term("test/penalty", lambda x, y, out: out.final.sum())
    trainer = tiny_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(m, datamodule=synthetic())
    assert trainer.callback_metrics["test/penalty"] == pytest.approx(2.5)
    m.remove_loss_term("test/penalty")
    assert not m._loss_terms


def test_missing_data_shape_is_explained():
    with pytest.raises(ValueError, match="needs data_shape"):
        MultiExitModule(net=NetConfig())


def test_bad_thresholds_are_rejected():
    with pytest.raises(ValueError, match=r"thresholds must lie in \[0, 1\]"):
        tiny_module(thresholds=[0.5, 1.5])
