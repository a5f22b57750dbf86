"""Scores of predicted class probabilities (arrays of shape N x C, or M x N x C for members)."""

from __future__ import annotations

import math

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
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / len(labels))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: count, mean confidence and accuracy (NaN when empty)."""
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return {"count": count, "confidence": conf, "accuracy": acc,
            "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): temperature scaling applied to probabilities (logits up to a shift)."""
    z = np.log(np.clip(probs, _TINY, None)) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0,
                    iterations: int = 60) -> float:
    """The T minimizing NLL (Guo et al. 2017), by golden-section search on log T.

    NLL is convex in 1/T for fixed logits, so the one-dimensional search finds the optimum.
    """
    a, b = np.log(lo), np.log(hi)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t):
        return nll(temperature_scale(probs, float(np.exp(log_t))), labels)

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))


def calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels), "brier": brier(probs, labels),
            "ece": expected_calibration_error(probs, labels, n_bins)}


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n) indices drawn with replacement; shared across models so CIs are paired."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n), dtype=np.int32)


def bootstrap_ci(correct: np.ndarray, indices: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of a 0/1 (or real) vector."""
    means = np.asarray(correct, dtype=np.float64)[indices].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test (two-sided binomial test on the discordant pairs).

    b: A right and B wrong, c: A wrong and B right. Under H0 b ~ Binomial(b + c, 1/2);
    p = min(1, 2 P(X <= min(b, c))), computed in log space so it stays exact for large counts.
    """
    a, b_ = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "p_value": 1.0}
    k = np.arange(min(b, c) + 1)
    log_terms = (math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])
                 - n * math.log(2.0))
    top = log_terms.max()
    p = 2.0 * math.exp(top) * float(np.sum(np.exp(log_terms - top)))
    return {"b": b, "c": c, "p_value": min(1.0, p)}
