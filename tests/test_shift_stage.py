"""The shift stage on tiny data, through its functions and `cli.main`: corrupted sets (generated,
or read from a local CIFAR-10-C folder or archive), predictions on them, shift.json and
diversity.json against direct computations, the figures and summary sections, and the one-line
errors of damaged files.

One experiment ("exp", 3 seeds: one model trained for an epoch, two with random weights) and a
baseline ("base", 2 seeds with random weights) on 40 test images of 32 x 32 x 3, of which the
sets use a stratified 20; CIFAR-10-C is faked with CIFAR10C_IMAGES patched to 50 images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_damaged,
    cli,
    ensemble_spec,
    load_config,
    make_data,
    predict_spec,
    quiet,
    tiny_runtime,
    tiny_spec,
)

from cifar_ensembles.analysis import diversity
from cifar_ensembles.analysis.metrics import nll, temperature_scale
from cifar_ensembles.analysis.votes import hard_vote
from cifar_ensembles.cli import main
from cifar_ensembles.config.convert import from_data, to_data, to_json
from cifar_ensembles.config.spec import ShiftSetSpec, ShiftSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.ensemble_summary import EnsembleSummary
from cifar_ensembles.files.shift_summary import DiversitySummary, ShiftSummary
from cifar_ensembles.files.training_run import ModelRecord
from cifar_ensembles.models import build_model
from cifar_ensembles.stages import shift as stage
from cifar_ensembles.stages.ensemble import ensemble_to_files
from cifar_ensembles.stages.predict import predict_shift, predict_to_files
from cifar_ensembles.stages.report import summary
from cifar_ensembles.stages.train import train_to_files
from cifar_ensembles.transforms.corruptions import SEVERITIES, corrupt, set_seed

SHIFT = from_data(ShiftSpec, load_config()["shift"], "shift")
CORRUPTIONS = ("gaussian_noise", "contrast", "motion_blur")
IMAGES, N_TEST, CLASSES = 20, 40, 10
EXPERIMENTS = {"exp": [0, 1, 2], "base": [3, 4]}
ENSEMBLE = ensemble_spec(max_subsets=4, bootstrap=200)
PNG = b"\x89PNG\r\n\x1a\n"


def set_spec(images=IMAGES, seed=0, corruption="gaussian_noise", source=None, md5=None) -> ShiftSetSpec:
    return ShiftSetSpec(source=None if source is None else str(source), md5=md5, images=images, seed=seed,
                        corruption=SHIFT.corruptions[corruption])


def random_model(path: Path, seed: int, data: dict) -> Path:
    """A model.pt with random weights (what predict reads; no training needed)."""
    spec = tiny_spec().model
    torch.manual_seed(seed)
    model = build_model(spec, CLASSES, data["x_train"].shape[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    ModelRecord(model=spec, num_classes=CLASSES, in_channels=data["x_train"].shape[-1],
                mean=tuple(float(m) for m in data["mean"]), std=tuple(float(s) for s in data["std"]),
                ema=False, state_dict=model.state_dict()).save(path)
    return path


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(-1) == labels))


def summarize_shift(files: dict, sets: dict, data_path, spec, root: Path) -> stage.BaselineFiles:
    """shift.json of "exp" (against the baseline "base") and of "base" (no baseline), into
    files[name]["result"]; the baseline's files."""
    baseline = stage.BaselineFiles(name="base", test=[str(p) for p in files["base"]["test"]],
                                   shift={c: str(p) for c, p in files["base"]["shift"].items()})
    for name, base in (("exp", baseline), ("base", None)):
        f = files[name]
        f["shift.json"] = root / name / "shift.json"
        f["result"] = stage.shift_summary_to_file(name, f["summary"], f["test"], f["shift"], sets, data_path,
                                                  spec, base, f["shift.json"])
    return baseline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the stage writes for "exp" (baseline "base") and "base" (no baseline)."""
    root = tmp_path_factory.mktemp("shift")
    data_path = root / "data.npz"
    splits.write(data_path, make_data(n_train=32, size=32, n_val=20, n_test=N_TEST, classes=CLASSES))
    data = splits.load(data_path)
    sets = {}
    for c in CORRUPTIONS:
        sets[c] = root / "shift" / f"{c}.npz"
        stage.make_shift_set("cifar10", c, set_spec(corruption=c), data_path, sets[c])
    files = {}
    for name, seeds in EXPERIMENTS.items():
        models, val, test = [], [], []
        for seed in seeds:
            d = root / name / str(seed)
            if seed == 0:  # one trained model: what the workflow's predict reads
                train_to_files(tiny_spec(epochs=1), tiny_runtime(), data, seed, d, None, threads=1, log=quiet)
                models.append(d / "model.pt")
            else:
                models.append(random_model(d / "model.pt", seed, data))
            for split, paths in (("val", val), ("test", test)):
                paths.append(d / f"probs_{split}.npy")
                predict_to_files(models[-1], data_path, split, paths[-1], d / f"metrics_{split}.json",
                                 predict_spec(), threads=1)
        summary = root / name / "ensemble.json"
        ensemble_to_files(data_path, seeds, val, test, ENSEMBLE, root / name / "ensemble.csv", summary)
        shift = {}
        for c in CORRUPTIONS:
            shift[c] = root / name / "shift" / f"{c}.npy"
            predict_shift([str(m) for m in models], sets[c], shift[c], predict_spec(batch_size=16), threads=1)
        files[name] = {"models": models, "test": test, "summary": summary, "shift": shift}
    baseline = summarize_shift(files, sets, data_path, ENSEMBLE, root)
    for name in ("exp", "base"):
        f = files[name]
        f["diversity.json"] = root / name / "diversity.json"
        f["diversity"] = stage.diversity_to_file(EXPERIMENTS[name], f["test"], data_path, f["shift"], sets,
                                                 f["diversity.json"])
    return {"root": root, "data_path": data_path, "data": data, "sets": sets, "files": files,
            "baseline": baseline}


def read(world, name: str) -> dict:
    """An experiment's arrays: members' test probs on the sets' images, shift probs, labels."""
    index = np.load(world["sets"][CORRUPTIONS[0]])["index"]
    f = world["files"][name]
    return {"test": np.stack([np.load(p) for p in f["test"]])[:, index],
            "shift": {c: np.load(p) for c, p in f["shift"].items()},
            "y": world["data"]["y_test"][index], "summary": EnsembleSummary.load(f["summary"])}


