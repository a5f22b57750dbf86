"""shift_metrics (corruption error, paired gain, scores) and diversity (disagreement, KL, oracle,
NLL gain) against direct computations on small random arrays."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cifar_ensembles.analysis import diversity
from cifar_ensembles.analysis.metrics import bootstrap_indices, calibration, temperature_scale
from cifar_ensembles.analysis.shift_metrics import (
    corruption_error,
    mean_defined,
    paired_gain,
    relative_corruption_error,
    scored,
)

M, N, C = 4, 60, 5


def probabilities(rng, m=M, n=N, c=C, skill=0.5, labels=None) -> np.ndarray:
    """m x n x c rows that sum to 1, right about `skill` of the time when labels are given."""
    p = rng.dirichlet(np.ones(c), (m, n))
    if labels is not None:
        p[:, np.arange(n), labels] += skill * rng.uniform(0, 2, (m, n))
        p /= p.sum(-1, keepdims=True)
    return p.astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------ corruption error
def test_corruption_error_is_the_ratio_of_summed_errors():
    errors = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    base = np.array([0.2, 0.3, 0.4, 0.5, 0.6])
    assert corruption_error(errors, base) == pytest.approx(1.5 / 2.0)
    assert corruption_error(base, base) == pytest.approx(1.0)
    assert corruption_error(errors, np.zeros(5)) is None  # the baseline makes no error: no ratio


def test_relative_corruption_error_discounts_the_clean_error():
    errors, clean = np.array([0.1, 0.2, 0.3, 0.4, 0.5]), 0.05
    base, base_clean = np.array([0.2, 0.3, 0.4, 0.5, 0.6]), 0.1
    expected = sum(e - clean for e in errors) / sum(b - base_clean for b in base)
    assert relative_corruption_error(errors, clean, base, base_clean) == pytest.approx(expected)
    # the corruption adds nothing (or less than nothing) to the baseline's error: undefined
    assert relative_corruption_error(errors, clean, np.full(5, 0.1), 0.1) is None
    assert relative_corruption_error(errors, clean, np.full(5, 0.05), 0.1) is None


def test_mean_defined_skips_undefined_values():
    assert mean_defined([1.0, None, 2.0]) == pytest.approx(1.5)
    assert mean_defined([None, None]) is None
    assert mean_defined([]) is None


# ------------------------------------------------------------------ paired gain
def test_paired_gain_is_the_mean_difference_with_a_paired_bootstrap(rng):
    sets, n = 3, 200
    ensemble = rng.random((sets, n)) < 0.8
    singles = rng.random((M, sets, n)) < 0.7
    boot = bootstrap_indices(n, 500, 0)
    result = paired_gain(ensemble, singles, boot)
    direct = ensemble.mean() - singles.mean()
    assert result["gain"] == pytest.approx(direct)
    per_image = ensemble.mean(0) - singles.mean((0, 1))
    means = np.array([per_image[i].mean() for i in boot])
    assert result["ci"] == pytest.approx(list(np.quantile(means, [0.025, 0.975])))
    lo, hi = result["ci"]
    assert lo < result["gain"] < hi
    wide = paired_gain(ensemble, singles, boot, level=0.99)["ci"]
    assert wide[0] <= lo and hi <= wide[1]


def test_paired_gain_of_identical_ensemble_and_singles_is_zero_with_zero_width(rng):
    correct = rng.random((2, 50)) < 0.6
    result = paired_gain(correct, np.stack([correct] * M), bootstrap_indices(50, 200, 1))
    assert result == {"gain": 0.0, "ci": [0.0, 0.0]}


def test_paired_interval_is_narrower_than_an_unpaired_one(rng):
    """The same images resampled for both sides: the shared difficulty of an image cancels."""
    n = 400
    hard = rng.random(n) < 0.3  # images every model gets wrong
    singles = (~hard & (rng.random((M, 1, n)) < 0.8))
    ensemble = (~hard & (rng.random((1, n)) < 0.9))
    boot = bootstrap_indices(n, 1000, 0)
    lo, hi = paired_gain(ensemble, singles, boot)["ci"]
    other = bootstrap_indices(n, 1000, 1)
    unpaired = ensemble[0][boot].mean(1) - singles.mean((0, 1))[other].mean(1)
    u_lo, u_hi = np.quantile(unpaired, [0.025, 0.975])
    assert hi - lo < 0.8 * (u_hi - u_lo)


# ------------------------------------------------------------------ scored
def test_scored_at_temperature_1_leaves_the_scores_unchanged(rng):
    labels = rng.integers(0, C, N)
    probs = probabilities(rng, m=1, labels=labels)[0]
    result = scored(probs, labels, 1.0, 10)
    plain = calibration(probs, labels, 10)
    assert {k: result[k] for k in plain} == pytest.approx(plain)
    assert result["scaled"] == pytest.approx(plain)


def test_scored_scales_the_probabilities_with_the_temperature(rng):
    labels = rng.integers(0, C, N)
    probs = probabilities(rng, m=1, labels=labels)[0]
    result = scored(probs, labels, 2.5, 10)
    assert result["scaled"] == pytest.approx(calibration(temperature_scale(probs, 2.5), labels, 10))
    assert result["scaled"]["accuracy"] == result["accuracy"]  # scaling keeps the argmax
    assert result["scaled"]["nll"] != pytest.approx(result["nll"])


def test_scored_predictions_override_the_accuracy_only(rng):
    labels = rng.integers(0, C, N)
    probs = probabilities(rng, m=1, labels=labels)[0]
    votes = labels.copy()
    votes[:15] = (labels[:15] + 1) % C  # right on 45 of 60
    result = scored(probs, labels, 1.7, 10, votes)
    assert result["accuracy"] == result["scaled"]["accuracy"] == pytest.approx(45 / 60)
    plain = scored(probs, labels, 1.7, 10)
    for key in ("nll", "brier", "ece"):
        assert result[key] == plain[key] and result["scaled"][key] == plain["scaled"][key]


# ------------------------------------------------------------------ diversity
def test_disagreement_matrix_against_pairs(rng):
    probs = probabilities(rng)
    d = diversity.disagreement_matrix(probs)
    predictions = probs.argmax(-1)
    for i, j in itertools.product(range(M), repeat=2):
        assert d[i, j] == pytest.approx(np.mean(predictions[i] != predictions[j]))
    assert np.all(np.diag(d) == 0) and np.allclose(d, d.T)


def test_kl_matrix_against_the_direct_formula(rng):
    probs = probabilities(rng).astype(np.float64)
    k = diversity.kl_matrix(probs)
    for i, j in itertools.product(range(M), repeat=2):
        direct = np.mean(np.sum(probs[i] * (np.log(probs[i]) - np.log(probs[j])), axis=-1))
        assert k[i, j] == pytest.approx(direct, abs=1e-12)
    assert np.allclose(np.diag(k), 0, atol=1e-12)
    assert np.all(k >= -1e-12)
    off = ~np.eye(M, dtype=bool)
    assert np.all(k[off] > 0)


def test_kl_matrix_survives_zero_probabilities(rng):
    probs = probabilities(rng).astype(np.float64)
    probs[0, :, 0] = 0.0
    probs[0] /= probs[0].sum(-1, keepdims=True)
    k = diversity.kl_matrix(probs)
    assert np.all(np.isfinite(k)) and np.all(k >= -1e-12)


def test_oracle_accuracy_is_the_share_any_member_gets_right():
    labels = np.array([0, 1, 2, 0])
    probs = np.zeros((2, 4, 3))
    probs[0, np.arange(4), [0, 0, 0, 1]] = 1  # right on image 0
    probs[1, np.arange(4), [1, 1, 0, 1]] = 1  # right on image 1
    assert diversity.oracle_accuracy(probs, labels) == pytest.approx(0.5)


def test_nll_gain_against_the_direct_formula(rng):
    labels = rng.integers(0, C, N)
    probs = probabilities(rng, labels=labels)
    result = diversity.nll_gain(probs, labels)
    p_true = probs[:, np.arange(N), labels].astype(np.float64)
    member = np.mean([-np.mean(np.log(p)) for p in p_true])
    ensemble = -np.mean(np.log(p_true.mean(0)))
    assert result["mean_member_nll"] == pytest.approx(member)
    assert result["ensemble_nll"] == pytest.approx(ensemble)
    assert result["gain"] == pytest.approx(member - ensemble)
    assert result["gain"] > 0  # Jensen: -log of a mean <= the mean of -log


def test_nll_gain_is_zero_for_identical_members(rng):
    labels = rng.integers(0, C, N)
    probs = np.stack([probabilities(rng, m=1, labels=labels)[0]] * M)
    assert diversity.nll_gain(probs, labels)["gain"] == pytest.approx(0.0, abs=1e-12)
    s = diversity.summary(probs, labels)
    assert s["disagreement"] == 0.0 and s["kl"] == pytest.approx(0.0, abs=1e-12)
    assert s["oracle_accuracy"] == s["mean_member_accuracy"]


def test_nll_gain_is_never_negative(rng):
    for _ in range(20):
        labels = rng.integers(0, C, 10)
        assert diversity.nll_gain(probabilities(rng, n=10), labels)["gain"] >= -1e-12


def test_summary_means_over_member_pairs(rng):
    labels = rng.integers(0, C, N)
    probs = probabilities(rng, labels=labels)
    s = diversity.summary(probs, labels)
    off = ~np.eye(M, dtype=bool)
    assert s["disagreement"] == pytest.approx(diversity.disagreement_matrix(probs)[off].mean())
    assert s["kl"] == pytest.approx(diversity.kl_matrix(probs)[off].mean())
    assert s["oracle_accuracy"] == pytest.approx(diversity.oracle_accuracy(probs, labels))
    assert s["mean_member_accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels))
    assert s["mean_member_accuracy"] <= s["oracle_accuracy"]
    assert {k: s[k] for k in ("mean_member_nll", "ensemble_nll", "gain")} == diversity.nll_gain(probs, labels)


def test_summary_of_one_member_has_no_pairs(rng):
    labels = rng.integers(0, C, N)
    probs = probabilities(rng, m=1, labels=labels)
    s = diversity.summary(probs, labels)
    assert s["disagreement"] == 0.0 and s["kl"] == 0.0 and s["gain"] == pytest.approx(0.0, abs=1e-12)
    assert s["oracle_accuracy"] == s["mean_member_accuracy"]
