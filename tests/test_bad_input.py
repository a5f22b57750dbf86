"""Bad input, one case at a time: each must fail with one line that names the field or file,
a non-zero exit, and nothing half-written (no output of the step, no temporary files).

Config mistakes are checked in-process with `validate_config` (fast), a dozen through
Snakemake's API (its config loading, then the Snakefile's check at parse time, before any job)
and three through a real `snakemake -n` process; file mistakes through the
`cifar-ensembles` command, a few as real subprocesses (each imports torch, ~4 s) and the
rest through `cli.main` in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    ENV,
    ROOT,
    SNAKEFILE,
    TEST_CONFIGS,
    dry_run,
    ensemble_spec,
    load_config,
    make_data,
    predict_spec,
    snakemake_env,
    tiny_runtime,
    tiny_spec,
)

from cifar_ensembles.cli import main
from cifar_ensembles.config.check import validate_config
from cifar_ensembles.config.convert import to_json
from cifar_ensembles.config.spec import (
    RuntimeSpec,
    SourceSpec,
    SplitSpec,
    SubsetSpec,
    TrainingSpec,
    WeightsSpec,
    WorkflowSpec,
    deep_merge,
)
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.raw_data import fetch
from cifar_ensembles.files.training_run import ModelRecord
from cifar_ensembles.models import ResNet18Cifar

DEFAULTS = load_config()
# Lines Snakemake prints around any run; everything else must be our one line.
SNAKEMAKE_FRAMING = ("Config file ", "Using workflow specific profile", "Using profile ")


def as_override(override: dict | str) -> dict:
    """A case's override: a mapping, or YAML text (for what only YAML can write, like .nan)."""
    return yaml.safe_load(override) if isinstance(override, str) else override


