"""Reading YAML files that come from elsewhere (configs, architectures, study specs) with bounded cost.

YAML's anchors and aliases let 1 kB of text stand for billions of nodes (the "billion laughs"); PyYAML
builds them as shared references, but whatever walks the result later (jsonargparse, a deep copy, a dump)
expands them, for minutes and gigabytes. :func:`load_yaml` measures the expanded size on the composed
node graph before anything is built, and refuses files over a bound, or with aliases at all where the
format never needs them (architecture files). Its messages name the file and where in it, and never echo
the file's text (it may not be YAML, or not meant to be shown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: the most nodes a file may expand into (every shipped config has under 1,000)
MAX_NODES = 100_000


class YamlFileError(ValueError):
    """A YAML file that cannot be read, or that expands too far; the message names the file."""


def load_yaml(
    path: str | Path, what: str = "YAML file", aliases: bool = True, max_nodes: int = MAX_NODES
) -> Any:
    """The contents of the YAML file ``path``, read with :class:`yaml.SafeLoader` and bounded.

    Args:
        path: the file.
        what: what the file is, for messages (``"config"``, ``"architecture file"``).
        aliases: whether aliases (``*name``) may be used at all.
        max_nodes: the most nodes the document may expand into, aliases expanded.

    Raises:
        YamlFileError: the file is missing, not UTF-8 text, not YAML, uses aliases where refused, or
            expands past ``max_nodes``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlFileError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise YamlFileError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as err:
        raise YamlFileError(f"{what} {path} is not a text file (not UTF-8 at byte {err.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, path, what, aliases, max_nodes)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise YamlFileError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, path: Path, what: str, aliases: bool, max_nodes: int) -> None:
    """Refuse a node graph that expands past ``max_nodes`` (or shares a node, when aliases are refused)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            if not aliases:
                raise YamlFileError(f"{what} {path} uses an alias (*name), which this kind of file may not")
            return sizes[key]
        if key in open_:
            raise YamlFileError(f"{what} {path} has an alias that refers to itself")
        open_.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > max_nodes:
                raise YamlFileError(
                    f"{what} {path} expands into more than {max_nodes} nodes (anchors and aliases "
                    "repeated); write it out, or split it"
                )
        open_.discard(key)
        sizes[key] = total
        return total

    size(root)
