"""The OOD stage through Snakemake on real Fashion-MNIST (.test/fashion-mnist-tiny.yaml, cut to
one experiment and one corruption to stay quick): every artifact, and what reruns what."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ENV, ROOT, TEST_CONFIGS

from cifar_ensembles.files.ood_summary import OodSummary, SelectiveSummary

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TINY = TEST_CONFIGS / "fashion-mnist-tiny.yaml"
SETS = yaml.safe_load(TINY.read_text())["ood"]["run_sets"]
SMALLER = {"run_experiments": ["adam"], "shift": {"run_corruptions": ["gaussian_noise"], "baseline": "adam"}}
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                 reason="needs Debian's dataset-fashion-mnist")]


def snakemake(workdir: Path, configs: list[Path], *args: str) -> subprocess.CompletedProcess:
    env = dict(ENV, PATH=str(Path(sys.executable).parent) + ":" + ENV.get("PATH", ""))
    cmd = [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--configfile",
           *map(str, configs), "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def planned(workdir: Path, configs: list[Path]) -> dict[str, int]:
    out = snakemake(workdir, configs, "-n").stdout
    if "Nothing to be done" in out:
        return {}
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1],
                                                               re.M) if m.group(1) != "total"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ood_workflow")
    smaller = workdir / "smaller.yaml"
    smaller.write_text(yaml.safe_dump(SMALLER))
    configs = [TINY, smaller]
    snakemake(workdir, configs)
    return workdir, configs


def with_change(run, tmp_path, change: dict) -> dict[str, int]:
    workdir, configs = run
    path = tmp_path / "change.yaml"
    path.write_text(yaml.safe_dump(change))
    return planned(workdir, [*configs, path])


def test_every_ood_artifact_is_written(run):
    workdir, _ = run
    summary = OodSummary.load(workdir / "results/adam/ood.json")
    assert [s.set for s in summary.sets] == SETS
    digits = summary.sets[0]
    assert digits.images == 100 and summary.in_images == 500
    # real images: the digits are told from Fashion-MNIST better than chance by the ensemble
    assert digits.scores["entropy"].ensemble["auroc"].value > 0.5
    assert digits.scores["epistemic"].single is None
    selective = SelectiveSummary.load(workdir / "results/adam/selective.json")
    assert [c.set for c in selective.curves] == ["clean", "severity 3", "severity 5"]
    for figure in ("results/report/ood.png", "results/report/adam/selective.png"):
        assert (workdir / figure).stat().st_size > 1000
    md = (workdir / "results/report/summary.md").read_text()
    assert "## Out-of-distribution detection" in md and "## Selective prediction" in md
    assert "(ood.png)" in md and "(adam/selective.png)" in md


def test_a_new_ood_set_predicts_only_itself(run, tmp_path):
    new = {"kind": "uniform_noise", "source": None, "url": None, "md5": None, "sigma": None}
    change = {"ood": {"run_sets": [*SETS, "more_noise"], "sets": {"more_noise": new}}}
    jobs = with_change(run, tmp_path, change)
    assert jobs == {"ood_set": 1, "predict_ood": 1, "ood_summary": 1, "plot_ood": 1, "summary": 1, "all": 1}


def test_a_selective_setting_reruns_only_selective(run, tmp_path):
    jobs = with_change(run, tmp_path, {"selective": {"coverages": [0.8]}})
    assert jobs == {"selective": 1, "plot_selective": 1, "summary": 1, "all": 1}


def test_a_runtime_change_reruns_no_ood_job(run, tmp_path):
    assert with_change(run, tmp_path, {"runtime": {"predict_batch_size": 7}}) == {}


def test_the_stage_can_be_turned_off(run, tmp_path):
    jobs = with_change(run, tmp_path, {"ood": {"run_sets": []}})
    assert jobs == {"summary": 1, "all": 1}
