"""Per-image input pipelines (`augment.mode: per_image`): the report's albumentations
recipe, torchvision transforms, or none; `batched_augment` is the batched counterpart.

Every training image is augmented with its own seed, derived from (run seed, epoch,
index). That makes the data stream independent of the number of loader workers and lets
a resumed run replay exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config.spec import AugmentSpec
from ..errors import UserError

AUGMENT_NAMES = ("albumentations", "torchvision", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of one epoch's images, fixed by (seed, epoch); shared by both input paths."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one image in one epoch of one run."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def normalization(which: str, data_mean, data_std, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std to normalize with (`augment.normalize`): the training set's own, or ImageNet's."""
    if which == "dataset":
        return np.asarray(data_mean, np.float32), np.asarray(data_std, np.float32)
    if which == "imagenet":
        if channels == 3:
            return np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
        return (np.full(channels, np.mean(IMAGENET_MEAN), np.float32),
                np.full(channels, np.mean(IMAGENET_STD), np.float32))
    raise UserError(f"augment.normalize: unknown value {which!r}; choose dataset or imagenet")


def normalize_tensor(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NHWC (or HWC) tensor, on any device -> float32 NCHW (or CHW) tensor, normalized.

    The same float32 operations everywhere (x / 255, - mean, / std), so the CPU pipelines,
    the batched device path and inference give bit-identical values for the same pixels.
    """
    x = images.float().div_(255.0).movedim(-1, -3)
    shape = (-1, 1, 1)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return x.sub_(mean).div_(std)


def to_normalized_tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (or HWC) array -> float32 NCHW (or CHW) tensor, normalized."""
    return normalize_tensor(torch.from_numpy(np.ascontiguousarray(images)), mean, std)


class NoAugment:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        return to_normalized_tensor(image, self.mean, self.std)


class TorchvisionAugment:
    """RandomCrop with padding and a horizontal flip (torchvision.transforms.v2), then normalize."""

    def __init__(self, spec: AugmentSpec, image_size: int, mean, std):
        from torchvision.transforms import v2

        steps = []
        if spec.pad:
            steps.append(v2.RandomCrop(image_size, padding=spec.pad, padding_mode=spec.pad_mode))
        if spec.flip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps) if steps else v2.Identity()
        self.mean, self.std = mean, std

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        # v2 transforms draw from the CPU default generator: seed (and restore) only that one.
        # torch.manual_seed would also (lazily) reseed CUDA, recording a stack trace per call
        # on a CUDA build, which made this transform ~10x slower than its own work.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            x = self.transform(x)
        finally:
            generator.set_state(state)
        mean, std = torch.as_tensor(self.mean).view(-1, 1, 1), torch.as_tensor(self.std).view(-1, 1, 1)
        return x.float().div_(255.0).sub_(mean).div_(std)


class AlbumentationsAugment:
    """The report's single-model recipe: pad + random crop, flip, one cutout hole, normalize."""

    def __init__(self, spec: AugmentSpec, image_size: int, mean, std):
        import albumentations as A
        import cv2

        pad = spec.pad
        border = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT_101}[spec.pad_mode]
        cutout = spec.cutout
        steps = []
        if pad:
            steps += [A.PadIfNeeded(image_size + 2 * pad, image_size + 2 * pad,
                                    border_mode=border, fill=0),
                      A.RandomCrop(image_size, image_size)]
        if spec.flip:
            steps.append(A.HorizontalFlip(p=0.5))
        if cutout.holes > 0 and cutout.size > 0:
            steps.append(A.CoarseDropout(num_holes_range=(cutout.holes, cutout.holes),
                                         hole_height_range=(cutout.size, cutout.size),
                                         hole_width_range=(cutout.size, cutout.size),
                                         fill=cutout.fill, p=cutout.p))
        steps.append(A.Normalize(mean=tuple(float(m) for m in mean),
                                 std=tuple(float(s) for s in std), max_pixel_value=255.0))
        self.transform = A.Compose(steps, seed=0)

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        self.transform.set_random_seed(seed)
        out = self.transform(image=image)["image"]
        if out.ndim == 2:
            out = out[..., None]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32))


def build_train_transform(spec: AugmentSpec, image_size: int, mean, std):
    if spec.name == "none":
        return NoAugment(mean, std)
    if spec.name == "torchvision":
        return TorchvisionAugment(spec, image_size, mean, std)
    if spec.name == "albumentations":
        return AlbumentationsAugment(spec, image_size, mean, std)
    raise UserError(f"augment.name: unknown augmentation {spec.name!r}; choose one of "
                    f"{', '.join(AUGMENT_NAMES)}")


class SeededImages(torch.utils.data.Dataset):
    """Images indexed by (index, seed) pairs, so that the sampler decides the randomness."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key
        return self.transform(self.images[index], seed), int(self.labels[index])


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, sample seed) for one epoch, in a permutation fixed by (seed, epoch).

    `start_batch` skips batches already trained on, for resuming mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0,
                 drop_last: bool = True, start_batch: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.drop_last, self.start_batch = drop_last, start_batch

    def __len__(self):
        full = self.n // self.batch_size
        total = full if self.drop_last or self.n % self.batch_size == 0 else full + 1
        return max(total - self.start_batch, 0)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)
        total = len(self) + self.start_batch
        for b in range(self.start_batch, total):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(int(i), sample_seed(self.seed, self.epoch, int(i))) for i in idx]
