"""predict: probabilities and metrics of a trained model.pt, and one-line errors for bad files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import cli, make_data, predict_spec, quiet, tiny_runtime, tiny_spec

from cifar_ensembles.config.convert import to_json
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.arrays import load_probabilities
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.files.training_run import read_history
from cifar_ensembles.stages.predict import load_model, predict_to_files
from cifar_ensembles.stages.train import train_to_files

# One epoch, EMA on (so model.pt holds the EMA weights), cross-entropy, no augmentation.
SPEC = tiny_spec(epochs=1, loss={"name": "cross_entropy"}, augment={"name": "none"},
                 ema={"enabled": True, "decay": 0.5})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """data.npz and the output folder of a one-epoch run (EMA on, cross-entropy loss)."""
    root = tmp_path_factory.mktemp("predict")
    npz = root / "data.npz"
    splits.write(npz, make_data(n_train=64, n_val=24, n_test=40))
    out = train_to_files(SPEC, tiny_runtime(), splits.load(npz), 0, root / "run", None, threads=1, log=quiet)
    return npz, out


@pytest.mark.parametrize("split", ["val", "test"])
def test_predict_writes_probabilities_and_metrics(trained, tmp_path, split):
    npz, out = trained
    probs_path, metrics_path = tmp_path / "probs.npy", tmp_path / "metrics.json"
    returned = predict_to_files(out / "model.pt", npz, split, probs_path, metrics_path,
                                predict_spec(batch_size=7), threads=1)
    data = splits.load(npz)
    labels = data[f"y_{split}"]

    probs = np.load(probs_path)
    assert probs.dtype == np.float32
    assert probs.shape == (len(labels), 10)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # what the ensemble and report stages read back accepts what predict writes
    np.testing.assert_array_equal(load_probabilities(probs_path), probs)

    metrics = json.loads(metrics_path.read_text())
    assert metrics == returned
    assert metrics["split"] == split and metrics["images"] == len(labels)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)), abs=0)
    p_true = probs[np.arange(len(labels)), labels].astype(np.float64)
    assert metrics["nll"] == pytest.approx(float(-np.mean(np.log(p_true))), rel=1e-6)

    if split == "val":  # model.pt holds the EMA weights that training evaluated last
        row = read_history(out / "history.csv")[-1]
        # training computes its accuracy as a float32 mean: equal up to float32 rounding
        assert metrics["accuracy"] == pytest.approx(row.ema_val_acc, abs=1e-7)
        assert metrics["nll"] == pytest.approx(row.ema_val_loss, rel=1e-4)


def test_predict_does_not_depend_on_batch_size(trained, tmp_path):
    npz, out = trained
    predict_to_files(out / "model.pt", npz, "test", tmp_path / "a.npy", tmp_path / "a.json",
                     predict_spec(batch_size=512), threads=1)
    predict_to_files(out / "model.pt", npz, "test", tmp_path / "b.npy", tmp_path / "b.json",
                     predict_spec(batch_size=5), threads=1)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6)


def test_load_model_rebuilds_the_saved_network(trained):
    _, out = trained
    model, record = load_model(out / "model.pt")
    assert record.ema is True and record.num_classes == 10 and record.in_channels == 3
    assert record.model == SPEC.model
    state = model.state_dict()
    assert list(state) == list(record.state_dict)
    assert all(torch.equal(state[k], record.state_dict[k]) for k in state)


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
    elif kind == "field-missing":
        record = torch.load(good, map_location="cpu", weights_only=True)
        del record["num_classes"]
        torch.save(record, path)
    return path


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "not-a-model", "wrong-shapes",
                                  "field-missing", "missing"])
def test_damaged_model_file_is_a_user_error_naming_it(trained, tmp_path, kind):
    npz, out = trained
    bad = tmp_path / "damaged-model.pt"
    if kind != "missing":
        write_corrupt(kind, out / "model.pt", bad)
    with pytest.raises(DamagedFile) as info:
        load_model(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message
    assert message.endswith(f"rebuild it with: snakemake --forcerun {bad}")
    with pytest.raises(UserError, match="damaged-model.pt"):
        predict_to_files(bad, npz, "test", tmp_path / "p.npy", tmp_path / "m.json", predict_spec(), threads=1)
    assert not (tmp_path / "p.npy").exists() and not (tmp_path / "m.json").exists()


def test_model_trained_on_other_data_is_a_user_error(trained, tmp_path):
    _, out = trained
    gray = tmp_path / "gray.npz"
    splits.write(gray, make_data(n_train=64, n_val=24, n_test=40, channels=1))
    with pytest.raises(UserError, match="other data"):
        predict_to_files(out / "model.pt", gray, "test", tmp_path / "p.npy", tmp_path / "m.json",
                         predict_spec(), threads=1)


def test_model_with_non_finite_weights_is_a_user_error(trained, tmp_path):
    npz, out = trained
    model, record = load_model(out / "model.pt")
    state = {k: v.clone() for k, v in record.state_dict.items()}
    first_float = next(k for k, v in state.items() if v.is_floating_point())
    state[first_float].fill_(float("nan"))
    bad = tmp_path / "model.pt"
    dataclasses.replace(record, state_dict=state).save(bad)
    with pytest.raises(UserError, match="non-finite probabilities"):
        predict_to_files(bad, npz, "test", tmp_path / "p.npy", tmp_path / "m.json", predict_spec(), threads=1)
    assert not (tmp_path / "p.npy").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_predict_on_cuda_without_cuda_is_a_user_error(trained, tmp_path):
    npz, out = trained
    with pytest.raises(UserError, match="device"):
        predict_to_files(out / "model.pt", npz, "test", tmp_path / "p.npy", tmp_path / "m.json",
                         predict_spec(device="cuda"), threads=1)


def predict_args(model, npz, probs, metrics, spec=None):
    return ["predict", "--model", model, "--data", npz, "--split", "test", "--probs", probs,
            "--metrics", metrics, "--spec", to_json(spec or predict_spec()), "--threads", "1"]


def test_cli_predict_writes_files(trained, tmp_path):
    from cifar_ensembles.cli import main

    npz, out = trained
    probs, metrics = tmp_path / "p.npy", tmp_path / "m.json"
    assert main(list(map(str, predict_args(out / "model.pt", npz, probs, metrics,
                                           predict_spec(batch_size=9))))) == 0
    assert load_probabilities(probs).shape == (40, 10)
    assert json.loads(metrics.read_text())["images"] == 40


def test_cli_bad_predict_spec_is_one_line(trained, tmp_path, capsys):
    from cifar_ensembles.cli import main

    npz, out = trained
    args = list(map(str, predict_args(out / "model.pt", npz, tmp_path / "p.npy", tmp_path / "m.json")))
    args[args.index("--spec") + 1] = json.dumps({"device": "cpu"})
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--spec.batch_size: missing" in err[0], err
    assert not (tmp_path / "p.npy").exists()


def test_cli_corrupt_model_exits_2_with_one_line(trained, tmp_path):
    npz, out = trained
    bad = write_corrupt("truncated", out / "model.pt", tmp_path / "model.pt")
    proc = cli(*predict_args(bad, npz, tmp_path / "p.npy", tmp_path / "m.json"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], proc.stderr
    assert f"snakemake --forcerun {bad}" in lines[0]
    assert not (tmp_path / "p.npy").exists()
