"""threegate compare's pipeline: streaming, batching, decomposition routes (exact svd / certified ritz / fast), the
auto-fast choice, the headline and summary, the Python API, and checkpoints as users have them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import threegate
from theory import metrics
from theory.errors import CheckpointError, InputError
from theory.naming import layer_index
from threegate import compare as cmp
from threegate.bench_compare import bump, synthetic_weight
from threegate.checkpoints import save_safetensors
from threegate.cli import main
from threegate.compare_tables import headline
from theory.spectral import GATE2_IDS
from threegate.decompose import RITZ_MIN_R, choose_route, decompose, dW_spectrum
from threegate.matrix_metrics import FAST_GATE2

EPS64 = float(np.finfo(np.float64).eps)
SHAPES = {"self_attn.q_proj": (96, 96), "self_attn.k_proj": (64, 96), "self_attn.v_proj": (64, 96),
          "mlp.up_proj": (160, 96), "mlp.down_proj": (96, 160)}


def make_state(layers: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.{p}.weight": synthetic_weight(shape, gen) for i in range(layers)
            for p, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    base = make_state()
    gen = torch.Generator().manual_seed(1)
    tuned = [{n: bump(w, frac, gen)[0] for n, w in base.items()} for frac in (0.05, 0.2)]
    paths = [save_safetensors(sd, root / f"{nm}.safetensors") for nm, sd in
             (("base", base), ("rl", tuned[0]), ("sft", tuned[1]))]
    return base, tuned, paths


def frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


# ----------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize("m, n, k, fast, route", [
    (576, 576, 16, False, "ritz"), (576, 576, 16, True, "fast"), (1536, 576, 16, True, "fast"),
    (192, 576, 16, True, "fast"), (192, 576, 47, True, "fast"), (192, 576, 48, True, "svd"),
    (63, 4000, 2, True, "svd"), (64, 4000, 2, True, "fast"), (8, 6, 2, False, "svd"),
])
def test_route_choice_is_shape_arithmetic(m, n, k, fast, route):
    """--fast takes the fast route only where the exact route would use Ritz vectors (so it is never the slower one);
    tiny matrices and k + 1 > r / 4 get the full SVD either way."""
    assert choose_route(m, n, k, fast) == route
    assert choose_route(n, m, k, fast) == route  # orientation does not matter
    if route == "svd":
        assert choose_route(m, n, k, not fast) == "svd"
    assert RITZ_MIN_R == 64


def test_ritz_route_is_certified_and_agrees_with_the_full_svd(files):
    base, _, _ = files
    for name, W in base.items():
        ritz, svd = decompose([W], 4, "ritz")[0], decompose([W], 4, "svd")[0]
        assert ritz.route == "ritz" and svd.route == "svd"
        # values from the route's own bidiagonalisation: within the SVD backward-error allowance eps_s / 4 of
        # svdvals' (both backward stable; measured <= 1e-15 relative)
        ref = torch.linalg.svdvals(W.double()).numpy()
        assert np.abs(ritz.svd.S - ref).max() <= 2 * max(W.shape) * EPS64 * ref[0], name
        tol = 64 * max(W.shape) * EPS64 * svd.svd.S[0] / (svd.svd.S[3] - svd.svd.S[4])
        from theory.linalg import principal_angles
        assert principal_angles(ritz.svd.U[:, :4], svd.svd.U[:, :4]).max() <= tol, name
        assert principal_angles(ritz.svd.Vh[:4].T, svd.svd.Vh[:4].T).max() <= tol, name


def test_gpu_form_of_the_exact_route_agrees_with_the_bidiagonal_one(files):
    """The device path (``svdvals`` of the batch + Gram eigenvectors), run on the CPU, against the CPU path (one
    bidiagonalisation per matrix): values within the SVD allowance, subspaces within Wedin's allowance / gap."""
    from theory.linalg import principal_angles

    base, _, _ = files
    mats = [w for n, w in base.items() if "up_proj" in n]
    cpu, dev = decompose(mats, 4, "ritz", bidiagonal=True), decompose(mats, 4, "ritz", bidiagonal=False)
    for a, b, W in zip(cpu, dev, mats):
        assert a.route == b.route == "ritz"
        assert np.abs(a.svd.S - b.svd.S).max() <= 4 * max(W.shape) * EPS64 * a.svd.S[0]
        tol = 64 * max(W.shape) * EPS64 * a.svd.S[0] / (a.svd.S[3] - a.svd.S[4])
        assert principal_angles(a.svd.Vh[:4].T, b.svd.Vh[:4].T).max() <= tol


