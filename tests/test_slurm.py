"""The tiny workflow through profiles/slurm on a real SLURM cluster, against a local run.

`make test-slurm` starts a single-node cluster (scripts/slurm-local/start.sh), runs the
tests marked `slurm` and stops it; `make test` deselects them (`-m "not slurm"`). Without
a reachable cluster they fail rather than skip: a skipped cluster test would look green.

The SLURM run uses the real profile with only what a one-node test cluster without
accounting needs changed (squeue status, short first status check, its partition, small
memory, one CPU per GPU job) and the local default profile's threads, so that training
and prediction must give bitwise the same files as a local `--cores 2` run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, snakemake_env
from test_workflow import TINY, write_source

PROFILE = ROOT / "profiles" / "slurm" / "profile.yaml"
LOCAL_PROFILE = ROOT / "profiles" / "default" / "profile.yaml"
# The rules both profiles give threads (and the SLURM one GPUs and cores): training, of runs
# that keep snapshots or SWA too, and prediction, of extra members too.
GPU_RULES = ("train", "train_keeping_members", "predict", "predict_member")
EXPERIMENT = "exp_sgd"   # one experiment x 2 seeds: each SLURM job costs tens of seconds
SEEDS = [0, 1]
TIMEOUT_S = 900
START_HINT = (
    "Start the local test cluster with `scripts/slurm-local/start.sh` (as root; it installs "
    "munge and slurm-wlm when missing), or run `make test-slurm`, which starts it, runs these "
    "tests and stops it."
)
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")


def snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    """Start Snakemake on the workflow in `workdir`; `timeout -k` because a Snakemake that
    waits on SLURM jobs does not stop on a plain SIGTERM."""
    cmd = ["timeout", "-k", "10", str(TIMEOUT_S), sys.executable, "-m", "snakemake",
           "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--configfile", str(TINY),
           str(workdir / "source.yaml"), str(workdir / "one-experiment.yaml"), *args]
    return subprocess.Popen(cmd, cwd=workdir, env=snakemake_env(slurm=True), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT_S + 60)
    return out


def check(proc: subprocess.Popen, out: str, what: str) -> str:
    if proc.returncode != 0:
        run_id = re.search(r"SLURM run ID: (\S+)", out)
        if run_id and shutil.which("scancel"):  # leave no jobs of a failed run behind
            subprocess.run(["scancel", "--name", run_id.group(1)], capture_output=True, timeout=30)
        timed_out = " (timed out)" if proc.returncode in (124, 137) else ""
        raise AssertionError(f"{what} failed ({proc.returncode}){timed_out}:\n{out[-6000:]}")
    return out


def default_partition() -> str:
    """The cluster's default partition (`sinfo` marks it with *), else the first one."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    names = out.split()
    marked = [n.rstrip("*") for n in names if n.endswith("*")]
    return (marked or [n.rstrip("*") for n in names] or ["debug"])[0]


def cluster_problem() -> str | None:
    """Why no SLURM cluster is usable here, or None when a controller answers and a node is up."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "No SLURM client tools (sinfo, sbatch) on PATH."
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "The SLURM controller does not answer within 30 s."
    if "is UP" not in ping.stdout or nodes.returncode != 0:
        answer = (ping.stdout + ping.stderr).strip().splitlines()
        return f"No SLURM controller reachable (scontrol ping: {answer[0] if answer else 'no answer'!r})."
    states = {s.rstrip("*~#!%$@^-") for s in nodes.stdout.split()}
    if not {"idle", "mixed", "allocated", "completing"} & states:
        return f"No usable SLURM node (states: {nodes.stdout.split()})."
    return None


def make_test_profile(partition: str, directory: Path) -> Path:
    """profiles/slurm/profile.yaml with the one-node, no-accounting test cluster's changes."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile.update({
        "jobs": 4,
        "local-cores": 2,
        # no slurmdbd: sacct fails and the plugin would wait forever
        "slurm-status-command": "squeue",
        # MinJobAge (600 s in start.sh) must stay >= 3x this, or the plugin returns to sacct
        "slurm-init-seconds-before-status-checks": 10,
        # the test reads the job logs
        "slurm-keep-successful-logs": True,
        "latency-wait": 5,
        "retries": 0,
    })
    # the local run's threads (profiles/default), so that the results are bitwise equal
    threads = yaml.safe_load(LOCAL_PROFILE.read_text())["set-threads"]
    profile["set-threads"] = {rule: threads[rule] for rule in GPU_RULES}
    profile["default-resources"].update({"slurm_partition": repr(partition), "mem_mb": 1000, "runtime": 10})
    for rule in GPU_RULES:
        profile["set-resources"][rule].update({"cpus_per_gpu": threads[rule], "mem_mb": 1000})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "profile.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return directory


