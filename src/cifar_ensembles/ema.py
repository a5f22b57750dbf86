"""Weight EMA over tensor lists: e <- d e + (1 - d) w after each full optimizer step.

Float parameters and buffers (BatchNorm statistics) are averaged with one foreach lerp;
integer buffers (`num_batches_tracked`) are copied with one foreach copy. The update
counter is a plain Python integer (saved in the checkpoint), so the decay, including the
optional warm-up (as in YOLOv5's ModelEMA: d * (1 - exp(-n / warmup_steps)) at update n), is computed
on the host and an update never reads a value back from the device. torch's
AveragedModel keeps its counter on the device instead, which costs a host sync per step
on a GPU.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_decay(decay: float, warmup_steps: int, n_updates: int) -> float:
    if warmup_steps <= 0:
        return decay
    return decay * (1.0 - math.exp(-n_updates / warmup_steps))


class WeightEMA:
    """The averaged weights live in `module`, a copy of the model (e_0 = w_0). Build it after
    the model is on its device and in its memory format: it holds the model's tensors."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup_steps = decay, warmup_steps
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0
        self._source = model
        self._pairs = self._tensor_pairs(model)

    def _tensor_pairs(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(ema float, model float, ema int, model int) tensors, in state_dict order."""
        ema_state = self.module.state_dict(keep_vars=True)
        model_state = model.state_dict(keep_vars=True)
        ema_f, model_f, ema_i, model_i = [], [], [], []
        for key, ema_tensor in ema_state.items():
            target = (ema_f, model_f) if ema_tensor.is_floating_point() else (ema_i, model_i)
            target[0].append(ema_tensor.detach())
            target[1].append(model_state[key].detach())
        return ema_f, model_f, ema_i, model_i

    @torch.no_grad()
    def update_parameters(self, model: nn.Module | None = None) -> None:
        """One EMA update (two foreach kernels) from `model`, by default the one it was built from."""
        if model is not None and model is not self._source:
            self._source, self._pairs = model, self._tensor_pairs(model)
        self.updates += 1
        ema_f, model_f, ema_i, model_i = self._pairs
        d = ema_decay(self.decay, self.warmup_steps, self.updates)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - d)
        if ema_i:
            torch._foreach_copy_(ema_i, model_i)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def make_ema(model: nn.Module, decay: float, warmup_steps: int) -> WeightEMA:
    """An EMA of `model`'s weights that starts as a copy of them (e_0 = w_0)."""
    return WeightEMA(model, decay, warmup_steps)
