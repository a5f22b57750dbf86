# Helpers shared by the stage files: config validation, experiment resolution, paths.
import copy
import json
import os
import sys

# albumentations asks PyPI for updates on import unless told not to (offline clusters).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

try:
    from cifar_ensembles.configcheck import validate_config
except ImportError:  # snakemake from an environment without the package: use the checkout's
    sys.path.insert(0, os.path.join(workflow.basedir, "src"))
    from cifar_ensembles.configcheck import validate_config
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


def deep_merge(base, override):
    """A copy of `base` with `override` merged in, key by key (lists are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def seeds(experiment):
    return config["experiments"][experiment]["seeds"]


def training_spec(experiment):
    """The experiment's full training config: defaults plus its overrides, without seeds."""
    overrides = {k: v for k, v in config["experiments"][experiment].items() if k != "seeds"}
    return deep_merge(config["training"], overrides)


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
    for experiment in EXPERIMENTS:
        for figure in ("training_curves", "ensemble_curve"):
            outputs += [f"results/report/{experiment}/{figure}.{ext}" for ext in ("png", "svg")]
    return outputs


def optional_arg(flag, value):
    """`--flag value` (quoted) when value is set, else nothing."""
    if value in (None, ""):
        return ""
    return f"{flag} {json.dumps(str(value))}"


def summary_inputs(wildcards):
    files = {}
    for experiment in EXPERIMENTS:
        files[experiment] = {
            "metrics": {
                str(s): {
                    split: f"{run_dir(experiment, s)}/metrics_{split}.json"
                    for split in ("val", "test")
                }
                for s in seeds(experiment)
            },
            "ensemble": f"results/{experiment}/ensemble.json",
        }
    return files
