"""Test-time augmentation: the views, batched inference over them, and the extra members the
predict jobs write (TTA, snapshots and SWA of a members.pt) on the splits and on corrupted and
OOD sets, against predicting each transformed copy or each member alone."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import assert_damaged, cli, make_data, predict_spec, ref_accuracy, ref_nll, tiny_spec
from torch import nn

from cifar_ensembles.compute.inference import predict_logits, softmax_np
from cifar_ensembles.config.convert import from_data, to_json
from cifar_ensembles.config.spec import MemberSpec, TtaSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.atomic import save_npz
from cifar_ensembles.files.ood_data import save_ood_set
from cifar_ensembles.files.training_run import ModelRecord, save_members
from cifar_ensembles.models import build_model
from cifar_ensembles.stages.predict import (
    load_model,
    predict_member_to_files,
    predict_ood,
    predict_shift,
    predict_to_files,
)
from cifar_ensembles.transforms.tta import View, apply_view, tta_views

CPU = torch.device("cpu")


def tta(views: str = "flip", translate: int = 2, enabled: bool = True) -> TtaSpec:
    spec = {"enabled": enabled, "views": views, "translate": translate, "experiments": None}
    return from_data(TtaSpec, spec, "tta")


# ------------------------------------------------------------------ views
def ref_view(images: np.ndarray, flip: bool, dy: int, dx: int) -> np.ndarray:
    """Mirror left-right, then output pixel (r, c) is input pixel (r - dy, c - dx) where that
    lies inside the image, else 0."""
    x = np.flip(images, axis=2) if flip else images
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    rows = [(r, r - dy) for r in range(h) if 0 <= r - dy < h]
    cols = [(c, c - dx) for c in range(w) if 0 <= c - dx < w]
    if rows and cols:
        (r0, s0), (c0, t0) = rows[0], cols[0]
        out[:, r0:r0 + len(rows), c0:c0 + len(cols)] = x[:, s0:s0 + len(rows), t0:t0 + len(cols)]
    return out


SHIFTS = [(0, 0), (1, 0), (0, 1), (2, 3), (-1, -2), (3, -4), (-4, 6), (4, 7), (5, 0), (0, 7),
          (-5, -7), (9, -9), (-12, 3)]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_view_is_mirror_then_shift_into_black(flip, channels):
    """A 5 x 7 image (rows and columns told apart): every shift, negative ones and ones of the
    image's size or more (all black) included, agrees with the definition."""
    images = np.random.default_rng(channels).integers(1, 256, (3, 5, 7, channels), dtype=np.uint8)
    before = images.copy()
    for dy, dx in SHIFTS:
        got = apply_view(torch.from_numpy(images), View(flip, dy, dx))
        assert got.dtype == torch.uint8 and tuple(got.shape) == images.shape
        np.testing.assert_array_equal(got.numpy(), ref_view(images, flip, dy, dx), err_msg=f"{dy}, {dx}")
    np.testing.assert_array_equal(images, before)  # the input is left alone


def test_the_reference_view_moves_content_down_and_right():
    """The reference itself on one pixel: (1, 2) shifted by (+1, +2) lands at (2, 4); mirrored
    first, column 2 of 7 becomes column 4, then 6."""
    x = np.zeros((1, 5, 7, 1), np.uint8)
    x[0, 1, 2, 0] = 9
    assert np.argwhere(ref_view(x, False, 1, 2)[0, ..., 0]).tolist() == [[2, 4]]
    assert np.argwhere(ref_view(x, True, 1, 2)[0, ..., 0]).tolist() == [[2, 6]]
    assert not ref_view(x, False, -2, 0).any()  # row 1 moved up by 2 leaves the image


@pytest.mark.parametrize("views, translate, enabled", list(itertools.product(
    ["flip", "flip_translate"], range(1, 9), [False, True])))
