"""Voting over ensemble members and accuracy as a function of ensemble size.

Probabilities come as one array of shape (members, N, classes). Soft voting takes the
argmax of the mean probability. Hard voting takes the most frequent member prediction;
ties go to the tied class with the larger summed probability, then to the lower index.
"""

from __future__ import annotations

import numpy as np


def soft_vote(probs: np.ndarray) -> np.ndarray:
    return np.argmax(probs.sum(axis=0), axis=-1)


def _hard_vote_from(counts: np.ndarray, summed: np.ndarray, members: int) -> np.ndarray:
    # counts are integers and summed <= members, so counts * (members + 1) + summed orders
    # first by count, then by summed probability; argmax keeps the lowest index on exact ties.
    return np.argmax(counts * (members + 1.0) + summed, axis=-1)


def vote_counts(probs: np.ndarray) -> np.ndarray:
    """(N, C) number of members predicting each class."""
    m, n, c = probs.shape
    counts = np.zeros((n, c), dtype=np.int64)
    np.add.at(counts, (np.arange(n)[None, :].repeat(m, 0), probs.argmax(axis=-1)), 1)
    return counts


def hard_vote(probs: np.ndarray) -> np.ndarray:
    return _hard_vote_from(vote_counts(probs), probs.sum(axis=0), probs.shape[0])


def first_k_accuracy(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy of the ensembles of the first k members, k = 1..M, for both votes.

    Cumulative sums make every k cost one pass, not k passes.
    """
    m, n, c = probs.shape
    cum_probs = np.cumsum(probs, axis=0, dtype=np.float64)
    onehot_votes = np.eye(c, dtype=np.int64)[probs.argmax(axis=-1)]  # (M, N, C)
    cum_votes = np.cumsum(onehot_votes, axis=0)
    soft = np.array([np.mean(np.argmax(cum_probs[k], axis=-1) == labels) for k in range(m)])
    hard = np.array([np.mean(_hard_vote_from(cum_votes[k], cum_probs[k], k + 1) == labels)
                     for k in range(m)])
    return {"hard": hard, "soft": soft}


def choose_size(val_curve: np.ndarray) -> int:
    """The ensemble size with the best validation accuracy; the smallest such size on ties."""
    return int(np.argmax(val_curve)) + 1
