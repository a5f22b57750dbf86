"""Public API: scores of class probabilities against labels (`expected_calibration_error`,
accuracy, NLL, Brier, reliability bins, temperature scaling).

Kept at this import path for users; the implementation lives in `analysis.metrics`.
"""

from .analysis.metrics import (
    accuracy,
    brier,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    temperature_scale,
)

__all__ = ["accuracy", "brier", "expected_calibration_error", "fit_temperature", "nll", "reliability_bins",
           "temperature_scale"]
