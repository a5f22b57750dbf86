"""cifar-ensembles: the library behind the Snakemake workflow.

Public numerical API (stable import paths):
- `cifar_ensembles.optim.SAM` (SAM and ASAM: `first_step` / `second_step`)
- `cifar_ensembles.losses.AsymmetricLossSingleLabel`
- `cifar_ensembles.ensemble.soft_vote` / `hard_vote`
- `cifar_ensembles.metrics.expected_calibration_error`

The package by role, lower layers first (a module imports only from its own layer or below):
- `errors`: the two exceptions every layer raises.
- `config/`: the config resolved into typed specs, and its checks.
- the numerical library, at the top level: `models`, `optim`, `losses`, `schedules`, `ema`.
- `transforms/`, `compute/`: augmentation and corruptions; devices, GPU claims, inference.
- `files/`: every on-disk format, atomic writes, untrusted-input readers.
- `analysis/`: pure functions on probability arrays (votes, metrics, shift, diversity).
- `training/`: the trainer and what only it uses.
- `stages/`: what each `cifar-ensembles` subcommand does, one module per rule file; no stage
  imports another.
- `cli`: the command.

albumentations checks PyPI for a newer release on import; that call hangs or fails on
offline clusters, so it is switched off here, before anything imports albumentations.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
