"""``threegate bench``: the fast spectral path against the full SVD, and bf16 sparsity against a memory copy.

Everything is measured in one run on the same seeded matrices:

- **Spectral.** ``W0 = U diag(σ) Vᵀ`` (n × n, Haar U and V, power-law ``σ_i = i^(-decay)``, default decay 1) and an
  update ``ΔW = 1e-3 · P diag(i^(-1/2)) Qᵀ`` with known ``||ΔW||_2 = 1e-3``. With decay 1 the relative gap at k is
  ``(σ_k - σ_{k+1})/σ_k = 1/(k+1)``: no artificial gap at k, the hard case for any iterative method (real weight
  spectra are flatter at the top, so their gaps at k are not larger). Per size, the full float64 SVD of W0 (timed
  once, reused across k) against ``topk_svd(W0, k, method="randomized")`` per k: speed-up, the largest principal
  angle (radians) between the fast and the full top-k subspaces (left and right), the fast path's own certified
  bound, and the relative error of ``spectral_norm_fast(ΔW)``. The full-SVD reference is the fastest exact path
  measured in the same run: ``torch.linalg.svd(full_matrices=False)`` (LAPACK gesdd through torch's BLAS, MKL here)
  and ``scipy.linalg.svd(lapack_driver="gesdd")`` (scipy's own LAPACK, OpenBLAS here); on CUDA torch's only. Both
  paths run with the same thread count (``--threads``: torch and every BLAS pool through threadpoolctl).
- **bf16 change count.** ``theory.bf16_kernel.changed_count`` (each ``--kernel-backends`` backend) over two bf16
  tensors of N entries (4N bytes read) against a plain copy of the same 4N bytes (``numpy.copyto``, i.e. memcpy, on
  CPU; ``Tensor.copy_`` on CUDA), in GB/s, and their ratio.
- **Compare** (``--compare ARCH``, instead of the two above): ``threegate.bench_compare``.

Targets printed beside the measurements: speed-up ≥ 20× at n = 4096 with k ≤ 64 and angle error ≤ 1e-6 rad;
change-count throughput ≥ 80 % of copy bandwidth. Speeds are reported, never asserted (tests check the structure and
the errors only). Timings on a shared machine vary with its load; the load average is recorded.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from typing import Any, Iterator

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from theory.errors import InputError
from theory.fast_spectral import spectral_norm_fast, topk_svd
from theory.linalg import principal_angles
from theory.bf16_kernel import BACKENDS, changed_count, kernel_info

TARGET_SPEEDUP = 20.0
TARGET_SIZE = 4096
TARGET_MAX_K = 64
TARGET_ANGLE = 1e-6
TARGET_COPY_RATIO = 0.8
DELTA_SCALE = 1e-3
REFERENCES = ("fastest", "torch", "scipy")


# ----------------------------------------------------------------------------------------------------------------
# seeded inputs
# ----------------------------------------------------------------------------------------------------------------


def haar_orthogonal(n: int, gen: torch.Generator, device: str | torch.device = "cpu") -> torch.Tensor:
    """Haar-distributed orthogonal n × n (QR of a Gaussian with the sign fix), float64."""
    G = torch.randn(n, n, dtype=torch.float64, generator=gen).to(device)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R))


def power_law_spectrum(n: int, decay: float) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=torch.float64) ** (-decay)


def make_matrices(n: int, seed: int, decay: float, device: str | torch.device = "cpu"):
    """``(W0, ΔW, σ(W0), ||ΔW||_2)`` for one size, deterministic in ``(n, seed, decay)``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    U, V, P, Q = (haar_orthogonal(n, gen, device) for _ in range(4))
    s = power_law_spectrum(n, decay).to(device)
    d = DELTA_SCALE * power_law_spectrum(n, 0.5).to(device)
    return (U * s) @ V.T, (P * d) @ Q.T, s, float(d[0])


