"""A study's report: mean ± std over seeds per grid point, Pareto plots, the gap to baselines at equal cost.

Everything is computed from the trial records (each holds its trial's ``summary.json``), so anyone can
regenerate it from the committed ``studies/results/NAME/trials``:

- ``NAME.csv`` and ``NAME.md``: one row per grid point (searched and baseline): accuracy of the final exit,
  parameters (nonzero ones when weights are masked), MFLOPs, latency (DeviceBench fp32 of the final exit,
  else the LUT prediction), training-loop time; the search cost; failed trials with their errors.
- For each searched point and baseline family, the accuracy difference to the family *at equal cost*: the
  family's mean accuracy interpolated linearly in log(cost) between its two neighbouring points (never
  extrapolated: outside its cost range there is no figure), with a 95% Welch interval from the seeds'
  spread on both sides (the family's standard deviation interpolated the same way).
- The search cost: a searched trial's training-loop time (search, and retraining if any) divided by that of
  the plain training of the network it found with the same recipe (the ``found`` trials, same study), in
  wall time and in CPU time.
- ``NAME_<cost>.png``: accuracy vs parameters, MFLOPs and (when measured) latency, searched series against
  the baseline families, error bars of one standard deviation on both axes, the Pareto front ringed.

Latency measured while other trials train is noisy. ``python study.py retime`` times every trial's
network again in one quiet, shuffled run and writes ``studies/results/NAME/retimed.json``; when that file
exists, its fp32 figures are the latency of the trials it names (the table says so).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lit_nas.summary import Summary
from lit_nas_study.runner import Study
from lit_nas_study.spec import FOUND, SEARCH, StudySpec, point_id

#: cost axes: key -> (label, reads the cost of a trial's summary)
COSTS: dict[str, tuple[str, Callable[[dict[str, Any]], float | None]]] = {}


def final_exit(summary: dict[str, Any]) -> str:
    """The key of the deepest exit in a summary's per-exit dicts."""
    return str(max(int(k) for k in summary["mflops"]))


def _params(s: dict[str, Any]) -> float | None:
    return s["nonzero_params"] if s.get("nonzero_params") is not None else s.get("params")


def _mflops(s: dict[str, Any]) -> float | None:
    return s["mflops"][final_exit(s)]


def _latency(s: dict[str, Any]) -> float | None:
    if s.get("retimed_ms") is not None:  # from retimed.json: all networks timed in one run
        return s["retimed_ms"]
    device = s.get("device") or {}
    exits = device.get("exits") or {}
    precision = "fp32" if "fp32" in exits else next(iter(exits), None)
    if precision is not None and final_exit(s) in exits[precision]:
        return exits[precision][final_exit(s)]["latency_ms"]
    lut = s.get("lut_latency_ms") or {}
    return lut.get(final_exit(s))


COSTS.update(
    {
        "params": ("parameters (nonzero when masked)", _params),
        "mflops": ("MFLOPs (final exit)", _mflops),
        "latency_ms": ("latency, ms (final exit)", _latency),
    }
)


@dataclass
class PointStats:
    """The trials of one grid point of one family, and their statistics over seeds."""

    family: str
    point: dict[str, Any]
    seeds: list[int] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    costs: dict[str, list[float]] = field(default_factory=dict)
    fit_s: dict[int, float] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)

    @property
    def id(self) -> str:  # noqa: D102
        return f"{self.family}/{point_id(self.point)}"

    @property
    def n(self) -> int:  # noqa: D102
        return len(self.acc)

    def mean(self, cost: str | None = None) -> float:
        """Mean accuracy, or mean of a cost (NaN when not measured)."""
        values = self.acc if cost is None else self.costs.get(cost, [])
        return float(np.mean(values)) if values else math.nan

    def std(self, cost: str | None = None) -> float:
        """Sample standard deviation over seeds (NaN for one seed)."""
        values = self.acc if cost is None else self.costs.get(cost, [])
        return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


RETIMED = "retimed.json"


def retimed(study: Study) -> dict[str, Any] | None:
    """``studies/results/NAME/retimed.json`` (``python study.py retime``), or ``None`` without one."""
    path = study.results.parent / RETIMED
    return json.loads(path.read_text()) if path.is_file() else None


