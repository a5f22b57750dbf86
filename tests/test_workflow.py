"""The whole Snakemake workflow on the committed tiny configs (.test/), then the rerun rules.

One real run (download -> prepare -> train -> predict -> ensemble -> report) on a tiny
upstream-format CIFAR-10 archive checks every artifact; dry runs after edits (Snakemake's API in
this process) check that a result setting reruns exactly what depends on it and a runtime setting
reruns nothing. A real `snakemake` process runs where the process is the point: the runs
themselves, and failures.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    ROOT,
    TEST_CONFIGS,
    dry_run,
    job_counts,
    load_config,
    planned_jobs,
    snakemake,
    snakemake_api,
)

from cifar_ensembles.files.ensemble_summary import EnsembleSummary
from cifar_ensembles.files.shift_summary import DiversitySummary, ShiftSummary
from cifar_ensembles.files.training_run import ModelRecord, read_history

TINY = TEST_CONFIGS / "cifar10-tiny.yaml"
TINY_CONFIG = yaml.safe_load(TINY.read_text())
EXPERIMENTS = {name: TINY_CONFIG["experiments"][name]["seeds"] for name in TINY_CONFIG["run_experiments"]}
PLOTS = {"plot_training_curves", "plot_ensemble_curve", "plot_reliability", "plot_accuracy", "plot_cost",
         "plot_shift", "plot_diversity", "plot_selective", "plot_frontier"}


def write_source(directory: Path, archive: Path, md5: str) -> Path:
    """The config file .test/make_tiny_cifar.py writes: where the archive is and its MD5."""
    path = directory / "source.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": str(archive), "md5": md5}}))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_archive):
    archive, md5 = cifar_archive
    workdir = tmp_path_factory.mktemp("workflow")
    configs = [TINY, write_source(workdir, archive, md5)]
    proc = snakemake(workdir, configs)
    return workdir, configs, proc


def change_file(tmp_path, change: dict) -> Path:
    path = tmp_path / "change.yaml"
    path.write_text(yaml.safe_dump(change))
    return path


def with_change(finished_run, tmp_path, change: dict) -> dict[str, int]:
    """The dry run's plan (rule -> jobs) after adding a config file with `change` to the finished run's."""
    workdir, configs, _ = finished_run
    return planned_jobs(workdir, [*configs, change_file(tmp_path, change)])


def jobs_with_change(finished_run, tmp_path, change: dict):
    """The dry run's jobs (rule, wildcards, input) after the same change."""
    workdir, configs, _ = finished_run
    return dry_run(workdir, [*configs, change_file(tmp_path, change)])


@pytest.mark.slow
def test_every_artifact_is_written(finished_run):
    workdir, _, proc = finished_run
    assert "Report:" in proc.stdout + proc.stderr
    data = np.load(workdir / "resources/cifar10/data.npz")
    assert data["x_train"].dtype == np.uint8 and data["x_train"].shape[1:] == (32, 32, 3)
    assert len(data["y_val"]) == 40 and len(data["y_train"]) == 200 - 40 and len(data["y_test"]) == 60
    for experiment, seeds in EXPERIMENTS.items():
        for seed in seeds:
            run = workdir / f"results/{experiment}/seed{seed}"
            record = ModelRecord.load(run / "model.pt")
            assert record.num_classes == 10 and record.model.width == 4
            rows = read_history(run / "history.csv")
            assert len(rows) == 1 and 0 <= rows[0].val_acc <= 1
            info = yaml.safe_load((run / "run.yaml").read_text())
            assert info["seed"] == seed and info["device"] == "cpu"
            assert info["training"]["model"]["width"] == 4 and info["runtime"]["device"] == "cpu"
            assert (run / "benchmark.tsv").read_text().startswith("s\t")
            assert not (run / "checkpoint.pt").exists()
            for split, n in (("val", 40), ("test", 60)):
                probs = np.load(run / f"probs_{split}.npy")
                assert probs.dtype == np.float32 and probs.shape == (n, 10)
                np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
                metrics = json.loads((run / f"metrics_{split}.json").read_text())
                assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == data[f"y_{split}"]))
            assert (workdir / f"logs/train/{experiment}/seed{seed}.log").read_text().count("epoch 1/1") == 1
        summary = EnsembleSummary.load(workdir / f"results/{experiment}/ensemble.json")
        assert summary.chosen_on == "val" and 1 <= summary.chosen_k <= len(seeds)
        with open(workdir / f"results/{experiment}/ensemble.csv") as f:
            assert [int(r["k"]) for r in csv.DictReader(f)] == list(range(1, len(seeds) + 1))
        for figure in ("training_curves", "ensemble_curve", "reliability"):
            png = workdir / f"results/report/{experiment}/{figure}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert "<svg" in (workdir / f"results/report/{experiment}/{figure}.svg").read_text()[:2000]
    for figure in ("accuracy", "cost", "shift"):
        assert (workdir / f"results/report/{figure}.png").read_bytes()[:4] == b"\x89PNG"
    corruptions = TINY_CONFIG["shift"]["run_corruptions"]
    for experiment, seeds in EXPERIMENTS.items():
        shift = ShiftSummary.load(workdir / f"results/{experiment}/shift.json")
        assert shift.corruptions == corruptions and len(shift.sets) == 5 * len(corruptions)
        assert shift.corruption_error is not None and shift.corruption_error.baseline == "exp_adam"
        assert DiversitySummary.load(workdir / f"results/{experiment}/diversity.json").seeds == seeds
        assert (workdir / f"results/report/{experiment}/diversity.png").read_bytes()[:4] == b"\x89PNG"
    for corruption in corruptions:
        assert np.load(workdir / f"resources/cifar10/shift/{corruption}.npz")["x"].shape[:2] == (5, 60)
    comparisons = json.loads((workdir / "results/comparisons.json").read_text())
    assert [(c["a"], c["b"]) for c in comparisons["pairs"]] == [tuple(EXPERIMENTS)]
    md = (workdir / "results/report/summary.md").read_text()
    assert all(e in md for e in EXPERIMENTS)
    assert (workdir / "results/report/summary.csv").read_text().count("\n") == 1 + len(EXPERIMENTS)


