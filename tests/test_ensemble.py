"""Soft and hard voting, vote counts, accuracy vs ensemble size and the choice of size."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dyadic_probs, ref_hard_vote, ref_soft_vote

from cifar_ensembles.analysis.votes import choose_size, first_k_accuracy, hard_vote, soft_vote, vote_counts


def test_soft_vote_is_argmax_of_mean():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=(5, 30))
    np.testing.assert_array_equal(soft_vote(probs), ref_soft_vote(probs))
    np.testing.assert_array_equal(soft_vote(probs), np.argmax(probs.mean(axis=0), axis=-1))


def test_soft_and_hard_disagree_on_confident_minority():
    # two members weakly say 0, one is sure of 1: majority -> 0, mean probability -> 1
    probs = np.array([[[0.34, 0.33, 0.33]], [[0.34, 0.33, 0.33]], [[0.0, 1.0, 0.0]]])
    assert hard_vote(probs).tolist() == [0]
    assert soft_vote(probs).tolist() == [1]


def test_hard_vote_tie_broken_by_summed_probability():
    # one vote each for classes 0 and 1; summed probability 0.7 vs 1.2 -> class 1 (not the lower index)
    probs = np.array([[[0.6, 0.4, 0.0]], [[0.1, 0.8, 0.1]]])
    assert vote_counts(probs).tolist() == [[1, 1, 0]]
    assert hard_vote(probs).tolist() == [1]


def test_hard_vote_tie_ignores_probability_of_untied_classes():
    # classes 1 and 2 get two votes each; class 0 has no vote but the largest summed probability (1.2).
    # Among the tied classes, class 2 has the larger sum (0.85 > 0.8).
    probs = np.array([[[0.3, 0.4, 0.3, 0.0]],
                      [[0.3, 0.4, 0.0, 0.3]],
                      [[0.3, 0.0, 0.4, 0.3]],
                      [[0.3, 0.0, 0.45, 0.25]]])
    assert vote_counts(probs).tolist() == [[0, 2, 2, 0]]
    assert hard_vote(probs).tolist() == [2]


def test_hard_vote_full_tie_goes_to_lower_index():
    # one vote each for classes 1 and 2 and equal sums (1.0 and 1.0) -> class 1
    probs = np.array([[[0.0, 0.625, 0.375]], [[0.0, 0.375, 0.625]]])
    assert hard_vote(probs).tolist() == [1]
    # same with the classes swapped in member order: still class 1
    assert hard_vote(probs[::-1].copy()).tolist() == [1]


def test_hard_vote_majority_beats_probability_mass():
    # 3 votes for class 2 with little mass, 2 confident votes for class 0
    low = [0.3, 0.3, 0.4]
    probs = np.array([[low], [low], [low], [[1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0]]])
    assert hard_vote(probs).tolist() == [2]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
def test_hard_vote_matches_reference_on_many_ties(seed, m):
    probs = dyadic_probs(m, 50, 4, seed, units=8)
    np.testing.assert_array_equal(hard_vote(probs), ref_hard_vote(probs))


def test_vote_counts_matches_loop():
    probs = dyadic_probs(5, 20, 3, seed=9, units=8)
    expected = np.zeros((20, 3), dtype=int)
    for k in range(5):
        for i in range(20):
            expected[i, np.argmax(probs[k, i])] += 1
    counts = vote_counts(probs)
    np.testing.assert_array_equal(counts, expected)
    assert (counts.sum(axis=1) == 5).all()


@pytest.mark.parametrize("kind", ["random", "dyadic", "float32"])
def test_first_k_accuracy_matches_direct_loop(kind):
    m, n, c = 6, 80, 5
    if kind == "random":
        probs = np.random.default_rng(1).dirichlet(np.full(c, 0.5), size=(m, n))
    elif kind == "dyadic":
        probs = dyadic_probs(m, n, c, seed=2, units=8)
    else:
        probs = dyadic_probs(m, n, c, seed=3, units=8).astype(np.float32)
    labels = np.random.default_rng(4).integers(0, c, n)
    curves = first_k_accuracy(probs, labels)
    assert set(curves) == {"hard", "soft"}
    for k in range(1, m + 1):
        assert curves["soft"][k - 1] == pytest.approx(np.mean(soft_vote(probs[:k]) == labels))
        assert curves["hard"][k - 1] == pytest.approx(np.mean(hard_vote(probs[:k]) == labels))
    # one member: both votes are that member's argmax
    assert curves["soft"][0] == curves["hard"][0] == pytest.approx(np.mean(probs[0].argmax(-1) == labels))


def test_perfect_and_useless_members():
    labels = np.array([0, 1, 2, 3, 1, 0])
    perfect = np.repeat(np.eye(4)[labels][None], 3, axis=0)
    curves = first_k_accuracy(perfect, labels)
    np.testing.assert_array_equal(curves["soft"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(curves["hard"], [1.0, 1.0, 1.0])

    wrong = np.stack([np.eye(4)[(labels + s) % 4] for s in (1, 2, 3)])  # every member always wrong
    curves = first_k_accuracy(wrong, labels)
    np.testing.assert_array_equal(curves["soft"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(curves["hard"], [0.0, 0.0, 0.0])

    # one perfect member among two members that are always wrong in different ways:
    # hard vote is a three-way tie with equal sums (1 each) -> lowest index; soft vote the same
    mixed = np.stack([perfect[0], wrong[0], wrong[1]])
    expected = np.mean(np.minimum(labels, np.minimum((labels + 1) % 4, (labels + 2) % 4)) == labels)
    curves = first_k_accuracy(mixed, labels)
    assert curves["hard"][2] == pytest.approx(expected)
    assert curves["soft"][2] == pytest.approx(expected)

    uniform = np.full((3, 6, 4), 0.25)  # uninformative members: all ties, resolved to class 0
    assert hard_vote(uniform).tolist() == [0] * 6
    assert soft_vote(uniform).tolist() == [0] * 6


def test_choose_size():
    assert choose_size(np.array([0.5, 0.7, 0.7, 0.6])) == 2
    assert choose_size(np.array([0.9, 0.8])) == 1
    assert choose_size(np.array([0.1, 0.2, 0.3])) == 3
    assert choose_size(np.array([0.4, 0.6, 0.5, 0.6, 0.6])) == 2