def test_views_per_setting(views, translate, enabled):
    """Identity only when off; the image and its mirror for `flip`; plus both diagonal shifts
    by `translate`, each mirrored, for `flip_translate`; view_count agrees."""
    spec = tta(views, translate, enabled)
    got = tta_views(spec)
    if not enabled:
        expected = {(False, 0, 0)}
    elif views == "flip":
        expected = {(False, 0, 0), (True, 0, 0)}
    else:
        t = translate
        expected = {(f, d, d) for f in (False, True) for d in (0, t, -t)}
    assert got[0] == View(False, 0, 0)
    count = 1 if not enabled else 2 if views == "flip" else 6
    assert len(got) == len(set(got)) == len(expected) == count
    assert set(got) == expected
    assert spec.view_count == len(got)


# ------------------------------------------------------------------ inference over views
H, W, CLASSES = 6, 8, 5


class Recorder(nn.Module):
    """A small conv net whose output depends on where pixels are (a dense layer over the whole
    map), recording the batch sizes it sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * H * W, CLASSES))
        self.net[1].running_mean.uniform_(-0.5, 0.5)
        self.net[1].running_var.uniform_(0.5, 2.0)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.net(x)


def images_and_stats(n: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8), np.array([0.4, 0.5, 0.6], np.float32),
            np.array([0.2, 0.25, 0.3], np.float32))


@pytest.mark.parametrize("views", ["flip", "flip_translate"])
@pytest.mark.parametrize("batch_size", [1, 4, 7, 12, 13, 64])
def test_predict_logits_over_views_is_each_transformed_copy(views, batch_size):
    """views x N x C, row v the logits of view v's copy of every image, whether or not the
    batch size divides by the views (or is below them); no batch exceeds the batch size by
    more than one image's views, and batches hold whole images."""
    images, mean, std = images_and_stats()
    model = Recorder()
    vs = tta_views(tta(views))
    got = predict_logits(model, images, mean, std, CPU, batch_size, "fp32", views=vs)
    assert tuple(got.shape) == (len(vs), len(images), CLASSES) and got.dtype == torch.float32
    assert sum(model.batches) == len(vs) * len(images)
    assert all(b % len(vs) == 0 and b <= max(batch_size, len(vs)) for b in model.batches), model.batches
    assert model.training  # left in the mode it came in
    for v, view in enumerate(vs):
        copy = apply_view(torch.from_numpy(images), view).numpy()
        alone = predict_logits(model, copy, mean, std, CPU, len(images), "fp32")
        np.testing.assert_allclose(got[v].numpy(), alone.numpy(), rtol=1e-5, atol=1e-5, err_msg=str(view))
    # the views do differ: the test would see them swapped
    assert not np.allclose(got[0].numpy(), got[1].numpy(), atol=1e-3)


