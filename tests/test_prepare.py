"""prepare.split / stratified_take / channel_stats / write / load."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest

from cifar_ensembles import prepare
from cifar_ensembles.errors import UserError

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
    idx = prepare.stratified_take(labels, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 3, 2])


def test_stratified_take_largest_remainder():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    # exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1; the one left over goes to the largest remainder (class 0)
    idx = prepare.stratified_take(labels, 7, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[idx]), [4, 2, 1])


@pytest.mark.parametrize("n", [1, 7, 33, 99, 100])
def test_stratified_take_properties(n):
    rng = np.random.default_rng(5)
    labels = rng.permutation(np.array([3] * 37 + [7] * 41 + [11] * 22))  # non-contiguous label values
    idx = prepare.stratified_take(labels, n, np.random.default_rng(1))
    assert idx.dtype.kind == "i"
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert idx.min() >= 0 and idx.max() < len(labels)
    assert_stratified(labels[idx], labels, n)


def test_stratified_take_all_and_deterministic():
    labels = np.arange(60) % 4
    np.testing.assert_array_equal(prepare.stratified_take(labels, 60, np.random.default_rng(0)),
                                  np.arange(60))
    a = prepare.stratified_take(labels, 20, np.random.default_rng(9))
    b = prepare.stratified_take(labels, 20, np.random.default_rng(9))
    c = prepare.stratified_take(labels, 20, np.random.default_rng(10))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# split


def test_validation_split_is_stratified_and_disjoint(arrays):
    out = prepare.split(arrays, 100, split_seed=0)
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
    out = prepare.split(arrays, 137, split_seed=4)
    assert_stratified(out["y_val"], arrays["y_train"], 137)


def test_split_is_deterministic_per_seed(arrays):
    a = prepare.split(arrays, 100, split_seed=7)
    b = prepare.split(arrays, 100, split_seed=7)
    c = prepare.split(arrays, 100, split_seed=8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["val_index"], c["val_index"])
    assert_stratified(c["y_val"], arrays["y_train"], 100)


def test_validation_split_does_not_depend_on_subsets(arrays):
    full = prepare.split(arrays, 100, split_seed=3)
    sub = prepare.split(arrays, 100, split_seed=3, train_subset=250, test_subset=50)
    np.testing.assert_array_equal(sub["val_index"], full["val_index"])
    np.testing.assert_array_equal(sub["x_val"], full["x_val"])
    sub2 = prepare.split(arrays, 100, split_seed=3, train_subset=10)
    np.testing.assert_array_equal(sub2["val_index"], full["val_index"])


def test_subsets_are_stratified_and_sized(arrays):
    full = prepare.split(arrays, 100, split_seed=1)
    out = prepare.split(arrays, 100, split_seed=1, train_subset=250, test_subset=50)
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
    full = prepare.split(arrays, 100, split_seed=2)
    out = prepare.split(arrays, 100, split_seed=2, train_subset=N_TRAIN - 100, test_subset=N_TEST)
    np.testing.assert_array_equal(out["train_index"], full["train_index"])
    np.testing.assert_array_equal(out["test_index"], np.arange(N_TEST))


@pytest.mark.parametrize("subset", [None, 200])
def test_mean_std_match_numpy(arrays, subset):
    out = prepare.split(arrays, 100, split_seed=0, train_subset=subset)
    x = arrays["x_train"][out["train_index"]].astype(np.float64) / 255.0
    assert out["mean"].dtype == np.float32 and out["std"].dtype == np.float32
    assert out["mean"].shape == (3,) and out["std"].shape == (3,)
    np.testing.assert_allclose(out["mean"], x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(out["std"], x.std(axis=(0, 1, 2)), rtol=1e-5)


def test_channel_stats_chunking_and_constant_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    images[..., 2] = 200  # constant channel: std exactly 0, never NaN
    mean, std = prepare.channel_stats(images, chunk=5)
    x = images / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(std))
    one_chunk = prepare.channel_stats(images, chunk=4096)
    np.testing.assert_allclose(one_chunk[0], mean, rtol=1e-6)
    np.testing.assert_allclose(one_chunk[1], std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("val_size", [0, -1, N_TRAIN, N_TRAIN + 1])
def test_bad_val_size(arrays, val_size):
    with pytest.raises(UserError, match="data.val_size"):
        prepare.split(arrays, val_size, split_seed=0)


@pytest.mark.parametrize("train_subset", [0, -5, N_TRAIN - 100 + 1, N_TRAIN])
def test_bad_train_subset(arrays, train_subset):
    with pytest.raises(UserError, match=r"data\.subset\.train"):
        prepare.split(arrays, 100, split_seed=0, train_subset=train_subset)


@pytest.mark.parametrize("test_subset", [0, N_TEST + 1])
def test_bad_test_subset(arrays, test_subset):
    with pytest.raises(UserError, match=r"data\.subset\.test"):
        prepare.split(arrays, 100, split_seed=0, test_subset=test_subset)


# ---------------------------------------------------------------------------------------------
# write / load


def test_write_load_round_trip(arrays, tmp_path):
    prepared = prepare.split(arrays, 100, split_seed=0, train_subset=300, test_subset=60)
    path = tmp_path / "prepared" / "data.npz"
    prepare.write(path, prepared)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["data.npz"], "temporary files left behind"
    loaded = prepare.load(path)
    assert set(loaded) == set(prepared)
    for key, value in prepared.items():
        assert loaded[key].dtype == value.dtype, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert list(loaded["classes"]) == [f"class{i}" for i in range(10)]
    # overwriting is fine too
    prepare.write(path, {**prepared, "mean": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(prepare.load(path)["mean"], np.zeros(3))


def test_load_garbage_text(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("this is not a numpy archive\n")
    with pytest.raises(UserError) as err:
        prepare.load(path)
    assert str(path) in str(err.value)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope" / "data.npz"
    with pytest.raises(UserError) as err:
        prepare.load(path)
    assert str(path) in str(err.value)


def test_load_truncated_npz(arrays, tmp_path):
    """A half-copied data.npz (zip without its central directory) must be a UserError too."""
    path = tmp_path / "data.npz"
    prepare.write(path, prepare.split(arrays, 100, split_seed=0))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError) as err:
        prepare.load(path)
    assert str(path) in str(err.value)


def test_load_npz_with_pickled_object(tmp_path):
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("x.npy", "w") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as err:
        prepare.load(path)
    assert str(path) in str(err.value)


def test_test_subset_does_not_depend_on_the_train_subset():
    from cifar_ensembles.prepare import split

    rng = np.random.default_rng(3)
    arrays = {"x_train": rng.integers(0, 255, (400, 4, 4, 3), dtype=np.uint8),
              "y_train": np.arange(400) % 10, "x_test": rng.integers(0, 255, (200, 4, 4, 3), dtype=np.uint8),
              "y_test": np.arange(200) % 10, "classes": np.array([str(i) for i in range(10)])}
    with_train = split(arrays, 40, 0, train_subset=100, test_subset=50)
    without = split(arrays, 40, 0, train_subset=None, test_subset=50)
    np.testing.assert_array_equal(with_train["test_index"], without["test_index"])
