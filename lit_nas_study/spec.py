"""A study spec (``studies/NAME.yaml``) and the trials it expands into.

A study is a base config, a grid of overrides searched over, seeds, and baseline families: the same recipe
without the search callbacks, over width multipliers and/or any grid of keys. Every trial is one
``train.py fit`` with its own run directory, identified by a stable id (``family/point/seed``), so a study
that is run again knows which trials are done.

Example::

    config: dense_iterative_fast.yaml        # a name under configs/, or a path
    overrides: {trainer.max_epochs: 10}      # every trial (any train.py key)
    grid:                                    # the searched points: the product of these lists
      snip.keep_ratio: [0.1, 0.3, 0.5]
      snip.mode:                             # a mapping: each value with the keys it needs set too
        iterative: {snip.steps: 3}
        one_shot: {snip.steps: null}
    series: snip.mode                        # grid key drawn as separate lines (optional)
    # a grid key named config trains each of its configs in place of the base one (compare families):
    #   grid: {config: [quickstart.yaml, mobilenet_v2_fast.yaml]}
    # a list of grids searches the union of their products (each config with its own keys):
    #   grid: [{config: [netadapt_fast.yaml], netadapt.target_fraction: [0.5, 0.3]},
    #          {config: [fisher_fast.yaml], fisher.target_fraction: [0.5, 0.3]}]
    seeds: [0, 1, 2]
    search_cost: {seeds: [0]}                # plain training of each found network, for the search cost
    baselines:
      resnet:
        without: [snip]                      # callback keys switched off (default: SEARCH_KEYS)
        grid: {model.init_args.net.cells_per_stage: [[1, 1, 1], [2, 2, 2]]}
      wrn:
        width_multipliers: [0.5, 0.75, 1.0]  # every width of the base net scaled (stem included)
        round_to: 8                          # ... to the nearest multiple of 8 (the device's channel step)
    resources: {cpus: 1, gpus: 0}            # per trial (threads on the local engine; Ray's request)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callbacks import NAMED_CALLBACKS
from lit_nas import paths
from lit_nas.nets.recipe import scale_widths
from lit_nas.protocol import search_changes
from lit_nas.summary import Summary
from lit_nas.validation import check_choice
from lit_nas.yamlfile import YamlFileError, load_yaml

#: callback keys switched off in baselines unless a family's ``without`` says otherwise: the width searches
#: (:class:`lit_nas.protocol.ArchitectureSearch` with ``changes == "width"``), the collection of what they
#: removed, and the retraining after them; growth stays, it is the recipe's training schedule
SEARCH_KEYS = (
    *(key for key, cls in NAMED_CALLBACKS.items() if search_changes(cls) == "width"),
    "gc",
    "retrain",
)
#: every callback is off when a found network is trained plainly: it is already grown and searched
FOUND_OFF = tuple(NAMED_CALLBACKS)
NET = "model.init_args.net"
_SPEC_KEYS = (
    "name",
    "config",
    "overrides",
    "grid",
    "series",
    "seeds",
    "search_cost",
    "baselines",
    "resources",
)
_FAMILY_KEYS = ("without", "overrides", "grid", "width_multipliers", "round_to")
SEARCH = "search"
FOUND = "found"
#: the grid key that replaces the base config of a point
CONFIG = "config"


class StudySpecError(ValueError):
    """A study spec that cannot run; the message names the bad value."""


#: what a study's or a baseline family's name may be: it becomes a directory under the study's roots
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
#: the most trials a spec may expand into (a typo such as a list of 10,000 values fails before expansion)
MAX_TRIALS = 10_000


def check_name(what: str, name: Any, path: Path) -> str:
    """``name`` if it is one plain path component (letters, digits, ``._-``; no ``/``, ``..``, leading dot).

    Specs are shared: a name such as ``../x`` or ``/tmp/x`` would make the study write outside its roots.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise StudySpecError(
            f"study spec {path}: {what} {name!r} is not a plain name: use letters, digits, '.', '_' and '-' "
            "(no '/', no '..', not starting with '.'), at most 100 characters"
        )
    return name


