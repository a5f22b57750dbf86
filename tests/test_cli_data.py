"""`cifar-ensembles download` and `prepare` as the workflow calls them: separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import CLASSES, make_cifar10_archive

from cifar_ensembles import prepare
from cifar_ensembles.datasets import fetch

ARCHIVE = "cifar-10-python.tar.gz"
ERROR_PREFIX = "cifar-ensembles download: error:"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", "cifar_ensembles", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("cli_cifar") / ARCHIVE
    md5 = make_cifar10_archive(path, per_batch=20, test_size=30, seed=1)
    return path, md5


def test_download_then_prepare(archive, tmp_path):
    path, md5 = archive
    raw = tmp_path / "resources" / "cifar10"
    r = run_cli("download", "--dataset", "cifar10", "--out", raw, "--source", path, "--md5", md5,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (raw / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert [p.name for p in raw.parent.iterdir()] == ["cifar10"]

    data = tmp_path / "results" / "data.npz"
    r = run_cli("prepare", "--dataset", "cifar10", "--raw", raw, "--out", data, "--val-size", "20",
                "--split-seed", "0", "--train-subset", "50", "--test-subset", "20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert data.is_file()
    assert [p.name for p in data.parent.iterdir()] == ["data.npz"]
    d = prepare.load(data)
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
    r = run_cli("download", "--dataset", "cifar10", "--out", raw, "--source", bad, "--md5", md5,
                cwd=tmp_path)
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
    r = run_cli("prepare", "--dataset", "cifar10", "--raw", raw, "--out", data, "--val-size", "5000",
                cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifar-ensembles prepare: error: data.val_size"), r.stderr
    assert not data.exists()
