"""Running a study's trials: each one a ``train.py fit`` process, on a local pool or on Ray.

Where things go (``NAME`` is the spec's name):

- ``studies/results/NAME/trials/<family>/<point>/seed<k>.json``: each finished trial's record (status, its
  ``summary.json`` or its error, the command line). Small: commit them, and anyone can rerun the report or
  resume the study.
- ``runs/studies/NAME/<family>/<point>/seed<k>/``: the trial's run directory (checkpoints, ``train.log``).

Resuming: a trial with a record is done (a failed one is retried only with ``retry_failed``); one without
is started again with ``--ckpt_path last``, so a trial killed mid-way continues from its last epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_nas.paths import REPO_ROOT
from lit_nas.summary import Summary, SummaryError, check_summary
from lit_nas_study.spec import SEARCH, StudySpec, StudySpecError, Trial, within

#: how often Ray reruns a trial whose worker or node died (the trial's own failures are never retried)
INFRA_RETRIES = 2
RESULTS_ROOT = REPO_ROOT / "studies" / "results"
RUNS_ROOT = REPO_ROOT / "runs" / "studies"
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Job:
    """What a worker needs to run one trial: plain data, so it travels to a Ray worker as it is."""

    trial_id: str
    args: tuple[str, ...]
    run_dir: str
    python: str
    train_py: str
    cwd: str
    threads: int
    timeout_s: float | None


def run_job(job: Job) -> dict[str, Any]:
    """Run one trial to the end; its record (``status`` ``done`` or ``failed``, with the summary or error).

    Never raises for a failing trial: a study goes on with the others.
    """
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    start = time.time()
    record: dict[str, Any] = {"id": job.trial_id, "args": list(job.args), "run_dir": job.run_dir}
    existing, why = _read_summary(summary_path)
    if existing is not None and existing["tested"]:  # finished, but its record was not written
        return {**record, "status": "done", "summary": existing, "wall_s": 0.0, "reused": True}
    cmd = [job.python, job.train_py, "fit", *job.args, "--run_dir", job.run_dir, "--ckpt_path", "last"]
    threads = str(job.threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }
    log = run_dir / "train.log"
    try:
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(
                cmd,
                cwd=job.cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=job.timeout_s,
                preexec_fn=_normal_priority,
            )
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    record["wall_s"] = time.time() - start
    record["rc"] = rc
    summary, why = _read_summary(summary_path)
    if rc == 0 and summary is not None and summary["tested"]:
        return {**record, "status": "done", "summary": summary}
    reason = f"timed out after {job.timeout_s} s" if rc == "timeout" else f"exit status {rc}"
    error = why if rc == 0 and why is not None else f"{reason}: {_last_error(log)}"
    return {**record, "status": "failed", "error": error, "log": str(log)}


def _normal_priority() -> None:
    """A trial runs at normal priority: Ray's workers are niced, and a child would inherit it."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass  # lowering the niceness needs privileges; the trial runs as niced as its worker


def _read_summary(path: Path) -> tuple[Summary | None, str | None]:
    """``(summary, None)`` for a ``summary.json`` of this layout; ``(None, why)`` otherwise.

    ``why`` is ``None`` for a missing file.
    """
    data, why = read_json_object(path)
    if data is None:
        return None, why
    try:
        return check_summary(data, str(path)), None
    except SummaryError as err:
        return None, str(err)


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a file holding a JSON object; ``(None, why)`` otherwise.

    ``why`` names the file and what is wrong with it; it is ``None`` for a missing file.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except UnicodeDecodeError as err:
        return None, f"{path} is not UTF-8 text (byte {err.start})"
    except json.JSONDecodeError as err:
        return None, f"{path} is not JSON (line {err.lineno}, column {err.colno}: {err.msg})"
    except OSError as err:
        return None, f"{path} cannot be read ({err.strerror})"
    if not isinstance(data, dict):
        return None, f"{path} holds a JSON {type(data).__name__}, not an object"
    return data, None


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error:" in ln:
            return ln
    return lines[-1] if lines else "no output"


