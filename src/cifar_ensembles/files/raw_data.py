"""The raw dataset files: fetch them into a folder, checksum first, and read them back as
uint8 arrays (`splits` turns those into the prepared data.npz).

Downloads go through torchvision's own helpers (`download_url` with the MD5 torchvision
publishes). Offline machines name a local archive or folder instead (`data.source`); the
same checksum applies, or the user's own (`data.md5`). Either way the archive is extracted
by `safe_archive` (nothing outside its folder, nothing beyond the sizes in `limits`) and its
pickled batches are read by `safe_pickle` (plain data only, no code), then checked for type
and shape. Fashion-MNIST's gzip'd IDX files are decompressed exactly as far as their headers
say (and no further than `limits`), and must be the published dataset's bytes (SHA-256 of
each decompressed file) unless `data.own_dataset` says they are not meant to be.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd
from torchvision.datasets.utils import check_integrity, download_url

from ..errors import UserError
from . import limits as known
from .atomic import current_umask
from .limits import Limits
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
# SHA-256 of each decompressed file of the published Fashion-MNIST. Computed from Debian's
# dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), whose .gz files are zalando's
# with the gzip header's file name dropped and its time changed: putting back the name and
# the original time (2017-08-31 10:50:06 UTC for train-*, 10:50:27 for t10k-*) reproduces
# the four files torchvision downloads, byte for byte, with the MD5s torchvision publishes
# (tests/test_size_limits.py rebuilds them and checks both).
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CHUNK = 1 << 20
DATASETS = (*CIFAR, "fashion_mnist")


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def fetch(dataset: str, out_dir: str | os.PathLike, source: str | None = None,
          url: str | None = None, md5: str | None = None, own_dataset: bool | None = None,
          limits: Limits | None = None) -> Path:
    """Fill `out_dir` with the verified raw files of `dataset`; all or nothing.

    `source` is a local archive or folder (offline machines); otherwise `url` (default:
    torchvision's) is downloaded. `md5` defaults to torchvision's published checksum.
    `own_dataset` (data.own_dataset; None is false): a Fashion-MNIST folder in `source` is a
    dataset of one's own, not checked against the published digests. `limits` (default: the
    dataset's, `limits.DATASETS`) bound what extraction and decompression may produce.
    """
    check_dataset_name(dataset)
    limits = limits or known.DATASETS[dataset]
    _check_own(dataset, source, md5, own_dataset)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        if dataset in CIFAR:
            _fetch_cifar(CIFAR[dataset], staging, source, url, md5, limits)
        else:
            _fetch_fashion_mnist(staging, source, url, md5, bool(own_dataset), limits)
        _readable(dataset, staging, source or url or "the download", limits)
        if out_dir.exists():  # replaced only once the new files are verified
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _check_own(dataset: str, source, md5, own_dataset) -> None:
    if not own_dataset:
        return
    if source is None:
        raise UserError("data.own_dataset: applies to the files in data.source; a download is checked "
                        "with torchvision's MD5s")
    if dataset in CIFAR and md5 is None:
        raise UserError("data.own_dataset: a CIFAR archive of your own is checked with its MD5: "
                        "set data.md5")


def _readable(dataset: str, staging: Path, origin, limits: Limits) -> None:
    """Decode the staged files once (safely) before they count as fetched: a malformed or
    poisoned batch fails the download, named inside its archive, not a later job."""
    try:
        load_raw(dataset, staging, limits)
    except UserError as err:
        raise UserError(str(err).replace(f"{staging}{os.sep}", f"{origin}: ")) from None


def _fetch_cifar(spec: CifarSpec, staging: Path, source, url, md5, limits: Limits) -> None:
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
    extract_tar(archive, staging, where, limits)
    if source is None:
        archive.unlink()


def _fetch_fashion_mnist(staging: Path, source, url, md5, own: bool, limits: Limits) -> None:
    """The four .gz files, downloaded (torchvision's MD5 of each) or from a local folder,
    decompressed by `_decompress_idx`. Debian's dataset-fashion-mnist re-wrote the gzip
    headers, so a local folder's .gz MD5s cannot match; the decompressed bytes can, and must.
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
                download_url(base + filename, str(staging), filename=filename, md5=file_md5)
            except (RuntimeError, OSError) as err:
                raise UserError(f"data.url: {base + filename}: {err}") from None
            _decompress_idx(staging / filename, raw, "data.url", own, limits)
            (staging / filename).unlink()
        return
    folder = Path(source)
    if not folder.is_dir():
        raise UserError(f"data.source: {source}: not a folder with the four Fashion-MNIST .gz files")
    for filename in FASHION_FILES:
        gz = folder / filename
        if not gz.is_file():
            raise UserError(f"data.source: {gz}: missing")
        _decompress_idx(gz, raw, "data.source", own, limits)


def _read_exactly(src, n: int) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise EOFError(f"ends after {len(data)} of the {n} header bytes")
    return data


def _decompress_idx(gz: Path, raw: Path, where: str, own: bool, limits: Limits) -> None:
    """Decompress one gzip'd IDX file into `raw`, exactly as far as its header says: the magic
    (uint8, one dimension for labels, three for images) and its dimensions give the length,
    which must be within `limits`; that many bytes are streamed (1 MiB at a time), then the
    stream must end. The SHA-256 of what was read must be the published file's unless `own`."""
    name = gz.name.removesuffix(".gz")
    ndim = 3 if "images" in name else 1
    bound = limits.of(name)
    digest = hashlib.sha256()
    try:
        with gzip.open(gz, "rb") as src, open(raw / name, "wb") as dst:
            magic = _read_exactly(src, 4)
            if magic != bytes((0, 0, 0x08, ndim)):
                raise UserError(f"{where}: {gz}: not valid Fashion-MNIST IDX: magic {magic.hex()}, "
                                f"expected {bytes((0, 0, 0x08, ndim)).hex()} (uint8, {ndim} dimensions)")
            dims_bytes = _read_exactly(src, 4 * ndim)
            dims = tuple(int.from_bytes(dims_bytes[i:i + 4], "big") for i in range(0, 4 * ndim, 4))
            declared = known.idx_size(dims)
            if declared > bound:
                raise UserError(f"{where}: {gz}: member {name!r} declares {declared:,} bytes "
                                f"({' x '.join(map(str, dims))}), more than the {bound:,} it can hold; "
                                "nothing was kept")
            for block in (magic, dims_bytes):
                digest.update(block)
                dst.write(block)
            left = math.prod(dims)
            while left:
                block = src.read(min(CHUNK, left))
                if not block:
                    raise UserError(f"{where}: {gz}: not valid Fashion-MNIST IDX: member {name!r} ends after "
                                    f"{declared - left:,} of the {declared:,} bytes its header declares")
                digest.update(block)
                dst.write(block)
                left -= len(block)
            if src.read(1):
                raise UserError(f"{where}: {gz}: member {name!r} goes on past the {declared:,} bytes its "
                                f"header declares (at most {bound:,}); refused before the rest was read")
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{where}: {gz}: cannot decompress: {err}") from None
    found, expected = digest.hexdigest(), FASHION_SHA256[name]
    if not own and found != expected:
        raise UserError(f"{where}: {gz}: {name} is not the published Fashion-MNIST (SHA-256 {found[:16]}..., "
                        f"expected {expected[:16]}...); a dataset of your own in this format: set "
                        "data.own_dataset: true")


def load_raw(dataset: str, raw_dir: str | os.PathLike, limits: Limits | None = None) -> dict[str, np.ndarray]:
    """Read a folder filled by `fetch` into uint8 NHWC images, int64 labels and class names.
    A file over its bound in `limits` (default: the dataset's) is refused before it is read."""
    check_dataset_name(dataset)
    raw_dir = Path(raw_dir)
    limits = limits or known.DATASETS[dataset]
    if dataset in CIFAR:
        return _load_cifar(CIFAR[dataset], raw_dir / CIFAR[dataset].base_folder, limits)
    return _load_fashion_mnist(raw_dir, limits)


def _within(path: Path, limits: Limits) -> None:
    """Refuse `path` before reading it when it holds more than the dataset's file can."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # the reader names a missing file
    bound = limits.of(path.name)
    if size > bound:
        raise UserError(f"{path}: {size:,} bytes, more than the {bound:,} this file of the dataset can hold")


def _batch(path: Path, keys: tuple[str, ...], limits: Limits) -> dict:
    """A pickled CIFAR dict, read without running code, with `keys` present."""
    _within(path, limits)
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


def _cifar_batches(spec: CifarSpec, folder: Path, names, limits: Limits) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        batch = _batch(path, ("data", spec.label_key), limits)
        data, labels = _pixels(batch["data"], path), _labels(batch[spec.label_key], path, spec.label_key)
        if len(labels) != len(data):
            raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _class_names(spec: CifarSpec, folder: Path, limits: Limits) -> list[str]:
    path = folder / spec.meta_file
    names = _batch(path, (spec.names_key,), limits)[spec.names_key]
    if not (isinstance(names, list) and names and all(isinstance(n, (str, bytes)) for n in names)):
        raise UserError(f"{path}: {spec.names_key!r} must be a list of class names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _load_cifar(spec: CifarSpec, folder: Path, limits: Limits) -> dict[str, np.ndarray]:
    x_train, y_train = _cifar_batches(spec, folder, spec.train_files, limits)
    x_test, y_test = _cifar_batches(spec, folder, spec.test_files, limits)
    classes = _class_names(spec, folder, limits)
    return _checked(dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                         classes=np.array(classes)), folder)


def _load_fashion_mnist(raw_dir: Path, limits: Limits) -> dict[str, np.ndarray]:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = raw_dir / "FashionMNIST" / "raw"
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"
        _within(images, limits)
        _within(labels, limits)
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
