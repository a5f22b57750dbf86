"""Learning-rate schedules from torch: cosine (optional linear warm-up, floor) and step.

`interval: step` advances the schedule after every optimizer step, `epoch` after every
epoch; lengths in the config (`warmup_epochs`, `step_size`) are always in epochs.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from .errors import UserError

SCHEDULER_NAMES = ("cosine", "step", "constant")


def build_scheduler(optimizer: torch.optim.Optimizer, spec: dict, epochs: int,
                    steps_per_epoch: int) -> tuple[lr_scheduler.LRScheduler, str]:
    name = spec.get("name", "cosine")
    interval = spec.get("interval", "step")
    if interval not in ("step", "epoch"):
        raise UserError(f"scheduler.interval: {interval!r} must be step or epoch")
    per_epoch = steps_per_epoch if interval == "step" else 1
    total = max(epochs * per_epoch, 1)
    if name == "constant":
        return lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), interval
    if name == "step":
        step_size = max(int(spec.get("step_size", 30)) * per_epoch, 1)
        return lr_scheduler.StepLR(optimizer, step_size, float(spec.get("gamma", 0.1))), interval
    if name == "cosine":
        warmup = int(round(float(spec.get("warmup_epochs", 0)) * per_epoch))
        base_lr = optimizer.param_groups[0]["lr"]
        floor = float(spec.get("min_lr", 0.0))
        if floor >= base_lr:
            raise UserError(f"scheduler.min_lr: {floor} must be below optimizer.lr ({base_lr})")
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=floor)
        if warmup <= 0:
            return cosine, interval
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=float(spec.get("warmup_start", 0.01)),
                                     end_factor=1.0, total_iters=warmup)
        return lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup]), interval
    raise UserError(f"scheduler.name: unknown scheduler {name!r}; choose one of "
                    f"{', '.join(SCHEDULER_NAMES)}")