def skilled(rng, labels: np.ndarray, skill: float, members: int) -> np.ndarray:
    """members x N x C probabilities whose true class gets a large bonus with probability `skill`."""
    p = rng.dirichlet(np.ones(CLASSES), (members, len(labels)))
    bonus = rng.random((members, len(labels))) < skill
    p[:, np.arange(len(labels)), labels] += 1.5 * bonus
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def synthetic(world, root: Path, method: str) -> dict:
    """The world's sets and data with written probabilities whose skill falls with the severity
    (and differs by corruption), so every corruption error, relative ones included, is defined;
    the ensemble votes `method`."""
    rng = np.random.default_rng(11)
    data = world["data"]
    spec = ensemble_spec(method=method, max_subsets=4, bootstrap=200)
    files = {}
    for name, skill in (("exp", 0.85), ("base", 0.75)):
        seeds = EXPERIMENTS[name]
        d = root / name
        d.mkdir()
        val, test = [], []
        for m, seed in enumerate(seeds):
            for split, paths in (("val", val), ("test", test)):
                paths.append(d / f"{seed}_probs_{split}.npy")
                np.save(paths[-1], skilled(rng, data[f"y_{split}"], skill - 0.05 * m, 1)[0])
        summary = d / "ensemble.json"
        ensemble_to_files(world["data_path"], seeds, val, test, spec, d / "ensemble.csv", summary)
        shift = {}
        for i, c in enumerate(CORRUPTIONS):
            y = np.load(world["sets"][c])["y"]
            drop = 0.1 + 0.03 * i
            probs = np.stack([skilled(rng, y, skill - drop * s, len(seeds)) for s in SEVERITIES], axis=1)
            shift[c] = d / f"{c}.npy"
            np.save(shift[c], probs)
        files[name] = {"test": test, "summary": summary, "shift": shift}
    baseline = summarize_shift(files, world["sets"], world["data_path"], spec, root)
    return {"data_path": world["data_path"], "data": data, "sets": world["sets"], "files": files,
            "baseline": baseline, "method": method}


@pytest.fixture(scope="module")
def synthetics(world, tmp_path_factory) -> dict:
    return {method: synthetic(world, tmp_path_factory.mktemp(method), method) for method in ("soft", "hard")}


@pytest.fixture(params=["models", "soft", "hard"])
def case(request, world, synthetics):
    """The stage's outputs from real models' predictions (soft vote), or from written
    probabilities with a soft or a hard vote."""
    return world if request.param == "models" else synthetics[request.param]


def vote(probs: np.ndarray, summary: EnsembleSummary) -> np.ndarray:
    """The chosen ensemble's predicted classes (members x N x C probabilities)."""
    k = summary.chosen_k
    return hard_vote(probs[:k]) if summary.method == "hard" else probs[:k].mean(0).argmax(-1)


# ------------------------------------------------------------------ generated sets
def test_shift_set_is_the_corrupted_stratified_subset(world):
    data = world["data"]
    y_test = data["y_test"]
    for c in CORRUPTIONS:
        with np.load(world["sets"][c]) as npz:
            x, y, index = npz["x"], npz["y"], npz["index"]
        assert x.shape == (5, IMAGES, 32, 32, 3) and x.dtype == np.uint8
        assert np.array_equal(y, y_test[index])
        assert len(index) == IMAGES and np.all(np.diff(index) > 0) and index.max() < N_TEST
        classes, counts = np.unique(y_test, return_counts=True)
        taken = dict(zip(*np.unique(y, return_counts=True)))
        for k, n in zip(classes, counts):  # class shares kept (largest remainder)
            assert abs(taken.get(k, 0) - n * IMAGES / N_TEST) < 1
        spec = SHIFT.corruptions[c]
        for s in SEVERITIES:
            expected = corrupt(data["x_test"][index], spec.transform, spec.severities[s - 1],
                               set_seed(0, c, s), c)
            assert np.array_equal(x[s - 1], expected), (c, s)
    # every set holds the same images
    indexes = [np.load(world["sets"][c])["index"] for c in CORRUPTIONS]
    assert all(np.array_equal(i, indexes[0]) for i in indexes)