def test_a_lapack_failure_in_the_bidiagonal_route_falls_back_to_the_svd(files, monkeypatch):
    from theory.errors import DecompositionError
    from threegate import decompose as D

    def fail(A, j):
        raise DecompositionError("LAPACK dgebrd failed (info = 3)")

    base, _, _ = files
    W = next(w for n, w in base.items() if "up_proj" in n)
    good = decompose([W], 4, "ritz")[0]
    monkeypatch.setattr(D, "values_and_top_right", fail)
    bad = decompose([W], 4, "ritz")[0]
    assert bad.route == "ritz->svd" and good.route == "ritz"
    assert np.abs(bad.svd.S - good.svd.S).max() <= 4 * max(W.shape) * EPS64 * good.svd.S[0]


def test_ritz_route_falls_back_to_the_svd_where_its_certificate_fails():
    """sigma_5 = sigma_6 (k = 4, j = 5): the top-5 block is not separated, so the Ritz vectors are not certified."""
    rng = np.random.default_rng(0)
    Q1, _ = np.linalg.qr(rng.standard_normal((100, 80)))
    Q2, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    s = np.linspace(2.0, 0.1, 80)
    s[5] = s[4]
    W = torch.from_numpy((Q1 * s) @ Q2.T)
    assert decompose([W], 4, "ritz")[0].route == "ritz->svd"
    s[5] = s[4] - 0.05
    assert decompose([torch.from_numpy((Q1 * s) @ Q2.T)], 4, "ritz")[0].route == "ritz"


def test_fast_route_bounds_contain_the_exact_values(files):
    base, tuned, _ = files
    for name in list(base)[:5]:
        W0, W1 = base[name], tuned[1][name]
        fast, exact = decompose([W0], 4, "fast")[0], decompose([W0], 4, "svd")[0]
        assert np.all(np.abs(fast.svd.S[:5] - exact.svd.S[:5]) <= fast.sigma_err + 8 * max(W0.shape) * EPS64 *
                      exact.svd.S[0])
        from theory.linalg import principal_angles
        assert principal_angles(fast.svd.U[:, :4], exact.svd.U[:, :4]).max() <= fast.angle_err + 1e-12
        dW = W1.double() - W0.double()
        values, err = dW_spectrum([dW], 4, None)[0]
        true = np.linalg.svd(dW.numpy(), compute_uv=False)
        assert abs(true[0] - values[0]) <= err + 1e-15 and err <= 1e-9 * true[0]
        exact, _ = dW_spectrum([dW], 4, [1e-14])[0]  # the exact-route form: certified top k+1 values
        assert np.all(np.abs(exact[:5] - true[:5]) <= 1e-14 / 4)


