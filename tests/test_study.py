"""Studies: bad specs refused before any trial, both engines, resume, failures, the report's figures."""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from lit_nas.summary import SUMMARY_VERSION, Summary
from lit_nas_study.report import (
    COSTS,
    PointStats,
    at_equal_cost,
    collect,
    detectable_difference,
    final_exit,
    paired_interval,
    pareto_front,
    verdict,
    write_report,
)
from lit_nas_study.runner import Study, run_study
from lit_nas_study.spec import StudySpec, StudySpecError, point_id, scaled_widths

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "configs" / "tiny_search.yaml")
# two epochs of the tiny search without growing: a trial is a few seconds, most of them start-up
FAST = {"trainer.max_epochs": 2, "growing": None, "fisher.start_epoch": 0}


def write_spec(tmp_path: Path, **fields) -> Path:
    data = {"config": TINY, "overrides": dict(FAST), "seeds": [0, 1], **fields}
    path = tmp_path / f"{fields.pop('name', 'tiny')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_spec(tmp_path: Path, **fields) -> StudySpec:
    fields.setdefault("grid", {"fisher.target_fraction": [0.7, 0.9]})
    fields.setdefault("baselines", {"plain": {"width_multipliers": [0.5]}})
    return StudySpec.load(write_spec(tmp_path, **fields))


def roots(tmp_path: Path) -> dict:
    return {"results_root": tmp_path / "results", "runs_root": tmp_path / "runs"}


def summaries(study: Study) -> dict[str, dict]:
    """Each trial's summary.json, read from its run directory (not from the records)."""
    out = {}
    for t in study.spec.trials():
        path = study.runs / t.id / "summary.json"
        out[t.id] = json.loads(path.read_text())
    return out


def check_report_matches(study: Study, tmp_path: Path) -> None:
    """The report's means and standard deviations are those of the trials' own summary.json files."""
    files = write_report(study.spec, study, tmp_path / "report", wandb=False)
    rows = {(r["family"], r["point"]): r for r in _read_csv(files[0])}
    by_point: dict[tuple[str, str], list[dict]] = {}
    for t in study.spec.trials():
        s = json.loads((study.runs / t.id / "summary.json").read_text())
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in t.point.items())
        by_point.setdefault((t.family, label), []).append(s)
    assert set(rows) == set(by_point)
    for key, ss in by_point.items():
        accs = [s["test_acc"][final_exit(s)] for s in ss]
        params = [s["params"] for s in ss]
        mflops = [s["mflops"][final_exit(s)] for s in ss]
        row = rows[key]
        assert int(row["n"]) == len(ss) == 2
        assert float(row["acc_mean"]) == pytest.approx(np.mean(accs), abs=1e-12)
        assert float(row["acc_std"]) == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
        assert float(row["params_mean"]) == pytest.approx(np.mean(params))
        assert float(row["mflops_mean"]) == pytest.approx(np.mean(mflops))
    md = files[1].read_text()
    for ss in by_point.values():
        accs = [100 * s["test_acc"][final_exit(s)] for s in ss]
        assert f"{np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f}" in md
    assert any(p.suffix == ".png" and p.stat().st_size > 10_000 for p in files)


def _read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


# -- specs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"grid": {}}, "grid is empty"),
        ({"grid": {"fisher.target_fraction": []}}, "'fisher.target_fraction' needs a non-empty list"),
        ({"config": "no_such_config.yaml"}, "unknown config 'no_such_config.yaml'"),
        ({"gird": {"a": [1]}}, "key must be one of"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"series": "snip.mode"}, "series 'snip.mode' is not a key of every grid"),
        ({"baselines": {"plain": {"width_multiplier": [0.5]}}}, "'width_multiplier'"),
        ({"search_cost": {"seeds": [7]}}, "search_cost must be"),
        ({"seeds": [True, 1]}, "seeds must be a non-empty list of integers; got [True, 1]"),
        (
            {"baselines": {"../../outside": {"width_multipliers": [0.5]}}},
            "'../../outside' is not a plain name",
        ),
        ({"baselines": {"/tmp/abs": {"width_multipliers": [0.5]}}}, "'/tmp/abs' is not a plain name"),
        ({"baselines": ["plain"]}, "baselines must map names to families"),
        (
            {"grid": {"a.b": list(range(200)), "c.d": list(range(100))}},
            "20000 points x 2 seeds = 40000 trials",
        ),
    ],
)
def test_a_bad_spec_is_refused_naming_the_value(tmp_path, fields, message):
    fields.setdefault("grid", {"fisher.target_fraction": [0.7]})
    with pytest.raises(StudySpecError, match=re.escape(message)):
        StudySpec.load(write_spec(tmp_path, **fields))


