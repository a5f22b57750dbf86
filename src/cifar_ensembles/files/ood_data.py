"""The raw images of out-of-distribution sets, and the prepared OOD set files.

Sources that are files follow the rules of `raw_data`: downloaded with torchvision's helper
and its published MD5, or read from a local file or folder (`ood.sets.<name>.source`), the
same MD5 applying unless the user gives their own (`md5`); every file is bounded before it
is read and read without running code.

- SVHN (`svhn`): torchvision's `test_32x32.mat`, a MATLAB 5 file. Its variable headers are
  read first (`scipy.io.whosmat`: names, shapes and classes, no data): X must be a uint8
  32 x 32 x 3 x N array with N at most SVHN's 26,032 test images; only then is X read
  (`scipy.io.loadmat`, which builds arrays and never runs code; MATLAB objects and function
  handles are refused by the class check first). A MATLAB 7.3 file (HDF5) is refused.
- CIFAR-100 (`cifar100`): the archive the data stage reads (`raw_data.fetch`: MD5, safe
  extraction within `limits`, pickles read as plain data); its test split is used.
- scikit-learn's handwritten digits (`digits`): shipped with scikit-learn, nothing to fetch.

A prepared set (`resources/<dataset>/ood/<set>.npz`) holds `x`, N x H x W x C uint8 images of
the test split's shape.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from .arrays import npy_header
from .atomic import save_npz
from .records import DamagedFile, error_line

SVHN_TEST_IMAGES = 26_032
SVHN_IMAGE = 32 * 32 * 3
# The file's bound: X stored uncompressed (a .mat of one's own may be), y as float64, and
# 1 MiB of headers; torchvision's (compressed) file is 64,275,384 bytes.
SVHN_FILE_BOUND = SVHN_TEST_IMAGES * (SVHN_IMAGE + 8) + (1 << 20)


def _svhn_file(name: str, source, url, md5, staging: Path) -> Path:
    """test_32x32.mat, downloaded into `staging` or the local file, its MD5 checked."""
    from torchvision import datasets as tvd
    from torchvision.datasets.utils import check_integrity, download_url

    default_url, filename, default_md5 = tvd.SVHN.split_list["test"]
    md5 = md5 or default_md5
    where = f"ood.sets.{name}"
    if source is None:
        url = url or default_url
        try:
            download_url(url, str(staging), filename=filename, md5=md5)
        except RuntimeError as err:  # torchvision's MD5 mismatch
            raise UserError(f"{where}.url: {url}: {err}") from None
        except OSError as err:
            raise UserError(f"{where}.url: cannot download {url}: {err}") from None
        return staging / filename
    path = Path(source)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise UserError(f"{where}.source: {path}: no such file (expected SVHN's {filename})")
    size = path.stat().st_size
    if size > SVHN_FILE_BOUND:
        raise UserError(f"{where}.source: {path}: {size:,} bytes, more than the {SVHN_FILE_BOUND:,} "
                        "SVHN's test split can take; nothing was read")
    if not check_integrity(str(path), md5):
        raise UserError(f"{where}.source: {path}: checksum mismatch (expected MD5 {md5}); the file is "
                        "corrupt, truncated or not SVHN's test split (a file of your own: set its md5)")
    return path


MAT_COMPRESSED = 15  # MATLAB 5's miCOMPRESSED data element: a zlib stream


def check_mat_inflation(path: Path, bound: int, where: str) -> None:
    """Every top-level data element of a MATLAB 5 file holds at most `bound` bytes in all, its
    zlib streams counted while they are inflated 1 MiB at a time and nothing kept: scipy would
    allocate what a compressed element declares (a 1 MB file can inflate to gigabytes)."""
    total, step, size = 0, 1 << 20, path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(128)
        if len(header) < 128 or header[126:128] not in (b"IM", b"MI"):
            raise UserError(f"{where}: {path}: not a readable MATLAB 5 file (no MATLAB 5 header)")
        endian = "<" if header[126:128] == b"IM" else ">"
        while len(tag := f.read(8)) == 8:
            kind, nbytes = struct.unpack(endian + "II", tag)
            if kind != MAT_COMPRESSED:
                if f.tell() + nbytes > size:
                    raise UserError(f"{where}: {path}: not a readable MATLAB 5 file (an element declares "
                                    f"{nbytes:,} bytes past the end of the file)")
                total += nbytes
                f.seek(nbytes + (-nbytes % 8), os.SEEK_CUR)
            else:
                inflater, left = zlib.decompressobj(), nbytes
                while left > 0 and (chunk := f.read(min(left, step))):
                    left -= len(chunk)
                    while chunk and total <= bound:
                        try:
                            total += len(inflater.decompress(chunk, step))
                        except zlib.error as err:
                            raise UserError(f"{where}: {path}: not a readable MATLAB 5 file "
                                            f"(a damaged compressed element: {err})") from None
                        chunk = inflater.unconsumed_tail
            if total > bound:
                raise UserError(f"{where}: {path}: its data elements hold more than {bound:,} bytes "
                                "(more than SVHN's test split can take); refused before they were read")


def read_svhn_mat(path: str | os.PathLike, where: str) -> np.ndarray:
    """SVHN's X from a MATLAB 5 file as N x 32 x 32 x 3 uint8: headers checked before data."""
    import scipy.io

    path = Path(path)
    size = path.stat().st_size
    if size > SVHN_FILE_BOUND:
        raise UserError(f"{where}: {path}: {size:,} bytes, more than the {SVHN_FILE_BOUND:,} SVHN's "
                        "test split can take; nothing was read")
    check_mat_inflation(path, SVHN_FILE_BOUND, where)
    try:
        headers = {n: (tuple(shape), cls) for n, shape, cls in scipy.io.whosmat(str(path))}
    except NotImplementedError:
        raise UserError(f"{where}: {path}: a MATLAB 7.3 (HDF5) file; SVHN's is MATLAB 5") from None
    except Exception as err:  # scipy raises ValueError, TypeError, OSError, ... on a damaged file
        raise UserError(f"{where}: {path}: not a readable MATLAB 5 file ({error_line(err)})") from None
    if "X" not in headers:
        raise UserError(f"{where}: {path}: no variable X (SVHN's images); has {sorted(headers) or 'none'}")
    shape, cls = headers["X"]
    if cls != "uint8" or len(shape) != 4 or shape[:3] != (32, 32, 3) or not 0 < shape[3] <= SVHN_TEST_IMAGES:
        raise UserError(f"{where}: {path}: X must be uint8 32 x 32 x 3 x N with N at most "
                        f"{SVHN_TEST_IMAGES:,}, got {cls} {' x '.join(map(str, shape))}")
    try:
        x = scipy.io.loadmat(str(path), variable_names=["X"], mat_dtype=False, squeeze_me=False)["X"]
    except Exception as err:
        raise UserError(f"{where}: {path}: cannot read X ({error_line(err)})") from None
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape == shape):
        raise UserError(f"{where}: {path}: X is not the uint8 {' x '.join(map(str, shape))} "
                        "its header declares")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