def merged(override: dict | str) -> dict:
    """config.yaml with `override` merged over it, as `--configfile override.yaml` does."""
    return deep_merge(DEFAULTS, as_override(override))


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
    "runtime_option": ({"runtime": {"loadr": {"num_workers": 2}}},
                       ["runtime.loadr: unknown key; did you mean 'loader'?", "allowed: device, compile,"]),
    "experiment_runtime_option": ({EXP: {"ensemble_adam": {"runtime": {"jobs_per_gpus": 2}}}},
                                  ["experiments.ensemble_adam.runtime.jobs_per_gpus: unknown key; "
                                   "did you mean 'jobs_per_gpu'?"]),
    "augment_device_replaced_by_mode": ({"training": {"augment": {"device": "gpu"}}},
                                        ["training.augment.device: replaced by training.augment.mode"]),
    # wrong types
    "lr_text": ({EXP: {"single_asam": {"optimizer": {"lr": "fast"}}}},
                ['experiments.single_asam.optimizer.lr: expected a finite number, got "fast"']),
    "lr_yaml_1e-4": ({"training": {"optimizer": {"lr": "1e-4"}}},
                     ['training.optimizer.lr: expected a finite number, got "1e-4"', "write 1.0e-4"]),
    "seeds_text": ({EXP: {"ensemble_adam": {"seeds": "0"}}},
                   ['experiments.ensemble_adam.seeds: expected a list, got "0"']),
    "seed_float": ({EXP: {"ensemble_adam": {"seeds": [0, 1.5]}}},
                   ["experiments.ensemble_adam.seeds[1]: expected an integer, got 1.5"]),
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
    "seeds_empty": ({EXP: {"ensemble_adam": {"seeds": []}}},
                    ["experiments.ensemble_adam.seeds: expected at least 1 value(s), got 0"]),
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
    "jobs_per_gpu_three": ({EXP: {"ensemble_adam": {"runtime": {"jobs_per_gpu": 3}}}},
                           ["experiments.ensemble_adam.runtime.jobs_per_gpu: 3 is not one of [1, 2, 4, 8]"]),
    "eval_batch_size_zero": ({"runtime": {"eval_batch_size": 0}},
                             ["runtime.eval_batch_size: 0 is less than the minimum of 1"]),
    "checkpoint_minutes_zero": ({"runtime": {"checkpoint_every_minutes": 0}},
                                ["runtime.checkpoint_every_minutes: 0 is less than or equal to the "
                                 "minimum of 0"]),
    "compile_mode_name": ({"runtime": {"compile": "max-autotune"}},
                          ["runtime.compile: 'max-autotune' is not one of"]),
    "augment_mode_name": ({"training": {"augment": {"mode": "gpu"}}},
                          ["training.augment.mode: 'gpu' is not one of"]),
    # numbers YAML writes but no config may hold: .nan, .inf (they pass a JSON schema's bounds)
    "lr_inf": ("training: {optimizer: {lr: .inf}}", ["training.optimizer.lr: inf is not a finite number"]),
    "experiment_lr_nan": ("experiments: {single_asam: {optimizer: {lr: .nan}}}",
                          ["experiments.single_asam.optimizer.lr: nan is not a finite number"]),
    "checkpoint_minutes_nan": ("runtime: {checkpoint_every_minutes: .nan}",
                               ["runtime.checkpoint_every_minutes: nan is not a finite number"]),
    "experiment_checkpoint_minutes_inf": ("experiments: {ensemble_adam: {runtime: "
                                          "{checkpoint_every_minutes: .inf}}}",
                                          ["experiments.ensemble_adam.runtime.checkpoint_every_minutes: "
                                           "inf is not a finite number"]),
    "ema_decay_nan": ("training: {ema: {decay: .nan}}", ["training.ema.decay: nan is not a finite number"]),
    "rho_nan": ("experiments: {single_asam: {optimizer: {rho: .NaN}}}",
                ["experiments.single_asam.optimizer.rho: nan is not a finite number"]),
    "beta_nan": ("training: {optimizer: {betas: [0.9, .nan]}}",
                 ["training.optimizer.betas[1]: nan is not a finite number"]),
    "warmup_epochs_inf": ("training: {scheduler: {warmup_epochs: .Inf}}",
                          ["training.scheduler.warmup_epochs: inf is not a finite number"]),
    "cutout_fill_minus_inf": ("training: {augment: {cutout: {fill: -.inf}}}",
                              ["training.augment.cutout.fill: -inf"]),
    "published_accuracy_nan": ("report: {published: {single_asam: {note: x, test_accuracy: .nan, k: 1}}}",
                               ["report.published.single_asam.test_accuracy: nan is not a finite number"]),
    "ensemble_bootstrap_inf": ("ensemble: {bootstrap: .inf}",
                               ["ensemble.bootstrap: inf is not a finite number"]),
    "ensemble_bins_nan": ("ensemble: {ece_bins: .nan}", ["ensemble.ece_bins: nan is not a finite number"]),
    "val_size_inf": ("data: {val_size: .inf}", ["data.val_size: inf is not a finite number"]),
    "seed_nan": ("experiments: {ensemble_adam: {seeds: [0, .nan]}}",
                 ["experiments.ensemble_adam.seeds[1]: nan is not a finite number"]),
    # speed settings of earlier releases: where they live now
    "training_device_moved": ({"training": {"device": "cuda"}},
                              ["training.device: moved to runtime.device"]),
    "training_compile_moved": ({"training": {"compile": True}},
                               ["training.compile: moved to runtime.compile"]),
    "training_eval_batch_size_moved": ({"training": {"eval_batch_size": 256}},
                                       ["training.eval_batch_size: moved to runtime.eval_batch_size"]),
    "experiment_loader_moved": ({EXP: {"single_asam": {"loader": {"num_workers": 4}}}},
                                ["experiments.single_asam.loader: moved to "
                                 "experiments.single_asam.runtime.loader"]),
    "experiment_channels_last_moved": ({EXP: {"ensemble_adam": {"channels_last": False}}},
                                       ["experiments.ensemble_adam.channels_last: moved to "
                                        "experiments.ensemble_adam.runtime.channels_last"]),
    "experiment_jobs_per_gpu_moved": ({EXP: {"ensemble_adam": {"jobs_per_gpu": 4}}},
                                      ["experiments.ensemble_adam.jobs_per_gpu: moved to "
                                       "experiments.ensemble_adam.runtime.jobs_per_gpu"]),
    "predict_section_moved": ({"predict": {"batch_size": 256, "device": "cpu"}},
                              ["predict: moved to runtime.predict_batch_size and runtime.device"]),
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
    "device_name": ({"runtime": {"device": "gpu"}}, ["runtime.device: 'gpu' does not match"]),
    "experiment_device_name": ({EXP: {"single_asam": {"runtime": {"device": "cuda0"}}}},
                               ["experiments.single_asam.runtime.device: 'cuda0' does not match"]),
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
        validate_config(config)
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message
    assert repr(config) == repr(before), "validation changed the config"  # repr: nan != nan


