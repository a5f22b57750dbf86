"""predict: probabilities and metrics of a trained model.pt, and one-line errors for bad files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cifar_ensembles import prepare
from cifar_ensembles.errors import UserError
from cifar_ensembles.predict import load_model, predict_to_files
from cifar_ensembles.train import train_to_files

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
SPEC = {"epochs": 1, "batch_size": 16, "model": {"name": "resnet18_cifar", "width": 4},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "scheduler": {"name": "cosine", "interval": "step"}, "loss": {"name": "cross_entropy"},
        "augment": {"name": "none"}, "ema": {"enabled": True, "decay": 0.5},
        "loader": {"num_workers": 0}, "device": "cpu"}


def make_data(n_train: int = 64, size: int = 16, channels: int = 3, n_val: int = 24, n_test: int = 40,
              seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, size, size, channels), dtype=np.uint8)
    mean, std = prepare.channel_stats(x_train)
    return dict(x_train=x_train, y_train=rng.integers(0, 10, n_train).astype(np.int64),
                x_val=rng.integers(0, 256, (n_val, size, size, channels), dtype=np.uint8),
                y_val=rng.integers(0, 10, n_val).astype(np.int64),
                x_test=rng.integers(0, 256, (n_test, size, size, channels), dtype=np.uint8),
                y_test=rng.integers(0, 10, n_test).astype(np.int64),
                classes=np.array([f"class{i}" for i in range(10)]), mean=mean, std=std,
                train_index=np.arange(n_train), val_index=np.arange(n_train, n_train + n_val),
                test_index=np.arange(n_test))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """data.npz and the output folder of a one-epoch run (EMA on, cross-entropy loss)."""
    root = tmp_path_factory.mktemp("predict")
    npz = root / "data.npz"
    prepare.write(npz, make_data())
    out = train_to_files(SPEC, prepare.load(npz), 0, root / "run", None, log=lambda msg: None)
    return npz, out


def last_history_row(out) -> dict:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


@pytest.mark.parametrize("split", ["val", "test"])
def test_predict_writes_probabilities_and_metrics(trained, tmp_path, split):
    npz, out = trained
    probs_path, metrics_path = tmp_path / "probs.npy", tmp_path / "metrics.json"
    returned = predict_to_files(out / "model.pt", npz, split, probs_path, metrics_path, batch_size=7)
    data = prepare.load(npz)
    labels = data[f"y_{split}"]

    probs = np.load(probs_path)
    assert probs.dtype == np.float32
    assert probs.shape == (len(labels), 10)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    metrics = json.loads(metrics_path.read_text())
    assert metrics == returned
    assert metrics["split"] == split and metrics["images"] == len(labels)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)), abs=0)
    p_true = probs[np.arange(len(labels)), labels].astype(np.float64)
    assert metrics["nll"] == pytest.approx(float(-np.mean(np.log(p_true))), rel=1e-6)

    if split == "val":  # model.pt holds the EMA weights that training evaluated last
        row = last_history_row(out)
        assert metrics["accuracy"] == pytest.approx(float(row["ema_val_acc"]), abs=1e-9)
        assert metrics["nll"] == pytest.approx(float(row["ema_val_loss"]), rel=1e-4)


def test_predict_does_not_depend_on_batch_size(trained, tmp_path):
    npz, out = trained
    predict_to_files(out / "model.pt", npz, "test", tmp_path / "a.npy", tmp_path / "a.json", batch_size=512)
    predict_to_files(out / "model.pt", npz, "test", tmp_path / "b.npy", tmp_path / "b.json", batch_size=5)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6)


def test_load_model_rebuilds_the_saved_network(trained):
    _, out = trained
    model, record = load_model(out / "model.pt")
    assert record["ema"] is True and record["num_classes"] == 10
    state = model.state_dict()
    assert list(state) == list(record["state_dict"])
    assert all(torch.equal(state[k], record["state_dict"][k]) for k in state)


def write_corrupt(kind: str, good, path):
    blob = good.read_bytes()
    if kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(len(blob) // 4))
    elif kind == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-a-model":
        torch.save({"state_dict": {}}, path)
    elif kind == "wrong-shapes":
        record = torch.load(good, map_location="cpu", weights_only=True)
        record["model"] = {**record["model"], "width": 8}
        torch.save(record, path)
    return path


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "not-a-model", "wrong-shapes", "missing"])
def test_damaged_model_file_is_a_user_error_naming_it(trained, tmp_path, kind):
    npz, out = trained
    bad = tmp_path / "damaged-model.pt"
    if kind != "missing":
        write_corrupt(kind, out / "model.pt", bad)
    with pytest.raises(UserError) as info:
        load_model(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message
    with pytest.raises(UserError, match="damaged-model.pt"):
        predict_to_files(bad, npz, "test", tmp_path / "p.npy", tmp_path / "m.json")
    assert not (tmp_path / "p.npy").exists() and not (tmp_path / "m.json").exists()


def test_model_trained_on_other_data_is_a_user_error(trained, tmp_path):
    _, out = trained
    gray = tmp_path / "gray.npz"
    prepare.write(gray, make_data(channels=1))
    with pytest.raises(UserError, match="other data"):
        predict_to_files(out / "model.pt", gray, "test", tmp_path / "p.npy", tmp_path / "m.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_cuda_without_cuda_is_a_user_error(trained, tmp_path):
    npz, out = trained
    with pytest.raises(UserError, match="device"):
        predict_to_files(out / "model.pt", npz, "test", tmp_path / "p.npy", tmp_path / "m.json",
                         device="cuda")


def test_cli_corrupt_model_exits_2_with_one_line(trained, tmp_path):
    npz, out = trained
    bad = write_corrupt("truncated", out / "model.pt", tmp_path / "model.pt")
    proc = subprocess.run([sys.executable, "-m", "cifar_ensembles", "predict", "--model", str(bad),
                           "--data", str(npz), "--split", "test", "--probs", str(tmp_path / "p.npy"),
                           "--metrics", str(tmp_path / "m.json")],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], proc.stderr
    assert not (tmp_path / "p.npy").exists()
