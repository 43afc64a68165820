"""``threegate prove``: run every symbolic and exhaustive proof check and print what each proved or refuted."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from proofs_check.common import ProofResult

MODULES = ("proofs_check.symbolic", "proofs_check.exhaustive_bf16")


def all_checks():
    for modname in MODULES:
        mod = importlib.import_module(modname)
        yield from mod.CHECKS


def run_checks(select: str | None = None) -> list[ProofResult]:
    out = []
    for chk in all_checks():
        if select and select not in chk.__name__:
            continue
        t0 = time.perf_counter()
        res = chk()
        print(f"{res.line()}  ({time.perf_counter() - t0:.1f}s)", flush=True)
        out.append(res)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", dest="select", default=None, help="run only checks whose function name contains this")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    results = run_checks(args.select)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} proof checks: {sum(r.proved for r in results)} proved, "
          f"{sum(not r.proved for r in results)} refuted (as expected: {len(results) - len(bad)}/{len(results)})")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([{**r.__dict__, "counterexample": repr(r.counterexample), "ok": r.ok} for r in results], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.Namespace(select=None, json_path=None)))
