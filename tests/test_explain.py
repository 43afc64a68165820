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
    with pytest.raises(InputError, match=r"unknown result id 'thm9\.9' \(did you mean 'thm3\.3'"):
        explain.explain("thm9.9")
    with pytest.raises(InputError, match="known ids: cor3.4-mirsky, .*thm3.3-wedin"):
        explain.explain("zzzz")


def test_cli_unknown_id_exits_nonzero_with_one_line(capsys):
    rc = main(["explain", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "unknown result id 'nope'" in err[0] and "Traceback" not in err[0]


def test_ids_match_case_insensitively(capsys):
    assert main(["explain", "LEME.2"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("lemE.2  (Gate III")
    assert explain.resolve_id("Thm3.3-Wedin") == "thm3.3-wedin"


def _tests_listed(text: str) -> list[str]:
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("tests:"))
    out = [lines[i].split(None, 1)[1]]
    for ln in lines[i + 1:]:
        if not ln.startswith("             "):
            break
        out.append(ln.strip())
    return out


def test_lemE2_lists_its_own_tests_and_no_result_lists_a_test_of_explain():
    """lemE.2's two tests call check_lemE2 without naming the id; the parametrized campaign test names it in its
    decorator (attributed to that test, not to the test above it)."""
    listed = _tests_listed(explain.explain("lemE.2"))
    assert {"tests/test_precision.py::test_lemE2_property_and_tightness",
            "tests/test_precision.py::test_lemE2_bad_inputs",
            "tests/test_precision.py::test_campaigns_seeded_and_exact_results_never_violated"} <= set(listed)
    assert "tests/test_precision.py::test_propE3_assumption_and_sharp_eta" not in listed
    for rid in theory.RESULTS:
        assert not [t for t in explain.covering_tests(rid) if t.startswith("tests/test_explain.py")], rid


def test_covering_tests_reads_the_syntax_not_the_text(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text('''
import pytest
from theory import precision as P

IDS = ["thmX.1", "other"]
EMBEDDED = 'check("thmX.1")'


@pytest.fixture
def rows():
    return [{"result_id": "thmX.1"}]


def helper():
    return P.check_thmX1(1.0)


def test_literal():
    run("thmX.1")

def test_substring_only():
    write(EMBEDDED, "thmX.10", "thmX.1-wedin")

@pytest.mark.parametrize("rid", ["a", "thmX.1"])
def test_parametrized(rid):
    pass

def test_check_function_through_an_attribute():
    assert P.check_thmX1(2.0)

def test_module_constant():
    assert IDS

def test_fixture(rows):
    assert rows

def test_helper():
    assert helper()

@pytest.mark.covers("thmX.1")
def test_marker():
    indirect()

def test_unrelated():
    "thmX.1 in a docstring sentence is not the id as a value"
    pass

class TestGroup:
    def test_method(self):
        run("thmX.1")
''')
    (tmp_path / "tests" / "test_explain.py").write_text('def test_explain():\n    explain("thmX.1")\n')
    found = explain.covering_tests("thmX.1", tmp_path / "tests", function="check_thmX1")
    assert [f.split("::", 1)[1] for f in found] == [
        "test_literal", "test_parametrized", "test_check_function_through_an_attribute", "test_module_constant",
        "test_fixture", "test_helper", "test_marker", "TestGroup::test_method"]
    assert all(f.startswith("tests/test_x.py::") for f in found)
    assert explain.covering_tests("thmX.2", tmp_path / "tests") == []
