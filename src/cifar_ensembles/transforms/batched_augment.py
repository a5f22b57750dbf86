"""Batched augmentation on the training device (`augment.mode: batched`); `augment` holds the
per-image counterpart.

The prepared uint8 training images are copied to the device once. Every batch is then
augmented there with tensor operations, with no DataLoader and no workers: pad + random
crop, horizontal flip, cutout (for the albumentations recipe) and normalization. On a
machine without a GPU the same code runs on the CPU (the training device), which is how
it is tested.

The random numbers follow the CPU pipelines' distributions exactly:
- crop: pad by `pad` (zeros, or reflect-101 for `pad_mode: reflect`, as albumentations'
  BORDER_REFLECT_101 and torchvision's "reflect"), then crop at an offset drawn uniformly
  from 0..2*pad (inclusive), independently for rows and columns;
- flip: horizontal, p = 0.5, after the crop;
- cutout (albumentations only, CoarseDropout with a fixed hole size): with probability p,
  `holes` squares of side min(size, image size); each top-left corner uniform over
  0..H - h (inclusive) and 0..W - w, so a hole always lies entirely inside the image, as
  albumentations draws them; holes may overlap; the fill is cast to uint8 as albumentations
  does (np.array(fill, dtype=uint8));
- normalization: x / 255, minus mean, divided by std, the same float32 operations as the
  CPU pipelines' `none` recipe (bit-identical on the CPU).

Determinism and resuming: the data order is EpochBatches' permutation of (seed, epoch) and
the random numbers of a whole epoch are drawn at its start from a torch.Generator seeded
from (seed, epoch). The numbers of image slot j in batch b are those at position
b * batch_size + j, a function of (seed, epoch, batch index) only, so resuming at batch b
replays exactly the batches an uninterrupted run sees. The numbers are drawn on the CPU
and copied to the device with the epoch's order in one transfer, so a GPU and a CPU run
augment identically.
"""

from __future__ import annotations

import numpy as np
import torch

from ..compute.device import to_channels_last
from ..config.spec import AugmentSpec
from ..errors import UserError
from .augment import epoch_order

_STREAM_TAG = 0x67707561  # "gpua": keeps this stream apart from any other use of (seed, epoch)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, epoch)."""
    state = int(np.random.SeedSequence([seed, epoch, _STREAM_TAG]).generate_state(1, np.uint64)[0])
    g = torch.Generator()
    g.manual_seed(state & ((1 << 63) - 1))
    return g


