"""Tests for threegate.compare: known-answer checkpoint pairs, cross-run Jaccard, the CLI's errors and partial output,
and SmolLM2 (GGUF, Q4_1) against a perturbed copy of itself."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory.naming import matrix_type
from threegate.checkpoints import open_checkpoint, save_safetensors, smollm2_gguf_path
from threegate.compare import compare_checkpoints, compare_matrix, compare_tables
from theory import metrics
from theory.errors import CheckpointError
from theory.linalg import svd64
from threegate.decompose import decompose
from threegate.cli import main

EPS64 = float(np.finfo(np.float64).eps)


def bump_bf16(w: torch.Tensor, idx: list[tuple[int, int]]) -> torch.Tensor:
    """Copy of bf16 ``w`` with each listed entry moved to its next bf16 value away from zero (int16 view + 1)."""
    out = w.clone()
    bits = out.view(torch.int16)
    for i, j in idx:
        bits[i, j] += 1
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["compare", *argv, "--no-progress", "--no-figures"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("threegate compare: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------------------- known answers


def test_exactly_known_changed_entries_give_exact_sparsity_and_mask(tmp_path):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(16, 12, generator=g).to(torch.bfloat16)
    idx = [(0, 0), (0, 5), (3, 7), (15, 11), (8, 2)]
    W1 = bump_bf16(W0, idx)
    base = save_safetensors({"blocks.0.attn.v.weight": W0}, tmp_path / "base.safetensors")
    tuned = save_safetensors({"blocks.0.attn.v.weight": W1}, tmp_path / "tuned.safetensors")
    df = compare_checkpoints(base, [tuned], k=3, alpha=0.25)
    row = df.iloc[0]
    assert row["changed"] == len(idx)
    assert row["sparsity"] == 1 - len(idx) / (16 * 12)  # exact: the same float expression
    assert (row["matrix_type"], row["layer"]) == ("v", 0)
    assert row["row_ratio_max"] == 2 / 12  # row 0 holds two changes out of 12 columns
    assert row["rows_touched"] == 4 / 16 and row["cols_touched"] == 5 / 12
    # the update mask itself, entry by entry
    res = compare_matrix("blocks.0.attn.v.weight", W0, [W1], ["t"], k=3, alpha=0.25)
    mask = np.zeros((16, 12), dtype=bool)
    for i, j in idx:
        mask[i, j] = True
    assert res.rows[0]["inter_low"] == int((metrics.low_magnitude_mask(W0.double().numpy(), 0.25) & mask).sum())
    # ||dW||_F from the stored bf16 values, in float64 (exact differences of bf16 numbers)
    dW = (W1.double() - W0.double()).numpy()
    assert row["dW_fro"] == pytest.approx(np.linalg.norm(dW), rel=4 * EPS64)


def test_known_rank_one_update_gives_its_spectral_norm(tmp_path):
    rng = np.random.default_rng(3)
    m, n, s = 10, 8, 2.0**-3
    W0 = rng.integers(-8, 9, size=(m, n)) / 8.0  # dyadic: every value and sum below is exact in float64
    u = np.zeros(m)
    u[[1, 4, 6, 9]] = 0.5  # unit vector
    v = np.zeros(n)
    v[[0, 2, 3, 7]] = [0.5, -0.5, 0.5, -0.5]  # unit vector
    dW = s * np.outer(u, v)  # rank one, ||dW||_2 = ||dW||_F = s exactly
    W1 = W0 + dW
    assert np.array_equal(W1 - W0, dW)
    name = "model.layers.2.mlp.down_proj.weight"
    base = save_safetensors({name: torch.from_numpy(W0)}, tmp_path / "b.safetensors")
    tuned = save_safetensors({name: torch.from_numpy(W1)}, tmp_path / "t.safetensors")
    t = compare_tables(base, [tuned], k=2)
    row = t.matrices.iloc[0]
    tol = 8 * max(m, n) * EPS64 * s
    assert abs(row["dW_2"] - s) <= tol
    assert abs(row["dW_fro"] - s) <= tol
    assert row["changed"] == 16  # the 4 x 4 support; dyadic values are exact in bf16
    assert (row["matrix_type"], row["layer"]) == ("down", 2)
    checks = t.checks.set_index("result_id")
    assert checks.loc["cor3.4-weyl", "verdict"] == "holds"
    assert abs(checks.loc["cor3.4-weyl", "rhs"] - s) <= tol  # Weyl's bound is ||dW||_2
    assert checks.loc["cor3.4-mirsky", "rhs"] == pytest.approx(s, abs=tol)


def test_identical_checkpoints_give_sparsity_one_and_zero_angles(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {f"blocks.{i}.attn.{t}.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16)
          for i in range(2) for t in "qo"}
    a = save_safetensors(sd, tmp_path / "a.safetensors")
    b = save_safetensors(sd, tmp_path / "b.safetensors")
    t = compare_tables(a, [b], k=3)
    df = t.matrices
    assert len(df) == 4
    assert (df["sparsity"] == 1.0).all() and (df["changed"] == 0).all()
    assert (df["dW_fro"] == 0).all() and (df["dW_2"] == 0).all() and (df["nss"] == 0).all()
    angle_tol = math.degrees(8 * 12 * EPS64)
    for c in ("angle_U_max_deg", "angle_V_max_deg"):
        assert (df[c] <= angle_tol).all(), df[c]
    assert df["overlap_princ"].isna().all()  # |M| = 0: overlap undefined, not 0
    assert t.mask_overlap.empty  # and no row for the Fig. 5 table, whose overlap column must be finite
    assert (t.checks["verdict"] == "holds").all()
    assert (t.by_type["sparsity"] == 1.0).all()


def test_known_principal_angle_of_a_rotated_top_singular_vector():
    theta = 0.3
    W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    R = torch.eye(4, dtype=torch.float64)
    R[0, 0] = R[3, 3] = math.cos(theta)
    R[3, 0], R[0, 3] = math.sin(theta), -math.sin(theta)
    W1 = R @ W0  # left singular vectors rotate by theta in the (e1, e4) plane; spectrum and V unchanged
    row = compare_matrix("blocks.0.attn.o.weight", W0, [W1], ["rot"], k=1).rows[0]
    assert row["angle_U_max_deg"] == pytest.approx(math.degrees(theta), abs=math.degrees(64 * EPS64))
    assert row["angle_V_max_deg"] <= math.degrees(64 * EPS64)
    assert row["nss"] <= 16 * EPS64


def test_zero_spectral_gap_gives_nan_angles_and_failed_assumption():
    W0 = torch.diag(torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    W1 = W0 + 1e-3 * torch.ones(4, 4, dtype=torch.float64)
    res = compare_matrix("blocks.1.mlp.up.weight", W0, [W1], ["r"], k=2)
    row = res.rows[0]
    assert math.isnan(row["angle_U_max_deg"]) and "not unique" in row["angles_note"]
    verdicts = {c["result_id"]: c for c in res.checks}
    assert verdicts["thm3.3"]["verdict"] == "assumption-failed"
    assert "gamma_k > 0" in verdicts["thm3.3-rigorous"]["failed_assumption"]
    assert verdicts["cor3.4-weyl"]["verdict"] == "holds"  # gap-free results are still evaluated


def test_update_on_the_smallest_entries_lies_inside_m_low():
    W0 = (torch.arange(1, 65, dtype=torch.float32).reshape(8, 8) / 64).to(torch.bfloat16)
    smallest = [(0, j) for j in range(8)]  # |W0| increases with the flat index
    W1 = bump_bf16(W0, smallest)
    row = compare_matrix("blocks.0.mlp.gate.weight", W0, [W1], ["r"], k=2, alpha=0.25).rows[0]
    assert row["overlap_low"] == 1.0
    assert row["baseline_low"] == 16 / 64  # floor(0.25 * 64 + 1/2) entries selected
    assert row["row_ratio_max"] == 1.0 and row["rows_touched"] == 1 / 8


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=50), st.integers(0, 50), st.booleans())
@example([0, 0, 0], 2, True)  # all tied, -0.0 among them
def test_linear_time_selection_equals_the_stable_sort_rule(values, count, negate):
    """theory.metrics' O(n) top-count selection = the first ``count`` of a stable argsort of -score (ties: lower index)."""
    score = np.array(values, dtype=np.float64) * (-1.0 if negate else 1.0)
    count = min(count, score.size)
    order = np.argsort(-score, kind="stable")
    expected = np.zeros(score.size, dtype=bool)
    expected[order[:count]] = True
    assert np.array_equal(metrics._select_top(score, count), expected)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=50), st.integers(0, 50), st.booleans())
