"""threegate explain: one test per registered result id."""

from __future__ import annotations

import re

import pytest

import theory
from threegate import explain
from threegate.cli import main
from theory.errors import InputError


@pytest.mark.parametrize("result_id", sorted(theory.RESULTS))
def test_explain_every_result(result_id):
    text = explain.explain(result_id)
    r = theory.RESULTS[result_id]
    assert text.splitlines()[0].startswith(result_id)
    assert r.statement in text
    assert f"{r.module}.{r.function}" in text
    path = re.search(r"\((\S+\.py):(\d+)\)", text)
    assert path and (explain.REPO / path.group(1)).is_file()
    assert "tests/test_" in text, "every result id must be named by at least one test"
    if r.campaign is not None:
        live = [ln for ln in text.splitlines() if ln.strip().startswith("lhs =")]
        assert live, "the live example printed no instance"
        # the printed numbers are the campaign's first check, evaluated now
        first = next(iter(r.campaign(0)))
        assert f"{first.lhs:.6g}" in live[0] and first.verdict in live[0]


def test_unknown_id_is_a_clear_error():
    with pytest.raises(InputError, match="unknown result id 'thm9.9'.*thm3.3"):
        explain.explain("thm9.9")


def test_cli_unknown_id_exits_nonzero_with_one_line(capsys):
    rc = main(["explain", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "unknown result id 'nope'" in err[0]


def test_covering_tests_finds_string_literals(tmp_path):
    (tmp_path / "test_x.py").write_text('def test_a():\n    check("thm3.3")\n\ndef test_b():\n    pass\n')
    assert explain.covering_tests("thm3.3", tmp_path)[0].endswith("::test_a")
    assert explain.covering_tests("thm3.4", tmp_path) == []
