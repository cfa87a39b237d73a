import pytest
import torch

from lit_nas import ArchSpec, CellSpec, DataShape, NetConfig, build_net
from lit_nas.arch import SPEC_VERSION


def test_default_recipe_matches_thesis_layout():
    spec = NetConfig().build_spec(DataShape(3, 32, 10))
    # 9 residual cells at 3 resolutions, 4 blocks ending at ~30/60/80/100% depth
    assert spec.num_cells == 9
    assert spec.block_cells == [3, 2, 2, 2]
    assert spec.exits == [True] * 4
    assert spec.feature_sizes() == [32, 32, 32, 32, 16, 16, 16, 8, 8, 8]
    assert [c.projection for c in spec.cells] == [False, False, False, True, False, False, True, False, False]
    baseline = NetConfig(exits=False).build_spec(DataShape(3, 32, 10))
    assert baseline.exits == [False, False, False, True]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    spec = NetConfig(dense=True).build_spec(DataShape(1, 28, 10))
    spec.cells[4].mid = 7
    path = spec.save(tmp_path / f"spec{suffix}")
    again = ArchSpec.load(path)
    assert again == spec
    assert ArchSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            dict(kind="vgg"),
            "unknown network kind 'vgg'; valid choices: ['mnasnet', 'mobilenet_v1', 'mobilenet_v2', "
            "'resnet_sdn', 'wide_resnet']",
        ),
        (dict(block_cells=[3, 2, 2, 1]), "sum to 8 but there are 9 cells"),
        (dict(block_cells=[3, 0, 4, 2]), "every block needs at least one cell"),
        (dict(exits=[True, True, True]), "exits has 3 entries; expected one per block (4)"),
        (dict(exits=[True, True, True, False]), "must be enabled"),
        (dict(active_blocks=5), "active_blocks must be in 1..4; got 5"),
        (
            dict(exits=[True, False, True, True], active_blocks=2),
            "block 1 is the last active block but has no exit",
        ),
        (dict(stem_width=0), "stem_width must be >= 1"),
        (dict(version=SPEC_VERSION + 1), "not supported"),
    ],
)
def test_invalid_specs_name_the_problem(change, message):
    data = NetConfig().build_spec(DataShape(3, 32, 10)).to_dict()
    data.update(change)
    with pytest.raises(ValueError) as err:
        build_net(ArchSpec.from_dict(data))  # the kind is build_net's to check, the rest ArchSpec's
    assert message in str(err.value)


def test_identity_shortcut_must_fit():
    data = NetConfig().build_spec(DataShape(3, 32, 10)).to_dict()
    data["cells"][1] = dict(mid=16, out=20, stride=1, projection=False)
    with pytest.raises(ValueError, match="identity shortcut needs stride 1 and out == input width"):
        ArchSpec.from_dict(data)


def test_unknown_and_missing_keys():
    data = NetConfig().build_spec(DataShape(3, 32, 10)).to_dict()
    with pytest.raises(ValueError, match=r"unknown ArchSpec keys \['widht'\]"):
        ArchSpec.from_dict({**data, "widht": 3})
    del data["cells"]
    with pytest.raises(ValueError, match=r"missing keys \['cells'\]"):
        ArchSpec.from_dict(data)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stage_widths=[16, 32], cells_per_stage=[3, 3, 3]), "must have the same length"),
        (dict(stage_widths=[16, 0, 64]), "stage_widths must be positive"),
        (dict(exit_depths=[0.6, 0.3, 1.0]), "exit_depths must increase strictly"),
        (dict(exit_depths=[0.3, 0.6]), "end at 1.0"),
        (dict(kind="wide_resnet"), "wide_resnet needs depth and widen_factor"),
        (dict(depth=40), r"depth and widen_factor come together .*got depth=40, widen_factor=None"),
        (dict(depth=12, widen_factor=2), r"6n \+ 4 .*got 12"),
        (dict(depth=16, widen_factor=0), "widen_factor must be >= 1; got 0"),
        (dict(se_reduction=-1), "se_reduction must be >= 0"),
    ],
)
def test_invalid_recipes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetConfig(**kwargs)


def test_wrn_recipe_expands_to_the_published_layout():
    """WRN-40-2 on CIFAR-10: 18 cells, three stages of 32/64/128 channels, 2.2M parameters (Crowley 2018)."""
    from lit_nas import build_net

    spec = NetConfig(kind="wide_resnet", depth=40, widen_factor=2, exits=False).build_spec(
        DataShape(3, 32, 10)
    )
    assert spec.stem_width == 16 and spec.num_cells == 18
    assert [c.out for c in spec.cells] == [32] * 6 + [64] * 6 + [128] * 6
    assert [i for i, c in enumerate(spec.cells) if c.projection] == [0, 6, 12]
    assert spec.exits == [False, False, False, True]
    params = sum(p.numel() for p in build_net(spec).parameters())
    assert 2.2e6 < params < 2.3e6
    se = NetConfig(kind="wide_resnet", depth=16, widen_factor=1, se_reduction=4).build_spec(
        DataShape(3, 32, 10)
    )
    assert [c.se for c in se.cells] == [4, 4, 8, 8, 16, 16]
    assert ArchSpec.from_dict(se.to_dict()) == se


def test_recipe_rejects_two_exits_on_one_cell():
    with pytest.raises(ValueError, match="two exits after the same cell"):
        NetConfig(cells_per_stage=[1, 1, 1], exit_depths=[0.3, 0.4, 0.8, 1.0]).build_spec(
            DataShape(3, 32, 10)
        )


def test_pruned_cell_keeps_projection_even_if_widths_match():
    spec = NetConfig().build_spec(DataShape(3, 32, 10))
    spec.cells[3] = CellSpec(mid=16, out=16, stride=2, projection=True)
    spec.cells[4].out = spec.cells[5].out = 16  # stream shrunk by pruning
    spec.cells[6] = CellSpec(mid=64, out=64, stride=2, projection=True)
    net = build_net(ArchSpec.from_dict(spec.to_dict()))
    assert net.blocks[1].cells[0].shortcut[0].weight.shape == (16, 16, 1, 1)
    assert net(torch.zeros(2, 3, 32, 32)).final.shape == (2, 10)
