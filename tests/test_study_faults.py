"""Studies under faults: trials killed at every point that matters, Ray workers lost, the driver killed.

Split from test_study.py so pytest-xdist (one file per worker) spreads these slow tests.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_nas_study.runner import Study, run_study
from lit_nas_study.spec import StudySpec
from tests.run_helpers import train_py
from tests.test_study import ROOT, check_report_matches, roots, tiny_spec, write_spec


def local_ray(ray) -> None:
    """A Ray instance of this test's own on the loopback interface (never a cluster running here)."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )


def test_a_tiny_study_runs_on_ray(tmp_path):
    ray = pytest.importorskip("ray")
    spec = tiny_spec(tmp_path, grid={"fisher.target_fraction": [0.7]}, baselines={}, resources={"cpus": 1})
    local_ray(ray)
    try:
        study = run_study(spec, engine="ray", out=lambda _: None, **roots(tmp_path))
    finally:
        ray.shutdown()
    records = study.records()
    assert len(records) == 2 and all(r["status"] == "done" for r in records)
    check_report_matches(study, tmp_path)


def test_a_trial_whose_ray_worker_dies_is_retried_and_never_recorded_as_failed(tmp_path):
    """A worker killed under a trial (a lost node) is the infrastructure's failure: Ray reruns the trial; one
    lost every time has no record at all, so a plain rerun of the study runs it."""
    ray = pytest.importorskip("ray")

    def killer(name: str, times: int) -> dict:
        return {
            "trainer.callbacks+": "tests.run_helpers.KillParent",
            "trainer.callbacks.marker": str(tmp_path / name),
            "trainer.callbacks.times": times,
        }

    grid = {"fisher.target_fraction": {0.7: killer("once", 1), 0.9: killer("always", 99)}}
    spec = tiny_spec(tmp_path, grid=grid, seeds=[0], baselines={}, resources={"cpus": 1})
    lines: list[str] = []
    local_ray(ray)
    try:
        study = run_study(
            spec, engine="ray", out=lines.append, infra_retries=1, check=False, **roots(tmp_path)
        )
    finally:
        ray.shutdown()
    once, always = spec.trials()
    assert (tmp_path / "once").read_text() == "1"  # its first worker died
    assert study.record(once)["status"] == "done"
    assert (tmp_path / "always").read_text() == "2"  # tried, then retried once
    assert study.record(always) is None and not study.record_path(always).exists()
    assert any(f"lost, not recorded (rerun the study to run it): {always.id}" in ln for ln in lines)
    assert "1 trial(s) were lost" in lines[-1]


