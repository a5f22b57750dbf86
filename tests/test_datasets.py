"""raw_data.fetch / load_raw: local archives, loopback HTTP, corruption, Fashion-MNIST folders."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import CLASSES, make_cifar10_archive

from cifar_ensembles.config.spec import SourceSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files.raw_data import FASHION_FILES, fetch, load_raw
from cifar_ensembles.stages.download import download_dataset

ARCHIVE = "cifar-10-python.tar.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ---------------------------------------------------------------------------------------------
# helpers


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def decode_cifar_archive(path: Path) -> dict[str, np.ndarray]:
    """Read the pickles straight from the tar and decode the channel-major rows by hand."""
    batches = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            batches[Path(member.name).name] = pickle.loads(tar.extractfile(member).read(), encoding="latin1")

    def decode(names):
        rows = np.concatenate([np.asarray(batches[n]["data"], dtype=np.uint8) for n in names])
        labels = np.concatenate([np.asarray(batches[n]["labels"]) for n in names])
        images = np.empty((len(rows), 32, 32, 3), dtype=np.uint8)
        for channel in range(3):  # R plane, then G, then B, each 32 x 32 row-major
            images[..., channel] = rows[:, channel * 1024:(channel + 1) * 1024].reshape(-1, 32, 32)
        return rows, images, labels

    train_rows, x_train, y_train = decode([f"data_batch_{b}" for b in range(1, 6)])
    test_rows, x_test, y_test = decode(["test_batch"])
    return dict(train_rows=train_rows, x_train=x_train, y_train=y_train,
                test_rows=test_rows, x_test=x_test, y_test=y_test,
                classes=batches["batches.meta"]["label_names"])


def dot_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a failed fetch"
    assert dot_entries(out.parent) == [], "temporary staging folders were left behind"


def corrupt(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "flip":
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    else:
        raise AssertionError(how)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst


def assert_cifar_matches(arrays: dict[str, np.ndarray], archive: Path) -> None:
    expected = decode_cifar_archive(archive)
    assert arrays["x_train"].dtype == np.uint8 and arrays["x_test"].dtype == np.uint8
    assert arrays["y_train"].dtype == np.int64 and arrays["y_test"].dtype == np.int64
    assert arrays["x_train"].shape == (len(expected["y_train"]), 32, 32, 3)
    assert arrays["x_test"].shape == (len(expected["y_test"]), 32, 32, 3)
    assert arrays["x_train"].flags["C_CONTIGUOUS"]
    assert list(arrays["classes"]) == CLASSES == expected["classes"]
    np.testing.assert_array_equal(arrays["y_train"], expected["y_train"])
    np.testing.assert_array_equal(arrays["y_test"], expected["y_test"])
    np.testing.assert_array_equal(arrays["x_train"], expected["x_train"])
    np.testing.assert_array_equal(arrays["x_test"], expected["x_test"])
    # a few pixels against the raw row layout: row[c * 1024 + h * 32 + w]
    rows = expected["train_rows"]
    for i, h, w, c in [(0, 0, 0, 0), (3, 5, 7, 1), (len(rows) - 1, 31, 31, 2), (17, 31, 0, 2)]:
        assert arrays["x_train"][i, h, w, c] == rows[i, c * 1024 + h * 32 + w]


def write_idx_gz(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """IDX: big-endian int32 magic (0x08 = uint8 in byte 3, ndim in byte 4), int32 dims, raw data."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 + array.ndim  # 2051 for N x 28 x 28 images, 2049 for labels
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def make_fake_fashion(folder: Path, n_train: int = 24, n_test: int = 12, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                  y_train=np.arange(n_train) % 10,
                  x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                  y_test=(np.arange(n_test) * 3) % 10)
    write_idx_gz(folder / "train-images-idx3-ubyte.gz", arrays["x_train"])
    write_idx_gz(folder / "train-labels-idx1-ubyte.gz", arrays["y_train"])
    write_idx_gz(folder / "t10k-images-idx3-ubyte.gz", arrays["x_test"])
    write_idx_gz(folder / "t10k-labels-idx1-ubyte.gz", arrays["y_test"])
    return arrays


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("tiny_cifar") / ARCHIVE
    md5 = make_cifar10_archive(path, per_batch=30, test_size=40, seed=3)
    assert md5 == md5_of(path)
    return path, md5


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder whose parent holds nothing else (to spot leftover staging folders)."""
    parent = tmp_path / "raw"
    parent.mkdir()
    return parent / "cifar10"


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A loopback HTTP server on an ephemeral port serving a temporary folder."""
    root = tmp_path_factory.mktemp("http_root")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 from a local archive


