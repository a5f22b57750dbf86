"""Shared builders, references and fixtures. The package is tested without Snakemake; workflow
tests call it through the helpers at the end (a real process where the process is the point,
Snakemake's API in this process for plans), with the finished tiny workflows as fixtures.

Specs are built from config.yaml (the one place where defaults live) with a test's
overrides merged in, so tests exercise exactly what a user's config resolves to. The
plain-loop references (votes, accuracy, NLL, reliability bins, ECE) are written once, here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
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


# ------------------------------------------------------------------ references (plain loops)
# One reference per quantity, written as directly as it is defined, for every test that checks
# the package's vectorised version.


def dyadic_probs(m: int, n: int, c: int, seed: int, units: int = 4) -> np.ndarray:
    """m members x n samples x c classes of multiples of 1/units: sums are exact, so vote ties
    are frequent and unambiguous."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(units, np.full(c, 1 / c), size=(m, n)) / units


def ref_soft_vote(probs) -> np.ndarray:
    """Per sample, the class of the highest mean probability over members (ties: lower class)."""
    m, n, c = probs.shape
    out = []
    for i in range(n):
        mean = [sum(float(probs[k, i, j]) for k in range(m)) / m for j in range(c)]
        out.append(max(range(c), key=lambda j: (mean[j], -j)))
    return np.array(out)


def ref_hard_vote(probs) -> np.ndarray:
    """Most votes; ties to the larger summed probability, then to the lower class index."""
    m, n, c = probs.shape
    out = []
    for i in range(n):
        votes = Counter(int(np.argmax(probs[k, i])) for k in range(m))
        top = max(votes.values())
        tied = [j for j in range(c) if votes.get(j, 0) == top]
        summed = {j: sum(float(probs[k, i, j]) for k in range(m)) for j in tied}
        best = max(summed.values())
        out.append(min(j for j in tied if summed[j] == best))
    return np.array(out)


def ref_accuracy(predicted, labels) -> float:
    """The share of predicted classes equal to the labels."""
    return sum(int(p == y) for p, y in zip(predicted, labels)) / len(labels)


def ref_nll(probs, labels) -> float:
    """Mean -log p(true class) over samples (n x c probabilities), a probability below 1e-12
    counting as 1e-12 (metrics.nll's floor)."""
    return -sum(math.log(max(float(probs[i][y]), 1e-12)) for i, y in enumerate(labels)) / len(labels)


def ref_reliability(probs, labels, n_bins: int) -> tuple[list, list, list]:
    """Bins (b/n, (b+1)/n] of the top probability (a confidence of 0 goes to bin 0): count, mean
    confidence and accuracy per bin (NaN for an empty bin)."""
    count, conf, acc = [], [], []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(labels))
                   if lo < max(probs[i]) <= hi or (b == 0 and max(probs[i]) == 0)]
        count.append(len(members))
        if members:
            conf.append(sum(max(probs[i]) for i in members) / len(members))
            acc.append(sum(int(np.argmax(probs[i]) == labels[i]) for i in members) / len(members))
        else:
            conf.append(math.nan)
            acc.append(math.nan)
    return count, conf, acc


def ref_ece(probs, labels, n_bins: int) -> float:
    """Guo et al.: sum over bins of |B|/N |acc(B) - conf(B)|."""
    count, conf, acc = ref_reliability(probs, labels, n_bins)
    return sum(k / len(labels) * abs(a - f) for k, f, a in zip(count, conf, acc) if k)


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


# ------------------------------------------------------------------ Snakemake
SNAKEFILE = ROOT / "Snakefile"
# Every Snakemake start imports every installed executor plugin, and snakemake-executor-plugin-
# slurm then runs `scontrol show config` (to describe its status-command option): with a
# slurm.conf whose controller is not running (as `make test-slurm` leaves it) that waits about
# 9 s. Runs that do not use SLURM give the SLURM client an empty configuration, which it
# rejects at once; tests/test_slurm.py runs with the real one.
NO_SLURM = {"SLURM_CONF": os.devnull}


