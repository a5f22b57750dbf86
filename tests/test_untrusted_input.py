"""Untrusted files cannot run code or escape their folder, and every bad input fails cleanly.

The workflow reads files it did not write: a user's CIFAR archive (`data.source` with the
user's own `data.md5`, so no published checksum vouches for its contents), ImageNet weights
from a path, and its own model.pt, checkpoint.pt, .npy and data.npz, which anyone who can
write to results/ can replace. Every case here is built to do harm if read naively: pickles
whose `__reduce__` would create a marker file (through os.system, builtins.open, subprocess
or eval), archive members that would land outside the output folder, and a disk that fills
up while an output is written. Each must end in exactly one line on stderr that names the
file or member (exit 2, no traceback), leave nothing that looks finished (no output under
its final name, no temporary or staging files), and create no marker.

`download` only checks the archive (checksum, members); the pickled batches are read by
`prepare`, so poisoned batches are downloaded and then refused by `prepare`.

Commands run as real subprocesses (`conftest.cli`, ~4 s each for the torch import) for one
case of each kind; the parametrized matrices run the same `cli.main` in this process.
"""

from __future__ import annotations

import builtins
import codecs
import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import pickle
import resource
import shlex
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_fixture import Member, cifar10_members, cifar100_members, pickled_members, write_tar
from conftest import ENV, cli, ensemble_spec, make_data, predict_spec, tiny_runtime, tiny_spec

from cifar_ensembles.cli import main
from cifar_ensembles.config.convert import to_json
from cifar_ensembles.config.spec import SourceSpec, SplitSpec, SubsetSpec, WeightsSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.limits import DATASETS
from cifar_ensembles.files.raw_data import fetch, load_raw
from cifar_ensembles.files.safe_archive import extract_tar
from cifar_ensembles.files.training_run import MODEL_FORMAT, Checkpoint, ModelRecord
from cifar_ensembles.models import ResNet18Cifar

CIFAR = {  # dataset -> archive name, folder inside it
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python"),
}
F10 = CIFAR["cifar10"][1]
ROUTES = ("os.system", "builtins.open", "subprocess", "eval")
# How a refusal names each route's function (posix.system, io.open, subprocess.call or, with
# protocol 2's import fixes, commands.call, builtins.eval or __builtin__.eval or bare eval).
ROUTE_NAMES = {"os.system": "system", "builtins.open": "open", "subprocess": "call", "eval": "eval"}
PROGRESS = "[untrusted] "  # training's progress lines (train --name untrusted)


# ----------------------------------------------------------------- poison and checks
class Poison:
    """Unpickled naively, creates `marker` through `route` (the tests assert it never appears)."""

    def __init__(self, marker: Path, route: str = "os.system"):
        self.marker, self.route = str(marker), route

    def __reduce__(self):
        if self.route == "os.system":
            return os.system, (f"touch {shlex.quote(self.marker)}",)
        if self.route == "builtins.open":
            return builtins.open, (self.marker, "w")
        if self.route == "subprocess":
            return subprocess.call, (["touch", self.marker],)
        return eval, (f"open({self.marker!r}, 'w')",)


class ObjectArray:
    """Unpickles to `numpy.ndarray(shape, "O")`: an object array that never names numpy.dtype."""

    def __reduce__(self):
        return np.ndarray, ((2,), "O")


class ForgedPointers:
    """Unpickles to `numpy.ndarray((1,), "O", buffer)`: an object array whose one element is a
    pointer the pickle chose (reading it would crash, or worse)."""

    def __reduce__(self):
        return np.ndarray, ((1,), "O", b"AAAAAAAA")


class HugeArray:
    """Unpickles to a 4 EiB uint8 array: numpy refuses to allocate it."""

    def __reduce__(self):
        return np.ndarray, ((2**62,), "u1")


class Encoded:
    """Unpickles to `_codecs.encode(text, codec)`: protocol 2's bytes, with another codec."""

    def __init__(self, codec: str):
        self.codec = codec

    def __reduce__(self):
        return codecs.encode, ("abc", self.codec)


def persistent_pickle(obj) -> bytes:
    """`obj` pickled with a persistent id in it (a reference to something outside the pickle)."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return "outside" if isinstance(o, str) and o == "ref" else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def here(capsys, *args) -> subprocess.CompletedProcess:
    """`cifar-ensembles ARGS` through `cli.main` in this process (no torch import per case)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def one_line(result: subprocess.CompletedProcess, command: str, *expected: str) -> str:
    """Exit 2 and exactly one non-empty stderr line, the command's error naming `expected`
    (besides the progress lines of a training run that started: they carry its --name)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(PROGRESS)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"cifar-ensembles {command}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.returncode, result.stderr)


def tree(root: Path) -> dict[str, str]:
    """Every path under `root`: a file's MD5, a link's target, or 'dir' (to compare before/after)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        elif path.is_file():
            found[key] = md5(path)
        else:
            found[key] = "special"
    return found


