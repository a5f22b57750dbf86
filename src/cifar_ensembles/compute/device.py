"""Where and how tensors are computed: device choice, bf16 autocast, channels_last layout."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` fails fast (one line) on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"runtime.device: {name!r} requested but CUDA is not available on this machine")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"runtime.device: unknown device {name!r}; choose auto, cpu or cuda")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise UserError(f"precision: unknown precision {precision!r}; choose fp32 or bf16")


def uses_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are stored channels_last (training's
    `channels_last: true`); inputs should then be channels_last too."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
            return True
    return False


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """An NCHW batch in channels_last memory format.

    A one-channel batch is contiguous in both formats, so `.contiguous(channels_last)` keeps
    its NCHW strides and convolutions stay on their NCHW kernels; the same memory viewed with
    channels_last strides (identical addresses when C = 1) selects the NHWC kernels.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 4 and x.shape[1] == 1 and x.stride(1) != 1:
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return x