SHIPPED_CONFIGS = [None, ROOT / "presets" / "demo.yaml", ROOT / "presets" / "from-scratch.yaml",
                   TEST_CONFIGS / "cifar10-tiny.yaml", TEST_CONFIGS / "fashion-mnist-tiny.yaml"]


@pytest.mark.parametrize("config_file", SHIPPED_CONFIGS, ids=lambda p: p.name if p else "config.yaml")
def test_shipped_configs_are_valid(config_file):
    config = load_config(*([config_file] if config_file else []))
    spec = validate_config(config)
    assert isinstance(spec, WorkflowSpec)
    assert list(spec.experiments) == list(config["experiments"])
    assert spec.selected == list(config["run_experiments"] or config["experiments"])
    for name, experiment in spec.experiments.items():
        assert experiment.name == name
        assert isinstance(experiment.training, TrainingSpec) and isinstance(experiment.runtime, RuntimeSpec)
        assert list(experiment.seeds) == config["experiments"][name]["seeds"]


def test_validated_spec_merges_runtime_per_experiment():
    override = {"runtime": {"device": "cpu"},
                EXP: {"ensemble_adam": {"runtime": {"jobs_per_gpu": 4, "loader": {"num_workers": 2}}}}}
    spec = validate_config(merged(override))
    adam, asam = spec.experiments["ensemble_adam"].runtime, spec.experiments["single_asam"].runtime
    assert (adam.jobs_per_gpu, adam.loader.num_workers, adam.device) == (4, 2, "cpu")
    assert (asam.jobs_per_gpu, asam.loader.num_workers, asam.device) == (1, None, "cpu")
    assert adam.loader.pin_memory == DEFAULTS["runtime"]["loader"]["pin_memory"]  # merged key by key


def test_schema_error_is_reported_before_semantic_ones():
    # an unknown key and a cosine floor above lr: the schema's error comes first
    config = merged({"trainig": {}, "training": {"scheduler": {"min_lr": 0.5}}})
    with pytest.raises(UserError, match=r"^trainig: unknown key"):
        validate_config(config)


def test_custom_archive_skips_the_standard_size_check():
    # with data.md5 set the archive is the user's own; prepare checks val_size against it
    validate_config(merged({"data": {"val_size": 50_000, "md5": "0" * 32}}))


# Through Snakemake: one of each kind of mistake, and a non-finite number in each section.
SNAKEMAKE_CASES = ["nested_optimiser", "lr_negative", "seeds_text", "ema_decay_one", "val_size_too_large",
                   "run_experiments_unknown", "cosine_floor_above_lr", "lr_inf", "experiment_loader_moved",
                   "experiment_lr_nan", "checkpoint_minutes_nan", "ensemble_bootstrap_inf"]
# ... and through a real process: a schema error, one only the checks after it find, a YAML .inf.
PROCESS_CASES = ["nested_optimiser", "cosine_floor_above_lr", "lr_inf"]


def bad_config(case: str, tmp_path: Path) -> tuple[Path, Path, str]:
    """The case's config file, an empty working directory, and the line `validate_config` gives."""
    override, expected = CONFIG_CASES[case]
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(override if isinstance(override, str) else yaml.safe_dump(override))
    workdir = tmp_path / "work"
    workdir.mkdir()
    with pytest.raises(UserError) as info:
        validate_config(merged(override))
    assert expected[0] in str(info.value)
    return config_file, workdir, f"config error: {info.value}"


