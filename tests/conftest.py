import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lit_nas  # noqa: F401  (first: torchvision compat)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# a local Ray instance binds to the loopback interface only (set before ray is imported)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# the cores shared among pytest-xdist's workers (`make test` runs 2): more threads than cores slows torch down
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

from lit_nas import DataShape, NetConfig  # noqa: E402
from tests.helpers import TINY  # noqa: E402

# -- no test writes into the checkout -----------------------------------------------------------------------
_CHECKOUT = Path(__file__).resolve().parent.parent
#: what running the suite itself leaves (caches, environments), not what a test or a run it starts writes
_NOT_OUTPUTS = {".git", ".venv", ".venv-export", ".pytest_cache", ".ruff_cache", "__pycache__", ".whl"}


def checkout_files() -> set[str]:
    """Every file under the checkout but the suite's own caches and environments."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(_CHECKOUT):
        dirnames[:] = [d for d in dirnames if d not in _NOT_OUTPUTS and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(_CHECKOUT)
        out.update(str(rel / f) for f in filenames if not f.endswith(".pyc"))
    return out


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip, with the reason, where CUDA is absent (``make gpu-check`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        session.config._checkout_before = checkout_files()


def pytest_sessionfinish(session, exitstatus) -> None:
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    gained = sorted(checkout_files() - before)
    if gained:
        shown = "\n  ".join(gained[:20]) + (
            f"\n  ... and {len(gained) - 20} more" if len(gained) > 20 else ""
        )
        session.config.get_terminal_writer().line(
            f"\nerror: the test run wrote {len(gained)} file(s) into the checkout (a test, or a run it "
            f"started, wrote outside its temporary directory):\n  {shown}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def tiny_shape() -> DataShape:
    return DataShape(3, 16, 10)


@pytest.fixture
def tiny_net_config() -> NetConfig:
    return NetConfig(**TINY)


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory) -> Path:
    """The output of one ``python -m tests.ddp_search OUT``: every DDP fit the tests check, in 2 processes.

    Run once per test session, whichever pytest-xdist worker asks first (the others wait for it).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # this session's, all workers'
    out, done = shared / "ddp_search", shared / "ddp_search.done"
    with FileLock(str(shared / "ddp_search.lock")):
        if not done.exists():
            out.mkdir(exist_ok=True)
            repo = Path(__file__).resolve().parents[1]
            env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(
                [sys.executable, "-m", "tests.ddp_search", str(out)],
                cwd=repo,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, proc.stderr[-4000:]
            done.write_text("ok\n")
    return out
