"""Issue 19: a file handed in cannot exhaust the disk or the memory.

Each bomb is built small on disk here (zeros compress about a thousandfold), with the bound
lowered through the `limits` parameter so that the suite stays fast; two cases run at the
real bounds in a subprocess whose file-size limit (RLIMIT_FSIZE) is the bound itself, so
that one byte written beyond it would fail the write instead of the check. Last, the
Fashion-MNIST digests recorded in the code are cross-checked against torchvision's MD5s.
"""

from __future__ import annotations

import gzip
import hashlib
import resource
import signal
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import Member, cifar10_members, pickled_members, write_tar
from conftest import ENV
from torchvision import datasets as tvd

from cifar_ensembles.config.spec import SourceSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import limits
from cifar_ensembles.files.limits import Limits
from cifar_ensembles.files.raw_data import FASHION_FILES, FASHION_SHA256, fetch, load_raw
from cifar_ensembles.stages import shift

F10 = "cifar-10-batches-py"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SMALL = Limits({f"data_batch_{b}": 100_000 for b in range(1, 6)} | {"test_batch": 100_000},
               other=20_000, total=700_000, count=64)


@pytest.fixture(scope="module")
def batches() -> dict:
    return cifar10_members(per_batch=10, test_size=20)


def cifar_archive(folder: Path, batches: dict, *extra: Member,
                  replace: dict | None = None) -> tuple[Path, str]:
    """A tiny cifar-10-python.tar.gz with `replace`d members (Member objects) and `extra` ones last."""
    members = [replace.get(m.name.rsplit("/", 1)[-1], m) if replace else m
               for m in pickled_members(F10, batches)]
    path = folder / "cifar-10-python.tar.gz"
    return path, write_tar(path, [*members, *extra])


def nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a refused fetch"
    assert [p.name for p in out.parent.iterdir()] == [], "a staging folder was left behind"


def one_line(err: pytest.ExceptionInfo, *expected: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for text in expected:
        assert text in message, (text, message)
    return message


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "raw").mkdir()
    return tmp_path / "raw" / "dataset"


# ------------------------------------------------------------------ CIFAR archives
def test_member_that_declares_more_than_a_batch_can_hold(tmp_path, batches, out):
    """data_batch_1 declares 2 MB of zeros (a few KB packed): refused at its header, before
    its data is decompressed, and with it every member (none was written)."""
    bomb = Member(f"{F10}/data_batch_1", zeros=2_000_000)
    archive, md5 = cifar_archive(tmp_path, batches, replace={"data_batch_1": bomb})
    assert archive.stat().st_size < 400_000  # the noisy tiny batches; the bomb adds a few KB
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, source=str(archive), md5=md5, limits=SMALL)
    assert one_line(err, f"data.source: {archive}: member '{F10}/data_batch_1' declares 2,000,000 bytes, "
                         "more than the 100,000 it can hold; nothing was extracted")
    nothing_left(out)


def test_members_that_together_exceed_the_dataset(tmp_path, batches, out):
    """Each extra member within its own bound (20 KB), together past the whole dataset's."""
    extra = [Member(f"{F10}/extra_{i}", zeros=19_000) for i in range(40)]
    archive, md5 = cifar_archive(tmp_path, batches, *extra)
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, source=str(archive), md5=md5, limits=SMALL)
    one_line(err, f"data.source: {archive}: member '{F10}/extra_", "brings the extracted size to",
             "more than the 700,000 the dataset can hold; nothing was extracted")
    nothing_left(out)


def test_hard_links_count_as_copies(tmp_path, batches, out):
    """tarfile copies a hard link's target where linking fails: each counts its target's size."""
    links = [Member(f"{F10}/copy_{i}", kind="hardlink", target=f"{F10}/data_batch_1") for i in range(12)]
    archive, md5 = cifar_archive(tmp_path, batches, *links)
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, source=str(archive), md5=md5, limits=SMALL)
    one_line(err, "member 'cifar-10-batches-py/copy_", "brings the extracted size to")
    nothing_left(out)


def test_archive_of_many_empty_members(tmp_path, batches, out):
    """At the real bound: 64 members at most (the upstream archive has 8 and a folder)."""
    empty = [Member(f"{F10}/d{i}", kind="dir") for i in range(100)]
    archive, md5 = cifar_archive(tmp_path, batches, *empty)
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, source=str(archive), md5=md5)
    one_line(err, f"member '{F10}/d", "is member 65, more than the 64 an archive of the dataset may hold")
    nothing_left(out)


