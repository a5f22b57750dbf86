"""Arrays the workflow writes and reads back: class probabilities (per member, stacked over
members, on corrupted sets), the labels of data.npz, and the corrupted test sets. Read with
`allow_pickle=False` and checked for shape, dtype and values before use."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..errors import UserError
from ..transforms.corruptions import SEVERITIES
from . import splits
from .records import DamagedFile, error_line


def load_probability_array(path: str | os.PathLike, ndim: int, what: str = "probability array") -> np.ndarray:
    """Class probabilities in an .npy (classes on the last axis, `ndim` axes), read without
    pickles and checked: floats, finite, non-negative, every row summing to 1."""
    try:
        probs = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, ValueError, EOFError) as err:
        raise DamagedFile(path, f"not a {what} ({error_line(err)})") from None
    if (not isinstance(probs, np.ndarray) or probs.ndim != ndim or probs.dtype.kind != "f"
            or probs.shape[-1] < 2):
        raise DamagedFile(path, f"not a {what} (shape {getattr(probs, 'shape', '?')}, "
                                f"dtype {getattr(probs, 'dtype', '?')})")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0:
        raise DamagedFile(path, f"damaged {what} (values that are negative or not finite)")
    sums = probs.reshape(-1, probs.shape[-1]).sum(axis=1, dtype=np.float64)
    if len(sums) and not np.allclose(sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise DamagedFile(path, f"damaged {what} (row {worst} sums to {sums[worst]:.4g}, not 1)")
    return probs


def load_probabilities(path: str | os.PathLike) -> np.ndarray:
    """A member's class probabilities (N x C float32), checked."""
    return load_probability_array(path, 2)



def read_labels(path) -> tuple[np.ndarray, np.ndarray]:
    """Only the validation and test labels of data.npz (np.load reads arrays lazily, per key);
    the class names come along, so that the labels are checked against them."""
    data = splits.load(path, ("y_val", "y_test", "classes"))
    return data["y_val"], data["y_test"]


def load_members(paths, n_images: int, where: str) -> np.ndarray:
    """Stack per-member probability files into (members, N, C), checking every shape."""
    arrays = []
    for path in paths:
        a = load_probabilities(path)
        if a.shape[0] != n_images:
            raise UserError(f"{path}: expected {n_images} x classes probabilities for {where}, "
                            f"got shape {a.shape}")
        if arrays and a.shape != arrays[0].shape:
            raise UserError(f"{path}: shape {a.shape} differs from {paths[0]} ({arrays[0].shape})")
        arrays.append(a)
    return np.stack(arrays)


def npy_header(npz, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz from its header alone; its data stays unread."""
    with npz.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def load_shift_set(path, images: bool = True) -> dict[str, np.ndarray]:
    """A corrupted test set, checked: x, y and index. Without `images` (the analyses need
    only the labels) x's header is checked and its data left unread."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in (("x", "y", "index") if images else ("y", "index"))}
            shape, dtype = (data["x"].shape, data["x"].dtype) if images else npy_header(npz, "x")
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedFile(path, f"not a corrupted test set ({error_line(err)})") from None
    y, index = data["y"], data["index"]
    if not (
        dtype == np.uint8
        and len(shape) == 5
        and shape[0] == len(SEVERITIES)
        and shape[1] == len(y) == len(index)
        and y.dtype.kind in "iu"
        and index.dtype.kind in "iu"
    ):
        raise DamagedFile(
            path, f"damaged corrupted test set (x {dtype} {shape}, y {y.shape}, index {index.shape})"
        )
    return data


def load_ood_probs(path, members: int, images: int | None, classes: int) -> np.ndarray:
    """An experiment's probabilities on one OOD set: members x N x C, checked against the
    members, the set's images (None: whatever the file holds) and the test split's classes."""
    probs = load_probability_array(path, 3, "OOD probability array")
    if probs.shape != (members, probs.shape[1] if images is None else images, classes):
        raise DamagedFile(path, f"damaged OOD probabilities (shape {probs.shape}, expected {members} members "
                                f"x {images} images x {classes} classes)")
    return probs


def load_shift_probs(path, members: int, images: int) -> np.ndarray:
    """An experiment's probabilities on one corrupted set: members x 5 x N x C, checked."""
    probs = load_probability_array(path, 4)
    if probs.shape[:3] != (members, len(SEVERITIES), images):
        raise DamagedFile(path, f"damaged shift probabilities (shape {probs.shape}, expected {members} x "
                                f"{len(SEVERITIES)} x {images} x classes)")
    return probs
