"""Learning-rate schedules from torch: cosine (optional linear warm-up, floor), cosine with
warm restarts (snapshot ensembles' cycles), step and constant.

`interval: step` advances the schedule after every optimizer step, `epoch` after every
epoch; lengths in the config (`warmup_epochs`, `step_size`) are always in epochs.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from .config.spec import SchedulerSpec
from .errors import UserError

SCHEDULER_NAMES = ("cosine", "cosine_restarts", "step", "constant")


def build_scheduler(optimizer: torch.optim.Optimizer, spec: SchedulerSpec, epochs: int,
                    steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """The schedule a `scheduler:` spec names; the caller steps it per `spec.interval`."""
    per_epoch = steps_per_epoch if spec.interval == "step" else 1
    total = max(epochs * per_epoch, 1)
    if spec.name == "constant":
        return lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if spec.name == "step":
        return lr_scheduler.StepLR(optimizer, max(spec.step_size * per_epoch, 1), spec.gamma)
    if spec.name == "cosine_restarts":  # SGDR, T_mult 1: M equal cycles from lr down to min_lr
        _check_floor(optimizer, spec)
        return lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=max(total // spec.cycles, 1),
                                                        eta_min=spec.min_lr)
    if spec.name == "cosine":
        warmup = int(round(spec.warmup_epochs * per_epoch))
        _check_floor(optimizer, spec)
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=spec.min_lr)
        if warmup <= 0:
            return cosine
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=spec.warmup_start, end_factor=1.0,
                                     total_iters=warmup)
        return lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    raise UserError(f"scheduler.name: unknown scheduler {spec.name!r}; choose one of "
                    f"{', '.join(SCHEDULER_NAMES)}")


def _check_floor(optimizer: torch.optim.Optimizer, spec: SchedulerSpec) -> None:
    base_lr = optimizer.param_groups[0]["lr"]
    if spec.min_lr >= base_lr:
        raise UserError(f"scheduler.min_lr: {spec.min_lr} must be below optimizer.lr ({base_lr})")
