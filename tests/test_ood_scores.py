"""Uncertainty scores, OOD detection metrics and selective prediction on hand-computed cases
(docs/study.md 5.9-5.10), and the vectorized bootstrap against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cifar_ensembles.analysis import uncertainty as u

LOG2 = math.log(2.0)


# ------------------------------------------------------------------ scores
def test_two_confident_members_that_disagree_are_all_epistemic():
    probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # 2 members, 1 image, 2 classes
    s = u.uncertainty_scores(probs)
    assert s["msp"][0] == pytest.approx(0.5)
    assert s["entropy"][0] == pytest.approx(LOG2)  # of the average [0.5, 0.5]
    assert s["aleatoric"][0] == 0.0  # each member is certain (0 log 0 = 0, not NaN)
    assert s["epistemic"][0] == pytest.approx(LOG2)
    assert s["disagreement"][0] == 1.0


def test_two_identical_uncertain_members_are_all_aleatoric():
    probs = np.array([[[0.5, 0.5]], [[0.5, 0.5]]])
    s = u.uncertainty_scores(probs)
    assert s["entropy"][0] == pytest.approx(LOG2)
    assert s["aleatoric"][0] == pytest.approx(LOG2)
    assert s["epistemic"][0] == 0.0
    assert s["disagreement"][0] == 0.0


def test_the_entropy_of_the_average_is_not_the_average_entropy():
    # members [0.9, 0.1] and [0.3, 0.7]: mean [0.6, 0.4]
    probs = np.array([[[0.9, 0.1]], [[0.3, 0.7]]])
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    s = u.uncertainty_scores(probs)
    assert s["entropy"][0] == pytest.approx(h([0.6, 0.4]))
    assert s["aleatoric"][0] == pytest.approx((h([0.9, 0.1]) + h([0.3, 0.7])) / 2)
    assert s["epistemic"][0] == pytest.approx(h([0.6, 0.4]) - (h([0.9, 0.1]) + h([0.3, 0.7])) / 2)
    assert s["epistemic"][0] > 0
    assert s["msp"][0] == pytest.approx(0.6)
    assert s["disagreement"][0] == 1.0


def test_one_model_has_zero_mutual_information_and_disagreement_not_nan():
    probs = np.array([[[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]]])  # 1 member, 2 images
    s = u.uncertainty_scores(probs)
    assert np.array_equal(s["epistemic"], [0.0, 0.0]) and np.array_equal(s["disagreement"], [0.0, 0.0])
    assert np.array_equal(s["aleatoric"], s["entropy"])
    assert np.all(np.isfinite(np.concatenate(list(s.values()))))
    assert s["entropy"][1] == 0.0


def test_pairwise_disagreement_counts_pairs():
    # three members predict 0, 0, 1: pairs (0,1) agree, (0,2) and (1,2) differ -> 2/3
    probs = np.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.4, 0.6]]])
    assert u.uncertainty_scores(probs)["disagreement"][0] == pytest.approx(2 / 3)


def test_mutual_information_is_never_negative():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=(5, 200))
    s = u.uncertainty_scores(probs)
    assert np.all(s["epistemic"] >= 0)
    np.testing.assert_allclose(s["entropy"], s["aleatoric"] + s["epistemic"], atol=1e-12)


def test_confidence_turns_uncertainties_around():
    assert u.confidence("msp", np.array([0.9]))[0] == 0.9
    assert u.confidence("entropy", np.array([0.3]))[0] == -0.3


# ------------------------------------------------------------------ detection metrics
def test_detection_metrics_by_hand():
    # confidence of 2 test images [0.9, 0.8] and 2 OOD images [0.7, 0.85]
    m = u.detection_metrics(np.array([0.9, 0.8]), np.array([0.7, 0.85]))
    assert m["auroc"] == pytest.approx(3 / 4)  # 3 of the 4 (in, out) pairs ranked right
    # ranked 0.9 in, 0.85 out, 0.8 in, 0.7 out: precision 1 at recall 1/2, 2/3 at recall 1
    assert m["aupr_in"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # OOD positive by uncertainty: 0.7 out, 0.8 in, 0.85 out, 0.9 in
    assert m["aupr_out"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # keeping 95% of the test images needs threshold 0.8, which keeps the OOD image at 0.85
    assert m["fpr95"] == pytest.approx(0.5)


def test_perfect_and_inverted_detectors():
    perfect = u.detection_metrics(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2]))
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    inverted = u.detection_metrics(np.array([0.1, 0.2]), np.array([0.9, 0.8, 0.7]))
    assert inverted["auroc"] == 0.0 and inverted["fpr95"] == 1.0


def test_ties_count_half():
    m = u.detection_metrics(np.array([0.5, 0.5]), np.array([0.5, 0.5]))
    assert m["auroc"] == 0.5 and m["fpr95"] == 1.0


def test_fpr95_needs_95_percent_of_the_test_images():
    # 20 test images: the 19th (95%) has confidence 0.3; 10 OOD images, 4 of them above 0.3
    conf_in = np.r_[np.linspace(0.99, 0.4, 18), 0.3, 0.01]
    conf_out = np.r_[0.5, 0.45, 0.35, 0.31, np.full(6, 0.05)]
    assert u.detection_metrics(conf_in, conf_out)["fpr95"] == pytest.approx(0.4)


def _sklearn_weighted(conf_in, conf_out, w_in, w_out):
    y = np.r_[np.ones(len(conf_in)), np.zeros(len(conf_out))]
    conf, w = np.r_[conf_in, conf_out], np.r_[w_in, w_out].astype(float)
    fpr, tpr, _ = roc_curve(y, conf, sample_weight=w, drop_intermediate=False)
    return {"auroc": roc_auc_score(y, conf, sample_weight=w),
            "aupr_in": average_precision_score(y, conf, sample_weight=w),
            "aupr_out": average_precision_score(1 - y, -conf, sample_weight=w),
            "fpr95": fpr[np.searchsorted(tpr, 0.95)]}


@pytest.mark.parametrize("rounding", [None, 1])  # continuous scores, and many ties
def test_the_bootstrap_is_scikit_learn_on_each_resample(rounding):
    rng = np.random.default_rng(1)
    conf_in, conf_out = rng.normal(1, 1, 300), rng.normal(0, 1, 70)
    if rounding is not None:
        conf_in, conf_out = np.round(conf_in, rounding), np.round(conf_out, rounding)
    boot_in, boot_out = rng.integers(0, 300, (6, 300)), rng.integers(0, 70, (6, 70))
    fast = u.bootstrap_detection(conf_in, conf_out, boot_in, boot_out, chunk=4)
    for r in range(6):
        expected = _sklearn_weighted(conf_in, conf_out, np.bincount(boot_in[r], minlength=300),
                                     np.bincount(boot_out[r], minlength=70))
        for metric, value in expected.items():
            assert fast[metric][r] == pytest.approx(value, abs=1e-12), metric
    # the identity resample is the point estimate
    ident = u.bootstrap_detection(conf_in, conf_out, np.arange(300)[None], np.arange(70)[None])
    point = u.detection_metrics(conf_in, conf_out)
    assert {m: float(v[0]) for m, v in ident.items()} == pytest.approx(point, abs=1e-12)


def test_roc_points_interpolate_scikit_learns_curve():
    grid = np.linspace(0, 1, 11)
    tpr = u.roc_points(np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.85, 0.1]), grid)
    assert tpr[0] == pytest.approx(0.25) and tpr[-1] == 1.0  # 0.9 is kept before any OOD image
    assert np.all(np.diff(tpr) >= 0)


# ------------------------------------------------------------------ selective prediction
def test_risk_coverage_by_hand():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, False, True, True])
    risks = u.risk_coverage(conf, correct)
    np.testing.assert_allclose(risks, [0.0, 0.5, 1 / 3, 0.25])
    assert u.aurc(risks) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)
    assert u.accuracy_at(risks, 0.5) == pytest.approx(0.5)
    assert u.accuracy_at(risks, 0.9) == pytest.approx(0.75)  # ceil(0.9 x 4) = all 4
    assert u.accuracy_at(risks, 0.75) == pytest.approx(2 / 3)
    # optimal: the error last -> risks 0, 0, 0, 1/4
    assert u.optimal_aurc(correct) == pytest.approx(0.25 / 4)


def test_risk_coverage_ranks_by_confidence_not_by_position():
    conf = np.array([0.1, 0.9, 0.5])
    correct = np.array([False, True, True])
    np.testing.assert_allclose(u.risk_coverage(conf, correct), [0.0, 0.0, 1 / 3])


def test_risk_coverage_spreads_a_tie_s_errors_over_its_images():
    """Equal confidences cannot be ordered: within a tie the risk is its expectation over the
    tie's orders, whatever order the images come in."""
    conf = np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1])
    correct = np.array([True, True, False, True, False, False])
    # the tie (4 images, 2 errors) adds 0.5 expected errors per image
    expected = np.array([0.0, 0.5 / 2, 1.0 / 3, 1.5 / 4, 2.0 / 5, 3.0 / 6])
    np.testing.assert_allclose(u.risk_coverage(conf, correct), expected)
    permutation = np.array([5, 3, 0, 2, 4, 1])
    np.testing.assert_allclose(u.risk_coverage(conf[permutation], correct[permutation]), expected)
    # the optimal ranking (correct first) is one big tie per class and stays exact
    assert u.optimal_aurc(correct) == pytest.approx(np.mean([0, 0, 0, 1 / 4, 2 / 5, 3 / 6]))


def test_risk_at_fixed_coverages():
    risks = np.array([0.0, 0.5, 1 / 3, 0.25])
    np.testing.assert_allclose(u.risk_at(risks, np.array([0.25, 0.5, 0.6, 1.0])), [0.0, 0.5, 1 / 3, 0.25])
