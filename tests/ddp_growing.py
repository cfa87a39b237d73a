"""Two CPU processes (gloo) grow a network under Lightning's DDP strategy; each rank saves what it holds.

Run by ``tests/test_growing.py`` as ``python -m tests.ddp_growing OUT [--strategy S] [--devices N]``
(and by ``tests/test_snip.py`` with ``--snip``: SNIP one-shot prunes each block as it activates);
Lightning's launcher starts rank 1 by re-running this module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lit_nas  # noqa: F401  isort: skip
import lightning as L

from callbacks import Growing, SnipPruning
from lit_nas import DataShape, NetConfig
from lit_nas.data import SyntheticDataModule
from lit_nas.module import MultiExitModule
from tests.conftest import TINY


class SaveRankState(L.Callback):
    def __init__(self, out: Path, growing: Growing, snip: SnipPruning | None) -> None:
        self.out, self.growing, self.snip = out, growing, snip

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: MultiExitModule) -> None:
        if trainer.current_epoch == 2:  # stop before block 3 activates (growth at epoch 3)
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: MultiExitModule) -> None:
        opt = trainer.optimizers[0]
        with_state = [
            b
            for b in range(pl_module.arch_spec.num_blocks)
            if any(p in opt.state and opt.state[p] for p in pl_module.net.blocks[b].parameters())
        ]
        torch.save(
            {
                "state": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                "active_blocks": pl_module.active_blocks,
                "history": [list(h) for h in self.growing.history],
                "blocks_with_state": with_state,
                "world_size": trainer.world_size,
                "snip_history": [list(h) for h in self.snip.history] if self.snip else [],
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", default="ddp_find_unused_parameters_true")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--snip", action="store_true", help="add SnipPruning (keep 0.5, one-shot)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores
    L.seed_everything(0)
    module = MultiExitModule(net=NetConfig(**TINY), data_shape=DataShape(3, 16, 10))
    if not (args.out / "initial.pt").exists():
        torch.save({k: v.clone() for k, v in module.state_dict().items()}, args.out / "initial.pt")
    growing = Growing(grow_epochs=[1, 2, 3])
    snip = SnipPruning(keep_ratio=0.5, after_epochs=0, criterion_batch_size=16) if args.snip else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=4,
        logger=False,
        default_root_dir=args.out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[growing, *([snip] if snip else []), SaveRankState(args.out, growing, snip)],
    )
    trainer.fit(
        module, datamodule=SyntheticDataModule(num_train=160, num_test=64, input_size=16, batch_size=16)
    )


if __name__ == "__main__":
    main()