@example([0, 0, 0], 2, True)  # all tied, -0.0 among them
def test_linear_time_bottom_selection_equals_the_stable_sort_rule(values, count, negate):
    """M_low's bottom-count selection = the first ``count`` of a stable argsort of score (ties: lower index), the same
    mask as ``_select_top(-score)`` (what it replaced)."""
    score = np.array(values, dtype=np.float64) * (-1.0 if negate else 1.0)
    count = min(count, score.size)
    expected = np.zeros(score.size, dtype=bool)
    expected[np.argsort(score, kind="stable")[:count]] = True
    assert np.array_equal(metrics._select_bottom(score, count), expected)
    assert np.array_equal(metrics._select_top(-score, count), expected)


@pytest.mark.parametrize("shape, k, alpha", [((9, 7), 2, 0.5), ((7, 9), 3, 0.05), ((6, 6), 6, 0.5), ((5, 8), 1, 0.3)])
def test_principal_mask_from_compare_equals_theory_metrics(shape, k, alpha):
    rng = np.random.default_rng(sum(shape) + k)
    W = rng.standard_normal(shape)
    W[0, :] = W[1, :]  # equal rows: tied scores exercise the tie-break by flat index
    expected = metrics.principal_mask(W, k, alpha)
    assert np.array_equal(metrics.principal_mask_from_svd(svd64(W), k, alpha), expected)
    row = compare_matrix("blocks.0.attn.q.weight", torch.from_numpy(W), [torch.from_numpy(W)], ["r"], k=k,
                         alpha=alpha).rows[0]
    assert row["size_princ"] == metrics.selection_count(alpha, W.size)


