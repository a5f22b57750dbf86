"""Corrupted copies of the test split after the CIFAR-10-C protocol, built from albumentations.

Hendrycks & Dietterich (2019) corrupt every test image with each of 15 corruptions at 5
severities. Here each corruption is one albumentations 2.x transform whose parameters for
severity 1..5 are written in the config (`shift.corruptions.<name>.severities`, with the
source of every value), applied with probability 1. Every (corruption, severity) draws
from its own seed, derived from (`shift.seed`, the corruption's name, the severity), so a
set is the same bit for bit however many others there are. Transforms that need colour
(fog, snow, spatter) see a grayscale image as RGB and give back its luminance.
"""

from __future__ import annotations

import typing
import zlib

import numpy as np

from .errors import UserError
from .spec import CorruptionTransform

# The albumentations transforms a corruption may name (the schema lists the same).
TRANSFORMS = typing.get_args(CorruptionTransform)
NEEDS_RGB = ("RandomFog", "RandomSnow", "Spatter")
SEVERITIES = (1, 2, 3, 4, 5)


def set_seed(seed: int, corruption: str, severity: int) -> int:
    """The seed of one (corruption, severity) set: independent of every other set."""
    entropy = [seed, zlib.crc32(corruption.encode()), severity]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _kwargs(params: dict) -> dict:
    """Config values as albumentations wants them: lists become tuples (ranges)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def build_transform(transform: str, params: dict, where: str):
    """The albumentations transform `transform(**params, p=1)`; a bad name or parameter is one
    line naming `where` (the config field)."""
    import albumentations as A

    if transform not in TRANSFORMS:
        raise UserError(f"{where}.transform: {transform!r} is not one of {', '.join(TRANSFORMS)}")
    try:
        return getattr(A, transform)(**_kwargs(params), p=1.0)
    except Exception as err:  # albumentations validates its arguments with pydantic
        first = (str(err).strip().splitlines() or [""])
        detail = "; ".join(line.strip() for line in first[:3])
        raise UserError(f"{where}: {transform} does not accept {params}: {detail[:300]}") from None


def corrupt(images: np.ndarray, transform: str, params: dict, seed: int, where: str) -> np.ndarray:
    """uint8 N x H x W x C images, each corrupted by `transform(**params)` with the set's seed."""
    import albumentations as A
    import cv2

    pipeline = A.Compose([build_transform(transform, params, where)], seed=seed)
    gray = images.shape[-1] == 1
    to_rgb = gray and transform in NEEDS_RGB
    out = np.empty_like(images)
    for i, image in enumerate(images):
        x = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if to_rgb else image
        y = pipeline(image=x)["image"]
        if to_rgb:
            y = cv2.cvtColor(y, cv2.COLOR_RGB2GRAY)
        out[i] = y.reshape(image.shape)
    return out


def corrupt_all(images: np.ndarray, transform: str, severities: list[dict], seed: int, corruption: str,
                where: str) -> np.ndarray:
    """uint8 5 x N x H x W x C: the images at severities 1..5."""
    if len(severities) != len(SEVERITIES):
        raise UserError(f"{where}.severities: {len(severities)} parameter sets, expected {len(SEVERITIES)}")
    return np.stack([corrupt(images, transform, params, set_seed(seed, corruption, s),
                             f"{where}.severities[{s - 1}]")
                     for s, params in zip(SEVERITIES, severities)])
