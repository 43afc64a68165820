"""``threegate bench --record DIR``: every measurement issue 16 asks of a machine, in one prepared run.

Written for the session that is lent a GPU (one H200, ~15 minutes of device time in all, starts included): one
command records, in order, each step's result to ``DIR/record.json`` as soon as it is measured (a step that fails
or is cut off loses only itself), and ``DIR/record.md`` as a table for the README:

1. the CUDA tests of the suite (``pytest -k "cuda or device_path"``, the nine that skip without a GPU; the
   counts that passed and skipped);
2. the bf16 change-count kernel against a copy of the same bytes (``threegate bench``, every backend);
3. the certified fast top-k against the full float64 SVD at n = 4096, k = 16 and 64 (cuSOLVER on a GPU);
4. ``threegate compare`` exact and ``--fast`` on synthetic Qwen2.5-1.5B- and SmolLM2-135M-shaped bf16 pairs,
   against their ``svdvals`` floors (``threegate.bench_compare``).

Budget on one H200, estimated from the issue's own numbers (not yet measured with this script): step 1 about 1 min,
step 2 under 1 min, step 3 about 2 min (two float64 SVDs of 4096²), step 4 about 5 min for the 1.5B pair (the pair
is built on the host: 3.1 G bf16 entries, 2 x 3.1 GB on disk), under 10 minutes in all. ``--quick`` shrinks every
size so the script itself can be checked on a CPU in seconds (the tests do); its numbers then mean nothing.

Run it as::

    threegate bench --record OUT/issue16 --device cuda

and report the numbers with the date and ``record.json``'s ``device_name``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from theory.errors import InputError
from threegate import bench_compare as compare_bench
from threegate.bench import bench_sparsity, run_bench

__all__ = ["record", "format_record", "STEPS"]

STEPS = ("cuda_tests", "kernel", "topk", "compare_qwen2.5-1.5b", "compare_smollm2-135m")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _cuda_tests(quick: bool) -> dict[str, Any]:
    """The suite's CUDA tests in a subprocess (their own process: a CUDA error cannot take this run down)."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda or device_path",
           "-m", "not slow",
           str(root / "tests")]
    if quick:  # the script's own check: one small module is enough to see the plumbing work
        cmd[-1] = str(root / "tests" / "test_bench.py")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    return {"returncode": proc.returncode, "summary": tail, "seconds": time.perf_counter() - t0}


def record(out: str | Path, device: str | torch.device = "cuda", *, quick: bool = False,
           steps: tuple[str, ...] = STEPS, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``steps`` on ``device``; write ``out/record.json`` after each and ``out/record.md`` at the end."""
    say = progress or (lambda msg: None)
    dev = torch.device(device)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": str(dev),
        "device_name": _device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(), "quick": quick, "steps": {},
    }
    size, layers = (256, 1) if quick else (4096, None)
    plan: dict[str, Callable[[], Any]] = {
        "cuda_tests": lambda: _cuda_tests(quick),
        "kernel": lambda: bench_sparsity((1 << 16) if quick else (1 << 28), device=dev,
                                         backends=("auto", "compiled", "eager")),
        # on a GPU the reference is cuSOLVER's float64 SVD (the issue's), not the faster of it and the host's LAPACK
        "topk": lambda: run_bench([size], [8] if quick else [16, 64], device=dev, sparsity_entries=0,
                                  reference="torch" if dev.type == "cuda" else "fastest")["spectral"],
        "compare_qwen2.5-1.5b": lambda: compare_bench.bench_compare("qwen2.5-1.5b", layers=layers, device=dev,
                                                      embeddings=not quick),
        "compare_smollm2-135m": lambda: compare_bench.bench_compare("smollm2-135m", layers=layers, device=dev,
                                                      embeddings=not quick),
    }
    unknown = [s for s in steps if s not in plan]
    if unknown:
        raise InputError(f"--record steps: unknown {unknown}; known: {', '.join(STEPS)}")
    for name in steps:
        say(f"record: {name} ...")
        t0 = time.perf_counter()
        try:
            rec["steps"][name] = {"result": plan[name](), "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the others' numbers
            rec["steps"][name] = {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
        (folder / "record.json").write_text(json.dumps(rec, indent=2, default=str))
    (folder / "record.md").write_text(format_record(rec))
    return rec


def format_record(rec: dict[str, Any]) -> str:
    """The README table of a record: one line per measured number, with its target."""
    lines = [f"Recorded {rec['date_utc']} on {rec['device_name']} ({rec['device']}, torch {rec['torch']}, "
             f"CUDA {rec['cuda']}){' — QUICK: sizes shrunk, numbers meaningless' if rec['quick'] else ''}", "",
             "| measurement | value | target |", "|---|---|---|"]
    steps = rec["steps"]
    for name, step in steps.items():
        if "error" in step:
            lines.append(f"| {name} | failed: {step['error'][:120]} | |")
    if "result" in steps.get("cuda_tests", {}):
        lines.append(f"| CUDA tests | {steps['cuda_tests']['result']['summary']} | all pass |")
    if "result" in steps.get("kernel", {}) and steps["kernel"]["result"]:
        sp = steps["kernel"]["result"]
        for backend, row in sp.get("backends", {}).items():
            lines.append(f"| bf16 change count ({backend}) / copy bandwidth | {row['ratio']:.2f} | >= 0.8 |")
    for row in steps.get("topk", {}).get("result") or []:
        lines.append(f"| fast top-k / full SVD, n = {row['n']}, k = {row['k']} | {row['speedup']:.1f}x "
                     f"(angle err {row['angle_err_rad']:.1e}) | >= 20x at n = 4096, k <= 64 |")
    for arch in ("qwen2.5-1.5b", "smollm2-135m"):
        r = steps.get(f"compare_{arch}", {}).get("result")
        if r:
            for label in ("exact", "fast"):
                lines.append(f"| compare {label}, {arch} ({r['matrices']} matrices) | {r[f'{label}_wall_s']:.1f} s = "
                             f"{r[f'{label}_ratio_wall']:.2f}x of its floor ({r['floor_wall_s']:.1f} s) | "
                             f"{r[f'target_{label}']} |")
    return "\n".join(lines) + "\n"