def collect(study: Study) -> tuple[list[PointStats], list[dict[str, Any]]]:
    """Group the done trials into points (in spec order); the failed records."""
    stats: dict[str, PointStats] = {}
    failed = []
    again = (retimed(study) or {}).get("trials", {})
    for rec in study.records():
        if rec.get("status") != "done":
            failed.append(rec)
            continue
        s: Summary = rec["summary"]  # checked when the record was read (Study.records)
        if rec["id"] in again:
            s = {**s, "retimed_ms": again[rec["id"]]["fp32"]}
        key = f"{rec['family']}/{point_id(rec['point'])}"
        p = stats.setdefault(key, PointStats(rec["family"], rec["point"]))
        p.seeds.append(int(rec["seed"]))
        p.acc.append(float(s["test_acc"][final_exit(s)]))
        for name, (_, read) in COSTS.items():
            value = read(s)
            if value is not None:
                p.costs.setdefault(name, []).append(float(value))
        p.fit_s[int(rec["seed"])] = float(s["wall_s"]["fit"])
        if (s.get("cpu_s") or {}).get("fit"):
            p.cpu_s[int(rec["seed"])] = float(s["cpu_s"]["fit"])
    order = {f"{SEARCH}/{point_id(p)}": i for i, p in enumerate(study.spec.search_points())}
    for i, fam in enumerate(study.spec.baselines):
        for j, (label, _) in enumerate(study.spec.family_points(fam)):
            order[f"{fam.name}/{point_id(label)}"] = 1000 * (i + 1) + j
    return sorted(stats.values(), key=lambda p: order.get(p.id, 10**6)), failed


def _bracket(
    point: PointStats, family: list[PointStats], cost: str
) -> tuple[PointStats, PointStats, float] | None:
    """The family's two points around ``point``'s cost and the log-cost weight of the upper one.

    ``None`` when the cost is outside the family's range (or not measured); a one-point family brackets
    only its own cost (within 2%).
    """
    c = point.mean(cost)
    fam = sorted((p for p in family if not math.isnan(p.mean(cost))), key=lambda p: p.mean(cost))
    if math.isnan(c) or not fam:
        return None
    if len(fam) == 1:
        return (fam[0], fam[0], 0.0) if abs(c - fam[0].mean(cost)) <= 0.02 * fam[0].mean(cost) else None
    if not fam[0].mean(cost) <= c <= fam[-1].mean(cost):
        return None
    j = next(i for i in range(1, len(fam)) if fam[i].mean(cost) >= c)
    a, b = fam[j - 1], fam[j]
    span = math.log(b.mean(cost)) - math.log(a.mean(cost))
    return a, b, 0.0 if span == 0 else (math.log(c) - math.log(a.mean(cost))) / span


def welch_interval(
    mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int, level: float = 0.95
) -> tuple[float, float]:
    """Welch's interval for ``mean_a - mean_b`` from two samples' means, standard deviations and sizes."""
    from scipy import stats as st

    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    if n_a < 2 or n_b < 2 or math.isnan(va + vb):
        return math.nan, math.nan
    delta = mean_a - mean_b
    if va + vb == 0:
        return delta, delta
    dof = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    half = float(st.t.ppf(0.5 + level / 2, dof)) * math.sqrt(va + vb)
    return delta - half, delta + half


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-seed differences and its t interval (``n - 1`` degrees of freedom): (mean, lo, hi)."""
    from scipy import stats as st

    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean()) if len(d) else math.nan
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = float(st.t.ppf(0.5 + level / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def detectable_difference(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference a two-sided paired t test at ``alpha`` finds with ``power``.

    Exact, from the noncentral t distribution: with ``n`` pairs whose differences spread by ``sd``, a true
    difference of the returned size is declared nonzero in ``power`` of repeated studies. NaN for n < 2.
    """
    from scipy import optimize
    from scipy import stats as st

    if n < 2 or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df, crit = n - 1, float(st.t.ppf(1 - alpha / 2, n - 1))

    def shortfall(delta: float) -> float:
        nc = delta * math.sqrt(n) / sd
        return float(st.nct.sf(crit, df, nc) + st.nct.cdf(-crit, df, nc)) - power

    hi = sd
    while shortfall(hi) < 0:
        hi *= 2
    return float(optimize.brentq(shortfall, 0.0, hi, xtol=1e-12 * sd))


