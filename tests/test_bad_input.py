"""Bad input, one case at a time: each must fail with one line that names the field or file,
a non-zero exit, and nothing half-written (no output of the step, no temporary files).

Config mistakes are checked in-process with `validate_config` (fast) and a handful through a
real `snakemake -n` (parse time, before any job); file mistakes through the
`cifar-ensembles` command, a few as real subprocesses (each imports torch, ~4 s) and the
rest through `cli.main` in this process.
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cifar_ensembles import prepare
from cifar_ensembles.cli import main
from cifar_ensembles.configcheck import deep_merge, validate_config
from cifar_ensembles.datasets import fetch
from cifar_ensembles.errors import UserError
from cifar_ensembles.models import ResNet18Cifar
from cifar_ensembles.train import MODEL_FORMAT

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULTS = yaml.safe_load((ROOT / "config.yaml").read_text())
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1",
       "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
# Lines Snakemake prints around any run; everything else must be our one line.
SNAKEMAKE_FRAMING = ("Config file ", "Using workflow specific profile", "Using profile ")


def merged(override: dict) -> dict:
    """config.yaml with `override` merged over it, as `--configfile override.yaml` does."""
    return deep_merge(DEFAULTS, override)


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------ config errors
EXP = "experiments"
CONFIG_CASES = {
    # unknown or misspelt keys, top level and nested
    "top_level_misspelt": ({"trainig": {"epochs": 1}},
                           ["trainig: unknown key; did you mean 'training'?", "allowed: dataset, data"]),
    "nested_optimiser": ({EXP: {"single_asam": {"optimiser": {"lr": 0.1}}}},
                         ["experiments.single_asam.optimiser: unknown key; did you mean 'optimizer'?"]),
    "training_epoch": ({"training": {"epoch": 3}}, ["training.epoch: unknown key; did you mean 'epochs'?"]),
    "optimizer_option": ({"training": {"optimizer": {"learning_rate": 0.1}}},
                         ["training.optimizer.learning_rate: unknown key", "allowed: name, lr,"]),
    "data_option": ({"data": {"valsize": 10}}, ["data.valsize: unknown key; did you mean 'val_size'?"]),
    # wrong types
    "lr_text": ({EXP: {"single_asam": {"optimizer": {"lr": "fast"}}}},
                ["experiments.single_asam.optimizer.lr: 'fast' is not of type 'number'"]),
    "lr_yaml_1e-4": ({"training": {"optimizer": {"lr": "1e-4"}}},
                     ["training.optimizer.lr: '1e-4' is not of type 'number'", "write 1.0e-4"]),
    "seeds_text": ({EXP: {"ensemble_adam": {"seeds": "0"}}},
                   ["experiments.ensemble_adam.seeds: '0' is not of type 'array'"]),
    "seed_float": ({EXP: {"ensemble_adam": {"seeds": [0, 1.5]}}},
                   ["experiments.ensemble_adam.seeds[1]: 1.5 is not of type 'integer'"]),
    "ema_enabled_text": ({"training": {"ema": {"enabled": "yes please"}}}, ["training.ema.enabled"]),
    # out of range
    "lr_negative": ({EXP: {"single_asam": {"optimizer": {"lr": -1}}}},
                    ["experiments.single_asam.optimizer.lr: -1 is less than or equal to the minimum of 0"]),
    "lr_zero": ({"training": {"optimizer": {"lr": 0}}},
                ["training.optimizer.lr: 0 is less than or equal to the minimum of 0"]),
    "batch_size_zero": ({"training": {"batch_size": 0}},
                        ["training.batch_size: 0 is less than the minimum of 1"]),
    "epochs_zero": ({EXP: {"ensemble_adam": {"epochs": 0}}},
                    ["experiments.ensemble_adam.epochs: 0 is less than the minimum of 1"]),
    "seeds_empty": ({EXP: {"ensemble_adam": {"seeds": []}}}, ["experiments.ensemble_adam.seeds: [] "]),
    "seeds_duplicate": ({EXP: {"ensemble_adam": {"seeds": [0, 1, 1]}}},
                        ["experiments.ensemble_adam.seeds: [0, 1, 1] has non-unique elements"]),
    "seeds_negative": ({EXP: {"ensemble_adam": {"seeds": [-1]}}}, ["experiments.ensemble_adam.seeds[0]"]),
    "seeds_missing": ({EXP: {"extra": {"epochs": 1}}}, ["experiments.extra.seeds: missing (required)"]),
    "rho_negative": ({EXP: {"single_asam": {"optimizer": {"rho": -0.5}}}},
                     ["experiments.single_asam.optimizer.rho: -0.5 is less than the minimum of 0"]),
    "ema_decay_one": ({EXP: {"single_asam": {"ema": {"decay": 1.0}}}},
                      ["experiments.single_asam.ema.decay: 1.0 is greater than or equal to the maximum"]),
    "ema_decay_negative": ({EXP: {"single_asam": {"ema": {"decay": -0.1}}}},
                           ["experiments.single_asam.ema.decay: -0.1 is less than the minimum of 0"]),
    "momentum_one": ({"training": {"optimizer": {"momentum": 1}}}, ["training.optimizer.momentum"]),
    "dpi_huge": ({"report": {"dpi": 10_000}}, ["report.dpi: 10000 is greater than the maximum of 600"]),
    # unknown names
    "optimizer_name": ({EXP: {"ensemble_adam": {"optimizer": {"name": "adamw"}}}},
                       ["experiments.ensemble_adam.optimizer.name: 'adamw' is not one of",
                        "did you mean 'adam'?"]),
    "loss_name": ({"training": {"loss": {"name": "focal"}}}, ["training.loss.name: 'focal' is not one of"]),
    "augment_name": ({EXP: {"single_asam": {"augment": {"name": "albumentation"}}}},
                     ["experiments.single_asam.augment.name", "did you mean 'albumentations'?"]),
    "model_name": ({"training": {"model": {"name": "resnet50"}}}, ["training.model.name: 'resnet50'"]),
    "dataset_name": ({"dataset": "cifar-10"},
                     ["dataset: 'cifar-10' is not one of", "did you mean 'cifar10'?"]),
    "scheduler_name": ({"training": {"scheduler": {"name": "onecycle"}}}, ["training.scheduler.name"]),
    "device_name": ({"training": {"device": "gpu"}}, ["training.device: 'gpu' does not match"]),
    "experiment_name": ({EXP: {"2fast": {"seeds": [0]}}}, ["experiments.2fast: invalid name"]),
    # what the schema cannot say
    "val_size_too_large": ({"data": {"val_size": 50_000}},
                           ["data.val_size: 50000 must be smaller than the cifar10 training set",
                            "(50000 images)"]),
    "train_subset_too_large": ({"data": {"subset": {"train": 46_000}}},
                               ["data.subset.train: 46000 is more than the 45000"]),
    "run_experiments_unknown": ({"run_experiments": ["single_asma"]},
                                ["run_experiments: 'single_asma' is not an experiment in the config",
                                 "did you mean 'single_asam'?"]),
    "cosine_floor_above_lr": ({EXP: {"single_asam": {"scheduler": {"min_lr": 1.0e-3}}}},
                              ["experiments.single_asam.scheduler.min_lr: 0.001 must be below",
                               "experiments.single_asam.optimizer.lr = 0.0001"]),
    "cosine_floor_from_defaults": ({"training": {"scheduler": {"min_lr": 0.5}}},
                                   ["training.scheduler.min_lr: 0.5 must be below", "'single_asam'"]),
    "pretrained_cifar_resnet": ({"training": {"model": {"name": "resnet18_cifar"}}},
                                ["training.model.pretrained: ImageNet weights exist only for resnet18",
                                 "training.model.name = resnet18_cifar"]),
}


@pytest.mark.parametrize("override, expected", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_config_error_is_one_line_naming_the_field(override, expected):
    config = merged(override)
    before = copy.deepcopy(config)
    with pytest.raises(UserError) as info:
        validate_config(config, SCHEMA)
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message
    assert config == before, "validation changed the config"


@pytest.mark.parametrize("preset", [None, "demo.yaml", "from-scratch.yaml"])
def test_shipped_configs_are_valid(preset):
    override = yaml.safe_load((ROOT / "presets" / preset).read_text()) if preset else {}
    validate_config(merged(override), SCHEMA)


def test_schema_error_is_reported_before_semantic_ones():
    # an unknown key and a cosine floor above lr: the schema's error comes first
    config = merged({"trainig": {}, "training": {"scheduler": {"min_lr": 0.5}}})
    with pytest.raises(UserError, match=r"^trainig: unknown key"):
        validate_config(config, SCHEMA)


def test_custom_archive_skips_the_standard_size_check():
    # with data.md5 set the archive is the user's own; prepare checks val_size against it
    validate_config(merged({"data": {"val_size": 50_000, "md5": "0" * 32}}), SCHEMA)


SNAKEMAKE_CASES = ["nested_optimiser", "lr_negative", "seeds_text", "ema_decay_one", "val_size_too_large",
                   "run_experiments_unknown", "cosine_floor_above_lr"]


@pytest.mark.parametrize("case", SNAKEMAKE_CASES)
def test_snakemake_stops_at_parse_time_with_one_line(case, tmp_path):
    override, expected = CONFIG_CASES[case]
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(override))
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"),
                           "-d", str(workdir), "--configfile", str(config_file), "-n", "--cores", "1"],
                          cwd=workdir, env=ENV, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output and "WorkflowError" not in output, output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(SNAKEMAKE_FRAMING)]
    assert len(lines) == 1, output
    with pytest.raises(UserError) as info:
        validate_config(merged(override), SCHEMA)
    assert lines[0] == f"config error: {info.value}"
    assert expected[0] in lines[0]
    assert snapshot(workdir) == [], "a dry run with a bad config wrote files"


# -------------------------------------------------------------- file and CLI errors
def run_cli(*args, cwd: Path) -> tuple[int, str, str]:
    """A real `python -m cifar_ensembles` process (what Snakemake's jobs run)."""
    proc = subprocess.run([sys.executable, "-m", "cifar_ensembles", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout, proc.stderr


def run_main(capsys, *args) -> tuple[int, str, str]:
    """The same command in this process (no torch import per case)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(result, command: str, *expected: str) -> str:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cifar-ensembles {command}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str]:
    from cifar_fixture import make_cifar10_archive

    path = tmp_path_factory.mktemp("bad_cifar") / "cifar-10-python.tar.gz"
    return path, make_cifar10_archive(path, per_batch=20, test_size=30, seed=3)


@pytest.fixture(scope="module")
def raw_dir(archive, tmp_path_factory) -> Path:
    path, md5 = archive
    return fetch("cifar10", tmp_path_factory.mktemp("bad_raw") / "raw", source=str(path), md5=md5)


def labels_data(n_val: int = 24, n_test: int = 30, classes: int = 10) -> dict:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    mean, std = prepare.channel_stats(x_train)
    return dict(x_train=x_train, y_train=np.arange(48) % classes,
                x_val=rng.integers(0, 256, (n_val, 16, 16, 3), dtype=np.uint8),
                y_val=np.arange(n_val) % classes,
                x_test=rng.integers(0, 256, (n_test, 16, 16, 3), dtype=np.uint8),
                y_test=np.arange(n_test) % classes, classes=np.array([f"c{i}" for i in range(classes)]),
                mean=mean, std=std, train_index=np.arange(48), val_index=np.arange(48, 48 + n_val),
                test_index=np.arange(n_test))


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_data") / "data.npz"
    prepare.write(path, labels_data())
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty folder for the step's outputs; tests assert it stays empty."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_download_missing_archive(work, tmp_path):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    line = assert_one_line(run_cli("download", "--dataset", "cifar10", "--out", work / "raw",
                                   "--source", missing, cwd=tmp_path),
                           "download", "data.source", str(missing), "no such archive")
    assert line
    assert snapshot(work) == []


@pytest.mark.parametrize("md5_of", ["full", "truncated"])
def test_download_truncated_archive(archive, work, tmp_path, capsys, md5_of):
    path, md5 = archive
    truncated = tmp_path / "mirror" / path.name
    truncated.parent.mkdir()
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if md5_of == "truncated":  # the checksum passes (the user gave the broken file's), extraction fails
        md5 = hashlib.md5(truncated.read_bytes()).hexdigest()
    expected = "checksum mismatch" if md5_of == "full" else "cannot extract"
    assert_one_line(run_main(capsys, "download", "--dataset", "cifar10", "--out", work / "raw",
                             "--source", truncated, "--md5", md5),
                    "download", "data.source", str(truncated), expected)
    assert snapshot(work) == []


def test_download_wrong_checksum(archive, work, capsys):
    path, _ = archive
    assert_one_line(run_main(capsys, "download", "--dataset", "cifar10", "--out", work / "raw",
                             "--source", path, "--md5", "0" * 32),
                    "download", "data.source", str(path), "checksum mismatch", "0" * 32)
    assert snapshot(work) == []


def test_download_unknown_dataset(work, capsys):
    assert_one_line(run_main(capsys, "download", "--dataset", "mnist", "--out", work / "raw"),
                    "download", "dataset: unknown dataset 'mnist'")
    assert snapshot(work) == []


def test_prepare_val_size_larger_than_training_set(raw_dir, work, capsys):
    assert_one_line(run_main(capsys, "prepare", "--dataset", "cifar10", "--raw", raw_dir, "--out",
                             work / "data.npz", "--val-size", "5000"),
                    "prepare", "data.val_size: 5000", "(100 images)")
    assert snapshot(work) == []


def test_prepare_train_subset_too_large(raw_dir, work, capsys):
    assert_one_line(run_main(capsys, "prepare", "--dataset", "cifar10", "--raw", raw_dir, "--out",
                             work / "data.npz", "--val-size", "20", "--train-subset", "81"),
                    "prepare", "data.subset.train: 81")
    assert snapshot(work) == []


def predict_args(model: Path, data: Path, work: Path) -> list:
    return ["predict", "--model", model, "--data", data, "--split", "val", "--probs", work / "probs_val.npy",
            "--metrics", work / "metrics_val.json", "--device", "cpu"]


def test_predict_corrupt_model(data_npz, work, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"this is not a model\n" * 50)
    assert_one_line(run_cli(*predict_args(model, data_npz, work), cwd=tmp_path),
                    "predict", str(model), "not a readable model file")
    assert snapshot(work) == []


def model_record(width: int = 4, saved_width: int | None = None) -> dict:
    net = ResNet18Cifar(10, 3, width)
    return {"format": MODEL_FORMAT, "model": {"name": "resnet18_cifar", "width": saved_width or width},
            "num_classes": 10, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "ema": False,
            "state_dict": net.state_dict()}


def test_predict_truncated_model(data_npz, work, tmp_path, capsys):
    model = tmp_path / "model.pt"
    torch.save(model_record(), model)
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert_one_line(run_main(capsys, *predict_args(model, data_npz, work)),
                    "predict", str(model), "not a readable model file")
    assert snapshot(work) == []


def test_predict_model_whose_weights_do_not_fit(data_npz, work, tmp_path, capsys):
    model = tmp_path / "model.pt"
    torch.save(model_record(width=4, saved_width=8), model)
    assert_one_line(run_main(capsys, *predict_args(model, data_npz, work)),
                    "predict", str(model), "weights do not fit the saved architecture")
    assert snapshot(work) == []


def ensemble_args(data: Path, val: list[Path], test: list[Path], work: Path) -> list:
    return ["ensemble", "--data", data, "--seeds", *range(len(val)), "--val", *val, "--test", *test,
            "--csv", work / "ensemble.csv", "--json", work / "ensemble.json"]


def probs(tmp_path: Path, name: str, n: int, classes: int = 10) -> Path:
    p = np.random.default_rng(len(name)).dirichlet(np.ones(classes), n).astype(np.float32)
    path = tmp_path / name
    np.save(path, p)
    return path


def test_ensemble_members_with_mismatched_shapes(data_npz, work, tmp_path):
    val = [probs(tmp_path, "v0.npy", 24), probs(tmp_path, "v1.npy", 24, classes=9)]
    test = [probs(tmp_path, "t0.npy", 30), probs(tmp_path, "t1.npy", 30)]
    assert_one_line(run_cli(*ensemble_args(data_npz, val, test, work), cwd=tmp_path),
                    "ensemble", str(val[1]), "differs from", str(val[0]))
    assert snapshot(work) == []


def test_ensemble_member_for_another_split(data_npz, work, tmp_path, capsys):
    val = [probs(tmp_path, "v0.npy", 24), probs(tmp_path, "v1.npy", 24)]
    test = [probs(tmp_path, "t0.npy", 30), probs(tmp_path, "t1.npy", 24)]  # val's size: wrong file
    assert_one_line(run_main(capsys, *ensemble_args(data_npz, val, test, work)),
                    "ensemble", str(test[1]), "expected 30 x classes", "(24, 10)")
    assert snapshot(work) == []


def test_ensemble_unreadable_member(data_npz, work, tmp_path, capsys):
    val = [probs(tmp_path, "v0.npy", 24)]
    test = [tmp_path / "t0.npy"]
    test[0].write_bytes(b"\x93NUMPY garbage")
    assert_one_line(run_main(capsys, *ensemble_args(data_npz, val, test, work)),
                    "ensemble", str(test[0]), "not a probability array")
    assert snapshot(work) == []


def test_pretrained_weights_for_another_architecture(work, tmp_path):
    other = tmp_path / "cifar_resnet.pth"
    torch.save(ResNet18Cifar(10, 3, 4).state_dict(), other)
    assert_one_line(run_cli("download-weights", "--out", work / "resnet18_imagenet.pth", "--file", other,
                            cwd=tmp_path),
                    "download-weights", f"pretrained_weights.file: {other}: weights for another architecture")
    assert snapshot(work) == []


@pytest.mark.parametrize("content", [b"not torch at all", None], ids=["garbage", "missing"])
def test_pretrained_weights_unreadable(work, tmp_path, capsys, content):
    weights = tmp_path / "weights.pth"
    if content is not None:
        weights.write_bytes(content)
    line = assert_one_line(run_main(capsys, "download-weights", "--out", work / "w.pth", "--file", weights),
                           "download-weights", f"pretrained_weights.file: {weights}: ")
    assert ("cannot load as torch weights" if content else "no such file") in line
    assert snapshot(work) == []


TRAIN_SPEC = {"epochs": 1, "batch_size": 16, "model": {"name": "resnet18_cifar", "width": 4},
              "optimizer": {"name": "sgd", "lr": 0.05}, "scheduler": {"name": "constant"},
              "loss": {"name": "cross_entropy"}, "augment": {"name": "none"}, "ema": {"enabled": False},
              "loader": {"num_workers": 0}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_cuda(data_npz, work, tmp_path):
    import json

    spec = dict(TRAIN_SPEC, device="cuda")
    assert_one_line(run_cli("train", "--data", data_npz, "--spec", json.dumps(spec), "--seed", "0",
                            "--out-dir", work / "seed0", "--checkpoint", work / "seed0" / "checkpoint.pt",
                            cwd=tmp_path),
                    "train", "device: 'cuda' requested but CUDA is not available")
    assert snapshot(work) == []


def test_train_pretrained_weights_for_another_architecture(data_npz, work, tmp_path, capsys):
    import json

    other = tmp_path / "cifar_resnet.pth"
    torch.save(ResNet18Cifar(10, 3, 4).state_dict(), other)
    spec = dict(TRAIN_SPEC, device="cpu", model={"name": "resnet18", "pretrained": True, "input_size": None})
    assert_one_line(run_main(capsys, "train", "--data", data_npz, "--spec", json.dumps(spec), "--seed", "0",
                             "--out-dir", work / "seed0", "--weights", other),
                    "train", str(other), "weights for another architecture")
    assert snapshot(work) == []


def test_train_corrupt_data(work, tmp_path, capsys):
    import json

    data = tmp_path / "data.npz"
    data.write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line(run_main(capsys, "train", "--data", data, "--spec", json.dumps(TRAIN_SPEC), "--seed", "0",
                             "--out-dir", work / "seed0"),
                    "train", str(data), "not a prepared dataset")
    assert snapshot(work) == []
