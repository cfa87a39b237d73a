"""Latency look-up tables: the layers of a spec, the grids, interpolation, smoothing, the predictor, and
FisherPruning with the latency cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from callbacks import FisherPruning, GarbageCollection
from device_bench.export import find_export_python
from device_bench.lut import (
    LatencyLUT,
    Layer,
    TableSpec,
    channel_latency,
    fit_scale,
    from_measurements,
    grid,
    measure_lut,
    pearson_mape,
    plan_tables,
    pruned_variants,
    smooth,
    spec_layers,
    validate_lut,
)
from device_bench.runners import BenchSettings, LocalRunner
from lit_nas import DataShape, MultiExitModule, NetConfig, build_net
from tests.helpers import TINY, tiny_data, tiny_trainer

SHAPE = DataShape(3, 16, 10)


def tiny_spec(**kw):
    return NetConfig(**{**TINY, **kw}).build_spec(SHAPE)


def flops_like_lut(spec, channels=(2, 4, 8, 16)) -> LatencyLUT:
    """A LUT whose entries are a known function of the layer: 1e-4 * res^2 * cin * cout (or cin)."""
    tables = plan_tables([spec], channels)
    ms = {}
    for key, t in tables.items():
        res = t.config["res"]
        ms[key] = np.array([[1e-4 * res * res * ci * max(co, 1) for co in t.cout] for ci in t.cin])
    return from_measurements(tables, {k: v + 0.01 for k, v in ms.items()}, overhead_ms=0.01, sigma=0.0)


def test_spec_layers_lists_every_conv_addition_and_the_asked_heads():
    spec = tiny_spec()
    layers = spec_layers(spec)
    convs = [layer for layer in layers if layer.key.startswith("conv")]
    n_proj = sum(c.projection for c in spec.cells)
    assert len(convs) == 1 + 2 * spec.num_cells + n_proj  # stem, two per cell, projections
    assert sum(layer.key.startswith("add") for layer in layers) == spec.num_cells
    heads = [layer for layer in layers if layer.key.startswith("head")]
    assert len(heads) == len(spec.exit_blocks())
    assert layers[0] == Layer("conv3_s1_r16_relu", 3, 4, layers[0].config)  # the stem reads the image
    # up to the first exit: the first block and its head only
    first = spec_layers(spec, [0])
    assert len([x for x in first if x.key.startswith("head")]) == 1 and len(first) < len(layers)
    with pytest.raises(ValueError, match="valid choices"):
        spec_layers(spec, [7])


def test_tables_cover_the_widest_layer_and_the_image_input():
    spec = tiny_spec()
    assert grid(12, (4, 8, 16)) == [4, 8, 12]
    tables = plan_tables([spec], (2, 4, 8))
    for layer in spec_layers(spec):
        t = tables[layer.key]
        assert layer.cin in t.cin or t.cin[0] <= layer.cin <= t.cin[-1]
        assert t.cin[-1] >= layer.cin and t.cout[-1] >= layer.cout
    stem = spec_layers(spec)[0]
    assert 3 in tables[stem.key].cin  # the image's channels are a grid point


def test_lookup_is_exact_on_the_grid_and_bilinear_between():
    t = TableSpec("conv3_s1_r8", {"op": "conv", "res": 8}, [2, 4], [2, 6])
    raw = np.array([[1.0, 3.0], [5.0, 11.0]])
    lut = from_measurements({t.key: t}, {t.key: raw + 0.5}, overhead_ms=0.5, sigma=0.0)
    assert lut.layer_ms(Layer(t.key, 2, 2)) == pytest.approx(1.0)  # overhead subtracted
    assert lut.layer_ms(Layer(t.key, 4, 6)) == pytest.approx(11.0)
    # halfway on both axes: the mean of the four corners
    assert lut.layer_ms(Layer(t.key, 3, 4)) == pytest.approx((1 + 3 + 5 + 11) / 4)
    with pytest.raises(KeyError, match="outside the table"):
        lut.layer_ms(Layer(t.key, 8, 2))
    with pytest.raises(KeyError, match="no entry"):
        lut.layer_ms(Layer("conv9_s1_r8", 2, 2))


def test_gaussian_smoothing_flattens_a_spike_and_keeps_a_plane():
    plane = np.add.outer(np.arange(5.0), np.arange(6.0))
    spiky = plane.copy()
    spiky[2, 3] += 10
    assert np.abs(smooth(spiky, 1.0) - plane).max() < 10 * 0.2
    np.testing.assert_allclose(smooth(plane, 0.0), plane)
    col = np.arange(6.0)[:, None]
    assert smooth(col, 1.0).shape == col.shape  # a 1-D table is smoothed along its one axis only


def test_prediction_is_the_overhead_plus_the_sum_of_the_layers(tmp_path):
    spec = tiny_spec()
    lut = flops_like_lut(spec)
    expected = 0.01 + sum(
        1e-4 * dict(layer.config)["res"] ** 2 * layer.cin * max(layer.cout, 1) for layer in spec_layers(spec)
    )
    assert lut.predict(spec) == pytest.approx(expected)
    loaded = LatencyLUT.load(lut.save(tmp_path / "lut.json"))
    assert loaded.predict(spec) == pytest.approx(expected)
    assert loaded.predict(spec, [0]) < loaded.predict(spec)


def test_channel_latency_is_the_predicted_saving_of_one_channel():
    spec = tiny_spec()
    net = build_net(spec)
    lut = flops_like_lut(spec)
    costs = channel_latency(lut, net)
    assert set(costs) == {g.name for g in net.channel_groups()}
    for g in net.channel_groups():
        if g.size > 1:
            smaller = lut.predict(net.resized_spec(g.name, g.size - 1))
            assert costs[g.name] == pytest.approx(lut.predict(spec) - smaller)
            assert costs[g.name] > 0
        else:
            assert math.isinf(costs[g.name])


def test_pruned_variants_are_narrower_and_valid():
    spec = NetConfig(kind="wide_resnet", depth=10, widen_factor=2, exit_depths=[1.0]).build_spec(SHAPE)
    variants = pruned_variants(spec, 5, seed=0)
    assert len({str(v.to_dict()) for v in variants}) == 5
    for v in variants:
        assert all(a.mid <= b.mid and a.out <= b.out for a, b in zip(v.cells, spec.cells))
        build_net(v)  # buildable


def test_scale_is_the_least_squares_factor_through_the_overhead():
    spec = tiny_spec()
    lut = flops_like_lut(spec)
    variants = pruned_variants(spec, 4, seed=2)
    measured = [lut.overhead_ms + 1.3 * lut.layers_ms(v) for v in variants]
    assert fit_scale(lut, variants, measured) == pytest.approx(1.3)
    lut.scale = 1.3
    assert [lut.predict(v) for v in variants] == pytest.approx(measured)


def test_smoothing_per_unit_of_work_keeps_a_proportional_table():
    work = np.outer([2.0, 4, 8], [4.0, 8, 16, 32])
    np.testing.assert_allclose(smooth(0.01 * work, 1.0, work), 0.01 * work)
    assert smooth(0.01 * work, 1.0)[-1, -1] < 0.01 * work[-1, -1]  # plain smoothing lowers the widest corner


def test_pearson_and_mape():
    r, mape = pearson_mape([1.0, 2.0, 3.0], [1.0, 2.0, 3.3])
    assert r == pytest.approx(np.corrcoef([1, 2, 3], [1, 2, 3.3])[0, 1])
    assert mape == pytest.approx(100 * (0.3 / 3.3) / 3)


def test_spec_layers_of_the_mobile_cells_are_depthwise_and_pointwise():
    v1 = NetConfig(kind="mobilenet_v1", **TINY).build_spec(SHAPE)
    layers = spec_layers(v1)
    cells = [x for x in layers if not x.key.startswith(("head", "conv3"))]
    assert len(cells) == 2 * v1.num_cells  # depthwise + pointwise, no shortcut
    assert [x.key.split("_")[0] for x in cells[:2]] == ["dw3", "conv1"] and cells[0].cout == 0
    assert all(x.key.endswith("_relu6") for x in cells)
    mnas = NetConfig(kind="mnasnet", **TINY).build_spec(SHAPE)
    keys = [x.key for x in spec_layers(mnas)]
    assert any(k.startswith("dw5_") for k in keys) and any(k.startswith("dw3_") for k in keys)
    assert sum(k.startswith("addlin_") for k in keys) == sum(c.residual for c in mnas.cells)
    # expand (ReLU6) and project (linear) per cell
    assert sum(k.startswith("conv1_") for k in keys) == 2 * mnas.num_cells


MEASURED = {
    "resnet_sdn": NetConfig(stage_widths=[4, 8], cells_per_stage=[1, 1], exit_depths=[1.0]),
    # depthwise 5x5 and 3x3 (stride 1 and 2), pointwise with and without ReLU6, the linear addition
    "mnasnet": NetConfig(kind="mnasnet", stage_widths=[4, 8], cells_per_stage=[2, 2], exit_depths=[1.0]),
    # Squeeze-and-Excitation, the dense concatenation and the pooling of its larger sources
    "dense_se": NetConfig(
        stage_widths=[4, 8], cells_per_stage=[1, 2], exit_depths=[1.0], dense=True, se_reduction=2
    ),
}


@pytest.mark.skipif(find_export_python() is None, reason="no TensorFlow environment (make export-env)")
def test_measured_tables_through_the_local_runner(tmp_path):
    """The whole path on a small grid, both families in one run: one-layer models, timing, tables,
    prediction, validation (one export and one timing run keep it short)."""
    specs = [cfg.build_spec(DataShape(1, 8, 10)) for cfg in MEASURED.values()]
    settings = BenchSettings(runs=5, passes=1, warmup_s=0.0)
    lut = measure_lut(
        specs, tmp_path / "lut", LocalRunner(), settings, channels=(2, 4), sigma=1.0, calibration=2
    )
    assert set(lut.tables) == set(plan_tables(specs, (2, 4)))
    assert any(k.startswith("dw5_") for k in lut.tables) and any(k.startswith("conv3_") for k in lut.tables)
    for kind in ("se_r", "concat_r", "avgpool2_r"):  # the kinds the tables used to miss
        assert any(k.startswith(kind) for k in lut.tables), kind
    assert lut.scale > 0 and lut.scale != 1.0  # fitted on the two calibration networks
    assert lut.device["machine"] and lut.settings["runs"] == 5
    for t in lut.tables.values():
        assert np.all(np.asarray(t["raw_ms"]) >= 0)
    assert all(lut.predict(spec) > lut.overhead_ms for spec in specs)
    variants = [v for spec in specs[:2] for v in pruned_variants(spec, 2, seed=1)]
    res = validate_lut(lut, variants, tmp_path / "val", LocalRunner(), settings)
    assert len(res["measured_ms"]) == 4 and all(m > 0 for m in res["measured_ms"])
    pred, meas = res["predicted_ms"], res["measured_ms"]
    assert pred == [lut.predict(v) for v in variants]
    # the figures are those of the predictions and measurements (independent oracles: scipy, a plain sum)
    assert res["r"] == pytest.approx(stats.pearsonr(pred, meas).statistic, abs=1e-9)
    assert res["mape"] == pytest.approx(100 * sum(abs(p - m) / m for p, m in zip(pred, meas)) / len(meas))


# -- FisherPruning with the latency cost -----------------------------------------------------------------
def test_fisher_prunes_to_a_latency_target_with_the_latency_cost(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data()
    module = MultiExitModule(net=NetConfig(**TINY), data_shape=dm.data_shape)
    path = flops_like_lut(module.arch_spec).save(tmp_path / "lut.json")
    lut = LatencyLUT.load(path)
    start = lut.predict(module.arch_spec)
    fisher = FisherPruning(
        every_n_steps=1, cost="latency", stop_at="latency", target_fraction=0.8, lut=str(path)
    )
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[fisher, GarbageCollection(after_prune=True)])
    trainer.fit(module, datamodule=dm)
    assert fisher.done
    end = lut.predict(module.arch_spec)  # collected after every prune: the spec is the pruned network
    assert end <= 0.8 * start < fisher.history[-2][2]  # stopped at the first event that met the target
    values = [v for _, _, v in fisher.history]
    assert values == sorted(values, reverse=True)


def test_fisher_latency_needs_a_lut_that_covers_the_network(tmp_path):
    with pytest.raises(ValueError, match="FisherPruning cost: latency needs lut"):
        FisherPruning(cost="latency", target_fraction=0.5)
    with pytest.raises(ValueError, match="does not exist"):
        FisherPruning(stop_at="latency", target_fraction=0.5, lut=str(tmp_path / "missing.json"))
    small = flops_like_lut(NetConfig(stage_widths=[2, 2, 2], cells_per_stage=[1, 1, 2]).build_spec(SHAPE))
    fisher = FisherPruning(cost="latency", target_fraction=0.5, lut=str(small.save(tmp_path / "lut.json")))
    module = MultiExitModule(net=NetConfig(**TINY), data_shape=SHAPE)
    with pytest.raises(ValueError, match="do not cover this network"):
        fisher.setup(tiny_trainer(tmp_path), module, "fit")