@pytest.mark.parametrize("case", SNAKEMAKE_CASES)
def test_snakemake_stops_at_parse_time_with_the_line(case, tmp_path):
    """Snakemake's loading and merging of --configfile gives the config `merged` does, and the
    Snakefile ends the run with its one line (sys.exit's message) before any job writes."""
    config_file, workdir, line = bad_config(case, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        dry_run(workdir, [config_file])
    assert exit_info.value.code == line
    assert snapshot(workdir) == [], "a dry run with a bad config wrote files"


@pytest.mark.parametrize("case", PROCESS_CASES)
def test_snakemake_process_stops_at_parse_time_with_one_line(case, tmp_path):
    config_file, workdir, line = bad_config(case, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE),
                           "-d", str(workdir), "--configfile", str(config_file), "-n", "--cores", "1"],
                          cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output and "WorkflowError" not in output, output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(SNAKEMAKE_FRAMING)]
    assert lines == [line], output
    assert snapshot(workdir) == [], "a dry run with a bad config wrote files"


# -------------------------------------------------------------- file and CLI errors
def run_cli(*args, cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    """A real `python -m cifar_ensembles` process (what Snakemake's jobs run)."""
    proc = subprocess.run([sys.executable, "-m", "cifar_ensembles", *map(str, args)], cwd=cwd, env=env or ENV,
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


def rebuild(path: Path) -> str:
    """How a DamagedFile says to rebuild a file the workflow wrote."""
    return f"rebuild it with: snakemake --forcerun {path}"


def source_json(source=None, md5: str | None = None) -> str:
    return to_json(SourceSpec(source=None if source is None else str(source), url=None, md5=md5,
                              own_dataset=False))


def split_json(val_size: int, train: int | None = None, test: int | None = None) -> str:
    return to_json(SplitSpec(val_size=val_size, split_seed=0, subset=SubsetSpec(train=train, test=test)))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str]:
    from cifar_fixture import make_cifar10_archive

    path = tmp_path_factory.mktemp("bad_cifar") / "cifar-10-python.tar.gz"
    return path, make_cifar10_archive(path, per_batch=20, test_size=30, seed=3)


@pytest.fixture(scope="module")
def raw_dir(archive, tmp_path_factory) -> Path:
    path, md5 = archive
    return fetch("cifar10", tmp_path_factory.mktemp("bad_raw") / "raw", source=str(path), md5=md5)


def labels_data() -> dict:
    """A small data.npz's contents: 48 train, 24 val and 30 test 16 x 16 images, 10 classes."""
    return make_data(n_train=48, n_val=24, n_test=30)


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_data") / "data.npz"
    splits.write(path, labels_data())
    return path


def damaged_npz(tmp_path: Path, **replace) -> Path:
    """A data.npz with some arrays replaced (np.savez: what a hand-edited or foreign file holds)."""
    path = tmp_path / "damaged" / "data.npz"
    path.parent.mkdir(exist_ok=True)
    np.savez(path, **{**labels_data(), **replace})
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty folder for the step's outputs; tests assert it stays empty."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def test_download_missing_archive(work, tmp_path):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    line = assert_one_line(run_cli("download", "--dataset", "cifar10", "--spec", source_json(missing),
                                   "--out", work / "raw", cwd=tmp_path),
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
    assert_one_line(run_main(capsys, "download", "--dataset", "cifar10", "--spec",
                             source_json(truncated, md5), "--out", work / "raw"),
                    "download", "data.source", str(truncated), expected)
    assert snapshot(work) == []


def test_download_wrong_checksum(archive, work, capsys):
    path, _ = archive
    assert_one_line(run_main(capsys, "download", "--dataset", "cifar10", "--spec",
                             source_json(path, "0" * 32), "--out", work / "raw"),
                    "download", "data.source", str(path), "checksum mismatch", "0" * 32)
    assert snapshot(work) == []


def test_download_unknown_dataset(work, capsys):
    assert_one_line(run_main(capsys, "download", "--dataset", "mnist", "--spec", source_json(),
                             "--out", work / "raw"),
                    "download", "dataset: unknown dataset 'mnist'")
    assert snapshot(work) == []


