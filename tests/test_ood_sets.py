"""OOD sets: SVHN's .mat and CIFAR-100's archive in their exact upstream formats (built here,
tiny), scikit-learn's digits and the noise sets, fitted to the test split's shape; bad input
fails in one line naming the set and the file, and leaves no output."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from cifar_fixture import Member, cifar100_members, make_cifar100_archive, pickled_members, write_tar
from conftest import load_config, make_data

from cifar_ensembles.cli import main
from cifar_ensembles.config.check import validate_config
from cifar_ensembles.config.convert import from_data, to_json
from cifar_ensembles.config.spec import OodSetSpec, deep_merge
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import ood_data, splits
from cifar_ensembles.stages.ood import fit_to, make_ood_set


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_svhn(path: Path, n: int = 12, shape=(32, 32, 3), dtype=np.uint8, compress: bool = True) -> str:
    """test_32x32.mat as torchvision downloads it: MATLAB 5, X is 32 x 32 x 3 x N uint8, y is N x 1."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (*shape, n)).astype(dtype)
    scipy.io.savemat(path, {"X": x, "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)},
                     do_compression=compress, format="5")
    return md5_of(path)


def data_file(tmp_path: Path, size: int = 28, channels: int = 1) -> Path:
    path = tmp_path / "data.npz"
    splits.write(path, make_data(size=size, channels=channels))
    return path


def set_spec(kind: str, images=None, **overrides) -> OodSetSpec:
    """config.yaml's set of that kind with `overrides`, as the workflow resolves it."""
    name = {"svhn": "svhn", "cifar100": "cifar100", "digits": "digits", "uniform_noise": "uniform_noise",
            "smooth_noise": "smooth_noise"}[kind]
    config = deep_merge(load_config(), {"ood": {"images": images, "sets": {name: overrides}}})
    return validate_config(config).ood_set(name)


# ------------------------------------------------------------------ formats
def test_svhn_from_a_local_file_is_fitted_to_the_test_split(tmp_path):
    mat = tmp_path / "test_32x32.mat"
    md5 = write_svhn(mat)
    data = data_file(tmp_path)  # 28 x 28 x 1, like Fashion-MNIST
    x = make_ood_set("svhn", set_spec("svhn", images=5, source=str(mat), md5=md5), data, tmp_path / "o.npz")
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8
    stored = np.load(tmp_path / "o.npz")
    assert np.array_equal(stored["x"], x) and len(stored["index"]) == 5
    # the folder holding it works too, and a 32 x 32 x 3 test split keeps SVHN's pixels
    (tmp_path / "rgb").mkdir()
    data3 = data_file(tmp_path / "rgb", 32, 3)
    x3 = make_ood_set("svhn", set_spec("svhn", source=str(tmp_path), md5=md5), data3, tmp_path / "o3.npz")
    raw = scipy.io.loadmat(mat)["X"].transpose(3, 0, 1, 2)
    assert np.array_equal(x3, raw)


def test_svhn_defaults_to_torchvisions_md5_which_a_file_of_ones_own_fails(tmp_path):
    mat = tmp_path / "test_32x32.mat"
    write_svhn(mat)
    with pytest.raises(UserError, match=r"^ood\.sets\.svhn\.source: .*test_32x32\.mat: checksum mismatch"):
        make_ood_set("svhn", set_spec("svhn", source=str(mat)), data_file(tmp_path), tmp_path / "o.npz")
    assert not (tmp_path / "o.npz").exists()


def test_cifar100_test_split_from_its_archive(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    md5 = make_cifar100_archive(archive, train_size=20, test_size=30)
    spec = set_spec("cifar100", images=10, source=str(archive), md5=md5)
    x = make_ood_set("cifar100", spec, data_file(tmp_path, 32, 3), tmp_path / "o.npz")
    assert x.shape == (10, 32, 32, 3)
    assert not list(tmp_path.glob(".ood-*"))  # the staging folder is gone


def test_digits_are_real_images_fitted_to_the_test_split(tmp_path):
    x = make_ood_set("digits", set_spec("digits", images=100), data_file(tmp_path), tmp_path / "o.npz")
    assert x.shape == (100, 28, 28, 1)
    assert x.max() > 200 and x.min() == 0  # ink is bright on a dark ground, as Fashion-MNIST
    everything = make_ood_set("digits", set_spec("digits"), data_file(tmp_path, 32, 3), tmp_path / "a.npz")
    assert everything.shape == (1797, 32, 32, 3)
    assert np.array_equal(everything[..., 0], everything[..., 2])  # gray -> RGB


def test_noise_sets_are_deterministic_and_full_range(tmp_path):
    data = data_file(tmp_path, 16, 3)
    a = make_ood_set("uniform_noise", set_spec("uniform_noise", images=20), data, tmp_path / "a.npz")
    b = make_ood_set("uniform_noise", set_spec("uniform_noise", images=20), data, tmp_path / "b.npz")
    assert np.array_equal(a, b) and a.shape == (20, 16, 16, 3)
    s = make_ood_set("smooth_noise", set_spec("smooth_noise", images=20), data, tmp_path / "s.npz")
    assert s.shape == (20, 16, 16, 3) and s.min() == 0 and s.max() == 255
    # smoothed: neighbouring pixels are much closer than in uniform noise
    assert np.abs(np.diff(s.astype(int), axis=1)).mean() < 0.5 * np.abs(np.diff(a.astype(int), axis=1)).mean()


def test_fit_to_converts_rgb_to_gray_by_luminance():
    x = np.zeros((1, 4, 4, 3), np.uint8)
    x[..., 0] = 255  # pure red
    assert np.all(fit_to(x, (4, 4, 1)) == round(0.299 * 255))


# ------------------------------------------------------------------ bad input
def svhn_error(tmp_path, mat: Path, md5: str | None = None) -> str:
    with pytest.raises(UserError) as err:
        make_ood_set("svhn", set_spec("svhn", source=str(mat), md5=md5 or md5_of(mat)),
                     data_file(tmp_path), tmp_path / "o.npz")
    assert not (tmp_path / "o.npz").exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith("ood.sets.svhn.source: ")
    return message


def test_a_missing_source_is_named(tmp_path):
    pattern = r"^ood\.sets\.svhn\.source: .*nowhere: no such file .*test_32x32\.mat"
    with pytest.raises(UserError, match=pattern):
        make_ood_set("svhn", set_spec("svhn", source=str(tmp_path / "nowhere")), data_file(tmp_path),
                     tmp_path / "o.npz")
    with pytest.raises(UserError, match=r"^ood\.sets\.cifar100\.source: .*nowhere"):
        make_ood_set("cifar100", set_spec("cifar100", source=str(tmp_path / "nowhere")),
                     data_file(tmp_path, 32, 3), tmp_path / "o.npz")


def test_svhn_of_the_wrong_shape_or_type_is_refused(tmp_path):
    mat = tmp_path / "test_32x32.mat"
    write_svhn(mat, shape=(28, 28, 3))
    assert "X must be uint8 32 x 32 x 3 x N" in svhn_error(tmp_path, mat)
    write_svhn(mat, dtype=np.float64)
    assert "got double 32 x 32 x 3 x 12" in svhn_error(tmp_path, mat)


def test_svhn_that_is_not_a_mat_file_or_holds_objects_is_refused(tmp_path):
    mat = tmp_path / "test_32x32.mat"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    mat.write_bytes(pickle.dumps(Boom()))
    assert "not a readable MATLAB 5 file" in svhn_error(tmp_path, mat)
    scipy.io.savemat(mat, {"X": np.array([["a", "b"]], dtype=object)}, format="5")  # a cell array
    assert "X must be uint8" in svhn_error(tmp_path, mat)
    scipy.io.savemat(mat, {"images": np.zeros((32, 32, 3, 2), np.uint8)}, format="5")
    assert "no variable X" in svhn_error(tmp_path, mat)
    assert not (tmp_path / "pwned").exists()


def test_svhn_larger_than_the_test_split_can_be_is_refused_unread(tmp_path, monkeypatch):
    mat = tmp_path / "test_32x32.mat"
    write_svhn(mat, compress=False)
    monkeypatch.setattr(ood_data, "SVHN_FILE_BOUND", 1000)
    assert "more than the 1,000" in svhn_error(tmp_path, mat)


def test_a_poisoned_cifar100_archive_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    archive = tmp_path / "cifar-100-python.tar.gz"
    members = cifar100_members(train_size=20, test_size=10)
    del members["test"]
    md5 = write_tar(archive, [*pickled_members("cifar-100-python", members),
                              Member("cifar-100-python/test", pickle.dumps(Boom(), protocol=2))])
    with pytest.raises(UserError) as err:
        make_ood_set("cifar100", set_spec("cifar100", source=str(archive), md5=md5),
                     data_file(tmp_path, 32, 3), tmp_path / "o.npz")
    message = str(err.value)
    assert message.startswith("ood.sets.cifar100.source: ") and "\n" not in message
    assert "cifar-100-python/test" in message and "refused" in message
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.npz").exists()


def test_the_command_fails_in_one_line_with_status_2(tmp_path, capsys):
    spec = set_spec("svhn", source=str(tmp_path / "missing.mat"))
    status = main(["ood-set", "--name", "svhn", "--spec", to_json(spec), "--data", str(data_file(tmp_path)),
                   "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert err.startswith("cifar-ensembles ood-set: error: ood.sets.svhn.source: ") and "missing.mat" in err


# ------------------------------------------------------------------ config
def test_config_errors_name_the_key():
    def check(change, pattern):
        with pytest.raises(UserError, match=pattern):
            validate_config(deep_merge(load_config(), change))

    check({"ood": {"run_sets": ["svhm"]}}, r"^ood\.run_sets: 'svhn?m'.*did you mean 'svhn'")
    check({"ood": {"sets": {"digits": {"source": "/x"}}}},
          r"^ood\.sets\.digits\.source: a digits set is generated")
    check({"ood": {"sets": {"smooth_noise": {"sigma": None}}}}, r"^ood\.sets\.smooth_noise\.sigma: required")
    check({"ood": {"sets": {"svhn": {"kind": "mnist"}}}}, r"^ood\.sets\.svhn\.kind")
    check({"ood": {"sets": {"svhn": {"md5": "abc"}}}}, r"^ood\.sets\.svhn\.md5")
    check({"selective": {"severities": [6]}}, r"^selective\.severities")
    check({"selective": {"coverages": [0]}}, r"^selective\.coverages")


def test_the_shipped_configs_select_sets_that_work_there():
    from conftest import ROOT, TEST_CONFIGS

    demo = validate_config(load_config(ROOT / "presets/demo.yaml"))
    assert demo.dataset == "fashion_mnist"
    assert all(demo.ood.sets[s].kind not in ("svhn", "cifar100") for s in demo.selected_ood_sets)
    assert "digits" in demo.selected_ood_sets
    tiny = validate_config(load_config(TEST_CONFIGS / "fashion-mnist-tiny.yaml"))
    assert tiny.selected_ood_sets and tiny.ood.images <= 200
    default = validate_config(load_config())
    assert default.selected_ood_sets == ["svhn", "cifar100", "uniform_noise", "smooth_noise"]
    assert from_data(OodSetSpec, {"images": None, "seed": 0, "set": {
        "kind": "digits", "source": None, "url": None, "md5": None, "sigma": None}}).images is None


def test_a_mat_file_whose_compressed_data_inflates_past_the_bound_is_refused_while_inflating(tmp_path):
    """scipy allocates what a compressed element declares: the inflated size is counted first,
    1 MiB at a time, against SVHN's bound (lowered here); a file within it reads as before."""
    path = tmp_path / "test_32x32.mat"
    write_svhn(path, n=40)  # X alone inflates to 40 x 3,072 bytes
    with pytest.raises(UserError, match=r"its data elements hold more than 100,000 bytes"):
        ood_data.check_mat_inflation(path, 100_000, "ood.sets.svhn.source")
    ood_data.check_mat_inflation(path, 1_000_000, "ood.sets.svhn.source")
    assert ood_data.read_svhn_mat(path, "ood.sets.svhn.source").shape == (40, 32, 32, 3)
