"""Atomic writes: all or nothing, and files as readable as any other the user creates."""

import os
import stat

import numpy as np
import pytest

from cifar_ensembles.atomic import atomic_path, save_npy, write_text
from cifar_ensembles.raw_data import fetch


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_follow_the_umask_not_mkstemps_0600(tmp_path, umask_022):
    write_text(tmp_path / "a.txt", "x")
    save_npy(tmp_path / "b.npy", np.zeros(3))
    for name in ("a.txt", "b.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_fetched_folder_follows_the_umask(tmp_path, umask_022, cifar_archive):
    archive, md5 = cifar_archive
    out = fetch("cifar10", tmp_path / "raw", source=str(archive), md5=md5)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "model.pt") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
