"""The prepared dataset: raw arrays (`raw_data`) split into one `data.npz` of train /
validation / test, with normalization stats.

The validation split is carved from the training set, stratified by class and fixed by
`split_seed`, so every experiment and seed sees the same split; the ensemble size is
chosen on it and the test set is read once. Optional subsets (also stratified) make
quick runs; the validation split does not depend on them.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..config.spec import SplitSpec
from ..errors import UserError
from .atomic import save_npz
from .records import DamagedFile, error_line


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


def split(arrays: dict[str, np.ndarray], spec: SplitSpec) -> dict[str, np.ndarray]:
    """Carve the validation split, then take the optional subsets; returns the npz contents."""
    val_size, split_seed = spec.val_size, spec.split_seed
    train_subset, test_subset = spec.subset.train, spec.subset.test
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


PREPARED_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "classes", "mean", "std",
                 "train_index", "val_index", "test_index")


def load(path: str | os.PathLike, keys: tuple[str, ...] = PREPARED_KEYS) -> dict[str, np.ndarray]:
    """Read (the given keys of) a prepared `data.npz` into memory, checking what is read.

    CIFAR-10 is 180 MB; reading only the labels (ensemble, report) takes milliseconds."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DamagedFile(path, f"not a prepared dataset (no {missing[0]!r} array)")
            data = {k: npz[k] for k in keys}
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedFile(path, f"not a prepared dataset ({error_line(err)})") from None
    foreign = next((k for k, v in data.items() if not isinstance(v, np.ndarray)), None)
    if foreign:  # np.load hands back the raw bytes of a member that is not in .npy format
        raise DamagedFile(path, f"not a prepared dataset ({foreign!r} is not a .npy array)")
    check_prepared(data, path)
    return data


def check_prepared(data: dict[str, np.ndarray], path) -> None:
    """Types and shapes of whatever part of data.npz was read: images uint8 NHWC, labels
    integer and in range, one label per image, finite normalization stats."""
    def bad(problem):
        raise DamagedFile(path, f"damaged prepared dataset ({problem})")

    if "classes" in data and data["classes"].ndim != 1:
        bad(f"classes must be a list of names, got shape {data['classes'].shape}")
    n_classes = len(data["classes"]) if "classes" in data else None
    for split_name in ("train", "val", "test"):
        x, y = data.get(f"x_{split_name}"), data.get(f"y_{split_name}")
        if x is not None and (x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3)):
            bad(f"x_{split_name} must be uint8 N x H x W x C, got {x.dtype} {x.shape}")
        if y is not None:
            if y.ndim != 1 or y.dtype.kind not in "iu":
                bad(f"y_{split_name} must be integer labels, got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or (n_classes is not None and y.max() >= n_classes)):
                bad(f"y_{split_name} has labels outside the classes")
        if x is not None and y is not None and len(x) != len(y):
            bad(f"{len(x)} x_{split_name} images but {len(y)} labels")
    for key in ("mean", "std"):
        if key in data and (data[key].ndim != 1 or not np.all(np.isfinite(data[key]))):
            bad(f"{key} must be finite per-channel numbers")
