"""``python -m threegate.sweep_figs STORE --out DIR``: the figures of a ``threegate sweep`` store.

Reads the store (``sims.sweep.store.load_store``) and draws ``paper_figs.sweep_figs.sweep_bounds`` (bounds against
the regime across cells) and ``sweep_claims`` (claims across learning rates) into ``DIR/sweep_bounds.png`` and
``DIR/sweep_claims.png``, whichever the store has data for; a figure without data is skipped with the reason (and
its PNG from an earlier run into DIR removed, ``paper_figs.outputs``).
Exit status 0 when at least one figure was written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paper_figs.outputs import record_written
from paper_figs.sweep_figs import sweep_bounds, sweep_claims
from sims.sweep.store import load_store
from theory.errors import InputError, ThreegateError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m threegate.sweep_figs", description="figures from a sweep store")
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--by", default=None, help="grid key that splits sweep_bounds into panels")
    args = p.parse_args(argv)
    try:
        tables = load_store(args.store)
    except ThreegateError as e:
        print(f"sweep_figs: error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    wrote = []
    for name, make in (("sweep_bounds", lambda: sweep_bounds(tables, by=args.by)),
                       ("sweep_claims", lambda: sweep_claims(tables))):
        try:
            fig = make()
        except InputError as e:
            print(f"{name}: skipped ({e})")
            continue
        fig.savefig(args.out / f"{name}.png")
        wrote.append(str(args.out / f"{name}.png"))
    removed = record_written(args.out, wrote, "sweep_figs")
    print("wrote " + (", ".join(wrote) if wrote else "nothing")
          + (f"; removed {', '.join(removed)} (an earlier run's, not drawn now)" if removed else ""))
    return 0 if wrote else 1


if __name__ == "__main__":
    raise SystemExit(main())