@pytest.mark.slow
def test_no_change_means_nothing_to_do(finished_run):
    workdir, configs, _ = finished_run
    assert planned_jobs(workdir, configs) == {}


# Every runtime key, changed to another valid value: none may rerun anything.
RUNTIME_CHANGES = {
    "device": "auto", "compile": True, "channels_last": False, "cudnn_benchmark": False, "jobs_per_gpu": 4,
    "eval_batch_size": 7, "predict_batch_size": 5, "eval_every_epochs": 3, "checkpoint_every_epochs": 2,
    "checkpoint_every_minutes": 1.5, "loader": {"num_workers": 1, "pin_memory": False,
                                                "persistent_workers": False},
}


def test_the_runtime_changes_cover_every_runtime_key():
    assert set(RUNTIME_CHANGES) == set(load_config()["runtime"])


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RUNTIME_CHANGES))
def test_a_runtime_change_reruns_nothing(finished_run, tmp_path, key):
    assert with_change(finished_run, tmp_path, {"runtime": {key: RUNTIME_CHANGES[key]}}) == {}


@pytest.mark.slow
def test_a_runtime_change_of_one_experiment_reruns_nothing(finished_run, tmp_path):
    experiment = next(iter(EXPERIMENTS))
    change = {"experiments": {experiment: {"runtime": RUNTIME_CHANGES}}}
    assert with_change(finished_run, tmp_path, change) == {}


@pytest.mark.slow
def test_report_only_change_reruns_only_report_jobs(finished_run, tmp_path):
    jobs = with_change(finished_run, tmp_path, {"report": {"dpi": 72}})
    assert set(jobs) == PLOTS | {"all"}
    assert jobs["plot_training_curves"] == jobs["plot_reliability"] == len(EXPERIMENTS)


@pytest.mark.slow
def test_published_number_of_one_experiment_redraws_its_curve_and_the_summary(finished_run, tmp_path):
    experiment = next(iter(EXPERIMENTS))
    published = {experiment: {"note": "x", "test_accuracy": 0.5, "k": 1}}
    jobs = with_change(finished_run, tmp_path, {"report": {"published": published}})
    assert jobs == {"plot_ensemble_curve": 1, "summary": 1, "all": 1}


@pytest.mark.slow
def test_ensemble_setting_reruns_ensembles_and_report(finished_run, tmp_path):
    jobs = with_change(finished_run, tmp_path, {"ensemble": {"bootstrap": 200}})
    n = len(EXPERIMENTS)
    assert jobs == {"ensemble": n, "plot_ensemble_curve": n, "plot_reliability": n, "plot_accuracy": 1,
                    "shift_summary": n, "plot_shift": 1, "plot_diversity": n, "selective": n,
                    "plot_selective": n, "methods": n, "frontier": 1, "plot_frontier": 1, "summary": 1,
                    "all": 1}


@pytest.mark.slow
@pytest.mark.parametrize("change", [{"optimizer": {"lr": 2e-3}}, {"precision": "bf16"},
                                    {"augment": {"mode": "per_image"}}, {"ema": {"enabled": True}}])
