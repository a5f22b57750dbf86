"""Atomic writes: all or nothing, and files as readable as any other the user creates."""

import errno
import os
import stat

import numpy as np
import pytest

from cifar_ensembles.errors import UserError
from cifar_ensembles.files.atomic import atomic_path, atomic_write, save_npy, write_text
from cifar_ensembles.files.raw_data import fetch


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


def test_a_full_disk_inside_atomic_write_is_one_line_naming_the_output(tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(UserError, match=rf"^{out}: cannot write: No space left on device$"):
        with atomic_write(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_an_input_that_fails_inside_atomic_path_is_not_called_a_write_error(tmp_path):
    """Reading an input inside the block (a user's weights file, say) fails as itself."""
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes((tmp_path / "missing.pth").read_bytes())
    assert list(tmp_path.iterdir()) == []