def ref_softmax(z: np.ndarray) -> np.ndarray:
    """exp(z - max) / sum over the last axis, in float64."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_softmax_over_views_is_the_mean_of_each_views_probabilities():
    """Probabilities are averaged, not logits: with views far apart the two differ."""
    rng = np.random.default_rng(3)
    logits = torch.from_numpy((rng.normal(0, 4, (6, 20, CLASSES))).astype(np.float32))
    expected = np.mean([ref_softmax(logits[v].numpy()) for v in range(6)], axis=0)
    got = softmax_np(logits)
    assert got.dtype == np.float32 and got.shape == (20, CLASSES)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, ref_softmax(logits.numpy().mean(axis=0)), atol=1e-3)
    # no views axis: each row's softmax; one view: the same
    np.testing.assert_allclose(softmax_np(logits[0]), ref_softmax(logits[0].numpy()), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(softmax_np(logits[:1]), softmax_np(logits[0]))


# ------------------------------------------------------------------ extra members on the splits
def random_record(seed: int, data: dict) -> ModelRecord:
    """The tiny network with random weights, as training would save it (no training needed)."""
    spec = tiny_spec().model
    torch.manual_seed(seed)
    model = build_model(spec, len(data["classes"]), data["x_train"].shape[-1])
    return ModelRecord(model=spec, num_classes=len(data["classes"]), in_channels=data["x_train"].shape[-1],
                       mean=tuple(float(m) for m in data["mean"]), std=tuple(float(s) for s in data["std"]),
                       ema=False, state_dict=model.state_dict())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """data.npz, two final models (model.pt) and a members.pt of one run (epoch1, swa)."""
    root = tmp_path_factory.mktemp("tta")
    data = make_data(n_train=32, n_val=12, n_test=20)
    splits.write(root / "data.npz", data)
    models = []
    for seed in (0, 1):
        models.append(root / f"model{seed}.pt")
        random_record(seed, data).save(models[-1])
    save_members(root / "members.pt", {"epoch1": random_record(10, data), "swa": random_record(11, data)})
    return {"root": root, "npz": root / "data.npz", "data": data, "models": models,
            "members": root / "members.pt"}


def by_hand(weights, member, images: np.ndarray, views, batch_size: int = 16) -> np.ndarray:
    """Mean over views of each transformed copy's softmax (float64), from the plain predict path."""
    model, record = load_model(weights, member)
    probs = []
    for view in views:
        copy = apply_view(torch.from_numpy(images), view).numpy()
        logits = predict_logits(model, copy, record.mean, record.std, CPU, batch_size, "fp32")
        probs.append(ref_softmax(logits.numpy()))
    return np.mean(probs, axis=0)


def split_paths(tmp_path) -> dict:
    return {"val": str(tmp_path / "probs_val.npy"), "test": str(tmp_path / "probs_test.npy")}


def assert_metrics(metrics: dict, paths: dict, data: dict) -> None:
    """metrics.json per split: images, accuracy and NLL of the written probabilities."""
    for split, path in paths.items():
        probs, labels = np.load(path), data[f"y_{split}"]
        assert metrics[split]["images"] == len(labels)
        assert metrics[split]["accuracy"] == ref_accuracy(probs.argmax(1), labels)
        assert metrics[split]["nll"] == pytest.approx(ref_nll(probs, labels), rel=1e-6)


@pytest.mark.parametrize("views", ["flip", "flip_translate"])
def test_tta_member_is_the_mean_over_views(run, tmp_path, views):
    """Each split's file is the mean over the views of each transformed copy's probabilities
    (not the plain prediction); metrics.json names the member and counts its views."""
    spec = tta(views, translate=3)
    paths = split_paths(tmp_path)
    member = MemberSpec(weights=str(run["models"][0]), member=None, tta=True)
    returned = predict_member_to_files(member, spec, run["npz"], paths, tmp_path / "metrics.json",
                                       predict_spec(batch_size=24), threads=1)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == returned
    assert metrics["member"] == "model" and metrics["views"] == spec.view_count
    assert_metrics(metrics, paths, run["data"])
    for split, path in paths.items():
        probs = np.load(path)
        assert probs.dtype == np.float32
        images = run["data"][f"x_{split}"]
        np.testing.assert_allclose(probs, by_hand(run["models"][0], None, images, tta_views(spec)),
                                   rtol=1e-5, atol=1e-6)
        # and not the plain prediction
        plain = by_hand(run["models"][0], None, images, tta_views(tta(enabled=False)))
        assert not np.allclose(probs, plain, atol=1e-4)