def test_one_experiment_result_change_reruns_only_that_experiment(finished_run, tmp_path, change):
    experiment = "exp_sgd"  # not the shift baseline, whose models the others' corruption errors read
    assert TINY_CONFIG["shift"]["baseline"] != experiment
    planned = jobs_with_change(finished_run, tmp_path, {"experiments": {experiment: change}})
    jobs = job_counts(planned)
    seeds, corruptions = len(EXPERIMENTS[experiment]), len(TINY_CONFIG["shift"]["run_corruptions"])
    # only this experiment's jobs, and the figures across experiments (its shift predictions are
    # jobs of its own: the other experiment's shift probabilities stay as they are)
    assert jobs == {"train": seeds, "predict": 2 * seeds, "predict_shift": corruptions, "ensemble": 1,
                    "compare": 1, "shift_summary": 1, "diversity": 1, "plot_training_curves": 1,
                    "plot_ensemble_curve": 1, "plot_reliability": 1, "plot_diversity": 1, "plot_accuracy": 1,
                    "plot_cost": 1, "plot_shift": 1, "selective": 1, "plot_selective": 1, "methods": 1,
                    "frontier": 1, "plot_frontier": 1, "summary": 1, "all": 1}
    per_experiment = {"train", "predict", "predict_shift", "ensemble", "shift_summary", "diversity",
                      "plot_diversity", "selective", "plot_selective", "methods"}
    theirs = [job.wildcards for job in planned if job.rule in per_experiment]
    assert theirs and all(w["experiment"] == experiment for w in theirs)


@pytest.mark.slow
def test_a_training_default_reruns_only_the_experiments_whose_result_it_decides(finished_run, tmp_path):
    # exp_sgd trains with cross-entropy, which has no gamma_neg; exp_adam keeps the default ASL
    assert TINY_CONFIG["experiments"]["exp_sgd"]["loss"]["name"] == "cross_entropy"
    planned = jobs_with_change(finished_run, tmp_path, {"training": {"loss": {"gamma_neg": 2.0}}})
    assert job_counts(planned)["train"] == len(EXPERIMENTS["exp_adam"])
    # exp_sgd neither retrains nor repredicts; only its corruption error, relative to the baseline
    # exp_adam, is computed again
    reruns = {job.rule for job in planned if job.wildcards.get("experiment") == "exp_sgd"}
    assert reruns == {"shift_summary"}
    # and a field no experiment uses (Adam's betas: exp_adam keeps them, exp_sgd has no Adam)
    betas = {"experiments": {"exp_sgd": {"optimizer": {"betas": [0.5, 0.5]}}}}
    unused = with_change(finished_run, tmp_path, betas)
    assert unused == {}


@pytest.mark.slow
def test_data_split_change_reruns_from_prepare(finished_run, tmp_path):
    jobs = with_change(finished_run, tmp_path, {"data": {"val_size": 30}})
    assert jobs["prepare"] == 1 and "download" not in jobs
    assert jobs["train"] == sum(len(s) for s in EXPERIMENTS.values())


SHIFT_ANALYSIS = {"shift_summary": len(EXPERIMENTS), "diversity": len(EXPERIMENTS), "plot_shift": 1,
                  "plot_diversity": len(EXPERIMENTS), "selective": len(EXPERIMENTS),
                  "plot_selective": len(EXPERIMENTS), "methods": len(EXPERIMENTS), "frontier": 1,
                  "plot_frontier": 1, "summary": 1, "all": 1}


@pytest.mark.slow
def test_adding_a_corruption_runs_only_its_own_jobs_and_the_analyses(finished_run, tmp_path):
    corruptions = [*TINY_CONFIG["shift"]["run_corruptions"], "impulse_noise"]
    planned = jobs_with_change(finished_run, tmp_path, {"shift": {"run_corruptions": corruptions}})
    assert job_counts(planned) == {"shift_set": 1, "predict_shift": len(EXPERIMENTS), **SHIFT_ANALYSIS}
    assert {"dataset": "cifar10", "corruption": "impulse_noise"} in [job.wildcards for job in planned]
    assert {job.wildcards.get("corruption") for job in planned} == {None, "impulse_noise"}


@pytest.mark.slow
def test_removing_a_corruption_reruns_only_the_analyses(finished_run, tmp_path):
    corruptions = TINY_CONFIG["shift"]["run_corruptions"][:-1]
    assert with_change(finished_run, tmp_path, {"shift": {"run_corruptions": corruptions}}) == SHIFT_ANALYSIS