def test_trials_killed_after_a_best_epoch_or_in_their_test_end_like_an_uninterrupted_one(tmp_path):
    """Four trials of one config and seed: one runs straight; one is SIGKILLed in the epoch after its last
    new best, two during their test after fit (SIGKILL, SIGTERM). Recorded failed, they finish with
    --retry-failed, resuming their last.ckpt, and their summaries and records equal the uninterrupted
    trial's. Before Lightning's ModelCheckpoint ran ahead of last.ckpt, the first resumed a best-checkpoint
    tracker one epoch old and crashed on a deleted file (or tested another checkpoint); SIGTERM in the test
    overwrote last.ckpt with the best checkpoint's weights."""
    from tests.run_helpers import comparable_summary

    config = str(ROOT / "tests" / "configs" / "tiny_best.yaml")

    def spec_with(kills: dict) -> StudySpec:
        grid = {"trainer.callbacks+": kills}
        return StudySpec.load(
            write_spec(tmp_path, config=config, overrides={}, seeds=[0], grid=grid, name="killed_trials")
        )

    plain = {"lightning.pytorch.callbacks.Callback": {}}  # a callback that does nothing
    # the uninterrupted trial first: its last new best (the best checkpoint it tests) says where to kill
    (straight,) = spec_with(plain).trials()
    study = run_study(spec_with(plain), out=lambda _: None, check=False, **roots(tmp_path))
    assert study.record(straight)["status"] == "done"
    expected = comparable_summary(study.runs / straight.id)
    best = int(expected["checkpoint"].split("=")[1].split(".")[0])
    assert best + 1 < 8, "the config's last new best must come before its last epoch (max_epochs 8)"
    marker = "trainer.callbacks.marker"  # each kill happens once: the retry runs through
    subgrids = [
        {"trainer.callbacks+": plain},
        {
            "trainer.callbacks+": {"tests.run_helpers.SignalAt": {"trainer.callbacks.epoch": best + 1}},
            marker: [str(tmp_path / "after_best")],
        },
        {
            "trainer.callbacks+": ["tests.run_helpers.SignalInTest"],
            "trainer.callbacks.signum": {n: {marker: str(tmp_path / f"in_test_{n}")} for n in (9, 15)},
        },
    ]
    spec = StudySpec.load(
        write_spec(tmp_path, config=config, overrides={}, seeds=[0], grid=subgrids, name="killed_trials")
    )
    trials = {
        t.point.get("trainer.callbacks.signum", t.point["trainer.callbacks+"]): t for t in spec.trials()
    }
    assert trials["lightning.pytorch.callbacks.Callback"] == straight  # the same trial: its record is kept
    killed = {"after best": trials["tests.run_helpers.SignalAt"], "SIGKILL in test": trials[9]}
    killed["SIGTERM in test"] = trials[15]
    study = run_study(spec, jobs=2, out=lambda _: None, check=False, **roots(tmp_path))
    errors = {what: study.record(t).get("error", "") for what, t in killed.items()}
    assert [study.record(t)["status"] for t in killed.values()] == ["failed"] * 3, errors
    assert "exit status -9" in errors["after best"] and "exit status 143" in errors["SIGTERM in test"]
    straight_last = weights(study.runs / straight.id / "checkpoints" / "last.ckpt")
    for what in ("SIGKILL in test", "SIGTERM in test"):  # fit ended: last.ckpt is the last epoch's
        last = weights(study.runs / killed[what].id / "checkpoints" / "last.ckpt")
        assert all(torch.equal(straight_last[k], last[k]) for k in straight_last), what
    stale = study.runs / killed["after best"].id / "checkpoints" / ".last.ckpt.tmp-99999"
    stale.write_bytes(b"half a checkpoint")  # what a kill during a write leaves
    again = run_study(spec, jobs=2, retry_failed=True, out=lambda _: None, check=False, **roots(tmp_path))
    for what, t in killed.items():
        record = again.record(t)
        assert record["status"] == "done", (what, record)
        assert comparable_summary(again.runs / t.id) == expected, what
        # the record carries the resumed run's own summary.json
        assert record["summary"] == json.loads((again.runs / t.id / "summary.json").read_text())
    assert not stale.exists(), "a resume removes the temporary files of an interrupted write"

    # a finished run whose best checkpoint is gone: one message naming it, no traceback
    run = again.runs / straight.id
    (run / expected["checkpoint"]).unlink()
    gone = train_py(tmp_path, "--config", config, "--run_dir", str(run), "--ckpt_path", "last")
    assert gone.returncode == 1
    assert f"the best checkpoint of this run, {run / expected['checkpoint']}, is gone" in gone.stderr
    assert "Traceback" not in gone.stderr


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_study_killed_mid_way_resumes_without_rerunning_finished_trials(tmp_path):
    spec_path = write_spec(tmp_path, grid={"fisher.target_fraction": [0.7, 0.9]}, seeds=[0], name="killed")
    spec = StudySpec.load(spec_path)
    cmd = [sys.executable, str(ROOT / "study.py"), "run", str(spec_path)]
    cmd += ["--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    study = Study(spec, tmp_path / "results", tmp_path / "runs")
    first = study.record_path(spec.trials()[0])
    second_log = study.runs / spec.trials()[1].id / "train.log"
    deadline = time.time() + 120
    while not (first.exists() and second_log.exists()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # polls a condition: the first trial recorded, the second one started
    assert first.exists() and second_log.exists(), "the first trial never finished"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its running trial, at once
    proc.wait()
    done_before = {p: p.read_text() for p in study.results.rglob("*.json")}
    assert len(done_before) == 1  # the second trial was running when it was killed
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    records = {r["id"]: r for r in study.records()}
    assert len(records) == 2 and all(r["status"] == "done" for r in records.values())
    for path, text in done_before.items():
        assert path.read_text() == text  # finished trials were not redone
        trial_log = study.runs / json.loads(text)["id"] / "train.log"
        assert trial_log.read_text().count("\n$ ") == 1  # each ran once
    # negative control: the trial the kill interrupted was started twice (resumed with --ckpt_path last)
    redone = [i for i in records if study.results / f"{i}.json" not in done_before]
    logs = [(study.runs / i / "train.log").read_text() for i in redone]
    assert any(log.count("\n$ ") == 2 for log in logs)
    assert "done 2 / running 0 / left 0 (failed 0)" in rerun.stdout
    assert f"done {len(done_before)} / running 0" in rerun.stdout  # it knew what was done