def test_principal_mask_from_ritz_vectors_differs_only_at_rounding_level_ties():
    """The ritz route's M_princ (svdvals + Gram-Ritz vectors) against numpy's SVD: any entry that differs has a
    score within rounding (1e-12 relative) of the selection threshold."""
    rng = np.random.default_rng(5)
    m, n, k, alpha = 300, 200, 8, 0.3
    Q1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    W = (Q1 * (0.97 ** np.arange(n))) @ Q2.T
    dec = decompose([torch.from_numpy(W)], k, "ritz")[0]
    assert dec.route == "ritz"
    got = metrics.principal_mask_from_svd(dec.svd, k, alpha)
    ref = metrics.principal_mask(W, k, alpha)
    score = np.abs(metrics.rank_k_reconstruction(W, k))
    t = np.sort(score.ravel())[::-1][metrics.selection_count(alpha, W.size) - 1]
    tie = 2 * metrics.reconstruction_tie_tol(dec.svd.S, k, W.shape)
    assert np.all(np.abs(score[got != ref] - t) <= 2 * tie)


def test_symmetric_metrics_do_not_depend_on_argument_order(tmp_path):
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(20, 14, generator=g)
    W1 = W0 + 0.05 * torch.randn(20, 14, generator=g)
    a = compare_matrix("blocks.0.attn.k.weight", W0, [W1], ["r"], k=4).rows[0]
    b = compare_matrix("blocks.0.attn.k.weight", W1, [W0], ["r"], k=4).rows[0]
    assert a["changed"] == b["changed"]
    assert a["dW_2"] == pytest.approx(b["dW_2"], rel=64 * EPS64)
    assert a["dW_fro"] == pytest.approx(b["dW_fro"], rel=64 * EPS64)
    assert a["angle_U_max_deg"] == pytest.approx(b["angle_U_max_deg"], rel=1e-9)


