"""``threegate compare BASE TUNED [TUNED2 ...]`` and ``threegate.compare(base, tuned)``: what fine-tuning did to
every weight matrix of a checkpoint.

Per 2-D weight matrix ``W0`` (base) and each tuned ``W+`` (``ΔW = W+ - W0``, all decompositions in float64):

* bf16 update sparsity ``1 - #changed / n`` and the update mask ``M = 1[W+ ≉ W0]`` (Def. 2.1/2.2, ``eta``; one
  fused pass, ``theory.bf16_kernel``; a non-bf16 checkpoint is rounded to bf16 first);
* ``‖ΔW‖_F``, ``‖ΔW‖_2``, ``NSS = ‖σ(W+) - σ(W0)‖_2 / ‖σ(W0)‖_2``;
* principal angles between the top-k left (U) and right (V) singular subspaces, max and mean (degrees);
  NaN where ``σ_k = σ_{k+1}`` in either matrix (the subspace is then not determined);
* ``Overlap(M•, M) = |M• ∩ M| / |M|`` for ``M_princ`` (top-α of ``|W0^(k)|``), ``M_low`` (bottom-α of ``|W0|``)
  and ``M_princ ∩ M_low^c``, each with its random baseline (the density of ``M•``);
* row / column update ratios ``ρ_i = mean_j M_ij``, ``κ_j = mean_i M_ij`` (std and max: stripes show as a large
  spread);
* where ΔW lies against W0's singular structure (``theory.update_geometry``; a *subspace projection*, unlike the
  coordinate mask ``M_princ`` above): ``energy_off_principal_subspace`` = ``‖ΔW - P_U ΔW P_V‖_F² / ‖ΔW‖_F²`` with
  ``P_U``, ``P_V`` the projectors onto W0's top-k singular subspaces, beside ``random_energy_off_principal_subspace``
  = ``1 - k²/(m n)`` (a random direction's expectation); ``iso_residual_share`` = ``‖W+ - U+ Σ0 V+ᵀ‖_F / ‖ΔW‖_F``
  (ISO's fixed-spectrum residual, unsquared; exact routes only); pooled per layer / type / run by energy;
* the Gate II checks of ``theory.spectral`` on the pair (Thm 3.3 as stated / Wedin / rigorous with the measured
  gap ``γ_k``, Cor F.13, Cor 3.4 Weyl and Mirsky, Cor 3.5), flagged ``assumption-failed`` where a hypothesis fails.

With several tuned checkpoints: per matrix, the Jaccard matrix of the runs' update masks against the independent
Bernoulli baseline ``pq / (p + q - pq)``, and the consensus ``C = mean_r M^(r)``. Aggregates per layer, per type
and the summary pool counts (``threegate.compare_tables``). The screen report opens with one headline per tuned
checkpoint, ``RUN: overall bf16 update sparsity 0.8127 (1,234,567 of ... entries changed, N matrices)``.

How it runs. Names are selected on the base in model order (``threegate.checkpoints.select_names``; only the
selected names must exist on every side, ``--shared-only`` keeps the ones all sides have). A background thread
reads the next tensors (memory-mapped safetensors) and moves them to the device while the current ones are
analysed (``threegate.stream``). Consecutive matrices of one shape are decomposed as one batch (``--batch``;
default 1 on the CPU, where LAPACK gains nothing from batching, 8 on a GPU); the host waits for the device a few
times per batch (each side's decomposition, dW, the masks come back in one copy each), under once per matrix at the
GPU default. On the CPU the streamed, batched results equal those of one matrix at a time bit for bit
(``tests/test_compare_pipeline.py``). Each side of a matrix is decomposed
once (``threegate.decompose``): the exact routes give every singular value and the top k+1 singular vectors (full
SVD, or ``svdvals`` plus certified Ritz vectors), ``--fast`` takes the certified top k+1 alone where that is
cheaper (``choose_route``) and skips NSS, ``iso_residual_share`` and the Weyl / Mirsky checks there (the other Gate
II checks run from the certified top k+1, ``threegate.matrix_metrics``), saying so on screen and in the ``skipped``
column. If a tensor fails, every matrix before it is finished and written first (the CLI prints the error as one
line and exits 1).

Python API: ``threegate.compare(base, tuned, k=16, ...)`` takes paths, open ``Checkpoint``s, state dicts or
``nn.Module``s and returns ``CompareTables`` (pandas DataFrames). ``threegate.compare`` is this module, made
callable, so ``import threegate; threegate.compare(...)`` and ``from threegate.compare import compare`` both work.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from theory import metrics
from theory.errors import InputError, ThreegateError
from threegate.checkpoints import Checkpoint, as_checkpoint, select_names
from threegate.compare_tables import CompareTables, aggregate, collect, format_report, headline, write_tables
from threegate.decompose import choose_route, dW_spectrum, decompose
from threegate.matrix_metrics import MatrixResult, matrix_result
from threegate.stream import prefetch

EPS64 = float(np.finfo(np.float64).eps)

__all__ = ["compare", "compare_tables", "compare_checkpoints", "iter_compare", "compare_matrix", "run_labels",
           "add_arguments", "run", "CompareTables", "MatrixResult", "aggregate", "write_tables"]


# ----------------------------------------------------------------------------------------------- one batch


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 (exact for bf16/fp16/fp32). ``empty().copy_()``: the same values as ``.to(float64)`` at
    0.42x of its time for a bf16 1536 x 576 matrix (one CPU thread, torch 2.13, measured 2026-12-05)."""
    if t.dtype == torch.float64:
        return t
    return torch.empty(t.shape, dtype=torch.float64, device=t.device).copy_(t)