def test_shift_set_is_deterministic_and_seeded(world, tmp_path):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    stage.make_shift_set("cifar10", "gaussian_noise", set_spec(), world["data_path"], a)
    stage.make_shift_set("cifar10", "gaussian_noise", set_spec(), world["data_path"], b)
    stage.make_shift_set("cifar10", "gaussian_noise", set_spec(seed=1), world["data_path"], c)
    first, again, other = (dict(np.load(p)) for p in (a, b, c))
    assert all(first[k].tobytes() == again[k].tobytes() for k in ("x", "y", "index"))
    assert np.array_equal(first["x"], np.load(world["sets"]["gaussian_noise"])["x"])
    assert first["x"].tobytes() != other["x"].tobytes()


def test_shift_set_of_the_whole_test_split(world, tmp_path):
    out = tmp_path / "all.npz"
    x = stage.make_shift_set("cifar10", "contrast", set_spec(images=None, corruption="contrast"),
                             world["data_path"], out)
    with np.load(out) as npz:
        assert np.array_equal(npz["index"], np.arange(N_TEST))
        assert np.array_equal(npz["y"], world["data"]["y_test"])
    assert x.shape == (5, N_TEST, 32, 32, 3)


@pytest.mark.parametrize("images", [0, N_TEST + 1])
def test_shift_images_out_of_range_names_the_field(world, tmp_path, images):
    with pytest.raises(UserError, match=rf"^shift\.images: {images} must be between 1 and the {N_TEST} test"):
        stage.make_shift_set("cifar10", "contrast", set_spec(images=images, corruption="contrast"),
                             world["data_path"], tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_shift_set_of_grayscale_images_through_the_cli(tmp_path, capsys):
    """Fashion-MNIST-like 28 x 28 x 1 images, fog (drawn in RGB, given back as luminance)."""
    data_path = tmp_path / "data.npz"
    splits.write(data_path, make_data(n_train=8, size=28, channels=1, n_val=4, n_test=12))
    out = tmp_path / "fog.npz"
    spec = set_spec(images=None, corruption="fog")
    assert main(["shift-set", "--dataset", "fashion_mnist", "--corruption", "fog", "--spec", to_json(spec),
                 "--data", str(data_path), "--out", str(out)]) == 0
    assert "fog: severities 1-5 of 12 test images" in capsys.readouterr().err
    x = stage.load_shift_set(out)["x"]
    assert x.shape == (5, 12, 28, 28, 1) and x.dtype == np.uint8


# ------------------------------------------------------------------ a local CIFAR-10-C
ORIGINAL = 50  # stands in for CIFAR-10's 10000 test images


@pytest.fixture
def cifar10c(tmp_path, monkeypatch):
    """A fake CIFAR-10-C (folder and tar archive) over ORIGINAL test images, and a data.npz whose
    test split is 30 of them: row (s - 1) x ORIGINAL + j of <name>.npy is marked (s, j, 7)."""
    monkeypatch.setattr(stage, "CIFAR10C_IMAGES", ORIGINAL)
    rng = np.random.default_rng(5)
    labels = rng.integers(0, CLASSES, ORIGINAL)
    data = make_data(n_train=8, size=32, n_val=4, n_test=30, classes=CLASSES)
    data["test_index"] = np.sort(rng.choice(ORIGINAL, 30, replace=False))
    data["y_test"] = labels[data["test_index"]]
    data_path = tmp_path / "data.npz"
    splits.write(data_path, data)
    x = np.zeros((5 * ORIGINAL, 32, 32, 3), np.uint8)
    for s in SEVERITIES:
        for j in range(ORIGINAL):
            x[(s - 1) * ORIGINAL + j, 0, 0] = (s, j, 7)
    folder = tmp_path / "download" / "CIFAR-10-C"
    folder.mkdir(parents=True)
    np.save(folder / "gaussian_noise.npy", x)
    np.save(folder / "labels.npy", np.tile(labels, 5))
    archive = tmp_path / "CIFAR-10-C.tar"
    with tarfile.open(archive, "w") as tar:
        for file in ("gaussian_noise.npy", "labels.npy"):
            tar.add(folder / file, arcname=f"CIFAR-10-C/{file}")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    return {"data_path": data_path, "data": data, "folder": folder, "archive": archive, "md5": md5,
            "labels": labels, "x": x, "tmp": tmp_path}


def check_cifar10c_set(case, out: Path, images: int) -> None:
    with np.load(out) as npz:
        x, y, index = npz["x"], npz["y"], npz["index"]
    assert x.shape == (5, images, 32, 32, 3)
    original = case["data"]["test_index"][index]
    for s in SEVERITIES:
        assert np.array_equal(x[s - 1, :, 0, 0, 0], np.full(images, s))
        assert np.array_equal(x[s - 1, :, 0, 0, 1], original)  # the right image of the original set
        assert np.all(x[s - 1, :, 0, 0, 2] == 7)
    assert np.array_equal(y, case["labels"][original])


@pytest.mark.parametrize("where", ["folder", "parent folder", "archive"])
def test_cifar10c_is_read_from_a_folder_or_an_archive(cifar10c, where):
    source = {"folder": cifar10c["folder"], "parent folder": cifar10c["folder"].parent,
              "archive": cifar10c["archive"]}[where]
    md5 = cifar10c["md5"] if where == "archive" else None
    out = cifar10c["tmp"] / "set.npz"
    stage.make_shift_set("cifar10", "gaussian_noise", set_spec(images=12, source=source, md5=md5),
                         cifar10c["data_path"], out)
    check_cifar10c_set(cifar10c, out, 12)
    generated = stage.make_shift_set("cifar10", "gaussian_noise", set_spec(images=12),
                                     cifar10c["data_path"], cifar10c["tmp"] / "generated.npz")
    assert np.array_equal(np.load(out)["index"], np.load(cifar10c["tmp"] / "generated.npz")["index"])
    assert generated.shape == np.load(out)["x"].shape


def test_cifar10c_through_the_cli(cifar10c, capsys):
    out = cifar10c["tmp"] / "set.npz"
    spec = set_spec(images=None, source=cifar10c["archive"], md5=cifar10c["md5"])
    argv = ["shift-set", "--dataset", "cifar10", "--corruption", "gaussian_noise", "--data",
            str(cifar10c["data_path"])]
    assert main([*argv, "--spec", to_json(spec), "--out", str(out)]) == 0
    assert "gaussian_noise: severities 1-5 of 30 test images" in capsys.readouterr().err
    check_cifar10c_set(cifar10c, out, 30)
    spec = dataclasses.replace(spec, md5=None)
    assert main([*argv, "--spec", to_json(spec), "--out", str(cifar10c["tmp"] / "other.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shift.md5: required with an archive" in err
    assert not (cifar10c["tmp"] / "other.npz").exists()


def damage_cifar10c(case, how: str) -> tuple[str, str | None, str]:
    """(source, md5, corruption) of a bad CIFAR-10-C."""
    folder, archive, md5 = case["folder"], case["archive"], case["md5"]
    if how == "archive without md5":
        return archive, None, "gaussian_noise"
    if how == "checksum mismatch":
        return archive, "0" * 32, "gaussian_noise"
    if how == "no such corruption in the archive":
        return archive, md5, "fog"
    if how == "no such corruption in the folder":
        return folder, None, "fog"
    if how == "no such source":
        return folder.parent / "missing", None, "gaussian_noise"
    if how == "no labels":
        (folder / "labels.npy").unlink()
    elif how == "wrong labels":
        labels = np.load(folder / "labels.npy")
        np.save(folder / "labels.npy", (labels + 1) % CLASSES)
    elif how == "wrong shape":
        np.save(folder / "gaussian_noise.npy", case["x"][:-1])
    elif how == "pickled array":
        np.save(folder / "gaussian_noise.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif how == "not an array":
        (folder / "gaussian_noise.npy").write_bytes(b"PK\x03\x04 not numpy")
    elif how == "archive not a tar":
        archive.write_bytes(b"not a tar archive at all" * 10)
        return archive, hashlib.md5(archive.read_bytes()).hexdigest(), "gaussian_noise"
    return folder, None, "gaussian_noise"


@pytest.mark.parametrize("how, problem", [
    ("archive without md5", "shift.md5: required with an archive in shift.source"),
    ("checksum mismatch", "checksum mismatch (expected MD5 00000000000000000000000000000000)"),
    ("no such corruption in the archive", "no fog.npy in the archive"),
    ("no such corruption in the folder", "no fog.npy (CIFAR-10-C names its corruptions' files so)"),
    ("no such source", "no such file or folder"),
    ("no labels", "no labels.npy beside gaussian_noise.npy"),
    ("wrong labels", "gaussian_noise.npy: its labels do not match the CIFAR-10 test split"),
    ("wrong shape", "gaussian_noise.npy must be 250 x 32 x 32 x 3 uint8 with 250 labels"),
    ("pickled array", "not a plain .npy array"),
    ("not an array", "not a plain .npy array"),
    ("archive not a tar", "cannot read"),
])
def test_bad_cifar10c_is_one_line_naming_the_field(cifar10c, how, problem):
    source, md5, name = damage_cifar10c(cifar10c, how)
    out = cifar10c["tmp"] / "set.npz"
    with pytest.raises(UserError) as err:
        stage.make_shift_set("cifar10", name, set_spec(images=12, source=source, md5=md5, corruption=name),
                             cifar10c["data_path"], out)
    message = str(err.value)
    assert "\n" not in message and problem in message, message
    field = "shift.md5" if how == "archive without md5" else "shift.source"
    assert message.startswith(f"{field}: "), message
    assert not out.exists()


def test_cifar10c_stands_in_for_cifar10_only(cifar10c):
    only = "^shift.source: CIFAR-10-C stands in for cifar10 only, not cifar100$"
    with pytest.raises(UserError, match=only):
        stage.make_shift_set("cifar100", "gaussian_noise", set_spec(source=cifar10c["folder"]),
                             cifar10c["data_path"], cifar10c["tmp"] / "set.npz")


# ------------------------------------------------------------------ predictions
def test_predict_shift_gives_member_severity_image_class_probabilities(world):
    set_x = stage.load_shift_set(world["sets"]["contrast"])["x"]
    for name, seeds in EXPERIMENTS.items():
        for c in CORRUPTIONS:
            probs = np.load(world["files"][name]["shift"][c])
            assert probs.shape == (len(seeds), 5, IMAGES, CLASSES) and probs.dtype == np.float32
            assert np.all(probs >= 0)
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # member 0 of "exp" on the contrast set equals predict on those images
    from cifar_ensembles.compute.inference import predict_logits, softmax_np
    from cifar_ensembles.stages.predict import PREDICT_PRECISION, load_model

    model, record = load_model(world["files"]["exp"]["models"][0])
    logits = predict_logits(model, set_x[4], np.asarray(record.mean, np.float32),
                            np.asarray(record.std, np.float32), torch.device("cpu"), 7, PREDICT_PRECISION)
    np.testing.assert_allclose(np.load(world["files"]["exp"]["shift"]["contrast"])[0, 4], softmax_np(logits),
                               atol=1e-5)


def predict_shift_args(files: dict, name: str, out, batch_size: int = 5) -> list:
    """predict-shift's arguments for one experiment's members, less --set."""
    return ["--models", *[str(m) for m in files[name]["models"]], "--out", str(out),
            "--spec", json.dumps(to_data(predict_spec(batch_size=batch_size))), "--threads", "1"]


def test_predict_shift_through_the_cli_equals_the_function(world, tmp_path):
    """One job per experiment and corruption: the experiment's members, one file."""
    for name in EXPERIMENTS:
        out = tmp_path / f"{name}.npy"
        assert main(["predict-shift", "--set", str(world["sets"]["contrast"]),
                     *predict_shift_args(world["files"], name, out)]) == 0
        expected = np.load(world["files"][name]["shift"]["contrast"])
        np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


def test_predict_shift_refuses_a_model_of_other_channels(world, tmp_path):
    gray = make_data(n_train=4, size=32, channels=1, n_val=2, n_test=2)
    model = random_model(tmp_path / "gray.pt", 0, gray)
    models = [str(m) for m in world["files"]["base"]["models"]] + [str(model)]
    with pytest.raises(UserError, match="the model takes 1 channels"):
        predict_shift(models, world["sets"]["contrast"], tmp_path / "p.npy", predict_spec(), 1)
    # the members predicted before the failure leave no file
    assert not (tmp_path / "p.npy").exists()


# ------------------------------------------------------------------ shift.json
def test_shift_summary_holds_every_set_and_the_clean_one(case):
    r = case["files"]["exp"]["result"]
    a = read(case, "exp")
    assert r.experiment == "exp" and r.seeds == EXPERIMENTS["exp"] and r.images == IMAGES
    assert r.corruptions == list(CORRUPTIONS) and r.method == a["summary"].method
    assert r.members == a["summary"].members
    assert [(x.corruption, x.severity) for x in r.sets] == [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    assert (r.clean.corruption, r.clean.severity) == ("none", 0)
    k, y = a["summary"].chosen_k, a["y"]
    for x in [r.clean, *r.sets]:
        probs = a["test"] if x.severity == 0 else a["shift"][x.corruption][:, x.severity - 1]
        assert len(x.singles) == 3
        for m, single in enumerate(x.singles):
            t = a["summary"].singles[m].calibration.temperature
            assert single.accuracy == pytest.approx(accuracy(probs[m], y))
            assert single.nll == pytest.approx(nll(probs[m], y))
            assert single.scaled.nll == pytest.approx(nll(temperature_scale(probs[m], t), y))
            assert single.scaled.accuracy == single.accuracy
        assert x.single_mean.accuracy == pytest.approx(np.mean([accuracy(p, y) for p in probs]))
        assert x.single_mean.ece == pytest.approx(np.mean([s.ece for s in x.singles]))
        assert x.ensemble.accuracy == pytest.approx(np.mean(vote(probs, a["summary"]) == y))
        assert x.ensemble.scaled.accuracy == x.ensemble.accuracy
        assert x.ensemble.nll == pytest.approx(nll(probs[:k].mean(0), y), rel=1e-5)
        t = a["summary"].calibration.temperature
        scaled = temperature_scale(probs[:k].mean(0), t)
        assert x.ensemble.scaled.nll == pytest.approx(nll(scaled, y), rel=1e-5)


def test_gain_by_severity_against_a_direct_computation(case):
    r = case["files"]["exp"]["result"]
    a = read(case, "exp")
    y = a["y"]
    assert [g.severity for g in r.by_severity] == list(SEVERITIES)
    for g in r.by_severity:
        single = np.mean([accuracy(a["shift"][c][m, g.severity - 1], y)
                          for c in CORRUPTIONS for m in range(3)])
        ensemble = np.mean([vote(a["shift"][c][:, g.severity - 1], a["summary"]) == y for c in CORRUPTIONS])
        assert g.single_accuracy == pytest.approx(single)
        assert g.ensemble_accuracy == pytest.approx(ensemble)
        assert g.gain == pytest.approx(ensemble - single)
        assert g.ci[0] <= g.gain <= g.ci[1]
    if "method" in case:  # written probabilities: accuracy falls with severity
        accuracies = [g.single_accuracy for g in r.by_severity]
        assert accuracies[0] > accuracies[-1]


def _direct_errors(a: dict) -> dict:
    """Per corruption, the 5 top-1 errors of the mean single model and of the chosen ensemble."""
    y = a["y"]
    single = {c: np.array([1 - np.mean([accuracy(p, y) for p in a["shift"][c][:, i]]) for i in range(5)])
              for c in CORRUPTIONS}
    ensemble = {c: np.array([1 - np.mean(vote(a["shift"][c][:, i], a["summary"]) == y) for i in range(5)])
                for c in CORRUPTIONS}
    clean = (1 - np.mean([accuracy(p, y) for p in a["test"]]),
             1 - np.mean(vote(a["test"], a["summary"]) == y))
    return {"single": single, "ensemble": ensemble, "clean": clean}


def test_corruption_error_against_the_baseline_equals_a_direct_computation(case):
    ce = case["files"]["exp"]["result"].corruption_error
    own, base = _direct_errors(read(case, "exp")), _direct_errors(read(case, "base"))
    assert ce.baseline == "base"
    for which, clean in (("single", own["clean"][0]), ("ensemble", own["clean"][1])):
        expected = {c: own[which][c].sum() / base["single"][c].sum() for c in CORRUPTIONS}
        assert getattr(ce, which) == pytest.approx(expected)
        assert getattr(ce, f"mce_{which}") == pytest.approx(np.mean(list(expected.values())))
        relative = []
        for c in CORRUPTIONS:
            denominator = (base["single"][c] - base["clean"][0]).sum()
            if denominator > 0:
                relative.append((own[which][c] - clean).sum() / denominator)
        rel = getattr(ce, f"relative_mce_{which}")
        assert (rel is None) if not relative else rel == pytest.approx(np.mean(relative))
        if "method" in case:  # written probabilities: the corruptions add error, so all are defined
            assert len(relative) == len(CORRUPTIONS) and rel is not None


def test_no_baseline_no_corruption_error(case):
    assert case["files"]["base"]["result"].corruption_error is None


def test_shift_summary_round_trips(case):
    for name in EXPERIMENTS:
        f = case["files"][name]
        assert ShiftSummary.load(f["shift.json"]) == f["result"]


def test_shift_through_the_cli_equals_the_function(world, tmp_path):
    f = world["files"]["exp"]
    out = tmp_path / "shift.json"
    assert main(["shift", "--experiment", "exp", "--summary", str(f["summary"]),
                 "--test", *map(str, f["test"]),
                 "--shift", json.dumps({c: str(p) for c, p in f["shift"].items()}),
                 "--sets", json.dumps({c: str(p) for c, p in world["sets"].items()}),
                 "--data", str(world["data_path"]), "--spec", to_json(ENSEMBLE),
                 "--baseline", json.dumps(dataclasses.asdict(world["baseline"])), "--out", str(out)]) == 0
    assert out.read_text() == f["shift.json"].read_text()


def test_sets_of_different_images_are_refused(world, tmp_path):
    other = tmp_path / "contrast.npz"
    stage.make_shift_set("cifar10", "contrast", set_spec(seed=7, corruption="contrast"), world["data_path"],
                         other)
    assert not np.array_equal(np.load(other)["index"], np.load(world["sets"]["gaussian_noise"])["index"])
    f = world["files"]["exp"]
    with pytest.raises(UserError, match="the corrupted sets hold different images"):
        stage.shift_summary_to_file("exp", f["summary"], f["test"], f["shift"],
                                    {**world["sets"], "contrast": other}, world["data_path"], ENSEMBLE, None,
                                    tmp_path / "shift.json")


# ------------------------------------------------------------------ diversity.json
def test_diversity_against_the_direct_computation(world):
    data = world["data"]
    for name, seeds in EXPERIMENTS.items():
        f = world["files"][name]
        d = f["diversity"]
        test = np.stack([np.load(p) for p in f["test"]])
        assert d.seeds == seeds
        np.testing.assert_allclose(d.disagreement, diversity.disagreement_matrix(test))
        np.testing.assert_allclose(d.kl, diversity.kl_matrix(test))
        assert dataclasses.asdict(d.test) == pytest.approx(diversity.summary(test, data["y_test"]))
        assert list(d.by_severity) == ["1", "2", "3", "4", "5"]
        y = read(world, name)["y"]
        for s in SEVERITIES:
            pooled = np.concatenate([np.load(f["shift"][c])[:, s - 1] for c in CORRUPTIONS], axis=1)
            expected = diversity.summary(pooled, np.tile(y, len(CORRUPTIONS)))
            assert dataclasses.asdict(d.by_severity[str(s)]) == pytest.approx(expected)
        assert DiversitySummary.load(f["diversity.json"]) == d


def test_diversity_without_shift_and_through_the_cli(world, tmp_path):
    f = world["files"]["exp"]
    out = tmp_path / "diversity.json"
    assert main(["diversity", "--seeds", "0", "1", "2", "--test", *map(str, f["test"]), "--data",
                 str(world["data_path"]), "--shift", "{}", "--sets", "{}", "--out", str(out)]) == 0
    d = DiversitySummary.load(out)
    assert d.by_severity == {} and d.test == f["diversity"].test and d.kl == f["diversity"].kl
    assert main(["diversity", "--seeds", "0", "1", "2", "--test", *map(str, f["test"]), "--data",
                 str(world["data_path"]), "--shift", json.dumps({c: str(p) for c, p in f["shift"].items()}),
                 "--sets", json.dumps({c: str(p) for c, p in world["sets"].items()}), "--out", str(out)]) == 0
    assert out.read_text() == f["diversity.json"].read_text()


# ------------------------------------------------------------------ figures and summary sections
def test_report_shift_and_diversity_write_png_and_svg(world, tmp_path):
    summaries = {name: str(world["files"][name]["shift.json"]) for name in EXPERIMENTS}
    png, svg = tmp_path / "shift.png", tmp_path / "shift.svg"
    assert main(["report", "shift", "--dpi", "40", "--out", str(png), str(svg),
                 "--summaries", json.dumps(summaries)]) == 0
    assert png.read_bytes()[:8] == PNG and b"<svg" in svg.read_bytes()[:2000]
    for name in EXPERIMENTS:
        f = world["files"][name]
        png, svg = tmp_path / f"{name}.png", tmp_path / f"{name}.svg"
        assert main(["report", "diversity", "--dpi", "40", "--out", str(png), str(svg), "--experiment", name,
                     "--diversity", str(f["diversity.json"]), "--summary", str(f["summary"])]) == 0
        assert png.read_bytes()[:8] == PNG and b"<svg" in svg.read_bytes()[:2000]


def test_report_diversity_without_shift(world, tmp_path):
    f = world["files"]["base"]
    d = dataclasses.replace(f["diversity"], by_severity={})
    d.save(tmp_path / "diversity.json")
    png, svg = tmp_path / "d.png", tmp_path / "d.svg"
    assert main(["report", "diversity", "--dpi", "40", "--out", str(png), str(svg), "--experiment", "base",
                 "--diversity", str(tmp_path / "diversity.json"), "--summary", str(f["summary"])]) == 0
    assert png.read_bytes()[:8] == PNG


def test_summary_sections(world):
    shift = {name: world["files"][name]["shift.json"] for name in EXPERIMENTS}
    lines = summary.shift_lines(shift)
    assert "## Distribution shift (corrupted test images)" in lines
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| exp |") or
            line.startswith("| base |")}
    exp = world["files"]["exp"]["result"]
    clean = f"{100 * exp.clean.single_mean.accuracy:.1f} → {100 * exp.clean.ensemble.accuracy:.1f}"
    assert clean in rows["| exp"]
    ce = exp.corruption_error
    assert rows["| exp"].endswith(f"| {ce.mce_single:.3f} / {ce.mce_ensemble:.3f} |")
    assert rows["| base"].endswith("| - |")  # no baseline: no mCE
    lines = summary.diversity_lines({n: world["files"][n]["diversity.json"] for n in EXPERIMENTS})
    t = world["files"]["exp"]["diversity"].test
    assert any(line.startswith(f"| exp | {100 * t.disagreement:.2f}% | {t.kl:.3f} |") for line in lines)
    assert summary.shift_lines({}) == [] and summary.diversity_lines({}) == []


# ------------------------------------------------------------------ damaged files: one line each
def _shift_json_damage(path: Path, how: str) -> str:
    body = json.loads(path.read_text())
    if how == "truncated":
        path.write_text(path.read_text()[:200])
        return "not a readable shift summary"
    if how == "other format":
        body["format"] = "cifar-ensembles/ensemble-1"
        path.write_text(json.dumps(body))
        return "not a shift summary"
    if how == "a set missing":
        body["sets"] = body["sets"][:-1]
        path.write_text(json.dumps(body))
        return "sets are not one per corruption and severity"
    if how == "singles not one per seed":
        body["clean"]["singles"] = body["clean"]["singles"][:1]
        path.write_text(json.dumps(body))
        return "singles are not one per seed"
    if how == "NaN":
        path.write_text(path.read_text().replace('"accuracy": ', '"accuracy": NaN, "x": ', 1))
        return "NaN is not a finite number"
    body["by_severity"][0]["gain"] = "high"  # wrong type
    path.write_text(json.dumps(body))
    return "damaged shift summary"


def run_main(argv, capsys) -> str:
    """`cli.main(argv)` must exit 2 with one line on stderr; that line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("how", ["truncated", "other format", "a set missing", "singles not one per seed",
                                 "NaN", "wrong type"])
def test_damaged_shift_json(world, tmp_path, capsys, how):
    path = tmp_path / "shift.json"
    path.write_text(world["files"]["exp"]["shift.json"].read_text())
    problem = _shift_json_damage(path, how)
    err = run_main(["report", "shift", "--dpi", "40", "--out", tmp_path / "a.png", tmp_path / "a.svg",
                    "--summaries", json.dumps({"exp": str(path)})], capsys)
    assert_damaged(err, path, problem)
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("how", ["truncated", "matrix not members x members", "missing"])
def test_damaged_diversity_json(world, tmp_path, capsys, how):
    path = tmp_path / "diversity.json"
    text = world["files"]["exp"]["diversity.json"].read_text()
    if how == "truncated":
        path.write_text(text[: len(text) // 2])
        problem = "not a readable diversity summary"
    elif how == "missing":
        problem = "missing"
    else:
        body = json.loads(text)
        body["kl"] = body["kl"][:2]
        path.write_text(json.dumps(body))
        problem = "matrices are not members x members"
    f = world["files"]["exp"]
    err = run_main(["report", "diversity", "--dpi", "40", "--out", tmp_path / "a.png", tmp_path / "a.svg",
                    "--experiment", "exp", "--diversity", path, "--summary", f["summary"]], capsys)
    assert_damaged(err, path, problem)


def _damage_set(good: Path, path: Path, how: str) -> str:
    data = dict(np.load(good))
    if how == "truncated":
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return "not a corrupted test set (BadZipFile"
    if how == "empty":
        path.write_bytes(b"")
        return "not a corrupted test set"
    if how == "no index":
        del data["index"]
        np.savez(path, **data)
        return "not a corrupted test set (KeyError"
    if how == "4 severities":
        data["x"] = data["x"][:4]
    elif how == "float images":
        data["x"] = data["x"].astype(np.float32)
    elif how == "fewer labels":
        data["y"] = data["y"][:-1]
    np.savez(path, **data)
    return "damaged corrupted test set"


SET_DAMAGE = ["truncated", "empty", "no index", "4 severities", "float images", "fewer labels"]


@pytest.mark.parametrize("how", SET_DAMAGE)
def test_damaged_shift_set_in_predict_shift(world, tmp_path, capsys, how):
    path = tmp_path / "contrast.npz"
    problem = _damage_set(world["sets"]["contrast"], path, how)
    out = tmp_path / "probs.npy"
    err = run_main(["predict-shift", "--set", path, *predict_shift_args(world["files"], "base", out)], capsys)
    assert_damaged(err, path, problem)
    assert not out.exists()


def shift_argv(world, tmp_path, shift=None, sets=None) -> list:
    f = world["files"]["exp"]
    shift = {c: str(p) for c, p in {**f["shift"], **(shift or {})}.items()}
    sets = {c: str(p) for c, p in {**world["sets"], **(sets or {})}.items()}
    return ["shift", "--experiment", "exp", "--summary", f["summary"], "--test", *f["test"],
            "--shift", json.dumps(shift), "--sets", json.dumps(sets), "--data", world["data_path"],
            "--spec", to_json(ENSEMBLE), "--baseline", "null", "--out", tmp_path / "shift.json"]


@pytest.mark.parametrize("how", ["truncated", "4 severities"])
def test_damaged_shift_set_in_shift_and_diversity(world, tmp_path, capsys, how):
    path = tmp_path / "motion_blur.npz"
    problem = _damage_set(world["sets"]["motion_blur"], path, how)
    err = run_main(shift_argv(world, tmp_path, sets={"motion_blur": path}), capsys)
    assert_damaged(err, path, problem)
    assert not (tmp_path / "shift.json").exists()
    f = world["files"]["exp"]
    sets = {c: str(p) for c, p in {**world["sets"], "motion_blur": path}.items()}
    shift = {c: str(p) for c, p in f["shift"].items()}
    err = run_main(["diversity", "--seeds", 0, 1, 2, "--test", *f["test"], "--data", world["data_path"],
                    "--shift", json.dumps(shift), "--sets", json.dumps(sets),
                    "--out", tmp_path / "diversity.json"], capsys)
    assert_damaged(err, path, problem)


def _damage_probs(good: Path, path: Path, how: str) -> str:
    probs = np.load(good)
    if how == "truncated":
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) - 100])
        return "not a probability array (ValueError"
    if how == "missing":
        return "missing"
    if how == "object array":
        np.save(path, np.array([{"p": 1}], dtype=object), allow_pickle=True)
        return "not a probability array (ValueError: Object arrays cannot be loaded when allow_pickle=False)"
    if how == "bare pickle":
        path.write_bytes(pickle.dumps(probs))
        return "not a probability array (ValueError: a pickle, not an array; refused (allow_pickle=False))"
    problem = "damaged probability array"  # the checks every probability file gets
    if how == "one member short":
        probs, problem = probs[1:], "damaged shift probabilities"
    elif how == "4 severities":
        probs, problem = probs[:, :4], "damaged shift probabilities"
    elif how == "integer":
        probs, problem = (probs * 100).astype(np.int64), "not a probability array"
    elif how == "rows not summing to 1":
        probs = probs * 0.5
    elif how == "NaN":
        probs[0, 2, 3, 1] = np.nan
    np.save(path, probs)
    return problem


PROBS_DAMAGE = ["truncated", "missing", "object array", "bare pickle", "one member short", "4 severities",
                "integer", "rows not summing to 1", "NaN"]


@pytest.mark.parametrize("how", PROBS_DAMAGE)
def test_damaged_shift_probabilities(world, tmp_path, capsys, how):
    path = tmp_path / "gaussian_noise.npy"
    problem = _damage_probs(world["files"]["exp"]["shift"]["gaussian_noise"], path, how)
    err = run_main(shift_argv(world, tmp_path, shift={"gaussian_noise": path}), capsys)
    assert_damaged(err, path, problem)
    assert not (tmp_path / "shift.json").exists()


@pytest.mark.parametrize("how", ["truncated", "rows not summing to 1"])
def test_damaged_baseline_shift_probabilities_and_in_diversity(world, tmp_path, capsys, how):
    path = tmp_path / "base_contrast.npy"
    problem = _damage_probs(world["files"]["base"]["shift"]["contrast"], path, how)
    baseline = dataclasses.replace(world["baseline"],
                                   shift={**world["baseline"].shift, "contrast": str(path)})
    argv = shift_argv(world, tmp_path)
    argv[argv.index("--baseline") + 1] = json.dumps(dataclasses.asdict(baseline))
    assert_damaged(run_main(argv, capsys), path, problem)
    f = world["files"]["base"]
    shift = {c: str(p) for c, p in {**f["shift"], "contrast": path}.items()}
    sets = {c: str(p) for c, p in world["sets"].items()}
    err = run_main(["diversity", "--seeds", 3, 4, "--test", *f["test"], "--data", world["data_path"],
                    "--shift", json.dumps(shift), "--sets", json.dumps(sets),
                    "--out", tmp_path / "diversity.json"], capsys)
    assert_damaged(err, path, problem)


def test_damaged_shift_set_in_a_subprocess_is_one_line_exit_2(world, tmp_path):
    """The real command: exit 2, one line on stderr (no traceback), nothing written."""
    path = tmp_path / "contrast.npz"
    problem = _damage_set(world["sets"]["contrast"], path, "truncated")
    out = tmp_path / "probs.npy"
    result = cli("predict-shift", "--set", path, *predict_shift_args(world["files"], "base", out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cifar-ensembles predict-shift: error: ")
    assert_damaged(lines[0], path, problem)
    assert not out.exists()