def snakemake_env(slurm: bool = False) -> dict:
    """The environment of a `snakemake` process: this virtualenv's commands first on PATH (the
    jobs run `cifar-ensembles`), and without the SLURM configuration unless `slurm`."""
    env = {**ENV, "PATH": str(Path(sys.executable).parent) + os.pathsep + ENV.get("PATH", "")}
    return env if slurm else {**env, **NO_SLURM}


def snakemake(workdir: Path, configs, *args: str, check: bool = True,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """A real `snakemake --cores 2` process on the workflow in `workdir` (with the workflow's
    default profile, as a user runs it): for runs, exit statuses and what it prints."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir),
           "--configfile", *map(str, configs), "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=snakemake_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def _environ(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def snakemake_api(workdir: Path, configs, log_handler: logging.Handler | None = None, dryrun: bool = False):
    """Snakemake's API in this process on the workflow in `workdir` with `configs` (what
    `snakemake --configfile CONFIGS [-n]` sets up, without a process start): yields its workflow
    API; `log_handler` sees every record Snakemake logs meanwhile."""
    with _environ(NO_SLURM):  # importing the API imports the executor plugins
        from snakemake.api import SnakemakeApi
        from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with _environ(NO_SLURM), SnakemakeApi(OutputSettings(dryrun=dryrun, stdout=dryrun)) as api:
        if log_handler is not None:
            api.logger_manager.logger.addHandler(log_handler)
        try:
            config = ConfigSettings(configfiles=[Path(c) for c in configs])
            yield api.workflow(ResourceSettings(cores=2), config, snakefile=SNAKEFILE, workdir=Path(workdir))
        finally:
            if log_handler is not None:
                api.logger_manager.logger.removeHandler(log_handler)


@dataclass(frozen=True)
class PlannedJob:
    rule: str
    wildcards: dict
    input: list


def dry_run(workdir: Path, configs) -> list[PlannedJob]:
    """The jobs `snakemake -n --configfile CONFIGS` plans in `workdir` (through Snakemake's API in
    this process): each job's rule, wildcards and input files as Snakemake logs them."""
    from snakemake.settings.types import DAGSettings, ExecutionSettings
    from snakemake_interface_logger_plugins.common import LogEvent

    jobs: list[PlannedJob] = []

    class Planned(logging.Handler):
        def emit(self, record):
            if getattr(record, "event", None) == LogEvent.JOB_INFO:
                jobs.append(PlannedJob(record.rule_name, dict(record.wildcards), list(record.input)))

    with snakemake_api(workdir, configs, Planned(), dryrun=True) as workflow:
        # force_incomplete: the default profile's rerun-incomplete
        workflow.dag(DAGSettings(force_incomplete=True)).execute_workflow(
            executor="local", pseudo_executor="dryrun", execution_settings=ExecutionSettings())
    return jobs


def job_counts(jobs: list[PlannedJob]) -> dict[str, int]:
    """Rule -> number of jobs ({} for none), as Snakemake's job stats count them."""
    return dict(Counter(job.rule for job in jobs))


def planned_jobs(workdir: Path, configs) -> dict[str, int]:
    """Rule -> number of jobs of a dry run ({} when there is nothing to do)."""
    return job_counts(dry_run(workdir, configs))


@pytest.fixture(scope="session")
def fashion_run(tmp_path_factory):
    """The committed real-data tiny workflow (.test/fashion-mnist-tiny.yaml, on Debian's
    dataset-fashion-mnist) run to the end once per session: (workdir, configs, process)."""
    workdir = tmp_path_factory.mktemp("fashion")
    configs = [TEST_CONFIGS / "fashion-mnist-tiny.yaml"]
    return workdir, configs, snakemake(workdir, configs)
