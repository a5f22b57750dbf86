"""Snapshots, SWA, TTA and the accuracy-cost frontier through Snakemake on real Fashion-MNIST:
every artifact of the session's finished tiny workflow (.test/fashion-mnist-tiny.yaml, whose
`sam` keeps cycle-end snapshots and `adam` its last epochs and an SWA average, with TTA on),
and what reruns what (dry runs through Snakemake's API on that same workflow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import ROOT, planned_jobs

from cifar_ensembles.files.frontier_summary import Frontier, MethodsSummary
from cifar_ensembles.files.training_run import load_member

pytestmark = pytest.mark.slow

KEPT = {"sam": ["epoch1", "epoch2"], "adam": ["epoch2", "swa"]}  # what the tiny config keeps per run


@pytest.fixture(scope="module")
def run(fashion_run):
    workdir, configs, _ = fashion_run
    config = yaml.safe_load(configs[0].read_text())
    return workdir, configs, config


def with_change(run, tmp_path, change: dict) -> dict[str, int]:
    workdir, configs, _ = run
    path = tmp_path / "change.yaml"
    path.write_text(yaml.safe_dump(change))
    return planned_jobs(workdir, [*configs, path])


def test_every_run_keeps_its_members_and_each_is_predicted(run):
    workdir, _, config = run
    corruptions, sets = config["shift"]["run_corruptions"], config["ood"]["run_sets"]
    for experiment, kept in KEPT.items():
        for seed in config["experiments"][experiment]["seeds"]:
            run_dir = workdir / f"results/{experiment}/seed{seed}"
            for name in kept:
                assert load_member(run_dir / "members.pt", name).state_dict
            for name in ["tta", *kept]:  # each member on the splits, in its own folder
                metrics = json.loads((run_dir / name / "metrics.json").read_text())
                assert metrics["views"] == (6 if name == "tta" else 1)
                assert np.load(run_dir / name / "probs_test.npy").shape == (500, 10)
        extras = 2 * (1 + len(kept))  # two seeds, each TTA and its kept members
        results = workdir / "results" / experiment
        for c in corruptions:
            assert np.load(results / f"shift/{c}.members.npy").shape == (extras, 5, 500, 10)
        for s in sets:
            assert np.load(results / f"ood/{s}.members.npy").shape == (extras, 100, 10)


def test_methods_and_frontier_hold_every_method(run):
    workdir, _, _ = run
    expected = {"sam": {"single", "single_tta", "snapshot_ensemble"},
                "adam": {"single", "single_tta", "snapshot_ensemble", "swa"}}
    for experiment, methods in expected.items():
        summary = MethodsSummary.load(workdir / f"results/{experiment}/methods.json")
        pooled = {"single": "deep_ensemble", "single_tta": "deep_ensemble_tta", "swa": "deep_ensemble_swa",
                  "snapshot_ensemble": "deep_snapshot_ensemble"}
        assert {m.method for m in summary.methods} == methods | {pooled[m] for m in methods}
        snapshots = next(m for m in summary.methods if m.method == "snapshot_ensemble")
        assert snapshots.members == len([k for k in KEPT[experiment] if k.startswith("epoch")]) + 1
        assert all(m.shift is not None and m.shift.sets == 15 for m in summary.methods)
        assert all(set(m.ood_auroc) == {"digits", "uniform_noise", "smooth_noise"} for m in summary.methods)
    raw = json.loads((workdir / "results/frontier.json").read_text())
    keys = {"experiment", "method", "members", "train_passes", "train_seconds", "predict_passes",
            "test_accuracy", "test_nll", "test_ece"}
    assert raw["points"] and all(keys <= set(p) for p in raw["points"])
    points = Frontier.load(workdir / "results/frontier.json").points
    single = {p.experiment: p for p in points if p.method == "single"}
    assert single["sam"].train_passes == 2 * single["adam"].train_passes  # SAM: two passes per step
    assert any(p.pareto["accuracy"] for p in points)
    assert (workdir / "results/report/frontier.png").stat().st_size > 1000
    md = (workdir / "results/report/summary.md").read_text()
    assert "## Accuracy against cost" in md


def test_a_tta_setting_repredicts_only_the_tta_members_and_what_follows(run, tmp_path):
    _, _, config = run
    jobs = with_change(run, tmp_path, {"tta": {"translate": 1}})
    runs = sum(len(config["experiments"][e]["seeds"]) for e in KEPT)
    n, corruptions, sets = len(KEPT), len(config["shift"]["run_corruptions"]), len(config["ood"]["run_sets"])
    # the final models' predictions and everything that reads only them stay as they are
    assert jobs == {"predict_member": runs, "predict_shift_members": n * corruptions,
                    "predict_ood_members": n * sets, "methods": n, "frontier": 1, "plot_frontier": 1,
                    "summary": 1, "all": 1}


def test_keeping_one_more_snapshot_retrains_only_that_experiment(run, tmp_path):
    jobs = with_change(run, tmp_path, {"experiments": {"adam": {"snapshots": {"last_epochs": 3}}}})
    assert jobs["train_keeping_members"] == 2 and "train" not in jobs
    assert jobs["predict_member"] == 2 * 4  # tta, epoch1, epoch2, swa of both seeds


def test_a_new_corrupted_set_predicts_only_itself_for_the_extra_members_too(run, tmp_path):
    _, _, config = run
    corruptions = [*config["shift"]["run_corruptions"], "brightness"]
    jobs = with_change(run, tmp_path, {"shift": {"run_corruptions": corruptions}})
    n = len(KEPT)
    assert jobs["shift_set"] == 1 and jobs["predict_shift"] == jobs["predict_shift_members"] == n
    assert not {"train", "predict", "predict_member", "predict_ood_members"} & set(jobs)


def test_removing_a_corrupted_set_repredicts_nothing(run, tmp_path):
    _, _, config = run
    jobs = with_change(run, tmp_path, {"shift": {"run_corruptions": config["shift"]["run_corruptions"][:-1]}})
    assert not [rule for rule in jobs if rule.startswith(("train", "predict"))]


def test_the_study_config_keeps_nothing_and_trains_with_the_plain_rule(tmp_path):
    """config.yaml as it stands: runs write no members.pt, so a study trained before the new
    methods existed is still finished."""
    jobs = planned_jobs(tmp_path, [ROOT / "config.yaml"])
    assert jobs["train"] == 12 and "train_keeping_members" not in jobs and "predict_member" not in jobs
    assert jobs["methods"] == 2 and jobs["frontier"] == 1


def test_tta_for_fewer_experiments_reruns_only_the_one_that_loses_it(run, tmp_path):
    """tta.experiments [adam]: sam's extra members lose their TTA rows (its set jobs and methods
    rerun); adam's TTA jobs depend on the views alone, so nothing of adam's reruns."""
    _, _, config = run
    planned = with_change(run, tmp_path, {"tta": {"experiments": ["adam"]}})
    corruptions, sets = len(config["shift"]["run_corruptions"]), len(config["ood"]["run_sets"])
    assert planned == {"predict_shift_members": corruptions, "predict_ood_members": sets, "methods": 1,
                       "frontier": 1, "plot_frontier": 1, "summary": 1, "all": 1}
