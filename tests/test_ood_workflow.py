"""The OOD stage through Snakemake on real Fashion-MNIST: every artifact of the session's finished
tiny workflow (.test/fashion-mnist-tiny.yaml, conftest's `fashion_run`), and what reruns what
(dry runs through Snakemake's API on that same workflow)."""

from __future__ import annotations

import pytest
import yaml
from conftest import planned_jobs

from cifar_ensembles.files.ood_summary import OodSummary, SelectiveSummary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(fashion_run):
    workdir, configs, _ = fashion_run
    config = yaml.safe_load(configs[0].read_text())
    return workdir, configs, config["run_experiments"], config["ood"]["run_sets"]


def with_change(run, tmp_path, change: dict) -> dict[str, int]:
    workdir, configs, _, _ = run
    path = tmp_path / "change.yaml"
    path.write_text(yaml.safe_dump(change))
    return planned_jobs(workdir, [*configs, path])


def test_every_ood_artifact_is_written(run):
    workdir, _, experiments, sets = run
    for experiment in experiments:
        summary = OodSummary.load(workdir / f"results/{experiment}/ood.json")
        assert [s.set for s in summary.sets] == sets
        digits = summary.sets[0]
        assert digits.images == 100 and summary.in_images == 500
        assert digits.scores["epistemic"].single is None  # one model has no epistemic part
        selective = SelectiveSummary.load(workdir / f"results/{experiment}/selective.json")
        assert [c.set for c in selective.curves] == ["clean", "severity 3", "severity 5"]
        assert (workdir / f"results/report/{experiment}/selective.png").stat().st_size > 1000
    # real images: the digits are told from Fashion-MNIST better than chance by an ensemble
    digits = [OodSummary.load(workdir / f"results/{e}/ood.json").sets[0] for e in experiments]
    best = max(d.scores["entropy"].ensemble["auroc"].value for d in digits)
    assert best > 0.5
    assert (workdir / "results/report/ood.png").stat().st_size > 1000
    md = (workdir / "results/report/summary.md").read_text()
    assert "## Out-of-distribution detection" in md and "## Selective prediction" in md
    assert "(ood.png)" in md and all(f"({e}/selective.png)" in md for e in experiments)


def test_a_new_ood_set_predicts_only_itself(run, tmp_path):
    _, _, experiments, sets = run
    new = {"kind": "uniform_noise", "source": None, "url": None, "md5": None, "sigma": None}
    change = {"ood": {"run_sets": [*sets, "more_noise"], "sets": {"more_noise": new}}}
    jobs = with_change(run, tmp_path, change)
    n = len(experiments)
    # and the experiments' extra members (TTA, snapshots, SWA) on it, a job per experiment
    assert jobs == {"ood_set": 1, "predict_ood": n, "predict_ood_members": n, "ood_summary": n, "plot_ood": 1,
                    "methods": n, "frontier": 1, "plot_frontier": 1, "summary": 1, "all": 1}


def test_a_selective_setting_reruns_only_selective(run, tmp_path):
    n = len(run[2])
    jobs = with_change(run, tmp_path, {"selective": {"coverages": [0.8]}})
    assert jobs == {"selective": n, "plot_selective": n, "summary": 1, "all": 1}


def test_a_runtime_change_reruns_no_ood_job(run, tmp_path):
    assert with_change(run, tmp_path, {"runtime": {"predict_batch_size": 7}}) == {}


def test_the_stage_can_be_turned_off(run, tmp_path):
    n = len(run[2])
    assert with_change(run, tmp_path, {"ood": {"run_sets": []}}) == {
        "methods": n, "frontier": 1, "plot_frontier": 1, "summary": 1, "all": 1}
