"""Tests for threegate.sweep_figs: a sweep store read and drawn from the command line."""

from __future__ import annotations

from sims.sweep.runner import run_sweep
from sims.sweep.spec import parse_spec
from threegate.sweep_figs import main


def test_cli_writes_the_figures_the_store_has_data_for(tmp_path, capsys):
    spec = parse_spec({"sweep": {"experiment": "theory", "store": str(tmp_path / "s.sqlite"), "workers": 0},
                       "base": {"ids": ["cor3.4-weyl"]}, "grid": {"target_ratio": [0.1, 0.5]}})
    run_sweep(spec, progress=False)
    assert main([str(spec.store), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "sweep_bounds.png").stat().st_size > 0
    assert not (tmp_path / "figs" / "sweep_claims.png").exists()
    assert "sweep_claims: skipped" in capsys.readouterr().out


def test_a_missing_store_is_one_line_and_exit_1(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere.sqlite"), "--out", str(tmp_path / "figs")]) == 1
    err = capsys.readouterr().err
    assert "nowhere.sqlite does not exist" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_rerun_that_skips_a_figure_removes_its_earlier_png_only(tmp_path, capsys):
    """Issue 13: an earlier run into ``figs`` recorded ``sweep_bounds.png`` and ``sweep_claims.png`` (planted: a
    theory-only store has no data for ``sweep_claims``); this run skips ``sweep_claims``, so its stale PNG goes, and
    the user's ``notes.png`` stays."""
    from paper_figs import outputs

    spec = parse_spec({"sweep": {"experiment": "theory", "store": str(tmp_path / "s.sqlite"), "workers": 0},
                       "base": {"ids": ["cor3.4-weyl"]}, "grid": {"target_ratio": [0.1, 0.5]}})
    run_sweep(spec, progress=False)
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "sweep_claims.png").write_bytes(b"stale")
    (figs / "notes.png").write_bytes(b"user")
    outputs.record_path(figs, "sweep_figs").write_text('{"files": ["sweep_bounds.png", "sweep_claims.png"]}')
    assert main([str(spec.store), "--out", str(figs)]) == 0
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in figs.glob("*.png")) == ["notes.png", "sweep_bounds.png"]
