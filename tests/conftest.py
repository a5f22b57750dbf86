"""Shared fixtures. The package is tested without Snakemake; workflow tests call it."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory):
    """A tiny cifar-10-python.tar.gz in the upstream layout, and its MD5."""
    from cifar_fixture import make_cifar10_archive

    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    md5 = make_cifar10_archive(path, per_batch=40, test_size=60)
    return path, md5
