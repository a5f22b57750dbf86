"""Pure functions on arrays of class probabilities: votes and ensemble curves (`votes`),
scores, calibration and bootstrap intervals (`metrics`), scores under shift and the
corruption error (`shift_metrics`), how members disagree (`diversity`), and uncertainty
scores, OOD detection metrics and risk-coverage curves (`uncertainty`).

May import: numpy, scikit-learn's metrics (`uncertainty`) and each other; no files, no torch,
no config. The public entry points are
re-exported at `cifar_ensembles.ensemble` and `cifar_ensembles.metrics`.
"""