@pytest.mark.parametrize("member", ["swa", "epoch1"])
def test_plain_member_of_members_pt_is_its_weights_predicted(run, tmp_path, member):
    """A member of members.pt predicts bit for bit as its record saved as a model.pt would."""
    paths = split_paths(tmp_path)
    spec = MemberSpec(weights=str(run["members"]), member=member, tta=False)
    metrics = predict_member_to_files(spec, None, run["npz"], paths, tmp_path / "metrics.json",
                                      predict_spec(batch_size=8), threads=1)
    assert metrics["member"] == member and metrics["views"] == 1
    assert_metrics(metrics, paths, run["data"])
    _, record = load_model(run["members"], member)
    record.save(tmp_path / "alone.pt")
    other = {"swa": "epoch1", "epoch1": "swa"}[member]
    for split, path in paths.items():
        predict_to_files(tmp_path / "alone.pt", run["npz"], split, tmp_path / "alone.npy",
                         tmp_path / "alone.json", predict_spec(batch_size=8), threads=1)
        np.testing.assert_array_equal(np.load(path), np.load(tmp_path / "alone.npy"))
        assert not np.allclose(np.load(path), by_hand(run["members"], other, run["data"][f"x_{split}"],
                                                      [View(False, 0, 0)]), atol=1e-4)


def test_tta_member_without_an_enabled_tta_spec_is_a_user_error(run, tmp_path):
    paths = split_paths(tmp_path)
    member = MemberSpec(weights=str(run["models"][0]), member=None, tta=True)
    for spec in (None, tta(enabled=False)):
        with pytest.raises(UserError, match="enabled: true"):
            predict_member_to_files(member, spec, run["npz"], paths, tmp_path / "m.json", predict_spec(),
                                    threads=1)
    assert not any((tmp_path / p).exists() for p in ("probs_val.npy", "probs_test.npy", "m.json"))


# ------------------------------------------------------------------ extra members on corrupted and OOD sets
@pytest.fixture(scope="module")
def sets(run) -> dict:
    """A corrupted set (5 severities x 6 images) and an OOD set (7 images) of the test split's shape."""
    rng = np.random.default_rng(5)
    shape = run["data"]["x_test"].shape[1:]
    shift, ood = run["root"] / "shift.npz", run["root"] / "ood.npz"
    save_npz(shift, x=rng.integers(0, 256, (5, 6, *shape), dtype=np.uint8), y=run["data"]["y_test"][:6],
             index=np.arange(6))
    save_ood_set(ood, rng.integers(0, 256, (7, *shape), dtype=np.uint8), np.arange(7))
    return {"shift": shift, "ood": ood}


def extras(run) -> list[MemberSpec]:
    return [MemberSpec(weights=str(run["members"]), member="swa", tta=False),
            MemberSpec(weights=str(run["models"][1]), member=None, tta=True),
            MemberSpec(weights=str(run["members"]), member="epoch1", tta=False)]


def member_alone(member: MemberSpec, spec: TtaSpec | None, images: np.ndarray, batch_size: int) -> np.ndarray:
    """One member's probabilities on images (with its views when it is a TTA member), straight
    from predict_logits and softmax_np."""
    model, record = load_model(member.weights, member.member)
    views = tta_views(spec) if member.tta else None
    mean, std = np.asarray(record.mean, np.float32), np.asarray(record.std, np.float32)
    return softmax_np(predict_logits(model, images, mean, std, CPU, batch_size, "fp32", views=views))


@pytest.mark.parametrize("kind", ["shift", "ood"])
def test_extra_members_on_a_set_are_each_member_predicted_alone(run, sets, tmp_path, kind):
    """predict-shift/predict-ood with members (their own job per experiment and set): row i is
    member i alone, with its views for a TTA member; the splits are predict-member's job."""
    predict = {"shift": predict_shift, "ood": predict_ood}[kind]
    members, views = extras(run), tta("flip_translate", 2)
    returned = predict(members, sets[kind], tmp_path / "out.npy", predict_spec(batch_size=12), 1, views)
    out = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(returned, out)
    x = np.load(sets[kind])["x"]
    lead = x.shape[:-3]
    assert out.shape == (len(members), *lead, 10) and out.dtype == np.float32
    for i, member in enumerate(members):
        alone = member_alone(member, views, x.reshape(-1, *x.shape[-3:]), 12)
        np.testing.assert_array_equal(out[i], alone.reshape(*lead, 10))