def test_fetch_cifar_from_archive_file(tiny_cifar, out):
    archive, md5 = tiny_cifar
    result = fetch("cifar10", out, source=str(archive), md5=md5)
    assert Path(result) == out
    assert (out / "cifar-10-batches-py").is_dir()
    names = {p.name for p in (out / "cifar-10-batches-py").iterdir()}
    assert {f"data_batch_{b}" for b in range(1, 6)} | {"test_batch", "batches.meta"} <= names
    assert dot_entries(out.parent) == []
    arrays = load_raw("cifar10", out)
    assert arrays["x_train"].shape == (150, 32, 32, 3)
    assert arrays["x_test"].shape == (40, 32, 32, 3)
    assert_cifar_matches(arrays, archive)


def test_fetch_cifar_from_folder(tiny_cifar, out):
    archive, md5 = tiny_cifar
    fetch("cifar10", out, source=str(archive.parent), md5=md5)
    assert_cifar_matches(load_raw("cifar10", out), archive)


def test_fetch_accepts_path_objects_and_replaces_stale_output(tiny_cifar, out):
    archive, md5 = tiny_cifar
    out.mkdir()
    (out / "stale.txt").write_text("old")
    fetch("cifar10", out, source=archive, md5=md5)
    assert not (out / "stale.txt").exists()
    assert (out / "cifar-10-batches-py" / "test_batch").is_file()


def test_folder_without_archive_is_rejected(tmp_path, out):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no such archive") as err:
        fetch("cifar10", out, source=str(empty), md5="0" * 32)
    assert ARCHIVE in str(err.value)
    assert_nothing_left(out)


def test_missing_source_file_is_rejected(tmp_path, out):
    missing = tmp_path / "nowhere" / ARCHIVE
    with pytest.raises(UserError, match="data.source") as err:
        fetch("cifar10", out, source=str(missing), md5="0" * 32)
    assert str(missing) in str(err.value)
    assert_nothing_left(out)


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_corrupt_archive_file_is_rejected(tiny_cifar, tmp_path, out, how):
    archive, md5 = tiny_cifar
    bad = corrupt(archive, tmp_path / "bad" / ARCHIVE, how)
    with pytest.raises(UserError, match="checksum") as err:
        fetch("cifar10", out, source=str(bad), md5=md5)
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)
    assert_nothing_left(out)


def test_corrupt_archive_in_folder_is_rejected(tiny_cifar, tmp_path, out):
    archive, md5 = tiny_cifar
    bad = corrupt(archive, tmp_path / "bad" / ARCHIVE, "flip")
    with pytest.raises(UserError, match="checksum"):
        fetch("cifar10", out, source=str(bad.parent), md5=md5)
    assert_nothing_left(out)