def test_extended_header_held_in_memory_is_bounded(tmp_path, batches, out):
    """A pax header is read into memory whole by tarfile: 1 MiB at most, refused before."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"{F10}/data_batch_1")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tar.addfile(info)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, source=str(archive), md5=md5)
    one_line(err, f"data.source: {archive}: an extended header (pax or long name) declares",
             "more than the 1,048,576 it can hold")
    nothing_left(out)


def test_real_archive_within_the_bounds_is_extracted(tmp_path, batches, out):
    archive, md5 = cifar_archive(tmp_path, batches)
    assert fetch("cifar10", out, source=str(archive), md5=md5) == out
    assert load_raw("cifar10", out)["x_train"].shape == (50, 32, 32, 3)


def test_raw_file_grown_after_the_fetch_is_not_read(tmp_path, batches, out):
    """resources/raw edited by hand: a batch over its bound is refused before it is unpickled."""
    archive, md5 = cifar_archive(tmp_path, batches)
    fetch("cifar10", out, source=str(archive), md5=md5)
    batch = out / F10 / "data_batch_3"
    with open(batch, "ab") as f:
        f.truncate(200_000)
    with pytest.raises(UserError) as err:
        load_raw("cifar10", out, SMALL)
    one_line(err, f"{batch}: 200,000 bytes, more than the 100,000 this file of the dataset can hold")


# ------------------------------------------------------------------ Fashion-MNIST IDX streams
def idx_gz(path: Path, dims: tuple[int, ...], extra: int = 0, magic: int | None = None) -> None:
    """A gzip'd uint8 IDX file: its header, the data its dims declare (random), then `extra` zeros."""
    magic = 0x0800 + len(dims) if magic is None else magic
    rng = np.random.default_rng(0)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(struct.pack(">i", magic) + struct.pack(f">{len(dims)}i", *dims))
        left = int(np.prod(dims))
        while left:
            n = min(left, 1 << 20)
            f.write(rng.integers(0, 10, n, dtype=np.uint8).tobytes())
            left -= n
        while extra:
            n = min(extra, 1 << 20)
            f.write(bytes(n))
            extra -= n


def fake_fashion(folder: Path, images: dict | None = None) -> Path:
    """24 / 12 images in the four files; `images` replaces the train images' (dims, extra)."""
    folder.mkdir(parents=True, exist_ok=True)
    dims, extra = images or ((24, 28, 28), 0)
    idx_gz(folder / "train-images-idx3-ubyte.gz", dims, extra)
    idx_gz(folder / "train-labels-idx1-ubyte.gz", (24,))
    idx_gz(folder / "t10k-images-idx3-ubyte.gz", (12, 28, 28))
    idx_gz(folder / "t10k-labels-idx1-ubyte.gz", (12,))
    return folder


FASHION_SMALL = Limits({"train-images-idx3-ubyte": 16 + 24 * 784, "train-labels-idx1-ubyte": 8 + 24,
                        "t10k-images-idx3-ubyte": 16 + 12 * 784, "t10k-labels-idx1-ubyte": 8 + 12},
                       other=0, total=10**6, count=4)


def test_idx_stream_that_goes_on_past_its_header(tmp_path, out):
    """A valid header (24 x 28 x 28) and then 3 MB of zeros: the declared bytes are read, the
    next one is refused, and the file is not kept."""
    src = fake_fashion(tmp_path / "src", images=((24, 28, 28), 3_000_000))
    gz = src / "train-images-idx3-ubyte.gz"
    with pytest.raises(UserError) as err:
        fetch("fashion_mnist", out, source=str(src), own_dataset=True, limits=FASHION_SMALL)
    one_line(err, f"data.source: {gz}: member 'train-images-idx3-ubyte' goes on past the 18,832 bytes its "
                  "header declares (at most 18,832); refused before the rest was read")
    nothing_left(out)


def test_idx_header_that_declares_more_than_the_dataset(tmp_path, out):
    """48 x 28 x 28 declared where 24 images is the (lowered) bound: refused at the header."""
    src = fake_fashion(tmp_path / "src", images=((48, 28, 28), 0))
    with pytest.raises(UserError) as err:
        fetch("fashion_mnist", out, source=str(src), own_dataset=True, limits=FASHION_SMALL)
    one_line(err, "member 'train-images-idx3-ubyte' declares 37,648 bytes (48 x 28 x 28), more than the "
                  "18,832 it can hold; nothing was kept")
    nothing_left(out)