def temporaries(folder: Path) -> list[str]:
    """Names an interrupted atomic write or fetch would leave: `.NAME.*.tmp*` files, `.NAME.*` folders."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------- stage arguments
def source_json(archive: Path, md5_hex: str) -> str:
    return to_json(SourceSpec(source=str(archive), url=None, md5=md5_hex, own_dataset=False))


def download_args(dataset: str, archive: Path, md5_hex: str, out: Path) -> list:
    return ["download", "--dataset", dataset, "--spec", source_json(archive, md5_hex), "--out", out]


def prepare_args(dataset: str, raw: Path, out: Path) -> list:
    spec = to_json(SplitSpec(val_size=10, split_seed=0, subset=SubsetSpec(train=None, test=None)))
    return ["prepare", "--dataset", dataset, "--spec", spec, "--raw", raw, "--out", out]


def predict_args(model: Path, data: Path, out: Path) -> list:
    return ["predict", "--model", model, "--data", data, "--split", "test", "--probs", out / "probs_test.npy",
            "--metrics", out / "metrics_test.json", "--spec", to_json(predict_spec()), "--threads", 1]


def ensemble_args(data: Path, val: Path, test: Path, out: Path) -> list:
    return ["ensemble", "--data", data, "--seeds", 0, "--val", val, "--test", test,
            "--spec", to_json(ensemble_spec()), "--csv", out / "ensemble.csv",
            "--json", out / "ensemble.json"]


def train_spec(**overrides):
    """One epoch of the width-4 network, nothing that needs another library or file."""
    return tiny_spec(**{"epochs": 1, "scheduler": {"name": "constant"}, "loss": {"name": "cross_entropy"},
                        "augment": {"name": "none"}, **overrides})


def train_args(data: Path, out_dir: Path, *extra, spec=None) -> list:
    return ["train", "--data", data, "--spec", to_json(spec or train_spec()), "--runtime",
            to_json(tiny_runtime()), "--seed", 0, "--out-dir", out_dir, "--threads", 1, "--name", "untrusted",
            *extra]


def weights_args(weights: Path, out: Path) -> list:
    return ["download-weights", "--spec", to_json(WeightsSpec(url=None, file=str(weights))), "--out", out]


# ----------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def contents() -> dict[str, dict]:
    """The unpickled members of tiny CIFAR-10 and CIFAR-100 archives."""
    return {"cifar10": cifar10_members(per_batch=8, test_size=10),
            "cifar100": cifar100_members(train_size=30, test_size=10)}


def write_cifar(folder: Path, dataset: str, contents: dict, replace: dict | None = None, protocol: int = 2,
                before: tuple[Member, ...] = (), after: tuple[Member, ...] = ()) -> tuple[Path, str]:
    """`dataset`'s archive in `folder` with some members replaced (objects, or bytes taken as
    pickled), plus raw tar entries `before` and `after` them; returns the path and MD5."""
    name, inside = CIFAR[dataset]
    members = pickled_members(inside, {**contents[dataset], **(replace or {})}, protocol)
    path = folder / name
    return path, write_tar(path, [*before, *members, *after])


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> Path:
    """A prepared dataset: 32 train, 16 val, 16 test 16 x 16 images of 10 classes."""
    path = tmp_path_factory.mktemp("data") / "data.npz"
    splits.write(path, make_data(n_train=32, n_val=16, n_test=16))
    return path


def model_record() -> ModelRecord:
    spec = tiny_spec().model
    return ModelRecord(model=spec, num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                       ema=False, state_dict=ResNet18Cifar(10, 3, spec.width).state_dict())


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model_record().save(path)
    return path


def probabilities(path: Path, n: int) -> Path:
    np.save(path, np.random.default_rng(n).dirichlet(np.ones(10), n).astype(np.float32))
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    """The file a poison would create; every test that plants one asserts it is absent."""
    return tmp_path / "MARKER"


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty folder for a stage's outputs."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_the_poisons_work_when_read_naively(tmp_path):
    """Controls: each poison does create its marker through pickle.load and through torch.load
    without weights_only, so the tests below prove something."""
    for route in ROUTES:
        for protocol in (2, 4):
            marker = tmp_path / f"{route}-{protocol}"
            pickle.loads(pickle.dumps({"data": Poison(marker, route)}, protocol=protocol))
            assert marker.exists(), (route, protocol)
        marker, path = tmp_path / f"{route}-torch", tmp_path / f"{route}.pt"
        torch.save({"state_dict": Poison(marker, route)}, path)
        torch.load(path, weights_only=False)
        assert marker.exists(), route


# ================================================================= 1. poisoned pickles
BATCH_KINDS = {  # file kind -> dataset, member, the key that holds the poison
    "data_batch": ("cifar10", "data_batch_2", "data"),
    "test_batch": ("cifar10", "test_batch", "labels"),
    "batches.meta": ("cifar10", "batches.meta", "label_names"),
    "cifar100_train": ("cifar100", "train", "data"),
    "cifar100_meta": ("cifar100", "meta", "fine_label_names"),
}


def poisoned_raw(tmp_path: Path, contents: dict, dataset: str, member: str, content) -> tuple[Path, Path]:
    """A raw folder holding an archive whose `member` is `content` (an object, or bytes taken as
    the pickle), as if placed in resources/ by hand (fetch itself refuses it: see below);
    returns (raw folder, the member's path)."""
    archive, _ = write_cifar(tmp_path / "archive", dataset, contents, {member: content})
    raw = tmp_path / "raw"
    extract_tar(archive, raw, "test", DATASETS[dataset])
    return raw, raw / CIFAR[dataset][1] / member


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", list(BATCH_KINDS))
def test_poisoned_batch_runs_no_code(tmp_path, capsys, contents, marker, out, kind, route, protocol):
    dataset, member, key = BATCH_KINDS[kind]
    poisoned = {**contents[dataset][member], key: Poison(marker, route)}
    raw, path = poisoned_raw(tmp_path, contents, dataset, member, pickle.dumps(poisoned, protocol=protocol))
    one_line(here(capsys, *prepare_args(dataset, raw, out / "data.npz")), "prepare",
             f"{path}: not a plain-data CIFAR batch", f"{ROUTE_NAMES[route]}, which is refused")
    assert tree(out) == {}
    assert not marker.exists()


@pytest.mark.parametrize("kind, route", [("data_batch", "os.system"), ("cifar100_meta", "subprocess")])
def test_poisoned_batch_through_the_command(tmp_path, contents, marker, out, kind, route):
    """The whole chain as the workflow runs it: download checks the archive's checksum and
    members, then decodes every batch before the raw folder counts as fetched; the poisoned
    batch is refused in one line that names it inside the archive, and no raw folder is left."""
    dataset, member, key = BATCH_KINDS[kind]
    archive, md5_hex = write_cifar(tmp_path / "archive", dataset, contents,
                                   {member: {**contents[dataset][member], key: Poison(marker, route)}})
    raw = tmp_path / "raw"
    one_line(cli(*download_args(dataset, archive, md5_hex, raw), cwd=tmp_path), "download",
             f"{archive}: {CIFAR[dataset][1]}/{member}: not a plain-data CIFAR batch", "which is refused")
    assert not raw.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".raw.")]
    assert not marker.exists()


