"""Result tables: the one table writer, the pooled bf16 sparsity count, and the standard summary of probed runs.

Every table a run, a claim experiment, a sweep cell or ``threegate compare`` writes goes through ``write_tables``:
``<out>/<prefix><name>.csv`` and ``<out>/<prefix><name>.parquet`` for each table, the same rows in both.

``pooled_sparsity`` is Def 2.2 pooled per matrix type: for each type the changed entries and the total entries of
its matrices add up, and ``"all"`` pools every matrix given. ``summary_tables`` turns probed runs into the tables of
``threegate run`` (Table 1 / Fig. 4 / Fig. 15 / Lemma F.9 at our scale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from theory.linalg import singular_values
from theory.metrics import bf16_changed_count, principal_angles_topk
from theory.naming import layer_index, matrix_type

__all__ = ["write_tables", "concat_tables", "pooled_sparsity", "summary_tables"]


def write_tables(tables: Mapping[str, pd.DataFrame], out: str | Path, *, prefix: str = "",
                 meta: Mapping[str, Any] | None = None, skip_empty: bool = False, atomic: bool = False) -> list[Path]:
    """Write each table as ``<out>/<prefix><name>.csv`` and ``.parquet``; returns the paths written.

    Parameters
    ----------
    tables : mapping of str to DataFrame
        Table name -> rows; written in the mapping's order.
    out : str or Path
        Directory (created when missing).
    prefix : str, optional
        Put before every file name (a run's name, for several runs in one folder).
    meta : mapping, optional
        When given, also ``<file>.meta.json`` next to each file (JSON of ``meta``).
    skip_empty : bool, optional
        Leave out tables with no rows.
    atomic : bool, optional
        Write each file to ``<file>.tmp`` and rename it into place, so a reader polling the folder (a live run)
        never sees a half-written table.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     paths = write_tables({"t": pd.DataFrame({"a": [1, 2]})}, d)
    ...     [p.name for p in paths], pd.read_parquet(paths[1])["a"].tolist()
    (['t.csv', 't.parquet'], [1, 2])
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, df in tables.items():
        if skip_empty and (df is None or df.empty):
            continue
        csv, parquet = out / f"{prefix}{name}.csv", out / f"{prefix}{name}.parquet"
        for path, write in ((csv, df.to_csv), (parquet, df.to_parquet)):
            target = path.with_name(path.name + ".tmp") if atomic else path
            write(target, index=False)
            if atomic:
                target.replace(path)
        for path in (csv, parquet):
            if meta is not None:
                path.with_name(path.name + ".meta.json").write_text(json.dumps(dict(meta)))
            written.append(path)
    return written


def concat_tables(frames: Iterable[pd.DataFrame | None]) -> pd.DataFrame:
    """The rows of every frame that has columns, in order (an empty frame when none has)."""
    frames = [f for f in frames if f is not None and len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pooled_sparsity(counts: Iterable[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Def 2.2 pooled per matrix type: ``(matrix_type, changed, total)`` per matrix -> one row per type and ``all``.

    Rows ``{"matrix_type", "sparsity", "changed", "total"}`` with sparsity = 1 - changed / total summed over the
    type's matrices; types in order of first appearance, ``"all"`` (every matrix) right after the first one.

    Examples
    --------
    >>> [(r["matrix_type"], r["changed"], r["total"], r["sparsity"])
    ...  for r in pooled_sparsity([("q", 1, 4), ("v", 3, 4), ("q", 0, 4)])]
    [('q', 1, 8, 0.875), ('all', 4, 12, 0.6666666666666667), ('v', 3, 4, 0.25)]
    """
    pooled: dict[str, list[int]] = {}
    for mt, changed, total in counts:
        for key in (mt, "all"):
            acc = pooled.setdefault(key, [0, 0])
            acc[0] += int(changed)
            acc[1] += int(total)
    return [{"matrix_type": mt, "sparsity": 1 - c / n, "changed": c, "total": n} for mt, (c, n) in pooled.items()]


def summary_tables(results: list, k: int | None = None) -> dict[str, pd.DataFrame]:
    """sparsity / spectrum / angles (final probed step vs step 0), kl_beta0 and clip_eps from probed runs.

    ``results`` are ``sims.tinygpt.probe.RunResult`` (or the HF backend's): each with ``kind``, ``name``,
    ``config``, ``snapshots``, ``metrics`` and ``checks``. Runs without a step-0 snapshot and a later one give no
    sparsity / spectrum / angle rows.
    """
    sparsity, spectrum, angles, klb = [], [], [], []
    for res in results:
        method = "RL" if res.kind == "rlvr" else "SFT"
        steps = res.config.get("steps")
        seed = res.config.get("seed")
        kk = k or res.config.get("probe", {}).get("k", 4)
        if 0 not in res.snapshots or len(res.snapshots) < 2:
            continue
        last = max(res.snapshots)
        base, final = res.snapshots[0], res.snapshots[last]
        counts = []
        model = res.config.get("model") or "TinyGPT"
        for name in base:
            mt, layer = matrix_type(name), layer_index(name)
            if mt == "other" or layer is None or base[name].ndim != 2:
                continue
            counts.append((mt, bf16_changed_count(base[name], final[name]), base[name].numel()))
            s0, s1 = singular_values(base[name]), singular_values(final[name])
            for i, (a, b) in enumerate(zip(s0, s1)):
                spectrum.append({"run": res.name, "layer": layer, "matrix_type": mt, "i": i, "sigma_base": a,
                                 "sigma_tuned": b, "seed": seed, "steps": steps})
            aU, aV = principal_angles_topk(base[name], final[name], kk)
            for side, arr in (("U", aU), ("V", aV)):
                for i, th in enumerate(np.atleast_1d(arr)):
                    angles.append({"run": res.name, "layer": layer, "matrix_type": mt, "side": side, "i": i,
                                   "angle_deg": float(np.degrees(th)), "k": kk, "seed": seed, "steps": steps})
        for row in pooled_sparsity(counts):
            sparsity.append({"run": res.name, "method": method, **row, "precision": res.config.get("precision"),
                             "seed": seed, "steps": steps, "model": model})
    for res in results:  # every clip-only run, with or without its own snapshots (a live run's callback keeps them)
        if res.kind == "rlvr" and res.config.get("beta", 0) == 0:
            m = res.metrics
            for _, row in m[m["metric"] == "kl_tok_base"].iterrows():
                klb.append({"run": res.name, "step": int(row["step"]), "kl": row["value"], "beta": 0.0,
                            "seed": res.config.get("seed"), "steps": res.config.get("steps"),
                            "model": res.config.get("model") or "TinyGPT"})
    clip = []
    for res in results:
        c = res.checks
        if c.empty or "lemF.9" not in set(c["result_id"]):
            continue
        for _, row in c[c["result_id"] == "lemF.9"].iterrows():
            clip.append({"run": res.name, "step": int(row["step"]), "eps": row["d_eps"],
                         "eps_low": res.config.get("eps_low"), "eps_high": res.config.get("eps_high"),
                         "violation_fraction": row["d_violation_fraction"], "k1": row["d_k1"], "k3": row["d_k3"],
                         "small_step": row["d_small_step"], "mean_len": row["d_mean_len"], "bound": row["rhs"],
                         "small_step_band_bound": row["d_small_step_band_bound"],
                         "assumptions_hold": bool(row["assumptions_hold"]), "lr": res.config.get("lr"),
                         "seed": res.config.get("seed")})
    return {"sparsity": pd.DataFrame(sparsity), "spectrum": pd.DataFrame(spectrum), "angles": pd.DataFrame(angles),
            "kl_beta0": pd.DataFrame(klb), "clip_eps": pd.DataFrame(clip)}
