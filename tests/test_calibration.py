"""Reliability bins, temperature scaling, bootstrap intervals and the McNemar test, against
direct loops and exact formulas on small hand-made arrays."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from conftest import ref_nll, ref_reliability

from cifar_ensembles.analysis.metrics import (
    accuracy,
    bootstrap_ci,
    bootstrap_indices,
    brier,
    calibration,
    expected_calibration_error,
    fit_temperature,
    mcnemar,
    nll,
    reliability_bins,
    temperature_scale,
)


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def loop_entropy(row):
    return -sum(p * math.log(p) for p in row if p > 0)


def loop_quantile(values, q):
    """numpy's default ('linear') percentile: interpolate between order statistics at (n - 1) q."""
    s = sorted(values)
    h = (len(s) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (h - lo) * (s[hi] - s[lo])


def exact_mcnemar_p(b, c):
    """Two-sided exact binomial test on the discordant pairs, in exact rational arithmetic."""
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def vectors_with(b, c, both=0, neither=0, seed=0):
    """Correctness vectors of two models with b (A right, B wrong) and c (A wrong, B right) pairs."""
    a = [True] * b + [False] * c + [True] * both + [False] * neither
    bb = [False] * b + [True] * c + [True] * both + [False] * neither
    order = np.random.default_rng(seed).permutation(len(a))
    return np.array(a)[order], np.array(bb)[order]


# ---------------------------------------------------------------- reliability bins


def test_reliability_bins_hand_computed_with_edge_and_empty_bins():
    # 10 bins of width 0.1. A confidence of exactly 0.5 belongs to (0.4, 0.5] with 0.45;
    # 0.95 and 1.0 share the last bin; every other bin is empty (NaN).
    probs = np.array([[0.5, 0.25, 0.25],    # conf 0.5, predicts 0, label 0: right
                      [0.45, 0.3, 0.25],    # conf 0.45, predicts 0, label 1: wrong
                      [0.05, 0.95, 0.0],    # conf 0.95, predicts 1, label 1: right
                      [0.0, 0.0, 1.0]])     # conf 1.0, predicts 2, label 2: right
    labels = np.array([0, 1, 1, 2])
    bins = reliability_bins(probs, labels, n_bins=10)
    expected_count = [0, 0, 0, 0, 2, 0, 0, 0, 0, 2]
    assert bins["count"].tolist() == expected_count
    assert bins["confidence"][4] == pytest.approx(0.475)
    assert bins["accuracy"][4] == pytest.approx(0.5)
    assert bins["confidence"][9] == pytest.approx(0.975)
    assert bins["accuracy"][9] == pytest.approx(1.0)
    empty = [b for b in range(10) if expected_count[b] == 0]
    assert np.all(np.isnan(bins["confidence"][empty]))
    assert np.all(np.isnan(bins["accuracy"][empty]))
    assert bins["edges"] == pytest.approx([b / 10 for b in range(11)])


@pytest.mark.parametrize("n_bins", [15, 10, 4, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_reliability_bins_match_loop(n_bins, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(4, 0.6), size=50)
    # put some confidences exactly on bin edges k / n_bins (the largest entry of each row)
    for i, k in enumerate(range(max(1, n_bins // 4 + 1), n_bins + 1)):
        top = k / n_bins
        if top < 0.26:
            continue
        rest = (1.0 - top) / 3
        probs[i] = [top, rest, rest, rest]
    labels = rng.integers(0, 4, 50)
    bins = reliability_bins(probs, labels, n_bins)
    count, conf, acc = ref_reliability(probs, labels, n_bins)
    assert bins["count"].tolist() == count
    assert sum(count) == 50
    np.testing.assert_allclose(bins["confidence"], conf, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(bins["accuracy"], acc, rtol=1e-12, equal_nan=True)
    assert len(bins["edges"]) == n_bins + 1
    # ECE is the count-weighted gap of the same bins
    ok = bins["count"] > 0
    ece = float(np.sum(bins["count"][ok] * np.abs(bins["accuracy"][ok] - bins["confidence"][ok])) / 50)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(ece, abs=1e-12)


# ---------------------------------------------------------------- temperature scaling


def random_probs(n=30, c=5, seed=0, alpha=0.8):
    return np.random.default_rng(seed).dirichlet(np.full(c, alpha), size=n)


def test_temperature_one_is_identity():
    probs = random_probs()
    np.testing.assert_allclose(temperature_scale(probs, 1.0), probs, rtol=1e-10, atol=1e-14)


def test_temperature_scale_matches_formula():
    probs = random_probs(n=8, c=3, seed=3)
    for t in (0.3, 2.5):
        for row, out in zip(probs, temperature_scale(probs, t)):
            weights = [p ** (1 / t) for p in row]
            assert out == pytest.approx([w / sum(weights) for w in weights], rel=1e-9)


@pytest.mark.parametrize("t", [1.5, 3.0, 10.0])
def test_temperature_above_one_flattens(t):
    probs = random_probs(seed=1)
    scaled = temperature_scale(probs, t)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-12)
    for row, out in zip(probs, scaled):
        assert loop_entropy(out) > loop_entropy(row)
        assert max(out) < max(row)
        assert np.argmax(out) == np.argmax(row)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_temperature_below_one_sharpens(t):
    probs = random_probs(seed=2)
    scaled = temperature_scale(probs, t)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-12)
    for row, out in zip(probs, scaled):
        assert loop_entropy(out) < loop_entropy(row)
        assert max(out) > max(row)
        assert np.argmax(out) == np.argmax(row)


def test_temperature_scale_keeps_zero_probabilities_finite():
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    for t in (0.5, 1.0, 4.0):
        scaled = temperature_scale(probs, t)
        assert np.all(np.isfinite(scaled))
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0)


def calibrated_case(n=3000, c=5, seed=0, scale=1.5):
    """Logits of a calibrated model: labels are drawn from its own softmax."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, size=(n, c))
    p = softmax(logits)
    labels = np.array([rng.choice(c, p=row) for row in p])
    return logits, labels


def test_fit_temperature_recovers_over_confidence():
    logits, labels = calibrated_case()
    over = softmax(3.0 * logits)
    t = fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.12)
    assert ref_nll(temperature_scale(over, t), labels) < ref_nll(over, labels)
    # and the fitted T is the minimum of the NLL (a direct scan of T around it)
    grid = np.linspace(0.5 * t, 1.5 * t, 41)
    best = grid[int(np.argmin([ref_nll(softmax(3.0 * logits / g), labels) for g in grid]))]
    assert t == pytest.approx(best, rel=0.03)


def test_fit_temperature_recovers_under_confidence():
    logits, labels = calibrated_case(seed=1)
    under = softmax(logits / 2.0)
    t = fit_temperature(under, labels)
    assert t < 1.0
    assert t == pytest.approx(0.5, rel=0.12)
    assert ref_nll(temperature_scale(under, t), labels) < ref_nll(under, labels)


def test_fit_temperature_near_one_when_calibrated():
    logits, labels = calibrated_case(seed=2)
    t = fit_temperature(softmax(logits), labels)
    assert t == pytest.approx(1.0, rel=0.12)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_indices_shape_range_and_determinism():
    idx = bootstrap_indices(7, 50, seed=3)
    assert idx.shape == (50, 7)
    assert idx.min() >= 0 and idx.max() < 7
    np.testing.assert_array_equal(idx, bootstrap_indices(7, 50, seed=3))
    assert not np.array_equal(idx, bootstrap_indices(7, 50, seed=4))


def test_bootstrap_ci_matches_direct_loop():
    correct = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=bool)
    idx = bootstrap_indices(len(correct), 200, seed=0)
    means = [sum(int(correct[j]) for j in row) / len(row) for row in idx]
    lo, hi = bootstrap_ci(correct, idx)
    assert lo == pytest.approx(loop_quantile(means, 0.025), abs=1e-12)
    assert hi == pytest.approx(loop_quantile(means, 0.975), abs=1e-12)
    lo90, hi90 = bootstrap_ci(correct, idx, level=0.9)
    assert lo90 == pytest.approx(loop_quantile(means, 0.05), abs=1e-12)
    assert hi90 == pytest.approx(loop_quantile(means, 0.95), abs=1e-12)
    assert lo <= lo90 <= hi90 <= hi


def test_bootstrap_ci_deterministic_and_contains_mean():
    rng = np.random.default_rng(5)
    correct = rng.random(300) < 0.8
    a = bootstrap_ci(correct, bootstrap_indices(300, 500, seed=11))
    b = bootstrap_ci(correct, bootstrap_indices(300, 500, seed=11))
    assert a == b
    assert a[0] <= correct.mean() <= a[1]
    assert a[0] < a[1]


def test_bootstrap_ci_width_shrinks_with_n():
    widths = []
    for n in (40, 400, 4000):
        correct = np.arange(n) % 4 != 0      # accuracy exactly 0.75 at every n
        lo, hi = bootstrap_ci(correct, bootstrap_indices(n, 400, seed=0))
        assert lo <= 0.75 <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    # a binomial proportion's interval narrows like 1 / sqrt(n): 10x the data, about 1/3.16 the width
    assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.35)


def test_bootstrap_ci_of_constant_vector_is_a_point():
    assert bootstrap_ci(np.ones(20, bool), bootstrap_indices(20, 100, 0)) == (1.0, 1.0)


# ---------------------------------------------------------------- McNemar


@pytest.mark.parametrize("b,c", [(3, 10), (10, 3), (0, 5), (1, 1), (4, 4), (7, 0), (12, 30), (1, 0)])
def test_mcnemar_matches_exact_binomial(b, c):
    ca, cb = vectors_with(b, c, both=20, neither=6)
    out = mcnemar(ca, cb)
    assert out["b"] == b and out["c"] == c
    assert out["p_value"] == pytest.approx(exact_mcnemar_p(b, c), rel=1e-9)
    assert 0.0 <= out["p_value"] <= 1.0


def test_mcnemar_hand_value():
    # b=3, c=10, n=13: P(X <= 3) = (1 + 13 + 78 + 286) / 2^13 = 378 / 8192; p = 756 / 8192
    ca, cb = vectors_with(3, 10)
    assert mcnemar(ca, cb)["p_value"] == pytest.approx(756 / 8192, rel=1e-12)


def test_mcnemar_no_discordant_pairs():
    ca, cb = vectors_with(0, 0, both=5, neither=3)
    assert mcnemar(ca, cb) == {"b": 0, "c": 0, "p_value": 1.0}
    same = np.array([True, False, True])
    assert mcnemar(same, same)["p_value"] == 1.0


def test_mcnemar_symmetric_in_swapping_models():
    for b, c in [(3, 10), (0, 4), (25, 40)]:
        ca, cb = vectors_with(b, c, both=8, neither=2, seed=b)
        ab, ba = mcnemar(ca, cb), mcnemar(cb, ca)
        assert (ab["b"], ab["c"]) == (ba["c"], ba["b"])
        assert ab["p_value"] == pytest.approx(ba["p_value"], rel=1e-12)


def test_mcnemar_large_counts_stay_exact():
    # log-space evaluation must agree with exact rational arithmetic far into the tail
    for b, c in [(400, 600), (1000, 1100), (50, 300)]:
        ca, cb = vectors_with(b, c)
        p = mcnemar(ca, cb)["p_value"]
        assert p == pytest.approx(exact_mcnemar_p(b, c), rel=1e-8)
        assert 0.0 <= p <= 1.0


def test_mcnemar_accepts_integer_vectors():
    assert mcnemar(np.array([1, 1, 0, 0, 1]), np.array([0, 1, 1, 0, 0]))["b"] == 2


# ---------------------------------------------------------------- calibration()


def test_calibration_keys_and_values():
    probs = random_probs(n=25, c=4, seed=7)
    labels = np.random.default_rng(7).integers(0, 4, 25)
    out = calibration(probs, labels, n_bins=5)
    assert set(out) == {"accuracy", "nll", "brier", "ece"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["accuracy"] == accuracy(probs, labels)
    assert out["nll"] == nll(probs, labels)
    assert out["brier"] == brier(probs, labels)
    assert out["ece"] == expected_calibration_error(probs, labels, 5)
    assert out["ece"] != expected_calibration_error(probs, labels, 15)
