"""Scores of predicted class probabilities (arrays of shape N x C, or M x N x C for members)."""

from __future__ import annotations

import numpy as np

_TINY = 1e-12


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=-1) == labels))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p_true = np.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return float(-np.mean(np.log(np.clip(p_true, _TINY, None))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over samples of the squared distance to the one-hot label (summed over classes)."""
    onehot = np.eye(probs.shape[-1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): sum_b |B|/N |acc(B) - conf(B)|."""
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.sum(np.abs(acc_sum - conf_sum)) / len(labels))
