"""Batched inference shared by validation during training and the predict stage."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..transforms.augment import normalize_tensor
from ..transforms.tta import View, apply_view
from .device import autocast, to_channels_last, uses_channels_last


def predict_logits(model: nn.Module, images: np.ndarray, mean, std, device: torch.device,
                   batch_size: int, precision: str, channels_last: bool | None = None,
                   views: tuple[View, ...] | None = None) -> torch.Tensor:
    """float32 logits (N x C, on the CPU) of uint8 NHWC images, in eval mode; with test-time
    `views`, views x N x C (a batch holds about `batch_size` transformed images).

    Runs under torch.inference_mode() at a large batch size. On CUDA the uint8 batch is
    copied and normalized on the device (a quarter of the bytes of float32).
    `channels_last=None` follows the model's memory format.
    """
    if channels_last is None:
        channels_last = uses_channels_last(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), autocast(device, precision):
            for x in normalized_batches(images, mean, std, device, batch_size, channels_last, views):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0)
    logits = torch.cat(out)
    return logits.view(-1, len(views), logits.shape[-1]).transpose(0, 1) if views else logits


def normalized_batches(images: np.ndarray, mean, std, device: torch.device, batch_size: int,
                       channels_last: bool, views: tuple[View, ...] | None = None):
    """Float batches of uint8 NHWC `images`, normalized on `device`, in order. With `views`,
    each batch holds every view of each image (image-major: image 0's views, then image 1's)."""
    mean = torch.as_tensor(np.asarray(mean, np.float32), device=device)
    std = torch.as_tensor(np.asarray(std, np.float32), device=device)
    step = max(batch_size // len(views), 1) if views else batch_size
    for start in range(0, len(images), step):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + step]))
        chunk = chunk.to(device, non_blocking=True)
        if views:
            chunk = torch.stack([apply_view(chunk, v) for v in views], dim=1).flatten(0, 1)
        x = normalize_tensor(chunk, mean, std)
        yield to_channels_last(x) if channels_last else x.contiguous()


def softmax_np(logits: torch.Tensor) -> np.ndarray:
    """Class probabilities (float32) of logits; over test-time views (views x N x C), their
    mean: the average of each view's probabilities."""
    probs = torch.softmax(logits.double(), dim=-1)
    return (probs.mean(0) if probs.ndim == 3 else probs).float().numpy()