def load_svhn(name: str, source, url, md5) -> np.ndarray:
    staging = Path(tempfile.mkdtemp(prefix=".ood-svhn."))
    try:
        path = _svhn_file(name, source, url, md5, staging)
        return read_svhn_mat(path, f"ood.sets.{name}." + ("source" if source else "url"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_cifar100_test(name: str, source, url, md5) -> np.ndarray:
    """CIFAR-100's test images (N x 32 x 32 x 3 uint8), read as the data stage reads its archive."""
    from .raw_data import fetch, load_raw

    staging = Path(tempfile.mkdtemp(prefix=".ood-cifar100."))
    try:
        raw = fetch("cifar100", staging / "raw", source=source, url=url, md5=md5)
        return load_raw("cifar100", raw)["x_test"]
    except UserError as err:  # the data stage names its own keys; here they are the set's
        text = str(err).replace("data.source", f"ood.sets.{name}.source")
        text = text.replace("data.url", f"ood.sets.{name}.url").replace("data.md5", f"ood.sets.{name}.md5")
        if not text.startswith(f"ood.sets.{name}."):  # a batch named by its file: the set's source
            text = f"ood.sets.{name}.{'source' if source else 'url'}: {text}"
        raise UserError(text) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_digits() -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits as 8 x 8 x 1 uint8 (their 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = sklearn_digits().images  # N x 8 x 8 floats, 0..16, ink high
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]


# ------------------------------------------------------------------ prepared sets
def save_ood_set(path, x: np.ndarray, index: np.ndarray) -> None:
    save_npz(path, x=x, index=index)


def load_ood_set(path, shape: tuple[int, ...] | None = None, images: bool = True):
    """A prepared OOD set's images (N x H x W x C uint8), checked; `shape`: the H x W x C it must
    have. Without `images` (the analyses only count them) x's header is checked and its shape
    returned, its data left unread."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            x = npz["x"] if images else None
            found, dtype = (x.shape, x.dtype) if images else npy_header(npz, "x")
    except FileNotFoundError:
        raise DamagedFile(path, "missing") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedFile(path, f"not a prepared OOD set ({error_line(err)})") from None
    if not (dtype == np.uint8 and len(found) == 4 and found[0] and found[-1] in (1, 3)
            and (shape is None or tuple(found[1:]) == tuple(shape))):
        raise DamagedFile(path, f"damaged OOD set (x {dtype} {tuple(found)}"
                                + (f", expected N x {' x '.join(map(str, shape))})" if shape else ")"))
    return x if images else tuple(found)
