"""Table schemas the figures read: one schema per figure family, one line per column.

Simulation code writes these tables (CSV or Parquet) into a results directory; ``threegate figs`` finds them by file
name — ``<schema>.csv``, ``<schema>.parquet`` or ``<schema>_<anything>.<ext>`` — or, failing that, by columns.
A sidecar ``<file>.meta.json`` (e.g. ``sparsity.csv.meta.json``) may give ``{"model": ..., "steps": ...,
"seeds": [...], "description": ...}``; it lands in ``DataFrame.attrs`` and goes into the caption.

Columns shared by the experiment tables (all optional) describe what was run and go into the caption:
``model`` (str, the model trained), ``seed`` (int, the run's seed), ``steps`` (int, total optimizer steps).

Types: ``str``, ``int``, ``float``, ``bool``. ``float?`` means NaN is allowed (e.g. a side of a check whose
assumption failed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from theory.errors import CheckpointError, InputError, NonFiniteError

__all__ = [
    "Column",
    "Schema",
    "SCHEMAS",
    "RUN_COLUMNS",
    "REGIME_COLUMNS",
    "OTHER_TABLES",
    "validate",
    "identify",
    "read_table",
    "describe_run",
    "regime_column",
    "schemas_markdown",
]


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # "str" | "int" | "float" | "float?" | "bool"
    doc: str
    required: bool = True


@dataclass(frozen=True)
class Schema:
    name: str
    paper_ref: str
    doc: str
    columns: tuple[Column, ...]

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)


def _c(name: str, dtype: str, doc: str, required: bool = True) -> Column:
    return Column(name, dtype, doc, required)


RUN_COLUMNS = (
    _c("model", "str", "model (or toy-model name) that was trained", False),
    _c("seed", "int", "random seed of the run", False),
    _c("steps", "int", "total optimizer steps of the run", False),
)

# Tables the project writes next to the figure tables that no figure draws (threegate compare / verify, the claim
# experiments), with what each is: never guessed to be a figure table from their name (``jaccard_pairs`` is
# per-matrix, not the pooled ``jaccard``; ``masked_runs_final`` holds per-run finals, not Fig. 9's curves). The
# report lists them with this note instead of failing on them.
OTHER_TABLES: dict[str, str] = {
    "jaccard_pairs": "per-matrix Jaccard of update masks (Fig. 12 draws the pooled 'jaccard' table)",
    "matrices": "threegate compare, one row per matrix and run (the summary table is computed from it)",
    "by_layer": "threegate compare, aggregates per layer",
    "by_type": "threegate compare, aggregates per matrix type",
    "compare_summary": "threegate compare's summary (shown as the summary table)",
    "verify": "threegate verify's verdicts (shown as the verdict table)",
    "counterexamples": "threegate verify's counterexamples",
    "masked_runs_final": "per-run final reward and KL of the masked runs (Fig. 9 draws 'masked_runs')",
    "lora_pissa_final": "per-run initial / final reward, KL and collapse of LoRA / PiSSA (Fig. 10 draws 'lora_pissa')",
    # threegate.callback (live runs); the live figure draws the pooled 'step_sparsity'
    "steps": "live run, one row per (step, matrix): bf16 changes since the previous step and the base",
    "steps_by_layer": "live run, the per-step counts pooled per layer",
    "steps_gate3": "live run, Gate III precision / recall per step (exact rule fed the master; update alone)",
    "steps_gate3_by_matrix": "live run, Gate III counts per step and matrix",
    "steps_timing": "live run, seconds per step and the callback's own seconds",
    "snapshot_matrices": "live run, threegate compare of each snapshot against the base, one row per matrix",
    "gate1_kl": "live run, the KL to the reference policy as the trainer logged it (Gate I)",
}

# Regime variables a check table may carry, in order of preference (with or without the ``d_`` detail prefix).
REGIME_COLUMNS = ("dW_over_gap", "beta", "step", "kl", "eps", "eta", "lr", "scale", "w")

SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in (
        Schema("checks", "Sec. 3, App. D-F", "one row per evaluated check (theory.check.Check.as_row()) + a regime", (
            _c("result_id", "str", "id of the result in theory.RESULTS, e.g. 'thm3.3-rigorous'"),
            _c("lhs", "float?", "measured left-hand side (NaN if the assumption failed before it was computed)"),
            _c("rhs", "float?", "bound (right-hand side)"),
            _c("ratio", "float?", "lhs / rhs: tightness, 1 = bound attained", False),
            _c("slack", "float?", "rhs - lhs", False),
            _c("holds", "bool", "assumptions held and lhs <= rhs + tol"),
            _c("assumptions_hold", "bool", "every hypothesis of the result held on this instance"),
            _c("failed_assumption", "str", "which hypothesis failed (empty if none)", False),
            _c("verdict", "str", "'holds' | 'violated' | 'assumption-failed'"),
            _c("dW_over_gap", "float", "regime: ||dW||_2 / gamma_k (Gate II); or beta, step, ... (any REGIME_COLUMNS)",
               False),
        )),
        Schema("bf16_updates", "Cor. 3.6, App. E", "real updates applied to bf16 weights: registered or not", (
            _c("w", "float", "the bf16 weight before the update (exactly representable in bf16)"),
            _c("delta", "float", "the update added (in the precision the simulation used)"),
            _c("changed", "bool", "stored bf16 value after the update differs from w"),
        )),
        Schema("sparsity", "Table 1", "bf16 update sparsity per run and matrix type", (
            _c("run", "str", "run label, e.g. 'RL-seed0' (one bar group per run)"),
            _c("method", "str", "'RL' or 'SFT' (any RL algorithm counts as RL)"),
            _c("matrix_type", "str", "q, k, v, o, up, gate, down (or 'all')"),
            _c("sparsity", "float", "1 - changed/total in [0, 1] (Def. 2.2, eta = 1e-3)"),
            *RUN_COLUMNS,
        )),
        Schema("step_sparsity", "Sec. 2 / Table 1 per step, Fig. 12 over steps",
               "live bf16 update counts per optimizer step, pooled by matrix type (threegate.callback)", (
            _c("step", "int", "optimizer step t (the counts compare the stored bf16 weights after step t)"),
            _c("matrix_type", "str", "q, k, v, o, up, gate, down, other, or 'all' (every tracked matrix)"),
            _c("numel", "int", "entries pooled"),
            _c("changed_prev", "int", "|M_t|: entries whose stored bf16 value changed at step t"),
            _c("changed_base", "int", "entries whose stored bf16 value differs from the base after step t"),
            _c("sparsity_step", "float", "1 - |M_t| / n: per-step bf16 update sparsity"),
            _c("sparsity_base", "float", "1 - changed_base / n: sparsity against the base (Def. 2.2)"),
            _c("jaccard_prev", "float?", "|M_t and M_{t-1}| / |M_t or M_{t-1}| (NaN at the first step)"),
            _c("baseline_prev", "float?", "independent-Bernoulli E[J] for the two densities", False),
            _c("run", "str", "run label", False),
            *RUN_COLUMNS,
        )),
        Schema("consensus", "Fig. 2", "consensus ratio C_ij = mean over R runs of the update masks", (
            _c("layer", "int", "layer index"),
            _c("matrix_type", "str", "q, k, v, o, up, gate, down"),
            _c("row", "int", "row index i"),
            _c("col", "int", "column index j"),
            _c("consensus", "float", "C_ij in [0, 1]"),
            _c("n_runs", "int", "R, number of runs averaged", False),
            *RUN_COLUMNS,
        )),
        Schema("stripes", "Fig. 3", "row / column update ratios over training steps", (
            _c("step", "int", "training step of the checkpoint"),
            _c("matrix_type", "str", "q, k, v, o, ..."),
            _c("axis", "str", "'row' (rho_i = mean_j M_ij) or 'col' (kappa_j = mean_i M_ij)"),
            _c("index", "int", "row or column index"),
            _c("update_ratio", "float", "rho_i or kappa_j in [0, 1]"),
            _c("layer", "int", "layer index", False),
            *RUN_COLUMNS,
        )),
        Schema("spectrum", "Fig. 4 (a, c)", "singular values of one matrix before and after training", (
            _c("run", "str", "run label (e.g. 'RL', 'SFT')"),
            _c("layer", "int", "layer index"),
            _c("matrix_type", "str", "q, k, v, o, ..."),
            _c("i", "int", "singular value index (0 = largest)"),
            _c("sigma_base", "float", "sigma_i(W0)"),
            _c("sigma_tuned", "float", "sigma_i(W+)"),
            *RUN_COLUMNS,
        )),
        Schema("angles", "Fig. 4 (b, d)", "principal angles between top-k singular subspaces of W0 and W+", (
            _c("run", "str", "run label"),
            _c("layer", "int", "layer index"),
            _c("matrix_type", "str", "q, k, v, o, ..."),
            _c("side", "str", "'U' (left) or 'V' (right) singular subspace"),
            _c("i", "int", "angle index within the top-k (0 = smallest angle)"),
            _c("angle_deg", "float?", "principal angle theta_i in degrees (NaN: top-k subspace not unique)"),
            _c("k", "int", "subspace dimension k", False),
            *RUN_COLUMNS,
        )),
        Schema("mask_overlap", "Fig. 5", "overlap of the RL update mask with structural masks, per layer", (
            _c("layer", "int", "layer index"),
            _c("mask", "str", "'princ', 'low', 'princ_not_low' (M_princ and not M_low), ..."),
            _c("overlap", "float?", "|M_mask and M| / |M| (NaN when M is empty)"),
            _c("random_baseline", "float", "density of M_mask (overlap of a random mask)"),
            _c("binade_baseline", "float?", "overlap predicted by weight magnitude alone: each entry changes with the "
                                            "probability measured in its bf16 binade, optional", False),
            _c("matrix_type", "str", "matrix type (panels), optional", False),
            *RUN_COLUMNS,
        )),
        Schema("rotate_overlap", "Fig. 6", "update-mask overlap with an untouched rerun after Rotate / Permute", (
            _c("layer", "int", "layer index"),
            _c("overlap", "float", "overlap of the intervened run's update mask with the rerun's"),
            _c("random_baseline", "float", "overlap expected from independent masks of the same densities"),
            _c("intervention", "str", "'none', 'rotate', 'permute' or 'rotate+permute' (applied to this layer)"),
            _c("matrix_type", "str", "matrix type (panels), optional", False),
            *RUN_COLUMNS,
        )),
        Schema("masked_runs", "Fig. 9", "KL and reward trajectories of sparse fine-tuning runs", (
            _c("mask", "str", "'dense', 'princ', 'princ_c', 'low', 'safe', 'random', ..."),
            _c("step", "int", "training step"),
            _c("kl", "float", "token-wise KL(pi || pi_ref) (nats)"),
            _c("reward", "float", "mean reward (or accuracy)"),
            *RUN_COLUMNS,
        )),
        Schema("lora_pissa", "Fig. 10", "LoRA vs PiSSA reward curves over a rank x learning-rate grid", (
            _c("method", "str", "'LoRA' or 'PiSSA'"),
            _c("rank", "int", "adapter rank"),
            _c("lr", "float", "learning rate"),
            _c("step", "int", "training step"),
            _c("reward", "float", "mean reward (or accuracy)"),
            *RUN_COLUMNS,
        )),
        Schema("jaccard", "Fig. 12", "pairwise Jaccard similarity of update masks across runs", (
            _c("run_a", "str", "first run"),
            _c("run_b", "str", "second run"),
            _c("jaccard", "float", "|A and B| / |A or B| in [0, 1]"),
            _c("matrix_type", "str", "matrix type (panels), optional", False),
            _c("baseline", "float", "independent-Bernoulli E[J] = pq/(p+q-pq), optional", False),
            *RUN_COLUMNS,
        )),
        Schema("compare_summary", "Table 1, Figs. 4-5, Sec. 3", "what fine-tuning did, per run: overall and per "
               "matrix type (the report's summary; paper_figs.summary computes it when absent)", (
            _c("run", "str", "tuned run label"),
            _c("method", "str", "training method (RL, SFT, ...); empty when unknown", False),
            _c("scope", "str", "'overall' or a matrix type (q, k, v, o, gate, up, down, other)"),
            _c("matrices", "int", "matrices pooled"),
            _c("numel", "int", "entries pooled"),
            _c("changed", "int", "entries whose stored bf16 value changed"),
            _c("sparsity", "float", "1 - changed / numel (Def. 2.2)"),
            _c("overlap_princ", "float?", "|M_princ and M| / |M| pooled (NaN when M is empty)"),
            _c("baseline_princ", "float", "|M_princ| / numel: the random baseline"),
            _c("overlap_low", "float?", "|M_low and M| / |M| pooled (NaN when M is empty)"),
            _c("baseline_low", "float", "|M_low| / numel: the random baseline"),
            _c("gate2_holds", "int", "Gate II checks (matrices x results) that hold"),
            _c("gate2_violated", "int", "Gate II checks violated"),
            _c("gate2_assumption_failed", "int", "Gate II checks whose assumption failed"),
            _c("max_angle_deg", "float?", "largest principal angle between top-k subspaces, U or V (degrees)"),
        )),
        Schema("kl_beta0", "Fig. 15", "token-wise KL to the base over training with beta = 0 (clip only)", (
            _c("run", "str", "run label"),
            _c("step", "int", "training step"),
            _c("kl", "float", "token-wise KL(pi || pi_ref) (nats)"),
            _c("beta", "float", "KL coefficient (0 for these runs)", False),
            *RUN_COLUMNS,
        )),
    )
}


def regime_column(df: pd.DataFrame) -> str | None:
    """The regime variable of a check table: ``df.attrs['regime']``, else the first of REGIME_COLUMNS present."""
    wanted = df.attrs.get("regime")
    if wanted is not None:
        if wanted not in df.columns:
            raise InputError(f"regime column {wanted!r} (from attrs) is not in the table: {list(df.columns)}")
        return wanted
    for name in REGIME_COLUMNS:
        for col in (name, f"d_{name}"):
            if col in df.columns and pd.api.types.is_numeric_dtype(df[col]) and df[col].notna().any():
                return col
    return None


def validate(df: pd.DataFrame, schema: str | Schema, *, source: str = "table") -> pd.DataFrame:
    """Check ``df`` against a schema and return a copy with typed columns.

    Raises ``InputError`` naming the table and the missing/mistyped column, ``NonFiniteError`` for NaN/Inf in a
    column that does not allow it.
    """
    sch = SCHEMAS[schema] if isinstance(schema, str) else schema
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{source}: expected a pandas DataFrame for schema {sch.name!r}, got {type(df).__name__}")
    missing = [c for c in sch.required if c not in df.columns]
    if missing:
        raise InputError(f"{source}: table for schema {sch.name!r} ({sch.paper_ref}) lacks column(s) {missing}; "
                         f"has {list(df.columns)}")
    if df.empty:
        raise InputError(f"{source}: table for schema {sch.name!r} has no rows")
    out = df.copy()
    out.attrs = dict(df.attrs)
    for col in sch.columns:
        if col.name not in out.columns:
            continue
        out[col.name] = _coerce(out[col.name], col, sch.name, source)
    return out


def _coerce(s: pd.Series, col: Column, schema: str, source: str) -> pd.Series:
    where = f"{source}: column {col.name!r} of schema {schema!r}"
    if col.dtype == "str":
        return s.astype(object).where(s.notna(), "").astype(str)
    if col.dtype == "bool":
        if s.dtype == bool:
            return s
        mapped = s.map(lambda v: {"true": True, "false": False, "1": True, "0": False}.get(str(v).strip().lower()))
        if mapped.isna().any():
            bad = s[mapped.isna()].iloc[0]
            raise InputError(f"{where} must be boolean, found {bad!r}")
        return mapped.astype(bool)
    num = pd.to_numeric(s, errors="coerce")
    if (num.isna() & s.notna()).any():
        bad = s[num.isna() & s.notna()].iloc[0]
        raise InputError(f"{where} must be numeric, found {bad!r}")
    arr = num.to_numpy(dtype=np.float64)
    if col.dtype != "float?" and not np.isfinite(arr).all():
        raise NonFiniteError(f"{where} has NaN/Inf in {int((~np.isfinite(arr)).sum())} row(s)")
    if col.dtype == "int":
        if not np.all(arr == np.round(arr)):
            raise InputError(f"{where} must hold integers")
        return num.astype(np.int64)
    return num.astype(np.float64)


def identify(df: pd.DataFrame, filename: str | Path | None = None) -> str | None:
    """Schema name of a table: by file name (``<schema>[_*].csv|parquet``) first, then by its columns."""
    if filename is not None:
        stem = Path(filename).name.split(".")[0]
        if stem in OTHER_TABLES:
            return None
        for name in sorted(SCHEMAS, key=len, reverse=True):  # 'kl_beta0' before a hypothetical 'kl'
            if stem == name or stem.startswith(name + "_"):
                return name
    cols = set(df.columns)
    matches = [n for n, s in SCHEMAS.items() if set(s.required) <= cols]
    if not matches:
        return None
    return max(matches, key=lambda n: len(SCHEMAS[n].required))  # the most specific schema


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet table and its optional ``<file>.meta.json`` sidecar into ``attrs``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"results table {str(p)!r} does not exist")
    try:
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
        elif p.suffix == ".csv":
            df = pd.read_csv(p)
        else:
            raise InputError(f"results table {str(p)!r}: unsupported extension {p.suffix!r} (use .csv or .parquet)")
    except (InputError, CheckpointError):
        raise
    except Exception as e:  # corrupt file: name it
        raise InputError(f"results table {str(p)!r} could not be read: {type(e).__name__}: {e}") from e
    meta = p.with_name(p.name + ".meta.json")
    if meta.is_file():
        try:
            attrs = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"metadata file {str(meta)!r} is not valid JSON: {e}") from e
        if not isinstance(attrs, dict):
            raise InputError(f"metadata file {str(meta)!r} must hold a JSON object")
        df.attrs.update(attrs)
    return df


def _uniq(values: pd.Series) -> list:
    return sorted(pd.unique(values.dropna()).tolist(), key=str)


def describe_run(df: pd.DataFrame, attrs: Mapping | None = None) -> str:
    """One sentence saying what was run: attrs ``description`` if given, else model / steps / seeds / runs."""
    attrs = dict(df.attrs) if attrs is None else dict(attrs)
    if attrs.get("description"):
        return str(attrs["description"])
    parts = []
    models = attrs.get("model") or (_uniq(df["model"]) if "model" in df.columns else None)
    if models:
        parts.append("model " + (", ".join(map(str, models)) if isinstance(models, list) else str(models)))
    steps = attrs.get("steps")
    if steps is None and "steps" in df.columns:
        steps = ", ".join(str(int(s)) for s in _uniq(df["steps"]))
    elif steps is None and "step" in df.columns and pd.api.types.is_numeric_dtype(df["step"]):
        last = df["step"].max()  # NaN max: rows without a step (e.g. theory campaigns beside training steps)
        steps = int(last) if pd.notna(last) else None
    if steps is not None and steps != "":
        parts.append(f"{steps} steps")
    seeds = attrs.get("seeds", attrs.get("seed"))
    if seeds is None and "seed" in df.columns:
        seeds = _uniq(df["seed"])
    if seeds is not None and seeds != []:
        seeds = seeds if isinstance(seeds, list) else [seeds]
        parts.append(("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(s) for s in seeds))
    if "source" in df.columns:  # threegate verify: 'theory' campaigns or 'sim' training steps
        parts.append("source " + ", ".join(map(str, _uniq(df["source"]))))
    if "run" in df.columns:
        runs = _uniq(df["run"])
        parts.append(f"{len(runs)} run(s): " + ", ".join(map(str, runs[:8])) + (" ..." if len(runs) > 8 else ""))
    return "Run: " + "; ".join(parts) if parts else "Run: not described (no model/steps/seed columns or metadata)"


def schemas_markdown() -> str:
    """Every schema as a Markdown section (file name, paper reference, one line per column), for READMEs."""
    out = []
    for s in SCHEMAS.values():
        out.append(f"### `{s.name}` ({s.paper_ref}): {s.doc}\n")
        out.append("| column | type | required | meaning |\n|---|---|---|---|")
        out += [f"| `{c.name}` | {c.dtype} | {'yes' if c.required else 'no'} | {c.doc} |" for c in s.columns]
        out.append("")
    return "\n".join(out)
