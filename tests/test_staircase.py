"""The channel staircase: step detection, aligned tables that predict a staircase exactly, the layers the
tables used to miss (SE, dense concatenation and pooling), and the load guard."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from device_bench.export import find_export_python
from device_bench.lut import TableSpec, from_measurements, grid, lut_from_report, plan_tables
from device_bench.runners import BenchReport
from device_bench.staircase import (
    DEFAULT_SWEEPS,
    Sweep,
    detect,
    family_steps,
    plan_sweeps,
    spec_sweeps,
    steps_of,
)
from lit_nas import DataShape, NetConfig
from lit_nas.align import align_up
from lit_nas.arch import ArchSpec
from lit_nas.latency import (
    LatencyLUT,
    Layer,
    NoisyTableError,
    channel_latency,
    detect_step,
    spec_layers,
    table_point,
)
from lit_nas.nets import build_net
from tests.helpers import TINY

SHAPE = DataShape(3, 16, 10)


def stairs(step: int, a: float = 0.05, b: float = 0.02):
    return lambda c: a + b * math.ceil(c / step)


# -- detecting the step -----------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [8, 4, 16, 1])
def test_the_detector_finds_the_step_of_a_synthetic_staircase(step):
    c = list(range(1, 65))
    assert detect_step(c, [stairs(step)(x) for x in c]) == step


def test_the_detector_sees_through_noise_and_a_line_has_no_step():
    rng = np.random.default_rng(0)
    c = list(range(1, 65))
    noisy = [stairs(8)(x) * (1 + 0.01 * rng.standard_normal()) for x in c]
    assert detect_step(c, noisy) == 8
    line = [0.05 + 0.003 * x * (1 + 0.01 * rng.standard_normal()) for x in c]
    assert detect_step(c, line) == 1
    # a depthwise-like kernel: tiles of 8 with a 4-wide remainder tile is a staircase of 4
    dw = [0.01 + 0.02 * (x // 8) + (0.012 if 0 < x % 8 <= 4 else 0.02 if x % 8 else 0) for x in c]
    assert detect_step(c, dw) == 4
    with pytest.raises(ValueError, match=">= 4 measured"):
        detect_step([1, 2], [0.1, 0.2])


def test_sweeps_cover_both_axes_and_the_steps_combine_per_family():
    sweeps = plan_sweeps(DEFAULT_SWEEPS, max_channels=32, fixed=(8, 16))
    conv = [s for s in sweeps if s.name == "conv3_s1"]
    assert {(s.axis, s.fixed) for s in conv} == {("cout", 8), ("cout", 16), ("cin", 8), ("cin", 16)}
    assert all(s.channels == list(range(1, 33)) for s in conv)
    assert next(s for s in sweeps if s.name == "concat").channels == list(range(2, 65, 2))
    assert conv[0].model(5) == {**DEFAULT_SWEEPS["conv3_s1"], "cin": 8, "cout": 5}
    # stride 1 and 2 are one family: the table keeps the boundaries of both
    fake = {"conv3_s1": (8, 1), "conv3_s2": (4, 1), "dw3_s1": 4}
    for s in sweeps:
        f = fake.get(s.name, 1)
        s.ms = [stairs(f if isinstance(f, int) else f[s.axis == "cin"])(c) for c in s.channels]
        detect(s)
    steps = family_steps(sweeps)
    assert steps["conv3"] == [1, 8] and steps["dw"] == [4, 1] and steps["conv1"] == [1, 1]
    with pytest.raises(ValueError, match="max_channels"):
        plan_sweeps(DEFAULT_SWEEPS, max_channels=4)


# -- aligned tables ---------------------------------------------------------------------------------------
def test_aligned_grids_are_multiples_of_the_step():
    assert grid(20, (4, 8, 12, 16, 24, 32), 8) == [8, 16, 24]
    assert grid(200, (4, 8, 16, 64, 128, 256), 8) == [8 * i for i in range(1, 9)] + [128, 200]
    assert grid(12, (4, 8, 16), 1) == [4, 8, 12]  # no tiles: the grid itself
    assert grid(12, (4, 8, 16), 0) == [4, 8, 12]  # smoothed tables: as before
    assert align_up(9, 8) == 16 and align_up(16, 8) == 16 and align_up(1, 8) == 8


def staircase_lut(step_in: int, step_out: int, tiles_to=8):
    """An aligned table measured from f(cin, cout) = 0.01 + 1e-3 * tiles(cin) * tiles(cout)."""
    t = TableSpec(
        "conv3_s1_r8",
        {"op": "conv", "k": 3, "res": 8},
        grid(step_in * tiles_to, (), step_in),
        grid(step_out * tiles_to, (), step_out),
        step_in,
        step_out,
    )

    def f(ci, co):
        return 0.01 + 1e-3 * math.ceil(ci / step_in) * math.ceil(co / step_out)

    raw = np.array([[f(ci, co) for co in t.cout] for ci in t.cin])
    return from_measurements({t.key: t}, {t.key: raw + 0.5}, overhead_ms=0.5, sigma=1.0), f


def test_an_aligned_table_predicts_a_synthetic_staircase_exactly_at_and_between_boundaries():
    lut, f = staircase_lut(4, 8)
    assert lut.sigma == 0 and lut.aligned and lut.step == 8  # never smoothed
    for ci in range(1, 33):
        for co in range(1, 65):
            assert lut.layer_ms(Layer("conv3_s1_r8", ci, co)) == pytest.approx(f(ci, co), abs=1e-12)
    # a coarser grid above DENSE_TILES: linear in tiles between measured multiples keeps it exact
    lut, f = staircase_lut(8, 8, tiles_to=40)
    t = lut.tables["conv3_s1_r8"]
    assert len(t["cout"]) < 40  # not every multiple measured
    for ci, co in [(200, 9), (170, 250), (129, 320), (313, 1)]:
        assert lut.layer_ms(Layer("conv3_s1_r8", ci, co)) == pytest.approx(f(ci, co), abs=1e-12)


def test_smoothed_tables_miss_the_staircase_that_aligned_ones_keep():
    lut, f = staircase_lut(1, 8)
    t = TableSpec("conv3_s1_r8", {"op": "conv", "k": 3, "res": 8}, [4, 8, 16, 32], [4, 8, 16, 32, 64])
    raw = np.array([[f(ci, co) for co in t.cout] for ci in t.cin])
    smoothed = from_measurements({t.key: t}, {t.key: raw}, overhead_ms=0.0, sigma=1.0)
    assert not smoothed.aligned and smoothed.step == 1
    errs = [abs(smoothed.layer_ms(Layer(t.key, 16, co)) - f(16, co)) / f(16, co) for co in range(4, 65)]
    assert max(errs) > 0.1  # 9..15 channels interpolated between 8 and 16: cheaper than the 16 they cost
    assert table_point(lut.tables[t.key], 16, 9) == (16, 16)


def test_plan_tables_aligns_each_family_to_its_steps():
    spec = NetConfig(**{**TINY, "stage_widths": [12, 20, 36]}).build_spec(SHAPE)
    steps = {"conv3": (1, 8), "add": (4, 1)}
    tables = plan_tables([spec], (4, 8, 16), steps)
    for key, t in tables.items():
        family = "conv3" if key.startswith("conv3") else "add" if key.startswith("add") else ""
        fam_steps = steps.get(family, (1, 1))
        assert (t.cin_step, t.cout_step) == (fam_steps if t.cout != [0] else (fam_steps[0], 1))
        if t.cout != [0]:
            assert all(c % t.cout_step == 0 for c in t.cout)
    assert 3 in tables[spec_layers(spec)[0].key].cin  # the image's channels stay a grid point
    # every narrower network is covered
    lut = from_measurements(
        tables,
        {k: np.ones((len(t.cin), len(t.cout))) for k, t in tables.items()},
        overhead_ms=0.0,
        sigma=1.0,
    )
    net = build_net(spec)
    for g in net.channel_groups():
        assert lut.predict(net.resized_spec(g.name, 1)) > 0


def test_channel_latency_prices_a_step_with_aligned_tables():
    spec = NetConfig(**{**TINY, "stage_widths": [16, 16, 16]}).build_spec(SHAPE)
    tables = plan_tables([spec], (4, 8, 16), {"conv3": (1, 8)})
    ms = {}
    for k, t in tables.items():
        ms[k] = np.array([[1e-3 * align_up(ci, 8) * max(co, 1) for co in t.cout] for ci in t.cin])
    lut = from_measurements(tables, ms, overhead_ms=0.0, sigma=0.0)
    net = build_net(spec)
    one = channel_latency(lut, net)  # one channel fewer: 15 channels cost what 16 do in the conv tables
    eight = channel_latency(lut, net, step=8)
    g = net.channel_groups()[0]
    assert eight[g.name] > one[g.name]
    smaller = lut.predict(net.resized_spec(g.name, 8))
    assert eight[g.name] == pytest.approx((lut.predict(spec) - smaller) / 8)


# -- what the tables used to miss ------------------------------------------------------------------------
def test_dense_and_edge_pruned_nets_price_their_pooling_and_concatenation():
    dense = NetConfig(**{**TINY, "dense": True}).build_spec(SHAPE)
    keys = [x.key for x in spec_layers(dense)]
    assert any(k.startswith("concat_r") for k in keys) and any(k.startswith("avgpool2_r") for k in keys)
    n_concat = sum(len(dense.cell_reads(i)) > 1 for i in range(dense.num_cells))
    assert sum(k.startswith("concat_") for k in keys) == n_concat
    # the concatenation reads every live source; an edge-pruned net concatenates (and pools) fewer
    cat = [x for x in spec_layers(dense) if x.key.startswith("concat_")]
    last = dense.num_cells - 1
    assert cat[-1].cin == dense.cell_input_widths()[last]
    pruned = dense.to_dict()
    pruned["cells"][last]["reads"] = [last]  # only its predecessor: no concatenation, no pooling
    pruned = ArchSpec.from_dict(pruned)
    assert len([x for x in spec_layers(pruned) if x.key.startswith(("concat_", "avgpool"))]) < len(
        [x for x in spec_layers(dense) if x.key.startswith(("concat_", "avgpool"))]
    )
    tables = plan_tables([dense], (4, 8, 16))
    lut = from_measurements(
        tables, {k: np.full((len(t.cin), len(t.cout)), 0.1) for k, t in tables.items()}, 0.0, 0.0
    )
    assert lut.predict(pruned) < lut.predict(dense)


def test_squeeze_excitation_is_a_layer_of_its_own():
    spec = NetConfig(**TINY).build_spec(SHAPE)
    d = spec.to_dict()
    for c in d["cells"]:
        c["se"] = 2
    se_spec = ArchSpec.from_dict(d)
    se = [x for x in spec_layers(se_spec) if x.key.startswith("se_r")]
    assert len(se) == se_spec.num_cells and all(x.cout == 2 for x in se)
    assert [x.cin for x in se] == [c.out for c in se_spec.cells]


# -- the load guard --------------------------------------------------------------------------------------
def fake_report(tables, where, noise: float, busy_pass: float = 0.0, load: float = 0.1, seed: int = 0):
    """A timing report: entries ``0.05 ms * (1 + noise * |N(0, 1)|)`` per pass, the second pass slowed by
    ``busy_pass`` (the device busy during part of the run), the load averages ``load``."""
    rng = np.random.default_rng(seed)
    models = {"overhead": {"median_ms": 0.001, "mean_ms": 0.001, "per_pass_median_ms": [0.001] * 3}}
    for name in where:
        passes = [0.05 * (1 + noise * abs(rng.standard_normal())) for _ in range(3)]
        passes[1] *= 1 + busy_pass
        models[name] = {"median_ms": float(np.median(passes)), "mean_ms": float(np.mean(passes))}
        models[name]["per_pass_median_ms"] = passes
    rep = {"models": models, "threads": 1, "runs": 50, "passes": 3}
    rep["load"] = {"before": [load, load, load], "after": [load, load, load], "cpus": 2}
    return BenchReport(rep)


def test_the_load_guard_refuses_a_table_measured_with_injected_noise(tmp_path):
    from device_bench.lut import _layer_bundle

    spec = NetConfig(**TINY).build_spec(SHAPE)
    tables, where, _ = _layer_bundle([spec], tmp_path / "b", (4, 8, 16), {"conv3": (1, 8)})
    quiet = lut_from_report(tables, where, fake_report(tables, where, noise=0.02))
    assert quiet.quality["pass_spread"] < 0.05 and quiet.quality["weighted_spread"] < 0.25
    LatencyLUT.load(quiet.save(tmp_path / "quiet.json"))  # accepted
    noisy = lut_from_report(tables, where, fake_report(tables, where, noise=0.02, busy_pass=0.3))
    path = noisy.save(tmp_path / "noisy.json")
    with pytest.raises(NoisyTableError, match="measured under load: the sum of its entries moved"):
        LatencyLUT.load(path)
    assert LatencyLUT.load(path, allow_noisy=True).quality == noisy.quality  # to inspect it
    jitter = lut_from_report(tables, where, fake_report(tables, where, noise=0.6))
    with pytest.raises(NoisyTableError, match="weighted by latency"):
        LatencyLUT.load(jitter.save(tmp_path / "jitter.json"))
    busy = lut_from_report(tables, where, fake_report(tables, where, noise=0.02, load=2.5))
    with pytest.raises(NoisyTableError, match=r"load average was 2\.50 before"):
        LatencyLUT.load(busy.save(tmp_path / "busy.json"))
    data = json.loads(path.read_text())
    data["quality"] = {"pass_spread": 0.0}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="quality must be empty or hold"):
        LatencyLUT.load(tmp_path / "bad.json")


def test_spec_sweeps_name_one_config_per_family():
    mb = NetConfig(kind="mobilenet_v2", stage_widths=[8, 16], cells_per_stage=[1, 2], exit_depths=[1.0])
    fams = spec_sweeps([mb.build_spec(SHAPE)])
    assert set(fams) >= {"conv3", "conv1", "dw", "head"}
    assert steps_of({"steps": {"conv3": [1, 8]}}) == {"conv3": (1, 8)}
    assert isinstance(Sweep("x", fams["conv1"], "cin", 8, [1, 2]).model(2), dict)


# -- the commands, end to end on this machine -------------------------------------------------------------
@pytest.mark.skipif(find_export_python() is None, reason="no TensorFlow environment (make export-env)")
def test_the_staircase_and_lut_commands_measure_detect_and_align(tmp_path, capsys):
    from device_bench.__main__ import main

    spec = NetConfig(stage_widths=[4, 8], cells_per_stage=[1, 1], exit_depths=[1.0]).build_spec(SHAPE)
    arch = tmp_path / "arch.yaml"
    spec.save(arch)
    timing = ["--runs", "3", "--passes", "2", "--warmup-s", "0"]
    record = tmp_path / "staircase.json"
    args = ["staircase", "--arch", str(arch), "--max-channels", "8", "--fixed", "4", "--out", str(record)]
    assert main([*args, "--plot", str(tmp_path / "s.png"), *timing]) == 0
    printed = capsys.readouterr().out
    assert "steps (cin x cout) per family" in printed and (tmp_path / "s.png").stat().st_size > 0
    data = json.loads(record.read_text())
    assert set(data["steps"]) == {"conv3", "conv1", "add", "head"}  # this net's families only
    assert all(len(s["ms"]) == len(s["channels"]) == 8 and s["step"] >= 1 for s in data["sweeps"])
    assert data["load"]["cpus"] >= 1 and data["device"]["machine"]
    out = tmp_path / "lut.json"
    lut_args = [
        "lut",
        "--arch",
        str(arch),
        "--staircase",
        str(record),
        "--calibration",
        "0",
        "--out",
        str(out),
    ]
    assert main([*lut_args, *timing]) == 0
    lut = LatencyLUT.load(out, allow_noisy=True)  # a 3-run functional table: its spread is not the point
    assert lut.aligned and lut.sigma == 0 and lut.quality["cpus"] >= 1
    for key, t in lut.tables.items():
        fam = data["steps"][key.split("_")[0] if not key.startswith("head") else "head"]
        assert (t["cin_step"], t["cout_step"]) == (fam[0], fam[1] if t["cout"] != [0] else 1)
    assert lut.predict(spec) > lut.overhead_ms
