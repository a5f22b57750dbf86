"""Corrupted copies of the test split after the CIFAR-10-C protocol, built from albumentations.

Hendrycks & Dietterich (2019) corrupt every test image with each of 15 corruptions at 5
severities. Here each corruption is one albumentations 2.x transform whose parameters for
severity 1..5 are written in the config (`shift.corruptions.<name>.severities`, with the
source of every value), applied with probability 1. Every (corruption, severity) draws
from its own seed, derived from (`shift.seed`, the corruption's name, the severity), so a
set is the same bit for bit however many others there are. Transforms that need colour
(albumentations' fog, snow and spatter) see a grayscale image as RGB and give back its luminance.
"""

from __future__ import annotations

import typing
import warnings
import zlib

import numpy as np

from ..config.spec import CorruptionTransform
from ..errors import UserError

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


def _first_lines(err, lines: int = 3) -> str:
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return "; ".join(text[:lines])[:300]


def build_transform(transform: str, params: dict, where: str):
    """The albumentations transform `transform(**params, p=1)`; a bad name or parameter is one
    line naming `where` (the config field). albumentations only warns about a parameter it
    does not know (then uses its default) or corrects (a kernel too small): refused here."""
    import albumentations as A

    if transform not in TRANSFORMS:
        raise UserError(f"{where}.transform: {transform!r} is not one of {', '.join(TRANSFORMS)}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built = getattr(A, transform)(**_kwargs(params), p=1.0)
    except Exception as err:  # albumentations validates its arguments with pydantic
        raise UserError(f"{where}: {transform} does not accept {params}: {_first_lines(err)}") from None
    if caught:
        detail = _first_lines(caught[0].message, 1)
        raise UserError(f"{where}: {transform} does not accept {params}: {detail}")
    return built


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
        try:
            y = pipeline(image=x)["image"]
        except Exception as err:  # parameters albumentations accepts but cannot apply to this size
            shape = " x ".join(map(str, image.shape))
            raise UserError(f"{where}: {transform} with {params} fails on a {shape} image: "
                            f"{err.__class__.__name__}: {_first_lines(err, 1)}") from None
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