@pytest.mark.slow
def test_a_corruption_parameter_regenerates_only_its_set(finished_run, tmp_path):
    name = TINY_CONFIG["shift"]["run_corruptions"][0]
    severities = load_config()["shift"]["corruptions"][name]["severities"]
    change = {"shift": {"corruptions": {name: {"severities": [*severities[:4], severities[3]]}}}}
    expected = {"shift_set": 1, "predict_shift": len(EXPERIMENTS), **SHIFT_ANALYSIS}
    assert with_change(finished_run, tmp_path, change) == expected


@pytest.mark.slow
def test_html_report_builds(finished_run):
    """`snakemake --report report.html`, through the API."""
    from snakemake.report.html_reporter import ReportSettings
    from snakemake.settings.types import DAGSettings

    workdir, configs, _ = finished_run
    with snakemake_api(workdir, configs) as workflow:
        workflow.dag(DAGSettings()).create_report(report_settings=ReportSettings(path=Path("report.html")))
    html = (workdir / "report.html").read_text(errors="replace")
    assert "training curves" in html.lower() or "training_curves" in html


@pytest.mark.slow
def test_the_fashion_mnist_test_config_runs_end_to_end(fashion_run):
    """The real-data tiny workflow a person can run by hand (needs Debian's dataset-fashion-mnist)."""
    workdir, (config_file,), _ = fashion_run
    config = yaml.safe_load(config_file.read_text())
    for experiment in config["run_experiments"]:
        summary = EnsembleSummary.load(workdir / f"results/{experiment}/ensemble.json")
        assert len(summary.singles) == len(config["experiments"][experiment]["seeds"])
        assert summary.single_test_accuracy.mean > 0.3  # real images: well above chance (0.1)
    assert (workdir / "results/report/summary.md").exists()


def test_lint_is_clean():
    """`snakemake --lint` in the repository, through the API: no lints."""
    with snakemake_api(ROOT, []) as workflow:
        assert workflow.lint() is False


def test_pretrained_experiments_fetch_weights_in_their_own_job(tmp_path, cifar_archive):
    configs = [TINY, write_source(tmp_path, *cifar_archive)]
    pretrained = tmp_path / "pretrained.yaml"
    experiment = list(EXPERIMENTS)[-1]
    pretrained.write_text(yaml.safe_dump({"experiments": {experiment: {"model": {
        "name": "resnet18", "pretrained": True, "input_size": 64}}}}))
    planned = dry_run(tmp_path, [*configs, pretrained])
    assert job_counts(planned)["download_weights"] == 1
    weights = [job for job in planned if job.rule == "train" and "resources/weights/resnet18_imagenet.pth"
               in job.input]
    assert len(weights) == len(EXPERIMENTS[experiment])
    assert all(job.wildcards["experiment"] == experiment for job in weights)
    assert "download_weights" not in planned_jobs(tmp_path, configs)


# ------------------------------------------------------------------ untrusted input through snakemake
class _Poison:
    """Unpickled naively, creates `marker` (the tests assert it never appears)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _bad_archive(tmp_path: Path, case: str) -> tuple[Path, str, Path]:
    """A CIFAR-10 archive of the user's own (with its own MD5): poisoned, or escaping its folder."""
    from cifar_fixture import Member, cifar10_members, pickled_members, write_tar

    members = cifar10_members(per_batch=40, test_size=60)
    marker = tmp_path / "marker"
    if case == "poisoned batch":
        members["data_batch_2"] = {**members["data_batch_2"], "data": _Poison(marker)}
        entries = pickled_members("cifar-10-batches-py", members)
    else:  # a member named to land outside the folder
        entries = [*pickled_members("cifar-10-batches-py", members),
                   Member("cifar-10-batches-py/../../../escaped", b"x")]
    archive = tmp_path / "own" / "cifar-10-python.tar.gz"
    return archive, write_tar(archive, entries), marker


UNTRUSTED = [("poisoned batch", "not a plain-data CIFAR batch"),
             ("escaping member", "has a '..' component; nothing was extracted")]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", UNTRUSTED)
def test_an_untrusted_archive_fails_cleanly_through_snakemake(tmp_path, case, message):
    """The user's own archive, through the workflow: the download job fails in one line naming the
    member, no traceback in Snakemake's output or the job log, no code run, nothing written outside,
    and nothing that looks finished."""
    archive, md5, marker = _bad_archive(tmp_path, case)
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = snakemake(workdir, [TINY, write_source(workdir, archive, md5)], check=False)
    assert proc.returncode != 0
    log = (workdir / "logs/download/cifar10.log").read_text().strip().splitlines()
    assert len(log) == 1 and message in log[0] and log[0].startswith("cifar-ensembles download: error:"), log
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not marker.exists() and not list(tmp_path.rglob("escaped"))
    assert not (workdir / "resources/cifar10/raw").exists()
    assert not [p for p in workdir.rglob(".raw.*")], "a staging folder was left behind"
