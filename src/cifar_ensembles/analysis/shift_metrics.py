"""Scores under distribution shift: per-set calibration, corruption error (mCE), and the
ensemble's gain with a paired bootstrap interval.

Corruption error (Hendrycks & Dietterich 2019): for a classifier f and corruption c, with
E the top-1 error at severity s,
    CE_c(f) = sum_s E_{s,c}(f) / sum_s E_{s,c}(baseline),      mCE(f) = mean_c CE_c(f);
the relative version discounts the clean error E_clean:
    relCE_c(f) = sum_s (E_{s,c}(f) - E_clean(f)) / sum_s (E_{s,c}(base) - E_clean(base)).
Here the baseline is an experiment's mean single model (`shift.baseline`).
"""

from __future__ import annotations

import numpy as np

from .metrics import bootstrap_ci, calibration, temperature_scale


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def corruption_error(errors: np.ndarray, baseline_errors: np.ndarray) -> float | None:
    """CE: the summed error over severities relative to the baseline's (None: the baseline makes
    no error on this corruption, so no ratio exists)."""
    return _ratio(np.sum(errors), np.sum(baseline_errors))


def relative_corruption_error(
    errors: np.ndarray, clean_error: float, baseline_errors: np.ndarray, baseline_clean_error: float
) -> float | None:
    """relCE: the error the corruption adds, relative to what it adds to the baseline (None when
    it adds none to the baseline's)."""
    return _ratio(
        np.sum(np.asarray(errors) - clean_error), np.sum(np.asarray(baseline_errors) - baseline_clean_error)
    )


def mean_defined(values) -> float | None:
    """The mean of the values that exist (mCE over the corruptions with a CE), or None."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def scored(
    probs: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    n_bins: int,
    predictions: np.ndarray | None = None,
) -> dict:
    """Accuracy, NLL, Brier and ECE as predicted and after temperature scaling.

    `predictions` (the hard vote, say) replace the argmax for accuracy when given; the
    probability scores always use `probs`."""
    before = calibration(probs, labels, n_bins)
    after = calibration(temperature_scale(probs, temperature), labels, n_bins)
    if predictions is not None:
        before["accuracy"] = after["accuracy"] = float(np.mean(predictions == labels))
    return {**before, "scaled": after}


def paired_gain(
    ensemble_correct: np.ndarray, single_correct: np.ndarray, boot_indices: np.ndarray, level: float = 0.95
) -> dict:
    """The ensemble's accuracy minus the mean single model's, with a paired percentile bootstrap CI.

    `ensemble_correct` (sets, N) and `single_correct` (members, sets, N) are 0/1 over the same
    N images in every set (the corruptions of one severity); `boot_indices` (resamples, N)
    resample images, the same for both, so the interval is of the paired difference."""
    per_image = (np.asarray(ensemble_correct, float) - np.asarray(single_correct, float).mean(0)).mean(0)
    return {"gain": float(per_image.mean()), "ci": list(bootstrap_ci(per_image, boot_indices, level))}