def test_fast_and_exact_compare_agree_within_certified_bounds(files):
    _, _, (b, rl, sft) = files
    exact = threegate.compare(b, [rl, sft], k=4).matrices
    fast = threegate.compare(b, [rl, sft], k=4, fast=True).matrices
    assert (fast["spectral_route"] == "fast").all() and (exact["spectral_route"] == "ritz").all()
    for col in ("changed", "sparsity", "dW_fro", "overlap_low", "row_ratio_max", "jaccard_mean"):
        assert np.array_equal(fast[col].to_numpy(), exact[col].to_numpy()), col
    assert np.all(exact["dW_2"] >= fast["dW_2"] - 1e-15)
    assert np.all(exact["dW_2"] <= fast["dW_2"] + fast["dW_2_err"] + 1e-15)
    for side in ("U", "V"):
        diff = (fast[f"angle_{side}_max_deg"] - exact[f"angle_{side}_max_deg"]).abs()
        assert np.all(diff <= fast["angle_err_deg"] + 1e-9)
    assert fast["nss"].isna().all() and (fast["check_cor3.4-weyl"] == "not-evaluated").all()
    assert (fast["skipped"].str.split().map(set) >= {"nss", "cor3.4-weyl", "cor3.4-mirsky"}).all()
    assert exact["nss"].notna().all() and (exact["skipped"] == "").all()
    # the Gate II checks the certified top k+1 allow: evaluated on every row here, never the opposite verdict
    for rid in FAST_GATE2:
        assert (fast[f"check_{rid}"] != "not-evaluated").all(), rid
        _no_opposite_verdicts(fast[f"check_{rid}"], exact[f"check_{rid}"], rid)


def _no_opposite_verdicts(fast: pd.Series, exact: pd.Series, rid: str) -> None:
    """A fast verdict may be indeterminate where the exact one is decided (a wider allowance), never the opposite
    decided verdict, and a failed assumption is failed on both routes unless the fast one is indeterminate."""
    for f, e in zip(fast, exact):
        assert {f, e} != {"holds", "violated"}, (rid, f, e)
        if f == "holds" or f == "violated":
            assert e == f, (rid, f, e)