def within(root: Path, *parts: str) -> Path:
    """``root/parts...``, proven to lie under ``root`` (a :class:`StudySpecError` otherwise)."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise StudySpecError(f"{path} lies outside {root}: a study writes under its roots only")
    return path


@dataclass(frozen=True)
class Trial:
    """One ``train.py fit`` of a study.

    Attributes:
        family: ``search`` (a searched grid point), ``found`` (the plain training of a searched point's
            found network, for the search cost) or a baseline family's name.
        point: the grid values of this trial (``{"snip.keep_ratio": 0.3}``, ``{"width": 0.5}``).
        seed: ``seed_everything``.
        args: the command line after ``fit`` (``--config`` included, ``--run_dir`` not).
    """

    family: str
    point: dict[str, Any]
    seed: int
    args: tuple[str, ...]

    @property
    def point_id(self) -> str:
        """A file-system-safe, stable name of the point: short keys, values and a hash of the whole."""
        return point_id(self.point)

    @property
    def id(self) -> str:
        """``family/point/seed<k>``: the trial's directory under the study's runs and results."""
        return f"{self.family}/{self.point_id}/seed{self.seed}"


def point_id(point: Mapping[str, Any]) -> str:
    """``keep_ratio=0.3,mode=iterative-1a2b3c`` for ``{"snip.keep_ratio": 0.3, "snip.mode": "iterative"}``."""
    if not point:
        return "default"
    short = ",".join(f"{k.split('.')[-1]}={_slug(v)}" for k, v in sorted(point.items()))
    digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:6]
    return f"{short[:80]}-{digest}"


def _slug(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text).strip("_") or "_"


def cli_value(value: Any) -> str:
    """A YAML value as ``train.py`` reads it on the command line (``null``, ``true``, ``[1, 2]``)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``{"snip.keep_ratio": 0.3}`` -> ``["--snip.keep_ratio", "0.3"]``."""
    out: list[str] = []
    for key, value in overrides.items():
        out += [f"--{key}", cli_value(value)]
    return out


@dataclass
class Family:
    """A baseline family: the base recipe with ``without`` switched off, over a grid and/or widths."""

    name: str
    without: tuple[str, ...] = SEARCH_KEYS
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    width_multipliers: list[float] = field(default_factory=list)
    round_to: int = 1


@dataclass
class StudySpec:
    """A parsed, checked study spec (see the module docstring for the YAML)."""

    name: str
    path: Path
    config: Path
    overrides: dict[str, Any]
    #: the searched sub-grids ``(values of each key, overrides linked to each value)``: one for a mapping,
    #: one per entry for a list of grids (the points are the union of their products)
    subgrids: list[tuple[dict[str, list[Any]], dict[str, dict[Any, dict[str, Any]]]]]
    seeds: list[int]
    baselines: list[Family]
    series: str | None = None
    search_cost_seeds: list[int] = field(default_factory=list)
    cpus: float = 1.0
    gpus: float = 0.0

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> StudySpec:
        """Read and check ``path``; :class:`StudySpecError` names what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise StudySpecError(f"study spec {str(path)!r} does not exist")
        try:
            data = load_yaml(path, "study spec")
        except YamlFileError as err:
            raise StudySpecError(str(err)) from None
        if not isinstance(data, dict):
            raise StudySpecError(f"study spec {path} must be a mapping; got {type(data).__name__}")
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path) -> StudySpec:
        """Check ``data`` (a spec's YAML) and build the spec."""
        for key in data:
            check_choice("study spec", "key", key, _SPEC_KEYS, error=StudySpecError)
        if "config" not in data:
            raise StudySpecError(f"study spec {path}: 'config' (the base config) is required")
        config = resolve_config(str(data["config"]))
        load_config(config)  # a file that is not a config fails now, naming it
        subgrids = _grids(data.get("grid"), path)
        for sub, _ in subgrids:
            for name in sub.get(CONFIG, []):
                resolve_config(str(name))  # fails now, naming the config, not when its trial starts
        name = check_name("name", data.get("name") or path.stem, path)
        seeds = data.get("seeds", [0])
        # bool is an int in Python: `seeds: [true]` would run seed 1 under the name True
        if (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            raise StudySpecError(
                f"study spec {path}: seeds must be a non-empty list of integers; got {seeds!r}"
            )
        if len(set(seeds)) != len(seeds):
            raise StudySpecError(f"study spec {path}: seeds repeat: {seeds}")
        series = data.get("series")
        if series is not None and any(series not in sub for sub, _ in subgrids):
            common = sorted(set.intersection(*(set(sub) for sub, _ in subgrids)))
            raise StudySpecError(
                f"study spec {path}: series {series!r} is not a key of every grid; valid choices: {common}"
            )
        cost = data.get("search_cost") or {}
        cost_seeds = list(cost.get("seeds", [])) if isinstance(cost, dict) else None
        if cost_seeds is None or any(s not in seeds for s in cost_seeds):
            raise StudySpecError(
                f"study spec {path}: search_cost must be {{seeds: [...]}} with seeds among {seeds}; "
                f"got {cost!r}"
            )
        resources = data.get("resources") or {}
        for key in resources:
            check_choice("study spec resources", "key", key, ("cpus", "gpus"), error=StudySpecError)
        cpus, gpus = float(resources.get("cpus", 1)), float(resources.get("gpus", 0))
        if cpus <= 0 or gpus < 0:
            raise StudySpecError(f"study spec {path}: resources need cpus > 0 and gpus >= 0; got {resources}")
        families = []
        baselines = data.get("baselines") or {}
        if not isinstance(baselines, dict):
            raise StudySpecError(
                f"study spec {path}: baselines must map names to families; got {baselines!r}"
            )
        for family, fam in baselines.items():
            families.append(_family(check_name("baseline family name", family, path), fam or {}, path))
        points = sum(math.prod(len(v) for v in sub.values()) for sub, _ in subgrids)
        for fam in families:
            points += math.prod(len(v) for v in fam.grid.values()) * max(1, len(fam.width_multipliers or []))
        if points * len(seeds) > MAX_TRIALS:
            raise StudySpecError(
                f"study spec {path}: {points} points x {len(seeds)} seeds = {points * len(seeds)} trials, "
                f"over the {MAX_TRIALS} a study may have; is a list longer than you meant?"
            )
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise StudySpecError(f"study spec {path}: overrides must be a mapping; got {overrides!r}")
        return cls(
            name=name,
            path=path,
            config=config,
            overrides=dict(overrides),
            subgrids=subgrids,
            seeds=list(seeds),
            baselines=families,
            series=series,
            search_cost_seeds=cost_seeds,
            cpus=cpus,
            gpus=gpus,
        )

    # -- trials ----------------------------------------------------------------------------------------
    def _base_args(self, point: Mapping[str, Any] | None = None) -> list[str]:
        config = resolve_config(str(point[CONFIG])) if point and CONFIG in point else self.config
        return ["--config", str(config), *override_args(self.overrides)]

    def search_points(self) -> list[dict[str, Any]]:
        """The searched grid points, in grid order (sub-grid by sub-grid)."""
        out: list[dict[str, Any]] = []
        for sub, _ in self.subgrids:
            out += [p for p in _product(sub) if p not in out]
        return out

    def point_overrides(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The overrides of a searched point: its values and the keys linked to them (in its sub-grid).

        A ``config`` value is not an override: it replaces the base config.
        """
        linked: dict[str, dict[Any, dict[str, Any]]] = {}
        for sub, sub_linked in self.subgrids:  # the first sub-grid holding the point
            if set(sub) == set(point) and all(point[k] in sub[k] for k in sub):
                linked = sub_linked
                break
        out = {k: v for k, v in point.items() if k != CONFIG}
        for key, value in point.items():
            out.update(linked.get(key, {}).get(value, {}))
        return out

    def family_points(self, family: Family) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """``(point, overrides)`` of every point of a baseline family."""
        widths = family.width_multipliers or [None]
        out = []
        for width in widths:
            for point in _product(family.grid):
                # the whole net first, so a grid key of the family (cells_per_stage, ...) still applies
                net = self.net_config(family.overrides)
                over = scaled_widths(net, width, family.round_to) if width is not None else {}
                over.update(point)
                label = dict(point)
                if width is not None:
                    label["width"] = width
                out.append((label, over))
        return out

    def trials(self) -> list[Trial]:
        """Every searched and baseline trial (the found-network trials come from :meth:`found_trial`)."""
        out = []
        for point in self.search_points():
            for seed in self.seeds:
                out.append(self._trial(SEARCH, point, seed, override_args(self.point_overrides(point))))
        for family in self.baselines:
            off = [a for key in family.without for a in (f"--{key}", "null")]
            for label, over in self.family_points(family):
                for seed in self.seeds:
                    args = [*override_args(family.overrides), *override_args(over), *off]
                    out.append(self._trial(family.name, label, seed, args))
        return out

    def found_trial(self, searched: Trial, summary: Summary) -> Trial | None:
        """The plain training of the network ``searched`` found (same recipe), or ``None`` without one."""
        arch = summary.get("found_arch")
        if not arch:
            return None
        args = [
            *override_args(self.point_overrides(searched.point)),
            "--model.init_args.arch_spec",
            str(arch),
        ]
        if summary.get("found_masks"):
            args += ["--model.init_args.masks", str(summary["found_masks"])]
        args += [a for key in FOUND_OFF for a in (f"--{key}", "null")]
        return self._trial(FOUND, searched.point, searched.seed, args)

    def found_placeholder(self, searched: Trial) -> Trial:
        """The found-network trial of ``searched`` before its search ran (its id, for counting)."""
        return Trial(FOUND, searched.point, searched.seed, ())

    def _trial(self, family: str, point: dict[str, Any], seed: int, args: list[str]) -> Trial:
        base = self._base_args(point if family in (SEARCH, FOUND) else None)
        trial = Trial(family, point, seed, (*base, *args, "--seed_everything", str(seed)))
        if self.wandb_logger():  # one W&B run per trial, named after it
            name = ["--trainer.logger.init_args.name", f"{self.name}/{trial.id}"]
            trial = Trial(family, point, seed, (*trial.args, *name))
        return trial

    def wandb_logger(self) -> bool:
        """Whether the trials log to W&B (the base config's logger, unless the overrides change it)."""
        if "trainer.logger" in self.overrides:
            return False
        data = load_config(self.config)
        logger = (data.get("trainer") or {}).get("logger")
        return isinstance(logger, dict) and "WandbLogger" in str(logger.get("class_path", ""))

    def net_config(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The base net recipe (``model.init_args.net``) with the study's overrides, then ``extra``, applied.

        A width multiplier overrides the whole net recipe, so it must start from every override of it.
        """
        data = load_config(self.config)
        net = dict(((data.get("model") or {}).get("init_args") or {}).get("net") or {})
        for key, value in [*self.overrides.items(), *(extra or {}).items()]:
            if key == NET and isinstance(value, Mapping):
                net.update(value)
            elif key.startswith(NET + "."):
                net[key[len(NET) + 1 :]] = value
        return net


def load_config(path: Path) -> dict[str, Any]:
    """A training config's YAML: a mapping (``{}`` for an empty file); :class:`StudySpecError` otherwise."""
    try:
        data = load_yaml(path, "config")
    except YamlFileError as err:
        raise StudySpecError(str(err)) from None
    if data is not None and not isinstance(data, dict):
        raise StudySpecError(f"config {path} must be a mapping of keys; it holds a {type(data).__name__}")
    return data or {}


def resolve_config(name: str) -> Path:
    """A config name under ``configs/`` or a path; :class:`StudySpecError` when neither exists."""
    try:
        return paths.resolve_config(name)
    except paths.ConfigNotFoundError as err:
        raise StudySpecError(str(err)) from None


def scaled_widths(net: Mapping[str, Any], multiplier: float, round_to: int = 1) -> dict[str, Any]:
    """The override (the whole ``model.init_args.net``) that scales every width of ``net`` by ``multiplier``.

    The recipe itself comes from :func:`lit_nas.nets.recipe.scale_widths` (widths rounded to ``round_to``).
    """
    try:
        return {NET: scale_widths(net, multiplier, round_to)}
    except ValueError as err:
        raise StudySpecError(str(err)) from None


def _product(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _grids(value: Any, path: Path) -> list[tuple[dict[str, list[Any]], dict[str, dict[Any, dict[str, Any]]]]]:
    """The spec's grid as sub-grids: one mapping, or a list of them (the union of their products)."""
    if isinstance(value, list):
        if not value:
            raise StudySpecError(f"study spec {path}: grid is empty; give at least one key with a list")
        return [_grid(sub, f"grid[{i}]", path, required=True) for i, sub in enumerate(value)]
    return [_grid(value, "grid", path, required=True)]


def _grid(
    value: Any, where: str, path: Path, required: bool = False
) -> tuple[dict[str, list[Any]], dict[str, dict[Any, dict[str, Any]]]]:
    """``(grid, linked)``: each key's values, and for keys given as mappings the overrides of each value."""
    if value is None or value == {}:
        if required:
            raise StudySpecError(f"study spec {path}: {where} is empty; give at least one key with a list")
        return {}, {}
    if not isinstance(value, dict):
        raise StudySpecError(f"study spec {path}: {where} must map keys to lists; got {value!r}")
    grid: dict[str, list[Any]] = {}
    linked: dict[str, dict[Any, dict[str, Any]]] = {}
    for key, values in value.items():
        if isinstance(values, dict) and values:
            bad = {v: extra for v, extra in values.items() if not isinstance(extra, dict | None)}
            if bad:
                raise StudySpecError(
                    f"study spec {path}: {where} key {key!r}: each value maps to the overrides it needs "
                    f"(a mapping); got {bad!r}"
                )
            grid[str(key)] = list(values)
            linked[str(key)] = {v: dict(extra or {}) for v, extra in values.items()}
        elif isinstance(values, list) and values:
            grid[str(key)] = list(values)
        else:
            raise StudySpecError(
                f"study spec {path}: {where} key {key!r} needs a non-empty list of values; got {values!r}"
            )
    return grid, linked


def _family(name: str, data: Any, path: Path) -> Family:
    if name in (SEARCH, FOUND):
        raise StudySpecError(f"study spec {path}: baseline family name {name!r} is reserved")
    if not isinstance(data, dict):
        raise StudySpecError(f"study spec {path}: baseline {name!r} must be a mapping; got {data!r}")
    for key in data:
        check_choice(f"study spec baseline {name!r}", "key", key, _FAMILY_KEYS, error=StudySpecError)
    without = data.get("without", list(SEARCH_KEYS))
    if not isinstance(without, list):
        raise StudySpecError(f"study spec {path}: baseline {name!r} without must be a list; got {without!r}")
    widths = data.get("width_multipliers") or []
    if any(not isinstance(w, (int, float)) or w <= 0 for w in widths):
        raise StudySpecError(
            f"study spec {path}: baseline {name!r} width_multipliers must be > 0; got {widths}"
        )
    grid, linked = _grid(data.get("grid"), f"baseline {name!r} grid", path)
    if linked:
        raise StudySpecError(f"study spec {path}: baseline {name!r} grid takes lists of values only")
    round_to = data.get("round_to", 1)
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise StudySpecError(
            f"study spec {path}: baseline {name!r} round_to must be a positive integer; got {round_to!r}"
        )
    if round_to > 1 and not widths:
        raise StudySpecError(
            f"study spec {path}: baseline {name!r} round_to rounds width_multipliers; give them"
        )
    return Family(
        name=name,
        without=tuple(str(k) for k in without),
        overrides=dict(data.get("overrides") or {}),
        grid=grid,
        width_multipliers=[float(w) for w in widths],
        round_to=round_to,
    )
