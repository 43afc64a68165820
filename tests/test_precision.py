"""Tests for theory.precision: the bf16 oracle against independent oracles, the vectorised bit-level step against
the oracle, ml_dtypes and torch, the exact realization rule, and the Gate III checks (tight cases included)."""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, find, given, settings
from hypothesis import strategies as st

import theory
from theory import precision as P
from theory.errors import InputError, NonFiniteError, ShapeMismatchError

TWO = Fraction(2)
MAX = P.BF16_MAX
SUB = P.BF16_MIN_SUBNORMAL
OVERFLOW_AT = Fraction(2**128 - 2**119)  # midpoint between max and 2^128: rounds (ties-to-even) to inf


# ------------------------------------------------------------------------------------------------ helpers


def brute_bf16_values() -> list[Fraction]:
    """Every finite nonnegative bf16 value, enumerated from the definition (exponent x mantissa), sorted."""
    vals = [Fraction(m) * SUB for m in range(128)]  # zero and subnormals: m * 2^-133
    for e in range(-126, 128):
        vals += [(1 + Fraction(m, 128)) * TWO**e for m in range(128)]
    return vals


POS = brute_bf16_values()
assert len(POS) == 128 + 254 * 128 and POS == sorted(POS)


def brute_round_bf16(q: Fraction) -> float:
    """Nearest bf16 by search over the enumerated values; ties to the even mantissa (even index in POS)."""
    a = abs(q)
    if a >= OVERFLOW_AT:
        r = math.inf
    else:
        i = bisect.bisect_left(POS, a)
        if i < len(POS) and POS[i] == a:
            r = float(a)
        elif i == len(POS):  # in (max, overflow threshold)
            r = float(MAX)
        else:
            lo, hi = POS[i - 1], POS[i]
            if a - lo < hi - a or (a - lo == hi - a and (i - 1) % 2 == 0):
                r = float(lo)
            else:
                r = float(hi)
    return -r if q < 0 else r


