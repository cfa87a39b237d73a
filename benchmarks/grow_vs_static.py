"""Grown vs static SDN on the same recipe and the same number of epochs (Inria thesis, section 3).

Trains ``configs/growing_fast.yaml`` (Fashion-MNIST, blocks activate at epochs 2/3/4) and then the very same
config with ``--growing null`` (every block trains from epoch 0), each through ``train.py``'s
CLI in this process, tests each run's best checkpoint (chosen on val/acc) and prints per-exit test
accuracies, early-exit figures and wall times side by side. About 35 minutes on 2 CPU cores.

    python benchmarks/grow_vs_static.py [--config growing_fast.yaml] [extra train.py arguments ...]

Extra arguments go to both runs, e.g. ``--trainer.limit_train_batches 5`` for a smoke test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lit_nas  # noqa: F401  isort: skip  (first: torchvision compat)
import wandb
import yaml

from lit_nas.module import MultiExitModule
from lit_nas.paths import resolve_config
from lit_nas_cli import main as train_main


def static_args(config: dict[str, Any], name: str) -> list[str]:
    """Command-line overrides that make the same config static: growing switched off, the run renamed."""
    if not config.get("growing"):
        raise ValueError("the config has no growing callback to switch off")
    args = ["--growing", "null", "--run_dir", f"runs/{name}_static"]
    logger = config.get("trainer", {}).get("logger")
    if isinstance(logger, dict) and "name" in logger.get("init_args", {}):
        args += ["--trainer.logger.init_args.name", f"{logger['init_args']['name']}_static"]
    return args


def run(config_path: Path, extra: list[str]) -> dict[str, Any]:
    """Fit and test one config; return its test metrics, best checkpoint's facts and wall time."""
    t0 = time.perf_counter()
    cli = train_main(["fit", "--config", str(config_path), *extra])
    wall = time.perf_counter() - t0
    # WandbLogger leaves its run open (so that a later test can log into it); close it, or the next run of
    # this process would attach to it (its curves, and its checkpoint directory, would be shared).
    if wandb.run is not None:
        wandb.finish()
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    active = MultiExitModule.spec_from_checkpoint(best).active_blocks if best else None
    return {"metrics": metrics, "best": best, "best_active": active, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="growing_fast.yaml")
    args, extra = parser.parse_known_args()
    grown_path = resolve_config(args.config)
    config = yaml.safe_load(grown_path.read_text())
    results = {
        "grown": run(grown_path, extra),
        "static": run(grown_path, [*extra, *static_args(config, grown_path.stem)]),
    }

    exits = sorted(
        {int(k.rsplit("exit", 1)[1]) for r in results.values() for k in r["metrics"] if "/acc_exit" in k}
    )
    print(f"\nGrown vs static, {grown_path.name} (same recipe and epochs; best checkpoint, test set)")
    header = f"{'run':<7} {'wall min':>8} {'best ckpt':<26} {'active':>6} " + " ".join(
        f"{'exit' + str(b):>6}" for b in exits
    )
    print(header)
    for name, r in results.items():
        accs = " ".join(f"{100 * r['metrics'].get(f'test/acc_exit{b}', float('nan')):>6.2f}" for b in exits)
        print(f"{name:<7} {r['wall_s'] / 60:>8.1f} {Path(r['best']).name:<26} {r['best_active']!s:>6} {accs}")
    qs = sorted(
        {
            k.rsplit("_q", 1)[1]
            for r in results.values()
            for k in r["metrics"]
            if k.startswith("test/early_exit/acc_")
        },
        key=float,
    )
    print("\nEarly exit (accuracy % at cost fraction of the full network):")
    for q in qs:
        cells = []
        for name, r in results.items():
            m = r["metrics"]
            acc, cost = m.get(f"test/early_exit/acc_q{q}"), m.get(f"test/early_exit/cost_fraction_q{q}")
            cells.append(f"{name} {100 * acc:.2f}% @ {cost:.3f}" if acc is not None else f"{name} -")
        print(f"  q={q:<5} " + "   ".join(cells))


if __name__ == "__main__":
    main()
