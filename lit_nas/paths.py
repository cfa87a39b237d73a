"""Where the checkout's files are: its root, the shipped configs, and "config name -> file".

One definition, used by the CLI, the studies, the callbacks and ``device_bench``: each of them computed the
root from its own ``__file__`` before, and two of them resolved config names their own way.
"""

from __future__ import annotations

from pathlib import Path

#: the checkout: ``configs/``, ``train.py`` and ``studies/`` lie here (the package is installed editable)
REPO_ROOT = Path(__file__).resolve().parents[1]
#: the shipped training configs (``--config NAME`` finds ``configs/NAME`` or ``configs/NAME.yaml``)
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigNotFoundError(ValueError):
    """A config name that is neither a file nor one of the shipped configs; the message lists those."""


def find_config(name: str, config_dir: Path = CONFIG_DIR) -> Path | None:
    """The file a config name means: ``name`` itself when it exists, else ``configs/name[.yaml]``.

    Args:
        name: a path, or the name of a file under ``config_dir`` (with or without ``.yaml``).
        config_dir: where shipped configs live.

    Returns:
        The path (as given when ``name`` exists; otherwise under ``config_dir``), or ``None``.
    """
    if Path(name).exists():
        return Path(name)
    for candidate in (config_dir / name, config_dir / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def resolve_config(name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """Like :func:`find_config`, but resolved, and an error naming the shipped configs when nothing matches.

    Raises:
        ConfigNotFoundError: ``name`` is not a file, nor one of the files under ``config_dir``.
    """
    path = find_config(name, config_dir)
    if path is None or not path.is_file():
        known = sorted(p.name for p in config_dir.glob("*.yaml"))
        raise ConfigNotFoundError(f"unknown config {name!r}: not a file, nor one of configs/: {known}")
    return path.resolve()


def in_checkout(path: str | Path) -> Path:
    """``path`` as given when it exists; else the same relative path under the checkout, if that exists.

    Shipped files (``configs/luts/...``) are named relative to the checkout, and a run may start anywhere.
    """
    given = Path(path)
    if not given.exists() and not given.is_absolute() and (REPO_ROOT / given).exists():
        return REPO_ROOT / given
    return given
