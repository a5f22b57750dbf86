"""Batched inference shared by validation during training and the predict stage."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..transforms.augment import normalize_tensor
from .device import autocast, to_channels_last, uses_channels_last


def predict_logits(model: nn.Module, images: np.ndarray, mean, std, device: torch.device,
                   batch_size: int, precision: str,
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