def make_sparsity_pair(n_entries: int, seed: int, changed_fraction: float = 0.3):
    """Two bf16 vectors; ``round(changed_fraction·N)`` distinct entries moved by one stored step (exact count)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n_entries, generator=gen).to(torch.bfloat16)
    w1 = w0.clone()
    n_changed = int(round(changed_fraction * n_entries))
    idx = torch.randperm(n_entries, generator=gen)[:n_changed]
    w1.view(torch.int16)[idx] ^= 1  # flip the last mantissa bit: the neighbouring bf16 value, always a change
    return w0, w1, n_changed


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: str | torch.device):
    """(fastest wall time, fastest process CPU time, over ``repeats`` runs; the last result).

    CPU time (all threads of this process) is reported beside wall time because on a shared, loaded machine the
    wall clock also counts the time other processes held the cores."""
    best, best_cpu, out = math.inf, math.inf, None
    for _ in range(max(1, repeats)):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu, out


def full_svd_reference(W0: torch.Tensor, reference: str, repeats: int, device):
    """Time the exact full SVD(s); returns ``(name, wall, cpu, U (n, n), S, V)`` (numpy) of the fastest in wall time.

    ``reference="fastest"`` times torch's and (on CPU) scipy's gesdd and keeps the faster, so the speed-up is measured
    against the best exact path available here, not a slow one."""
    names = ["torch", "scipy"] if reference == "fastest" else [reference]
    if torch.device(device).type != "cpu":
        names = ["torch"]
    best = None
    for name in names:
        if name == "torch":
            t, c, (U, S, Vh) = timed(lambda: torch.linalg.svd(W0, full_matrices=False), repeats, device)
            U, S, V = U.cpu().numpy(), S.cpu().numpy(), Vh.T.cpu().numpy()
        else:
            A = W0.cpu().numpy()
            t, c, (U, S, Vh) = timed(lambda: scipy.linalg.svd(A, full_matrices=False, lapack_driver="gesdd",
                                                              check_finite=False), repeats, device)
            V = Vh.T
        if best is None or t < best[1]:
            best = (name, t, c, U, S, V)
    return best


def max_angle(Ua, Ub) -> float:
    return float(principal_angles(np.asarray(Ua), np.asarray(Ub)).max())


# ----------------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------------


def bench_spectral(sizes, ks, *, device="cpu", repeats=1, seed=0, decay=1.0, tol=TARGET_ANGLE, reference="fastest",
                   progress=None) -> list[dict[str, Any]]:
    rows = []
    say = progress or (lambda msg: None)
    for n in sizes:
        say(f"n={n}: building W0, dW; full SVD ...")
        W0, dW, _, dW_norm = make_matrices(n, seed, decay, device)
        ref, t_full, c_full, Uf, Sf, Vf = full_svd_reference(W0, reference, repeats, device)
        t_norm, _, norm = timed(lambda: spectral_norm_fast(dW, device=device, rtol=1e-10, seed=seed), repeats, device)
        norm_rel = abs(norm.value - dW_norm) / dW_norm
        say(f"n={n}: full SVD ({ref}) {t_full:.2f} s")
        for k in ks:
            if not 1 <= k < n:
                continue
            t_fast, c_fast, out = timed(lambda: topk_svd(W0, k, method="randomized", device=device, tol=tol, seed=seed),
                                repeats, device)
            angle = max(max_angle(Uf[:, :k], out.U), max_angle(Vf[:, :k], out.V))
            rows.append({
                "n": n, "k": k, "full": ref,
                "t_full_s": t_full, "t_fast_s": t_fast, "speedup": t_full / t_fast,
                "cpu_full_s": c_full, "cpu_fast_s": c_fast, "speedup_cpu": c_full / max(c_fast, 1e-9),
                "angle_err_rad": angle, "angle_bound_rad": out.angle_err_bound,
                "sigma_err": float(np.max(np.abs(out.S - Sf[:k]))),
                "method_used": out.method_used, "iterations": out.iterations,
                "norm_rel_err": norm_rel, "norm_bound_rel": norm.err_bound / dW_norm, "t_norm_s": t_norm,
                "target": _spectral_target(n, k, t_full / t_fast, angle),
            })
            say(f"n={n} k={k}: fast {t_fast:.2f} s ({t_full / t_fast:.1f}x), angle error {angle:.2e} rad")
    return rows


def _spectral_target(n: int, k: int, speedup: float, angle: float) -> str:
    if n != TARGET_SIZE or k > TARGET_MAX_K:
        return "n/a"
    return "met" if speedup >= TARGET_SPEEDUP and angle <= TARGET_ANGLE else "MISSED"


def bench_sparsity(n_entries: int, *, device="cpu", repeats=1, seed=0, backends=("auto",)) -> dict[str, Any]:
    """The bf16 change count (``theory.bf16_kernel.changed_count``, each backend) against a copy of the same bytes.

    Bytes per pass: both bf16 tensors read once (4N). The copy moves the same 4N bytes (reads 4N, writes 4N). A
    backend's first call (compilation, for ``compiled``) is made before timing."""
    w0, w1, n_changed = make_sparsity_pair(n_entries, seed)
    w0, w1 = w0.to(device), w1.to(device)
    c0, c1 = torch.empty_like(w0), torch.empty_like(w1)

    if torch.device(device).type == "cpu":  # a plain memcpy of the same bytes (numpy's copyto on the int16 views)
        s0, s1 = w0.view(torch.int16).numpy(), w1.view(torch.int16).numpy()
        d0, d1 = c0.view(torch.int16).numpy(), c1.view(torch.int16).numpy()

        def copy():
            np.copyto(d0, s0)
            np.copyto(d1, s1)
    else:
        def copy():
            c0.copy_(w0)
            c1.copy_(w1)

    copy()  # touch the destination pages once so the copy is not timing page faults
    reps = max(3, repeats)  # cheap: the fastest of a few runs filters out scheduling hiccups
    nbytes = 2 * w0.numel() * w0.element_size()
    t_cp, _, _ = timed(copy, reps, device)
    gbs_cp = nbytes / t_cp / 1e9
    rows = {}
    for backend in backends:
        count = changed_count(w0, w1, backend=backend)  # warm-up (compiles the compiled backend)
        t, _, count = timed(lambda: changed_count(w0, w1, backend=backend), reps, device)
        rows[backend] = {"t_s": t, "GBps": nbytes / t / 1e9, "ratio": nbytes / t / 1e9 / gbs_cp,
                         "count": count}
    auto = rows[backends[0]]
    return {
        "entries": n_entries, "bytes": nbytes, "sparsity": 1 - auto["count"] / n_entries,
        "expected_sparsity": 1 - n_changed / n_entries, "t_sparsity_s": auto["t_s"], "t_copy_s": t_cp,
        "sparsity_GBps": auto["GBps"], "copy_GBps": gbs_cp, "ratio": auto["ratio"],
        "target": "met" if auto["ratio"] >= TARGET_COPY_RATIO else "MISSED", "backends": rows,
        "kernel": kernel_info(device),
    }


