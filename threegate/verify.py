"""``threegate verify``: evaluate every result of the paper and print one verdict row per result id.

For each id in ``theory.RESULTS`` the result's seeded ``campaign`` is run (a family of concrete instances: synthetic
matrices with controlled spectra, exact policies, all bf16 bit patterns, ...). Each row reports the instances tried,
how many met the assumptions, the worst ratio lhs/rhs among those, and the verdict:

- ``holds``      every instance that met the assumptions satisfied the bound;
- ``violated``   some instance broke it — for a result registered ``exact=False`` (the paper's as-stated,
                 first-order forms) that is a finding, for an exact theorem it is a bug; the first counterexample
                 is saved to ``counterexamples.json``.

Instances whose check is ``indeterminate`` (lhs and rhs within the error model's tolerance, e.g. an attained
bound) are counted in the notes and neither hold nor violate.

Then the simulation checks (the same results on real RLVR/SFT training steps of the small transformer) are
appended, then one row per **claim** of the paper's experiments at small scale (``sims.claims``: every claim
experiment of ``sims.experiments.registry.CLAIM_EXPERIMENTS`` run at its ``fast`` preset by default, ``--claims default`` for the full runs, ``--claims none`` to skip;
source ``claim:<experiment>``, verdict ``reproduced`` / ``not reproduced`` / ``inconclusive``, the reason in the
notes; the experiment's tables go to ``<out>/claims/<experiment>/``), and the HTML report is written.
A fast-preset verdict is computed from a run of seconds with one or two seeds: it is usually ``inconclusive`` and
says so; the claim's real verdict comes from ``--claims default`` or ``threegate run <experiment>``.
The ``seeds`` column of a claim row says how many seeds its observed effect would need (``seeds_cell``): under the
seed rule (``n``, ``never`` or ``?``) and, after ``/``, under a one-sided t-test at level 0.05 with power 0.8
(``theory.power``); the CSV / JSON carry ``seeds_needed``, ``seeds_needed_note`` and ``t_test_seeds``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

import theory
from paper_figs.report import write_report
from sims.claims.base import Verdict, write_claim_run
from sims.experiments import registry, sim_verify
from theory.check import Check, Result
from threegate import tutorials

GATE_ORDER = {"I": 0, "II": 1, "III": 2}


@dataclass
class Row:
    result_id: str
    gate: str
    source: str
    instances: int
    assumptions_met: int
    violations: int
    worst_ratio: float
    verdict: str
    exact: bool
    notes: str
    seconds: float
    counterexample: dict[str, Any] | None = field(default=None, repr=False)
    #: Claim rows: seeds the observed effect needs under the seed rule (None: ``seeds_needed_note`` says why), and
    #: the seeds a one-sided t-test would need (``sims.claims.base``, ``theory.power``); None on theory rows.
    seeds_needed: int | None = None
    seeds_needed_note: str = ""
    t_test_seeds: int | None = None

    def public(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("counterexample")
        return d


def assumption_name(text: str | None) -> str:
    """The assumption without the measured numbers in its trailing parentheses, so equal failures group."""
    return re.sub(r"\s*\([^()]*(?<![A-Za-z_])[-+]?\d[^()]*\)\s*$", "", text or "?")


def summarize(result: Result, checks: Iterable[Check], *, source: str, seconds: float = 0.0) -> tuple[Row, list[dict]]:
    """Aggregate the checks of one result into a verdict row (and the flat check rows)."""
    rows, n, met, viol, worst, first_bad, noise, undecided = [], 0, 0, 0, -math.inf, None, 0, 0
    failed: Counter[str] = Counter()
    for i, c in enumerate(checks):
        n += 1
        r = c.as_row()
        r.update(instance=i, source=source)
        rows.append(r)
        if c.verdict == "indeterminate":
            undecided += 1  # the error model cannot separate lhs from rhs: neither holds nor violated
            continue
        if not c.assumptions_hold:
            failed[assumption_name(c.failed_assumption)] += 1
            continue
        met += 1
        if c.holds and c.tol > 0 and abs(c.lhs) <= c.tol:
            noise += 1  # both sides at the rounding-noise floor: the ratio of two roundoffs says nothing
        elif math.isfinite(c.ratio):
            worst = max(worst, c.ratio)
        if not c.holds:
            viol += 1
            if first_bad is None:
                first_bad = r
    if met == 0:
        verdict = "no instance met the assumptions"
    elif viol:
        verdict = "violated"
    else:
        verdict = "holds"
    notes = []
    if not result.exact:
        notes.append("as stated (not a theorem)" if viol else "as stated")
    elif viol:
        notes.append("EXACT RESULT VIOLATED: a bug or a wrong statement")
    if failed:
        notes.append("assumption failed: " + ", ".join(f"{k} x{v}" for k, v in failed.most_common(3)))
    if undecided:
        notes.append(f"{undecided} indeterminate (lhs and rhs within the error model's tolerance: attained bounds "
                     "or the float64 noise floor)")
    if noise:
        notes.append(f"{noise} at the float64 noise floor (left out of the worst ratio)")
    row = Row(
        result_id=result.id, gate=result.gate, source=source, instances=n, assumptions_met=met, violations=viol,
        worst_ratio=worst if met else math.nan, verdict=verdict, exact=result.exact, notes="; ".join(notes),
        seconds=round(seconds, 2), counterexample=first_bad,
    )
    return row, rows


def run_campaigns(seed: int = 0, ids: list[str] | None = None, progress: bool = True) -> tuple[list[Row], list[dict]]:
    verdicts, all_rows = [], []
    results = sorted(theory.RESULTS.values(), key=lambda r: (GATE_ORDER.get(r.gate, 9), r.id))
    for res in results:
        if ids and res.id not in ids:
            continue
        if res.campaign is None:
            verdicts.append(Row(res.id, res.gate, "theory", 0, 0, 0, math.nan, "no campaign", res.exact, "", 0.0))
            continue
        t0 = time.perf_counter()
        checks = list(res.campaign(seed))
        row, rows = summarize(res, checks, source="theory", seconds=time.perf_counter() - t0)
        if progress:
            print(f"  {res.id:18s} {row.instances:6d} instances  {row.verdict}  ({row.seconds:.1f}s)", file=sys.stderr)
        verdicts.append(row)
        all_rows.extend(rows)
    return verdicts, all_rows


def run_simulation_checks(seed: int, budget: str) -> tuple[list[Row], list[dict]]:
    """Bound checks on real RLVR / SFT steps of the small transformer (``sims.experiments.sim_verify``)."""
    df: pd.DataFrame = sim_verify.default_simulation_checks(seed=seed, budget=budget)
    verdicts, rows = [], []
    for (rid, source), g in df.groupby(["result_id", "source"], sort=True):
        res = theory.RESULTS.get(rid)
        exact = res.exact if res is not None else True
        met = g[g["assumptions_hold"].astype(bool)]
        viol = met[~met["holds"].astype(bool)]
        ratios = pd.to_numeric(met["ratio"], errors="coerce")
        ratios = ratios[ratios.map(math.isfinite)]
        failed = g.loc[~g["assumptions_hold"].astype(bool), "failed_assumption"].map(assumption_name).value_counts()
        notes = []
        if not exact:
            notes.append("as stated")
        elif len(viol):
            notes.append("EXACT RESULT VIOLATED on a real step")
        if len(failed):
            notes.append("assumption failed: " + ", ".join(f"{k} x{v}" for k, v in failed.head(3).items()))
        estimators = sorted(map(str, g["fisher_estimator"].dropna().unique())) if "fisher_estimator" in g else []
        if estimators:
            notes.append("Fisher: " + ", ".join(estimators))
        verdicts.append(Row(
            result_id=rid, gate=res.gate if res else "?", source=f"sim:{source}", instances=len(g),
            assumptions_met=len(met), violations=len(viol),
            worst_ratio=float(ratios.max()) if len(ratios) else math.nan,
            verdict=("no instance met the assumptions" if len(met) == 0 else "violated" if len(viol) else "holds"),
            exact=exact, notes="; ".join(notes), seconds=0.0,
            counterexample=viol.iloc[0].to_dict() if len(viol) else None,
        ))
        rows.extend(g.assign(source=f"sim:{source}").to_dict("records"))
    return verdicts, rows


def run_claim_experiments(seed: int, budget: str, out: Path) -> list[Row]:
    """One Row per claim verdict of every claim experiment (``sims.experiments.registry.CLAIM_EXPERIMENTS``) at
    ``budget``: ``result_id`` the claim's id, the statement and the reason in the notes.

    An experiment that raises gets a row with verdict ``error`` naming the exception; the others still run, and
    every finished experiment's tables are written before the next starts."""
    rows = []
    for name, fn in sorted(registry.CLAIM_EXPERIMENTS.items()):
        t0 = time.perf_counter()
        print(f"  claim experiment {name} ({budget})", file=sys.stderr)
        try:
            run = fn({name: {"preset": budget}, "seed": seed})
        except Exception as e:  # noqa: BLE001 - one broken experiment must not hide the others' verdicts
            rows.append(Row(name, "", f"claim:{name}", 0, 0, 0, math.nan, "error", False,
                            f"{type(e).__name__}: {e}", time.perf_counter() - t0))
            continue
        write_claim_run(run, out / "claims" / name)
        rows += [claim_row(v, name, budget, time.perf_counter() - t0) for v in run.verdicts]
    return rows