def test_failed_fetch_keeps_previous_verified_output(tiny_cifar, tmp_path, out):
    """All or nothing: a bad new source leaves the earlier verified files as they were."""
    archive, md5 = tiny_cifar
    fetch("cifar10", out, source=str(archive), md5=md5)
    before = {p.name: p.read_bytes() for p in (out / "cifar-10-batches-py").iterdir()}
    bad = corrupt(archive, tmp_path / "bad" / ARCHIVE, "truncate")
    with pytest.raises(UserError, match="checksum"):
        fetch("cifar10", out, source=str(bad), md5=md5)
    assert {p.name: p.read_bytes() for p in (out / "cifar-10-batches-py").iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_wrong_md5_with_intact_archive_is_rejected(tiny_cifar, out):
    archive, md5 = tiny_cifar
    wrong = "0123456789abcdef0123456789abcdef"
    assert wrong != md5
    with pytest.raises(UserError, match="checksum") as err:
        fetch("cifar10", out, source=str(archive), md5=wrong)
    assert wrong in str(err.value)
    assert_nothing_left(out)


def test_default_md5_is_torchvisions(tiny_cifar, out):
    """Without md5 the published CIFAR-10 checksum applies, which the tiny archive cannot match."""
    archive, _ = tiny_cifar
    with pytest.raises(UserError, match="c58f30108f718f92721af3b95e74349a"):
        fetch("cifar10", out, source=str(archive))
    assert_nothing_left(out)


def test_matching_md5_but_not_a_tar_is_rejected(tmp_path, out):
    junk = tmp_path / "junk" / ARCHIVE
    junk.parent.mkdir()
    junk.write_bytes(b"this is not a gzip'd tar at all" * 10)
    with pytest.raises(UserError, match="cannot extract"):
        fetch("cifar10", out, source=str(junk), md5=md5_of(junk))
    assert_nothing_left(out)


def test_archive_missing_a_batch_fails_at_fetch(tmp_path, out):
    """A checksummed archive whose layout is wrong: fetch decodes it before it counts as fetched,
    names the missing member inside the archive, and leaves no raw folder."""
    full = tmp_path / "full" / ARCHIVE
    make_cifar10_archive(full, per_batch=5, test_size=10)
    partial = tmp_path / "partial" / ARCHIVE
    partial.parent.mkdir()
    with tarfile.open(full, "r:gz") as src, tarfile.open(partial, "w:gz") as dst:
        for member in src.getmembers():
            if not member.name.endswith("data_batch_3"):
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(UserError, match="data_batch_3"):
        fetch("cifar10", out, source=str(partial), md5=md5_of(partial))
    assert not out.exists()


def test_unknown_dataset_is_rejected(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        fetch("mnist", tmp_path / "x", source=str(tmp_path))
    with pytest.raises(UserError, match="unknown dataset"):
        load_raw("imagenet", tmp_path)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# CIFAR-10 over loopback HTTP (torchvision's download_and_extract_archive with the MD5 check)


def test_fetch_cifar_over_http(tiny_cifar, http_root, out, no_proxy):
    archive, md5 = tiny_cifar
    base, root = http_root
    (root / "good").mkdir(exist_ok=True)
    (root / "good" / ARCHIVE).write_bytes(archive.read_bytes())
    fetch("cifar10", out, url=f"{base}/good/{ARCHIVE}", md5=md5)
    assert (out / "cifar-10-batches-py").is_dir()
    assert dot_entries(out.parent) == []
    assert_cifar_matches(load_raw("cifar10", out), archive)


def test_download_stage_takes_url_and_md5_from_its_spec(tiny_cifar, http_root, out, no_proxy):
    archive, md5 = tiny_cifar
    base, root = http_root
    (root / "stage").mkdir(exist_ok=True)
    (root / "stage" / ARCHIVE).write_bytes(archive.read_bytes())
    url = f"{base}/stage/{ARCHIVE}"
    # the spec's md5 is the one checked: a wrong one fails, the tiny archive's own passes
    # (torchvision's would not)
    with pytest.raises(UserError, match="data.url") as err:
        download_dataset("cifar10", SourceSpec(source=None, url=url, md5="f" * 32, own_dataset=False), out)
    assert url in str(err.value)
    assert_nothing_left(out)
    spec = SourceSpec(source=None, url=url, md5=md5, own_dataset=False)
    assert download_dataset("cifar10", spec, out) == out
    assert_cifar_matches(load_raw("cifar10", out), archive)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_download_is_rejected(tiny_cifar, http_root, out, no_proxy, how):
    archive, md5 = tiny_cifar
    base, root = http_root
    corrupt(archive, root / f"bad-{how}" / ARCHIVE, how)
    url = f"{base}/bad-{how}/{ARCHIVE}"
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, url=url, md5=md5)
    assert url in str(err.value)
    assert "data.url" in str(err.value)
    assert_nothing_left(out)


def test_download_with_wrong_md5_is_rejected(tiny_cifar, http_root, out, no_proxy):
    archive, _ = tiny_cifar
    base, root = http_root
    (root / "good2").mkdir(exist_ok=True)
    (root / "good2" / ARCHIVE).write_bytes(archive.read_bytes())
    url = f"{base}/good2/{ARCHIVE}"
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, url=url, md5="f" * 32)
    assert url in str(err.value)
    assert_nothing_left(out)