def test_pooled_sparsity_per_type_counts_entries_not_matrices(tmp_path):
    g = torch.Generator().manual_seed(7)
    big = torch.randn(30, 20, generator=g).to(torch.bfloat16)
    small = torch.randn(4, 5, generator=g).to(torch.bfloat16)
    sd0 = {"blocks.0.attn.q.weight": big, "blocks.1.attn.q.weight": small}
    sd1 = {"blocks.0.attn.q.weight": bump_bf16(big, [(0, 0)]),
           "blocks.1.attn.q.weight": bump_bf16(small, [(i, j) for i in range(4) for j in range(5)])}
    t = compare_tables(save_safetensors(sd0, tmp_path / "a.safetensors"),
                       [save_safetensors(sd1, tmp_path / "b.safetensors")], k=2)
    q = t.by_type.set_index("matrix_type").loc["q"]
    assert q["sparsity"] == 1 - 21 / 620  # pooled, not the mean of 1 - 1/600 and 0
    assert t.sparsity.set_index("matrix_type").loc["q", "sparsity"] == 1 - 21 / 620
    assert set(t.by_layer["layer"]) == {0, 1}


def test_two_runs_give_the_known_jaccard_and_bernoulli_baseline(tmp_path):
    g = torch.Generator().manual_seed(11)
    W0 = torch.randn(10, 10, generator=g).to(torch.bfloat16)
    A = [(i, i) for i in range(10)]  # 10 entries
    B = [(i, i) for i in range(5)] + [(i, (i + 1) % 10) for i in range(5)]  # 5 shared with A
    name = "blocks.0.attn.q.weight"
    paths = [save_safetensors({name: w}, tmp_path / f"{lab}.safetensors")
             for lab, w in (("base", W0), ("ra", bump_bf16(W0, A)), ("rb", bump_bf16(W0, B)))]
    t = compare_tables(paths[0], paths[1:], k=2)
    row = t.matrices.iloc[0]
    assert row["jaccard_mean"] == pytest.approx(5 / 15, rel=4 * EPS64)  # mean of the off-diagonal pair
    assert row["jaccard_baseline"] == pytest.approx(0.01 / (0.1 + 0.1 - 0.01), rel=4 * EPS64)
    assert row["consensus_all"] == 5 / 15  # touched entries changed by both runs
    assert row["consensus_mean"] == pytest.approx((5 * 1.0 + 10 * 0.5) / 15, rel=4 * EPS64)
    pooled = t.jaccard.iloc[0]
    assert (pooled["run_a"], pooled["run_b"], pooled["jaccard"]) == ("ra", "rb", 5 / 15)


def test_only_and_max_matrices_restrict_the_comparison(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {f"blocks.{i}.{p}.weight": torch.randn(6, 6, generator=g) for i in range(3) for p in ("attn.q", "mlp.up")}
    a = save_safetensors(sd, tmp_path / "a.safetensors")
    b = save_safetensors(sd, tmp_path / "b.safetensors")
    assert list(compare_checkpoints(a, [b], k=2, only=r"mlp")["name"]) == [f"blocks.{i}.mlp.up.weight" for i in range(3)]
    assert len(compare_checkpoints(a, [b], k=2, max_matrices=2)) == 2


# ----------------------------------------------------------------------------------------------- CLI and errors


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(4)
    sd = {f"model.layers.{i}.self_attn.{t}_proj.weight": torch.randn(8, 6, generator=g).to(torch.bfloat16)
          for i in range(3) for t in "qv"}
    base = save_safetensors(sd, tmp_path / "base.safetensors")
    tuned = save_safetensors({k: bump_bf16(v, [(1, 1)]) for k, v in sd.items()}, tmp_path / "tuned.safetensors")
    return sd, base, tuned


def test_cli_writes_csv_and_parquet_tables(capsys, tmp_path, pair):
    _, base, tuned = pair
    out = tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, str(base), str(tuned), "--k", "2", "--out", str(out))
    assert rc == 0
    assert "sparsity" in stdout and "Gate II checks" in stdout
    for name in ("matrices", "checks", "by_layer", "by_type", "sparsity", "spectrum", "angles", "mask_overlap"):
        csv, pq = pd.read_csv(out / f"{name}.csv"), pd.read_parquet(out / f"{name}.parquet")
        assert len(csv) == len(pq) > 0
    m = pd.read_csv(out / "matrices.csv")
    assert len(m) == 6 and (m["changed"] == 1).all() and (m["sparsity"] == 1 - 1 / 48).all()
    assert len(pd.read_csv(out / "checks.csv")) == 6 * 7


