"""``threegate bench``'s options and dispatch (``threegate.bench_cli``): each mode reaches its module, bad options
are one line and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from threegate import bench_cli
from threegate.cli import main


def test_record_mode_writes_its_record_and_table(tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["bench", "--record", str(out), "--device", "cpu", "--quick", "--record-steps", "kernel"]) == 0
    saved = json.loads((out / "record.json").read_text())
    assert list(saved["steps"]) == ["kernel"] and saved["quick"] is True
    printed = capsys.readouterr().out
    assert "bf16 change count (auto) / copy bandwidth" in printed and "record.json" in printed


@pytest.mark.parametrize("argv, message", [
    (["bench", "--record", "X", "--quick", "--record-steps", "nope"], "unknown ['nope']"),
    (["bench", "--compare", "smollm2-135m", "--runs", "0"], "--runs must be >= 1"),
    (["bench", "--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_options_are_one_line_and_exit_1(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_every_option_has_help():
    import argparse

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert all(a.help for a in parser._actions if a.dest != "help")
    assert {"record", "compare", "callback", "device", "batch", "quick"} <= {a.dest for a in parser._actions}
