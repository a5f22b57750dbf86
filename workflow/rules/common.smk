# Helpers shared by the stage files: config validation, experiment resolution, paths.
import json
import os
import shlex
import sys

# albumentations asks PyPI for updates on import unless told not to (offline clusters).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

try:
    from cifar_ensembles.configcheck import resolved_experiment, validate_config
except ImportError:  # snakemake from an environment without the package: use the checkout's
    sys.path.insert(0, os.path.join(workflow.basedir, "src"))
    from cifar_ensembles.configcheck import resolved_experiment, validate_config
from cifar_ensembles.errors import UserError

# The schema, then what it cannot express, before any job runs. A problem ends the run with
# one line naming the field (sys.exit's message is all Snakemake prints, no traceback).
try:
    validate_config(config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))
except UserError as err:
    sys.exit(f"config error: {err}")

DATASET = config["dataset"]
DATA = f"resources/{DATASET}/data.npz"
WEIGHTS = "resources/weights/resnet18_imagenet.pth"
SUMMARY = "results/report/summary.md"
EXPERIMENTS = config.get("run_experiments") or list(config["experiments"])


def seeds(experiment):
    return config["experiments"][experiment]["seeds"]


def training_spec(experiment):
    """The experiment's full training config: defaults plus its overrides, without seeds."""
    return resolved_experiment(config, experiment)


# Scheduling-only keys: they reach the job through resources (gpu_slots), not params, so
# changing them never reruns training.
NOT_RESULTS = ("jobs_per_gpu",)


def training_params(experiment):
    spec = training_spec(experiment)
    return json.dumps({k: v for k, v in spec.items() if k not in NOT_RESULTS}, sort_keys=True)


def uses_pretrained(experiment):
    model = training_spec(experiment)["model"]
    return model.get("name") == "resnet18" and bool(model.get("pretrained"))


def run_dir(experiment, seed):
    return f"results/{experiment}/seed{seed}"


def member_files(name, split=None):
    """Input function: one file per seed of the experiment, in seed order."""

    def files(wildcards):
        return [
            f"{run_dir(wildcards.experiment, s)}/{name.format(split=split)}"
            for s in seeds(wildcards.experiment)
        ]

    return files


def all_outputs():
    outputs = [SUMMARY, "results/report/summary.csv"]
    for figure in ("accuracy", "cost"):
        outputs += [f"results/report/{figure}.{ext}" for ext in ("png", "svg")]
    for experiment in EXPERIMENTS:
        for figure in ("training_curves", "ensemble_curve", "reliability"):
            outputs += [f"results/report/{experiment}/{figure}.{ext}" for ext in ("png", "svg")]
    return outputs


def ensemble_jsons():
    return {e: f"results/{e}/ensemble.json" for e in EXPERIMENTS}


def run_files():
    """{experiment: {seed: {benchmark, history}}}: what the cost figure and summary read."""
    return {
        e: {
            str(s): {
                "benchmark": f"{run_dir(e, s)}/benchmark.tsv",
                "history": f"{run_dir(e, s)}/history.csv",
            }
            for s in seeds(e)
        }
        for e in EXPERIMENTS
    }


def test_probs():
    """{experiment: {seed: probs_test.npy}}: what the paired comparisons read."""
    return {e: {str(s): f"{run_dir(e, s)}/probs_test.npy" for s in seeds(e)} for e in EXPERIMENTS}


def flat(mapping):
    """All leaf values of nested dicts, as a list of paths."""
    if isinstance(mapping, dict):
        return [path for value in mapping.values() for path in flat(value)]
    return [mapping]


def optional_arg(flag, value):
    """`--flag value` (quoted) when value is set, else nothing."""
    if value in (None, ""):
        return ""
    return f"{flag} {shlex.quote(str(value))}"