def claim_row(v: Verdict, experiment: str, budget: str, seconds: float) -> Row:
    """The verify row of claim verdict ``v`` of ``experiment`` run at preset ``budget``: its power numbers
    (``seeds_needed``, its note, ``t_test_seeds``) carried as the verdict gives them."""
    seeds = v.numbers.get("seeds")
    what = f"{v.statement}: " if v.statement else ""
    return Row(v.id, "", f"claim:{experiment}", len(seeds) if isinstance(seeds, list) else 0, 0, 0, math.nan,
               v.verdict, False, f"[{budget} preset] {what}{v.reason}", seconds, seeds_needed=v.seeds_needed,
               seeds_needed_note=v.seeds_needed_note, t_test_seeds=v.numbers.get("t_test_seeds"))


def seeds_cell(r: Row) -> str:
    """The ``seeds`` column: seeds needed under the seed rule / under a one-sided t-test (claim rows only).

    ``n`` when the rule reaches its verdict with probability >= 0.8 at n seeds, ``never`` when no n <= 64 does (the
    spread grows with n), ``?`` when it cannot be estimated (one seed, or no per-seed effects); after ``/`` the
    t-test's n (``-`` when none)."""
    if not r.source.startswith("claim:") or r.verdict == "error":
        return ""
    rule = (str(r.seeds_needed) if r.seeds_needed is not None
            else "never" if r.seeds_needed_note.startswith("unreachable") else "?")
    return f"{rule}/{r.t_test_seeds if r.t_test_seeds is not None else '-'}"


