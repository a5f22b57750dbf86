"""Batched inference shared by validation during training and the predict step."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from .augment import to_normalized_tensor
from .errors import UserError

PRECISIONS = ("fp32", "bf16")


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


def predict_logits(model: nn.Module, images: np.ndarray, mean, std, device: torch.device,
                   batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    """float32 logits (N x C, on the CPU) of uint8 NHWC images, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), autocast(device, precision):
            for start in range(0, len(images), batch_size):
                x = to_normalized_tensor(images[start:start + batch_size], mean, std)
                out.append(model(x.to(device, non_blocking=True)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def softmax_np(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=-1).float().numpy()
