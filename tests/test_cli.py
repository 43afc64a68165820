"""Tests for threegate.cli: argv is passed, never written into sys.argv; only the command's module is imported;
bad input is one line and exit status 1."""

from __future__ import annotations

import subprocess
import sys

from threegate.cli import COMMANDS, main


def test_main_takes_argv_and_leaves_sys_argv_alone(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["threegate-under-test", "--unrelated"])
    assert main(["explain", "cor3.4-weyl"]) == 0
    assert sys.argv == ["threegate-under-test", "--unrelated"]
    assert "cor3.4-weyl" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_bad_input_is_one_line_exit_1(capsys):
    assert main(["explain", "no-such-result"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("threegate explain: error: unknown result id 'no-such-result'") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_help_imports_no_command_module():
    code = ("import sys, threegate.cli as c; c.build_parser(None); "
            "print(sorted(m for m in ('sims.experiments.registry', 'threegate.compare', 'paper_figs.report', "
            "'threegate.verify') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
