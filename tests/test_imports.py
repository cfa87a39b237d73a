"""The import graph: the core imports nothing above it, device_bench neither CLI nor studies, no circle.

Imports are read from the source (``ast``), those inside functions included: a late import is still a
dependency, and it is where a layering break usually hides.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the layers, by the top-level module names that belong to them
LAYERS = {
    "lit_nas": "core",
    "device_bench": "device_bench",
    "callbacks": "callbacks",
    "lit_nas_cli": "cli",
    "train": "cli",
    "lit_nas_study": "study",
    "study": "study",
}
#: what each layer must not import
FORBIDDEN = {
    "core": {"callbacks", "device_bench", "cli", "study"},
    "device_bench": {"cli", "study"},
    "callbacks": {"cli", "study"},
}


def layer_of(path: Path) -> str | None:
    return LAYERS.get(path.relative_to(ROOT).parts[0].removesuffix(".py"))


def imported_layers(path: Path) -> dict[str, int]:
    """Each layer ``path`` imports, with the first line that does."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            layer = LAYERS.get(name.split(".")[0])
            if layer is not None:
                found.setdefault(layer, node.lineno)
    return found


def sources() -> list[Path]:
    tops = [ROOT / name for name in LAYERS]
    files = [p for top in tops for p in ([top] if top.is_dir() else [top.with_suffix(".py")])]
    return sorted(f for p in files if p.exists() for f in ([p] if p.is_file() else p.rglob("*.py")))


def layer_graph() -> dict[str, dict[str, str]]:
    """``{layer: {imported layer: "file:line"}}`` over every source file."""
    graph: dict[str, dict[str, str]] = {}
    for path in sources():
        own = layer_of(path)
        for layer, line in imported_layers(path).items():
            if layer != own:
                graph.setdefault(own, {}).setdefault(layer, f"{path.relative_to(ROOT)}:{line}")
    return graph


def test_the_sources_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in sources()}
    assert {"lit_nas/module.py", "callbacks/snip.py", "device_bench/export.py", "lit_nas_cli.py"} <= names
    assert {"lit_nas_study/spec.py", "study.py", "train.py"} <= names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    bad = {k: v for k, v in layer_graph().get(layer, {}).items() if k in FORBIDDEN[layer]}
    assert not bad, f"{layer} imports {bad}"


def test_the_layers_form_no_circle():
    graph = {k: set(v) for k, v in layer_graph().items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join([*trail, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_check_sees_a_late_import(tmp_path):
    # negative control: an import inside a function is found
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from callbacks import NAMED_CALLBACKS\n    import lit_nas_cli\n")
    assert imported_layers(source) == {"callbacks": 2, "cli": 3}
