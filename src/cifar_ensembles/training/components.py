"""What a run trains with, built from its specs: network, optimizer, schedule, loss and EMA."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from ..config.spec import RuntimeSpec, TrainingSpec
from ..ema import make_ema
from ..errors import UserError
from ..losses import build_loss
from ..models import build_model, load_pretrained
from ..optim import SAM, build_optimizer
from ..schedules import build_scheduler


def resolve_compile(value, device: torch.device) -> str | None:
    """`runtime.compile` -> the torch.compile mode to use (None: eager).

    `true` is inductor's default mode; `reduce-overhead` adds CUDA graphs (worth it for small
    batches, where kernel launches dominate) and on a CPU falls back to the default mode.
    On a CPU inductor compiles C++, so a missing compiler is reported here, in one line.
    """
    if value is False or value is None:
        return None
    if value is True:
        mode = "default"
    elif value == "reduce-overhead":
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    else:
        raise UserError(f"runtime.compile: unknown value {value!r}; choose false, true or reduce-overhead")
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")
                                     or shutil.which("c++") or shutil.which("clang++")):
        raise UserError("runtime.compile: torch.compile on the CPU needs a C++ compiler (g++, c++ or "
                        "clang++) and none is on PATH; install one or set compile: false")
    return mode


class NetworkWithLoss(nn.Module):
    """The network and its loss as one module: (x, y) -> (loss, logits). torch.compile then
    graphs the loss with the forward and backward passes (and CUDA graphs replay all three)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return self.loss_fn(logits.float(), y), logits


@dataclass
class Components:
    model: nn.Module  # the network; its state_dict has the plain keys
    step_model: nn.Module  # what runs training steps: NetworkWithLoss, or its compiled wrapper
    compile_mode: str | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    ema: nn.Module | None

    @property
    def sam(self) -> bool:
        return isinstance(self.optimizer, SAM)


def build_network(spec: TrainingSpec, num_classes: int, in_channels: int, seed: int,
                  weights_file: str | None) -> nn.Module:
    """The network with its initial weights: drawn from `seed`, or ImageNet's from a file."""
    torch.manual_seed(seed)
    model = build_model(spec.model, num_classes, in_channels)
    if spec.model.pretrained:
        if not weights_file:
            raise UserError("model.pretrained: pretrained weights need a weights file (the "
                            "download_weights rule or pretrained_weights.file); training never downloads")
        load_pretrained(model, weights_file)
    return model


def build_components(spec: TrainingSpec, runtime: RuntimeSpec, model: nn.Module, device: torch.device,
                     steps_per_epoch: int) -> Components:
    """Place `model` on `device` (channels_last, compiled, as `runtime` asks) and build the rest."""
    model.to(device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    compile_mode = resolve_compile(runtime.compile, device)
    loss_fn = build_loss(spec.loss)
    step_model = NetworkWithLoss(model, loss_fn)
    if compile_mode is not None:
        step_model = torch.compile(step_model, mode=compile_mode)
    optimizer = build_optimizer(model, spec.optimizer)
    scheduler = build_scheduler(optimizer, spec.scheduler, spec.epochs, steps_per_epoch)
    ema = make_ema(model, spec.ema.decay, spec.ema.warmup_steps) if spec.ema.enabled else None
    return Components(model, step_model, compile_mode, optimizer, scheduler, loss_fn, ema)
