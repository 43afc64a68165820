"""The report page as a reader opens it: summary first, the real results folder named, several compares of one base
in one report (one Table 1, Figs. 4 / 5 per method), the project's own tables never an error.

The two-compare folder is the session fixture ``two_compares`` (tests/conftest.py): real ``threegate compare`` runs
on tiny bf16 checkpoints whose changed entries are known exactly.
"""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from paper_figs import collect, summary
from tests.conftest import TWO_COMPARES_CHANGED
from tests.test_figures_reader import assert_readable
from threegate.cli import main

N_MATRICES, ENTRIES = 7, 8 * 6  # per checkpoint: 2 layers x (q, v, up) + the embedding; 8 x 6 each


def jobs_of(results):
    found = collect.read_all(results, results / "report")
    collect.assign_methods(found)
    errors = []
    jobs = {j.slug: j for j in collect.figure_jobs(found, errors)}
    assert errors == []
    return jobs


def test_two_compares_render_into_one_report_with_one_table1(two_compares):
    results, rep = two_compares
    assert rep.errors == []
    slugs = [f.slug for f in rep.figures]
    assert slugs.count("table-1-sparsity") == 1
    assert {"fig-4-spectrum-rl", "fig-4-spectrum-sft", "fig-5-mask-overlap-rl", "fig-5-mask-overlap-sft"} <= set(slugs)
    assert not [s for s in slugs if re.search(r"-\d+$", s)], slugs
    assert not list((results / "report").glob("*-2.png"))
    assert len(slugs) == len(set(slugs)) == len(list((results / "report").glob("*.png")))


def test_table1_shows_every_method_and_figs_4_5_name_theirs(two_compares):
    results, _ = two_compares
    jobs = jobs_of(results)
    t1 = jobs["table-1-sparsity"].draw()
    (leg,) = [ax.get_legend() for ax in t1.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in leg.get_texts()] == ["RL", "SFT"]
    assert_readable(t1)
    for method in TWO_COMPARES_CHANGED:
        fig5 = jobs[f"fig-5-mask-overlap-{method.lower()}"].draw()
        assert_readable(fig5)
        shown = [ax for ax in fig5.axes if ax.get_visible() and ax.lines]
        assert {ax.get_ylabel() for ax in shown} == {f"overlap with {method} update mask"}
        assert "other" not in {ax.get_title() for ax in shown}  # the embedding (layer -1) is not plotted
        assert all(min(line.get_xdata()) >= 0 for ax in shown for line in ax.lines)
        other = "SFT" if method == "RL" else "RL"
        assert other not in fig5.threegate_title and other not in fig5.threegate_caption
        fig4 = jobs[f"fig-4-spectrum-{method.lower()}"].draw()
        assert f"({method})" in fig4.threegate_title and all(method in ax.get_title() for ax in fig4.axes
                                                             if ax.get_title())
        assert_readable(fig4)


def test_summary_counts_are_the_known_changed_entries(two_compares):
    results, rep = two_compares
    s = rep.summary
    # both tuned files are model.safetensors: the run labels stay apart by folder
    assert list(dict.fromkeys(s["run"])) == ["RL/model", "SFT/model"]
    for method, n in TWO_COMPARES_CHANGED.items():
        rows = s[s["method"] == method]
        assert rows["scope"].iloc[0] == "overall"
        overall = rows.iloc[0]
        assert (overall["matrices"], overall["numel"], overall["changed"]) == (N_MATRICES, N_MATRICES * ENTRIES,
                                                                               N_MATRICES * n)
        assert Fraction(overall["sparsity"]) == pytest.approx(1 - Fraction(n, ENTRIES), abs=2 ** -52)
        q = rows[rows["scope"] == "q"].iloc[0]
        assert (q["matrices"], q["numel"], q["changed"]) == (2, 2 * ENTRIES, 2 * n)
        assert set(rows["scope"]) == {"overall", "q", "v", "up", "other"}
        # Gate II: every matrix gets every Gate II result once
        gate = overall[["gate2_holds", "gate2_violated", "gate2_assumption_failed"]].sum()
        assert gate == N_MATRICES * len(summary.gate2_ids())
        # the largest angle agrees with the angles table compare wrote (an independent table)
        ang = pd.read_parquet(results / method / "angles.parquet")
        assert overall["max_angle_deg"] == pytest.approx(ang["angle_deg"].max(), rel=1e-12)
        assert 0 <= overall["baseline_low"] <= 1 and 0 <= overall["overlap_princ"] <= 1