def bits_to_bf16_np(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(ml_dtypes.bfloat16)


def all_finite_bits() -> np.ndarray:
    b = np.arange(1 << 16, dtype=np.uint16)
    return b[(b & 0x7F80) != 0x7F80]


finite_bits = st.integers(0, 0xFFFF).filter(lambda b: (b & 0x7F80) != 0x7F80)
normal_bits = st.builds(lambda s, e, m: (s << 15) | (e << 7) | m,
                        st.integers(0, 1), st.integers(1, 254), st.integers(0, 127))
rationals = st.builds(
    lambda n, d, e: Fraction(n, d) * TWO**e,
    st.integers(-(2**40), 2**40), st.integers(1, 2**20), st.integers(-160, 140),
)


# ------------------------------------------------------------------------------------------------ decode


def test_decode_every_pattern_matches_ml_dtypes_and_class_counts():
    bits = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        ref = bits.view(ml_dtypes.bfloat16).astype(np.float64)
    kinds = {}
    for b, r in zip(bits.tolist(), ref.tolist()):
        d = P.decode_bf16(b)
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
        if d.value is None:
            assert math.isnan(r) if d.kind == "nan" else r == (-math.inf if d.sign else math.inf)
        else:
            assert d.value == Fraction(r)
            assert math.copysign(1.0, r) == (-1.0 if d.sign else 1.0)
    assert kinds == {"zero": 2, "subnormal": 254, "normal": 2 * 254 * 128, "inf": 2, "nan": 254}


def test_decode_f32_spot_values():
    assert P.decode_f32(0x3F800000).value == 1
    assert P.decode_f32(0x00000001).value == TWO**-149
    assert P.decode_f32(0x7F7FFFFF).value == (2 - TWO**-23) * TWO**127
    assert P.decode_f32(0xFF800000).kind == "inf" and P.decode_f32(0xFF800000).sign == 1


@pytest.mark.parametrize("bad", [-1, 1 << 16, 1.5, "0x3f80"])
def test_decode_rejects_non_patterns(bad):
    with pytest.raises(InputError, match="bit pattern"):
        P.decode_bf16(bad)


# ------------------------------------------------------------------------------------------------ rounding


@given(rationals)
@example(Fraction(1) + TWO**-8)  # tie, rounds to the even 1.0
@example(Fraction(1) + 3 * TWO**-8)  # tie, rounds up to the even 1 + 2^-6
@example(-(Fraction(1) + 3 * TWO**-8))  # sign symmetry
@example(TWO**-134)  # tie between 0 and the smallest subnormal -> 0
@example(3 * TWO**-135)  # tie between 2^-134*... subnormals -> even
@example(TWO**-126 - TWO**-134)  # tie between largest subnormal (odd) and smallest normal (even)
@example(OVERFLOW_AT)  # tie between max (odd) and 2^128 -> inf
@example(OVERFLOW_AT - Fraction(1))  # just below: max
@example(-OVERFLOW_AT)
@example(TWO**127)  # a power of two, exact
@example(Fraction(0))
def test_round_to_bf16_matches_brute_force_nearest(q):
    got = P.bf16_value(P.round_to_bf16_bits(q))
    assert got == brute_round_bf16(q)


def test_round_to_bf16_signed_zero_and_nan_free():
    assert P.round_to_bf16_bits(-TWO**-140) == 0x8000
    assert P.round_to_bf16_bits(TWO**-140) == 0x0000
    assert P.round_to_bf16_bits(-0.0) == 0x8000


@given(st.floats(allow_nan=False, allow_infinity=False))
@example(1 + 2.0**-24)  # f32 tie to even
@example(2.0**-150)  # tie between 0 and the smallest f32 subnormal
@example(3.4028235677973366e38)  # f32 overflow midpoint
@example(1e-46)
def test_round_to_f32_matches_numpy_cast(x):
    with np.errstate(over="ignore"):
        ref = np.array([x]).astype(np.float32).view(np.uint32)[0]
    assert P.round_to_f32_bits(x) == int(ref)


def test_ulp_by_definition_on_every_finite_value():
    """ULP(x) = next_up(x) - x for nonnegative finite x below max (every 11th value and every binade edge by the
    scalar oracle, all of them by the vectorised helper); ULP(-x) = ULP(x)."""
    idx = sorted(set(range(0, len(POS) - 1, 11)) | {i for i in range(len(POS) - 1) if i % 128 in (0, 127)})
    for i in idx:
        assert P.ulp_bf16(POS[i]) == POS[i + 1] - POS[i]
        assert P.ulp_bf16(-POS[i]) == P.ulp_bf16(POS[i])
    gaps = np.diff(np.array([float(v) for v in POS]))
    np.testing.assert_array_equal(P._ulp_array(np.arange(0x7F7F, dtype=np.uint16)), gaps)
    assert P.ulp_bf16(MAX) == TWO**120
    assert P.ulp_bf16(1.0) == TWO**-7 and P.ulp_bf16(1.9921875) == TWO**-7 and P.ulp_bf16(2.0) == TWO**-6
    assert P.ulp_bf16(0.0) == SUB == P.ulp_bf16(float(TWO**-126))


@given(finite_bits)
@example(0x0000)
@example(0x8000)
@example(0x7F7F)
@example(0x3F80)
def test_next_up_next_down_are_inverse_neighbours(b):
    x = P.bf16_value(b)
    up, down = P.next_up(x), P.next_down(x)
    assert up > x > down or (x == 0 and up > 0 > down)
    if math.isfinite(up):
        assert P.next_down(up) == x
    if math.isfinite(down):
        assert P.next_up(down) == x
    # nothing bf16 strictly between: the midpoint rounds to one of the two
    if math.isfinite(up):
        assert P.bf16_value(P.round_to_bf16_bits((Fraction(x) + Fraction(up)) / 2)) in (x, up)


def test_next_up_edges():
    assert P.next_up(float(MAX)) == math.inf
    assert P.next_down(-float(MAX)) == -math.inf
    assert P.next_up(-0.0) == P.next_up(0.0) == float(SUB)
    assert P.next_up(-float(SUB)) == 0.0


def test_non_bf16_value_is_named():
    with pytest.raises(InputError, match="not exactly a bf16 value"):
        P.ulp_bf16(1.001)
    with pytest.raises(NonFiniteError):
        P.bf16_step(math.nan, 1.0)
    with pytest.raises(NonFiniteError):
        P.bf16_step(1.0, math.inf)
    with pytest.raises(InputError, match="semantics"):
        P.bf16_step(1.0, 1.0, "fp16")


# ------------------------------------------------------------------------------------------------ one step


@given(finite_bits, st.floats(-1e3, 1e3, allow_nan=False).map(lambda f: f * 2.0**-20))
@example(0x3F80, 2.0**-8)  # tie at w = 1: stays
@example(0x3F81, 2.0**-8)  # tie at odd w: moves
@example(0x3F80, -(2.0**-9))  # tie below a power of two: stays
@example(0x3F80, -(2.0**-9) * 1.5)  # between ULP/4 and ULP/2 below a power of two: moves
@example(0x7F7F, 2.0**119)  # overflow tie -> inf
@example(0x0001, -(2.0**-134))  # smallest subnormal, tie towards -0 -> 0
def test_bf16_step_exact_is_one_rounding_of_the_exact_sum(b, d):
    w = P.bf16_value(b)
    assert P.bf16_step(w, d, "exact") == brute_round_bf16(Fraction(w) + Fraction(d))


@given(finite_bits, st.floats(-1e6, 1e6, allow_nan=False, width=32))
@example(0x3F81, 2.0**-8 - 2.0**-24)  # double rounding: under fp32 a step below ULP/2 moves w
def test_bf16_step_fp32_matches_numpy_float32_then_ml_dtypes(b, d):
    w = P.bf16_value(b)
    with np.errstate(over="ignore"):
        s32 = np.float32(w) + np.float32(d)
    ref = float(np.array([s32]).astype(ml_dtypes.bfloat16)[0])
    assert P.bf16_step(w, d, "fp32") == ref


# test_double_rounding_example_from_the_docstring: moved to tests/test_library_facts.py (library casts by version)


def test_fp32_semantics_moves_w_below_half_ulp():
    w = 1 + 2.0**-7  # odd mantissa
    d = 2.0**-8 - 2.0**-24 - 2.0**-33  # < ULP/2 = 2^-8
    assert P.bf16_step(w, d, "exact") == w
    assert P.bf16_step(w, d, "fp32") == 1 + 2.0**-6


# ------------------------------------------------------------------------------------------------ vectorised step


def random_deltas(rng, w: np.ndarray, dtype) -> np.ndarray:
    """Deltas on the scale of w's ULP (so roundings are exercised), plus some exact midpoints."""
    scale = np.abs(w) + 2.0**-133
    d = rng.standard_normal(w.size) * scale * np.ldexp(1.0, rng.integers(-12, -5, w.size))
    mid = rng.random(w.size) < 0.2  # exact half-ULP steps: ties
    d = np.where(mid, np.sign(d) * np.ldexp(1.0, np.floor(np.log2(scale)).astype(int) - 8), d)
    return d.astype(dtype)


@pytest.mark.parametrize("semantics", P.SEMANTICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_array_matches_fraction_oracle(rng, semantics, dtype):
    wb = rng.choice(all_finite_bits(), 400)
    w = bits_to_bf16_np(wb)
    d = random_deltas(rng, w.astype(np.float64), dtype)
    got = P.bf16_step_array(w, d, semantics).astype(np.float64)
    ref = [P.bf16_step(float(a), float(b), semantics) for a, b in zip(w.astype(np.float64), d)]
    np.testing.assert_array_equal(got, ref)


def test_step_array_every_w_fp32_matches_ml_dtypes_and_torch(rng):
    w = bits_to_bf16_np(all_finite_bits())
    w64 = w.astype(np.float64)
    for _ in range(3):
        d32 = random_deltas(rng, w64, np.float32)
        got = P.bf16_step_array(w, d32, "fp32").astype(np.float64)
        with np.errstate(over="ignore"):
            s32 = w.astype(np.float32) + d32
        ml = s32.astype(ml_dtypes.bfloat16).astype(np.float64)
        tt = (torch.from_numpy(w.view(np.int16).copy()).view(torch.bfloat16).float()
              + torch.from_numpy(d32)).to(torch.bfloat16).double().numpy()
        np.testing.assert_array_equal(got, ml)
        np.testing.assert_array_equal(got, tt)


# test_step_array_exact_vs_library_float64_cast: in tests/test_library_facts.py (which rounding depends on the
# library's version: ml_dtypes 0.7 rounds float64 -> bf16 once, torch 2.13 and older ml_dtypes twice)


def test_step_array_torch_in_torch_out_and_device():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    d = torch.tensor([2.0**-7, -(2.0**-8), 0.0], dtype=torch.float32)
    out = P.bf16_step_array(w, d, "fp32", device="cpu")
    assert out.dtype == torch.bfloat16 and out.device.type == "cpu"
    assert out.tolist() == [1.0078125, -2.0, 0.5]  # -2 - 2^-8: tie, -2 is even


@pytest.mark.parametrize("semantics", P.SEMANTICS)
def test_torch_backend_equals_numpy_backend_on_every_w(rng, semantics):
    """The same integer code runs in torch (the CUDA path); on CPU it must agree with numpy bit for bit."""
    w = bits_to_bf16_np(all_finite_bits())
    for dtype in (np.float32, np.float64):
        d = random_deltas(rng, w.astype(np.float64), dtype)
        ref = P.bf16_step_array(w, d, semantics).view(np.uint16)
        got = P.bf16_step_array(w, d, semantics, device="cpu")  # numpy in, device given: torch path
        assert got.dtype == torch.bfloat16
        np.testing.assert_array_equal(got.view(torch.int16).numpy().view(np.uint16), ref)
        wt = torch.from_numpy(w.view(np.int16).copy()).view(torch.bfloat16)
        got2 = P.bf16_step_array(wt, torch.from_numpy(d), semantics)
        assert torch.equal(got2, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_array_on_cuda_matches_cpu():
    w = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    d = torch.randn(1000, dtype=torch.float32) * 1e-3
    cpu = P.bf16_step_array(w, d, "fp32")
    gpu = P.bf16_step_array(w.cuda(), d.cuda(), "fp32")
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())
    assert torch.equal(gpu, (w.cuda().float() + d.cuda()).to(torch.bfloat16))


def test_step_array_bad_inputs():
    w = bits_to_bf16_np([0x3F80, 0x4000])
    with pytest.raises(ShapeMismatchError, match="shape"):
        P.bf16_step_array(w, np.zeros(3))
    with pytest.raises(NonFiniteError, match="delta"):
        P.bf16_step_array(w, np.array([0.0, np.nan]))
    with pytest.raises(NonFiniteError, match="w has 1"):
        P.bf16_step_array(bits_to_bf16_np([0x3F80, 0x7F80]), np.zeros(2))
    with pytest.raises(InputError, match="not bf16 values"):
        P.bf16_step_array(np.array([1.001, 1.0], dtype=np.float32), np.zeros(2))
    with pytest.raises(InputError, match="bfloat16"):
        P.bf16_step_array(torch.ones(2), torch.zeros(2))
    wt = torch.ones(2, dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatchError, match="shape"):
        P.bf16_step_array(wt, torch.zeros(3))
    with pytest.raises(NonFiniteError, match="delta has 1"):
        P.bf16_step_array(wt, torch.tensor([0.0, float("inf")]))
    with pytest.raises(NonFiniteError, match="w has 1"):
        P.bf16_step_array(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), torch.zeros(2))
    with pytest.raises(InputError, match="semantics"):
        P.bf16_step_array(w, np.zeros(2), "bf16")


# ------------------------------------------------------------------------------------------------ realization rule


def assert_threshold_is_exact(w: float, th: P.Threshold) -> None:
    """At t the step changes w iff inclusive; a hair below never; a hair above always (Fraction oracle)."""
    hair = th.value * TWO**-60
    step = lambda a: P.bf16_step(w, th.direction * a, th.semantics) != w  # noqa: E731
    assert step(th.value) == th.inclusive
    assert not step(th.value - hair)
    assert step(th.value + hair)


@given(finite_bits, st.sampled_from([1, -1]))
@example(0x3F80, -1)  # power of two downward: ULP/4, exclusive
@example(0x3F80, 1)  # even mantissa: ULP/2, exclusive
@example(0x3F81, 1)  # odd mantissa: ULP/2, inclusive
@example(0x0080, -1)  # smallest normal downward: no halving (subnormal spacing is the same)
@example(0x0000, 1)
@example(0x8001, 1)  # towards -0
@example(0x7F7F, 1)  # overflow
@example(0xFF7F, -1)
def test_exact_threshold_rule(b, sgn):
    w = P.bf16_value(b)
    th = P.realization_threshold(w, sgn, "exact")
    assert_threshold_is_exact(w, th)
    n = P.next_up(w) if sgn > 0 else P.next_down(w)
    n_val = Fraction(n) if math.isfinite(n) else sgn * TWO**128
    assert th.value == abs(n_val - Fraction(w)) / 2
    assert th.inclusive == (not math.isfinite(n) or P.bf16_bits(n) % 2 == 0)


def test_threshold_power_of_two_asymmetry_and_tie_values():
    assert P.realization_threshold(1.0, -1) == P.Threshold(TWO**-9, False, -1, "exact")  # ULP/4
    assert P.realization_threshold(1.0, +1) == P.Threshold(TWO**-8, False, 1, "exact")
    assert P.realization_threshold(1 + 2.0**-7, +1) == P.Threshold(TWO**-8, True, 1, "exact")
    assert P.realization_threshold(float(TWO**-126), -1).value == TWO**-134  # no halving at 2^-126
    assert P.realization_threshold(float(MAX), +1) == P.Threshold(TWO**119, True, 1, "exact")
    assert P.realization_threshold(1 + 2.0**-7, +1, "fp32").value == TWO**-8 - TWO**-24 - TWO**-33


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(finite_bits, st.sampled_from([1, -1]))
@example(0x3F80, 1)
@example(0x3F81, 1)
@example(0x3F80, -1)
@example(0x0001, -1)
@example(0x8001, 1)
@example(0x7F7F, 1)
@example(0x0080, -1)
@example(0x0000, -1)
def test_fp32_threshold_search_is_exact_and_matches_closed_form(b, sgn):
    w = P.bf16_value(b)
    th = P.realization_threshold(w, sgn, "fp32")
    assert_threshold_is_exact(w, th)
    t, incl = P.realization_threshold_array(bits_to_bf16_np([b]), np.array([sgn]), "fp32")
    assert Fraction(float(t[0])) == th.value and bool(incl[0]) == th.inclusive


def fp32_search_vs_closed_form(stride: int) -> None:
    bits = all_finite_bits()[::stride]
    for sgn in (1, -1):
        t, incl = P.realization_threshold_array(bits_to_bf16_np(bits), np.full(bits.size, sgn), "fp32")
        for b, tv, iv in zip(bits.tolist(), t.tolist(), incl.tolist()):
            th = P.realization_threshold(P.bf16_value(b), sgn, "fp32")
            assert (th.value, th.inclusive) == (Fraction(tv), iv), (hex(b), sgn)


def test_fp32_threshold_closed_form_on_a_grid_of_patterns():
    fp32_search_vs_closed_form(stride=509)


@pytest.mark.slow
def test_fp32_threshold_closed_form_on_a_dense_grid_of_patterns():
    fp32_search_vs_closed_form(stride=29)


@pytest.mark.parametrize("semantics", P.SEMANTICS)
def test_predict_change_mask_equals_simulated_step(rng, semantics):
    w = bits_to_bf16_np(all_finite_bits())
    w64 = w.astype(np.float64)
    for dtype in (np.float32, np.float64):
        d = random_deltas(rng, w64, dtype)
        real = P.bf16_step_array(w, d, semantics).astype(np.float64) != w64
        np.testing.assert_array_equal(P.predict_change_mask(w, d, semantics), real)
    assert not P.predict_change_mask(w, np.zeros(w.shape), semantics).any()


def test_rule_of_thumb_and_half_ulp_masks_miss_what_the_exact_rule_sees():
    w = bits_to_bf16_np([0x3F80, 0x3F80, 0x3FFF, 0x3F80])  # 1, 1, 1.9921875, 1
    d = np.array([-1.5 * 2.0**-9, 2.0**-8, 1.5 * 2.0**-8, 2.0**-8 + 2.0**-20])
    real = P.bf16_step_array(w, d).astype(np.float64) != w.astype(np.float64)
    np.testing.assert_array_equal(real, [True, False, True, True])
    np.testing.assert_array_equal(P.predict_change_mask(w, d), real)
    np.testing.assert_array_equal(P.half_ulp_mask(w, d), [False, True, True, True])  # wrong on 0 and 1
    np.testing.assert_array_equal(P.rule_of_thumb_mask(w, d), [False, False, False, True])  # wrong on 0 and 2


# ------------------------------------------------------------------------------------------------ probe


def test_probe_scalar_array_agree_and_exact_fallback():
    # float64 evaluation would say "unchanged" here: fl(eta*3) == 2^-8 but eta*3 < 2^-8 exactly
    eta = float(Fraction(1, 768))
    w, w_hat = 3.0, 3.0 - 2.0**-8
    assert abs(w_hat - w) <= eta * max(w, w_hat)  # the float shortcut is wrong...
    assert P.probe_unchanged(w, w_hat, eta) is False  # ...the exact predicate is not
    assert not P.probe_unchanged(np.array([w]), np.array([w_hat]), eta)[0]
    assert P.probe_unchanged(1.0, 1.0) and not P.probe_unchanged(1.0, 1.0078125)
    with pytest.raises(ShapeMismatchError):
        P.probe_unchanged(np.zeros(2), np.zeros(3))
    with pytest.raises(InputError, match="eta"):
        P.probe_unchanged(1.0, 1.0, -1.0)


def test_probe_fixed_absolute_tolerance_fails_both_ways():
    """App. E.1: an absolute tolerance 1e-5 calls a real change at 1e-3 'unchanged' and a non-change-level
    difference at large magnitude 'changed'; the relative probe gets both right."""
    small = (0.0009765625, P.next_up(0.0009765625))  # a real stored change of 7.6e-6 < 1e-5
    big = (256.0, P.next_up(256.0))  # a real stored change of 2
    assert abs(small[1] - small[0]) <= 1e-5  # absolute probe: "unchanged" -- wrong
    assert not P.probe_unchanged(*small) and not P.probe_unchanged(*big)
    assert P.probe_unchanged(np.array([256.0]), np.array([256.0]))[0]


# ------------------------------------------------------------------------------------------------ checks


def test_results_registered_with_gate_and_exactness():
    R = theory.RESULTS
    assert R["cor3.6"].exact is False and R["lemE.1-across"].exact is False
    for rid in ("lemE.1", "lemE.2", "propE.3"):
        assert R[rid].exact and R[rid].gate == "III" and R[rid].campaign is not None


def test_cor36_check_cases():
    pow2 = P.check_cor36(1.0, -1)
    assert not pow2.holds and pow2.ratio == 2 and pow2.details["power_of_two_down"]
    tie = P.check_cor36(1.0, +1)
    assert not tie.holds and tie.ratio == 1 and tie.details["tie_mismatch"]
    odd = P.check_cor36(1 + 2.0**-7, +1)
    assert odd.holds and odd.ratio == 1 and odd.details["disagreeing_delta"] is None
    fp = P.check_cor36(1 + 2.0**-7, +1, "fp32")
    assert not fp.holds and 1 < fp.ratio < 1 + 2.0**-14
    for c, sem in ((pow2, "exact"), (tie, "exact"), (fp, "fp32")):  # the reported step really contradicts
        w, d = c.details["w"], Fraction(c.details["disagreeing_delta"])
        rule_says = abs(d) >= P.ulp_bf16(w) / 2
        assert (P.bf16_step(w, d, sem) != w) != rule_says
    assert P.check_cor36(math.nan).failed_assumption == "w is finite"
    assert P.check_cor36(1.001).failed_assumption == "w is a finite bf16 value"


def test_lemE1_check_and_tightness():
    c = P.check_lemE1(1.0, 1.0078125)  # neighbours: |x-y| = 2^(e-7) exactly
    assert c.holds and c.ratio == 1
    assert P.check_lemE1(1.5, 1.0).holds
    assert P.check_lemE1(1.0, 0.99609375).failed_assumption.startswith("x and y in the same binade")
    assert P.check_lemE1(1.0, 1.0).failed_assumption == "x != y"
    assert P.check_lemE1(float(SUB), 1.0).failed_assumption.startswith("x is a normal")
    assert P.check_lemE1(math.inf, 1.0).failed_assumption == "x is finite"


@given(normal_bits, normal_bits)
@example(0x3F80, 0x3F7F)
def test_lemE1_within_binade_property(bx, by):
    c = P.check_lemE1(P.bf16_value(bx), P.bf16_value(by))
    assert c.holds or not c.assumptions_hold


def is_cross_binade_counterexample(bx: int, by: int) -> bool:
    x, y = P.decode_bf16(bx).value, P.decode_bf16(by).value
    return x != y and abs(x - y) / max(abs(x), abs(y)) <= Fraction(1, 256)


def test_hypothesis_finds_a_cross_binade_counterexample_by_itself():
    """Search pairs (x, a nearby y) of normal bf16 values for a relative gap <= 2^-8; nothing hints at powers of
    two. What it finds must be a true counterexample to the strict '> 2^-8' across binades (exact Fractions)."""
    near_pairs = st.tuples(normal_bits, st.integers(-4, 4)).map(lambda t: (t[0], t[0] + t[1])).filter(
        lambda p: (p[1] >> 7) & 0xFF not in (0, 0xFF) and (p[0] >> 15) == (p[1] >> 15))
    found = find(near_pairs, lambda p: is_cross_binade_counterexample(*p),
                 settings=settings(max_examples=5000, derandomize=True, database=None))
    bx, by = found
    assert is_cross_binade_counterexample(bx, by)
    x, y = P.decode_bf16(bx).value, P.decode_bf16(by).value
    assert abs(x - y) / max(abs(x), abs(y)) == Fraction(1, 256)  # equality, not below
    assert not P.check_lemE1_across(float(x), float(y)).holds
    assert {bx & 0x7F, by & 0x7F} == {0, 0x7F}  # it sits on a binade boundary


@given(normal_bits, normal_bits)
@example(0x0100, 0x00FF)  # found by the search above (shrunk): 2^-125 and its lower neighbour
@example(0x3F80, 0x3F7F)  # (1, 0.99609375)
@example(0xBF80, 0xBF7F)
@example(0x3F80, 0x3F81)
def test_lemE1_across_corrected_statement(bx, by):
    """Corrected: |x-y|/max >= 2^-8 for distinct normal x, y, with equality only at (2^e, its lower neighbour)."""
    if bx == by:
        return
    c = P.check_lemE1_across(P.bf16_value(bx), P.bf16_value(by))
    assert c.details["corrected_holds"]
    x, y = P.decode_bf16(bx).value, P.decode_bf16(by).value
    rel = abs(x - y) / max(abs(x), abs(y))
    assert rel >= Fraction(1, 256)
    if rel == Fraction(1, 256):
        big = max(abs(x), abs(y))
        assert big == TWO ** P._floor_log2(big) and (x > 0) == (y > 0) and abs(x - y) == big / 256
        assert not c.holds  # the as-stated strict form fails exactly here


@given(normal_bits)
@example(0x3F80)  # power of two: ULP/|x| = 2^-7 exactly (tight)
@example(0x3FFF)  # top of a binade: smallest ratio 2^-7 * 128/255
@example(0x0080)
@example(0xFF7F)
def test_lemE2_property_and_tightness(b):
    c = P.check_lemE2(P.bf16_value(b))
    assert c.holds
    assert (c.ratio == 1) == (b & 0x7F == 0)


def test_lemE2_bad_inputs():
    assert P.check_lemE2(0.0).failed_assumption.startswith("x is a normal")
    assert P.check_lemE2(math.nan).failed_assumption == "x is finite"


@given(normal_bits, st.integers(-2, 2))
@example(0x3F80, -1)
@example(0x3F80, 0)
def test_propE3_property(b, k):
    other = b + k
    if (other >> 7) & 0xFF in (0, 0xFF) or (other >> 15) != (b >> 15):
        return
    c = P.check_propE3(P.bf16_value(b), P.bf16_value(other), 1e-3)
    assert c.holds


def test_propE3_assumption_and_sharp_eta():
    w, w_hat = 1.0, 0.99609375  # the closest distinct pair, relative gap 2^-8
    assert P.check_propE3(w, w_hat, 2.0**-9).failed_assumption == "0 <= eta < 2^-9"
    assert P.check_propE3(w, w_hat, np.nextafter(2.0**-9, 0)).holds
    # beyond the paper's assumption: still right just below 2^-8, wrong at 2^-8 (so 2^-9 is not sharp)
    assert not P.probe_unchanged(w, w_hat, np.nextafter(2.0**-8, 0))
    assert P.probe_unchanged(w, w_hat, 2.0**-8)
    assert P.check_propE3(0.0, 1.0).failed_assumption.startswith("w is a normal")


@pytest.mark.parametrize("rid", ["cor3.6", "lemE.1", "lemE.1-across", "lemE.2", "propE.3"])
def test_campaigns_seeded_and_exact_results_never_violated(rid):
    r = theory.RESULTS[rid]
    a = [c.as_row() for c in r.campaign(7)]
    b = [c.as_row() for c in r.campaign(7)]
    assert a == b and len(a) >= 20
    verdicts = {row["verdict"] for row in a}
    if r.exact:
        assert "violated" not in verdicts and "holds" in verdicts
    else:
        assert "violated" in verdicts  # the as-stated forms are broken on their own campaigns
    assert all(row["verdict"] in ("holds", "violated", "assumption-failed") for row in a)  # exact: tol 0


# ---- issue 11: every real scalar type, converted exactly; bad arguments named ------------------------------------
@pytest.mark.parametrize("make", [
    lambda x: np.float32(x), lambda x: np.float64(x), lambda x: np.array(x), lambda x: np.array(x, dtype=np.float32),
    lambda x: ml_dtypes.bfloat16(x), lambda x: np.array(x, dtype=ml_dtypes.bfloat16),
    lambda x: torch.tensor(x, dtype=torch.bfloat16), lambda x: torch.tensor(x, dtype=torch.float32),
    lambda x: Fraction(x),
])
@pytest.mark.parametrize("w", [1.0, 1 + 2.0**-7, -0.0, 2.0**-130, -3.0])
def test_cor36_accepts_every_scalar_type_exactly(make, w):
    """Fraction(np.float32), Fraction(torch bf16 scalar) and Fraction(0-d array) raised a raw TypeError."""
    for sgn in (1, -1):
        for sem in ("exact", "fp32"):
            ref, got = P.check_cor36(w, sgn, sem), P.check_cor36(make(w), sgn, sem)
            assert (got.verdict, got.lhs, got.rhs, dict(got.details)) == (ref.verdict, ref.lhs, ref.rhs,
                                                                          dict(ref.details))
    if w == 0 and not isinstance(make(w), Fraction):
        assert P.round_to_bf16_bits(make(w)) == 0x8000  # -0.0 keeps its sign through every type


def test_scalar_arguments_that_are_wrong_are_named():
    from theory.errors import ComplexInputError

    for bad in (0, 0.5, "sideways", np.array([1, -1])):
        with pytest.raises(InputError, match="direction"):
            P.check_cor36(1.0, bad)  # used to blame w
    with pytest.raises(ComplexInputError, match="w"):
        P.check_cor36(1 + 1j)
    with pytest.raises(ComplexInputError, match="w"):
        P.check_cor36(torch.tensor(1.0, dtype=torch.complex64))
    assert P.check_cor36(np.array([1.0, 2.0])).failed_assumption == "w is a finite bf16 value"  # not a scalar
    assert P.check_cor36(np.float32("nan")).failed_assumption == "w is finite"
    with pytest.raises(ComplexInputError, match="delta"):
        P.bf16_step_array(np.ones(2, dtype=ml_dtypes.bfloat16), np.ones(2) * 1j)
    with pytest.raises(ComplexInputError, match="w"):
        P.probe_unchanged(torch.ones(2, dtype=torch.complex64), np.ones(2))
