"""`cifar-ensembles download` and `prepare` as the workflow calls them: separate processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import CLASSES, make_cifar10_archive
from conftest import cli

from cifar_ensembles.config.convert import to_json
from cifar_ensembles.config.spec import SourceSpec, SplitSpec, SubsetSpec
from cifar_ensembles.files import splits
from cifar_ensembles.files.raw_data import fetch

ARCHIVE = "cifar-10-python.tar.gz"
ERROR_PREFIX = "cifar-ensembles download: error:"


def source_json(source, md5: str | None) -> str:
    return to_json(SourceSpec(source=str(source), url=None, md5=md5, own_dataset=False))


def split_json(val_size: int, split_seed: int = 0, train: int | None = None, test: int | None = None) -> str:
    subset = SubsetSpec(train=train, test=test)
    return to_json(SplitSpec(val_size=val_size, split_seed=split_seed, subset=subset))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("cli_cifar") / ARCHIVE
    md5 = make_cifar10_archive(path, per_batch=20, test_size=30, seed=1)
    return path, md5


def test_download_then_prepare(archive, tmp_path):
    path, md5 = archive
    raw = tmp_path / "resources" / "cifar10"
    r = cli("download", "--dataset", "cifar10", "--spec", source_json(path, md5), "--out", raw, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (raw / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert [p.name for p in raw.parent.iterdir()] == ["cifar10"]

    data = tmp_path / "results" / "data.npz"
    r = cli("prepare", "--dataset", "cifar10", "--spec", split_json(20, 0, train=50, test=20), "--raw", raw,
            "--out", data, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert data.is_file()
    assert [p.name for p in data.parent.iterdir()] == ["data.npz"]
    d = splits.load(data)
    assert d["x_train"].shape == (50, 32, 32, 3) and d["x_train"].dtype == np.uint8
    assert d["x_val"].shape == (20, 32, 32, 3)
    assert d["x_test"].shape == (20, 32, 32, 3)
    assert list(d["classes"]) == CLASSES
    assert d["mean"].shape == (3,) and d["std"].shape == (3,)
    assert "50 train, 20 val, 20 test" in r.stderr


def test_download_corrupt_archive(archive, tmp_path):
    path, md5 = archive
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 32):
        blob[i] ^= 0xFF
    bad = tmp_path / "mirror" / ARCHIVE
    bad.parent.mkdir()
    bad.write_bytes(bytes(blob))
    raw = tmp_path / "resources" / "cifar10"
    r = cli("download", "--dataset", "cifar10", "--spec", source_json(bad, md5), "--out", raw, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert str(bad) in lines[0]
    assert "checksum" in lines[0]
    assert "Traceback" not in r.stderr
    assert not raw.exists()
    assert list(raw.parent.iterdir()) == [], "staging folders left behind"


def test_prepare_bad_val_size(archive, tmp_path):
    path, md5 = archive
    raw = fetch("cifar10", tmp_path / "raw", source=str(path), md5=md5)  # in-process: one subprocess less
    data = tmp_path / "data.npz"
    r = cli("prepare", "--dataset", "cifar10", "--spec", split_json(5000), "--raw", raw, "--out", data,
            cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifar-ensembles prepare: error: data.val_size"), r.stderr
    assert not data.exists()
