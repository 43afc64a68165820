"""The ``threegate bench`` command: its options and what each runs.

The spectral and bf16-kernel benchmarks live in ``threegate.bench``; ``--compare`` in ``threegate.bench_compare``,
``--callback`` in ``threegate.bench_callback``, ``--record`` (every issue-16 measurement in one run) in
``threegate.bench_record``. This module only parses and dispatches, so none of those imports another's command.
"""

from __future__ import annotations

import argparse
import json
import sys

from theory.bf16_kernel import BACKENDS
from theory.errors import InputError
from threegate.bench import REFERENCES, TARGET_ANGLE, format_report, run_bench, threads_context
from threegate.bench_callback import bench_callback, format_callback_report
from threegate.bench_compare import ARCHS, bench_compare, format_compare_report
from threegate.bench_record import STEPS, format_record, record

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="matrix sizes n (n × n)")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256], help="subspace dimensions k")
    parser.add_argument("--device", default="cpu", help="torch device for both paths (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats; the fastest is reported")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic matrices and pairs")
    parser.add_argument("--decay", type=float, default=1.0, help="power-law exponent of W0's spectrum")
    parser.add_argument("--tol", type=float, default=TARGET_ANGLE, help="certified angle tolerance of the fast path")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and every BLAS pool, the same for both paths (default: torch's)")
    parser.add_argument("--reference", choices=REFERENCES, default="fastest",
                        help="full-SVD reference: the faster of torch and scipy gesdd measured here, or one of them")
    parser.add_argument("--sparsity-entries", type=int, default=1 << 26,
                        help="entries per bf16 tensor in the change-count benchmark (0 skips it)")
    parser.add_argument("--kernel-backends", nargs="+", default=["auto"], choices=BACKENDS,
                        help="bf16 change-count backends to time (the first is the one judged against the target)")
    parser.add_argument("--compare", metavar="ARCH|PATH", default=None,
                        help="instead: time threegate compare on a synthetic bf16 pair of this model shape ("
                             + ", ".join(sorted(ARCHS)) + ") or on a local checkpoint's own weights with synthetic "
                             "moves, against the float64 svdvals floor of its matrices")
    parser.add_argument("--layers", type=int, default=None, help="--compare: keep the first N blocks")
    parser.add_argument("--changed-fraction", type=float, default=0.2, help="--compare: entries moved per run")
    parser.add_argument("--runs", type=int, default=1, help="--compare: tuned checkpoints")
    parser.add_argument("--k", type=int, default=16, help="--compare: top-k subspace size")
    parser.add_argument("--no-embeddings", action="store_true", help="--compare: leave out embeddings / lm_head")
    parser.add_argument("--batch", type=int, default=None,
                        help="--compare: matrices of one shape per batch (default: compare's, 1 on CPU, 8 on a GPU)")
    parser.add_argument("--record", metavar="DIR", default=None,
                        help="instead: every measurement of issue 16 on --device in one prepared run (CUDA tests, "
                             "bf16 kernel, fast top-k, compare on the 1.5B and SmolLM2 shapes) into DIR/record.json "
                             "and DIR/record.md (threegate.bench_record)")
    parser.add_argument("--record-steps", nargs="+", default=None, help="with --record: a subset of its steps")
    parser.add_argument("--quick", action="store_true",
                        help="with --record: tiny sizes, to check the script itself (numbers meaningless)")
    parser.add_argument("--callback", action="store_true",
                        help="instead: time ThreeGateCallback per step on real TRL steps (threegate.bench_callback)")
    parser.add_argument("--callback-trainer", nargs="+", default=["sft", "grpo"], choices=["sft", "grpo"],
                        help="with --callback: which TRL trainers to run (default both)")
    parser.add_argument("--callback-steps", type=int, default=4, help="with --callback: optimizer steps per trainer")
    parser.add_argument("--callback-gate3", action="store_true",
                        help="with --callback: also run the Gate III predictors and report precision / recall")
    parser.add_argument("--callback-model", default=None,
                        help="with --callback: a local HF model folder or .gguf (default: SmolLM2-135M GGUF)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "record", None):
        rec = record(args.record, args.device, quick=args.quick, steps=tuple(args.record_steps or STEPS),
                     progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
        print(format_record(rec))
        print(f"wrote {args.record}/record.json and record.md")
        return 0
    if getattr(args, "callback", False):
        res = bench_callback(args.callback_trainer, steps=args.callback_steps, model=args.callback_model,
                             device=args.device, seed=args.seed, gate3=args.callback_gate3)
        print(format_callback_report(res))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
        return 0
    if args.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {args.repeats}")
    say = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.compare:
        if args.runs < 1:
            raise InputError(f"--runs must be >= 1, got {args.runs}")
        with threads_context(args.threads) as threads:
            res = bench_compare(args.compare, layers=args.layers, changed_fraction=args.changed_fraction,
                                runs=args.runs, k=args.k, seed=args.seed, embeddings=not args.no_embeddings,
                                device=args.device, batch=args.batch, progress=say)
            res["threads"] = threads
        print(format_compare_report(res, threads))
    else:
        res = run_bench(args.sizes, args.ks, device=args.device, repeats=args.repeats, seed=args.seed,
                        decay=args.decay, tol=args.tol, reference=args.reference, threads=args.threads,
                        sparsity_entries=args.sparsity_entries, kernel_backends=tuple(args.kernel_backends),
                        progress=say)
        print(format_report(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=str)
        print(f"\nwrote {args.json}")
    return 0