@contextlib.contextmanager
def threads_context(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads and every BLAS/OpenMP pool (threadpoolctl) at ``threads`` inside the block (so every
    path measured gets the same cores), restored on exit. Yields the thread count in force."""
    old_threads = torch.get_num_threads()
    threads = old_threads if threads is None else int(threads)
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield threads
    finally:
        torch.set_num_threads(old_threads)


def run_bench(sizes, ks, *, device="cpu", repeats=1, seed=0, decay=1.0, tol=TARGET_ANGLE, reference="fastest",
              threads=None, sparsity_entries=1 << 26, kernel_backends=("auto",), progress=None) -> dict[str, Any]:
    """Run both benchmarks; returns ``{"meta", "spectral": [rows], "sparsity": row or None}``.

    ``threads``: see ``threads_context`` (the same cores for the full SVD and the fast path)."""
    for nm, vals in (("sizes", sizes), ("ks", ks)):
        if not vals or any(int(v) < 1 for v in vals):
            raise InputError(f"--{nm}: need positive integers, got {vals}")
    if reference not in REFERENCES:
        raise InputError(f"--reference must be one of {REFERENCES}, got {reference!r}")
    bad = [b for b in kernel_backends if b not in BACKENDS]
    if bad or not kernel_backends:
        raise InputError(f"--kernel-backends: choose from {BACKENDS}, got {list(kernel_backends)}")
    with threads_context(threads):
        return _run_bench(sizes, ks, device=device, repeats=repeats, seed=seed, decay=decay, tol=tol,
                          reference=reference, sparsity_entries=sparsity_entries, kernel_backends=kernel_backends,
                          progress=progress)


def _run_bench(sizes, ks, *, device, repeats, seed, decay, tol, reference, sparsity_entries, kernel_backends,
               progress):
    meta = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "reference": reference,
        "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "platform": platform.platform(),
        "seed": seed, "decay": decay, "tol": tol, "repeats": repeats,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    spectral = bench_spectral(sizes, ks, device=device, repeats=repeats, seed=seed, decay=decay, tol=tol,
                              reference=reference, progress=progress)
    sparsity = (bench_sparsity(sparsity_entries, device=device, repeats=repeats, seed=seed, backends=kernel_backends)
                if sparsity_entries else None)
    meta["loadavg_end"] = list(os.getloadavg())
    return {"meta": meta, "spectral": spectral, "sparsity": sparsity}


SPECTRAL_COLUMNS = [
    ("n", "{:d}"), ("k", "{:d}"), ("full", "{}"), ("t_full_s", "{:.3f}"), ("t_fast_s", "{:.3f}"), ("speedup", "{:.1f}x"), ("speedup_cpu", "{:.1f}x"),
    ("angle_err_rad", "{:.2e}"), ("angle_bound_rad", "{:.2e}"), ("norm_rel_err", "{:.2e}"),
    ("method_used", "{}"), ("iterations", "{:d}"), ("target", "{}"),
]


def format_table(rows: list[dict[str, Any]], columns=SPECTRAL_COLUMNS) -> list[str]:
    """Right-aligned text table: a header, a rule, one line per row."""
    cells = [[f.format(row[name]) for name, f in columns] for row in rows]
    widths = [max([len(name)] + [len(c[i]) for c in cells]) for i, (name, _) in enumerate(columns)]
    header = "  ".join(name.rjust(w) for (name, _), w in zip(columns, widths))
    return [header, "-" * len(header)] + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]


def format_report(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        f"threegate bench  device={m['device']}  torch={m['torch']}  threads={m['threads']}  "
        f"load avg {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}  seed={m['seed']}  decay={m['decay']}",
        "",
        f"Top-k subspaces: full float64 SVD ({m['reference']} of torch/scipy gesdd) vs certified fast path "
        f"(two-phase block Krylov, tol {m['tol']:g} rad). "
        f"Target: >= {TARGET_SPEEDUP:g}x at n = {TARGET_SIZE}, k <= {TARGET_MAX_K}, angle error <= {TARGET_ANGLE:g} rad",
    ]
    lines += format_table(res["spectral"])
    sp = res.get("sparsity")
    if sp:
        lines += [
            "",
            f"bf16 change count (theory.bf16_kernel; N = {sp['entries']:,} entries per tensor, {sp['bytes'] / 1e9:.2f} "
            f"GB read) against a copy of the same bytes ({sp['copy_GBps']:.2f} GB/s). Target: >= "
            f"{TARGET_COPY_RATIO:.0%} of copy bandwidth (auto backend on {m['device']}: {sp['kernel']['auto']})",
        ]
        for backend, b in sp["backends"].items():
            verdict = sp["target"] if backend == next(iter(sp["backends"])) else ""
            lines.append(f"  {backend:9s} {b['GBps']:8.2f} GB/s   ratio {b['ratio']:6.2f}   {verdict}")
        lines.append(f"  (sparsity = {sp['sparsity']:.6f}, expected {sp['expected_sparsity']:.6f})")
    return "\n".join(lines)