# ------------------------------------------------------------------------------------------------------
class Study:
    """A study on disk: its spec, trial records and run directories."""

    def __init__(
        self, spec: StudySpec, results_root: Path = RESULTS_ROOT, runs_root: Path = RUNS_ROOT
    ) -> None:
        self.spec = spec
        # names are checked in the spec; this proves it for every path the study writes
        self.results = within(results_root, spec.name, "trials")
        self.runs = within(runs_root, spec.name)
        #: records that could not be read, by path, with the reason (they count as not finished)
        self.unreadable: dict[Path, str] = {}

    def record_path(self, trial: Trial) -> Path:
        """Where the record of ``trial`` is kept."""
        return within(self.results, f"{trial.id}.json")

    def record(self, trial: Trial) -> dict[str, Any] | None:
        """The record of ``trial``, or ``None`` when it has not finished (or its record is unreadable)."""
        return self._read(self.record_path(trial))

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, each with its trial's ``family``, ``point`` and ``seed``."""
        return [r for r in (self._read(p) for p in sorted(self.results.rglob("*.json"))) if r is not None]

    def _read(self, path: Path) -> dict[str, Any] | None:
        record, why = read_json_object(path)
        if record is not None and "status" not in record:
            record, why = None, f"{path} is not a trial record (a JSON object with a status)"
        elif record is not None and record["status"] == "done":
            try:
                check_summary(record.get("summary") or {}, f"the summary in {path}")
            except SummaryError as err:
                record, why = None, str(err)
        if why is not None:
            self.unreadable[path] = why
        return record

    def save(self, trial: Trial, record: dict[str, Any]) -> None:
        """Write ``record`` atomically (a killed driver leaves either no record or a whole one)."""
        path = self.record_path(trial)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**record, "family": trial.family, "point": trial.point, "seed": trial.seed}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(record, f, indent=1)
        os.replace(f.name, path)

    def job(self, trial: Trial, threads: int, timeout_s: float | None) -> Job:
        """The job of ``trial``."""
        return Job(
            trial_id=trial.id,
            args=trial.args,
            run_dir=str(within(self.runs, trial.id)),
            python=sys.executable,
            train_py=str(REPO_ROOT / "train.py"),
            cwd=str(REPO_ROOT),
            threads=threads,
            timeout_s=timeout_s,
        )


def check_trials(trials: Iterable[Trial]) -> None:
    """Build every distinct command line once (no training); :class:`StudySpecError` naming each bad one."""
    by_args: dict[tuple[str, ...], Trial] = {}
    for t in trials:
        per_seed = ("--seed_everything", "--trainer.logger.init_args.name")
        key = tuple(a for i, a in enumerate(t.args) if not (i > 0 and t.args[i - 1] in per_seed))
        by_args.setdefault(key, t)
    argvs = [list(t.args) for t in by_args.values()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "argv.json"
        path.write_text(json.dumps(argvs))
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "train.py"), "check", str(path)],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={**os.environ, "WANDB_MODE": "disabled"},
        )
    try:
        errors = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise StudySpecError(f"could not check the trials' settings:\n{proc.stderr[-3000:]}") from err
    bad = [f"- {t.id}: {e}" for t, e in zip(by_args.values(), errors) if e]
    if bad:
        raise StudySpecError("these trials' settings are refused (nothing was run):\n" + "\n".join(bad))