def _known_spectrum_pair(m: int, n: int, s: np.ndarray, seed: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """W0 = Q1 diag(s) Q2ᵀ (known spectrum) and W1 = W0 + step · (a rank-2 move of the top singular block plus a
    small full-rank Gaussian part, so dW's top k+1 are separated and Cor 3.5 is certifiable)."""
    rng = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    W0 = (Q1 * s) @ Q2.T
    W1 = W0 + step * (np.outer(Q1[:, 0], Q2[:, 6]) + np.outer(Q1[:, 7], Q2[:, 1])
                      + 0.05 * rng.standard_normal((m, n)) / math.sqrt(m))
    return W0, W1


@pytest.mark.parametrize("gap, step", [(0.5, 1e-3), (0.5, 0.2), (0.5, 0.6), (1e-13, 1e-3), (1e-9, 1e-3), (1e-3, 1e-3)])
def test_fast_gate2_from_the_top_k_plus_1_agrees_with_exact_and_is_scale_and_transpose_invariant(gap, step):
    """Known spectra (a clear gap at k = 4, a gap at rounding level, a tiny one), small / comparable / large moves:
    the fast route's Gate II verdicts (allowance raised to its certified ||E||) are never the opposite of the exact
    route's, and are unchanged under W -> 2^j W (j = ±100, exact) and W -> Wᵀ."""
    m, n, k = 120, 96, 4
    s = np.concatenate([[12.0, 11.0, 10.0, 9.0], [9.0 - gap], np.linspace(7.0, 0.5, n - 5)])
    W0, W1 = _known_spectrum_pair(m, n, s, 3, step)
    t = lambda x: torch.from_numpy(x)
    exact = cmp.compare_matrix("model.layers.0.mlp.up_proj.weight", t(W0), [t(W1)], ["r"], k=k).rows[0]
    fast = cmp.compare_matrix("model.layers.0.mlp.up_proj.weight", t(W0), [t(W1)], ["r"], k=k, fast=True).rows[0]
    assert fast["spectral_route"] == "fast" and exact["spectral_route"] in ("ritz", "ritz->svd")
    ids = [r for r in FAST_GATE2 if fast[f"check_{r}"] != "not-evaluated"]
    if gap >= 1e-3:
        assert ids == list(FAST_GATE2)
    _no_opposite_verdicts(pd.Series([fast[f"check_{r}"] for r in ids]), pd.Series([exact[f"check_{r}"] for r in ids]),
                          "all")
    if gap == 1e-13:  # sigma_4 - sigma_5 below 4 eps_s of W0: no subspace verdict may be decided
        assert all(fast[f"check_{r}"] in ("assumption-failed", "indeterminate", "not-evaluated")
                   for r in ("thm3.3", "thm3.3-wedin", "thm3.3-rigorous", "corF.13"))
    for j in (100, -100):
        sc = cmp.compare_matrix("model.layers.0.mlp.up_proj.weight", t(np.ldexp(W0, j)), [t(np.ldexp(W1, j))], ["r"],
                                k=k, fast=True).rows[0]
        assert [sc[f"check_{r}"] for r in GATE2_IDS] == [fast[f"check_{r}"] for r in GATE2_IDS], j
    tr = cmp.compare_matrix("model.layers.0.mlp.up_proj.weight", t(W0.T.copy()), [t(W1.T.copy())], ["r"], k=k,
                            fast=True).rows[0]
    assert [tr[f"check_{r}"] for r in GATE2_IDS] == [fast[f"check_{r}"] for r in GATE2_IDS]


def test_fast_route_reports_the_swap_counterexample_to_thm33_as_violated_like_exact():
    """README's counterexample to Thm. 3.3 as stated (W0 = diag(1, 0.1, ...), W+ = diag(0.4, 0.7, ...), k = 1: the
    top singular direction swaps, sin Θ = 1 > ||dW||_2 / γ_1 = 0.6 / 0.9), rotated into a 120 x 96 matrix so the
    fast route runs: the fast verdict is "violated", as the exact one, and the corrected forms are not violated."""
    m, n = 120, 96
    rng = np.random.default_rng(11)
    Q1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    tail = np.linspace(0.05, 0.001, n - 2)
    W0 = (Q1 * np.concatenate([[1.0, 0.1], tail])) @ Q2.T
    W1 = (Q1 * np.concatenate([[0.4, 0.7], tail])) @ Q2.T
    t = lambda x: torch.from_numpy(x)
    rows = [cmp.compare_matrix("model.layers.0.mlp.up_proj.weight", t(W0), [t(W1)], ["r"], k=1, fast=f).rows[0]
            for f in (False, True)]
    exact, fast = rows
    assert fast["spectral_route"] == "fast"
    assert exact["check_thm3.3"] == fast["check_thm3.3"] == "violated"
    assert fast["check_thm3.3-rigorous"] == exact["check_thm3.3-rigorous"] == "holds"
    assert fast["check_thm3.3-wedin"] != "violated" and exact["check_thm3.3-wedin"] != "violated"  # attained: 1 <= 1


# ----------------------------------------------------------------------------------------------- pipeline


def test_streamed_equals_unstreamed_and_batched_equals_per_matrix(files):
    _, _, (b, rl, sft) = files
    ref = cmp.compare_tables(b, [rl, sft], k=4, prefetch_depth=0, batch=1)
    for kwargs in ({"prefetch_depth": 3, "batch": 1}, {"prefetch_depth": 2, "batch": 3}, {"prefetch_depth": 0,
                                                                                           "batch": 8}):
        got = cmp.compare_tables(b, [rl, sft], k=4, **kwargs)
        for attr in ("matrices", "checks", "spectrum", "angles", "mask_overlap", "jaccard_pairs", "summary"):
            frames_equal(getattr(got, attr), getattr(ref, attr))


def test_a_bad_tensor_stops_after_the_matrices_before_it_and_names_itself(files, tmp_path, capsys):
    base, tuned, (b, _, _) = files
    names = list(base)
    bad = {n: w.clone() for n, w in tuned[0].items()}
    bad[names[7]][1, 1] = float("nan")
    p = save_safetensors(bad, tmp_path / "bad.safetensors")
    for batch in ("1", "3"):
        out = tmp_path / f"out{batch}"
        rc = main(["compare", str(b), str(p), "--k", "4", "--out", str(out), "--batch", batch, "--no-progress",
                   "--no-figures"])
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err
        line = [ln for ln in err.splitlines() if ln.startswith("threegate compare: error:")]
        assert len(line) == 1 and names[7] in line[0] and "bad.safetensors" in line[0] and "non-finite" in line[0]
        assert list(pd.read_csv(out / "matrices.csv")["name"]) == names[:7]


def test_stream_errors_arrive_in_order_and_foreign_errors_name_the_tensor():
    from threegate.stream import prefetch

    def read(name):
        if name == "c":
            raise OSError("disk gone")
        return name.upper()

    for depth in (0, 1, 4):
        got = []
        with pytest.raises(CheckpointError, match=r"tensor 'c': cannot read \(OSError: disk gone\)"):
            for name, value in prefetch(["a", "b", "c", "d"], read, depth):
                got.append(value)
        assert got == ["A", "B"]


def test_headline_summary_and_tables_pool_counts(files, capsys, tmp_path):
    base, tuned, (b, rl, sft) = files
    out = tmp_path / "out"
    rc = main(["compare", str(b), str(rl), str(sft), "--k", "4", "--out", str(out), "--no-progress",
               "--no-figures"])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0
    for i, (label, sd) in enumerate((("rl", tuned[0]), ("sft", tuned[1]))):
        changed = sum(int(metrics.bf16_changed_count(base[n], sd[n])) for n in base)
        numel = sum(w.numel() for w in base.values())
        s = 1 - changed / numel
        assert printed[i] == (f"{label}: overall bf16 update sparsity {s:.4f} ({changed:,} of {numel:,} entries "
                              f"changed, {len(base)} matrices)")
    assert printed[3] == "Per layer (pooled counts):"
    summary = pd.read_csv(out / "compare_summary.csv")
    rl_all = summary[(summary["run"] == "rl") & (summary["scope"] == "overall")].iloc[0]
    m = pd.read_csv(out / "matrices.csv")
    mrl = m[m["run"] == "rl"]
    assert rl_all["changed"] == mrl["changed"].sum() and rl_all["matrices"] == len(base)
    assert rl_all["overlap_princ"] == pytest.approx(mrl["inter_princ"].sum() / mrl["changed"].sum(), rel=1e-15)
    assert rl_all["gate2_holds"] + rl_all["gate2_violated"] + rl_all["gate2_assumption_failed"] == 7 * len(base)
    assert rl_all["max_angle_deg"] == max(mrl["angle_U_max_deg"].max(), mrl["angle_V_max_deg"].max())
    assert list(summary[summary["run"] == "rl"]["scope"]) == ["overall", "q", "k", "v", "up", "down"]
    # the report's schema, and the same numbers the report would compute from the per-matrix table
    from paper_figs import schemas
    from paper_figs.summary import SUMMARY_COLUMNS, summary_from_matrices

    assert list(summary.columns[:len(SUMMARY_COLUMNS)]) == list(SUMMARY_COLUMNS)
    schemas.validate(summary, "compare_summary", source="compare_summary.csv")
    theirs = summary_from_matrices(m.assign(method="tuned"))
    pd.testing.assert_frame_equal(summary[list(SUMMARY_COLUMNS)], theirs, check_dtype=False)


def test_headline_keeps_digits_that_four_decimals_would_hide():
    t = threegate.compare({"model.layers.0.mlp.up_proj.weight": torch.ones(200, 100, dtype=torch.bfloat16)},
                          {"model.layers.0.mlp.up_proj.weight": torch.ones(200, 100, dtype=torch.bfloat16)
                           .index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(2.0,
                                                                                            dtype=torch.bfloat16))},
                          k=2)
    assert headline(t) == ["tuned: overall bf16 update sparsity 0.99995000 (1 of 20,000 entries changed, 1 matrices)"]


