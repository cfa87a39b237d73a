"""Distillation: eq. 5.5 on hand-computed logits, the frozen teacher, self-distillation, bad configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from callbacks import Distillation
from lit_nas import DataShape, MultiExitModule, NetConfig
from lit_nas.data import SyntheticDataModule
from lit_nas.distill import kd_loss, soft_kl
from tests.helpers import TINY, tiny_module, tiny_trainer
from tests.helpers import tiny_data as data


def test_kd_loss_is_the_formula_on_hand_computed_logits():
    student, teacher, label = [2.0, 0.0, -1.0], [0.5, 1.5, 0.0], 1
    lam, T = 0.2, 2.0

    def softmax(z, t=1.0):
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    ce = -math.log(softmax(student)[label])
    p_t, p_s = softmax(teacher, T), softmax(student, T)
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s))
    expected = lam * ce + (1 - lam) * T**2 * kl
    got = kd_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]), lam, T)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # the T^2 factor: with lam = 0 the loss is T^2 times the divergence of the softened distributions
    only_soft = kd_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]), 0.0, T)
    assert float(only_soft) == pytest.approx(T**2 * kl, rel=1e-6)
    assert float(soft_kl(torch.tensor([teacher]), torch.tensor([teacher]), T)) == pytest.approx(0, abs=1e-7)


@pytest.fixture
def teacher_ckpt(tmp_path):
    teacher = tiny_module(1, net={"stage_widths": [8, 16, 16]})
    trainer = tiny_trainer(tmp_path / "teacher", max_epochs=1)
    trainer.fit(teacher, datamodule=data())
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_the_training_loss_is_eq_5_5_on_every_exit_and_the_teacher_stays_frozen(tmp_path, teacher_ckpt):
    student = tiny_module()
    kd = Distillation(teacher=str(teacher_ckpt), lam=0.3, temperature=3.0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[kd])
    trainer.fit(student, datamodule=data())
    saved = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    for k, v in kd.teacher.state_dict().items():  # unchanged by two epochs of the student
        assert torch.equal(v, saved[k]), k
    assert not kd.teacher.training and all(not p.requires_grad for p in kd.teacher.parameters())
    in_opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in kd.teacher.parameters()}
    assert not any("teacher" in k for k in student.state_dict())
    assert "distill/kl" in trainer.callback_metrics
    # the module's loss plus the callback's term is sum_e w_e KD_e (eval mode: one deterministic forward)
    student.eval()
    kd.setup(trainer, student, "fit")  # re-registers its term on the module
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.no_grad():
        out = student(x)
        weights = student.exit_weights()
        base = sum(weights[e] * nn.functional.cross_entropy(lg, y) for e, lg in out.items())
        total = base + kd._term(x, y, out)
        t = kd.teacher(x).final
        expected = sum(weights[e] * kd_loss(lg, t, y, 0.3, 3.0) for e, lg in out.items())
    torch.testing.assert_close(total, expected)


def test_self_distillation_teaches_the_earlier_exits_with_the_detached_final_one():
    student = tiny_module()
    kd = Distillation(self_distill=True)
    kd.setup(None, student, "fit")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    out = student(x)
    term = kd._term(x, y, out)
    term.backward()
    final_head = student.net.exits["3"].linear.weight
    assert final_head.grad is None or torch.all(final_head.grad == 0)  # the teacher is detached
    assert student.net.exits["0"].linear.weight.grad.abs().sum() > 0
    w = student.exit_weights()
    with torch.no_grad():
        expected = sum(
            w[e] * (kd_loss(out[e], out.final, y) - nn.functional.cross_entropy(out[e], y)) for e in (0, 1, 2)
        )
    torch.testing.assert_close(term.detach(), expected)


def test_a_teacher_for_other_data_is_refused(tmp_path):
    torch.manual_seed(0)
    other = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(1, 16, 10))
    trainer = tiny_trainer(tmp_path / "t", max_epochs=1, limit_train_batches=1)
    trainer.fit(
        other,
        datamodule=SyntheticDataModule(
            num_train=64, num_test=32, in_channels=1, input_size=16, batch_size=32
        ),
    )
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    kd = Distillation(teacher=str(tmp_path / "other.ckpt"))
    with pytest.raises(ValueError, match=r"takes 1x16x16 images into 10 classes, the student 3x16x16"):
        tiny_trainer(tmp_path, callbacks=[kd]).fit(tiny_module(), datamodule=data())
    with pytest.raises(FileNotFoundError, match=r"teacher checkpoint 'nowhere\.ckpt' does not exist"):
        tiny_trainer(tmp_path, callbacks=[Distillation(teacher="nowhere.ckpt")]).fit(
            tiny_module(), datamodule=data()
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), r"needs a teacher checkpoint or self_distill: true \(exactly one\); got teacher=None"),
        (dict(teacher="t.ckpt", self_distill=True), "exactly one"),
        (dict(teacher="t.ckpt", lam=1.5), r"lam \(weight of the label loss\) must lie in \[0, 1\]; got 1.5"),
        (dict(teacher="t.ckpt", temperature=0), "temperature must be > 0; got 0"),
        (dict(self_distill=True, teacher_exit=1), "teacher_exit must be a block index >= 0 of a teacher"),
    ],
)
def test_bad_distillation_configs_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distillation(**kwargs)
