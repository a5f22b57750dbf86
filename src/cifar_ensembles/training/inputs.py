"""The training input pipeline: per-image (DataLoader) or batched on the training device.

Both yield the batches of one epoch in the permutation fixed by (seed, epoch), from any
batch on, so a resumed run replays exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..compute.device import to_channels_last
from ..config.spec import AugmentSpec, LoaderSpec
from ..transforms.augment import EpochBatches, SeededImages, build_train_transform
from ..transforms.batched_augment import BatchedAugment, DeviceBatches
from .signals import ignore_stop_signals


class InputPipeline:
    """`epoch(epoch, start_batch)` iterates (x, y) on the device, x normalized (channels_last
    when asked); `settings` says how it runs (run.yaml's `effective` section)."""

    def __init__(self, loader, sampler, device: torch.device, channels_last: bool, settings: dict):
        self.loader, self.sampler, self.device = loader, sampler, device
        self.channels_last, self.settings = channels_last, settings

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
        non_blocking = self.device.type == "cuda"
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            yield (to_channels_last(x) if self.channels_last else x), y


def build_inputs(augment: AugmentSpec, loader: LoaderSpec, images: np.ndarray, labels: np.ndarray,
                 mean, std, batch_size: int, seed: int, device: torch.device, channels_last: bool,
                 threads: int) -> InputPipeline:
    image_size = images.shape[1]
    if augment.mode == "batched":
        batched = BatchedAugment(augment, image_size, mean, std, device, channels_last)
        batches = DeviceBatches(images, labels, batched, batch_size, seed, device)
        settings = {"augment_mode": "batched", "num_workers": 0, "pin_memory": False,
                    "persistent_workers": False}
        return InputPipeline(batches, batches, device, False, settings)  # already laid out
    transform = build_train_transform(augment, image_size, mean, std)
    sampler = EpochBatches(len(images), batch_size, seed, drop_last=True)
    workers = max(int(threads), 1) if loader.num_workers is None else loader.num_workers
    pin = loader.pin_memory and device.type == "cuda"
    persistent = loader.persistent_workers and workers > 0
    data_loader = torch.utils.data.DataLoader(
        SeededImages(images, labels, transform), batch_sampler=sampler, num_workers=workers,
        pin_memory=pin, persistent_workers=persistent,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
    settings = {"augment_mode": "per_image", "num_workers": workers, "pin_memory": pin,
                "persistent_workers": persistent}
    return InputPipeline(data_loader, sampler, device, channels_last, settings)