def test_failure_at_a_later_tensor_keeps_the_rows_before_it(capsys, tmp_path, pair):
    sd, base, _ = pair
    bad = {k: v.clone() for k, v in sd.items()}
    names = list(sd)
    bad[names[3]][2, 2] = float("nan")  # the 4th matrix fails
    tuned = save_safetensors(bad, tmp_path / "tuned_nan.safetensors")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, str(base), str(tuned), "--k", "2", "--out", str(out))
    assert rc == 1
    line = error_line(err)
    assert "tuned_nan.safetensors" in line and names[3] in line and "non-finite" in line
    m = pd.read_csv(out / "matrices.csv")
    assert list(m["name"]) == names[:3]  # matrices 1-3 written before the error
    assert "error" in (out / "matrices.csv.meta.json").read_text()


def test_missing_file_is_one_line_exit_1(capsys, tmp_path, pair):
    _, base, _ = pair
    rc, _, err = run_cli(capsys, str(base), str(tmp_path / "absent.safetensors"))
    assert rc == 1
    assert "absent.safetensors: file not found" in error_line(err)


def test_truncated_checkpoint_is_one_line_exit_1(capsys, tmp_path, pair):
    _, base, tuned = pair
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tuned.read_bytes()[:-7])
    rc, _, err = run_cli(capsys, str(base), str(cut))
    assert rc == 1
    assert "cut.safetensors: not a readable safetensors file" in error_line(err)


def test_pickle_checkpoint_is_refused(capsys, tmp_path, pair):
    _, base, _ = pair
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(pickle.dumps({"w": 1}))
    rc, _, err = run_cli(capsys, str(base), str(p))
    assert rc == 1
    assert "pytorch_model.bin: pickle file refused" in error_line(err)


class Payload:  # not a tensor: torch.load(weights_only=True) refuses it
    pass


def test_pt_rejected_by_weights_only_is_refused(capsys, tmp_path, pair):
    _, base, _ = pair
    p = tmp_path / "model.pt"
    torch.save({"w": Payload()}, p)
    rc, _, err = run_cli(capsys, str(base), str(p))
    assert rc == 1
    assert "model.pt: refused by torch.load(weights_only=True)" in error_line(err)


def test_unsupported_dtype_names_file_tensor_and_dtype(capsys, tmp_path, pair):
    sd, base, _ = pair
    name = list(sd)[0]
    q = dict(sd, **{name: torch.zeros(8, 6, dtype=torch.int8)})
    tuned = save_safetensors(q, tmp_path / "int8.safetensors")
    rc, _, err = run_cli(capsys, str(base), str(tuned), "--k", "2")
    assert rc == 1
    line = error_line(err)
    assert "int8.safetensors" in line and name in line and "unsupported dtype int8" in line


def test_mismatched_names_list_both_sides(capsys, tmp_path, pair):
    sd, base, _ = pair
    other = dict(sd)
    gone = list(other)[-1]
    other.pop(gone)
    other["model.layers.9.mlp.up_proj.weight"] = torch.zeros(8, 6)
    tuned = save_safetensors(other, tmp_path / "renamed.safetensors")
    rc, _, err = run_cli(capsys, str(base), str(tuned))
    assert rc == 1
    line = error_line(err)
    assert gone in line and "model.layers.9.mlp.up_proj.weight" in line and "renamed.safetensors" in line


