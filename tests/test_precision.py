"""Mixed precision and the accelerator: every search trains under Lightning's precision flags.

Here (CPU) each search runs with ``precision="bf16-mixed"`` (autocast in bfloat16, float32 weights); on a
machine with CUDA the same cases also run on the GPU in ``16-mixed`` (with a gradient scaler, whose skipped
steps must leave masks and switches in step) and ``bf16-mixed``: the ``gpu`` marker, skipped without CUDA
(``make gpu-check`` runs them). What must hold after each fit: the weights stay float32, the loss finite,
masked weights exactly zero, and the network, its ArchSpec and the optimizer state agree in every shape (so a
surgery under autocast sliced everything it had to).
"""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from callbacks import (
    FisherPruning,
    GarbageCollection,
    Growing,
    MorphNet,
    NetAdapt,
    RetrainFromScratch,
    SnipPruning,
    SwitchL1,
)
from lit_nas import build_net
from lit_nas.data import SyntheticDataModule
from lit_nas.masks import MASK_SUFFIX
from tests.helpers import tiny_module, tiny_trainer

#: the searches, each as its callbacks (fresh objects per run)
SEARCHES = {
    "grow_snip_filter_gc_retrain": lambda: [
        Growing(grow_epochs=[1, 2, 3]),
        SnipPruning(keep_ratio=0.5, after_epochs=0, criterion_batch_size=16, granularity="filter"),
        GarbageCollection(after_prune=True),
        RetrainFromScratch(epoch=4),
    ],
    "snip_weight": lambda: [SnipPruning(keep_ratio=0.3, after_epochs=0, criterion_batch_size=16)],
    "fisher_gc": lambda: [
        FisherPruning(every_n_steps=1, per_step=2, stop_at="channels", target_fraction=0.7),
        GarbageCollection(after_prune=True),
    ],
    "switch_l1": lambda: [SwitchL1(lam=0.3, until_epoch=3)],
    "netadapt": lambda: [
        NetAdapt(
            stop_at="flops", target_fraction=0.8, step_fraction=0.05, start_epoch=1, short_term_batches=1
        )
    ],
    "morphnet": lambda: [
        MorphNet(strength=30.0, threshold=0.2, until_epoch=3, expand_epochs=[2], budget_fraction=1.0)
    ],
}
#: (accelerator, precision) of each run: the CPU ones run everywhere, the CUDA ones where a GPU is
RUNS = [
    pytest.param("cpu", "bf16-mixed", id="cpu-bf16"),
    pytest.param("gpu", "16-mixed", id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("gpu", "bf16-mixed", id="cuda-bf16", marks=pytest.mark.gpu),
]


def fit(tmp_path, search: str, accelerator: str, precision: str | None, max_epochs: int = 5, **kwargs):
    module = tiny_module()
    dm = SyntheticDataModule(num_train=208, num_test=64, input_size=16, batch_size=32, holdout_size=48)
    callbacks = [*SEARCHES[search](), *kwargs.pop("callbacks", [])]
    if precision is not None:
        kwargs["precision"] = precision
    if accelerator == "gpu":  # CUDA has no deterministic kernel for some backward ops: warn, do not fail
        kwargs.setdefault("deterministic", "warn")
    trainer = tiny_trainer(
        tmp_path, max_epochs=max_epochs, callbacks=callbacks, accelerator=accelerator, **kwargs
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer, callbacks


def check_consistent(module, trainer) -> None:
    """Float32 weights, a finite loss, zero masked weights, and net, spec and optimizer state in agreement."""
    assert trainer.state.finished
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    masks = module.masks()
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        assert mask.device == params[name].device
        assert torch.count_nonzero(params[name].detach()[mask == 0]) == 0, name
    rebuilt = build_net(module.arch_spec)  # the spec alone, as a checkpoint is loaded
    shapes = {k: v.shape for k, v in module.net.state_dict().items() if not k.endswith(MASK_SUFFIX)}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
    device = next(module.parameters()).device
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        assert value.shape == p.shape and value.device == p.device, key
    assert all(b.device == device for b in module.buffers())


@pytest.mark.parametrize(("accelerator", "precision"), RUNS)
@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_every_search_trains_in_mixed_precision(tmp_path, search, accelerator, precision):
    module, trainer, _ = fit(tmp_path, search, accelerator, precision)
    check_consistent(module, trainer)
    changed = module.arch_spec.to_dict() != tiny_module().arch_spec.to_dict() or module.masks()
    assert changed, f"{search} changed nothing under {precision}"


class Scales(Callback):
    """The gradient scaler's scale after every training step."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


@pytest.mark.parametrize("search", ["snip_weight", "grow_snip_filter_gc_retrain", "fisher_gc", "switch_l1"])
def test_steps_a_gradient_scaler_skips_leave_masks_switches_and_surgery_in_step(tmp_path, search):
    # float16 autocast with a scaler whose first scales overflow: the first steps are skipped (as on a GPU
    # with 16-mixed); pruning and surgery happen among them, and everything must still agree afterwards
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    scales = Scales()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    module, trainer, _ = fit(tmp_path, search, "cpu", None, callbacks=[scales], plugins=[plugin])
    check_consistent(module, trainer)
    halved = sum(b < a for a, b in zip([2.0**24, *scales.scales], scales.scales))
    assert halved >= 3, scales.scales  # steps were skipped ...
    assert scales.scales[-1] == scales.scales[-2] == scales.scales[-3]  # ... and then taken


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: make gpu-check runs the check itself")
def test_gpu_check_says_there_is_no_gpu_and_exits_0(tmp_path):
    import subprocess
    import sys

    from lit_nas.paths import REPO_ROOT

    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("gpu-check: no GPU here") and not (tmp_path / "out").exists()