def test_download_404_is_rejected(tiny_cifar, http_root, out, no_proxy):
    _, md5 = tiny_cifar
    base, _ = http_root
    url = f"{base}/missing/{ARCHIVE}"
    with pytest.raises(UserError) as err:
        fetch("cifar10", out, url=url, md5=md5)
    assert url in str(err.value)
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from a folder of gzip'd IDX files


@pytest.fixture(scope="module")
def real_fashion(tmp_path_factory) -> dict[str, np.ndarray]:
    missing = [name for name in FASHION_FILES if not (FASHION_DIR / name).is_file()]
    if missing:
        pytest.fail(f"Fashion-MNIST files missing from {FASHION_DIR}: {', '.join(missing)}; "
                    "install them with `apt-get install dataset-fashion-mnist`", pytrace=False)
    out = tmp_path_factory.mktemp("fashion") / "fashion_mnist"
    fetch("fashion_mnist", out, source=str(FASHION_DIR))
    return load_raw("fashion_mnist", out)


def test_real_fashion_mnist_from_debian_folder(real_fashion):
    a = real_fashion
    assert a["x_train"].shape == (60000, 28, 28, 1) and a["x_train"].dtype == np.uint8
    assert a["x_test"].shape == (10000, 28, 28, 1) and a["x_test"].dtype == np.uint8
    assert a["y_train"].shape == (60000,) and a["y_train"].dtype == np.int64
    assert a["y_test"].shape == (10000,) and a["y_test"].dtype == np.int64
    assert a["y_train"].min() == 0 and a["y_train"].max() == 9
    np.testing.assert_array_equal(np.bincount(a["y_train"]), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(a["y_test"]), np.full(10, 1000))
    assert list(a["classes"]) == FASHION_CLASSES
    assert a["x_train"].max() == 255 and a["x_train"].min() == 0


def test_fake_fashion_folder_round_trip(tmp_path):
    expected = make_fake_fashion(tmp_path / "src")
    out = tmp_path / "raw" / "fashion_mnist"
    result = fetch("fashion_mnist", out, source=str(tmp_path / "src"), own_dataset=True)
    assert Path(result) == out
    assert dot_entries(out.parent) == []
    a = load_raw("fashion_mnist", out)
    assert a["x_train"].shape == (24, 28, 28, 1) and a["x_train"].dtype == np.uint8
    assert a["x_test"].shape == (12, 28, 28, 1)
    assert a["y_train"].dtype == np.int64
    np.testing.assert_array_equal(a["x_train"][..., 0], expected["x_train"])
    np.testing.assert_array_equal(a["x_test"][..., 0], expected["x_test"])
    np.testing.assert_array_equal(a["y_train"], expected["y_train"])
    np.testing.assert_array_equal(a["y_test"], expected["y_test"])
    assert list(a["classes"]) == FASHION_CLASSES