def test_fast_says_what_it_skips(files, capsys):
    _, _, (b, rl, _) = files
    assert main(["compare", str(b), str(rl), "--k", "4", "--fast", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fast route on 20 of 20 matrix rows" in out and "skipped there nss, cor3.4-weyl, cor3.4-mirsky" in out
    assert "need every singular value" in out and "evaluated on 20 of 20 fast rows" in out


# ----------------------------------------------------------------------------------------------- as users have them


def test_python_api_takes_state_dicts_modules_and_lists(files):
    base, tuned, (b, rl, _) = files
    from_files = threegate.compare(b, rl, k=4)
    from_memory = threegate.compare(base, tuned[0], k=4)
    cols = ["name", "changed", "sparsity", "dW_2", "nss", "angle_U_max_deg", "overlap_princ", "check_thm3.3"]
    frames_equal(from_memory.matrices[cols], from_files.matrices[cols])
    assert from_memory.matrices["run"].unique().tolist() == ["tuned"]
    two = threegate.compare(base, [tuned[0], tuned[1]], k=4, runs=["a", "b"], only="layers\\.0\\.")
    assert sorted(two.matrices["run"].unique()) == ["a", "b"] and not two.jaccard.empty
    assert list(two.summary["scope"][:2]) == ["overall", "q"] and set(two.summary["method"]) == {"tuned"}
    lin0, lin1 = torch.nn.Linear(96, 80, bias=False), torch.nn.Linear(96, 80, bias=False)
    with torch.no_grad():
        lin1.weight.copy_(lin0.weight)
        lin1.weight[3, :5] += 1.0
    t = threegate.compare(lin0, lin1, k=3)
    assert t.matrices.loc[0, "name"] == "weight" and t.matrices.loc[0, "changed"] == 5
    assert callable(cmp) and cmp.compare is not cmp


def test_k_above_its_limit_is_a_one_line_error(files, capsys):
    _, _, (b, rl, _) = files
    with pytest.raises(InputError, match=r"--k 65 exceeds min\(m, n\) = 64 of tensor 'model\.layers\.0\.self_attn"
                                         r"\.k_proj\.weight' \(64, 96\)"):
        threegate.compare(b, rl, k=65)
    assert main(["compare", str(b), str(rl), "--k", "65", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exceeds min(m, n) = 64" in err
    assert len(threegate.compare(b, rl, k=65, only="up_proj").matrices) == 4  # fine where every matrix is wider


def test_shared_only_and_missing_tensors_outside_the_selection(files, tmp_path, capsys):
    base, tuned, (b, _, _) = files
    partial = {n: w for n, w in tuned[0].items() if "layers.3." not in n}
    p = save_safetensors(partial, tmp_path / "partial.safetensors")
    assert main(["compare", str(b), str(p), "--k", "4", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "5 selected tensor(s) missing in" in err and "--shared-only" in err
    assert main(["compare", str(b), str(p), "--k", "4", "--no-progress", "--only", "layers\\.[0-2]\\."]) == 0
    capsys.readouterr()
    assert main(["compare", str(b), str(p), "--k", "4", "--no-progress", "--shared-only"]) == 0
    out = capsys.readouterr().out
    assert "(0 of" not in out and "15 matrices" in out and "5 selected tensor(s) absent, not compared" in out


def test_max_matrices_follows_model_order_and_dtype_note(files, tmp_path, capsys):
    base, tuned, _ = files
    sd0 = {f"model.layers.{i}.mlp.up_proj.weight": base["model.layers.0.mlp.up_proj.weight"] for i in (0, 1, 2, 10)}
    sd1 = {n: w.float() for n, w in sd0.items()}
    a = save_safetensors(sd0, tmp_path / "a.safetensors")
    c = save_safetensors(sd1, tmp_path / "c.safetensors")
    t = threegate.compare(a, c, k=2, max_matrices=3)
    assert [layer_index(n) for n in t.matrices["name"]] == [0, 1, 2]
    assert (t.matrices["changed"] == 0).all()  # float32 copies of bf16 values round back exactly
    assert any("dtypes differ on 3 tensor(s): bfloat16 in a.safetensors, float32 in c.safetensors" in n
               for n in t.notes)


def test_peft_adapter_compare_shows_a_rank_r_update_on_the_adapted_matrices(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    t = threegate.compare(tmp_path / "base", tmp_path / "adapter", k=2)
    m = t.matrices.set_index("name")
    q = m[m["matrix_type"] == "q"]
    assert len(q) == 2 and (q["changed"] > 0).all() and (m[m["matrix_type"] != "q"]["changed"] == 0).all()
    spec = t.spectrum
    assert not spec.empty
    assert any("PEFT LORA adapter (r=2) merged onto" in n for n in t.notes)
    # the merged update B A (scaled) has rank <= 2: sigma_3(dW) vanishes against sigma_1(dW)
    from threegate.checkpoints import open_checkpoint
    b, a = open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "adapter")
    for name in q.index:
        s = np.linalg.svd((a.get(name).double() - b.get(name).double()).numpy(), compute_uv=False)
        assert s[2] <= 1e-5 * s[0] and math.isclose(q.loc[name, "dW_2"], s[0], rel_tol=1e-12)


@pytest.mark.parametrize("fast", [False, True])
def test_metamorphic_transpose_and_power_of_two_scaling(files, fast):
    """W -> W^T swaps the U and V angles and row / column ratios and keeps the counts (not the mask overlaps: ties in
    |W0| are broken by row-major index, which a transpose reorders); W -> 2^3 W (exact in bf16) keeps the counts and
    masks exactly and the scale-free spectral metrics to rounding."""
    base, tuned, _ = files
    names = [n for n in base if "up_proj" in n or "k_proj" in n][:4]
    b0, b1 = {n: base[n] for n in names}, {n: tuned[0][n] for n in names}
    ref = threegate.compare(b0, b1, k=4, fast=fast).matrices
    tr = threegate.compare({n: w.T.contiguous() for n, w in b0.items()}, {n: w.T.contiguous() for n, w in b1.items()},
                           k=4, fast=fast).matrices
    sc = threegate.compare({n: w * 8 for n, w in b0.items()}, {n: w * 8 for n, w in b1.items()}, k=4,
                           fast=fast).matrices
    assert np.array_equal(tr["changed"], ref["changed"])
    for col in ("changed", "overlap_low", "overlap_princ"):
        assert np.array_equal(sc[col], ref[col]), col
    assert np.array_equal(tr["row_ratio_max"], ref["col_ratio_max"])
    rtol = 1e-9
    np.testing.assert_allclose(tr["angle_U_max_deg"], ref["angle_V_max_deg"], rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(sc["angle_U_max_deg"], ref["angle_U_max_deg"], rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(sc["dW_2"], 8 * ref["dW_2"], rtol=1e-12)
    if not fast:
        np.testing.assert_allclose(sc["nss"], ref["nss"], rtol=1e-12)
        np.testing.assert_allclose(tr["nss"], ref["nss"], rtol=1e-12)
        assert list(sc["check_thm3.3-wedin"]) == list(ref["check_thm3.3-wedin"])


def test_gram_eigensolver_of_the_gpu_path_agrees_with_the_cpu_subset_solver(files):
    """The device path (torch.linalg.eigh of the batched Gram matrices) against LAPACK's subset solver, on the CPU."""
    from threegate import decompose as D
    from theory.linalg import principal_angles

    base, _, _ = files
    mats = [w.double() for n, w in base.items() if "up_proj" in n]
    A = torch.stack(mats)
    lam_c, V_c, tr_c = D._gram_top(A, 6, subset_solver=True)
    lam_t, V_t, tr_t = D._gram_top(A, 6, subset_solver=False)
    G_norm = float(torch.linalg.matrix_norm(A.transpose(-2, -1) @ A, ord=2).max())
    assert torch.allclose(lam_c, lam_t, rtol=0, atol=64 * 160 * EPS64 * G_norm)
    assert torch.allclose(tr_c, tr_t, rtol=1e-14)
    for b in range(A.shape[0]):
        assert principal_angles(V_c[b, :, :5].numpy(), V_t[b, :, :5].numpy()).max() <= 1e-9


@pytest.mark.parametrize("module", ["threegate.compare", "threegate.decompose", "threegate.stream",
                                    "threegate.checkpoints", "theory.bf16_kernel"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_import_threegate_stays_light_and_compare_loads_on_first_use():
    import subprocess
    import sys

    code = ("import sys, threegate; assert 'torch' not in sys.modules and 'threegate.compare' not in sys.modules; "
            "f = threegate.compare; assert callable(f) and 'threegate.compare' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
