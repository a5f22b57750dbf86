"""Batched inference shared by validation during training and the predict step."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from .augment import normalize_tensor
from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` fails fast (one line) on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device: {name!r} requested but CUDA is not available on this machine")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"device: unknown device {name!r}; choose auto, cpu or cuda")


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


def predict_logits(model: nn.Module, images: np.ndarray, mean, std, device: torch.device,
                   batch_size: int = 512, precision: str = "fp32",
                   channels_last: bool | None = None) -> torch.Tensor:
    """float32 logits (N x C, on the CPU) of uint8 NHWC images, in eval mode.

    Runs under torch.inference_mode() at a large batch size. On CUDA the uint8 batch is
    copied and normalized on the device (a quarter of the bytes of float32).
    `channels_last=None` follows the model's memory format.
    """
    if channels_last is None:
        channels_last = uses_channels_last(model)
    was_training = model.training
    model.eval()
    out = []
    mean = torch.as_tensor(np.asarray(mean, np.float32), device=device)
    std = torch.as_tensor(np.asarray(std, np.float32), device=device)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
                x = normalize_tensor(chunk.to(device, non_blocking=True), mean, std)
                x = to_channels_last(x) if channels_last else x.contiguous()
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def softmax_np(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=-1).float().numpy()
