"""Test-time augmentation views: the transformed copies of an image a model is averaged over.

A view is (flip, dy, dx): mirror left-right, then shift content dy rows down and dx columns
right, the vacated pixels black (the zeros training's constant pad crops in). `flip` is the
image and its mirror; `flip_translate` adds both shifted by `translate` pixels down-right and
up-left, each with its mirror: 6 views, the set airbench averages for its records.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..config.spec import TtaSpec


class View(NamedTuple):
    flip: bool
    dy: int
    dx: int


def tta_views(spec: TtaSpec) -> tuple[View, ...]:
    """The views `spec` averages over (identity first); one identity view when TTA is off."""
    if not spec.enabled:
        return (View(False, 0, 0),)
    views = [View(False, 0, 0), View(True, 0, 0)]
    if spec.views == "flip_translate":
        t = spec.translate
        views += [View(flip, d, d) for d in (t, -t) for flip in (False, True)]
    return tuple(views)


def _shift(x: torch.Tensor, d: int, axis: int) -> torch.Tensor:
    """Content moved by d along `axis`, the vacated pixels zero (|d| below the size, else all zero)."""
    if d == 0:
        return x
    out = torch.zeros_like(x)
    n = x.shape[axis]
    if abs(d) >= n:
        return out
    if d > 0:
        out.narrow(axis, d, n - d).copy_(x.narrow(axis, 0, n - d))
    else:
        out.narrow(axis, 0, n + d).copy_(x.narrow(axis, -d, n + d))
    return out


def apply_view(images: torch.Tensor, view: View) -> torch.Tensor:
    """One view of uint8 NHWC images (any device)."""
    x = images.flip(2) if view.flip else images
    return _shift(_shift(x, view.dy, 1), view.dx, 2)
