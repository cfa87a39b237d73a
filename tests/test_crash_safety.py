"""A long search survives a crash and fails loudly: last.ckpt every epoch, resume, NaN, SIGTERM, DDP."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lit_nas.runs import RunFailure, new_run_dir
from lit_nas_cli import REPO_ROOT, resolve_run
from tests.run_helpers import train_popen
from tests.run_helpers import train_py as train

TINY_SEARCH = str(REPO_ROOT / "tests" / "configs" / "tiny_search.yaml")
TINY_SNIP = str(REPO_ROOT / "tests" / "configs" / "tiny_snip.yaml")


def kill_at(epoch: int, signum: int, batch: int = 0) -> list[str]:
    return [
        "--trainer.callbacks+=tests.run_helpers.SignalAt",
        f"--trainer.callbacks.epoch={epoch}",
        f"--trainer.callbacks.signum={signum}",
        f"--trainer.callbacks.batch={batch}",
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def ckpt_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


# -- last.ckpt every epoch, --ckpt_path last, SIGKILL -> bit-identical resume -----------------------------
def test_sigkilled_search_resumes_from_last_and_ends_bit_identical(tmp_path):
    """Growing + Fisher pruning + GC, SIGKILLed in epoch 3, resumed with --ckpt_path last in a new process."""
    straight, crashed, other = tmp_path / "straight", tmp_path / "crashed", tmp_path / "other"
    for d in (straight, crashed, other):
        d.mkdir()
    args = ["--config", TINY_SEARCH, "--test_after_fit", "false"]
    ok = train(straight, *args)
    assert ok.returncode == 0, ok.stderr[-3000:]

    killed = train(crashed, *args, *kill_at(epoch=3, signum=9))
    assert killed.returncode == -signal.SIGKILL
    last = crashed / "runs" / "tiny_search" / "checkpoints" / "last.ckpt"
    # val/acc_full is NaN the whole time (the search is pending), yet last.ckpt follows every epoch
    assert ckpt_epoch(last) == 2
    resumed = train(crashed, *args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no last checkpoint available" not in resumed.stderr
    assert not (crashed / "runs" / "tiny_search_1").exists(), "the resume continues in its own run directory"

    a = weights(straight / "runs" / "tiny_search" / "checkpoints" / "last.ckpt")
    b = weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # negative control: another seed ends elsewhere, so the equality above can fail
    ctrl = train(other, *args, "--seed_everything", "1")
    assert ctrl.returncode == 0, ctrl.stderr[-3000:]
    c = weights(other / "runs" / "tiny_search" / "checkpoints" / "last.ckpt")
    assert any(a[k].shape != c[k].shape or not torch.equal(a[k], c[k]) for k in a)


def test_ckpt_path_last_with_nothing_to_resume_starts_fresh_and_says_where(tmp_path):
    out = train(
        tmp_path,
        "--config",
        TINY_SNIP,
        "--trainer.max_epochs",
        "1",
        "--growing",
        "null",
        "--test_after_fit",
        "false",
        "--ckpt_path",
        "last",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        "no runs/tiny_snip*/checkpoints/last.ckpt to resume; training starts in runs/tiny_snip" in out.stderr
    )
    assert "HINT" not in out.stderr
    run = tmp_path / "runs" / "tiny_snip"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # with logger: false everything the run writes is in its run directory (SNIP's connectivity maps too)
    assert list((run / "snip").glob("*.png")), sorted(str(p) for p in run.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    # test and validate of its checkpoint write nothing into the working directory
    for sub in ("test", "validate"):
        ckpt = str(run / "checkpoints" / "last.ckpt")
        done = train(tmp_path, "--config", TINY_SNIP, "--ckpt_path", ckpt, subcommand=sub)
        assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in run.glob("lit_nas_config*")) == ["lit_nas_config.yaml"]


def test_a_second_run_of_a_config_gets_its_own_directory(tmp_path):
    (tmp_path / "runs" / "cfg" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "cfg" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert new_run_dir(tmp_path / "runs", "cfg") == tmp_path / "runs" / "cfg_1"
    with pytest.raises(RunFailure, match="already holds a run"):
        resolve_run(str(tmp_path / "runs" / "cfg"), None, "cfg")


# -- numeric faults -----------------------------------------------------------------------------------------
def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_keeps_its_last_good_checkpoint(tmp_path):
    args = ["--config", TINY_SNIP, "--growing", "null"]
    first = train(tmp_path, *args, "--trainer.max_epochs", "1", "--test_after_fit", "false")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_snip"
    good = (run / "checkpoints" / "last.ckpt").read_bytes()
    # resume it with a learning rate that diverges: the checkpoint's lr is used, so change it by a new run
    out = train(tmp_path, *args, "--model.init_args.optimizer.lr", "1e6", "--run_dir", str(tmp_path / "nan"))
    assert out.returncode == 1
    assert "non-finite training loss at global step" in out.stderr
    assert "cross-entropy = nan" in out.stderr or "cross-entropy = inf" in out.stderr
    assert "Traceback" not in out.stderr
    nan_ckpts = list((tmp_path / "nan").rglob("*.ckpt"))
    for path in nan_ckpts:  # whatever was written before the divergence is finite
        assert all(v.isfinite().all() for v in weights(path).values() if v.is_floating_point())
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == good


def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(tmp_path):
    args = ["--config", TINY_SNIP, "--test_after_fit", "false"]
    out = train(tmp_path, *args, *kill_at(epoch=2, signum=15, batch=1))
    assert out.returncode == 143, out.stderr[-3000:]
    assert "stopped by SIGTERM" in out.stderr
    last = tmp_path / "runs" / "tiny_snip" / "checkpoints" / "last.ckpt"
    assert ckpt_epoch(last) == 2  # saved inside epoch 2, not left at the end of epoch 1
    resumed = train(tmp_path, *args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt_epoch(last) == 3


# -- DDP through train.py -----------------------------------------------------------------------------------
def test_ddp_through_train_py_with_growing_and_snip_gives_identical_masks(tmp_path):
    dump = tmp_path / "masks"
    out = train(
        tmp_path,
        "--config",
        TINY_SNIP,
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "csv"),
        "--trainer.callbacks+=tests.run_helpers.DumpMasks",
        f"--trainer.callbacks.directory={dump}",
        "--test_after_fit",
        "false",
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["masks"] and r0["masks"].keys() == r1["masks"].keys()
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    for k in r0["weights"]:
        assert_close(r0["weights"][k], r1["weights"][k], msg=k)
    assert (tmp_path / "runs" / "tiny_snip" / "lit_nas_config.yaml").is_file()


# -- a resume tests the same checkpoint and writes the same summary as a run never stopped: see
# tests/test_study.py (study trials SIGKILLed after a best epoch and in their test, SIGTERMed in their test)


# -- runs started together never share a directory ---------------------------------------------------------
def test_three_runs_of_one_config_started_together_get_three_directories(tmp_path):
    """Started in one shell loop, each claims its directory as it chooses it; none loses its results."""
    import subprocess

    args = [
        "--config",
        TINY_SNIP,
        "--growing",
        "null",
        "--trainer.max_epochs",
        "1",
        "--test_after_fit",
        "false",
    ]
    procs = [
        train_popen(
            tmp_path,
            *args,
            "--seed_everything",
            str(seed),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for e in errors]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["tiny_snip", "tiny_snip_1", "tiny_snip_2"]
    seeds = sorted(json.loads((tmp_path / "runs" / r / "summary.json").read_text())["seed"] for r in runs)
    assert seeds == [0, 1, 2], "a run's summary.json was overwritten by another's"
    for r in runs:
        assert (tmp_path / "runs" / r / "checkpoints" / "last.ckpt").is_file()


def test_a_run_directory_held_by_a_live_process_is_refused_and_a_dead_holder_releases_it(tmp_path):
    import subprocess
    import sys

    held = tmp_path / "held"
    code = (
        "import sys, time; from lit_nas.runs import claim_run_dir; claim_run_dir(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(held)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for ckpt_path in (None, "last"):
            with pytest.raises(
                RunFailure,
                match=rf"run directory {held} is in use by another running process \(.* pid {holder.pid}\)",
            ):
                resolve_run(str(held), ckpt_path, "cfg")
        # an empty directory held by another process is skipped when a new one is chosen
        assert new_run_dir(tmp_path, "held", claim=True) == tmp_path / "held_1"
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead process's lock: the directory can be claimed again
    assert resolve_run(str(held), None, "cfg") == (str(held), None)
    with pytest.raises(RunFailure, match="--run_dir is empty"):
        resolve_run("", None, "cfg")