def _batch(contents, **replace) -> dict:
    return {**contents["cifar10"]["data_batch_1"], **replace}


# variant -> (member of CIFAR-10, its content given the archive contents and marker, expected text)
NOT_PLAIN_DATA = {
    "object_array_of_poison": ("data_batch_1", lambda c, m: _batch(c, data=np.array([Poison(m), 1], object)),
                               "asks for an array of Python objects"),
    "object_array_without_dtype": ("data_batch_1", lambda c, m: _batch(c, data=ObjectArray()),
                                   "asks for numpy.ndarray called directly"),
    "object_array_of_forged_pointers": ("data_batch_1", lambda c, m: _batch(c, data=ForgedPointers()),
                                        "asks for numpy.ndarray called directly"),
    "dtype_with_object_field": ("data_batch_1",
                                lambda c, m: _batch(c, data=np.zeros(2, dtype=[("a", "u1"), ("b", "O")])),
                                "asks for an array of Python objects"),
    "codec_utf8": ("data_batch_1", lambda c, m: _batch(c, batch_label=Encoded("utf-8")),
                   "asks for _codecs.encode with 'utf-8'"),
    "codec_rot13": ("test_batch", lambda c, m: _batch(c, batch_label=Encoded("rot_13")),
                    "asks for _codecs.encode with 'rot_13'"),
    "persistent_id": ("batches.meta", lambda c, m: persistent_pickle({"label_names": ["ref"]}),
                      "asks for a persistent id"),
    "huge_array": ("data_batch_1", lambda c, m: _batch(c, data=HugeArray()),
                   "asks for numpy.ndarray called directly"),
    "data_list": ("data_batch_1", lambda c, m: _batch(c, data=c["cifar10"]["data_batch_1"]["data"].tolist()),
                  "'data' must be a uint8 N x 3072 array, got list"),
    "data_float": ("data_batch_3", lambda c, m: _batch(c, data=np.zeros((8, 3072), np.float32)),
                   "'data' must be a uint8 N x 3072 array, got float32 (8, 3072)"),
    "data_3d": ("test_batch", lambda c, m: _batch(c, data=np.zeros((10, 3, 1024), np.uint8)),
                "'data' must be a uint8 N x 3072 array, got uint8 (10, 3, 1024)"),
    "data_bytes": ("data_batch_1", lambda c, m: _batch(c, data=b"\0" * 3072 * 8),
                   "'data' must be a uint8 N x 3072 array, got bytes"),
    "labels_float": ("data_batch_1", lambda c, m: _batch(c, labels=[float(i % 10) for i in range(8)]),
                     "'labels' must be a list of integer labels"),
    "labels_str": ("data_batch_4", lambda c, m: _batch(c, labels=[str(i % 10) for i in range(8)]),
                   "'labels' must be a list of integer labels"),
    "labels_bool": ("data_batch_1", lambda c, m: _batch(c, labels=[True] * 8),
                    "'labels' must be a list of integer labels"),
    "labels_float_array": ("data_batch_1", lambda c, m: _batch(c, labels=np.zeros(8)),
                           "'labels' must be a list of integer labels"),
    "labels_2d_array": ("data_batch_1", lambda c, m: _batch(c, labels=np.zeros((8, 1), np.int64)),
                        "'labels' must be a list of integer labels"),
    "labels_count": ("data_batch_1", lambda c, m: _batch(c, labels=[1] * 7), "8 images but 7 labels"),
    "labels_missing": ("data_batch_5", lambda c, m: {"data": np.zeros((8, 3072), np.uint8)},
                       "CIFAR batch without key 'labels'"),
    "batch_is_a_list": ("data_batch_1", lambda c, m: [np.zeros((8, 3072), np.uint8), [1] * 8],
                        "not a CIFAR batch: a list, not a dict"),
    "batch_is_an_array": ("test_batch", lambda c, m: np.zeros((10, 3072), np.uint8),
                          "not a CIFAR batch: a ndarray, not a dict"),
    "truncated": ("data_batch_1", lambda c, m: pickle.dumps(_batch(c), protocol=2)[:5000],
                  "not a CIFAR batch: UnpicklingError: pickle data was truncated"),
    "empty": ("test_batch", lambda c, m: b"", "not a CIFAR batch: EOFError"),
    "not_a_pickle": ("data_batch_2", lambda c, m: b"<html>404 Not Found</html>", "not a CIFAR batch: "),
    "names_not_a_list": ("batches.meta", lambda c, m: {"label_names": "airplane"},
                         "'label_names' must be a list of class names"),
    "names_empty": ("batches.meta", lambda c, m: {"label_names": []}, "'label_names' must be a list"),
}