def test_page_opens_with_the_summary_and_names_the_real_folder(two_compares):
    results, rep = two_compares
    page = rep.page.read_text(encoding="utf-8")
    assert re.search(r"</h1>\s*<div id=\"summary\"><div class=\"scroll\"><table id=\"summary-table\">", page)
    assert f"Results folder: <code>{results.resolve()}</code>" in page
    assert "verify.csv" not in page and "threegate verify</code>)" not in page  # a compare, not a verify folder
    # Table 1 and the paper's figures before any Gate II scatter plot
    first_check = min(page.index(f'id="fig-{f.slug}"') for f in rep.figures if f.slug.startswith("check-"))
    assert page.index('id="fig-table-1-sparsity"') < page.index('id="fig-fig-5-mask-overlap-rl"') < first_check
    assert page.index('id="summary-table"') < page.index("<figure")
    for side in ("matrices.parquet", "by_type.parquet"):
        assert f"RL/{side}" in page  # listed under "Tables without a figure", not as an error


def test_compare_renders_its_report_from_its_output_folder_not_a_temporary_one(tmp_path, monkeypatch):
    from paper_figs import report
    from threegate import compare

    calls = []

    def fake_render_all(results_dir, out_dir):
        calls.append((results_dir, out_dir))
        return report.Report(page=out_dir / "index.html")

    monkeypatch.setattr(report, "render_all", fake_render_all)
    out = tmp_path / "R" / "RL"
    assert compare._render_figures(out) == out / "report" / "index.html"
    assert calls == [(out, out / "report")]  # the real folder: the page names it and finds matrices.parquet


def test_summary_from_matrices_pools_counts_rather_than_averaging_ratios():
    m = pd.DataFrame([
        dict(run="r", method="RL", matrix_type="q", numel=100, changed=10, inter_princ=4, size_princ=50, inter_low=1,
             size_low=50, angle_U_max_deg=3.0, angle_V_max_deg=5.0, **{"check_thm3.3": "holds"}),
        dict(run="r", method="RL", matrix_type="q", numel=10, changed=9, inter_princ=9, size_princ=5, inter_low=0,
             size_low=5, angle_U_max_deg=np.nan, angle_V_max_deg=np.nan, **{"check_thm3.3": "violated"}),
        dict(run="r", method="RL", matrix_type="o", numel=20, changed=0, inter_princ=0, size_princ=10, inter_low=0,
             size_low=10, angle_U_max_deg=1.0, angle_V_max_deg=0.5, **{"check_thm3.3": "assumption-failed"}),
    ])
    s = summary.summary_from_matrices(m).set_index("scope")
    assert list(s.index) == ["overall", "q", "o"]
    q = s.loc["q"]
    assert (q["numel"], q["changed"]) == (110, 19)
    assert q["sparsity"] == 1 - 19 / 110  # pooled; the mean of ratios would be 1 - (0.1 + 0.9) / 2 = 0.5
    assert q["overlap_princ"] == 13 / 19 and q["baseline_princ"] == 55 / 110
    assert (q["gate2_holds"], q["gate2_violated"], q["gate2_assumption_failed"]) == (1, 1, 0)
    assert q["max_angle_deg"] == 5.0
    assert np.isnan(s.loc["o", "overlap_princ"])  # nothing changed: no overlap
    assert s.loc["overall", "changed"] == 19 and s.loc["overall", "gate2_assumption_failed"] == 1