def verdict(lo: float, hi: float) -> str:
    """``wins`` (interval above 0), ``loses`` (below 0) or ``no verdict`` (contains 0, or none)."""
    if math.isnan(lo) or math.isnan(hi):
        return "no verdict"
    return "wins" if lo > 0 else "loses" if hi < 0 else "no verdict"


def at_equal_cost(point: PointStats, family: list[PointStats], cost: str) -> dict[str, Any] | None:
    """``point``'s accuracy minus ``family``'s at ``point``'s cost: unpaired and paired by seed.

    The family's accuracy at that cost is interpolated linearly in log(cost) between its two neighbouring
    points (never extrapolated). Returns ``None`` when the cost is outside the family's range.

    * ``delta``, ``lo``, ``hi``: difference of the means with a 95% Welch interval (the family's standard
      deviation interpolated the same way).
    * ``paired``, ``plo``, ``phi``, ``pairs``: trials of one seed share the data order and initialisation
      stream, so per seed: the point's accuracy minus the family's interpolated at that seed, with a 95%
      paired t interval over the seeds all three have.
    * ``mdd``: the smallest difference the paired comparison detects at 80% power (its n and spread).
    * ``verdict``: from the paired interval when there are pairs, else from Welch's.
    """
    bracket = _bracket(point, family, cost)
    if bracket is None:
        return None
    a, b, w = bracket
    acc = (1 - w) * a.mean() + w * b.mean()
    sd = (1 - w) * a.std() + w * b.std()
    lo, hi = welch_interval(point.mean(), point.std(), point.n, acc, sd, min(a.n, b.n))
    out: dict[str, Any] = {"delta": point.mean() - acc, "baseline_acc": acc, "lo": lo, "hi": hi}
    mine, at_a, at_b = (dict(zip(p.seeds, p.acc)) for p in (point, a, b))
    diffs = [mine[s] - ((1 - w) * at_a[s] + w * at_b[s]) for s in sorted(mine) if s in at_a and s in at_b]
    paired, plo, phi = paired_interval(diffs)
    spread = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
    out.update(
        paired=paired, plo=plo, phi=phi, pairs=len(diffs), mdd=detectable_difference(spread, len(diffs))
    )
    out["verdict"] = verdict(plo, phi) if len(diffs) > 1 else verdict(lo, hi)
    return out


def search_cost(point: PointStats, found: dict[str, PointStats], clock: str = "wall") -> float | None:
    """Mean over the found trials' seeds of (searched training-loop time) / (found network's plain one).

    ``clock``: ``wall`` (what a user waits) or ``cpu`` (the process's CPU time, which other processes on
    the machine barely change: the fairer ratio when trials ran next to different neighbours).
    """
    plain = found.get(point_id(point.point))
    if plain is None:
        return None
    mine, theirs = (point.fit_s, plain.fit_s) if clock == "wall" else (point.cpu_s, plain.cpu_s)
    ratios = [mine[s] / t for s, t in theirs.items() if s in mine and t > 0]
    return float(np.mean(ratios)) if ratios else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) pairs no other pair beats: cost no higher and accuracy no lower."""
    front = []
    for i, (c, a) in enumerate(points):
        beaten = any(
            (c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i
        )
        if not beaten and not (math.isnan(c) or math.isnan(a)):
            front.append(i)
    return front


# ------------------------------------------------------------------------------------------------------
def _fmt(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _label(point: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.')[-1]}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()
    )


#: the comparison's fields in a row (``vs_<family>_<cost>_<field>``)
COMPARISON = ("delta", "lo", "hi", "paired", "plo", "phi", "mdd", "verdict")


def table_rows(spec: StudySpec, points: list[PointStats]) -> list[dict[str, Any]]:
    """One dict per grid point (searched and baseline): the CSV's rows."""
    found = {point_id(p.point): p for p in points if p.family == FOUND}
    families = {f.name: [p for p in points if p.family == f.name] for f in spec.baselines}
    rows = []
    for p in points:
        if p.family == FOUND:
            continue
        row: dict[str, Any] = {
            "family": p.family,
            "point": _label(p.point),
            "seeds": " ".join(str(s) for s in sorted(p.seeds)),
            "n": p.n,
            "acc_mean": p.mean(),
            "acc_std": p.std(),
        }
        for cost in COSTS:
            row[f"{cost}_mean"], row[f"{cost}_std"] = p.mean(cost), p.std(cost)
        row["fit_s_mean"] = float(np.mean(list(p.fit_s.values())))
        row["search_cost"] = search_cost(p, found) if p.family == SEARCH else None
        row["search_cost_cpu"] = search_cost(p, found, "cpu") if p.family == SEARCH else None
        for name, fam in families.items():
            for cost in COSTS:
                d = at_equal_cost(p, fam, cost) if p.family == SEARCH else None
                for part in COMPARISON:
                    row[f"vs_{name}_{cost}_{part}"] = None if d is None else d[part]
        rows.append(row)
    return rows


