"""Shared builders and fixtures. The package is tested without Snakemake; workflow tests call it.

Specs are built from config.yaml (the one place where defaults live) with a test's
overrides merged in, so tests exercise exactly what a user's config resolves to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from cifar_ensembles.config import spec  # noqa: E402
from cifar_ensembles.config.convert import from_data  # noqa: E402
from cifar_ensembles.config.spec import (
    EnsembleSpec,
    PredictSpec,
    RuntimeSpec,
    TrainingSpec,
    deep_merge,
)
from cifar_ensembles.files import splits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIGS = ROOT / ".test"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


def load_config(*paths) -> dict:
    """The repository's config.yaml merged with `paths`, as Snakemake merges --configfile files."""
    return spec.load_config(ROOT / "config.yaml", *paths)

# The small network and run most trainer tests use (merged over config.yaml's training).
TINY_TRAINING = {
    "epochs": 2, "batch_size": 16,
    "model": {"name": "resnet18_cifar", "width": 4, "pretrained": False, "input_size": None},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "scheduler": {"name": "cosine", "interval": "step"},
    "augment": {"name": "torchvision", "mode": "per_image"},
}
TINY_RUNTIME = {"device": "cpu", "loader": {"num_workers": 0}}


def training_spec(**overrides) -> TrainingSpec:
    """config.yaml's `training` with `overrides` merged in (nested dicts merge key by key)."""
    return from_data(TrainingSpec, deep_merge(load_config()["training"], overrides), "training")


def runtime_spec(**overrides) -> RuntimeSpec:
    """config.yaml's `runtime` with `overrides` merged in."""
    return from_data(RuntimeSpec, deep_merge(load_config()["runtime"], overrides), "runtime")


def tiny_spec(**overrides) -> TrainingSpec:
    """A width-4 CIFAR ResNet-18 for 2 epochs at batch 16 with SGD, plus `overrides`."""
    return training_spec(**deep_merge(TINY_TRAINING, overrides))


def tiny_runtime(**overrides) -> RuntimeSpec:
    """On the CPU, without loader workers, plus `overrides`."""
    return runtime_spec(**deep_merge(TINY_RUNTIME, overrides))


def ensemble_spec(**overrides) -> EnsembleSpec:
    return from_data(EnsembleSpec, deep_merge(load_config()["ensemble"], overrides), "ensemble")


def predict_spec(**overrides) -> PredictSpec:
    runtime = load_config()["runtime"]
    return from_data(PredictSpec, {"device": "cpu", "batch_size": runtime["predict_batch_size"], **overrides})


def make_data(n_train: int = 96, size: int = 16, channels: int = 3, n_val: int = 32, n_test: int = 32,
              seed: int = 0, classes: int = 10) -> dict:
    """Random uint8 images in the layout of splits.split()."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    y = rng.integers(0, classes, n).astype(np.int64)
    train_index, val_index = np.arange(n_train), np.arange(n_train, n)
    mean, std = splits.channel_stats(x[train_index])
    return dict(x_train=x[train_index], y_train=y[train_index], x_val=x[val_index], y_val=y[val_index],
                x_test=rng.integers(0, 256, (n_test, size, size, channels), dtype=np.uint8),
                y_test=rng.integers(0, classes, n_test).astype(np.int64),
                classes=np.array([f"class{i}" for i in range(classes)]), mean=mean, std=std,
                train_index=train_index, val_index=val_index, test_index=np.arange(n_test))


def quiet(_msg) -> None:
    pass


class Log:
    """Collects a trainer's log lines."""

    def __init__(self):
        self.lines = []

    def __call__(self, msg):
        self.lines.append(msg)

    def text(self) -> str:
        return "\n".join(self.lines)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def assert_states_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    different = [k for k in a if not same_bits(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def states_differ(a: dict, b: dict) -> bool:
    return any(not same_bits(a[k], b[k]) for k in a if a[k].is_floating_point())


def load_state(path) -> dict:
    """The state_dict of a model.pt."""
    from cifar_ensembles.files.training_run import ModelRecord

    return ModelRecord.load(path).state_dict


def result_cells(rows) -> list[list[str]]:
    """The result columns of history rows (all but seconds and images_per_second) as
    history.csv writes them (floats in repr form, "" for no value): equal lists, equal bits."""
    from cifar_ensembles.files.training_run import RESULT_FIELDS

    return [["" if getattr(row, k) is None else repr(getattr(row, k)) for k in RESULT_FIELDS] for row in rows]


def cli(*args, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`cifar-ensembles ARGS` in a subprocess (exit status, stdout and stderr as text)."""
    return subprocess.run([sys.executable, "-m", "cifar_ensembles.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_damaged(message: str, path, problem: str = "") -> None:
    """`message` is the one line a damaged file the workflow wrote gives: the file, the
    problem, and how to rebuild it (formats.DamagedFile), with any CLI prefix before it."""
    assert "\n" not in message, message
    assert f"{path}: " in message and problem in message, message
    assert message.endswith(f"rebuild it with: snakemake --forcerun {path}"), message


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory):
    """A tiny cifar-10-python.tar.gz in the upstream layout, and its MD5."""
    from cifar_fixture import make_cifar10_archive

    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    md5 = make_cifar10_archive(path, per_batch=40, test_size=60)
    return path, md5