class Progress:
    """Prints trials done / running / left, failures and an ETA after every change."""

    def __init__(self, name: str, total: int, done: int, parallel: int, out: Callable[[str], None]) -> None:
        self.name, self.total, self.done, self.parallel, self.out = name, total, done, parallel, out
        self.running = 0
        self.failed = 0
        self.lost = 0
        self.durations: list[float] = []

    def started(self, trial: Trial) -> None:  # noqa: D102
        self.running += 1
        self.show(f"started {trial.id}")

    def finished(self, trial: Trial, record: dict[str, Any]) -> None:  # noqa: D102
        self.running -= 1
        self.done += 1
        if record["status"] == "failed":
            self.failed += 1
        elif not record.get("reused"):
            self.durations.append(float(record.get("wall_s", 0.0)))
        what = record["status"] + (f" ({record['error']})" if record["status"] == "failed" else "")
        self.show(f"{what}: {trial.id}")

    def lost_trial(self, trial: Trial, why: str) -> None:
        """A trial the infrastructure lost (a node or worker died): no record, so a rerun runs it."""
        self.running -= 1
        self.lost += 1
        self.show(f"lost, not recorded (rerun the study to run it): {trial.id}: {why}")

    def show(self, event: str) -> None:  # noqa: D102
        left = self.total - self.done - self.running
        eta = "?"
        if self.durations:
            seconds = sum(self.durations) / len(self.durations) * (left + self.running) / self.parallel
            eta = time.strftime("%H:%M:%S", time.gmtime(seconds))
        self.out(
            f"[{self.name}] done {self.done} / running {self.running} / left {left}"
            f" (failed {self.failed}{f', lost {self.lost}' if self.lost else ''}), ETA {eta} | {event}"
        )


def run_study(
    spec: StudySpec,
    engine: str = "local",
    jobs: int = 1,
    address: str | None = None,
    retry_failed: bool = False,
    timeout_s: float | None = None,
    results_root: Path = RESULTS_ROOT,
    runs_root: Path = RUNS_ROOT,
    check: bool = True,
    out: Callable[[str], None] = print,
    infra_retries: int = INFRA_RETRIES,
) -> Study:
    """Run every trial of ``spec`` that has no record yet (see the module docstring).

    Args:
        spec: the study.
        engine: ``local`` (a pool of ``jobs`` processes on this machine) or ``ray``.
        jobs: trials at once on the local engine (each with ``spec.cpus`` threads).
        address: the Ray cluster (``auto``: the one started with ``ray start``; ``None``: a local instance).
        retry_failed: run the trials recorded as failed again.
        timeout_s: limit of one trial.
        results_root: where records go (``studies/results``).
        runs_root: where run directories go (``runs/studies``).
        check: build the settings of every trial that will run before the first one runs.
        out: where progress lines go.
        infra_retries: Ray: how often a trial whose worker or node died is run again.
    """
    if engine not in ENGINES:
        raise StudySpecError(f"engine must be one of {list(ENGINES)}; got {engine!r}")
    if jobs < 1:
        raise StudySpecError(f"jobs must be >= 1; got {jobs}")
    if timeout_s is not None and not timeout_s > 0:  # also refuses NaN
        raise StudySpecError(f"timeout must be a positive number of seconds; got {timeout_s}")
    study = Study(spec, results_root, runs_root)
    trials = spec.trials()

    def pending(ts: Iterable[Trial]) -> list[Trial]:
        out_ = []
        for t in ts:
            rec = study.record(t)
            if rec is None or (retry_failed and rec["status"] == "failed"):
                out_.append(t)
        return out_

    first = pending(trials)
    for why in study.unreadable.values():
        out(f"[{spec.name}] warning: {why}; its trial runs again and the record is rewritten")
    if check and first:  # what will run (a resume does not rebuild the finished trials' settings)
        check_trials(first)

    cost_searched = [t for t in trials if t.family == SEARCH and t.seed in spec.search_cost_seeds]
    total = len(trials) + len(cost_searched)
    counted = {t.id for t in cost_searched if study.record(spec.found_placeholder(t)) is not None}
    found_done = len(counted)
    parallel = jobs if engine == "local" else max(1, jobs)
    progress = Progress(
        spec.name, total, total - len(first) - (len(cost_searched) - found_done), parallel, out
    )
    threads = max(1, int(spec.cpus))
    execute = _local if engine == "local" else _ray_engine(spec, address, infra_retries)
    progress.show("starting")

    def finish(trial: Trial, record: dict[str, Any]) -> None:
        study.save(trial, record)
        progress.finished(trial, record)

    execute([study.job(t, threads, timeout_s) for t in first], first, jobs, progress, finish)
    # second wave: the plain training of each found network (needs its search's found_arch.yaml)
    found: list[Trial] = []
    for t in cost_searched:
        placeholder = spec.found_placeholder(t)
        rec = study.record(placeholder)
        if rec is not None and not (retry_failed and rec["status"] == "failed"):
            if t.id not in counted:  # finished meanwhile by another driver
                progress.done += 1
            continue
        searched = study.record(t)
        trial = (
            spec.found_trial(t, searched["summary"]) if searched and searched["status"] == "done" else None
        )
        if trial is None:
            why = (
                "its search failed" if not searched or searched["status"] != "done" else "no found_arch.yaml"
            )
            finish(placeholder, {"id": placeholder.id, "status": "failed", "error": f"not run: {why}"})
            continue
        found.append(trial)
    if found and check:
        check_trials(found)
    execute([study.job(t, threads, timeout_s) for t in found], found, jobs, progress, finish)
    progress.show("finished")
    if progress.lost:
        out(
            f"[{spec.name}] {progress.lost} trial(s) were lost to a node or worker that died (after "
            f"{infra_retries} retries) and have no record: run the same command again to run them"
        )
    return study


