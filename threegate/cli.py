"""``threegate`` command line: one subcommand per job, each implemented in the module that owns it.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported lazily so
``threegate --help`` stays fast and a command whose module is missing says so instead of crashing the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("threegate.verify", "evaluate every result of the paper on seeded instances and print a verdict table"),
    "prove": ("proofs_check.run_all", "run the symbolic (sympy) and exhaustive bf16 proof checks"),
    "run": ("threegate.experiments", "run a named experiment and write its results table"),
    "compare": ("threegate.compare", "compare a base checkpoint with one or more tuned checkpoints"),
    "bench": ("threegate.bench", "benchmark the fast spectral path and bf16 sparsity throughput"),
    "figs": ("threegate.figs", "render figures and the HTML report from a results directory"),
    "sweep": ("sims.sweep.runner", "run a resumable sweep defined in a TOML/YAML file"),
    "explain": ("threegate.explain", "explain one result id: statement, code, tests, a live example"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="threegate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=modname)
        if name in sys.argv[1:2]:  # only import the module of the command being run
            mod = _load(modname)
            if mod is not None:
                mod.add_arguments(p)
    return parser


def _load(modname: str):
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:])
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = _load(args._module)
    if mod is None:
        print(f"threegate {args.command}: not available in this version ({args._module} is missing)", file=sys.stderr)
        return 2
    from theory.errors import ThreegateError

    try:
        return int(mod.run(args) or 0)
    except ThreegateError as e:  # bad input: one line naming the problem, no traceback
        print(f"threegate {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"threegate {args.command}: interrupted", file=sys.stderr)
        return 130