def test_summary_of_an_experiment_folder_pools_its_sparsity_counts():
    from theory.check import make_check

    sp = pd.DataFrame([dict(run="rlvr", method="RL", matrix_type=t, sparsity=1 - c / n, changed=c, total=n)
                       for t, c, n in (("q", 3, 64), ("o", 10, 128), ("all", 13, 192))])
    checks = pd.DataFrame([{**make_check(rid, 0.5, 1.0).as_row(), "run": "rlvr", "matrix": name}
                           for rid in ("thm3.3", "cor3.4-weyl", "eq7")  # eq7 is Gate I: not counted
                           for name in ("blocks.0.attn.q.weight", "blocks.0.attn.o.weight", "lm_head.weight")])
    angles = pd.DataFrame([dict(run="rlvr", layer=0, matrix_type="q", side="U", i=0, angle_deg=7.5)])
    s = summary.summary_tables({"sparsity": [sp], "checks": [checks], "angles": [angles]}).set_index("scope")
    assert (s.loc["overall", "numel"], s.loc["overall", "changed"]) == (192, 13)  # the blocks pooled, not "all"
    assert s.loc["overall", "sparsity"] == 1 - 13 / 192 and s.loc["q", "sparsity"] == 1 - 3 / 64
    assert s.loc["overall", "gate2_holds"] == 2 * 3 and s.loc["q", "gate2_holds"] == 2
    assert s.loc["other", "gate2_holds"] == 2 and np.isnan(s.loc["other", "sparsity"])  # lm_head: checks only
    assert s.loc["overall", "max_angle_deg"] == 7.5 and np.isnan(s.loc["o", "max_angle_deg"])
    assert "means over layers" in summary.summary_tables({"sparsity": [sp]}).attrs["basis"]


def test_summary_uses_compare_summary_when_written():
    m = pd.DataFrame([dict(run="r", matrix_type="q", numel=10, changed=1)])
    written = pd.DataFrame([{c: 0 for c in summary.SUMMARY_COLUMNS} | dict(run="r", method="SFT", scope="overall",
                                                                         numel=999, changed=7, sparsity=0.25)])
    got = summary.summary_tables({"compare_summary": [written], "matrices": [m]})
    assert list(got["numel"]) == [999] and list(got["method"]) == ["SFT"]  # the matrices of run r are not re-added
    got = summary.summary_tables({"matrices": [m]})
    assert list(got["numel"]) == [10, 10] and list(got["scope"]) == ["overall", "q"]


def test_the_project_tables_without_a_figure_and_empty_tables_are_not_errors(tmp_path, capsys):
    from sims.claims.base import ClaimRun, write_claim_run
    from sims.claims.peft import final_values, summarize_adapter_runs

    curves = pd.DataFrame([dict(mask=m, seed=0, step=s, kl=0.01 * s, reward=0.1 * s * (i + 1))
                           for i, m in enumerate(("dense", "safe")) for s in (0, 5, 10)])
    adapters = pd.DataFrame([dict(method=m, rank=2, lr=1e-3, seed=0, step=s, kl=0.01 * s, reward=0.05 * s)
                             for m in ("LoRA", "PiSSA") for s in (0, 5, 10)])
    tables = {"masked_runs": curves, "masked_runs_final": final_values(curves, ["seed", "mask"]),
              "lora_pissa": adapters, "lora_pissa_final": summarize_adapter_runs(adapters),
              "kl_beta0": pd.DataFrame()}  # the registry writes an empty kl_beta0 when no run had beta = 0
    write_claim_run(ClaimRun([], tables, []), tmp_path / "res")
    assert main(["figs", str(tmp_path / "res"), "--out", str(tmp_path / "site")]) == 0
    out = capsys.readouterr()
    assert "2 figure(s) written" in out.out and "could not draw" not in out.err
    page = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "masked_runs_final.parquet</code>: per-run final reward and KL" in page
    assert "lora_pissa_final.parquet</code>: per-run initial / final reward" in page
    assert "kl_beta0.parquet</code>: empty table: nothing to draw" in page