@pytest.mark.parametrize("name", ["../../escape", "/tmp/escape", ".hidden", "a/b", "x" * 101])
def test_a_study_name_that_is_a_path_is_refused_and_nothing_is_written(tmp_path, name):
    spec = tmp_path / "spec.yaml"
    fields = {"config": TINY, "grid": {"fisher.target_fraction": [0.7]}, "name": name}
    spec.write_text(yaml.safe_dump(fields))
    with pytest.raises(StudySpecError, match="is not a plain name"):
        StudySpec.load(spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_every_path_a_study_writes_lies_under_its_roots(tmp_path):
    from lit_nas_study.spec import within

    spec = tiny_spec(tmp_path)
    study = Study(spec, **{k.replace("_root", "") + "_root": v for k, v in roots(tmp_path).items()})
    for t in spec.trials():
        assert study.record_path(t).resolve().is_relative_to((tmp_path / "results").resolve())
        assert Path(study.job(t, 1, None).run_dir).resolve().is_relative_to((tmp_path / "runs").resolve())
    with pytest.raises(StudySpecError, match="lies outside"):
        within(tmp_path / "results", "..", "x")
    spec.name = "../escape"  # a spec changed after it was checked is still caught where paths are made
    with pytest.raises(StudySpecError, match="lies outside"):
        Study(spec, **roots(tmp_path))


def test_unreadable_specs_and_records_are_named_and_a_study_goes_on(tmp_path, capsys):
    from lit_nas_study.__main__ import main

    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\x80\x81 secret-token")
    assert main(["status", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"study spec {bad} is not a text file" in err and "secret-token" not in err
    listy = tmp_path / "listy.yaml"
    listy.write_text("- a\n- b\n")
    assert main(["status", str(listy)]) == 2
    assert "must be a mapping; got list" in capsys.readouterr().err
    # a config that is not one: named, never echoed
    notcfg = tmp_path / "notcfg.yaml"
    notcfg.write_text("[1, 2, password123]")
    with pytest.raises(StudySpecError, match=f"config {notcfg} must be a mapping") as info:
        tiny_spec(tmp_path, config=str(notcfg))
    assert "password123" not in str(info.value)
    # records: one not an object, one not UTF-8; status counts them as left and names them
    spec_path = write_spec(tmp_path, grid={"fisher.target_fraction": [0.7]}, baselines={})
    spec = StudySpec.load(spec_path)
    study = Study(spec, **roots(tmp_path))
    t0, t1 = spec.trials()[:2]
    for t, content in ((t0, b"[1, 2]"), (t1, b"\xff\xfe{")):
        study.record_path(t).parent.mkdir(parents=True, exist_ok=True)
        study.record_path(t).write_bytes(content)
    args = ["--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    assert main(["status", str(spec_path), *args]) == 0
    out = capsys.readouterr()
    assert "0 done, 0 failed, 2 left of 2" in out.out
    assert f"{study.record_path(t0)} holds a JSON list, not an object" in out.err
    assert f"{study.record_path(t1)} is not UTF-8 text" in out.err
    # run: a bad timeout is refused before anything runs
    for timeout in ("0", "-5", "nan"):
        assert main(["run", str(spec_path), *args, "--timeout", timeout]) == 2
        assert "timeout must be a positive number of seconds" in capsys.readouterr().err


def test_a_summary_of_another_version_is_refused_naming_both_versions(tmp_path, capsys):
    from lit_nas_study.__main__ import main
    from lit_nas_study.runner import run_job

    spec_path = write_spec(tmp_path, grid={"fisher.target_fraction": [0.7]}, baselines={})
    spec = StudySpec.load(spec_path)
    study = Study(spec, **roots(tmp_path))
    t0, t1 = spec.trials()[:2]
    summary = {**dict.fromkeys(Summary.__required_keys__), "tested": True, "version": SUMMARY_VERSION + 1}
    study.save(t0, {"id": t0.id, "status": "done", "summary": summary})
    study.save(t1, {"id": t1.id, "status": "done", "summary": {**summary, "version": SUMMARY_VERSION}})
    args = ["--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    assert main(["status", str(spec_path), *args]) == 0
    out = capsys.readouterr()
    assert "1 done, 0 failed, 1 left of 2" in out.out  # the record of this version is read (control)
    assert f"version {SUMMARY_VERSION + 1}; this code reads version {SUMMARY_VERSION}" in out.err
    # a trial that left a summary of another version in its run directory is not taken as done
    job = study.job(t0, 1, None)
    Path(job.run_dir).mkdir(parents=True)
    (Path(job.run_dir) / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "fake_train.py").write_text("")  # a trial that exits 0 and writes nothing
    record = run_job(replace(job, train_py=str(tmp_path / "fake_train.py")))
    assert record["status"] == "failed"
    assert f"version {SUMMARY_VERSION + 1}; this code reads version {SUMMARY_VERSION}" in record["error"]


def test_the_old_study_command_runs_the_new_one(tmp_path):
    spec_path = write_spec(tmp_path, grid={"fisher.target_fraction": [0.7]}, baselines={})
    args = ["status", str(spec_path), "--results", str(tmp_path / "r"), "--runs", str(tmp_path / "s")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    old = subprocess.run(
        [sys.executable, "-m", "lit_nas.study", *args], env=env, capture_output=True, text=True
    )
    assert old.returncode == 0, old.stderr
    assert "0 done, 0 failed, 2 left of 2" in old.stdout and "python study.py status" in old.stderr


def test_trials_whose_settings_are_refused_fail_before_any_trial_runs(tmp_path):
    # one check (one train.py process) for both: an unknown key, and a bad value of a known one
    grid = [{"fisher.no_such_option": [1, 2]}, {"fisher.target_fraction": [0.5, 7.0]}]
    spec = tiny_spec(tmp_path, grid=grid, baselines={})
    with pytest.raises(StudySpecError) as err:
        run_study(spec, out=lambda _: None, **roots(tmp_path))
    assert "no_such_option" in str(err.value) and "target_fraction must lie in" in str(err.value)
    assert "nothing was run" in str(err.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_trial_ids_are_stable_and_distinct(tmp_path):
    spec = tiny_spec(tmp_path, search_cost={"seeds": [0]})
    ids = [t.id for t in spec.trials()]
    assert len(ids) == len(set(ids)) == 6
    assert ids == [t.id for t in tiny_spec(tmp_path, search_cost={"seeds": [0]}).trials()]
    assert point_id({"a.b": 1, "c": "x"}) == point_id({"c": "x", "a.b": 1})
    assert point_id({"a.b": 1}) != point_id({"a.c": 1})


def test_a_list_of_grids_searches_the_union_each_point_with_its_own_linked_keys(tmp_path):
    snip = str(ROOT / "tests" / "configs" / "tiny_snip.yaml")
    grid = [
        {"config": {TINY: {"fisher.per_step": 2}}, "fisher.target_fraction": [0.7, 0.9]},
        {"config": {snip: {"snip.steps": 2}}, "snip.keep_ratio": [0.3]},
    ]
    spec = tiny_spec(tmp_path, grid=grid, series="config", seeds=[0], baselines={})
    points = spec.search_points()
    assert points == [
        {"config": TINY, "fisher.target_fraction": 0.7},
        {"config": TINY, "fisher.target_fraction": 0.9},
        {"config": snip, "snip.keep_ratio": 0.3},
    ]
    assert spec.point_overrides(points[1]) == {"fisher.target_fraction": 0.9, "fisher.per_step": 2}
    assert spec.point_overrides(points[2]) == {"snip.keep_ratio": 0.3, "snip.steps": 2}
    args = {t.point_id: t.args for t in spec.trials()}
    snip_args = args[point_id(points[2])]
    assert snip_args[:2] == ("--config", snip) and "--fisher.per_step" not in snip_args
    assert len(set(args)) == 3
    with pytest.raises(StudySpecError, match=r"series 'fisher.target_fraction' is not a key of every grid"):
        tiny_spec(tmp_path, grid=grid, series="fisher.target_fraction")
    with pytest.raises(StudySpecError, match="grid is empty"):
        tiny_spec(tmp_path, grid=[])


def test_width_multipliers_scale_every_width_of_a_wrn():
    over = scaled_widths({"kind": "wide_resnet", "depth": 16, "widen_factor": 2, "exits": False}, 0.5)
    net = over["model.init_args.net"]
    assert (
        net["stage_widths"] == [16, 32, 64] and net["stem_width"] == 8 and net["cells_per_stage"] == [2, 2, 2]
    )
    assert net["kind"] == "resnet_sdn" and net["depth"] is None and net["exits"] is False


def test_a_width_multiplier_keeps_the_familys_own_net_overrides(tmp_path):
    spec = tiny_spec(
        tmp_path,
        overrides={**FAST, "model.init_args.net.exit_pool": 2},
        baselines={"plain": {"overrides": {"model.init_args.net.dense": True}, "width_multipliers": [0.5]}},
    )
    ((_, over),) = spec.family_points(spec.baselines[0])
    net = over["model.init_args.net"]
    assert net["dense"] is True and net["exit_pool"] == 2 and net["stage_widths"] == [2, 4, 4]


# -- the report's statistics --------------------------------------------------------------------------------
def _point(family, accs, cost, costs=None):
    p = PointStats(family, {"x": cost})
    p.acc = list(accs)
    p.costs = {"params": list(costs) if costs is not None else [cost] * len(accs)}
    p.seeds = list(range(len(accs)))
    return p


def test_equal_cost_difference_interpolates_in_log_cost_and_matches_welch():
    fam = [_point("b", [0.80, 0.82, 0.81], 100.0), _point("b", [0.90, 0.91, 0.92], 10_000.0)]
    searched = _point(SEARCH := "search", [0.88, 0.87, 0.89], 1000.0)
    d = at_equal_cost(searched, fam, "params")
    # 1000 is halfway between 100 and 10000 in log: the family's mean is the mean of its two means
    expected_base = (np.mean([0.80, 0.82, 0.81]) + np.mean([0.90, 0.91, 0.92])) / 2
    assert d["baseline_acc"] == pytest.approx(expected_base)
    assert d["delta"] == pytest.approx(0.88 - expected_base)
    # at a family point itself, the interval is Welch's two-sample one (the oracle: scipy)
    at_point = at_equal_cost(_point(SEARCH, [0.88, 0.87, 0.89], 100.0), fam, "params")
    ref = stats.ttest_ind([0.88, 0.87, 0.89], [0.80, 0.82, 0.81], equal_var=False).confidence_interval(0.95)
    assert (at_point["lo"], at_point["hi"]) == pytest.approx((ref.low, ref.high))
    # never extrapolated
    assert at_equal_cost(_point(SEARCH, [0.9, 0.9], 50.0), fam, "params") is None
    assert at_equal_cost(_point(SEARCH, [0.9, 0.9], 20_000.0), fam, "params") is None


def test_paired_difference_is_scipys_paired_t_interval_at_the_same_seeds():
    fam = [_point("b", [0.80, 0.82, 0.81, 0.83], 100.0), _point("b", [0.90, 0.91, 0.92, 0.90], 10_000.0)]
    searched = _point("search", [0.87, 0.88, 0.86], 1000.0)  # seeds 0-2: seed 3 has no pair
    d = at_equal_cost(searched, fam, "params")
    base = [(x + y) / 2 for x, y in zip([0.80, 0.82, 0.81], [0.90, 0.91, 0.92])]  # halfway in log(cost)
    ref = stats.ttest_rel([0.87, 0.88, 0.86], base).confidence_interval(0.95)
    assert d["pairs"] == 3
    assert d["paired"] == pytest.approx(np.mean(np.subtract([0.87, 0.88, 0.86], base)))
    assert (d["plo"], d["phi"]) == pytest.approx((ref.low, ref.high))
    # pairing removes what the seeds share: the same shift per seed gives a zero-width interval
    shifted = _point("search", [a + 0.01 for a in [0.80, 0.82, 0.81, 0.83]], 100.0)
    d = at_equal_cost(shifted, fam, "params")
    assert (d["plo"], d["phi"]) == pytest.approx((0.01, 0.01)) and d["verdict"] == "wins"
    assert d["lo"] < 0 < d["hi"]  # while Welch's interval cannot tell it from 0
    assert paired_interval([0.01])[1:] == (pytest.approx(math.nan, nan_ok=True),) * 2


def test_verdicts_name_wins_loses_and_no_verdict():
    assert verdict(0.001, 0.01) == "wins"
    assert verdict(-0.01, -0.001) == "loses"
    assert verdict(-0.01, 0.01) == "no verdict"
    assert verdict(math.nan, math.nan) == "no verdict"


@pytest.mark.parametrize(("sd", "n"), [(0.004, 3), (0.004, 5), (0.01, 10)])
def test_detectable_difference_has_80_percent_power_by_simulation(sd, n):
    """At the returned difference, a paired t test at 5% rejects in 80% of simulated studies."""
    mdd = detectable_difference(sd, n)
    rng = np.random.default_rng(0)
    diffs = rng.normal(mdd, sd, size=(40_000, n))
    p = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
    assert float(np.mean(p < 0.05)) == pytest.approx(0.80, abs=0.01)
    assert detectable_difference(sd, 2 * n) < mdd  # more seeds, smaller differences visible
    assert math.isnan(detectable_difference(sd, 1)) and detectable_difference(0.0, 3) == 0.0


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (2.0, 0.65), (0.5, 0.4), (4.0, 0.9)]
    assert pareto_front(pts) == [0, 1, 4, 5]
    assert pareto_front([(1.0, math.nan)]) == []


# -- running ---------------------------------------------------------------------------------------------
def test_a_tiny_study_runs_on_the_local_engine_and_its_report_is_the_trials_figures(tmp_path):
    spec = tiny_spec(tmp_path, grid={"fisher.target_fraction": [0.7]}, search_cost={"seeds": [0]})
    lines: list[str] = []
    study = run_study(spec, jobs=2, out=lines.append, **roots(tmp_path))
    records = {r["id"]: r for r in study.records()}
    assert len(records) == 5 and all(r["status"] == "done" for r in records.values())
    assert lines[-1].startswith("[tiny] done 5 / running 0 / left 0 (failed 0)")
    assert any("ETA 00:" in ln for ln in lines)
    # records hold the trials' own summaries, and each trial ran with its seed and point
    for t in spec.trials():
        s = json.loads((study.runs / t.id / "summary.json").read_text())
        assert records[t.id]["summary"] == s and s["seed"] == t.seed
        assert s["wall_s"]["fit"] > 0 and s["wall_s"]["test"] > 0
    # the found-network trials trained what their searches found, without searching
    for p in spec.search_points():
        found = records[f"found/{point_id(p)}/seed0"]["summary"]
        searched = records[f"search/{point_id(p)}/seed0"]["summary"]
        assert found["arch"] == searched["arch"] and found["wall_s"]["search"] == 0.0
    check_report_matches(study, tmp_path)
    points, failed = collect(study)
    assert not failed and all(p.n == 2 for p in points if p.family != "found")
    md = (tmp_path / "report" / "tiny.md").read_text()
    assert len(re.findall(r"\| \d+\.\d\dx; \d+\.\d\dx \|", md)) == 1  # search cost, wall; CPU


def test_a_failing_trial_is_recorded_and_the_others_go_on(tmp_path):
    # lr 1e12 passes every check but the loss is not finite after a step: train.py exits 1
    spec = tiny_spec(tmp_path, grid={"model.init_args.optimizer.lr": [0.05, 1.0e12]}, seeds=[0], baselines={})
    study = run_study(spec, jobs=2, out=lambda _: None, **roots(tmp_path))
    by_point = {r["point"]["model.init_args.optimizer.lr"]: r for r in study.records()}
    assert by_point[0.05]["status"] == "done"
    bad = by_point[1.0e12]
    assert bad["status"] == "failed" and "exit status 1" in bad["error"] and "finite" in bad["error"]
    write_report(spec, study, tmp_path / "report", wandb=False)
    assert "Failed trials" in (tmp_path / "report" / "tiny.md").read_text()
    # a rerun does not retry it unless asked
    again = run_study(spec, out=lambda _: None, **roots(tmp_path))
    assert {r["id"]: r for r in again.records()} == {r["id"]: r for r in study.records()}


def test_the_report_takes_the_latency_of_a_retimed_run_for_the_trials_it_names(tmp_path):
    spec = tiny_spec(tmp_path, grid={"fisher.target_fraction": [0.7]}, baselines={})
    study = Study(spec, tmp_path / "results", tmp_path / "runs")
    device = {"exits": {"fp32": {"3": {"latency_ms": 9.0}}}}  # measured under load
    for t, acc in zip(spec.trials(), (0.8, 0.9), strict=True):
        summary = {**dict.fromkeys(Summary.__required_keys__), "version": SUMMARY_VERSION}
        summary.update(test_acc={"3": acc}, mflops={"3": 2.0}, params=10, device=device, wall_s={"fit": 1.0})
        study.save(
            t,
            {
                "id": t.id,
                "family": t.family,
                "point": t.point,
                "seed": t.seed,
                "status": "done",
                "summary": summary,
            },
        )
    (points,), _ = collect(study)
    assert points.costs["latency_ms"] == [9.0, 9.0]  # no retimed.json: DeviceBench's figures
    first, second = spec.trials()
    again = {"runner": "local", "settings": "5 runs x 1 passes", "machine": "x86_64"}
    again["trials"] = {first.id: {"fp32": 1.0, "int8": 2.0}, second.id: {"fp32": 3.0, "int8": 4.0}}
    (study.results.parent / "retimed.json").write_text(json.dumps(again))
    (points,), _ = collect(study)
    assert points.costs["latency_ms"] == [1.0, 3.0] and points.mean("latency_ms") == 2.0
    md = (write_report(spec, study, tmp_path / "report")[1]).read_text()
    assert "2 trials' networks retimed in one shuffled run" in md and "| 2.000 ± 1.414 |" in md


def test_costs_cover_the_summary_fields():
    s = {
        "mflops": {"0": 1.0, "3": 4.0},
        "params": 100,
        "nonzero_params": 40,
        "device": {"exits": {"fp32": {"3": {"latency_ms": 2.5}}}},
        "lut_latency_ms": None,
    }
    assert [COSTS[c][1](s) for c in ("params", "mflops", "latency_ms")] == [40, 4.0, 2.5]
    s.update(nonzero_params=None, device=None, lut_latency_ms={"0": 1.0, "3": 3.0})
    assert [COSTS[c][1](s) for c in ("params", "mflops", "latency_ms")] == [100, 4.0, 3.0]


COMMITTED = sorted(p.stem for p in (ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("name", COMMITTED)
def test_a_committed_report_regenerates_byte_identical_from_its_records(tmp_path, name):
    spec = StudySpec.load(ROOT / "studies" / f"{name}.yaml")
    study = Study(spec, ROOT / "studies" / "results", tmp_path / "runs")
    written = write_report(spec, study, tmp_path / name, wandb=False)
    assert written, f"{name}: no report written"
    for path in written:
        committed = ROOT / "studies" / "results" / name / Path(path).name
        assert committed.is_file(), f"{committed} is not committed (make reports)"
        assert Path(path).read_bytes() == committed.read_bytes(), f"{committed} is stale: run make reports"