def test_mismatched_shape_names_tensor(capsys, tmp_path, pair):
    sd, base, _ = pair
    name = list(sd)[2]
    tuned = save_safetensors(dict(sd, **{name: torch.zeros(8, 7)}), tmp_path / "wide.safetensors")
    rc, _, err = run_cli(capsys, str(base), str(tuned))
    assert rc == 1
    line = error_line(err)
    assert name in line and "wide.safetensors" in line and "(8, 7)" in line


@pytest.mark.parametrize("args, needle", [
    (["--k", "0"], "--k must be a positive integer"),
    (["--alpha", "1.5"], "--alpha must be a fraction"),
    (["--only", "("], "not a valid regular expression"),
    (["--only", "no_such_tensor"], "no 2-d weight matrix matches"),
    (["--device", "warp-drive"], "not a torch device"),
    (["--max-matrices", "-1"], "max_matrices must be >= 0"),
    (["--eta", "-1"], "--eta must be a finite number >= 0"),
])
def test_bad_options_are_one_line_errors(capsys, pair, args, needle):
    _, base, tuned = pair
    rc, _, err = run_cli(capsys, str(base), str(tuned), *args)
    assert rc == 1
    assert needle in error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(capsys, pair):
    _, base, tuned = pair
    rc, _, err = run_cli(capsys, str(base), str(tuned), "--device", "cuda")
    assert rc == 1
    assert "no CUDA device" in error_line(err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(pair):
    _, base, tuned = pair
    cpu = compare_checkpoints(base, [tuned], k=2, device="cpu")
    gpu = compare_checkpoints(base, [tuned], k=2, device="cuda")
    assert (cpu["changed"] == gpu["changed"]).all()
    for c in ("dW_2", "dW_fro", "nss", "angle_U_max_deg"):
        np.testing.assert_allclose(gpu[c], cpu[c], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------- SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def smollm2_perturbed(tmp_path_factory):
    """SmolLM2-135M (GGUF Q4_1, dequantized) and a float32 safetensors copy with known entries moved 2 bf16 ULPs."""
    try:
        base = open_checkpoint(smollm2_gguf_path())
    except CheckpointError as e:
        pytest.skip(str(e))
    gen = torch.Generator().manual_seed(2025)
    sd, perturbed = {}, {}
    for i, name in enumerate(base.names()):
        w = base.get(name, check_finite=False)  # compare checks finiteness itself; skip a pass over 135M weights
        if w.ndim == 2 and i % 3 == 0:
            w = w.clone()
            flat = w.view(-1)
            cand = torch.randperm(flat.numel(), generator=gen)[:40]
            cand = cand[flat[cand].abs() >= 2.0**-100]  # normal, nonzero weights only
            ulp = torch.exp2(torch.floor(torch.log2(flat[cand].abs())) - 7)  # bf16 spacing in |w|'s binade
            flat[cand] += torch.sign(flat[cand]) * 2 * ulp  # > half a ULP either side of rounding: always changes
            perturbed[name] = set(cand.tolist())
        sd[name] = w
    path = save_safetensors(sd, tmp_path_factory.mktemp("smol") / "smollm2_perturbed.safetensors")
    return base, path, perturbed


def test_smollm2_against_a_perturbed_copy_finds_exactly_the_perturbed_entries(smollm2_perturbed, capsys):
    base, path, perturbed = smollm2_perturbed
    picked = [n for n in perturbed if matrix_type(n) in ("k", "v")][:3]  # 192 x 576: small SVDs keep this fast
    regex = "^(" + "|".join(map(lambda s: s.replace(".", r"\."), picked)) + ")$"
    tuned = open_checkpoint(path)
    t = compare_tables(base, [tuned], k=8, only=regex)
    assert list(t.matrices["name"]) == picked
    for row in t.matrices.itertuples():
        n = row.m * row.n
        assert row.changed == len(perturbed[row.name])
        assert row.sparsity == 1 - len(perturbed[row.name]) / n
        d = (tuned.get(row.name).double() - base.get(row.name).double()).numpy()
        assert row.dW_fro == pytest.approx(np.linalg.norm(d), rel=64 * EPS64)
        mask = metrics.update_mask(base.get(row.name), tuned.get(row.name)).numpy().ravel()
        assert set(np.flatnonzero(mask).tolist()) == perturbed[row.name]
    exact = t.checks[t.checks["result_id"].isin(["cor3.4-weyl", "cor3.4-mirsky", "cor3.5", "thm3.3-wedin"])]
    assert (exact["verdict"] == "holds").all()
    # an unperturbed matrix of the real model: sparsity exactly 1
    same = next(n for n in base.names() if n not in perturbed and matrix_type(n) in ("k", "v"))
    assert compare_checkpoints(base, [tuned], k=4, only="^" + same.replace(".", r"\.") + "$")["sparsity"].iloc[0] == 1.0
    # the CLI says that the base was quantized
    rc = main(["compare", str(smollm2_gguf_path()), str(path), "--only", regex, "--k", "4", "--no-progress"])
    assert rc == 0
    assert "Q4_1" in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_full_compare_with_figures(smollm2_perturbed, tmp_path, capsys):
    base, path, perturbed = smollm2_perturbed
    out = tmp_path / "out"
    rc = main(["compare", str(smollm2_gguf_path()), str(path), "--k", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = pd.read_parquet(out / "matrices.parquet")
    assert len(m) == sum(len(base.shape(n)) == 2 for n in base.names())
    got = dict(zip(m["name"], m["changed"]))
    assert all(got[n] == len(s) for n, s in perturbed.items())
    assert all(got[n] == 0 for n in got if n not in perturbed)
    assert (out / "report" / "index.html").is_file()
    assert "compared" in capsys.readouterr().out


def test_weight_that_overflows_bf16_names_files_and_tensor(capsys, tmp_path, pair):
    sd, base, _ = pair
    name = list(sd)[1]
    w = sd[name].float().clone()
    w[0, 0] = 3.4e38  # finite in float32, Inf once rounded to bf16 for the probe
    tuned = save_safetensors(dict(sd, **{name: w}), tmp_path / "huge.safetensors")
    rc, _, err = run_cli(capsys, str(base), str(tuned), "--k", "2")
    assert rc == 1
    line = error_line(err)
    assert "huge.safetensors" in line and "base.safetensors" in line and name in line and "non-finite" in line


def test_interrupt_keeps_the_rows_computed_so_far(capsys, tmp_path, pair, monkeypatch):
    import threegate.compare as cmp

    _, base, tuned = pair
    real = cmp._analyse
    calls = []

    def interrupted_on_third(names, *a, **kw):
        calls.extend(names)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(names, *a, **kw)

    monkeypatch.setattr(cmp, "_analyse", interrupted_on_third)
    out = tmp_path / "out"
    rc = main(["compare", str(base), str(tuned), "--k", "2", "--out", str(out), "--no-progress", "--no-figures"])
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(pd.read_csv(out / "matrices.csv")["name"]) == calls[:2]


def test_fast_path_agrees_with_the_exact_path_within_its_certified_bounds():
    """--fast (theory.fast_spectral) against full SVDs on a 400 x 300 matrix with a decaying spectrum."""
    rng = np.random.default_rng(8)
    m, n, k = 400, 300, 6
    Q1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sigma = 10.0 * 0.9 ** np.arange(n)  # gap after every sigma_k: the randomized path converges
    W0 = torch.from_numpy((Q1 * sigma) @ Q2.T)
    W1 = W0 + 1e-3 * torch.from_numpy(rng.standard_normal((m, n)))
    name = "model.layers.0.mlp.down_proj.weight"
    exact = compare_matrix(name, W0, [W1], ["r"], k=k).rows[0]
    fast = compare_matrix(name, W0, [W1], ["r"], k=k, fast=True).rows[0]
    assert fast["changed"] == exact["changed"] and fast["dW_fro"] == pytest.approx(exact["dW_fro"], rel=1e-12)
    # ||dW||_2 lies in [value, value + err_bound] (plus the exact path's own rounding)
    assert fast["dW_2"] - 1e-12 <= exact["dW_2"] <= fast["dW_2"] + fast["dW_2_err"] + 1e-12
    for side in ("U", "V"):
        assert abs(fast[f"angle_{side}_max_deg"] - exact[f"angle_{side}_max_deg"]) <= fast["angle_err_deg"] + 1e-9
    assert fast["overlap_princ"] == exact["overlap_princ"]  # same M_princ from the certified top-k
    assert math.isnan(fast["nss"]) and fast["check_cor3.4-weyl"] == fast["check_cor3.4-mirsky"] == "not-evaluated"
    # the checks the certified top k+1 allow run on the fast route and agree with the exact verdicts here
    for rid in ("thm3.3", "thm3.3-wedin", "thm3.3-rigorous", "corF.13", "cor3.5"):
        assert fast[f"check_{rid}"] == exact[f"check_{rid}"], rid


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=60), st.integers(0, 60), st.sampled_from([0.0, 0.5, 1.0, 2.5]))
@example([3, 3, 3, 1], 2, 0.0)
@example([0, 1, 2, 3, 4], 5, 1.0)
def test_tie_band_selection_equals_its_definition(values, count, tie):
    """M_princ's selection (theory.metrics._select_top_with_ties, rewritten without the boolean-index writes): every
    entry above ``cut + tie``, then the band ``[cut - tie, cut + tie]`` by ascending flat index up to ``count``;
    checked against that definition written out with a stable sort."""
    score = np.array(values, dtype=np.float64) / 2
    count = min(count, score.size)
    got = metrics._select_top_with_ties(score, count, tie)
    expected = np.zeros(score.size, dtype=bool)
    if count:
        cut = np.sort(score)[::-1][count - 1]
        above = score > cut + tie
        band = np.flatnonzero((score >= cut - tie) & ~above)
        expected[above] = True
        expected[band[: count - int(above.sum())]] = True
        assert int(expected.sum()) == count
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("scale_exp", [-3, 0, 200])
def test_gate2_pair_scaled_on_read_gives_the_checks_of_eagerly_scaled_copies(scale_exp):
    """matrix_metrics._pair keeps W0 and W+ unscaled and scales them on read (the checks read dW_s and the shape):
    what it reads is scale_pow2's array, and every Gate II row equals the one from a pair holding scaled copies."""
    import dataclasses

    from theory.linalg import SVD, pow2_exponent, scale_pow2
    from theory.spectral import gate2_checks
    from theory.spectral_bounds import SpectralPair
    from threegate.decompose import dW_spectrum
    from threegate.matrix_metrics import _pair

    @dataclasses.dataclass(frozen=True)
    class EagerPair(SpectralPair):  # _Pair's two overrides, with ordinary fields
        frobenius_s: float = math.nan
        allowance_s: float = 0.0
        dWF_s = property(lambda self: self.frobenius_s)
        eps_s = property(lambda self: max(SpectralPair.eps_s.fget(self), self.allowance_s))

    rng = np.random.default_rng(7)
    A = np.ldexp(rng.standard_normal((40, 24)), scale_exp - 4)
    B = A + np.ldexp(rng.standard_normal((40, 24)), scale_exp - 12)
    dW = B - A
    k = 4
    d0, d1 = decompose([torch.from_numpy(A)], k, "svd")[0], decompose([torch.from_numpy(B)], k, "svd")[0]
    sv_dW = dW_spectrum([torch.from_numpy(dW)], k, None)[0][0]
    fro = float(np.linalg.norm(dW))
    lazy = _pair(A, B, dW, d0, d1, sv_dW, fro)
    e = pow2_exponent(A, B)
    assert e == lazy.exponent
    np.testing.assert_array_equal(lazy.W0_s, scale_pow2(A, e))
    np.testing.assert_array_equal(lazy.W1_s, scale_pow2(B, e))
    assert lazy.shape == A.shape
    eager = EagerPair(scale_pow2(A, e), scale_pow2(B, e), scale_pow2(dW, e), lazy.svd0_s, lazy.svd1_s, lazy.sv_dW_s, e,
                      frobenius_s=lazy.frobenius_s)
    rows = lambda p: [c.as_row() for c in gate2_checks(p, k).values()]  # noqa: E731
    assert repr(rows(lazy)) == repr(rows(eager))