def test_a_verify_folder_without_its_verdict_file_says_so(tmp_path):
    from paper_figs import report
    from theory.check import make_check

    d = tmp_path / "res"
    d.mkdir()
    pd.DataFrame([{**make_check("cor3.4-weyl", 0.5, 1.0).as_row(), "source": "theory"}]).to_csv(d / "checks.csv",
                                                                                               index=False)
    pd.DataFrame({"w": [1.0], "delta": [2.0 ** -7], "changed": [True]}).to_csv(d / "bf16_updates.csv", index=False)
    page = report.render_all(d, d / "report").page.read_text(encoding="utf-8")
    assert "No <code>verify.csv</code>" in page and "run <code>threegate verify</code>" in page
    assert re.search(r"</h1>\s*<div id=\"summary\"", page)


@pytest.mark.slow
def test_a_one_step_experiment_draws_not_enough_data_panels(tmp_path):
    """``threegate run rl_vs_sft`` with one training step (the issue's case): eq7 and Fig. 15 say "not enough data
    (1 ...)" instead of an empty axis, and ``figs`` exits 0."""
    from paper_figs import paper_figs as pf
    from paper_figs import theory_figs as tf
    from paper_figs.style import no_data_texts

    cfg = tmp_path / "one.toml"
    cfg.write_text('seed = 0\n[pretrain]\npreset = "fast"\ncache_dir = ".cache/threegate"\n'
                   '[rlvr]\ntask = "counting"\nsteps = 1\nlr = 3e-4\nbeta = 0.0\n'
                   '[rlvr.probe]\nn_eval_prompts = 8\nn_fisher_rollouts = 8\n'
                   '[sft]\nsteps = 1\nlr = 1e-3\n[sft.probe]\nn_eval_prompts = 8\nn_fisher_rollouts = 8\n')
    assert main(["run", "rl_vs_sft", "--config", str(cfg), "--out", str(tmp_path / "one")]) == 0
    assert main(["figs", str(tmp_path / "one")]) == 0
    checks = pd.read_parquet(tmp_path / "one" / "checks.parquet")
    eq7 = tf.fig_theory_vs_empirical(checks, "eq7")
    assert any("not enough data (1 training step)" in t for t in no_data_texts(eq7))
    fig15 = pf.fig15_kl_beta0(pd.read_parquet(tmp_path / "one" / "kl_beta0.parquet"))
    assert any("not enough data (1 step)" in t for t in no_data_texts(fig15))
    assert_readable(eq7)
    assert_readable(fig15)


def test_summary_style_and_outputs_examples_run():
    import doctest

    from paper_figs import outputs, style

    for mod, at_least in ((summary, 3), (style, 2), (outputs, 5)):
        result = doctest.testmod(mod)
        assert result.attempted >= at_least and result.failed == 0, mod.__name__


def test_a_compare_without_method_keeps_table1_and_its_legend(tmp_path):
    """``threegate compare BASE TUNED`` (no ``--method``: compare labels the run "tuned"). Found by the slow SmolLM2
    compare: the report turned the unnamed method into "", matplotlib drops empty legend labels, the figure warned
    and the page listed Table 1 as an error instead of drawing it."""
    import warnings

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    base = {f"model.layers.0.mlp.{t}_proj.weight": torch.randn(8, 6, generator=g).to(torch.bfloat16) for t in ("up", "down")}
    tuned = {n: (w.double() * 1.5).to(torch.bfloat16) for n, w in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--k", "2",
                 "--out", str(out), "--no-progress", "--no-figures"]) == 0
    jobs = jobs_of(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = jobs["table-1-sparsity"].draw()
    (legend,) = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert [t.get_text() for t in legend.get_texts()] == ["tuned"]
