"""One optimizer step: forward, loss, backward; SAM/ASAM's second pass; EMA; per-step schedule.

The step returns the loss and logits of the first pass as device tensors and never reads
a value back to the host, so on a GPU it only queues work. What it launches besides the
network: the fused optimizer (one kernel), SAM/ASAM's perturbation and restore (a fixed
handful of foreach kernels, whatever the number of parameters) and the EMA (two foreach
kernels). With `runtime.compile`, the network and its loss, forward and backward, are one
compiled module; with `reduce-overhead` on CUDA they replay as CUDA graphs. The optimizer,
SAM's perturbation and the EMA stay eager: they already run as a few multi-tensor kernels,
and the learning-rate schedule changes a Python float that CUDA graphs would freeze.
"""

from __future__ import annotations

import torch

from ..compute.device import autocast
from ..errors import UserError
from ..optim import frozen_bn_stats
from .components import Components


class TrainStep:
    def __init__(self, parts: Components, device: torch.device, precision: str, per_step_schedule: bool):
        self.parts, self.device, self.precision = parts, device, precision
        self.per_step_schedule = per_step_schedule
        self.graphs = parts.compile_mode == "reduce-overhead"
        self._compile_checked = parts.compile_mode is None

    def _forward_backward(self, x, y):
        with autocast(self.device, self.precision):
            loss, logits = self.parts.step_model(x, y)
        loss.backward()
        return loss.detach(), logits.detach()

    def _step(self, x, y):
        parts = self.parts
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        parts.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._forward_backward(x, y)
        if self.graphs:  # CUDA graph outputs are overwritten by the next replay
            loss, logits = loss.clone(), logits.clone()
        if parts.sam:
            def perturbed_pass():
                with frozen_bn_stats(parts.model):
                    self._forward_backward(x, y)

            parts.optimizer.step(perturbed_pass)
        else:
            parts.optimizer.step()
        if parts.ema is not None:
            parts.ema.update_parameters(parts.model)
        if self.per_step_schedule:
            parts.scheduler.step()
        return loss, logits

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One full optimizer step (two passes for SAM/ASAM); loss and logits of pass one."""
        if self._compile_checked:
            return self._step(x, y)
        try:  # the first compiled step compiles: report a failure as a config problem
            out = self._step(x, y)
        except (UserError, KeyboardInterrupt, torch.OutOfMemoryError):  # not compile's fault
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise UserError(f"runtime.compile: torch.compile (mode {self.parts.compile_mode}) failed on the "
                            f"first training step on {self.device} ({err.__class__.__name__}: {first}); "
                            "set compile: false to train without it") from err
        self._compile_checked = True
        return out