def test_prepare_val_size_larger_than_training_set(raw_dir, work, capsys):
    assert_one_line(run_main(capsys, "prepare", "--dataset", "cifar10", "--spec", split_json(5000),
                             "--raw", raw_dir, "--out", work / "data.npz"),
                    "prepare", "data.val_size: 5000", "(100 images)")
    assert snapshot(work) == []


def test_prepare_train_subset_too_large(raw_dir, work, capsys):
    assert_one_line(run_main(capsys, "prepare", "--dataset", "cifar10", "--spec", split_json(20, train=81),
                             "--raw", raw_dir, "--out", work / "data.npz"),
                    "prepare", "data.subset.train: 81")
    assert snapshot(work) == []


# A stage's spec argument (JSON) is checked field by field, like the config:
# (command, option, JSON, expected).
SPEC_ARGUMENT_CASES = {
    "not_json": ("download", "--spec", "{source: null}", ["--spec: not valid JSON"]),
    "missing_field": ("prepare", "--spec", '{"val_size": 20, "split_seed": 0}', ["--spec.subset: missing"]),
    "unknown_field": ("prepare", "--spec", '{"val_size": 20, "split_seed": 0, "subset": {"train": null, '
                                           '"test": null}, "train_subset": 5}',
                      ["--spec.train_subset: unknown key"]),
    "wrong_type": ("predict", "--spec", '{"device": "cpu", "batch_size": "64"}',
                   ['--spec.batch_size: expected an integer, got "64"']),
    "lr_infinity": ("train", "--spec", None, ["--spec.optimizer.lr: expected a finite number, got inf"]),
    "minutes_nan": ("train", "--runtime", None,
                    ["--runtime.checkpoint_every_minutes: expected a finite number, got nan"]),
}


def spec_argument_command(command: str, option: str, text: str | None, data: Path, work: Path) -> list:
    if command == "download":
        return ["download", "--dataset", "cifar10", "--spec", text, "--out", work / "raw"]
    if command == "prepare":
        return ["prepare", "--dataset", "cifar10", "--spec", text, "--raw", work / "raw",
                "--out", work / "data.npz"]
    if command == "predict":
        return ["predict", "--model", work / "model.pt", "--data", data, "--split", "val",
                "--probs", work / "probs_val.npy", "--metrics", work / "metrics_val.json", "--spec", text,
                "--threads", 1]
    spec, runtime = to_json(tiny_spec()), to_json(tiny_runtime())
    if option == "--spec":  # JSON's Infinity and NaN parse to floats; the spec refuses them
        spec = spec.replace('"lr":0.05', '"lr":Infinity')
        assert "Infinity" in spec
    else:
        runtime = runtime.replace('"checkpoint_every_minutes":null', '"checkpoint_every_minutes":NaN')
        assert "NaN" in runtime
    return ["train", "--data", data, "--spec", spec, "--runtime", runtime, "--seed", 0,
            "--out-dir", work / "seed0", "--threads", 1]


@pytest.mark.parametrize("command, option, text, expected", list(SPEC_ARGUMENT_CASES.values()),
                         ids=list(SPEC_ARGUMENT_CASES))
def test_stage_spec_argument_is_checked(data_npz, work, capsys, command, option, text, expected):
    args = spec_argument_command(command, option, text, data_npz, work)
    assert_one_line(run_main(capsys, *args), command, *expected)
    assert snapshot(work) == []


def predict_args(model: Path, data: Path, work: Path) -> list:
    return ["predict", "--model", model, "--data", data, "--split", "val", "--probs", work / "probs_val.npy",
            "--metrics", work / "metrics_val.json", "--spec", to_json(predict_spec()), "--threads", 1]


def test_predict_corrupt_model(data_npz, work, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"this is not a model\n" * 50)
    assert_one_line(run_cli(*predict_args(model, data_npz, work), cwd=tmp_path),
                    "predict", f"{model}: not a readable model file", rebuild(model))
    assert snapshot(work) == []