def test_idx_header_beyond_the_real_bound(tmp_path, out):
    """At the real bound: 70,000 training images declared (60,000 at most), refused at once."""
    src = fake_fashion(tmp_path / "src", images=((70_000, 28, 28), 0))
    src.joinpath("train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">4i", 0x0803, 70_000, 28, 28) + bytes(1000)))
    with pytest.raises(UserError) as err:
        fetch("fashion_mnist", out, source=str(src), own_dataset=True)
    one_line(err, "declares 54,880,016 bytes (70000 x 28 x 28), more than the 47,040,016 it can hold")
    nothing_left(out)


def limited_cli(max_bytes: int, *args) -> subprocess.CompletedProcess:
    """`cifar-ensembles ARGS` where no file may grow past `max_bytes` (writes beyond fail
    with EFBIG; SIGXFSZ, which would kill the process instead, is ignored)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run([sys.executable, "-m", "cifar_ensembles.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)


def download(source: Path, out: Path, md5: str | None = None, own: bool = False) -> list:
    from cifar_ensembles.config.convert import to_json

    spec = SourceSpec(source=str(source), url=None, md5=md5, own_dataset=own)
    return ["download", "--dataset", "fashion_mnist" if source.is_dir() else "cifar10",
            "--spec", to_json(spec), "--out", out]


def single_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_real_bounds_write_nothing_beyond_them(tmp_path):
    """At the real bounds, through the command, with every file limited to the bound itself:
    a train-images stream of 60,000 x 28 x 28 followed by 8 MB of zeros is written up to its
    47,040,016 declared bytes and refused at the next one (a byte more would have failed the
    write with EFBIG instead); a data_batch_1 declaring one byte over its 64,000,000 is refused
    before anything is written."""
    bound = limits.DATASETS["fashion_mnist"].of("train-images-idx3-ubyte")
    src = fake_fashion(tmp_path / "src", images=((60_000, 28, 28), 8 << 20))
    out = tmp_path / "raw" / "fashion_mnist"
    single_error(limited_cli(bound, *download(src, out, own=True)),
                 f"member 'train-images-idx3-ubyte' goes on past the {bound:,} bytes")
    assert not out.exists() and list(out.parent.iterdir()) == []

    bound = limits.DATASETS["cifar10"].of("data_batch_1")
    bomb = Member(f"{F10}/data_batch_1", zeros=bound + 1)
    archive, md5 = cifar_archive(tmp_path, cifar10_members(per_batch=10, test_size=20),
                                 replace={"data_batch_1": bomb})
    out = tmp_path / "raw10" / "cifar10"
    single_error(limited_cli(bound, *download(archive, out, md5)),
                 f"member '{F10}/data_batch_1' declares {bound + 1:,} bytes, more than the {bound:,}")
    assert not out.exists() and list(out.parent.iterdir()) == []


# ------------------------------------------------------------------ a local CIFAR-10-C
C_SMALL = Limits({"fog.npy": 5 * 10 * 3072 + 128, "labels.npy": 50 * 8 + 128}, other=20_000,
                 total=10**6, count=8)


def cifar10c_folder(folder: Path, images: int = 50) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "fog.npy", np.zeros((images, 32, 32, 3), np.uint8))
    np.save(folder / "labels.npy", np.arange(50) % 10)
    return folder


def test_cifar10c_file_over_its_bound(tmp_path):
    folder = cifar10c_folder(tmp_path / "c", images=60)
    with pytest.raises(UserError) as err:
        shift._cifar10c_array(str(folder), None, "fog", C_SMALL)
    one_line(err, f"shift.source: {folder / 'fog.npy'}: 184,448 bytes, more than the 153,728 it can hold")
    assert shift._cifar10c_array(str(cifar10c_folder(tmp_path / "ok")), None, "fog", C_SMALL)[0].shape == (
        50, 32, 32, 3)


def test_cifar10c_member_over_its_bound(tmp_path):
    """A CIFAR-10-C.tar.gz whose fog.npy declares 50 MB of zeros: refused at its header."""
    archive = tmp_path / "CIFAR-10-C.tar.gz"
    md5 = write_tar(archive, [Member("CIFAR-10-C/labels.npy", b"x"),
                              Member("CIFAR-10-C/fog.npy", zeros=50 << 20)])
    with pytest.raises(UserError) as err:
        shift._cifar10c_array(str(archive), md5, "fog", C_SMALL)
    one_line(err, f"shift.source: {archive}: member 'CIFAR-10-C/fog.npy' declares 52,428,800 bytes, more "
                  "than the 153,728 it can hold; nothing was read")


def test_cifar10c_array_header_over_the_real_bound(tmp_path):
    """At the real bound: an .npy of 128 bytes whose header declares 10^6 x 32 x 32 x 3 images is
    refused before numpy allocates them (from a folder and from an archive)."""
    folder = cifar10c_folder(tmp_path / "c")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 32, 32, 3), np.uint8))
    header["shape"] = (10**6, 32, 32, 3)
    with open(folder / "fog.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    with pytest.raises(UserError) as err:
        shift._cifar10c_array(str(folder), None, "fog")
    one_line(err, "fog.npy: declares 3,072,000,128 bytes (1000000 x 32 x 32 x 3 uint8), more than the "
                  f"{limits.CIFAR10_C_ARRAY:,} it can hold")
    archive = tmp_path / "CIFAR-10-C.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("fog.npy", "labels.npy"):
            tar.add(folder / name, arcname=f"CIFAR-10-C/{name}")
    with pytest.raises(UserError) as err:
        shift._cifar10c_array(str(archive), hashlib.md5(archive.read_bytes()).hexdigest(), "fog")
    one_line(err, f"{archive}:CIFAR-10-C/fog.npy: declares 3,072,000,128 bytes")


# ------------------------------------------------------------------ exact Fashion-MNIST
ORIGINAL_MTIME = {"train": 1504176606, "t10k": 1504176627}  # 2017-08-31 10:50:06 / 10:50:27 UTC


def test_recorded_digests_are_the_published_files(tmp_path):
    """Debian's .gz files are zalando's with the gzip header's file name dropped and its time
    changed; restored, they are the files torchvision downloads (its MD5s), and their
    decompressed bytes have the SHA-256 digests raw_data records. A folder of those original
    files is accepted too (the digests are of the decompressed bytes, whatever the gzip)."""
    if not all((FASHION_DIR / name).is_file() for name in FASHION_FILES):
        pytest.fail(f"Fashion-MNIST missing from {FASHION_DIR}: apt-get install dataset-fashion-mnist")
    folder = tmp_path / "original"
    folder.mkdir()
    for filename, md5 in tvd.FashionMNIST.resources:
        debian = (FASHION_DIR / filename).read_bytes()
        assert debian[:4] == b"\x1f\x8b\x08\x00"  # deflate, no file name
        stem = filename.removesuffix(".gz")
        original = (b"\x1f\x8b\x08\x08" + struct.pack("<I", ORIGINAL_MTIME[stem[:stem.index("-")]])
                    + debian[8:10] + stem.encode() + b"\0" + debian[10:])
        assert hashlib.md5(original).hexdigest() == md5, filename
        assert hashlib.sha256(gzip.decompress(debian)).hexdigest() == FASHION_SHA256[stem]
        (folder / filename).write_bytes(original)
    out = tmp_path / "raw" / "fashion_mnist"
    assert fetch("fashion_mnist", out, source=str(folder)) == out


def test_a_changed_byte_is_not_the_published_dataset(tmp_path, out):
    """One pixel changed in Debian's train images: refused, one line; accepted as one's own."""
    src = tmp_path / "src"
    src.mkdir()
    for name in FASHION_FILES:
        data = gzip.decompress((FASHION_DIR / name).read_bytes())
        if name.startswith("train-images"):
            data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        (src / name).write_bytes(gzip.compress(data, compresslevel=1))
    with pytest.raises(UserError) as err:
        fetch("fashion_mnist", out, source=str(src))
    expected = FASHION_SHA256["train-images-idx3-ubyte"][:16]
    one_line(err, f"data.source: {src / 'train-images-idx3-ubyte.gz'}: train-images-idx3-ubyte is not the "
                  "published Fashion-MNIST (SHA-256", f"expected {expected}...", "set data.own_dataset: true")
    nothing_left(out)
    assert fetch("fashion_mnist", out, source=str(src), own_dataset=True) == out
