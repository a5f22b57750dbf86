"""How large each dataset's files can be: the bounds that extraction and decompression
read against, so that a file handed in cannot fill the disk or the memory.

Every bound follows from what the dataset is, not from a guess at what a machine has:

- CIFAR batches: a pickled batch of 10,000 32 x 32 x 3 images. Python 3's pickle protocol 2
  writes bytes as latin-1 text in UTF-8, two bytes for each pixel >= 128, so a batch of one's
  own may take twice its 30,720,000 pixel bytes; each image's label and file name get 256
  bytes more. The upstream batches are about 31.0 MB.
- Fashion-MNIST: an IDX file is a header (magic, then one int32 per dimension) and exactly
  the bytes its dimensions say; at most 60,000 training and 10,000 test images of 28 x 28.
- CIFAR-10-C: each corruption's .npy holds 50,000 32 x 32 x 3 uint8 images (five severities
  of the 10,000 test images), labels.npy 50,000 labels (up to int64); each with an .npy
  header (numpy pads it to 64 bytes; 4,096 allowed).

Any other member of an archive (readme.html, the folder entries) gets `other` bytes, all
members together `total`, and an archive holds at most `count` members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CIFAR_IMAGE = 32 * 32 * 3
PICKLED_IMAGE = 2 * CIFAR_IMAGE + 256  # protocol 2's two bytes per pixel, its label and file name
BATCH = 10_000  # images in a CIFAR-10 batch, and in the CIFAR-10 / CIFAR-100 test sets
NPY_HEADER = 4096
SMALL = 1 << 20  # readme.html, batches.meta, meta, folder entries


@dataclass(frozen=True)
class Limits:
    """The most each named file (by its name without folders) may hold, in bytes; `other`
    for any other file, `total` for all together, `count` members at most."""

    files: dict[str, int]
    total: int
    other: int = SMALL
    count: int = 64

    def of(self, name: str) -> int:
        """The bound of the file called `name` (folders stripped)."""
        return self.files.get(name.rstrip("/").rsplit("/", 1)[-1], self.other)


def _sum(files: dict[str, int], others: int) -> int:
    return sum(files.values()) + others * SMALL


_CIFAR10 = {**{f"data_batch_{b}": BATCH * PICKLED_IMAGE for b in range(1, 6)},
            "test_batch": BATCH * PICKLED_IMAGE}
_CIFAR100 = {"train": 5 * BATCH * PICKLED_IMAGE, "test": BATCH * PICKLED_IMAGE}


def idx_size(dims: tuple[int, ...]) -> int:
    """The length of an IDX file of uint8 with dimensions `dims`: its header and its data."""
    return 4 + 4 * len(dims) + math.prod(dims)


_FASHION = {"train-images-idx3-ubyte": idx_size((60_000, 28, 28)),
            "train-labels-idx1-ubyte": idx_size((60_000,)),
            "t10k-images-idx3-ubyte": idx_size((10_000, 28, 28)),
            "t10k-labels-idx1-ubyte": idx_size((10_000,))}

CIFAR10_C_ARRAY = 5 * BATCH * CIFAR_IMAGE + NPY_HEADER  # one corruption, severities 1..5
CIFAR10_C_LABELS = 5 * BATCH * 8 + NPY_HEADER
CIFAR10_C_CORRUPTIONS = 19

DATASETS = {
    # 6 batches, batches.meta and readme.html (and folder entries, which hold nothing)
    "cifar10": Limits(_CIFAR10, total=_sum(_CIFAR10, 2)),
    "cifar100": Limits(_CIFAR100, total=_sum(_CIFAR100, 2)),
    "fashion_mnist": Limits(_FASHION, other=0, total=sum(_FASHION.values()), count=4),
}


def cifar10_c(corruption: str) -> Limits:
    """A local CIFAR-10-C: `corruption`.npy and labels.npy are read; any other .npy of the
    archive (the other corruptions) may be as large as one corruption."""
    return Limits({f"{corruption}.npy": CIFAR10_C_ARRAY, "labels.npy": CIFAR10_C_LABELS},
                  total=CIFAR10_C_CORRUPTIONS * CIFAR10_C_ARRAY + CIFAR10_C_LABELS, other=CIFAR10_C_ARRAY)