@pytest.mark.parametrize("index", range(3))
def test_extra_member_on_the_splits_is_that_member_predicted_alone(run, tmp_path, index):
    member, spec, views = extras(run)[index], predict_spec(batch_size=12), tta("flip_translate", 2)
    paths = split_paths(tmp_path)
    metrics = predict_member_to_files(member, views, run["npz"], paths, tmp_path / "m.json", spec, 1)
    for split, path in paths.items():
        alone = member_alone(member, views, run["data"][f"x_{split}"], 12)
        np.testing.assert_array_equal(np.load(path), alone)
    assert_metrics(metrics, paths, run["data"])


@pytest.mark.parametrize("kind", ["shift", "ood"])
def test_final_models_on_a_set_are_each_model_predicted_alone(run, sets, tmp_path, kind):
    """predict-shift/predict-ood: members x (5 x) N x C, row i model i alone, in order."""
    predict = {"shift": predict_shift, "ood": predict_ood}[kind]
    models = [str(m) for m in run["models"]]
    returned = predict(models, sets[kind], tmp_path / "out.npy", predict_spec(batch_size=12), 1)
    out = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(returned, out)
    x = np.load(sets[kind])["x"]
    lead = x.shape[:-3]
    assert out.shape == (2, *lead, 10)
    for i, path in enumerate(models):
        model = MemberSpec(weights=path, member=None, tta=False)
        alone = member_alone(model, None, x.reshape(-1, *x.shape[-3:]), 12)
        np.testing.assert_array_equal(out[i], alone.reshape(*lead, 10))


def test_a_set_the_members_cannot_take_writes_nothing(run, tmp_path):
    """A gray corrupted set for RGB members: a user error naming the set, no file left behind."""
    gray = tmp_path / "gray.npz"
    save_npz(gray, x=np.zeros((5, 4, 16, 16, 1), np.uint8), y=np.zeros(4, np.int64), index=np.arange(4))
    with pytest.raises(UserError, match="gray.npz"):
        predict_shift(extras(run), gray, tmp_path / "out.npy", predict_spec(), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray.npz"]


def cli_args(weights, member, spec, npz, paths, metrics) -> list[str]:
    member_args = ["--member", member or "tta"]
    tta_args = ["--tta", to_json(spec)] if spec else []
    return list(map(str, ["predict-member", "--weights", weights, *member_args, *tta_args, "--data", npz,
                          "--val", paths["val"], "--test", paths["test"], "--metrics", metrics,
                          "--spec", to_json(predict_spec()), "--threads", "1"]))


def test_cli_member_missing_from_members_pt_is_one_line(run, tmp_path):
    paths = split_paths(tmp_path)
    proc = cli(*cli_args(run["members"], "epoch3", None, run["npz"], paths, tmp_path / "m.json"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert_damaged(lines[0], run["members"], "has no member 'epoch3'")
    assert "epoch1" in lines[0] and "swa" in lines[0]  # what it does have
    assert not any(tmp_path.iterdir())


def test_cli_tta_member_writes_what_the_function_writes(run, tmp_path):
    from cifar_ensembles.cli import main

    spec = tta("flip_translate", 1)
    member = MemberSpec(weights=str(run["models"][1]), member=None, tta=True)
    a, b = tmp_path / "a", tmp_path / "b"
    predict_member_to_files(member, spec, run["npz"], split_paths(a), a / "m.json", predict_spec(), 1)
    assert main(cli_args(member.weights, None, spec, run["npz"], split_paths(b), b / "m.json")) == 0
    names = sorted(p.name for p in a.iterdir())
    expected = sorted(["m.json", "probs_val.npy", "probs_test.npy"])
    assert names == sorted(p.name for p in b.iterdir()) == expected
    for name in names:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(a / name), np.load(b / name))
    assert json.loads((a / "m.json").read_text()) == json.loads((b / "m.json").read_text())