#: records a finished trial (the driver writes its record and updates the progress)
Finish = Callable[[Trial, dict[str, Any]], None]
#: runs jobs (with their trials) ``n`` at a time, calling ``finish`` as each one ends
Executor = Callable[[list[Job], list[Trial], int, Progress, Finish], None]


def _local(jobs: list[Job], trials: list[Trial], n: int, progress: Progress, finish: Finish) -> None:
    if n == 1:
        for job, trial in zip(jobs, trials):
            progress.started(trial)
            finish(trial, run_job(job))
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    # threads, not processes: each only waits for its train.py
    with ThreadPoolExecutor(max_workers=n) as pool:
        queue = list(zip(jobs, trials))
        running: dict[Any, Trial] = {}
        while queue or running:
            while queue and len(running) < n:
                job, trial = queue.pop(0)
                progress.started(trial)
                running[pool.submit(run_job, job)] = trial
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(running.pop(fut), fut.result())


def _loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``) is on this machine's loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return host in ("localhost", "::1") or host.startswith("127.")


def _ray_engine(spec: StudySpec, address: str | None, retries: int) -> Executor:
    loopback = address is None or _loopback(address)
    if loopback and "ray" not in sys.modules:
        # a local instance, or a cluster on the loopback interface: Ray keeps to 127.0.0.1 only with this
        # set before it is imported (else it swaps a local address for the machine's own, and a driver given
        # 127.0.0.1:PORT waits forever for a head at the machine's address)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    elif address is not None and loopback and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise StudySpecError(
            f"--address {address} is on the loopback interface, but Ray was imported before this study "
            "could keep it there: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment"
        )
    try:
        import ray
    except ImportError as err:
        raise StudySpecError(
            "--engine ray needs Ray: pip install -e '.[study]' (or pip install ray)"
        ) from err

    def execute(jobs: list[Job], trials: list[Trial], n: int, progress: Progress, finish: Finish) -> None:
        if not jobs:
            return
        if not ray.is_initialized():
            # a local instance, or a cluster on the loopback interface: this driver's node is 127.0.0.1 too
            # (Ray would take the machine's address and wait forever for a raylet there)
            local = {"_node_ip_address": "127.0.0.1"} if loopback else {}
            # no --address: a new local instance ("local"), never a cluster that happens to run here
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, **local)
        # max_retries reruns a task whose worker or node died; a trial that fails is a record, never retried
        task = ray.remote(num_cpus=spec.cpus, num_gpus=spec.gpus, max_retries=retries)(run_job)
        futures = {}
        for job, trial in zip(jobs, trials):
            futures[task.remote(job)] = trial
            progress.started(trial)
        while futures:
            done, _ = ray.wait(list(futures), num_returns=1)
            for ref in done:
                trial = futures.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as err:
                    # run_job returns a record for every trial that fails: an error here is the
                    # infrastructure's (worker killed, node lost), after Ray's retries. No record: the trial
                    # is not the trial's failure, and a plain rerun of the study runs it
                    progress.lost_trial(trial, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                    continue
                finish(trial, record)

    return execute
