"""The prepared check for a machine with a GPU: ``make gpu-check OUT=dir`` (one command, under 8 minutes).

1. The ``gpu``-marked tests (every search on CUDA in ``16-mixed`` and ``bf16-mixed``; the data kept there).
2. A short search (growing + SNIP by filter + garbage collection + retraining from scratch) on CIFAR-shaped
   synthetic data in ``bf16-mixed``, on the GPU and then on this machine's CPU: images/s of each, and
   whether the two found the same architecture (they may differ: the arithmetic differs).

Everything goes to ``OUT/gpu_check.log`` as well as to the terminal, and the figures to
``OUT/gpu_check.json``. Without CUDA it says so in one line and exits 0 (nothing to check here).
"""

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from callbacks import GarbageCollection, Growing, RetrainFromScratch, SnipPruning
from lit_nas import MultiExitModule, NetConfig
from lit_nas.data import SyntheticDataModule

ROOT = Path(__file__).resolve().parent.parent
#: the short search: CIFAR-shaped images (3x32x32, 10 classes), 6 epochs of 16 batches of 128 (growth at
#: 1/2/3, each block pruned as it activates, retrained from scratch at 4)
IMAGES, BATCH, EPOCHS = 2048, 128, 6


def search(accelerator: str, out: Path) -> dict:
    """The short search on one accelerator; its images/s and the architecture found."""
    import lightning as L

    torch.manual_seed(0)
    dm = SyntheticDataModule(num_train=IMAGES + 256, num_test=256, input_size=32, batch_size=BATCH)
    net = NetConfig(stage_widths=[16, 32, 64], cells_per_stage=[2, 2, 2])
    module = MultiExitModule(net=net, data_shape=dm.data_shape)
    callbacks = [
        Growing(grow_epochs=[1, 2, 3]),
        SnipPruning(keep_ratio=0.5, after_epochs=0, criterion_batch_size=64, granularity="filter"),
        GarbageCollection(after_prune=True),
        RetrainFromScratch(epoch=4),
    ]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    if accelerator == "gpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "accelerator": accelerator,
        "seconds": seconds,
        "images_per_s": trainer.global_step * BATCH / seconds,
        "loss": float(trainer.callback_metrics["train/loss"]),
        "arch": module.arch_spec.to_dict(),
    }


def main() -> int:
    """Run the check; the exit status (0: passed, or no GPU here)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where the log and figures go")
    args = p.parse_args()
    if not torch.cuda.is_available():
        why = (
            "this torch is a CPU build: on a GPU machine install a CUDA one (make setup CPU_ONLY=0)"
            if torch.version.cuda is None
            else f"CUDA {torch.version.cuda} build, but no device is visible"
        )
        print(f"gpu-check: no GPU here (torch {torch.__version__}; {why}): nothing to check")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "gpu_check.log").open("w")

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    say(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "tests",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
    )
    log.write(tests.stdout + tests.stderr)
    say(f"gpu tests: {tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else 'no output'}")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for accelerator in ("gpu", "cpu"):
            figures[accelerator] = search(accelerator, Path(tmp) / accelerator)
            f = figures[accelerator]
            rate, secs, loss = f["images_per_s"], f["seconds"], f["loss"]
            say(f"search on {accelerator}: {rate:.0f} images/s, {secs:.1f} s, final loss {loss:.3f}")
    same = figures["gpu"]["arch"] == figures["cpu"]["arch"]
    say(
        f"GPU/CPU images/s: {figures['gpu']['images_per_s'] / figures['cpu']['images_per_s']:.1f}x; "
        f"architectures found {'identical' if same else 'DIFFERENT (arithmetic differs; see gpu_check.json)'}"
    )
    (args.out / "gpu_check.json").write_text(json.dumps({"tests_rc": tests.returncode, **figures}, indent=1))
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