def write_one_experiment(workdir: Path, cifar_archive) -> None:
    """source.yaml (the archive) and one-experiment.yaml (EXPERIMENT with SEEDS) in `workdir`."""
    write_source(workdir, *cifar_archive)
    (workdir / "one-experiment.yaml").write_text(yaml.safe_dump(
        {"run_experiments": [EXPERIMENT], "experiments": {EXPERIMENT: {"seeds": SEEDS}},
         "shift": {"baseline": EXPERIMENT}}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_archive):
    """The same config run locally and through SLURM, at the same time; without a cluster,
    the reason (each test then fails with it)."""
    problem = cluster_problem()
    if problem:
        return f"{problem} {START_HINT}"
    local, slurm = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("slurm")
    for workdir in (local, slurm):
        write_one_experiment(workdir, cifar_archive)
    profile = make_test_profile(default_partition(), tmp_path_factory.mktemp("profile") / "slurm-test")
    start = time.monotonic()
    slurm_proc = snakemake(slurm, "--workflow-profile", str(profile))
    local_proc = snakemake(local, "--cores", "2")
    local_out, slurm_out = finish(local_proc), finish(slurm_proc)
    print(f"SLURM run: {time.monotonic() - start:.0f} s")
    check(slurm_proc, slurm_out, "SLURM run")
    check(local_proc, local_out, "local run")
    return local, slurm, slurm_out


def finished(runs):
    if isinstance(runs, str):
        pytest.fail(runs, pytrace=False)
    return runs


@pytest.mark.slurm
@pytest.mark.slow
def test_training_and_prediction_ran_as_slurm_jobs(runs):
    _, slurm, out = finished(runs)
    submitted = SUBMITTED.findall(out)
    assert submitted, f"no SLURM submissions in Snakemake's output:\n{out[-4000:]}"
    rules = Counter(re.search(r"/rule_(\w+)/", log).group(1) for _, log in submitted)
    assert rules["train"] == len(SEEDS), rules
    assert rules["predict"] == 2 * len(SEEDS), rules
    assert "download" not in rules, "download is a localrule and must not be submitted"
    for jobid, log in submitted:
        assert Path(log).is_file(), f"no SLURM log {log} for job {jobid}"
        assert Path(log).resolve().is_relative_to(slurm / ".snakemake" / "slurm_logs")
    # the job's log shows the rule running inside the allocation (srun, then Snakemake)
    train_logs = [Path(log).read_text() for _, log in submitted if "/rule_train/" in log]
    assert all("rule train:" in text and "Finished job" in text for text in train_logs), train_logs[0][-2000:]


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_results_equal_local_results_bitwise(runs):
    local, slurm, _ = finished(runs)
    files = [f"results/{EXPERIMENT}/ensemble.json"]
    for seed in SEEDS:
        files += [f"results/{EXPERIMENT}/seed{seed}/{name}_{split}.{ext}"
                  for name, ext in (("probs", "npy"), ("metrics", "json")) for split in ("val", "test")]
    for name in files:
        assert (slurm / name).is_file(), f"the SLURM run did not write {name}"
        assert (slurm / name).read_bytes() == (local / name).read_bytes(), f"{name}: SLURM != local run"
    assert json.loads((slurm / files[0]).read_text()) == json.loads((local / files[0]).read_text())
    assert (slurm / "results/report/summary.md").is_file()


def test_slurm_profile_resources(tmp_path, cifar_archive):
    """No cluster needed: the profile parses and gives the GPU rules what it documents."""
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert "cpus_per_task" not in profile["default-resources"], "it would override every rule's threads"
    for rule in GPU_RULES:
        assert profile["set-resources"][rule]["cpus_per_gpu"] == profile["set-threads"][rule]
    write_one_experiment(tmp_path, cifar_archive)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
         "--configfile", str(TINY), str(tmp_path / "source.yaml"), str(tmp_path / "one-experiment.yaml"),
         "--workflow-profile", str(PROFILE.parent), "-n"],
        cwd=tmp_path, env=snakemake_env(), capture_output=True, text=True, timeout=300)  # no cluster
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    jobs = re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout)
    train = next(j for j in jobs if j.startswith("rule train:"))
    predict = next(j for j in jobs if j.startswith("rule predict:"))
    for rule, text in (("train", train), ("predict", predict)):
        wanted = profile["set-resources"][rule]
        runtime = eval(str(wanted["runtime"]), {"attempt": 1})  # e.g. "720 * attempt"
        resources = re.search(r"resources: (.*)", text).group(1)
        cpus = wanted["cpus_per_gpu"]
        assert "gpu=1" in resources and f"cpus_per_gpu={cpus}" in resources, resources
        assert f"runtime={runtime}" in resources, resources
        assert "slurm_partition=" in resources, resources
