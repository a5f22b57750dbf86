"""Turn raw arrays into one `data.npz`: train / validation / test, with normalization stats.

The validation split is carved from the training set, stratified by class and fixed by
`split_seed`, so every experiment and seed sees the same split; the ensemble size is
chosen on it and the test set is read once. Optional subsets (also stratified) make
quick runs; the validation split does not depend on them.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from .atomic import save_npz
from .errors import UserError


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `n` items whose class proportions match `labels` (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n / len(labels))
    take = np.floor(exact).astype(int)
    short = n - take.sum()
    if short:
        order = np.argsort(-(exact - take), kind="stable")
        take[order[:short]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 NHWC images on the [0, 1] scale (exact, chunked)."""
    total = np.zeros(images.shape[-1])
    total_sq = np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += np.square(block).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def split(arrays: dict[str, np.ndarray], val_size: int, split_seed: int,
          train_subset: int | None = None, test_subset: int | None = None) -> dict[str, np.ndarray]:
    """Carve the validation split, then take the optional subsets; returns the npz contents."""
    x, y = arrays["x_train"], arrays["y_train"]
    if not 0 < val_size < len(y):
        raise UserError(f"data.val_size: {val_size} must be at least 1 and smaller than the "
                        f"training set ({len(y)} images)")
    rng = np.random.default_rng(split_seed)
    val_idx = stratified_take(y, val_size, rng)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    if train_subset is not None:
        if not 0 < train_subset <= len(train_idx):
            raise UserError(f"data.subset.train: {train_subset} must be between 1 and "
                            f"{len(train_idx)} (the training set after the validation split)")
        # own generators: the test subset must not change when the train subset does
        train_idx = train_idx[stratified_take(y[train_idx], train_subset,
                                              np.random.default_rng([split_seed, 1]))]
    test_idx = np.arange(len(arrays["y_test"]))
    if test_subset is not None:
        if not 0 < test_subset <= len(test_idx):
            raise UserError(f"data.subset.test: {test_subset} must be between 1 and {len(test_idx)}")
        test_idx = stratified_take(arrays["y_test"], test_subset, np.random.default_rng([split_seed, 2]))
    mean, std = channel_stats(x[train_idx])
    return dict(
        x_train=x[train_idx], y_train=y[train_idx], x_val=x[val_idx], y_val=y[val_idx],
        x_test=arrays["x_test"][test_idx], y_test=arrays["y_test"][test_idx],
        classes=arrays["classes"], mean=mean, std=std,
        train_index=train_idx, val_index=val_idx, test_index=test_idx,
    )


def write(path: str | os.PathLike, prepared: dict[str, np.ndarray]) -> None:
    save_npz(path, **prepared)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a prepared `data.npz` fully into memory (it is small: CIFAR-10 is 180 MB)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a prepared dataset: {err}") from None