def format_table(rows: list[Row]) -> str:
    w = max([18, *(len(r.result_id) for r in rows)])
    ws = max([10, *(len(r.source) for r in rows)])
    head = (f"{'result':{w}s} {'gate':4s} {'source':{ws}s} {'inst':>6s} {'met':>6s} {'viol':>5s} {'worst lhs/rhs':>13s} "
            f"{'seeds':>9s}  verdict / notes")
    lines = [head, "-" * len(head)]
    for r in rows:
        wr = "—" if not math.isfinite(r.worst_ratio) else f"{r.worst_ratio:.4g}"
        lines.append(
            f"{r.result_id:{w}s} {r.gate:4s} {r.source:{ws}s} {r.instances:6d} {r.assumptions_met:6d} {r.violations:5d} "
            f"{wr:>13s} {seeds_cell(r):>9s}  {r.verdict}{' — ' + r.notes if r.notes else ''}"
        )
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return x


def write_outputs(out: Path, verdicts: list[Row], check_rows: list[dict], json_path: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([v.public() for v in verdicts])
    table.to_csv(out / "verify.csv", index=False)
    payload = _jsonable([v.public() for v in verdicts])
    (out / "verify.json").write_text(json.dumps(payload, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=1))
    ces = {f"{v.result_id}@{v.source}": v.counterexample for v in verdicts if v.counterexample is not None}
    (out / "counterexamples.json").write_text(json.dumps(_jsonable(ces), indent=1))
    if check_rows:
        pd.DataFrame(check_rows).to_csv(out / "checks.csv", index=False)


def measured_bf16_updates(seed: int = 0, n: int = 4000) -> pd.DataFrame:
    """Real bf16 updates as training makes them: torch adds an fp32 step to the fp32 copy of a bf16 weight and casts
    the sum back to bf16. ``changed`` is measured on the stored result (not predicted), so the Gate III figure can
    overlay it on the exact realization threshold. Weights span four binades and include exact powers of two (where
    the downward threshold is a quarter ULP); steps are scattered around the half-ULP threshold in both directions.
    """
    rng = np.random.default_rng(seed)
    exps = rng.integers(-3, 1, size=n).astype(np.float64)
    mant = np.where(rng.random(n) < 0.2, 1.0, 1.0 + rng.integers(0, 128, size=n) / 128.0)  # 20% powers of two
    w = torch.tensor(np.ldexp(mant, exps.astype(int)) * rng.choice([-1.0, 1.0], size=n), dtype=torch.bfloat16)
    w32 = w.to(torch.float32)
    half_ulp = np.ldexp(1.0, (exps - 8).astype(int))  # 1/2 ULP = 2^(e-8) for |w| in [2^e, 2^(e+1))
    delta = torch.tensor(half_ulp * rng.uniform(0.1, 2.0, size=n) * rng.choice([-1.0, 1.0], size=n),
                         dtype=torch.float32)
    stored = (w32 + delta).to(torch.bfloat16)  # the fp32 master step, then the bf16 stored copy
    changed = (stored.view(torch.int16) != w.view(torch.int16)).numpy()
    return pd.DataFrame({"w": w32.numpy().astype(np.float64), "delta": delta.numpy().astype(np.float64),
                         "changed": changed})


def write_bf16_updates(out: Path, seed: int) -> None:
    table = measured_bf16_updates(seed)
    table.to_csv(out / "bf16_updates.csv", index=False)
    meta = {"semantics": "fp32", "description": f"{len(table)} torch updates: bf16 weight -> fp32, + fp32 step, "
            f"-> bf16 (round to nearest even), seed {seed}; 'changed' measured on the stored bits"}
    (out / "bf16_updates.csv.meta.json").write_text(json.dumps(meta))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="write the verdict rows as JSON to this file")
    p.add_argument("--out", default="results/verify", help="directory for tables, counterexamples and the report")
    p.add_argument("--only", nargs="*", default=None, help="restrict to these result ids")
    p.add_argument("--no-sims", action="store_true", help="skip the checks on real training steps")
    p.add_argument("--sim-budget", default="default", choices=["fast", "default"])
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    p.add_argument("--claims", default="fast", choices=["none", "fast", "default"],
                   help="run the paper's claim experiments at this preset and list their verdicts (default fast)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    print(f"threegate verify: {len(theory.RESULTS)} results registered; running their campaigns (seed {args.seed})",
          file=sys.stderr)
    verdicts, check_rows = run_campaigns(args.seed, args.only)
    out = Path(args.out)
    write_outputs(out, verdicts, check_rows, args.json_path)  # theory part saved before the long simulations
    write_bf16_updates(out, args.seed)
    if not args.no_sims:
        print("threegate verify: bound checks on real RLVR / SFT steps of the small transformer", file=sys.stderr)
        sv, srows = run_simulation_checks(args.seed, args.sim_budget)
        verdicts += sv
        check_rows += srows
        write_outputs(out, verdicts, check_rows, args.json_path)
    if args.claims != "none":
        print(f"threegate verify: the paper's claims at small scale ({args.claims} preset)", file=sys.stderr)
        verdicts += run_claim_experiments(args.seed, args.claims, out)
        write_outputs(out, verdicts, check_rows, args.json_path)
    print(format_table(verdicts))
    if not args.no_report:
        page = write_report(out, out / "report", tutorials=tutorials.read_executed(out))
        print(f"report: {page}")
    bad_exact = [v for v in verdicts if v.exact and v.verdict == "violated"]
    errors = [v for v in verdicts if v.verdict == "error"]
    print(f"\n{len(verdicts)} rows in {time.perf_counter() - t0:.0f}s; tables in {out}/"
          + (f"; {len(bad_exact)} EXACT results violated" if bad_exact else "")
          + (f"; {len(errors)} claim experiments FAILED to run" if errors else ""))
    return 1 if bad_exact or errors else 0
