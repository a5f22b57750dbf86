"""Weight EMA on top of torch's AveragedModel: e <- d e + (1 - d) w after each full step.

Float parameters and buffers (BatchNorm statistics) are averaged; integer buffers
(`num_batches_tracked`) are copied. Optional warm-up (as in timm): the decay used at
update n is d * (1 - exp(-n / warmup_steps)), so early weights do not linger.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, warmup_steps: int, n_updates: int) -> float:
    if warmup_steps <= 0:
        return decay
    return decay * (1.0 - math.exp(-n_updates / warmup_steps))


def make_ema(model: nn.Module, decay: float, warmup_steps: int) -> AveragedModel:
    """An AveragedModel that starts as a copy of `model` (e_0 = w_0)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")

    @torch.no_grad()
    def update(ema_tensors, model_tensors, n_averaged):
        if not ema_tensors[0].is_floating_point():
            torch._foreach_copy_(ema_tensors, model_tensors)
            return
        # reading n_averaged syncs with the GPU: only the warm-up needs it
        d = ema_decay(decay, warmup_steps, int(n_averaged)) if warmup_steps > 0 else decay
        torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - d)

    ema = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    ema.update_parameters(model)  # first call copies: e_0 = w_0, n_averaged = 1
    return ema
