"""The raw dataset files: fetch them into a folder, checksum first, and read them back as
uint8 arrays (`splits` turns those into the prepared data.npz).

Downloads go through torchvision's own helpers (`download_url` with the MD5 torchvision
publishes). Offline machines name a local archive or folder instead (`data.source`); the
same checksum applies, or the user's own (`data.md5`). Either way the archive is extracted
by `safe_archive` (nothing outside its folder) and its pickled batches are read by
`safe_pickle` (plain data only, no code), then checked for type and shape.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, download_url

from .atomic import current_umask
from .errors import UserError
from .safe_archive import extract_tar
from .safe_pickle import load_plain_pickle


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
        _readable(dataset, staging, source or url or "the download")
        if out_dir.exists():  # replaced only once the new files are verified
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _readable(dataset: str, staging: Path, origin) -> None:
    """Decode the staged files once (safely) before they count as fetched: a malformed or
    poisoned batch fails the download, named inside its archive, not a later job."""
    try:
        load_raw(dataset, staging)
    except UserError as err:
        raise UserError(str(err).replace(f"{staging}{os.sep}", f"{origin}: ")) from None


def _fetch_cifar(spec: CifarSpec, staging: Path, source, url, md5) -> None:
    """The archive (downloaded or local), its MD5 checked, extracted safely into `staging`."""
    md5 = md5 or spec.md5
    if source is None:
        url = url or spec.url
        try:  # torchvision's download, with its MD5 check
            download_url(url, str(staging), filename=spec.filename, md5=md5)
        except RuntimeError as err:  # torchvision raises RuntimeError on an MD5 mismatch
            raise UserError(f"data.url: {url}: {err}") from None
        except OSError as err:
            raise UserError(f"data.url: cannot download {url}: {err}") from None
        archive, where = staging / spec.filename, "data.url"
    else:
        archive, where = Path(source), "data.source"
        if archive.is_dir():
            archive = archive / spec.filename
        if not archive.is_file():
            raise UserError(f"data.source: {source}: no such archive (expected {spec.filename})")
        if not check_integrity(str(archive), md5):
            raise UserError(f"data.source: {archive}: checksum mismatch (expected MD5 {md5}); "
                            "the archive is corrupt, truncated or not the expected dataset")
    extract_tar(archive, staging, where)
    if source is None:
        archive.unlink()


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


def _batch(path: Path, keys: tuple[str, ...]) -> dict:
    """A pickled CIFAR dict, read without running code, with `keys` present."""
    batch = load_plain_pickle(path)
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR batch: a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in keys:
        if key not in batch:
            raise UserError(f"{path}: CIFAR batch without key {key!r}")
    return batch


def _pixels(value, path: Path) -> np.ndarray:
    if not (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2
            and value.shape[1] == 3072):
        shown = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise UserError(f"{path}: 'data' must be a uint8 N x 3072 array, got {shown}")
    return value


def _labels(value, path: Path, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    if isinstance(value, list) and all(type(v) is int for v in value):
        return np.asarray(value, dtype=np.int64).reshape(-1)
    raise UserError(f"{path}: {key!r} must be a list of integer labels")


def _cifar_batches(spec: CifarSpec, folder: Path, names) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        batch = _batch(path, ("data", spec.label_key))
        data, labels = _pixels(batch["data"], path), _labels(batch[spec.label_key], path, spec.label_key)
        if len(labels) != len(data):
            raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _class_names(spec: CifarSpec, folder: Path) -> list[str]:
    path = folder / spec.meta_file
    names = _batch(path, (spec.names_key,))[spec.names_key]
    if not (isinstance(names, list) and names and all(isinstance(n, (str, bytes)) for n in names)):
        raise UserError(f"{path}: {spec.names_key!r} must be a list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _load_cifar(spec: CifarSpec, folder: Path) -> dict[str, np.ndarray]:
    x_train, y_train = _cifar_batches(spec, folder, spec.train_files)
    x_test, y_test = _cifar_batches(spec, folder, spec.test_files)
    classes = _class_names(spec, folder)
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