def _analyse(names: Sequence[str], host: Sequence[Sequence[torch.Tensor]], dev: Sequence[Sequence[torch.Tensor]],
             runs: Sequence[str], *, k: int, alpha: float, eta: float, device: torch.device, fast: bool,
             keep_spectra: bool) -> list[MatrixResult]:
    """Metrics of matrices of one shape: ``host[i] = [W0, W+_1, ...]`` (and the same on ``device``). Each matrix is
    converted to float64 once; its decomposition, ``dW`` and the host arrays all use that copy."""
    m, n = host[0][0].shape
    route = choose_route(m, n, k, fast)
    f64 = [[_upcast(t) for t in d] for d in dev]
    dec0 = decompose([g[0] for g in f64], k, route, device)
    per_run = []
    for r in range(len(runs)):
        dec1 = decompose([g[1 + r] for g in f64], k, route, device)
        deltas = [g[1 + r] - g[0] for g in f64]
        # exact routes: dW's top singular values must stay inside the SVD allowance eps_s / 8 of the pair
        allowance = None if route == "fast" else [
            max(m, n) * EPS64 * max(float(a.svd.S[0]), float(b.svd.S[0])) for a, b in zip(dec0, dec1)]
        dWs = dW_spectrum(deltas, k, allowance, device)
        if len(dev) == 1:
            masks = [metrics.update_mask(dev[0][0], dev[0][1 + r], eta).cpu().numpy()]
        else:  # one pass and one host copy for the batch (an Inf/NaN is then traced per matrix by the caller)
            masks = list(metrics.update_mask(torch.stack([d[0] for d in dev]), torch.stack([d[1 + r] for d in dev]),
                                             eta).cpu().numpy())
        per_run.append((dec1, dWs, masks, [d.cpu().numpy() for d in deltas]))
    out = []
    for i, name in enumerate(names):
        arrays = [t.cpu().numpy() for t in f64[i]]
        out.append(matrix_result(
            name, arrays[0], arrays[1:], runs, dec0[i], [p[0][i] for p in per_run], [p[1][i] for p in per_run],
            [p[2][i] for p in per_run], [_dtype(t) for t in host[i][1:]], deltas=[p[3][i] for p in per_run],
            W0_stored=host[i][0], k=k, alpha=alpha, keep_spectra=keep_spectra))
    return out


