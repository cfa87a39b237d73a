"""``python study.py {run,status,report,retime} studies/NAME.yaml`` (also ``python -m lit_nas_study``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from device_bench.export import PRECISIONS
from lit_nas_study.runner import ENGINES, RESULTS_ROOT, RUNS_ROOT, Study, run_study
from lit_nas_study.spec import StudySpec, StudySpecError


def _precisions(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(","))
    bad = [p for p in names if p not in PRECISIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad}: valid choices are {list(PRECISIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad spec or argument)."""
    parser = argparse.ArgumentParser(prog="python study.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "run the trials that have no record yet (resumable: run it again after a crash)"),
        ("report", "write the CSV, markdown table and Pareto plots of the finished trials"),
        ("status", "count the trials done, failed and left"),
        ("retime", "time every finished trial's network again in one quiet run (retimed.json)"),
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
        if name == "retime":
            p.add_argument("--repeats", type=int, default=50, help="timed runs per network and pass")
            p.add_argument("--passes", type=int, default=3, help="passes, each in a new shuffled order")
            p.add_argument(
                "--precisions",
                type=_precisions,
                default=PRECISIONS,
                help="comma-separated (default fp32,int8; fp32 alone where int8 conversion fails)",
            )
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
            from lit_nas_study.report import write_report

            out = args.out or args.results / spec.name
            for path in write_report(
                spec, Study(spec, args.results, args.runs), out, wandb=not args.no_wandb
            ):
                print(path)
        elif args.command == "retime":
            from lit_nas_study.retime import retime

            if args.repeats < 1 or args.passes < 1:
                raise StudySpecError(
                    f"--repeats and --passes must be >= 1; got {args.repeats}, {args.passes}"
                )
            print(retime(spec, args.results, args.repeats, args.passes, args.precisions))
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
