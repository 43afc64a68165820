"""``threegate`` command line: one subcommand per job, each implemented in the module that owns it.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the command being
run is imported (``importlib``, by name from ``COMMANDS``): most of them import torch, and ``threegate --help`` should
not wait for it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from theory.errors import ThreegateError
from threegate import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("threegate.verify", "evaluate every result of the paper on seeded instances and print a verdict table"),
    "prove": ("proofs_check.run_all", "run the symbolic (sympy) and exhaustive bf16 proof checks"),
    "run": ("threegate.experiments", "run a named experiment and write its results table"),
    "compare": ("threegate.compare", "compare a base checkpoint with one or more tuned checkpoints"),
    "bench": ("threegate.bench_cli", "benchmark the fast spectral path and bf16 sparsity throughput"),
    "figs": ("threegate.figs", "render figures and the HTML report from a results directory"),
    "sweep": ("sims.sweep.runner", "run a resumable sweep defined in a TOML/YAML file"),
    "explain": ("threegate.explain", "explain one result id: statement, code, tests, a live example"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="threegate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=modname)
        if name == command:
            importlib.import_module(modname).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``threegate ARGV`` (default: the process's command line); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if args.version:
        print(f"threegate {__version__}")
        return 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except ThreegateError as e:  # bad input: one line naming the problem, no traceback
        print(f"threegate {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"threegate {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (threegate run --list | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
