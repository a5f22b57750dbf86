"""Accuracy, NLL, Brier score and ECE against direct loops (conftest's) on small hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ref_accuracy, ref_ece, ref_nll, ref_soft_vote

from cifar_ensembles.analysis.metrics import accuracy, brier, expected_calibration_error, nll


def random_case(n=40, c=5, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.7), size=n)
    labels = rng.integers(0, c, n)
    return probs, labels


def test_accuracy_matches_loop():
    probs, labels = random_case()
    argmax = ref_soft_vote(probs[None])  # the vote of one member: its argmax, ties to the lower class
    assert accuracy(probs, labels) == pytest.approx(ref_accuracy(argmax, labels))
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(probs, np.array([1, 1, 1])) == pytest.approx(2 / 3)


def test_nll_matches_loop():
    probs, labels = random_case(seed=1)
    assert nll(probs, labels) == pytest.approx(ref_nll(probs, labels), rel=1e-12)
    # hand value: -(log 0.5 + log 0.25) / 2
    assert nll(np.array([[0.5, 0.5], [0.75, 0.25]]), np.array([0, 1])) == pytest.approx(
        (math.log(2) + math.log(4)) / 2)


def test_nll_is_finite_for_zero_probability():
    value = nll(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([1, 0]))
    assert np.isfinite(value) and value > 10


def test_brier_matches_loop():
    probs, labels = random_case(seed=2)
    expected = 0.0
    for row, y in zip(probs, labels):
        expected += sum((row[j] - (1.0 if j == y else 0.0)) ** 2 for j in range(len(row)))
    assert brier(probs, labels) == pytest.approx(expected / len(labels), rel=1e-12)
    # hand value: sample 1 (0.8 - 1)^2 + 0.2^2 = 0.08; sample 2 (1 - 0)^2 + (0 - 1)^2 = 2
    assert brier(np.array([[0.8, 0.2], [1.0, 0.0]]), np.array([0, 1])) == pytest.approx((0.08 + 2) / 2)


def test_ece_hand_computed():
    # 15 bins of width 1/15.
    # samples 0-3: confidence 0.9 (bin (0.8667, 0.9333]), 3 of 4 correct: |0.75 - 0.9| = 0.15, weight 4/8
    # samples 4-5: confidence 0.5 (bin (0.4667, 0.5333]), 1 of 2 correct: |0.5 - 0.5| = 0,     weight 2/8
    # samples 6-7: confidence 0.7 (bin (0.6667, 0.7333]), 2 of 2 correct: |1.0 - 0.7| = 0.3,   weight 2/8
    # ECE = 0.5 * 0.15 + 0.25 * 0 + 0.25 * 0.3 = 0.15
    probs = np.array([[0.9, 0.05, 0.05]] * 4 + [[0.25, 0.5, 0.25]] * 2 + [[0.7, 0.2, 0.1]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 2, 0, 0])
    assert expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(0.15, abs=1e-12)
    assert ref_ece(probs, labels, 15) == pytest.approx(0.15, abs=1e-12)


def test_ece_bins_do_not_pool_errors_of_opposite_sign():
    # one over-confident bin (conf 0.9, acc 0) and one under-confident bin (conf 0.6, acc 1):
    # ECE = 0.5 * 0.9 + 0.5 * 0.4 = 0.65 (a single pooled bin would give |0.5 - 0.75| = 0.25)
    probs = np.array([[0.9, 0.1], [0.4, 0.6]])
    labels = np.array([1, 1])
    assert expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(0.65)


def test_ece_bin_edges_belong_to_the_lower_bin():
    # Guo et al. bins are (lower, upper]. With 10 bins a confidence of exactly 0.5 joins 0.45 in (0.4, 0.5]:
    # that bin has acc 1/2 and mean confidence 0.475 -> ECE = |0.5 - 0.475| = 0.025.
    # (Half-open [lower, upper) bins would give 0.5 * |1 - 0.5| + 0.5 * |0 - 0.45| = 0.475.)
    probs = np.array([[0.5, 0.25, 0.25], [0.45, 0.3, 0.25]])
    labels = np.array([0, 1])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.025)
    assert ref_ece(probs, labels, 10) == pytest.approx(0.025)


@pytest.mark.parametrize("n_bins", [15, 10, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_loop(n_bins, seed):
    probs, labels = random_case(n=60, c=4, seed=seed)
    assert expected_calibration_error(probs, labels, n_bins=n_bins) == pytest.approx(
        ref_ece(probs, labels, n_bins), abs=1e-12)


def test_ece_extremes():
    labels = np.array([0, 1, 2, 1])
    perfect = np.eye(3)[labels]
    assert expected_calibration_error(perfect, labels, n_bins=15) == pytest.approx(0.0)
    wrong = np.eye(3)[(labels + 1) % 3]
    assert expected_calibration_error(wrong, labels, n_bins=15) == pytest.approx(1.0)