def test_fake_fashion_folder_is_not_the_published_dataset(tmp_path):
    """Without data.own_dataset a folder must hold the published bytes: one line, nothing kept."""
    make_fake_fashion(tmp_path / "src")
    out = tmp_path / "raw" / "fashion_mnist"
    with pytest.raises(UserError) as err:
        fetch("fashion_mnist", out, source=str(tmp_path / "src"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.source: "), message
    assert "train-images-idx3-ubyte is not the published Fashion-MNIST (SHA-256" in message
    assert "set data.own_dataset: true" in message
    assert_nothing_left(out)


@pytest.mark.parametrize("route", ["function", "download stage"])
def test_own_dataset_needs_a_source_and_for_cifar_an_md5(tiny_cifar, out, route):
    def run(dataset, **spec):
        if route == "function":
            return fetch(dataset, out, own_dataset=True, **spec)
        return download_dataset(dataset, SourceSpec(url=None, own_dataset=True, **spec), out)

    with pytest.raises(UserError, match="^data.own_dataset: applies to the files in data.source"):
        run("fashion_mnist", source=None, md5=None)
    with pytest.raises(UserError, match="^data.own_dataset: a CIFAR archive of your own .* set data.md5$"):
        run("cifar10", source=str(tiny_cifar[0]), md5=None)
    assert_nothing_left(out)
    assert run("cifar10", source=str(tiny_cifar[0]), md5=tiny_cifar[1]) == out


@pytest.mark.parametrize("name", FASHION_FILES)
def test_fashion_folder_missing_file(tmp_path, name):
    src = tmp_path / "src"
    make_fake_fashion(src)
    (src / name).unlink()
    out = tmp_path / "raw" / "fashion_mnist"
    with pytest.raises(UserError, match="missing") as err:
        fetch("fashion_mnist", out, source=str(src), own_dataset=True)
    assert name in str(err.value)
    assert_nothing_left(out)


def _corrupt_gz(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "not-gzip":
        data = bytearray(b"plain bytes, no gzip header" * 4)
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "bad-crc":  # flip the stored CRC32 in the trailer
        data[-8] ^= 0xFF
    elif how == "bad-deflate":  # damage the deflate stream right after the header (and file name)
        start = data.index(0, 10) + 1 if data[3] & 0x08 else 10
        for i in range(start, start + 4):
            data[i] ^= 0xFF
    else:
        raise AssertionError(how)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["not-gzip", "truncated", "bad-crc", "bad-deflate"])
def test_fashion_folder_corrupt_gz(tmp_path, how):
    src = tmp_path / "src"
    make_fake_fashion(src)
    name = "train-images-idx3-ubyte.gz"
    _corrupt_gz(src / name, how)
    out = tmp_path / "raw" / "fashion_mnist"
    with pytest.raises(UserError) as err:
        fetch("fashion_mnist", out, source=str(src), own_dataset=True)
    assert name in str(err.value)
    assert_nothing_left(out)


def test_fashion_source_not_a_folder(tmp_path):
    out = tmp_path / "raw" / "fashion_mnist"
    with pytest.raises(UserError, match="not a folder"):
        fetch("fashion_mnist", out, source=str(tmp_path / "nope"))
    assert_nothing_left(out)


def test_fashion_labels_out_of_range(tmp_path):
    src = tmp_path / "src"
    make_fake_fashion(src)
    write_idx_gz(src / "t10k-labels-idx1-ubyte.gz", np.full(12, 12))
    out = tmp_path / "raw" / "fashion_mnist"
    with pytest.raises(UserError, match="labels outside"):
        fetch("fashion_mnist", out, source=str(src), own_dataset=True)
    assert not out.exists()


def test_fashion_count_mismatch(tmp_path):
    src = tmp_path / "src"
    make_fake_fashion(src)
    write_idx_gz(src / "train-labels-idx1-ubyte.gz", np.arange(23) % 10)  # 24 images, 23 labels
    out = tmp_path / "raw" / "fashion_mnist"
    with pytest.raises(UserError, match="train split"):
        fetch("fashion_mnist", out, source=str(src), own_dataset=True)
    assert not out.exists()


@pytest.mark.parametrize("case", ["labels-as-images", "short-data", "bad-magic-ndim", "int8-type", "type-10"])
def test_fashion_malformed_idx(tmp_path, case):
    """Structural checks at load time: every malformed IDX file gives a one-line UserError."""
    src = tmp_path / "src"
    expected = make_fake_fashion(src)
    images = src / "train-images-idx3-ubyte.gz"
    if case == "labels-as-images":
        write_idx_gz(images, expected["y_train"])
    elif case == "short-data":
        raw = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(raw[:-100]))
    elif case == "bad-magic-ndim":
        write_idx_gz(images, expected["x_train"], magic=0x0807)
    elif case == "int8-type":  # IDX type code 0x09 (signed byte) instead of 0x08
        write_idx_gz(images, expected["x_train"], magic=0x0903)
    elif case == "type-10":  # type code 0x0A is not defined by the IDX format
        write_idx_gz(images, expected["x_train"], magic=0x0A03)
    out = tmp_path / "raw" / "fashion_mnist"
    with pytest.raises(UserError, match="not valid Fashion-MNIST"):
        fetch("fashion_mnist", out, source=str(src), own_dataset=True)
    assert not out.exists()