@pytest.mark.parametrize("member, content, expected", list(NOT_PLAIN_DATA.values()), ids=list(NOT_PLAIN_DATA))
def test_batch_that_is_not_plain_cifar_data(tmp_path, capsys, contents, marker, out, member, content,
                                            expected):
    raw, path = poisoned_raw(tmp_path, contents, "cifar10", member, content(contents, marker))
    one_line(here(capsys, *prepare_args("cifar10", raw, out / "data.npz")), "prepare", f"{path}: ", expected)
    assert tree(out) == {}
    assert not marker.exists()


def test_batch_that_is_a_list_through_the_command(tmp_path, contents, out):
    raw, path = poisoned_raw(tmp_path, contents, "cifar10", "test_batch", [1, 2, 3])
    one_line(cli(*prepare_args("cifar10", raw, out / "data.npz"), cwd=tmp_path), "prepare",
             f"{path}: not a CIFAR batch: a list, not a dict")
    assert tree(out) == {}


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("dataset", list(CIFAR))
def test_plain_batches_of_every_protocol_are_read(tmp_path, contents, dataset, protocol):
    """The restricted unpickler is not over-strict: arrays, lists, text and bytes of any protocol."""
    archive, md5_hex = write_cifar(tmp_path, dataset, contents, protocol=protocol)
    arrays = load_raw(dataset, fetch(dataset, tmp_path / "raw", source=str(archive), md5=md5_hex))
    train = contents[dataset]["data_batch_1" if dataset == "cifar10" else "train"]
    n = len(train["data"])
    assert np.array_equal(arrays["x_train"][:n], train["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    key = "labels" if dataset == "cifar10" else "fine_labels"
    assert arrays["y_train"][:n].tolist() == train[key]


# ================================================================= 2. archive traversal
def planted(name: str) -> Member:
    return Member(name, b"pwned")


def symlink(name: str, target: str) -> Member:
    return Member(name, kind="symlink", target=target)


def hardlink(name: str, target: str) -> Member:
    return Member(name, kind="hardlink", target=target)


def escapes(tmp_path: Path) -> dict[str, tuple[list[Member], str, str]]:
    """Archive entries that would write outside the staging folder that `download --out
    tmp_path/work/raw` extracts into (tmp_path/work/.raw.XXXX/), or would make devices: each
    with the member its refusal names and the problem it states. Their targets are
    tmp_path/work/escaped, tmp_path/escaped, /tmp/<tmp_path's name>-escaped and the sentinel
    file tmp_path/work/sentinel (which a hard link would let the next member overwrite)."""
    work, out, a, b, h = tmp_path / "work", f"{F10}/out", f"{F10}/a", f"{F10}/b", f"{F10}/h"
    outside = f"/tmp/{tmp_path.name}-escaped"
    return {
        "dotdot": ([planted(f"{F10}/../../escaped")], f"{F10}/../../escaped", "has a '..' component"),
        "dotdot_at_top": ([planted("../escaped")], "../escaped", "has a '..' component"),
        "absolute": ([planted(str(tmp_path / "escaped"))], str(tmp_path / "escaped"), "has an absolute path"),
        "absolute_tmp": ([planted(outside)], outside, "has an absolute path"),
        "symlink_relative": ([symlink(out, "../.."), planted(f"{out}/escaped")],
                             out, "is a symbolic link to '../..', outside the folder"),
        "symlink_absolute": ([symlink(out, str(work)), planted(f"{out}/escaped")],
                             out, f"is a symbolic link to '{work}', outside the folder"),
        # a -> . is inside, and b -> a/../.. reads as inside, but once a exists b leads to work/
        "symlink_chain": ([symlink(a, "."), symlink(b, "a/../.."), planted(f"{b}/escaped")],
                          b, f"is a link to 'a/../..', through the symbolic link '{a}'"),
        "symlink_chain_reversed": ([symlink(b, "a/../.."), symlink(a, "."), planted(f"{b}/escaped")],
                                   b, f"is a link to 'a/../..', through the symbolic link '{a}'"),
        "hardlink_relative": ([hardlink(h, "../sentinel"), planted(h)],
                              h, "is a hard link to '../sentinel', outside the folder"),
        "hardlink_absolute": ([hardlink(h, str(work / "sentinel")), planted(h)],
                              h, f"is a hard link to '{work / 'sentinel'}', outside the folder"),
        "hardlink_through_symlink": ([symlink(a, "."), hardlink(h, f"{a}/../../sentinel"), planted(h)], h,
                                     f"is a link to '{a}/../../sentinel', through the symbolic link '{a}'"),
        "file_written_through_a_link": ([symlink(f"{F10}/alias", "data_batch_1"), planted(f"{F10}/alias")],
                                        f"{F10}/alias",
                                        f"is written through the symbolic link '{F10}/alias'"),
        "char_device": ([Member(f"{F10}/null", kind="chr")], f"{F10}/null", "is a device file or FIFO"),
        "block_device": ([Member(f"{F10}/disk", kind="blk")], f"{F10}/disk", "is a device file or FIFO"),
        "fifo": ([Member(f"{F10}/pipe", kind="fifo")], f"{F10}/pipe", "is a device file or FIFO"),
    }


ESCAPES = list(escapes(Path("/nowhere")))


@contextlib.contextmanager
def nothing_escapes(tmp_path: Path):
    """Yields the --out folder (tmp_path/work/raw) beside a sentinel file; afterwards tmp_path
    holds exactly what it held before (no escaped file, the sentinel unchanged, no output
    folder, no staging folder) and nothing landed in /tmp either."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "sentinel").write_bytes(b"original")
    stray = Path(f"/tmp/{tmp_path.name}-escaped")
    before = tree(tmp_path)
    yield tmp_path / "work" / "raw"
    assert tree(tmp_path) == before
    assert not stray.exists()


def escape_archive(tmp_path: Path, contents: dict, variant: str, position: str) -> tuple[Path, str, str, str]:
    """The tiny CIFAR-10 archive with `variant`'s entries before or after the real members
    (after: a naive extractor would have written the real ones first); returns the archive,
    its MD5, the member the refusal names and the problem."""
    entries, member, problem = escapes(tmp_path)[variant]
    where = {"before": tuple(entries)} if position == "first" else {"after": tuple(entries)}
    archive, md5_hex = write_cifar(tmp_path / "archive", "cifar10", contents, **where)
    return archive, md5_hex, member, problem


@pytest.mark.parametrize("position", ["first", "last"])
@pytest.mark.parametrize("variant", ESCAPES)
def test_archive_member_that_escapes_is_refused(tmp_path, capsys, contents, variant, position):
    archive, md5_hex, member, problem = escape_archive(tmp_path, contents, variant, position)
    with nothing_escapes(tmp_path) as raw:
        one_line(here(capsys, *download_args("cifar10", archive, md5_hex, raw)), "download",
                 f"data.source: {archive}: member {member!r} {problem}", "nothing was extracted")


@pytest.mark.parametrize("variant", ESCAPES)
def test_archive_member_that_escapes_is_refused_without_extraction_filters(tmp_path, contents, monkeypatch,
                                                                           variant):
    """Pythons before 3.11.4 / 3.10.12 have no tarfile extraction filter: the explicit checks
    alone keep every member inside (links through links included)."""
    monkeypatch.delattr(tarfile, "data_filter")
    archive, md5_hex, member, problem = escape_archive(tmp_path, contents, variant, "last")
    with nothing_escapes(tmp_path) as raw:
        with pytest.raises(UserError) as info:
            fetch("cifar10", raw, source=str(archive), md5=md5_hex)
    assert f"member {member!r} {problem}" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variant", ["dotdot", "symlink_absolute", "hardlink_relative", "fifo"])
def test_archive_member_that_escapes_through_the_command(tmp_path, contents, variant):
    archive, md5_hex, member, problem = escape_archive(tmp_path, contents, variant, "first")
    with nothing_escapes(tmp_path) as raw:
        one_line(cli(*download_args("cifar10", archive, md5_hex, raw), cwd=tmp_path), "download",
                 f"member {member!r} {problem}; nothing was extracted")


def test_links_that_stay_inside_the_folder_are_extracted(tmp_path, capsys, contents, out):
    """Links are not refused as such: a symbolic and a hard link to batches beside them, and a
    link to the folder itself, are extracted (the data filter agrees) and prepare reads on."""
    inside = (Member(f"{F10}/alias", kind="symlink", target="data_batch_1"),
              Member(f"{F10}/copy", kind="hardlink", target=f"{F10}/data_batch_2"),
              Member(f"{F10}/here", kind="symlink", target="."))
    archive, md5_hex = write_cifar(tmp_path / "archive", "cifar10", contents, after=inside)
    raw = tmp_path / "raw"
    succeeded(cli(*download_args("cifar10", archive, md5_hex, raw), cwd=tmp_path))
    folder = raw / F10
    assert os.readlink(folder / "alias") == "data_batch_1" and os.readlink(folder / "here") == "."
    assert (folder / "alias").resolve() == folder / "data_batch_1"
    assert (folder / "copy").read_bytes() == (folder / "data_batch_2").read_bytes()
    succeeded(here(capsys, *prepare_args("cifar10", raw, out / "data.npz")))
    assert len(splits.load(out / "data.npz")["y_train"]) == 30


# ================================================================= 3. poisoned torch files
TORCH_WRITERS = ("zip", "zip_protocol_4", "legacy", "plain_pickle")


def torch_file(path: Path, obj, how: str) -> Path:
    """`obj` saved as torch.save would (new zip format, pickle protocol 4, the legacy format) or
    as a bare pickle (torch.load reads those too)."""
    if how == "zip":
        torch.save(obj, path)
    elif how == "zip_protocol_4":
        torch.save(obj, path, pickle_protocol=4)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def poisoned_model(path: Path, marker: Path, route: str, how: str) -> Path:
    """A model.pt whose record is intact but for one poisoned tensor."""
    record = model_record()
    state = {**record.state_dict, "fc.bias": Poison(marker, route)}
    body = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    body["model"] = dataclasses.asdict(record.model)
    return torch_file(path, {"format": MODEL_FORMAT, **body, "state_dict": state}, how)


def poisoned_checkpoint(path: Path, marker: Path, route: str, how: str) -> Path:
    return torch_file(path, {"format": "cifar-ensembles/checkpoint-2", "epoch": 1,
                             "model": {"fc.weight": Poison(marker, route)}}, how)


def poisoned_weights(path: Path, marker: Path, route: str, how: str) -> Path:
    """An ImageNet-style state dict with a poisoned entry."""
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict() if how == "zip" else {"conv1.weight": torch.zeros(1)}
    return torch_file(path, {**state, "layer1.0.bn1.num_batches_tracked": Poison(marker, route)}, how)


REFUSED_TORCH = "its pickle asks for"


def torch_refusal(route: str, how: str) -> tuple[str, ...]:
    """What the one line says of a poisoned torch file: the global its pickle asks for (in a
    bare pickle, tensors come first and ask for torch.storage._load_from_bytes), or, for pickle
    protocol 4, whose framing torch's weights-only reader does not read, that reader's refusal."""
    if how == "zip_protocol_4":
        return ("the weights-only reader refuses it",)
    if how == "plain_pickle":
        return ("its pickle asks for", "which is refused")
    return ("its pickle asks for", f"{ROUTE_NAMES[route]}, which is refused")


@pytest.mark.parametrize("how", TORCH_WRITERS)
@pytest.mark.parametrize("route", ROUTES)
def test_poisoned_model_file_runs_no_code(tmp_path, capsys, data_npz, marker, out, route, how):
    model = poisoned_model(tmp_path / "model.pt", marker, route, how)
    line = one_line(here(capsys, *predict_args(model, data_npz, out)), "predict",
                    f"{model}: not a readable model file (UnpicklingError: ", *torch_refusal(route, how),
                    f"rebuild it with: snakemake --forcerun {model}")
    assert "weights_only` set to `False" not in line  # torch's advice to load it unsafely is not passed on
    assert tree(out) == {}
    assert not marker.exists()


@pytest.mark.parametrize("how", TORCH_WRITERS)
@pytest.mark.parametrize("route", ROUTES)
def test_poisoned_checkpoint_runs_no_code(tmp_path, marker, route, how):
    checkpoint = poisoned_checkpoint(tmp_path / "checkpoint.pt", marker, route, how)
    with pytest.raises(UserError) as info:
        Checkpoint.load(checkpoint)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{checkpoint}: not a readable checkpoint (UnpicklingError: ")
    assert all(text in message for text in torch_refusal(route, how)), message
    assert message.endswith("delete it to train this model afresh")
    assert not marker.exists()


@pytest.mark.parametrize("route, how", [("builtins.open", "zip"), ("eval", "legacy")])
def test_training_does_not_resume_from_a_poisoned_checkpoint(tmp_path, capsys, data_npz, marker, out,
                                                             route, how):
    checkpoint = poisoned_checkpoint(out / "checkpoint.pt", marker, route, how)
    one_line(here(capsys, *train_args(data_npz, out / "seed0", "--checkpoint", checkpoint)), "train",
             f"{checkpoint}: not a readable checkpoint", *torch_refusal(route, how),
             "delete it to train this model afresh")
    assert tree(out) == {"checkpoint.pt": md5(checkpoint)}  # left for the user to look at; no outputs
    assert not marker.exists()


@pytest.mark.parametrize("how", TORCH_WRITERS)
@pytest.mark.parametrize("route", ROUTES)
def test_poisoned_pretrained_weights_run_no_code(tmp_path, capsys, marker, out, route, how):
    weights = poisoned_weights(tmp_path / "weights.pth", marker, route, how)
    one_line(here(capsys, *weights_args(weights, out / "resnet18.pth")), "download-weights",
             f"pretrained_weights.file: {weights}: cannot load as torch weights", *torch_refusal(route, how))
    assert tree(out) == {}
    assert not marker.exists()


def test_poisoned_torch_files_through_the_commands(tmp_path, data_npz, marker, out):
    """predict, train --checkpoint, download-weights and train --weights as real processes."""
    model = poisoned_model(tmp_path / "model.pt", marker, "os.system", "zip")
    one_line(cli(*predict_args(model, data_npz, out), cwd=tmp_path), "predict",
             f"{model}: not a readable model file", REFUSED_TORCH)
    checkpoint = poisoned_checkpoint(tmp_path / "checkpoint.pt", marker, "subprocess", "zip")
    one_line(cli(*train_args(data_npz, out / "seed0", "--checkpoint", checkpoint), cwd=tmp_path), "train",
             f"{checkpoint}: not a readable checkpoint", REFUSED_TORCH)
    weights = poisoned_weights(tmp_path / "weights.pth", marker, "os.system", "zip")
    one_line(cli(*weights_args(weights, out / "resnet18.pth"), cwd=tmp_path), "download-weights",
             f"pretrained_weights.file: {weights}: cannot load as torch weights", REFUSED_TORCH)
    pretrained = train_spec(model={"name": "resnet18", "pretrained": True, "input_size": None})
    one_line(cli(*train_args(data_npz, out / "seed0", "--weights", weights, spec=pretrained), cwd=tmp_path),
             "train", f"pretrained_weights.file: {weights}: cannot load as torch weights", REFUSED_TORCH)
    assert tree(out) == {}
    assert not marker.exists()


# ================================================================= 4. arrays with pickles in them
def poisoned_npy(path: Path, marker: Path, how: str) -> Path:
    """A .npy that holds a pickle: an object array, a structured array with an object field,
    or a bare pickle under the .npy name."""
    if how == "object_array":
        np.save(path, np.array([[Poison(marker), 1.0]], dtype=object), allow_pickle=True)
    elif how == "object_field":
        array = np.zeros(2, dtype=[("p", "f4"), ("o", "O")])
        array["o"] = [Poison(marker), Poison(marker)]
        np.save(path, array, allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps(Poison(marker), protocol=4))
    return path


NPY_POISONS = ("object_array", "object_field", "plain_pickle")
NPY_REFUSALS = {  # how -> what the one line says (never numpy's advice to load the file unsafely)
    "object_array": "Object arrays cannot be loaded when allow_pickle=False",
    "object_field": "Object arrays cannot be loaded when allow_pickle=False",
    "plain_pickle": "a pickle, not an array; refused (allow_pickle=False)",
}


@pytest.mark.parametrize("how", NPY_POISONS)
@pytest.mark.parametrize("which", ["val", "test"])
def test_poisoned_probabilities_run_no_code(tmp_path, capsys, data_npz, marker, out, which, how):
    val, test = probabilities(tmp_path / "probs_val.npy", 16), probabilities(tmp_path / "probs_test.npy", 16)
    poisoned = poisoned_npy(val if which == "val" else test, marker, how)
    one_line(here(capsys, *ensemble_args(data_npz, val, test, out)), "ensemble",
             f"{poisoned}: not a probability array", NPY_REFUSALS[how],
             f"rebuild it with: snakemake --forcerun {poisoned}")
    assert tree(out) == {}
    assert not marker.exists()


def poisoned_npz(path: Path, marker: Path, key: str, how: str) -> Path:
    """A data.npz whose `key` holds a pickle: an object array, a zip member that is a bare
    pickle (not .npy), or the whole file a pickle."""
    arrays = make_data(n_train=32, n_val=16, n_test=16)
    if how == "object_array":
        arrays[key] = np.array([Poison(marker)] * len(arrays[key]), dtype=object)
        np.savez(path, **arrays)
    elif how == "pickle_member":
        np.savez(path, **{k: v for k, v in arrays.items() if k != key})
        with zipfile.ZipFile(path, "a") as npz:
            npz.writestr(f"{key}.npy", pickle.dumps(Poison(marker), protocol=2))
    else:
        path.write_bytes(pickle.dumps({key: Poison(marker)}, protocol=2))
    return path


NPZ_READERS = {"train": "x_train", "predict": "x_test", "ensemble": "y_val"}  # command -> a key it reads


def reading(command: str, data: Path, model: Path, inputs: Path, out: Path) -> list:
    """`command`'s arguments with `data` as its data.npz (other inputs sound) and outputs in `out`."""
    if command == "train":
        return train_args(data, out / "seed0")
    if command == "predict":
        return predict_args(model, data, out)
    val, test = probabilities(inputs / "v.npy", 16), probabilities(inputs / "t.npy", 16)
    return ensemble_args(data, val, test, out)


@pytest.mark.parametrize("how", ["object_array", "pickle_member", "plain_pickle"])
@pytest.mark.parametrize("command", list(NPZ_READERS))
def test_poisoned_data_npz_runs_no_code(tmp_path, capsys, model_pt, marker, out, command, how):
    data = poisoned_npz(tmp_path / "data.npz", marker, NPZ_READERS[command], how)
    refusal = f"{NPZ_READERS[command]!r} is not a .npy array" if how == "pickle_member" else NPY_REFUSALS[how]
    one_line(here(capsys, *reading(command, data, model_pt, tmp_path, out)), command,
             f"{data}: not a prepared dataset (", refusal,
             f"rebuild it with: snakemake --forcerun {data}")
    assert tree(out) == {}
    assert not marker.exists()


@pytest.mark.parametrize("command", list(NPZ_READERS))
def test_data_npz_with_scalar_class_names(tmp_path, capsys, model_pt, out, command):
    """`classes` saved as one string, not a list of names: named, not a TypeError from len()."""
    data = tmp_path / "data.npz"
    np.savez(data, **{**make_data(n_train=32, n_val=16, n_test=16), "classes": np.array("airplane")})
    one_line(here(capsys, *reading(command, data, model_pt, tmp_path, out)), command,
             f"{data}: damaged prepared dataset (classes must be a list of names")
    assert tree(out) == {}


def test_poisoned_arrays_through_the_commands(tmp_path, model_pt, marker, out):
    val, test = probabilities(tmp_path / "probs_val.npy", 16), tmp_path / "probs_test.npy"
    data = poisoned_npz(tmp_path / "poisoned.npz", marker, "x_train", "object_array")
    good = tmp_path / "data.npz"
    splits.write(good, make_data(n_train=32, n_val=16, n_test=16))
    one_line(cli(*ensemble_args(good, val, poisoned_npy(test, marker, "object_array"), out), cwd=tmp_path),
             "ensemble", f"{test}: not a probability array", "allow_pickle=False")
    one_line(cli(*train_args(data, out / "seed0"), cwd=tmp_path), "train", f"{data}: not a prepared dataset",
             "allow_pickle=False")
    assert tree(out) == {}
    assert not marker.exists()


# ================================================================= 5. a full disk
PAGE = 4096  # tmpfs counts whole pages
NO_ROOM = ("No space left on device", "File too large", "is the disk full?")


def limited_cli(max_bytes: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    """`cifar-ensembles ARGS` in a process that may not write files larger than `max_bytes`
    (writes beyond fail with EFBIG; SIGXFSZ, which would kill it instead, is ignored)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run([sys.executable, "-m", "cifar_ensembles.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)


@dataclasses.dataclass
class Disk:
    """A folder where writes fail once `free` bytes are used: a 1 MiB tmpfs filled up to
    `free` (root can mount one, as here and in CI), or, where mounting is refused, a file-size
    limit of `free` bytes on the command's process (RLIMIT_FSIZE; no output is under 16 bytes)."""

    folder: Path
    mounted: bool
    free: int = 0

    def fill(self, free: int) -> None:
        self.free = free
        if not self.mounted:
            return
        filler = self.folder / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            while True:  # page by page: a write either gets its page or fails whole
                os.write(fd, bytes(PAGE))
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
        finally:
            os.close(fd)
        os.truncate(filler, filler.stat().st_size - free)

    def run(self, capsys, *args, process: bool = False) -> subprocess.CompletedProcess:
        """The command writing to the disk: in this process, or as its own (`process`)."""
        if not self.mounted:  # a few bytes even when full: torch's import probes /tmp with a 4-byte file
            return limited_cli(max(self.free, 16), *args, cwd=self.folder.parent)
        return cli(*args, cwd=self.folder.parent) if process else here(capsys, *args)

    def files(self) -> list[str]:
        """Every file on the disk but the filler: outputs under their final or temporary names."""
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*")
                      if not p.is_dir() and p.name != "filler")


@pytest.fixture
def disk(tmp_path):
    """A small tmpfs at tmp_path/disk, unmounted afterwards; a file-size limit where mounting fails."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    try:
        yield Disk(folder, mounted)
    finally:
        if mounted and subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def limited_disk(tmp_path):
    """The file-size-limit fallback, whether or not this machine could mount a tmpfs."""
    folder = tmp_path / "disk"
    folder.mkdir()
    return Disk(folder, mounted=False)


@pytest.fixture(scope="module")
def raw10(tmp_path_factory, contents) -> Path:
    """Fetched tiny CIFAR-10 raw files (for prepare)."""
    folder = tmp_path_factory.mktemp("raw10")
    archive, md5_hex = write_cifar(folder, "cifar10", contents)
    return fetch("cifar10", folder / "raw", source=str(archive), md5=md5_hex)


def stage_on(command: str, folder: Path, raw: Path, data: Path, model: Path,
             inputs: Path) -> tuple[list, Path]:
    """`command`'s arguments with its outputs in `folder`, and the output it writes first."""
    if command == "prepare":
        return prepare_args("cifar10", raw, folder / "data.npz"), folder / "data.npz"
    if command == "predict":
        return predict_args(model, data, folder), folder / "probs_test.npy"
    if command == "ensemble":
        val, test = probabilities(inputs / "probs_val.npy", 16), probabilities(inputs / "probs_test.npy", 16)
        return ensemble_args(data, val, test, folder), folder / "ensemble.csv"
    return train_args(data, folder / "seed0"), folder / "seed0" / "model.pt"


FULL_DISK = {  # case -> command, bytes free (a full disk; or room for part of the first output)
    "prepare-full": ("prepare", 0),
    "prepare-mid-write": ("prepare", 2 * PAGE),
    "predict-full": ("predict", 0),
    "ensemble-full": ("ensemble", 0),
    "train-full": ("train", 0),
    "train-mid-write": ("train", 4 * PAGE),
}


def check_full_disk(result, disk: Disk, command: str, first: Path) -> None:
    line = one_line(result, command, f"{first}: cannot write: ")
    assert any(reason in line for reason in NO_ROOM), line
    assert disk.files() == []  # nothing under its final name, no .NAME.*.tmp* left


@pytest.mark.parametrize("command, free", list(FULL_DISK.values()), ids=list(FULL_DISK))
def test_full_disk(tmp_path, capsys, disk, raw10, data_npz, model_pt, command, free):
    args, first = stage_on(command, disk.folder, raw10, data_npz, model_pt, tmp_path)
    disk.fill(free)
    check_full_disk(disk.run(capsys, *args), disk, command, first)


@pytest.mark.parametrize("command", ["prepare", "predict", "ensemble", "train"])
def test_full_disk_through_the_command(tmp_path, disk, raw10, data_npz, model_pt, command):
    args, first = stage_on(command, disk.folder, raw10, data_npz, model_pt, tmp_path)
    disk.fill(0)
    check_full_disk(disk.run(None, *args, process=True), disk, command, first)


@pytest.mark.parametrize("command, free", [("prepare", 2 * PAGE), ("train", 0)], ids=["prepare", "train"])
def test_file_size_limit_through_the_command(tmp_path, limited_disk, raw10, data_npz, model_pt, command,
                                             free):
    """The fallback for machines that cannot mount a tmpfs fails the same way (EFBIG)."""
    args, first = stage_on(command, limited_disk.folder, raw10, data_npz, model_pt, tmp_path)
    limited_disk.fill(free)
    check_full_disk(limited_disk.run(None, *args), limited_disk, command, first)


LATER_OUTPUT = {  # case -> command, the output whose write fails, the outputs written before it
    "predict": ("predict", "metrics_test.json", ["probs_test.npy"]),
    "ensemble": ("ensemble", "ensemble.json", ["ensemble.csv"]),
    "train-history": ("train", "seed0/history.csv", ["seed0/model.pt"]),
    "train-run": ("train", "seed0/run.yaml", ["seed0/model.pt", "seed0/history.csv"]),
}


@pytest.mark.parametrize("command, failing, earlier", list(LATER_OUTPUT.values()), ids=list(LATER_OUTPUT))
def test_a_failed_later_output_leaves_no_earlier_one(tmp_path, capsys, raw10, data_npz, model_pt, out,
                                                     command, failing, earlier):
    """A stage with several outputs whose last write fails (here: a folder in its way) removes
    the ones it wrote before: no output of a failed run looks finished."""
    args, _ = stage_on(command, out, raw10, data_npz, model_pt, tmp_path)
    (out / failing).mkdir(parents=True)
    (out / failing / "keep").write_text("in the way")
    one_line(here(capsys, *args), command, f"{out / failing}: cannot write: Is a directory")
    assert [name for name in earlier if (out / name).exists()] == []
    assert temporaries(out) == []