def markdown(
    spec: StudySpec, rows: list[dict[str, Any]], failed: list[dict[str, Any]], note: str | None = None
) -> str:
    """The report's markdown: the points table, the comparison at equal cost, the search cost, failures.

    ``note``: a line under the title (how the latency was measured).
    """
    measured = [c for c in COSTS if any(not math.isnan(r[f"{c}_mean"]) for r in rows)]
    head = ["family", "point", "n", "test acc (%)", "params (k)", "MFLOPs", "latency (ms)", "train loop (s)"]
    lines = [f"### {spec.name}: mean ± std over seeds", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["family"],
                    r["point"] or "-",
                    str(r["n"]),
                    _fmt(r["acc_mean"], r["acc_std"], 100),
                    _fmt(r["params_mean"], r["params_std"], 1e-3, 1),
                    _fmt(r["mflops_mean"], r["mflops_std"], 1, 2),
                    _fmt(r["latency_ms_mean"], r["latency_ms_std"], 1, 3),
                    f"{r['fit_s_mean']:.0f}",
                ]
            )
            + " |"
        )
    fams = [f.name for f in spec.baselines]
    cols = [(f, c) for f in fams for c in measured]
    if cols:
        lines += [
            "",
            "Searched minus baseline accuracy at equal cost (points; 95% interval; '-': outside the family's "
            "cost range)",
            "",
            "| point | "
            + " | ".join(f"vs {f} at equal {c}" for f, c in cols)
            + " | search cost (wall; CPU) |",
            "|---|" + "---|" * (len(cols) + 1),
        ]
        for r in rows:
            if r["family"] != SEARCH:
                continue
            cells = []
            for f, c in cols:
                d, lo, hi = (r[f"vs_{f}_{c}_{k}"] for k in ("delta", "lo", "hi"))
                if d is None:
                    cells.append("-")
                elif lo is None or math.isnan(lo):
                    cells.append(f"{100 * d:+.2f}")
                else:
                    cells.append(f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
            sc, cpu = r["search_cost"], r["search_cost_cpu"]
            cells.append(("-" if sc is None else f"{sc:.2f}x") + ("" if cpu is None else f"; {cpu:.2f}x"))
            lines.append(f"| {r['point']} | " + " | ".join(cells) + " |")
    if cols:
        lines += _verdict_table(rows, cols)
    if failed:
        lines += ["", "Failed trials:", ""]
        lines += [f"- `{f['id']}`: {f.get('error', '?')}" for f in failed]
    return "\n".join(lines) + "\n"


def _verdict_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> list[str]:
    """Paired-by-seed differences with their verdicts, and the smallest difference the study can see."""
    lines = [
        "",
        "Paired by seed: searched minus baseline at equal cost, mean over seeds (points; 95% paired "
        "interval); the verdict; MDD: the smallest difference detected at 80% power with these seeds and "
        "this spread",
        "",
        "| point | " + " | ".join(f"vs {f} at equal {c}" for f, c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    mdds = []
    for r in rows:
        if r["family"] != SEARCH:
            continue
        cells = []
        for f, c in cols:
            d, lo, hi, mdd, word = (r[f"vs_{f}_{c}_{k}"] for k in ("paired", "plo", "phi", "mdd", "verdict"))
            if d is None:
                cells.append("-")
                continue
            interval = "" if math.isnan(lo) else f" [{100 * lo:+.2f}, {100 * hi:+.2f}]"
            bold = f"**{word}**" if word != "no verdict" else word
            cells.append(
                f"{100 * d:+.2f}{interval} {bold}" + ("" if math.isnan(mdd) else f" (MDD {100 * mdd:.2f})")
            )
            if not math.isnan(mdd):
                mdds.append(mdd)
        lines.append(f"| {r['point']} | " + " | ".join(cells) + " |")
    if mdds:
        lines += [
            "",
            f"Minimal detectable difference: {100 * min(mdds):.2f} to {100 * max(mdds):.2f} points; "
            f"no verdict is possible below {100 * max(mdds):.2f} points for every comparison"
            + (" (more than the 0.5 point the studies aim at: add seeds)." if max(mdds) > 0.005 else "."),
        ]
    return lines


def plot(spec: StudySpec, points: list[PointStats], cost: str, path: Path) -> Path | None:
    """Accuracy vs ``cost``: searched series, baseline families, the Pareto front ringed.

    Returns ``None`` when no trial measured ``cost``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if p.family != FOUND and not math.isnan(p.mean(cost))]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[PointStats]] = {}
    for p in shown:
        if p.family == SEARCH:
            name = f"{spec.series.split('.')[-1]}={p.point[spec.series]}" if spec.series else SEARCH
        else:
            name = f"baseline: {p.family}"
        groups.setdefault(name, []).append(p)
    for name, ps in groups.items():
        ps = sorted(ps, key=lambda p: p.mean(cost))
        base = name.startswith("baseline")
        ax.errorbar(
            [p.mean(cost) for p in ps],
            [100 * p.mean() for p in ps],
            xerr=[0 if math.isnan(p.std(cost)) else p.std(cost) for p in ps],
            yerr=[0 if math.isnan(p.std()) else 100 * p.std() for p in ps],
            marker="s" if base else "o",
            linestyle="--" if base else "-",
            capsize=3,
            label=name,
        )
        for p in ps:
            if not base:
                other = {k: v for k, v in p.point.items() if k != spec.series}
                ax.annotate(
                    _label(other),
                    (p.mean(cost), 100 * p.mean()),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
    front = pareto_front([(p.mean(cost), p.mean()) for p in shown])
    fx = sorted((shown[i].mean(cost), 100 * shown[i].mean()) for i in front)
    ax.plot([x for x, _ in fx], [y for _, y in fx], "o", ms=13, mfc="none", mec="black", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(COSTS[cost][0])
    ax.set_ylabel("test accuracy, final exit (%)")
    n = sorted({p.n for p in shown})
    ax.set_title(f"{spec.name}: mean ± std over {'/'.join(map(str, n))} seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(spec: StudySpec, study: Study, out: Path, wandb: bool = False) -> list[Path]:
    """Write the CSV, markdown and plots of ``study`` into ``out``; the files written."""
    points, failed = collect(study)
    rows = table_rows(spec, points)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    csv_path = out / f"{spec.name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["family"])
        writer.writeheader()
        writer.writerows(rows)
    written.append(csv_path)
    again = retimed(study)
    note = None
    if again is not None:
        note = (
            f"Latency: {len(again['trials'])} trials' networks retimed in one shuffled run ({RETIMED}: "
            f"{again['runner']}, {again['settings']}, fp32 full model, batch 1, on {again['machine']})."
        )
    md = markdown(spec, rows, failed, note)
    md_path = out / f"{spec.name}.md"
    md_path.write_text(md)
    written.append(md_path)
    for cost in COSTS:
        png = plot(spec, points, cost, out / f"{spec.name}_{cost}.png")
        if png is not None:
            written.append(png)
    if wandb:
        log_to_wandb(spec, rows, md, [p for p in written if p.suffix == ".png"])
    return written


def log_to_wandb(spec: StudySpec, rows: list[dict[str, Any]], md: str, pngs: list[Path]) -> None:
    """One W&B run (``study/NAME``) with the table, the markdown and the plots (offline unless logged in)."""
    import os

    import wandb

    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(project="lit_nas", name=f"study/{spec.name}", job_type="study-report", dir="runs")
    columns = list(rows[0]) if rows else []
    run.log(
        {
            "study/table": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
            "study/report": wandb.Html(f"<pre>{md}</pre>"),
            **{f"study/{p.stem.removeprefix(spec.name + '_')}": wandb.Image(str(p)) for p in pngs},
        }
    )
    run.finish()
