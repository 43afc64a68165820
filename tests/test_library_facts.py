"""Facts about other libraries, each stated for the versions it was measured on.

**float64 -> bf16 casts.** A library either rounds once (the nearest bf16 of the float64 value, ties to even) or
twice (to float32 first, then to bf16). The two differ exactly where the float32 rounding lands on a bf16 midpoint
that the float64 value was not on, e.g. ``x = 1 + 2^-8 + 2^-30``: once gives ``1 + 2^-7``, twice gives ``1.0``.
Measured (scratch virtualenvs, 2026-12; 4,000 float64 values just off bf16 midpoints, 1,981 of them separating the
two rules; the casts compared bit for bit with both rules):

==========================  ========
library and versions         rounds
==========================  ========
ml_dtypes 0.3.2 (numpy 1.26)  twice
ml_dtypes 0.4.1, 0.5.1,       twice
0.5.4, 0.6.0 (numpy 2.4)
ml_dtypes 0.7.0               once
torch 2.13.0+cpu              twice
==========================  ========

The tables below hold these facts as version ranges. The tests check that the installed version behaves as its
table row says, and that the exact oracle (``theory.precision.bf16_round_array``: integer bit arithmetic, checked
against ``fractions.Fraction`` rounding) with ``via_f32`` set accordingly reproduces the library bit for bit. A
version outside every row, or one that behaves differently, fails with a message to measure it and update the table
and README's Findings.
"""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from packaging.version import Version

from theory import precision as P

# [lowest version, first version not covered) -> "once" | "twice"
ML_DTYPES_F64_TO_BF16 = [
    ("0.3", "0.7", "twice"),  # measured: 0.3.2, 0.4.1, 0.5.1, 0.5.4, 0.6.0
    ("0.7", "0.8", "once"),  # measured: 0.7.0
]
TORCH_F64_TO_BF16 = [
    ("2.13", "2.14", "twice"),  # measured: 2.13.0+cpu
]
ROUNDINGS = ("once", "twice")
UPDATE = ("measure it, then add the version to {table} in tests/test_library_facts.py and update the README's "
          "Findings bullet on float64 -> bf16 casts")


def documented(table: list[tuple[str, str, str]], version: str, name: str) -> str:
    """The table row's rounding for ``version`` (local build tags such as ``+cpu`` ignored); fails if none covers it.

    Examples
    --------
    >>> documented(ML_DTYPES_F64_TO_BF16, "0.5.4", "ML_DTYPES_F64_TO_BF16")
    'twice'
    """
    v = Version(Version(version).base_version)
    for lo, hi, rounds in table:
        if Version(lo) <= v < Version(hi):
            return rounds
    pytest.fail(f"version {version} is in no row of {name}: " + UPDATE.format(table=name))


def probe_values() -> np.ndarray:
    """Seeded float64 values just off bf16 midpoints (by less than float32 resolves), across binades and signs,
    plus the docstring's example: where 'once' and 'twice' disagree."""
    rng = np.random.default_rng(20261204)
    n = 4000
    w = np.ldexp(1.0 + rng.integers(0, 128, n) / 128.0, rng.integers(-120, 120, n)) * rng.choice([-1.0, 1.0], n)
    half_ulp = np.ldexp(1.0, np.frexp(np.abs(w))[1] - 9)
    off = np.ldexp(np.abs(w), -rng.integers(26, 40, n)) * rng.choice([-1.0, 1.0], n)  # below f32 half-ULP
    return np.concatenate([[1 + 2.0**-8 + 2.0**-30], w + np.sign(w) * half_ulp + off])


def observed(lib_bits: np.ndarray, x: np.ndarray) -> str:
    """'once' or 'twice' if the library's bits equal that oracle everywhere on x, else a description of the miss."""
    for rounds in ROUNDINGS:
        if np.array_equal(lib_bits, P.bf16_round_array(x, via_f32=rounds == "twice")):
            return rounds
    return "neither rule (differs from both oracles)"


