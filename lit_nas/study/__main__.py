"""``python -m lit_nas.study {run,report,status} studies/NAME.yaml``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit_nas.study.runner import ENGINES, RESULTS_ROOT, RUNS_ROOT, Study, run_study
from lit_nas.study.spec import StudySpec, StudySpecError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad spec or argument)."""
    parser = argparse.ArgumentParser(prog="python -m lit_nas.study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the trials that have no record yet (resumable: run it again after a crash)"),
        ("report", "write the CSV, markdown table and Pareto plots of the finished trials"),
        ("status", "count the trials done, failed and left"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", help="the study's YAML (studies/NAME.yaml)")
        p.add_argument("--results", type=Path, default=RESULTS_ROOT, help="records (default studies/results)")
        p.add_argument("--runs", type=Path, default=RUNS_ROOT, help="run directories (default runs/studies)")
        if name == "run":
            p.add_argument("--engine", choices=ENGINES, default="local")
            p.add_argument("--jobs", type=int, default=1, help="local engine: trials at once")
            p.add_argument("--address", default=None, help="Ray: the cluster ('auto'); default a local one")
            p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
            p.add_argument("--timeout", type=float, default=None, help="seconds one trial may take")
        if name == "report":
            p.add_argument("--out", type=Path, default=None, help="default studies/results/NAME/")
            p.add_argument("--no-wandb", action="store_true", help="do not log the report to a W&B run")
    args = parser.parse_args(argv)
    try:
        spec = StudySpec.load(args.spec)
        if args.command == "run":
            run_study(
                spec,
                engine=args.engine,
                jobs=args.jobs,
                address=args.address,
                retry_failed=args.retry_failed,
                timeout_s=args.timeout,
                results_root=args.results,
                runs_root=args.runs,
            )
        elif args.command == "report":
            from lit_nas.study.report import write_report

            out = args.out or args.results / spec.name
            for path in write_report(
                spec, Study(spec, args.results, args.runs), out, wandb=not args.no_wandb
            ):
                print(path)
        else:
            study = Study(spec, args.results, args.runs)
            records = {r["id"]: r for r in study.records()}
            trials = spec.trials()
            done = sum(records.get(t.id, {}).get("status") == "done" for t in trials)
            failed = sum(records.get(t.id, {}).get("status") == "failed" for t in trials)
            print(
                f"{spec.name}: {done} done, {failed} failed, {len(trials) - done - failed} left "
                f"of {len(trials)}"
            )
            for why in study.unreadable.values():
                print(f"warning: {why} (counted as left; 'run' reruns its trial)", file=sys.stderr)
    except StudySpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
