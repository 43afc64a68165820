"""``threegate figs RESULTS_DIR [--out DIR] [--tutorials [DOCS_DIR]]``: the report of a results directory.

Drawing and the HTML page are ``paper_figs.report``'s; this command adds the tutorials. With ``--tutorials`` it
first executes the ``DOCS_DIR/NN_name.md`` tutorials (default ``./docs``, else the ``docs/`` of the checkout this
package runs from) and checks their exercises (``threegate.tutorials``) into ``RESULTS_DIR/tutorials/*.ipynb``;
every executed tutorial found there is rendered into the page. Executing needs the ``tutorials`` extra
(jupytext, nbclient, nbformat, ipykernel); rendering and everything else need none of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paper_figs import report
from theory.errors import CheckpointError
from threegate import tutorials

_DEFAULT_DOCS = ""  # --tutorials given without DOCS_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_arguments(parser)
    parser.add_argument("--tutorials", nargs="?", const=_DEFAULT_DOCS, default=None, metavar="DOCS_DIR",
                        help="first execute the tutorials of DOCS_DIR (default ./docs, or the checkout's docs/) and "
                             "check their exercises, into RESULTS_DIR/tutorials (needs the tutorials extra)")


def run(args: argparse.Namespace) -> int:
    results = Path(args.results_dir)
    failed: list[tuple[str, str]] = []
    if args.tutorials is not None:
        if not results.is_dir():
            raise CheckpointError(f"results directory {str(results)!r} does not exist or is not a directory")
        tutorials.require_notebook_tools()
        docs = tutorials.find_docs_dir(args.tutorials or None)
        written, failed = tutorials.write_tutorials(results / "tutorials", docs)
        for name, msg in failed:
            print(f"threegate figs: tutorial {name} failed: {msg}", file=sys.stderr)
        print(f"threegate figs: {len(written)} tutorial(s) from {docs} executed")
    pages = tutorials.read_executed(results) if results.is_dir() else None
    rc = report.run(args, tutorials=pages)
    return 1 if failed else rc