def model_record(width: int = 4, saved_width: int | None = None) -> ModelRecord:
    """A model.pt's record: a width-`width` network saved as width `saved_width`."""
    model = tiny_spec().model
    net = ResNet18Cifar(10, 3, width)
    return ModelRecord(model=dataclasses.replace(model, width=saved_width or width), num_classes=10,
                       in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, ema=False,
                       state_dict=net.state_dict())


def test_predict_truncated_model(data_npz, work, tmp_path, capsys):
    model = tmp_path / "model.pt"
    model_record().save(model)
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert_one_line(run_main(capsys, *predict_args(model, data_npz, work)),
                    "predict", f"{model}: not a readable model file", rebuild(model))
    assert snapshot(work) == []


def test_predict_model_whose_weights_do_not_fit(data_npz, work, tmp_path, capsys):
    model = tmp_path / "model.pt"
    model_record(width=4, saved_width=8).save(model)
    assert_one_line(run_main(capsys, *predict_args(model, data_npz, work)),
                    "predict", f"{model}: weights do not fit the saved architecture", rebuild(model))
    assert snapshot(work) == []


@pytest.mark.parametrize("content", ["state_dict", "other_format", "missing"])
def test_predict_model_file_of_another_kind(data_npz, work, tmp_path, capsys, content):
    """A bare state dict, a record of another format version, or no file: named, with how to rebuild it."""
    model = tmp_path / "model.pt"
    record = model_record()
    if content == "state_dict":
        torch.save(record.state_dict, model)
        expected = "not a cifar-ensembles model file"
    elif content == "other_format":
        torch.save({"format": "cifar-ensembles/model-0", "state_dict": record.state_dict}, model)
        expected = "not a cifar-ensembles model file (format 'cifar-ensembles/model-0'"
    else:
        expected = "missing"
    assert_one_line(run_main(capsys, *predict_args(model, data_npz, work)),
                    "predict", f"{model}: {expected}", rebuild(model))
    assert snapshot(work) == []


def ensemble_args(data: Path, val: list[Path], test: list[Path], work: Path) -> list:
    return ["ensemble", "--data", data, "--seeds", *range(len(val)), "--val", *val, "--test", *test,
            "--spec", to_json(ensemble_spec()), "--csv", work / "ensemble.csv",
            "--json", work / "ensemble.json"]


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


def test_ensemble_members_for_another_dataset(data_npz, work, tmp_path, capsys):
    """Probabilities over 9 classes for a 10-class data.npz: named, not an IndexError."""
    val = [probs(tmp_path, "v0.npy", 24, classes=9)]
    test = [probs(tmp_path, "t0.npy", 30, classes=9)]
    assert_one_line(run_main(capsys, *ensemble_args(data_npz, val, test, work)),
                    "ensemble", f"{val[0]}: 9 classes, but {data_npz} has 10")
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
                    "ensemble", str(test[0]), "not a probability array", rebuild(test[0]))
    assert snapshot(work) == []


# data.npz read back with the wrong contents, by every stage that reads it: one line naming the file.
DAMAGED_DATA_CASES = {
    "train_float_images": ("train", lambda d: {"x_train": d["x_train"].astype(np.float32)},
                           "x_train must be uint8 N x H x W x C, got float32"),
    "train_labels_per_image_mismatch": ("train", lambda d: {"y_train": d["y_train"][:-1]},
                                        "48 x_train images but 47 labels"),
    "train_nan_mean": ("train", lambda d: {"mean": np.array([np.nan, 0.5, 0.5], np.float32)},
                       "mean must be finite per-channel numbers"),
    "predict_labels_out_of_range": ("predict", lambda d: {"y_val": np.full(24, 12)},
                                    "y_val has labels outside the classes"),
    "predict_grey_images_as_3d": ("predict", lambda d: {"x_val": d["x_val"][..., 0]},
                                  "x_val must be uint8 N x H x W x C"),
    "ensemble_float_labels": ("ensemble", lambda d: {"y_test": d["y_test"].astype(np.float64)},
                              "y_test must be integer labels, got float64"),
    "ensemble_negative_labels": ("ensemble", lambda d: {"y_val": np.where(np.arange(24) == 0, -1,
                                                                           d["y_val"])},
                                 "y_val has labels outside the classes"),
    "ensemble_labels_beyond_classes": ("ensemble", lambda d: {"y_test": np.full(30, 12)},
                                       "y_test has labels outside the classes"),
}


