"""CIFAR-100 through the same fetch/load path: fine labels, 100 class names."""

import pickle
import tarfile

import numpy as np
from cifar_fixture import make_cifar100_archive

from cifar_ensembles.files.raw_data import fetch, load_raw


def test_cifar100_archive_loads_fine_labels(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    md5 = make_cifar100_archive(archive, train_size=120, test_size=30)
    raw = fetch("cifar100", tmp_path / "raw", source=str(archive), md5=md5)
    arrays = load_raw("cifar100", raw)
    with tarfile.open(archive) as tar:
        train = pickle.load(tar.extractfile("cifar-100-python/train"), encoding="latin1")
    assert arrays["x_train"].shape == (120, 32, 32, 3) and arrays["x_test"].shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(arrays["y_train"], train["fine_labels"])
    first = np.asarray(train["data"][0], dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(arrays["x_train"][0], first)
    assert len(arrays["classes"]) == 100 and arrays["classes"][7] == "fine_7"