def ml_dtypes_cast_bits(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(ml_dtypes.bfloat16).view(np.uint16)


def torch_cast_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


LIBRARIES = {
    "ml_dtypes": (ml_dtypes.__version__, ML_DTYPES_F64_TO_BF16, "ML_DTYPES_F64_TO_BF16", ml_dtypes_cast_bits),
    "torch": (torch.__version__, TORCH_F64_TO_BF16, "TORCH_F64_TO_BF16", torch_cast_bits),
}


# ------------------------------------------------------------------------------------------------ the oracle


def test_oracles_once_and_twice_agree_with_fraction_rounding_and_separate_on_the_probe():
    """The probe can tell the two rules apart, and each rule is what Fraction arithmetic says it is."""
    x = probe_values()
    once, twice = P.bf16_round_array(x), P.bf16_round_array(x, via_f32=True)
    assert (once != twice).sum() > 1000  # otherwise the library tests below could not fail
    for i in range(0, x.size, 97):  # the scalar Fraction oracle, independent of the array code
        assert once[i] == P.round_to_bf16_bits(Fraction(float(x[i])))
        assert twice[i] == P.round_to_bf16_bits(Fraction(P.decode_f32(P.round_to_f32_bits(Fraction(float(x[i])))).value))
    # they differ only where float32 landed exactly on a bf16 midpoint (low 16 bits 0x8000: a tie it created)
    with np.errstate(over="ignore"):
        f32_bits = x.astype(np.float32).view(np.uint32)
    assert np.all((f32_bits[once != twice] & 0xFFFF) == 0x8000)


def test_double_rounding_example_from_the_docstring():
    x = 1 + 2.0**-8 + 2.0**-30
    assert P.bf16_value(P.round_to_bf16_bits(x)) == 1 + 2.0**-7  # one rounding: above the midpoint
    assert P.bf16_value(P.round_to_bf16_bits(P.decode_f32(P.round_to_f32_bits(x)).value)) == 1.0  # via f32: tie -> even
    assert int(P.bf16_round_array(np.array([x]))[0]) == 0x3F81
    assert int(P.bf16_round_array(np.array([x]), via_f32=True)[0]) == 0x3F80
    expect = {"once": 1 + 2.0**-7, "twice": 1.0}
    for name, (version, table, table_name, cast_bits) in LIBRARIES.items():
        rounds = documented(table, version, table_name)
        got = P.bf16_value(int(cast_bits(np.array([x]))[0]))
        assert got == expect[rounds], f"{name} {version}: {x!r} -> {got!r}, its table row says {rounds}"
    # the same effect in a training step: w = 1, delta = 2^-8 + 2^-30
    assert P.bf16_step(1.0, 2.0**-8 + 2.0**-30, "exact") == 1 + 2.0**-7
    assert P.bf16_step(1.0, 2.0**-8 + 2.0**-30, "fp32") == 1.0


# ------------------------------------------------------------------------------------------------ the libraries


@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_float64_to_bf16_cast_rounds_as_documented_for_the_installed_version(name):
    version, table, table_name, cast_bits = LIBRARIES[name]
    rounds = documented(table, version, table_name)
    x = probe_values()
    got = observed(cast_bits(x), x)
    assert got == rounds, (f"{name} {version} casts float64 -> bf16 by {got}, but {table_name} says {rounds}: "
                           + UPDATE.format(table=table_name))


@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_step_array_exact_vs_library_float64_cast(rng, name):
    """On every finite bf16 w with steps near its ULP: a 'once' library equals our 'exact' step bit for bit; a
    'twice' library equals our oracle via float32, and differs from 'exact' only where float32 created a tie."""
    version, table, table_name, cast_bits = LIBRARIES[name]
    rounds = documented(table, version, table_name)
    b = np.arange(1 << 16, dtype=np.uint16)
    w = b[(b & 0x7F80) != 0x7F80].view(ml_dtypes.bfloat16)
    w64 = w.astype(np.float64)
    scale = np.abs(w64) + 2.0**-133
    d = rng.standard_normal(w64.size) * scale * np.ldexp(1.0, rng.integers(-12, -5, w64.size))
    mid = rng.random(w64.size) < 0.2  # exact half-ULP steps (ties), then nudged off them below float32 resolution
    d = np.where(mid, np.sign(d) * np.ldexp(1.0, np.floor(np.log2(scale)).astype(int) - 8), d)
    d = d + rng.standard_normal(w64.size) * np.abs(w64) * 2.0**-40
    with np.errstate(over="ignore"):
        s64 = w64 + d
        f32_bits = s64.astype(np.float32).view(np.uint32)
    lib = cast_bits(s64)
    np.testing.assert_array_equal(P.bf16_round_array(s64, via_f32=rounds == "twice"), lib)
    exact = P.bf16_step_array(w, d, "exact").view(np.uint16)
    differ = exact != lib
    if rounds == "once":
        assert not differ.any()
    else:
        assert differ.any()  # double rounding shows up on these inputs...
        assert np.all((f32_bits[differ] & 0xFFFF) == 0x8000)  # ...only where float32 rounding created a tie


def test_float32_input_casts_agree_with_the_oracle_in_every_library(rng):
    """From float32 input there is one rounding whatever the version: every library equals the oracle."""
    x = (rng.standard_normal(20000) * np.ldexp(1.0, rng.integers(-60, 60, 20000))).astype(np.float32)
    x = np.concatenate([x, probe_values().astype(np.float32)])
    ref = P.bf16_round_array(x)
    np.testing.assert_array_equal(x.astype(ml_dtypes.bfloat16).view(np.uint16), ref)
    np.testing.assert_array_equal(torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                  ref)


def test_documented_lookup_fails_on_an_unknown_version():
    with pytest.raises(pytest.fail.Exception, match="in no row of T: measure it"):
        documented([("0.7", "0.8", "once")], "0.8.0", "T")
    assert documented(TORCH_F64_TO_BF16, "2.13.0+cpu", "TORCH_F64_TO_BF16") == "twice"