def compare_matrix(name: str, W0: Any, tuned: Sequence[Any], runs: Sequence[str], *, k: int = 16,
                   alpha: float = 0.5, eta: float = metrics.ETA_DEFAULT, device: str | torch.device = "cpu",
                   keep_spectra: bool = True, fast: bool = False) -> MatrixResult:
    """All per-matrix metrics and Gate II checks of ``W0 (m, n)`` against each ``tuned[r] (m, n)``.

    ``1 <= k <= min(m, n)``. Raises ``InputError`` (and subclasses) naming the tensor.
    """
    W0 = torch.as_tensor(W0)
    tuned = [torch.as_tensor(t) for t in tuned]
    try:
        if W0.ndim != 2:
            raise InputError(f"expected a 2-d matrix, got shape {tuple(W0.shape)}")
        if not 1 <= int(k) <= min(W0.shape):
            raise InputError(f"--k {k} outside 1..min(m, n) = {min(W0.shape)}")
        dev = torch.device(device)
        group = [W0, *tuned]
        return _analyse([name], [group], [[t.to(dev) for t in group]], runs, k=int(k), alpha=alpha, eta=eta,
                        device=dev, fast=fast, keep_spectra=keep_spectra)[0]
    except ThreegateError as e:
        raise type(e)(e if name in str(e) else f"tensor {name!r}: {e}") from None
    except (np.linalg.LinAlgError, RuntimeError) as e:  # e.g. an SVD that did not converge
        raise InputError(f"tensor {name!r}: linear algebra failed ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------- many matrices


def run_labels(paths: Sequence[Any]) -> list[str]:
    """Short unique labels for tuned checkpoints: the file stem (or folder name), de-duplicated with ``#i``."""
    labels: list[str] = []
    for i, p in enumerate(paths):
        if isinstance(p, Checkpoint):
            path = p.path
        elif isinstance(p, (str, Path)):
            path = Path(p)
        else:
            path = Path("tuned" if len(paths) == 1 else f"tuned{i}")
        label = path.stem if path.suffix else path.name
        if label in labels:
            label = f"{label}#{len(labels)}"
        labels.append(label)
    return labels


def _validate_options(k: int, alpha: float, eta: float, device: str | torch.device, batch: int | None,
                      prefetch_depth: int) -> torch.device:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"--k must be a positive integer, got {k!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise InputError(f"--alpha must be a fraction in (0, 1), got {alpha}")
    if not (math.isfinite(eta) and eta >= 0):
        raise InputError(f"--eta must be a finite number >= 0, got {eta}")
    if batch is not None and batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    if prefetch_depth < 0:
        raise InputError(f"prefetch must be >= 0, got {prefetch_depth}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"--device {device!r}: not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return dev


def _check_k(ck: Checkpoint, names: Sequence[str], k: int) -> None:
    """``--k`` above ``min(m, n)`` of a selected matrix is an error naming the tensor, not a silent clamp."""
    limit, name = min((min(ck.shape(nm)), nm) for nm in names)
    if k > limit:
        raise InputError(f"--k {k} exceeds min(m, n) = {limit} of tensor {name!r} {ck.shape(name)}; "
                         f"use --k <= {limit} or --only to leave that tensor out")


def _same_shape_groups(stream: Iterator, size: int) -> Iterator[list]:
    """Consecutive items of one shape, at most ``size`` per group. A read error is raised after the items before
    it have been handed out, so no finished work is lost."""
    group: list = []
    try:
        for item in stream:
            if group and group[0][1][0][0].shape != item[1][0][0].shape:
                yield group
                group = []
            group.append(item)
            if len(group) == size:
                yield group
                group = []
    except ThreegateError:
        if group:
            yield group
        raise
    if group:
        yield group


def iter_compare(
    base: Any,
    tuned_list: Sequence[Any],
    *,
    k: int = 16,
    alpha: float = 0.5,
    eta: float = metrics.ETA_DEFAULT,
    device: str | torch.device = "cpu",
    only: str | None = None,
    max_matrices: int | None = None,
    runs: Sequence[str] | None = None,
    keep_spectra: bool = True,
    progress: bool = False,
    fast: bool = False,
    shared_only: bool = False,
    batch: int | None = None,
    prefetch_depth: int = 2,
    notes: list[str] | None = None,
    adapter_base: str | Path | None = None,
) -> Iterator[MatrixResult]:
    """Yield one ``MatrixResult`` per selected 2-D tensor, streaming (see the module docstring for the pipeline).

    ``notes`` (a list) receives what the tables must say about the inputs (quantized GGUF, dtypes that differ,
    names left out by ``shared_only``).
    """
    if isinstance(tuned_list, (str, Path, Mapping, torch.nn.Module, Checkpoint)):
        tuned_list = [tuned_list]  # one tuned checkpoint given on its own
    if not tuned_list:
        raise InputError("compare needs at least one tuned checkpoint")
    dev = _validate_options(k, alpha, eta, device, batch, prefetch_depth)
    k = int(k)
    cks = [as_checkpoint(base, label="base", adapter_base=adapter_base)]
    cks += [as_checkpoint(t, label="tuned" if len(tuned_list) == 1 else f"tuned{i}", adapter_base=adapter_base)
            for i, t in enumerate(tuned_list)]
    runs = list(runs) if runs is not None else run_labels(list(tuned_list))
    if len(runs) != len(tuned_list):
        raise InputError(f"{len(runs)} run labels for {len(tuned_list)} tuned checkpoints")
    notes = notes if notes is not None else []
    notes += [f"{c.path.name}: {c.note}" for c in cks if c.note]
    names = select_names(cks, only=only, max_matrices=max_matrices, shared_only=shared_only, notes=notes)
    if not names:
        raise InputError(f"{cks[0].path}: no 2-d weight matrix matches" + (f" --only {only!r}" if only else ""))
    _check_k(cks[0], names, k)
    size = batch if batch is not None else (1 if dev.type == "cpu" else 8)

    def read(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        host = [ck.get(name) for ck in cks]
        return host, (host if dev.type == "cpu" else [t.to(dev, non_blocking=True) for t in host])

    with tqdm(total=len(names), desc="compare", unit="matrix", disable=not progress, file=sys.stderr) as bar:
        for group in _same_shape_groups(prefetch(names, read, prefetch_depth), size):
            gnames = [nm for nm, _ in group]
            try:
                results = _analyse(gnames, [h for _, (h, _) in group], [d for _, (_, d) in group], runs, k=k,
                                   alpha=alpha, eta=eta, device=dev, fast=fast, keep_spectra=keep_spectra)
            except (ThreegateError, np.linalg.LinAlgError, RuntimeError):
                if len(group) == 1:
                    _raise_named(gnames[0], cks, sys.exc_info()[1])
                results = []  # find the failing matrix: the ones before it are kept
                for nm, (h, d) in group:
                    try:
                        results += _analyse([nm], [h], [d], runs, k=k, alpha=alpha, eta=eta, device=dev,
                                            fast=fast, keep_spectra=keep_spectra)
                    except (ThreegateError, np.linalg.LinAlgError, RuntimeError) as e:
                        yield from results
                        _raise_named(nm, cks, e)
            for r in results:
                bar.update(1)
                yield r


def _raise_named(name: str, cks: Sequence[Checkpoint], e: BaseException | None) -> None:
    """Re-raise ``e`` as a one-line error naming the files and the tensor."""
    files = " vs ".join(str(ck.file_of(name)) for ck in cks)
    msg = " ".join(str(e).split())
    if isinstance(e, ThreegateError):
        raise type(e)(f"{files}: {msg if name in msg else f'tensor {name!r}: {msg}'}") from None
    raise InputError(f"{files}: tensor {name!r}: linear algebra failed ({type(e).__name__}: {msg})") from None


def compare_tables(base: Any, tuned_list: Sequence[Any], *, method: str = "tuned", **kwargs: Any) -> CompareTables:
    """Every table of a comparison (``CompareTables``); ``kwargs`` as ``iter_compare``. Errors propagate."""
    notes: list[str] = []
    results = list(iter_compare(base, tuned_list, notes=notes, **kwargs))
    return collect(results, method=method, notes=notes)


def compare_checkpoints(base: Any, tuned_list: Sequence[Any], **kwargs: Any):
    """One row per (2-D weight matrix, tuned run): ``compare_tables(...).matrices`` without the long tables."""
    kwargs.setdefault("keep_spectra", False)
    return compare_tables(base, tuned_list, **kwargs).matrices


def compare(base: Any, tuned: Any, *, k: int = 16, alpha: float = 0.5, eta: float = metrics.ETA_DEFAULT,
            device: str | torch.device = "cpu", only: str | None = None, max_matrices: int | None = None,
            fast: bool = False, shared_only: bool = False, adapter_base: str | Path | None = None,
            runs: Sequence[str] | None = None, method: str = "tuned", keep_spectra: bool = True,
            progress: bool = False) -> CompareTables:
    """Compare a base model with one or more tuned ones; the Python form of ``threegate compare``.

    Parameters
    ----------
    base, tuned : path, Checkpoint, state dict or nn.Module (``tuned`` may be a list of them)
        Paths: a ``.safetensors`` file, a model folder, a Trainer ``checkpoint-N/`` folder, a PEFT adapter folder
        (merged onto its base, ``adapter_base``), ``.gguf``, a zip ``.bin``/``.pt``.
    k : int
        Top-k singular subspace size, ``1 <= k <= min(m, n)`` of every selected matrix (else ``InputError``).
    alpha, eta, device, only, max_matrices, fast, shared_only
        As the CLI options of the same names.
    runs : list of str, optional
        Labels of the tuned runs (default: file or folder names, ``tuned`` / ``tuned<i>`` in memory).

    Returns
    -------
    CompareTables
        ``.matrices`` (one row per matrix and run), ``.summary``, ``.by_layer``, ``.by_type``, ``.checks``,
        ``.sparsity``, ``.spectrum``, ``.angles``, ``.mask_overlap``, ``.jaccard`` ... (pandas DataFrames), ``.notes``.

    Examples
    --------
    >>> import torch, threegate
    >>> g = torch.Generator().manual_seed(0)
    >>> base = {"model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16)}
    >>> tuned = {n: w.clone() for n, w in base.items()}
    >>> tuned["model.layers.0.mlp.up_proj.weight"].view(torch.int16)[0, :8] += 1  # 8 entries one bf16 step
    >>> t = threegate.compare(base, tuned, k=4)
    >>> int(t.matrices.loc[0, "changed"]), bool(t.summary.loc[0, "sparsity"] == 1 - 8 / 512)
    (8, True)
    """
    return compare_tables(base, list(tuned) if isinstance(tuned, (list, tuple)) else [tuned], k=k, alpha=alpha, eta=eta, device=device, only=only,
                          max_matrices=max_matrices, fast=fast, shared_only=shared_only, adapter_base=adapter_base,
                          runs=runs, method=method, keep_spectra=keep_spectra, progress=progress)


# ----------------------------------------------------------------------------------------------- CLI


def _render_figures(out: Path) -> Path | None:
    """Figures and the report page through ``paper_figs`` into ``out/report`` when it is installed; silently
    nothing otherwise. The report reads ``out`` itself (so it names the real results folder and finds the
    per-matrix table for its summary); of each CSV + Parquet twin it draws one."""
    try:
        from paper_figs.report import render_all  # optional drawing: matplotlib and the report cost ~4 s to import
    except ImportError:
        return None
    try:
        return render_all(out, out / "report").page
    except Exception as e:  # figures are extras: a figure problem must not lose the tables
        print(f"threegate compare: figures skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE",
                        help="base checkpoint: .safetensors, model or checkpoint-N folder, .gguf, zip .bin/.pt")
    parser.add_argument("tuned", metavar="TUNED", nargs="+",
                        help="tuned checkpoints (same kinds, or a PEFT adapter folder, merged onto its base)")
    parser.add_argument("--k", type=int, default=16, help="top-k singular subspace size (default 16; <= min(m, n))")
    parser.add_argument("--alpha", type=float, default=0.5, help="fraction selected by M_princ and M_low (default 0.5)")
    parser.add_argument("--eta", type=float, default=metrics.ETA_DEFAULT, help="bf16 probe tolerance (default 1e-3)")
    parser.add_argument("--device", default="cpu", help="where the linear algebra runs: cpu (default) or cuda")
    parser.add_argument("--out", default=None, help="directory for CSV + Parquet tables (and figures)")
    parser.add_argument("--only", default=None, metavar="REGEX", help="compare only tensors whose name matches")
    parser.add_argument("--max-matrices", type=int, default=None, metavar="N",
                        help="the first N matrices in model order (layer 0, 1, 2, ...)")
    parser.add_argument("--shared-only", action="store_true",
                        help="compare the selected names every checkpoint has (default: a missing one is an error)")
    parser.add_argument("--adapter-base", default=None, metavar="FOLDER",
                        help="base model folder for PEFT adapter folders whose config names no local folder")
    parser.add_argument("--method", default="tuned", help="label for the sparsity table, e.g. RL or SFT")
    parser.add_argument("--fast", action="store_true",
                        help="certified top-k+1 singular triplets only, where that is faster than the exact route: "
                             "NSS, iso_residual_share and the Weyl / Mirsky checks (which need every singular "
                             "value) are skipped there; the other Gate II checks run from the certified top k+1")
    parser.add_argument("--batch", type=int, default=None, metavar="B",
                        help="decompose up to B consecutive matrices of one shape together (default 1 on cpu, 8 else)")
    parser.add_argument("--no-figures", action="store_true", help="do not render figures into OUT/report")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    runs = run_labels(args.tuned)
    notes: list[str] = []
    results: list[MatrixResult] = []
    model = Path(args.base).name
    try:
        for r in iter_compare(args.base, args.tuned, k=args.k, alpha=args.alpha, eta=args.eta, device=args.device,
                              only=args.only, max_matrices=args.max_matrices, runs=runs,
                              keep_spectra=args.out is not None, progress=not args.no_progress, fast=args.fast,
                              shared_only=args.shared_only, batch=args.batch, notes=notes,
                              adapter_base=args.adapter_base):
            results.append(r)
    except (ThreegateError, KeyboardInterrupt) as e:
        if results:  # keep what was computed before the failure
            t = collect(results, method=args.method, notes=notes, error=str(e) or type(e).__name__)
            print(format_report(t))
            if args.out:
                write_tables(t, args.out, model=model)
                print(f"threegate compare: wrote {len(results)} matrices before the error to {args.out}",
                      file=sys.stderr)
        raise
    t = collect(results, method=args.method, notes=notes)
    print(format_report(t))
    if args.out:
        write_tables(t, args.out, model=model)
        page = None if args.no_figures else _render_figures(Path(args.out))
        print(f"tables written to {args.out}" + (f"; figures: {page}" if page else ""))
    print(f"compared {len(results)} matrices x {len(runs)} run(s) in {time.perf_counter() - t0:.1f} s")
    return 0


class _CallableModule(types.ModuleType):
    """``threegate.compare`` is this module and, called, the function ``compare`` (the Python API)."""

    def __call__(self, *args: Any, **kwargs: Any) -> CompareTables:
        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__all__ += ["headline"]
