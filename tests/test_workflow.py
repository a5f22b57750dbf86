"""The whole Snakemake workflow on a tiny upstream-format CIFAR-10 archive, then the rerun rules.

One real run (download -> prepare -> train -> predict -> ensemble -> report) checks every
artifact; dry runs after edits check that only what depends on the edit would rerun.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
EXPERIMENTS = {"exp_sgd": [0, 1], "exp_adam": [0, 1]}


def tiny_config(archive: Path, md5: str) -> dict:
    return {
        "dataset": "cifar10",
        "data": {"source": str(archive), "md5": md5, "val_size": 40, "split_seed": 0},
        "training": {
            "device": "cpu", "epochs": 1, "batch_size": 16,
            "model": {"name": "resnet18_cifar", "width": 4, "pretrained": False, "input_size": None},
            "loader": {"num_workers": 0},
        },
        "run_experiments": list(EXPERIMENTS),
        "experiments": {
            "exp_sgd": {"seeds": EXPERIMENTS["exp_sgd"],
                        "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
                        "scheduler": {"name": "cosine", "interval": "step"},
                        "loss": {"name": "cross_entropy"}},
            "exp_adam": {"seeds": EXPERIMENTS["exp_adam"], "optimizer": {"name": "adam", "lr": 1e-3},
                         "scheduler": {"name": "step", "step_size": 1}},
        },
        "predict": {"device": "cpu", "batch_size": 64},
        "report": {"dpi": 60, "published": None},
    }


def env() -> dict:
    e = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    return e


def snakemake(workdir: Path, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--configfile", str(config),
           "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{tail}")
    return proc


def planned_jobs(workdir: Path, config: Path) -> dict[str, int]:
    """Rule -> job count of a dry run ({} when there is nothing to do)."""
    out = snakemake(workdir, config, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            continue
        if m.group(1) == "total":
            break
        jobs[m.group(1)] = int(m.group(2))
    return jobs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_archive):
    archive, md5 = cifar_archive
    workdir = tmp_path_factory.mktemp("workflow")
    config_path = workdir / "tiny.yaml"
    config = tiny_config(archive, md5)
    config_path.write_text(yaml.safe_dump(config))
    proc = snakemake(workdir, config_path)
    return workdir, config_path, config, proc


@pytest.mark.slow
def test_every_artifact_is_written(finished_run):
    workdir, _, _, proc = finished_run
    assert "Report:" in proc.stdout + proc.stderr
    data = np.load(workdir / "resources/cifar10/data.npz")
    assert data["x_train"].dtype == np.uint8 and data["x_train"].shape[1:] == (32, 32, 3)
    assert len(data["y_val"]) == 40 and len(data["y_train"]) == 200 - 40 and len(data["y_test"]) == 60
    for experiment, seeds in EXPERIMENTS.items():
        for seed in seeds:
            run = workdir / f"results/{experiment}/seed{seed}"
            record = torch.load(run / "model.pt", weights_only=True)
            assert "state_dict" in record and record["num_classes"] == 10
            with open(run / "history.csv") as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == 1 and 0 <= float(rows[0]["val_acc"]) <= 1
            info = yaml.safe_load((run / "run.yaml").read_text())
            assert info["seed"] == seed and info["device"] == "cpu"
            assert (run / "benchmark.tsv").read_text().startswith("s\t")
            assert not (run / "checkpoint.pt").exists()
            for split, n in (("val", 40), ("test", 60)):
                probs = np.load(run / f"probs_{split}.npy")
                assert probs.dtype == np.float32 and probs.shape == (n, 10)
                np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
                metrics = json.loads((run / f"metrics_{split}.json").read_text())
                labels = data[f"y_{split}"]
                assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
            assert (workdir / f"logs/train/{experiment}/seed{seed}.log").read_text().count("epoch 1/1") == 1
        summary = json.loads((workdir / f"results/{experiment}/ensemble.json").read_text())
        assert summary["chosen_on"] == "val" and 1 <= summary["chosen_k"] <= len(seeds)
        with open(workdir / f"results/{experiment}/ensemble.csv") as f:
            assert [int(r["k"]) for r in csv.DictReader(f)] == list(range(1, len(seeds) + 1))
        for figure in ("training_curves", "ensemble_curve", "reliability"):
            png = workdir / f"results/report/{experiment}/{figure}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert "<svg" in (workdir / f"results/report/{experiment}/{figure}.svg").read_text()[:2000]
    for figure in ("accuracy", "cost"):
        assert (workdir / f"results/report/{figure}.png").read_bytes()[:4] == b"\x89PNG"
    comparisons = json.loads((workdir / "results/comparisons.json").read_text())
    assert [(c["a"], c["b"]) for c in comparisons["pairs"]] == [("exp_sgd", "exp_adam")]
    md = (workdir / "results/report/summary.md").read_text()
    assert all(e in md for e in EXPERIMENTS)
    assert (workdir / "results/report/summary.csv").read_text().count("\n") == 1 + len(EXPERIMENTS)


@pytest.mark.slow
def test_no_change_means_nothing_to_do(finished_run):
    workdir, config_path, _, _ = finished_run
    assert planned_jobs(workdir, config_path) == {}


@pytest.mark.slow
def test_report_only_change_reruns_only_report_jobs(finished_run, tmp_path):
    workdir, _, config, _ = finished_run
    changed = dict(config, report=dict(config["report"], dpi=72))
    path = tmp_path / "dpi.yaml"
    path.write_text(yaml.safe_dump(changed))
    jobs = planned_jobs(workdir, path)
    assert set(jobs) == {"plot_training_curves", "plot_ensemble_curve", "plot_reliability", "plot_accuracy",
                         "plot_cost", "all"}
    assert jobs["plot_training_curves"] == jobs["plot_reliability"] == len(EXPERIMENTS)


@pytest.mark.slow
def test_one_experiment_change_reruns_only_that_experiment(finished_run, tmp_path):
    workdir, _, config, _ = finished_run
    experiments = json.loads(json.dumps(config["experiments"]))
    experiments["exp_adam"]["optimizer"]["lr"] = 2e-3
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(dict(config, experiments=experiments)))
    jobs = planned_jobs(workdir, path)
    seeds = len(EXPERIMENTS["exp_adam"])
    assert jobs == {"train": seeds, "predict": 2 * seeds, "ensemble": 1, "compare": 1,
                    "plot_training_curves": 1, "plot_ensemble_curve": 1, "plot_reliability": 1,
                    "plot_accuracy": 1, "plot_cost": 1, "summary": 1, "all": 1}
    wildcards = re.findall(r"wildcards: (.*)", snakemake(workdir, path, "-n").stdout)
    assert wildcards and all("experiment=exp_adam" in w for w in wildcards)


@pytest.mark.slow
def test_html_report_builds(finished_run):
    workdir, config_path, _, _ = finished_run
    snakemake(workdir, config_path, "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert "training curves" in html.lower() or "training_curves" in html


def test_lint_is_clean():
    proc = subprocess.run([*SNAKEMAKE, "--lint", "--cores", "1"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_schema_rejects_unknown_key(tmp_path, cifar_archive):
    archive, md5 = cifar_archive
    config = tiny_config(archive, md5)
    config["experiments"]["exp_sgd"]["optimiser"] = {"name": "sgd"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, path, "-n", check=False)
    assert proc.returncode != 0
    assert "optimiser" in proc.stdout + proc.stderr


def test_pretrained_experiments_fetch_weights_in_their_own_job(tmp_path, cifar_archive):
    archive, md5 = cifar_archive
    config = tiny_config(archive, md5)
    config["experiments"]["exp_adam"]["model"] = {"name": "resnet18", "pretrained": True, "input_size": 64}
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(tmp_path, path)
    assert jobs["download_weights"] == 1
    out = snakemake(tmp_path, path, "-n").stdout
    weights_inputs = re.findall(r"rule train:\n\s+input: ([^\n]+)", out)
    assert sum("resnet18_imagenet.pth" in line for line in weights_inputs) == len(EXPERIMENTS["exp_adam"])
    del config["experiments"]["exp_adam"]["model"]
    path.write_text(yaml.safe_dump(config))
    assert "download_weights" not in planned_jobs(tmp_path, path)