class BatchedAugment:
    """Pad + random crop, flip, cutout and normalization of a batch of uint8 NHWC images.

    `draw(n, generator)` returns the random numbers of n images (CPU int32 tensor, n x K);
    `apply(images, index, params)` augments `images[index]` with them on images' device.
    """

    def __init__(self, spec: AugmentSpec, image_size: int, mean, std, device: torch.device | str,
                 channels_last: bool):
        random = spec.name != "none"
        self.size = int(image_size)
        self.pad = spec.pad if random else 0
        self.reflect = spec.pad_mode == "reflect"
        if self.reflect and self.pad >= self.size:
            raise UserError(f"augment.pad: reflect padding needs pad < image size ({self.size})")
        self.flip = spec.flip and random
        cutout = spec.cutout
        uses_cutout = spec.name == "albumentations" and cutout.holes > 0 and cutout.size > 0
        self.holes = cutout.holes if uses_cutout else 0
        self.hole = min(cutout.size, self.size)
        self.cutout_p = cutout.p if self.holes else 0.0
        fill = np.array(cutout.fill, dtype=np.float64).astype(np.uint8)
        self.fill = int(fill) if self.holes else 0
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)
        self.mean = torch.as_tensor(np.asarray(mean, np.float32)).view(1, -1, 1, 1).to(self.device)
        self.std = torch.as_tensor(np.asarray(std, np.float32)).view(1, -1, 1, 1).to(self.device)
        self.arange = torch.arange(self.size, device=self.device)

    # columns of the parameter table
    @property
    def columns(self) -> int:
        return 4 + 2 * self.holes  # oy, ox, flip, cutout applied, then (hy, hx) per hole

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Random numbers of n images, in a fixed order of draws (CPU, int32, n x columns)."""
        out = torch.zeros((n, self.columns), dtype=torch.int32)
        if self.pad:
            out[:, 0:2] = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator, dtype=torch.int32)
        if self.flip:
            out[:, 2] = torch.rand(n, generator=generator) < 0.5
        if self.holes:
            out[:, 3] = torch.rand(n, generator=generator) < self.cutout_p
            span = self.size - self.hole + 1
            out[:, 4:] = torch.randint(0, span, (n, 2 * self.holes), generator=generator, dtype=torch.int32)
        return out

    def _reflect(self, i: torch.Tensor) -> torch.Tensor:
        last = self.size - 1
        i = i.abs()
        return torch.where(i > last, 2 * last - i, i)

    def crop_flip_cutout(self, images: torch.Tensor, index: torch.Tensor,
                         params: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C): images[index] padded, cropped, flipped and cut out."""
        s, pad, ar = self.size, self.pad, self.arange
        index = index.long()
        params = params.long()
        rows = ar[None, :].expand(len(index), s)
        cols = ar[None, :].expand(len(index), s)
        if self.flip:
            cols = torch.where(params[:, 2:3].bool(), s - 1 - cols, cols)
        valid = None
        if pad:
            rows = rows + params[:, 0:1] - pad
            cols = cols + params[:, 1:2] - pad
            if self.reflect:
                rows, cols = self._reflect(rows), self._reflect(cols)
            else:
                valid = (((rows >= 0) & (rows < s))[:, :, None]
                         & ((cols >= 0) & (cols < s))[:, None, :])
                rows, cols = rows.clamp(0, s - 1), cols.clamp(0, s - 1)
        out = images[index[:, None, None], rows[:, :, None], cols[:, None, :]]
        if valid is not None:
            out = out.masked_fill(~valid[..., None], 0)
        if self.holes:
            hy = params[:, 4::2, None]  # (B, holes, 1)
            hx = params[:, 5::2, None]
            in_y = (ar >= hy) & (ar < hy + self.hole)  # (B, holes, H)
            in_x = (ar >= hx) & (ar < hx + self.hole)
            hole = (in_y[:, :, :, None] & in_x[:, :, None, :]).any(1) & params[:, 3, None, None].bool()
            out = out.masked_fill(hole[..., None], self.fill)
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW (channels_last strides when asked), normalized."""
        x = x.permute(0, 3, 1, 2)  # a channels_last view of the NHWC data
        if self.channels_last:
            x = to_channels_last(x.to(torch.float32, memory_format=torch.channels_last))
        else:
            x = x.to(torch.float32, memory_format=torch.contiguous_format)
        return x.div_(255.0).sub_(self.mean).div_(self.std)

    def apply(self, images: torch.Tensor, index: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.crop_flip_cutout(images, index, params))


class DeviceBatches:
    """Augmented batches of an epoch, made on the device: the batched input path's loader.

    Like EpochBatches it has `epoch` and `start_batch` (set before iterating) and drops the
    last incomplete batch; iterating yields (x, y) already on the device.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: BatchedAugment,
                 batch_size: int, seed: int, device: torch.device | str):
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.labels = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UserError("augment.mode: batched needs uint8 NHWC images (the prepared data.npz)")
        self.augment, self.batch_size, self.seed = augment, int(batch_size), int(seed)
        self.n = len(self.images)
        self.steps = self.n // self.batch_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self):
        return max(self.steps - self.start_batch, 0)

    def epoch_tables(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, params) of a whole epoch on the device, in one host-to-device copy."""
        used = self.steps * self.batch_size
        order = torch.from_numpy(epoch_order(self.n, self.seed, epoch)[:used].astype(np.int32))
        params = self.augment.draw(used, epoch_generator(self.seed, epoch))
        table = torch.cat([order[:, None], params], dim=1)
        if self.device.type == "cuda":
            table = table.pin_memory().to(self.device, non_blocking=True)
        else:
            table = table.to(self.device)
        return table[:, 0], table[:, 1:]

    def batch(self, order: torch.Tensor, params: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
        index = order[sl].long()
        return self.augment.apply(self.images, index, params[sl]), self.labels[index]

    def __iter__(self):
        if self.start_batch >= self.steps:
            return
        order, params = self.epoch_tables(self.epoch)
        for b in range(self.start_batch, self.steps):
            yield self.batch(order, params, b)
