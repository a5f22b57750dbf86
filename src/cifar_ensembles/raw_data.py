"""The raw dataset files: fetch them into a folder, checksum first, and read them back as
uint8 arrays (`splits` turns those into the prepared data.npz).

Downloads go through torchvision's own helpers (`download_and_extract_archive` with the
MD5 torchvision publishes). Offline machines name a local archive or folder instead
(`data.source`); the same checksum applies. Pickled CIFAR batches are only read from a
folder this module filled after the archive's checksum matched.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

from .atomic import current_umask
from .errors import UserError


@dataclass(frozen=True)
class CifarSpec:
    """Where torchvision says a CIFAR archive lives and how its pickles are laid out."""

    url: str
    md5: str
    filename: str
    base_folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str


def _cifar_spec(cls, label_key: str) -> CifarSpec:
    return CifarSpec(
        url=cls.url,
        md5=cls.tgz_md5,
        filename=cls.filename,
        base_folder=cls.base_folder,
        train_files=tuple(name for name, _ in cls.train_list),
        test_files=tuple(name for name, _ in cls.test_list),
        meta_file=cls.meta["filename"],
        label_key=label_key,
        names_key=cls.meta["key"],
    )


CIFAR = {
    "cifar10": _cifar_spec(tvd.CIFAR10, "labels"),
    "cifar100": _cifar_spec(tvd.CIFAR100, "fine_labels"),
}
FASHION_FILES = tuple(name for name, _ in tvd.FashionMNIST.resources)  # the four .gz names
DATASETS = (*CIFAR, "fashion_mnist")


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def fetch(dataset: str, out_dir: str | os.PathLike, source: str | None = None,
          url: str | None = None, md5: str | None = None) -> Path:
    """Fill `out_dir` with the verified raw files of `dataset`; all or nothing.

    `source` is a local archive or folder (offline machines); otherwise `url` (default:
    torchvision's) is downloaded. `md5` defaults to torchvision's published checksum.
    """
    check_dataset_name(dataset)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        if dataset in CIFAR:
            _fetch_cifar(CIFAR[dataset], staging, source, url, md5)
        else:
            _fetch_fashion_mnist(staging, source, url, md5)
        if out_dir.exists():  # replaced only once the new files are verified
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _fetch_cifar(spec: CifarSpec, staging: Path, source, url, md5) -> None:
    md5 = md5 or spec.md5
    if source is None:
        try:
            download_and_extract_archive(url or spec.url, str(staging), filename=spec.filename, md5=md5)
        except RuntimeError as err:  # torchvision raises RuntimeError on an MD5 mismatch
            raise UserError(f"data.url: {url or spec.url}: {err}") from None
        except OSError as err:
            raise UserError(f"data.url: cannot download {url or spec.url}: {err}") from None
        return
    archive = Path(source)
    if archive.is_dir():
        archive = archive / spec.filename
    if not archive.is_file():
        raise UserError(f"data.source: {source}: no such archive (expected {spec.filename})")
    if not check_integrity(str(archive), md5):
        raise UserError(f"data.source: {archive}: checksum mismatch (expected MD5 {md5}); "
                        "the archive is corrupt, truncated or not the expected dataset")
    try:
        extract_archive(str(archive), str(staging))
    except Exception as err:  # tarfile raises several kinds on a broken archive
        raise UserError(f"data.source: {archive}: cannot extract: {err}") from None


def _fetch_fashion_mnist(staging: Path, source, url, md5) -> None:
    """Debian's dataset-fashion-mnist re-gzipped the files, so the .gz MD5s cannot match.

    A local folder is therefore decompressed as is and checked structurally (IDX magic,
    shapes, label range) when it is loaded; downloads keep torchvision's MD5 check.
    """
    raw = staging / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    if source is None:
        if md5:
            raise UserError("data.md5: Fashion-MNIST is four files checked with torchvision's own MD5s; "
                            "leave data.md5 null")
        base = (url or tvd.FashionMNIST.mirrors[0]).rstrip("/") + "/"
        for filename, file_md5 in tvd.FashionMNIST.resources:
            try:
                download_and_extract_archive(base + filename, str(raw), filename=filename, md5=file_md5)
            except (RuntimeError, OSError) as err:
                raise UserError(f"data.url: {base + filename}: {err}") from None
        return
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"data.source: {source}: not a folder with the four Fashion-MNIST .gz files")
    for filename in FASHION_FILES:
        gz = folder / filename
        if not gz.is_file():
            raise UserError(f"data.source: {gz}: missing")
        try:
            with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError, zlib.error) as err:
            raise UserError(f"data.source: {gz}: cannot decompress: {err}") from None


def load_raw(dataset: str, raw_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a folder filled by `fetch` into uint8 NHWC images, int64 labels and class names."""
    check_dataset_name(dataset)
    raw_dir = Path(raw_dir)
    if dataset in CIFAR:
        return _load_cifar(CIFAR[dataset], raw_dir / CIFAR[dataset].base_folder)
    return _load_fashion_mnist(raw_dir)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing from the extracted archive")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as err:
        raise UserError(f"{path}: not a CIFAR batch: {err}") from None


def _cifar_batches(spec: CifarSpec, folder: Path, names) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        batch = _unpickle(folder / name)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = np.asarray(batch[spec.label_key], dtype=np.int64)
        except KeyError as err:
            raise UserError(f"{folder / name}: CIFAR batch without key {err}") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise UserError(f"{folder / name}: expected N x 3072 pixels and N labels, "
                            f"got {data.shape} and {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _load_cifar(spec: CifarSpec, folder: Path) -> dict[str, np.ndarray]:
    x_train, y_train = _cifar_batches(spec, folder, spec.train_files)
    x_test, y_test = _cifar_batches(spec, folder, spec.test_files)
    classes = [str(c) for c in _unpickle(folder / spec.meta_file)[spec.names_key]]
    return _checked(dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                         classes=np.array(classes)), folder)


def _load_fashion_mnist(raw_dir: Path) -> dict[str, np.ndarray]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = raw_dir / "FashionMNIST" / "raw"
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"
        try:
            arrays[f"x_{split}"] = read_image_file(str(images)).numpy()[..., None]
            arrays[f"y_{split}"] = read_label_file(str(labels)).numpy().astype(np.int64)
        except (OSError, AssertionError, RuntimeError, ValueError, TypeError, KeyError) as err:
            raise UserError(f"{folder}: not valid Fashion-MNIST IDX files: {err}") from None
    arrays["classes"] = np.array(tvd.FashionMNIST.classes)
    return _checked(arrays, folder)


def _checked(arrays: dict[str, np.ndarray], where: Path) -> dict[str, np.ndarray]:
    n_classes = len(arrays["classes"])
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y) or len(x) == 0:
            raise UserError(f"{where}: {split} split has {len(x)} images and {len(y)} labels")
        if y.min() < 0 or y.max() >= n_classes:
            raise UserError(f"{where}: {split} labels outside 0..{n_classes - 1}")
    return arrays
