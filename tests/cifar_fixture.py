"""Build CIFAR archives in the exact upstream layout (cifar-10-python.tar.gz), but tiny.

Images are class-dependent colour patterns plus noise, so that a small network learns
them in one or two epochs and ensembles have something to vote about.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x 3072 uint8 rows in CIFAR's channel-major order."""
    n = len(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((n, 3, 32, 32), dtype=np.float64)
    for i, c in enumerate(labels):
        phase = 2 * np.pi * c / 10
        base = np.sin(xx / (2 + c % 5) + phase) + np.cos(yy / (2 + c // 5 * 2) - phase)
        for ch in range(3):
            images[i, ch] = 128 + 50 * base * np.cos(phase + ch) + rng.normal(0, 40, (32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)


@dataclass(frozen=True)
class Member:
    """One tar entry: a regular file holding `data`, or a folder, link, device or FIFO."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file, dir, symlink, hardlink, chr, blk, fifo
    target: str = ""  # what a symlink or hard link points to
    zeros: int = 0  # a file's data goes on with this many zero bytes (streamed: a size bomb)


class _Zeros(io.RawIOBase):
    """`data`, then `zeros` zero bytes, read in pieces (a gigabyte member costs no memory)."""

    def __init__(self, data: bytes, zeros: int):
        self.data, self.left = data, zeros

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.data:
            head, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
            return head
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
             "fifo": tarfile.FIFOTYPE}


def write_tar(path: str | Path, members: Iterable[Member]) -> str:
    """Write exactly `members` (in order, names as given: '..', absolute, links, devices) into a
    .tar.gz; return its MD5. For archives no honest tool writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = TAR_TYPES[member.kind]
            info.linkname = member.target
            info.mode = 0o755 if member.kind == "dir" else 0o644
            if member.kind in ("chr", "blk"):
                info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
            info.size = len(member.data) + member.zeros if member.kind == "file" else 0
            tar.addfile(info, _Zeros(member.data, member.zeros) if member.kind == "file" else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


def pickled_members(folder: str, members: dict, protocol: int = 2) -> list[Member]:
    """`members` (name -> object, or name -> bytes already pickled) as files of `folder/`."""
    return [Member(f"{folder}/{name}",
                   obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol))
            for name, obj in members.items()]


def _write_archive(path: Path, folder: str, members: dict) -> str:
    """Pickle each member into `folder/` of a .tar.gz, as the upstream archives are; return its MD5."""
    return write_tar(path, pickled_members(folder, members))


def cifar10_members(per_batch: int = 50, test_size: int = 100, seed: int = 0) -> dict:
    """The unpickled contents of cifar-10-python.tar.gz: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    members = {}
    for b in range(1, 6):
        labels = rng.integers(0, 10, per_batch)
        members[f"data_batch_{b}"] = {"batch_label": f"training batch {b} of 5",
                                      "labels": labels.tolist(), "data": synthetic_images(labels, rng),
                                      "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)]}
    labels = np.arange(test_size) % 10
    members["test_batch"] = {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
                             "data": synthetic_images(labels, rng),
                             "filenames": [f"test_{i}.png" for i in range(test_size)]}
    members["batches.meta"] = {"num_cases_per_batch": per_batch, "label_names": CLASSES, "num_vis": 3072}
    return members


def cifar100_members(train_size: int = 200, test_size: int = 100, seed: int = 0) -> dict:
    """The unpickled contents of cifar-100-python.tar.gz: train, test, meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    members = {}
    for name, n in (("train", train_size), ("test", test_size)):
        fine = rng.integers(0, 100, n)
        members[name] = {"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
                         "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                         "data": synthetic_images(fine % 10, rng)}
    members["meta"] = {"fine_label_names": [f"fine_{i}" for i in range(100)],
                       "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    return members


def make_cifar10_archive(path: str | Path, per_batch: int = 50, test_size: int = 100,
                         seed: int = 0) -> str:
    """Write cifar-10-python.tar.gz with data_batch_1..5, test_batch and batches.meta; return its MD5."""
    return _write_archive(Path(path), "cifar-10-batches-py", cifar10_members(per_batch, test_size, seed))


def make_cifar100_archive(path: str | Path, train_size: int = 200, test_size: int = 100,
                          seed: int = 0) -> str:
    """Write cifar-100-python.tar.gz (train, test, meta with fine and coarse labels); return its MD5."""
    return _write_archive(Path(path), "cifar-100-python", cifar100_members(train_size, test_size, seed))
