"""splits.split / stratified_take / channel_stats / write / load (and the checks load makes)."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest

from cifar_ensembles.config.spec import SourceSpec, SplitSpec, SubsetSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.raw_data import load_raw
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.stages.download import download_dataset
from cifar_ensembles.stages.prepare import prepare_to_file

N_TRAIN, N_TEST = 1000, 300
COUNTS = np.array([40, 60, 80, 100, 120, 140, 110, 130, 90, 130])  # imbalanced, sums to 1000
assert COUNTS.sum() == N_TRAIN


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    y_train = rng.permutation(np.repeat(np.arange(10), COUNTS)).astype(np.int64)
    y_test = rng.permutation(np.arange(N_TEST) % 10).astype(np.int64)
    return dict(
        x_train=rng.integers(0, 256, (N_TRAIN, 32, 32, 3), dtype=np.uint8),
        y_train=y_train,
        x_test=rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8),
        y_test=y_test,
        classes=np.array([f"class{i}" for i in range(10)]),
    )


def spec(val_size: int, split_seed: int, train_subset: int | None = None,
         test_subset: int | None = None) -> SplitSpec:
    return SplitSpec(val_size=val_size, split_seed=split_seed,
                     subset=SubsetSpec(train=train_subset, test=test_subset))


def assert_stratified(chosen: np.ndarray, population: np.ndarray, n: int) -> None:
    """Per-class count within [floor, ceil] of the exact proportional share."""
    assert len(chosen) == n
    classes, counts = np.unique(population, return_counts=True)
    for c, count in zip(classes, counts):
        exact = n * count / len(population)
        k = int(np.sum(chosen == c))
        assert math.floor(exact) <= k <= math.ceil(exact), (c, k, exact)
        assert abs(k - exact) <= 1
    assert set(np.unique(chosen)) <= set(classes)


# ---------------------------------------------------------------------------------------------
# stratified_take


def test_stratified_take_exact_proportions():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = splits.stratified_take(labels, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 3, 2])


def test_stratified_take_largest_remainder():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    # exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1; the one left over goes to the largest remainder (class 0)
    idx = splits.stratified_take(labels, 7, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[idx]), [4, 2, 1])


@pytest.mark.parametrize("n", [1, 7, 33, 99, 100])
def test_stratified_take_properties(n):
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.array([3] * 37 + [7] * 41 + [11] * 22))  # non-contiguous label values
    idx = splits.stratified_take(labels, n, np.random.default_rng(1))
    assert idx.dtype.kind == "i"
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert idx.min() >= 0 and idx.max() < len(labels)
    assert_stratified(labels[idx], labels, n)


def test_stratified_take_all_and_deterministic():
    labels = np.arange(60) % 4
    np.testing.assert_array_equal(splits.stratified_take(labels, 60, np.random.default_rng(0)),
                                  np.arange(60))
    a = splits.stratified_take(labels, 20, np.random.default_rng(9))
    b = splits.stratified_take(labels, 20, np.random.default_rng(9))
    c = splits.stratified_take(labels, 20, np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# split


def test_validation_split_is_stratified_and_disjoint(arrays):
    out = splits.split(arrays, spec(100, split_seed=0))
    val_idx, train_idx = out["val_index"], out["train_index"]
    assert_stratified(arrays["y_train"][val_idx], arrays["y_train"], 100)
    assert len(np.intersect1d(val_idx, train_idx)) == 0
    np.testing.assert_array_equal(np.union1d(val_idx, train_idx), np.arange(N_TRAIN))
    assert len(train_idx) == N_TRAIN - 100
    # arrays follow the indices
    np.testing.assert_array_equal(out["x_val"], arrays["x_train"][val_idx])
    np.testing.assert_array_equal(out["y_val"], arrays["y_train"][val_idx])
    np.testing.assert_array_equal(out["x_train"], arrays["x_train"][train_idx])
    np.testing.assert_array_equal(out["y_train"], arrays["y_train"][train_idx])
    np.testing.assert_array_equal(out["x_test"], arrays["x_test"])
    np.testing.assert_array_equal(out["y_test"], arrays["y_test"])
    np.testing.assert_array_equal(out["test_index"], np.arange(N_TEST))
    np.testing.assert_array_equal(out["classes"], arrays["classes"])


def test_validation_split_with_uneven_shares(arrays):
    """val_size 137 gives non-integer shares for every class; each is still floor or ceil."""
    out = splits.split(arrays, spec(137, split_seed=4))
    assert_stratified(out["y_val"], arrays["y_train"], 137)


def test_split_is_deterministic_per_seed(arrays):
    a = splits.split(arrays, spec(100, split_seed=7))
    b = splits.split(arrays, spec(100, split_seed=7))
    c = splits.split(arrays, spec(100, split_seed=8))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["val_index"], c["val_index"])
    assert_stratified(c["y_val"], arrays["y_train"], 100)


def test_validation_split_does_not_depend_on_subsets(arrays):
    full = splits.split(arrays, spec(100, split_seed=3))
    sub = splits.split(arrays, spec(100, split_seed=3, train_subset=250, test_subset=50))
    np.testing.assert_array_equal(sub["val_index"], full["val_index"])
    np.testing.assert_array_equal(sub["x_val"], full["x_val"])
    sub2 = splits.split(arrays, spec(100, split_seed=3, train_subset=10))
    np.testing.assert_array_equal(sub2["val_index"], full["val_index"])


def test_subsets_are_stratified_and_sized(arrays):
    full = splits.split(arrays, spec(100, split_seed=1))
    out = splits.split(arrays, spec(100, split_seed=1, train_subset=250, test_subset=50))
    remaining = full["train_index"]
    assert len(out["train_index"]) == 250 and len(out["y_train"]) == 250
    assert np.all(np.isin(out["train_index"], remaining))
    assert len(np.intersect1d(out["train_index"], out["val_index"])) == 0
    assert np.all(np.diff(out["train_index"]) > 0)
    assert_stratified(out["y_train"], arrays["y_train"][remaining], 250)
    np.testing.assert_array_equal(out["x_train"], arrays["x_train"][out["train_index"]])
    assert len(out["test_index"]) == 50 and len(out["y_test"]) == 50
    assert_stratified(out["y_test"], arrays["y_test"], 50)
    np.testing.assert_array_equal(out["x_test"], arrays["x_test"][out["test_index"]])
    np.testing.assert_array_equal(out["y_test"], arrays["y_test"][out["test_index"]])


def test_full_size_train_subset_keeps_everything(arrays):
    full = splits.split(arrays, spec(100, split_seed=2))
    out = splits.split(arrays, spec(100, split_seed=2, train_subset=N_TRAIN - 100, test_subset=N_TEST))
    np.testing.assert_array_equal(out["train_index"], full["train_index"])
    np.testing.assert_array_equal(out["test_index"], np.arange(N_TEST))


@pytest.mark.parametrize("subset", [None, 200])
def test_mean_std_match_numpy(arrays, subset):
    out = splits.split(arrays, spec(100, split_seed=0, train_subset=subset))
    x = arrays["x_train"][out["train_index"]].astype(np.float64) / 255.0
    assert out["mean"].dtype == np.float32 and out["std"].dtype == np.float32
    assert out["mean"].shape == (3,) and out["std"].shape == (3,)
    np.testing.assert_allclose(out["mean"], x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(out["std"], x.std(axis=(0, 1, 2)), rtol=1e-5)


def test_channel_stats_chunking_and_constant_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    images[..., 2] = 200  # constant channel: std exactly 0, never NaN
    mean, std = splits.channel_stats(images, chunk=5)
    x = images / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(std))
    one_chunk = splits.channel_stats(images, chunk=4096)
    np.testing.assert_allclose(one_chunk[0], mean, rtol=1e-6)
    np.testing.assert_allclose(one_chunk[1], std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("val_size", [0, -1, N_TRAIN, N_TRAIN + 1])
def test_bad_val_size(arrays, val_size):
    with pytest.raises(UserError, match="data.val_size"):
        splits.split(arrays, spec(val_size, split_seed=0))


@pytest.mark.parametrize("train_subset", [0, -5, N_TRAIN - 100 + 1, N_TRAIN])
def test_bad_train_subset(arrays, train_subset):
    with pytest.raises(UserError, match=r"data\.subset\.train"):
        splits.split(arrays, spec(100, split_seed=0, train_subset=train_subset))


@pytest.mark.parametrize("test_subset", [0, N_TEST + 1])
def test_bad_test_subset(arrays, test_subset):
    with pytest.raises(UserError, match=r"data\.subset\.test"):
        splits.split(arrays, spec(100, split_seed=0, test_subset=test_subset))


# ---------------------------------------------------------------------------------------------
# write / load


def test_write_load_round_trip(arrays, tmp_path):
    prepared = splits.split(arrays, spec(100, split_seed=0, train_subset=300, test_subset=60))
    path = tmp_path / "prepared" / "data.npz"
    splits.write(path, prepared)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["data.npz"], "temporary files left behind"
    loaded = splits.load(path)
    assert set(loaded) == set(prepared)
    for key, value in prepared.items():
        assert loaded[key].dtype == value.dtype, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert list(loaded["classes"]) == [f"class{i}" for i in range(10)]
    # overwriting is fine too
    splits.write(path, {**prepared, "mean": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(splits.load(path)["mean"], np.zeros(3))


def assert_damaged(err: pytest.ExceptionInfo, path, *expected: str) -> None:
    """One line naming the file and how to rebuild it (formats.DamagedFile)."""
    message = str(err.value)
    assert isinstance(err.value, DamagedFile), repr(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert f"snakemake --forcerun {path}" in message, message
    for text in expected:
        assert text in message, message


def test_load_garbage_text(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("this is not a numpy archive\n")
    with pytest.raises(UserError) as err:
        splits.load(path)
    assert_damaged(err, path, "not a prepared dataset")


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope" / "data.npz"
    with pytest.raises(UserError) as err:
        splits.load(path)
    assert_damaged(err, path, "missing")


def test_load_truncated_npz(arrays, tmp_path):
    """A half-copied data.npz (zip without its central directory) must be a UserError too."""
    path = tmp_path / "data.npz"
    splits.write(path, splits.split(arrays, spec(100, split_seed=0)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError) as err:
        splits.load(path)
    assert_damaged(err, path)


def test_load_npz_with_pickled_object(arrays, tmp_path):
    """An object array is refused (allow_pickle=False), never unpickled."""
    path = tmp_path / "data.npz"
    prepared = splits.split(arrays, spec(100, split_seed=0))
    with zipfile.ZipFile(path, "w") as zf:
        for key, value in prepared.items():
            with zf.open(f"{key}.npy", "w") as f:
                if key == "x_train":
                    value = np.array([{"a": 1}], dtype=object)
                np.lib.format.write_array(f, value, allow_pickle=True)
    with pytest.raises(UserError) as err:
        splits.load(path)
    assert_damaged(err, path, "not a prepared dataset")


@pytest.fixture(scope="module")
def prepared(arrays) -> dict[str, np.ndarray]:
    return splits.split(arrays, spec(100, split_seed=0, train_subset=200, test_subset=50))


# A data.npz read back with the wrong contents: (key, replacement(prepared) -> array, text in the error).
DAMAGED_CONTENTS = {
    "x_train_float": ("x_train", lambda d: d["x_train"].astype(np.float32), "x_train must be uint8"),
    "x_val_int64": ("x_val", lambda d: d["x_val"].astype(np.int64), "x_val must be uint8"),
    "x_test_no_channels": ("x_test", lambda d: d["x_test"][..., 0], "x_test must be uint8 N x H x W x C"),
    "x_train_two_channels": ("x_train", lambda d: d["x_train"][..., :2], "x_train must be uint8"),
    "x_val_flat": ("x_val", lambda d: d["x_val"].reshape(len(d["x_val"]), -1), "x_val must be uint8"),
    "y_train_float": ("y_train", lambda d: d["y_train"].astype(np.float64), "y_train must be integer labels"),
    "y_val_text": ("y_val", lambda d: d["y_val"].astype(str), "y_val must be integer labels"),
    "y_test_one_hot": ("y_test", lambda d: np.eye(10, dtype=np.int64)[d["y_test"]],
                       "y_test must be integer labels"),
    "y_test_out_of_range": ("y_test", lambda d: np.where(d["y_test"] == 0, 10, d["y_test"]),
                            "y_test has labels outside the classes"),
    "y_train_negative": ("y_train", lambda d: np.where(d["y_train"] == 0, -1, d["y_train"]),
                         "y_train has labels outside the classes"),
    "fewer_classes": ("classes", lambda d: d["classes"][:5], "labels outside the classes"),
    "y_val_short": ("y_val", lambda d: d["y_val"][:-1], "100 x_val images but 99 labels"),
    "x_train_short": ("x_train", lambda d: d["x_train"][:-3], "197 x_train images but 200 labels"),
    "mean_nan": ("mean", lambda d: np.array([np.nan, 0.5, 0.5], np.float32),
                 "mean must be finite per-channel numbers"),
    "std_inf": ("std", lambda d: np.array([0.2, np.inf, 0.2], np.float32),
                "std must be finite per-channel numbers"),
    "std_2d": ("std", lambda d: d["std"][None], "std must be finite per-channel numbers"),
}


@pytest.mark.parametrize("key, damage, expected", list(DAMAGED_CONTENTS.values()), ids=list(DAMAGED_CONTENTS))
def test_load_damaged_contents_names_the_file(prepared, tmp_path, key, damage, expected):
    path = tmp_path / "data.npz"
    np.savez(path, **{**prepared, key: damage(prepared)})
    with pytest.raises(UserError) as err:
        splits.load(path)
    assert_damaged(err, path, "damaged prepared dataset", expected)


@pytest.mark.parametrize("missing", ["classes", "y_val", "std"])
def test_load_npz_without_a_key(prepared, tmp_path, missing):
    path = tmp_path / "data.npz"
    np.savez(path, **{k: v for k, v in prepared.items() if k != missing})
    with pytest.raises(UserError) as err:
        splits.load(path)
    assert_damaged(err, path, f"no {missing!r} array")


def test_load_of_some_keys_checks_what_it_reads(prepared, tmp_path):
    """Stages that read only the labels still get the checks for the labels they read."""
    path = tmp_path / "data.npz"
    np.savez(path, **{**prepared, "y_test": np.where(prepared["y_test"] == 0, 10, prepared["y_test"]),
                      "x_train": prepared["x_train"].astype(np.float32)})
    with pytest.raises(UserError) as err:
        splits.load(path, keys=("y_test", "classes"))
    assert_damaged(err, path, "y_test has labels outside the classes")
    labels = splits.load(path, keys=("y_val", "classes"))  # the damaged arrays are not read
    assert set(labels) == {"y_val", "classes"}
    np.testing.assert_array_equal(labels["y_val"], prepared["y_val"])


def test_test_subset_does_not_depend_on_the_train_subset():
    rng = np.random.default_rng(3)
    arrays = {"x_train": rng.integers(0, 255, (400, 4, 4, 3), dtype=np.uint8),
              "y_train": np.arange(400) % 10, "x_test": rng.integers(0, 255, (200, 4, 4, 3), dtype=np.uint8),
              "y_test": np.arange(200) % 10, "classes": np.array([str(i) for i in range(10)])}
    with_train = splits.split(arrays, spec(40, 0, train_subset=100, test_subset=50))
    without = splits.split(arrays, spec(40, 0, train_subset=None, test_subset=50))
    np.testing.assert_array_equal(with_train["test_index"], without["test_index"])


# ---------------------------------------------------------------------------------------------
# the prepare stage


def test_prepare_stage_writes_the_split_of_the_raw_files(cifar_archive, tmp_path):
    archive, md5 = cifar_archive
    source = SourceSpec(source=str(archive), url=None, md5=md5, own_dataset=False)
    raw = download_dataset("cifar10", source, tmp_path / "raw")
    split_spec = spec(40, split_seed=1, train_subset=100, test_subset=30)
    out = tmp_path / "results" / "data.npz"
    written = prepare_to_file("cifar10", split_spec, raw, out)
    expected = splits.split(load_raw("cifar10", raw), split_spec)
    loaded = splits.load(out)
    assert set(written) == set(expected) == set(loaded)
    for key in expected:
        np.testing.assert_array_equal(written[key], expected[key], err_msg=key)
        np.testing.assert_array_equal(loaded[key], expected[key], err_msg=key)
    assert len(loaded["y_train"]) == 100 and len(loaded["y_val"]) == 40 and len(loaded["y_test"]) == 30
