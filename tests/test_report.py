"""Tests for paper_figs.report: table discovery, PNG + PDF output, the static index.html, the CLI.

The page is parsed with the standard library's HTML parser: every <img> points at a PNG that exists and decodes,
the verdict table repeats verify.csv row for row, every id of theory.RESULTS has its statement, and a table that
cannot be drawn is listed with the error that names the problem (and makes ``threegate figs`` exit 1).
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

import theory
from paper_figs import report
from theory.check import make_check
from theory.errors import CheckpointError
from threegate.cli import main

RUN = dict(model="tinygpt-2L", seed=3, steps=40)


class PageParser(HTMLParser):
    """Collects img srcs, links, figure captions and table cells by table id."""

    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.captions, self.tables = [], [], [], {}
        self._table, self._row, self._cell, self._in_caption = None, None, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "a":
            self.links.append(a.get("href"))
        elif tag == "figcaption":
            self._in_caption = True
            self.captions.append("")
        elif tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._in_caption:
            self.captions[-1] += data
        if self._cell is not None:
            self._cell += data


def parse(page: Path) -> PageParser:
    p = PageParser()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def checks_rows():
    rows = []
    for r in (0.1, 0.5, 0.9, 1.5):
        rows.append({**make_check("thm3.3", r * (1 + 0.2 * r), r).as_row(), "d_dW_over_gap": r, **RUN})
    return pd.DataFrame(rows)


def write_results(d: Path, *, bad: bool = True, verdict_format: str = "csv") -> pd.DataFrame:
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([dict(run=run, method=m, matrix_type=mt, sparsity=s, **RUN)
                  for run, m, s in (("RL-0", "RL", 0.8), ("SFT-0", "SFT", 0.1)) for mt in ("q", "o")]
                 ).to_csv(d / "sparsity.csv", index=False)
    (d / "sparsity.csv.meta.json").write_text(json.dumps({"description": "two toy runs, 40 steps, seed 3"}))
    checks_rows().to_csv(d / "checks.csv", index=False)
    w = np.array([1.0, 0.5, -0.25, 1.0 + 2 ** -7])
    delta = np.array([2 ** -7, -(2 ** -10), 1e-6, 2 ** -8])
    (d / "sub").mkdir(exist_ok=True)  # tables are found in subdirectories too
    pd.DataFrame({"w": w, "delta": delta, "changed": [True, False, False, True]}).to_parquet(
        d / "sub" / "bf16_updates.parquet")
    verdicts = pd.DataFrame([
        dict(result_id="thm3.3", gate="II", source="theory", instances=4, worst_ratio=1.3, verdict="violated",
             notes="as stated (not a theorem)"),
        dict(result_id="cor3.4", gate="II", source="theory", instances=10, worst_ratio=0.71, verdict="holds",
             notes=""),
    ])
    if verdict_format == "csv":
        verdicts.to_csv(d / "verify.csv", index=False)
    else:
        (d / "verify.json").write_text(json.dumps(verdicts.to_dict(orient="records")))
    pd.DataFrame({"foo": [1], "bar": [2]}).to_csv(d / "unrelated.csv", index=False)
    if bad:
        pd.DataFrame({"run": ["x"], "method": ["RL"], "matrix_type": ["q"]}).to_csv(d / "sparsity_broken.csv",
                                                                                   index=False)
    return verdicts


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    verdicts = write_results(d)
    rep = report.render_all(d, d / "report")
    return d, rep, verdicts, parse(rep.page)


def test_every_known_table_becomes_a_figure(rendered):
    d, rep, _, _ = rendered
    slugs = sorted(f.slug for f in rep.figures)
    assert slugs == ["check-thm3-3-checks", "gate3-threshold-bf16-updates-sub", "table-1-sparsity",
                     "thm3-3-forms-checks"]
    assert {f.source for f in rep.figures} == {"checks.csv", "sparsity.csv", "sub/bf16_updates.parquet"}
    assert rep.unrecognised == ["unrelated.csv"]


def test_png_and_pdf_are_written_and_valid(rendered):
    _, rep, _, _ = rendered
    for f in rep.figures:
        assert f.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f.pdf.read_bytes()[:5] == b"%PDF-"
        img = mpimg.imread(f.png)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05, f"{f.png.name} looks blank"


def test_page_images_captions_and_links(rendered):
    _, rep, _, page = rendered
    out = rep.page.parent
    assert len(page.imgs) == len(rep.figures)
    for img in page.imgs:
        assert (out / img["src"]).is_file() and img["alt"]
    pdfs = [h for h in page.links if h and h.endswith(".pdf")]
    assert sorted(pdfs) == sorted(f.pdf.name for f in rep.figures)
    caps = " ".join(page.captions)
    assert "Paper Table 1" in caps and "two toy runs, 40 steps, seed 3" in caps  # sidecar description
    assert "Thm 3.3" in caps and "model tinygpt-2L" in caps


def test_verdict_table_repeats_verify_csv(rendered):
    _, _, verdicts, page = rendered
    head, *rows = page.tables["verdicts"]
    assert head[:5] == ["result_id", "instances", "worst_ratio", "verdict", "notes"]
    assert [r[0] for r in rows] == verdicts["result_id"].tolist()
    assert [r[3] for r in rows] == verdicts["verdict"].tolist()
    assert [float(r[2]) for r in rows] == verdicts["worst_ratio"].tolist()


def test_statements_of_every_registered_result(rendered):
    _, _, _, page = rendered
    rows = page.tables["statements"][1:]
    by_id = {r[0]: r for r in rows}
    assert set(by_id) == set(theory.RESULTS)
    for rid, res in theory.RESULTS.items():
        assert by_id[rid][3] == res.statement


def test_broken_table_is_listed_with_the_column_it_lacks(rendered):
    _, rep, _, _ = rendered
    (err,) = rep.errors
    assert err[0] == "sparsity_broken.csv" and "lacks column(s) ['sparsity']" in err[1]
    assert "sparsity_broken.csv" in rep.page.read_text()


def test_cli_exit_codes_and_verify_json(tmp_path, capsys):
    d = tmp_path / "res"
    verdicts = write_results(d, bad=False, verdict_format="json")
    (d / "checks.csv").unlink()  # keep this run small: only Table 1 is left to draw
    (d / "sub" / "bf16_updates.parquet").unlink()
    out = tmp_path / "site"
    assert main(["figs", str(d), "--out", str(out)]) == 0
    assert "1 figure(s) written" in capsys.readouterr().out
    page = parse(out / "index.html")
    assert [r[0] for r in page.tables["verdicts"][1:]] == verdicts["result_id"].tolist()
    pd.DataFrame({"run": ["x"], "method": ["RL"], "matrix_type": ["q"]}).to_csv(d / "sparsity_bad.csv", index=False)
    assert main(["figs", str(d), "--out", str(out)]) == 1
    assert "sparsity_bad.csv" in capsys.readouterr().err


def test_missing_results_dir_is_named(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="does not exist"):
        report.write_report(tmp_path / "nope", tmp_path / "out")
    assert main(["figs", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


def test_write_report_returns_the_page_and_skips_its_own_output(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    pd.DataFrame({"run": ["a", "a"], "step": [0, 5], "kl": [0.0, 0.01]}).to_csv(d / "kl_beta0.csv", index=False)
    page = report.write_report(d, d / "report")
    assert page == d / "report" / "index.html" and page.is_file()
    (d / "report" / "sparsity.csv").write_text("run,method,matrix_type\n")  # inside out_dir: must be ignored
    rep = report.render_all(d, d / "report")
    assert not rep.errors and [f.slug for f in rep.figures] == ["fig-15-kl-beta0"]
    # not a threegate verify folder: no "run threegate verify" banner
    assert "verify.csv" not in page.read_text() and "run <code>threegate verify" not in page.read_text()


def test_corrupt_verdict_json_is_reported(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    (d / "verify.json").write_text("{not json")
    rep = report.render_all(d, tmp_path / "out")
    assert rep.errors and rep.errors[0][0] == "verify" and "verify.json" in rep.errors[0][1]


def test_csv_parquet_twins_are_drawn_once_and_side_tables_are_not_guessed(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    kl = pd.DataFrame({"run": ["a", "a"], "step": [0, 5], "kl": [0.0, 0.01]})
    kl.to_csv(d / "kl_beta0.csv", index=False)
    kl.to_parquet(d / "kl_beta0.parquet", index=False)
    (d / "sub").mkdir()
    kl.to_csv(d / "sub" / "kl_beta0.csv", index=False)  # same stem elsewhere: its own figure, not an overwrite
    # threegate.compare writes per-matrix pairs next to the pooled table; only the pooled one is Fig. 12
    pd.DataFrame({"run_a": ["a"], "run_b": ["b"], "jaccard": [0.5], "layer": [0]}).to_csv(d / "jaccard_pairs.csv",
                                                                                        index=False)
    rep = report.render_all(d, d / "report")
    assert [(f.slug, f.source) for f in rep.figures] == [("fig-15-kl-beta0", "kl_beta0.parquet"),
                                                         ("fig-15-kl-beta0-sub", "sub/kl_beta0.csv")]
    assert not list((d / "report").glob("*-2.png"))
    assert rep.unrecognised == [] and [t for t, _ in rep.notes] == ["jaccard_pairs.csv"]
    assert "pooled 'jaccard'" in rep.notes[0][1]


def test_theory_and_simulation_checks_get_separate_figures(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    rows = [{**make_check("cor3.4-weyl", x, 1.0).as_row(), "d_scale": x, "source": src}
            for src in ("theory", "sim") for x in (0.2, 0.4)]
    pd.DataFrame(rows).to_csv(d / "checks.csv", index=False)
    rep = report.render_all(d, d / "report")
    assert sorted(f.slug for f in rep.figures) == ["check-cor3-4-weyl-checks-sim", "check-cor3-4-weyl-checks-theory"]
    by_slug = {f.slug: f.caption for f in rep.figures}
    assert "source sim" in by_slug["check-cor3-4-weyl-checks-sim"]
    assert "source theory" in by_slug["check-cor3-4-weyl-checks-theory"]


def test_theory_rows_without_a_step_beside_simulation_steps_still_render(tmp_path):
    # verify writes theory campaigns (no step) and training-step checks (a step) into one checks.csv
    d = tmp_path / "res"
    d.mkdir()
    rows = [{**make_check(rid, x, 1.0).as_row(), "source": "theory", "step": float("nan")}
            for rid in ("thm3.3", "thm3.3-wedin", "thm3.3-rigorous") for x in (0.2, 0.4)]
    rows += [{**make_check(rid, x, 1.0).as_row(), "source": "sim:rlvr", "step": 8}
             for rid in ("thm3.3", "thm3.3-wedin", "thm3.3-rigorous") for x in (0.1, 0.3)]
    pd.DataFrame(rows).to_csv(d / "checks.csv", index=False)
    rep = report.render_all(d, d / "report")
    assert rep.errors == []
    forms = [f for f in rep.figures if f.slug.startswith("thm3-3-forms")]
    assert len(forms) == 2
    assert any("8 steps" in f.caption for f in forms)


def test_a_figure_that_raises_is_listed_not_fatal(tmp_path, monkeypatch):
    from paper_figs import theory_figs

    d = tmp_path / "res"
    d.mkdir()
    rows = [{**make_check(rid, 0.5, 1.0).as_row(), "source": "theory"} for rid in ("thm3.3", "cor3.4-weyl")]
    pd.DataFrame(rows).to_csv(d / "checks.csv", index=False)

    def boom(*a, **k):
        raise ZeroDivisionError("synthetic failure")

    monkeypatch.setattr(theory_figs, "fig_thm33_forms", boom)
    rep = report.render_all(d, d / "report")
    assert any("ZeroDivisionError: synthetic failure" in msg for _, msg in rep.errors)
    assert rep.figures, "the other figures must still be written"
    assert "synthetic failure" in rep.page.read_text()


def test_a_reused_output_folder_keeps_only_this_runs_figures(tmp_path, capsys):
    """Issue 13: draw run A into ``out``, then run B (other tables) into the same ``out``. The page of B names only
    B's figures, A's PNG / PDF that B did not draw are gone, B's are on disk, and a file the project did not write
    (the user's own ``my_plot.png``, named like a figure) stays."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    write_results(a, bad=False)
    first = report.render_all(a, out)
    assert "table-1-sparsity" in [f.slug for f in first.figures]
    (out / "my_plot.png").write_bytes((out / "table-1-sparsity.png").read_bytes())
    b.mkdir()
    pd.DataFrame({"run": ["a", "a"], "step": [0, 5], "kl": [0.0, 0.01]}).to_csv(b / "kl_beta0.csv", index=False)
    assert main(["figs", str(b), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    page = parse(out / "index.html")
    drawn = {"fig-15-kl-beta0.png"}
    assert {i["src"] for i in page.imgs} == drawn
    assert {p.name for p in out.glob("*.png")} == drawn | {"my_plot.png"}  # A's stale figures removed, not the user's
    assert {p.name for p in out.glob("*.pdf")} == {"fig-15-kl-beta0.pdf"}
    stale = sorted({f.png.name for f in first.figures} | {f.pdf.name for f in first.figures})
    assert f"removed {len(stale)} figure file(s)" in said and "table-1-sparsity.png" in said
    # a third run of A draws its figures again; B's figure goes, the user's file still stays
    again = report.render_all(a, out)
    assert sorted(again.removed) == ["fig-15-kl-beta0.pdf", "fig-15-kl-beta0.png"]
    assert {p.name for p in out.glob("*.png")} == {f.png.name for f in again.figures} | {"my_plot.png"}


def test_a_record_naming_files_outside_the_folder_removes_nothing_there(tmp_path):
    """The record of written figures is only trusted inside the output folder: ``../victim.png`` stays."""
    from paper_figs import outputs

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"user")
    outputs.record_path(out, "report").write_text('{"files": ["../victim.png", "missing.png", 3]}')
    assert outputs.record_written(out, [], "report") == []
    assert victim.read_bytes() == b"user"


@pytest.mark.parametrize("verdict_file", ["csv", "json"])
def test_verify_table_shows_the_power_columns_for_every_claim_row(tmp_path, verdict_file):
    """Issue 17: the verdict table of the report shows ``seeds_needed`` and ``t_test_seeds`` for every claim row,
    an old claim (sparsity_rl_gt_sft) as a new one (rl_update_energy_off_principal), exactly as verify wrote them
    (``threegate.verify.claim_row`` of real ``effect_verdict`` verdicts, through verify.csv / verify.json); where
    there is no number the cell holds no number (the head of ``seeds_needed_note`` dimmed, or nothing); theory rows
    and a failed experiment's row are blank."""
    import math

    from sims.claims.base import effect_verdict
    from threegate.verify import Row, claim_row, write_outputs

    def verdict(cid, effects):
        return effect_verdict(cid, dict(enumerate(effects)), min_effect=0.05, what="effect")

    settled = verdict("rl_update_energy_off_principal", [0.30, 0.31])  # 25 sd above c: 2 seeds
    unreachable = verdict("sparsity_rl_gt_sft", [0.0, 0.3])             # 0.5 sd above c: never, t-test 30
    one_seed = verdict("sparsity_vanishes_at_high_lr", [0.4])
    assert (settled.seeds_needed, unreachable.seeds_needed, one_seed.seeds_needed) == (2, None, None)
    want_t = {"rl_update_energy_off_principal": settled.numbers["t_test_seeds"], "sparsity_rl_gt_sft": 30}
    rows = [Row("thm3.3", "II", "theory", 4, 4, 1, 1.3, "violated", False, "", 0.1),
            claim_row(settled, "off_principal", "fast", 1.0), claim_row(unreachable, "rl_vs_sft", "fast", 1.0),
            claim_row(one_seed, "lr_sweep", "fast", 1.0),
            Row("broken_experiment", "", "claim:broken_experiment", 0, 0, 0, math.nan, "error", False, "E: x", 0.0)]
    d = tmp_path / "res"
    write_outputs(d, rows, [], None)
    if verdict_file == "json":
        (d / "verify.csv").unlink()
    page = parse(report.render_all(d, d / "report").page)
    head, *body = page.tables["verdicts"]
    assert head[:6] == ["result_id", "instances", "worst_ratio", "verdict", "seeds_needed", "t_test_seeds"]
    cells = {r[0]: dict(zip(head, r)) for r in body}
    new = cells["rl_update_energy_off_principal"]
    assert (new["seeds_needed"], new["t_test_seeds"]) == ("2", str(want_t["rl_update_energy_off_principal"]))
    assert (cells["sparsity_rl_gt_sft"]["seeds_needed"], cells["sparsity_rl_gt_sft"]["t_test_seeds"]) == (
        "unreachable", "30")
    assert (cells["sparsity_vanishes_at_high_lr"]["seeds_needed"],
            cells["sparsity_vanishes_at_high_lr"]["t_test_seeds"]) == ("one seed", "")
    for rid in ("thm3.3", "broken_experiment"):
        assert (cells[rid]["seeds_needed"], cells[rid]["t_test_seeds"]) == ("", "")


def test_a_rerun_with_fewer_tutorial_images_removes_the_earlier_ones(tmp_path):
    """Issue 13: tutorial output images are this run's too: a tutorial drawn with two images, then with one, leaves
    one image in ``out/tutorials`` and the page names only it."""
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, np.zeros((2, 2)), format="png")
    png = {"output_type": "display_data", "data": {"image/png": base64.b64encode(buf.getvalue()).decode()}}

    def page(n_images):
        return report.TutorialPage("00_overview", "docs/00_overview.md", "Overview", "ok",
                                   [{"cell_type": "code", "source": "plot()", "tags": [], "outputs": [png] * n_images}])

    d, out = tmp_path / "res", tmp_path / "out"
    d.mkdir()
    report.render_all(d, out, tutorials=[page(2)])
    assert sorted(p.name for p in (out / "tutorials").iterdir()) == ["00_overview-1.png", "00_overview-2.png"]
    rep = report.render_all(d, out, tutorials=[page(1)])
    assert rep.removed == ["tutorials/00_overview-2.png"]
    assert [p.name for p in (out / "tutorials").iterdir()] == ["00_overview-1.png"]
    assert [i["src"] for i in parse(rep.page).imgs] == ["tutorials/00_overview-1.png"]