@pytest.mark.parametrize("command, damage, expected", list(DAMAGED_DATA_CASES.values()),
                         ids=list(DAMAGED_DATA_CASES))
def test_stage_reads_damaged_data(work, tmp_path, capsys, command, damage, expected):
    data = damaged_npz(tmp_path, **damage(labels_data()))
    if command == "train":
        args = train_args(data, work, train_spec(), tiny_runtime())
    elif command == "predict":
        model = tmp_path / "model.pt"
        model_record().save(model)
        args = predict_args(model, data, work)
    else:
        args = ensemble_args(data, [probs(tmp_path, "v0.npy", 24)], [probs(tmp_path, "t0.npy", 30)], work)
    assert_one_line(run_main(capsys, *args), command, f"{data}: damaged prepared dataset", expected,
                    rebuild(data))
    assert snapshot(work) == []


def weights_json(file) -> str:
    return to_json(WeightsSpec(url=None, file=str(file)))


def test_pretrained_weights_for_another_architecture(work, tmp_path):
    other = tmp_path / "cifar_resnet.pth"
    torch.save(ResNet18Cifar(10, 3, 4).state_dict(), other)
    assert_one_line(run_cli("download-weights", "--spec", weights_json(other),
                            "--out", work / "resnet18_imagenet.pth", cwd=tmp_path),
                    "download-weights", f"pretrained_weights.file: {other}: weights for another architecture")
    assert snapshot(work) == []


@pytest.mark.parametrize("content", [b"not torch at all", None], ids=["garbage", "missing"])
def test_pretrained_weights_unreadable(work, tmp_path, capsys, content):
    weights = tmp_path / "weights.pth"
    if content is not None:
        weights.write_bytes(content)
    line = assert_one_line(run_main(capsys, "download-weights", "--spec", weights_json(weights),
                                    "--out", work / "w.pth"),
                           "download-weights", f"pretrained_weights.file: {weights}: ")
    assert ("cannot load as torch weights" if content else "no such file") in line
    assert snapshot(work) == []


def train_args(data: Path, work: Path, spec: TrainingSpec, runtime: RuntimeSpec, *extra) -> list:
    return ["train", "--data", data, "--spec", to_json(spec), "--runtime", to_json(runtime), "--seed", 0,
            "--out-dir", work / "seed0", "--threads", 1, *extra]


def train_spec() -> TrainingSpec:
    """One epoch of the tiny network, nothing that needs a file or a library beyond torch."""
    return tiny_spec(epochs=1, scheduler={"name": "constant"}, loss={"name": "cross_entropy"},
                     augment={"name": "none"})


def test_train_on_cuda_without_cuda(data_npz, work, tmp_path):
    """runtime.device: cuda on a machine without CUDA (hidden here, so that GPU machines test it too)."""
    assert_one_line(run_cli(*train_args(data_npz, work, train_spec(), tiny_runtime(device="cuda"),
                                        "--checkpoint", work / "seed0" / "checkpoint.pt"),
                            cwd=tmp_path, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}),
                    "train", "device: 'cuda' requested but CUDA is not available")
    assert snapshot(work) == []


def test_train_pretrained_weights_for_another_architecture(data_npz, work, tmp_path, capsys):
    other = tmp_path / "cifar_resnet.pth"
    torch.save(ResNet18Cifar(10, 3, 4).state_dict(), other)
    spec = tiny_spec(epochs=1, model={"name": "resnet18", "pretrained": True, "input_size": None})
    assert_one_line(run_main(capsys, *train_args(data_npz, work, spec, tiny_runtime(), "--weights", other)),
                    "train", str(other), "weights for another architecture")
    assert snapshot(work) == []


def test_train_corrupt_data(work, tmp_path, capsys):
    data = tmp_path / "data.npz"
    data.write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line(run_main(capsys, *train_args(data, work, train_spec(), tiny_runtime())),
                    "train", f"{data}: not a prepared dataset", rebuild(data))
    assert snapshot(work) == []
