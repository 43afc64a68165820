"""threegate.paper_figs — figures from results tables, and the HTML report.

- ``paper_figs.schemas``: the table schemas (column, type, one line each), discovery and validation.
- ``paper_figs.theory_figs``: theory vs empirical (measured lhs against bound rhs, tightness), Thm 3.3's three
  forms side by side, the Gate III bf16 realization threshold with measured updates.
- ``paper_figs.paper_figs``: the paper's figures at our scale (Table 1, Figs 2, 3, 4, 5, 6, 9, 10, 12, 15).
- ``paper_figs.report``: ``write_report(results_dir, out_dir)`` / ``render_all``: every figure and ``index.html``
  (with already executed tutorials when handed ``TutorialPage`` records; ``threegate figs`` is the command).
- ``paper_figs.collect``: which tables a results folder holds and which figures they make (several runs of one
  base in subfolders pooled: one Table 1, Figs. 4 / 5 per method).
- ``paper_figs.summary``: the summary table the report opens with (per run, overall and per matrix type).
- ``paper_figs.outputs``: the figure files a run wrote into its output folder (a rerun removes the earlier run's
  figures it did not draw again, and nothing else).
- ``paper_figs.style``: Okabe–Ito palette, fonts, grid, captions, constrained layout, "not enough data" panels.

Every figure function takes a DataFrame and returns a matplotlib ``Figure`` (Agg canvas, layout fixed: every text
inside the canvas, no overlapping tick labels; a degenerate input such as one step or one layer is drawn as a "not
enough data" panel); none reruns an experiment.
"""
