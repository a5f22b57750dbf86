# Helpers shared by the stage files: config validation, experiment resolution, paths.
import json
import os
import sys

# albumentations asks PyPI for updates on import unless told not to (offline clusters).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

try:
    from cifar_ensembles.config.check import validate_config
except ImportError:  # snakemake from an environment without the package: use the checkout's
    sys.path.insert(0, os.path.join(workflow.basedir, "src"))
    from cifar_ensembles.config.check import validate_config
from cifar_ensembles.errors import UserError
from cifar_ensembles.config.spec import PredictSpec, result_spec
from cifar_ensembles.config.convert import to_json

# The config resolved once into typed specs, checked against their annotations (the schema in
# workflow/schemas is generated from the same), then what they cannot express, before any job
# runs. A problem ends the run with one line naming the field (sys.exit's message is all
# Snakemake prints, no traceback).
try:
    SPEC = validate_config(config)
except UserError as err:
    sys.exit(f"config error: {err}")

DATASET = SPEC.dataset
DATA = f"resources/{DATASET}/data.npz"
WEIGHTS = "resources/weights/resnet18_imagenet.pth"
SUMMARY = "results/report/summary.md"
EXPERIMENTS = SPEC.selected

# What reruns what. A rule's params hold exactly the spec its outputs depend on (Snakemake
# reruns a job whose params changed). Runtime settings (how fast, never what) reach jobs as
# string resources instead, which Snakemake does not compare: changing them reruns nothing.


def seeds(experiment):
    return SPEC.experiments[experiment].seeds


def training_params(experiment):
    """What the model learns: the training spec less what its own choices leave unused."""
    return json.dumps(result_spec(SPEC.experiments[experiment].training), sort_keys=True)


def training_spec(experiment):
    """The whole training spec, for the job (its params are `training_params`)."""
    return to_json(SPEC.experiments[experiment].training)


def runtime_settings(experiment):
    """The runtime spec (a resource, not a param): how fast training runs."""
    return to_json(SPEC.experiments[experiment].runtime)


def predict_settings(experiment):
    """How the predict jobs run (a resource, not a param): device and batch size."""
    runtime = SPEC.experiments[experiment].runtime
    return to_json(PredictSpec(device=runtime.device, batch_size=runtime.predict_batch_size))


def gpu_slots(experiment):
    """A GPU has 8 slots; a training job takes 8 / runtime.jobs_per_gpu of them."""
    return 8 // SPEC.experiments[experiment].runtime.jobs_per_gpu


def uses_pretrained(experiment):
    model = SPEC.experiments[experiment].training.model
    return model.name == "resnet18" and model.pretrained


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
    outputs = [SUMMARY, "results/report/summary.csv", "results/frontier.json"]
    for figure in ("accuracy", "cost", "frontier") + (("shift",) if CORRUPTIONS else ()) + (("ood",) if OOD_SETS else ()):
        outputs += [f"results/report/{figure}.{ext}" for ext in ("png", "svg")]
    for experiment in EXPERIMENTS:
        for figure in ("training_curves", "ensemble_curve", "reliability", "diversity", "selective"):
            outputs += [f"results/report/{experiment}/{figure}.{ext}" for ext in ("png", "svg")]
    return outputs


# ----------------------------------------------------------------------------- shift
CORRUPTIONS = SPEC.selected_corruptions


def shift_set_file(corruption):
    return f"resources/{DATASET}/shift/{corruption}.npz"


def shift_sets():
    """{corruption: its corrupted test set}."""
    return {c: shift_set_file(c) for c in CORRUPTIONS}


def shift_probs(experiment):
    """{corruption: the experiment's members' probabilities on it}."""
    return {c: f"results/{experiment}/shift/{c}.npy" for c in CORRUPTIONS}


def models_of(experiment):
    return [f"{run_dir(experiment, s)}/model.pt" for s in seeds(experiment)]


def shift_jsons():
    return {e: f"results/{e}/shift.json" for e in EXPERIMENTS} if CORRUPTIONS else {}


def diversity_jsons():
    return {e: f"results/{e}/diversity.json" for e in EXPERIMENTS}


def baseline_files():
    """What the corruption error reads of shift.baseline (null: no corruption error)."""
    base = SPEC.shift.baseline
    if base is None:
        return None
    return {"name": base, "test": [f"{run_dir(base, s)}/probs_test.npy" for s in seeds(base)],
            "shift": shift_probs(base)}


def shift_summary_inputs(wildcards):
    e = wildcards.experiment
    inputs = {"data": DATA, "summary": f"results/{e}/ensemble.json",
              "test": [f"{run_dir(e, s)}/probs_test.npy" for s in seeds(e)],
              "shift": list(shift_probs(e).values()), "sets": list(shift_sets().values())}
    base = baseline_files()
    if base is not None:
        inputs["baseline"] = [*base["test"], *base["shift"].values()]
    return inputs


# ----------------------------------------------------------------------------- ood
OOD_SETS = SPEC.selected_ood_sets


def ood_set_file(name):
    return f"resources/{DATASET}/ood/{name}.npz"


def ood_sets():
    """{OOD set: its prepared images}."""
    return {s: ood_set_file(s) for s in OOD_SETS}


def ood_kinds():
    return {s: SPEC.ood.sets[s].kind for s in OOD_SETS}


def ood_probs(experiment):
    """{OOD set: the experiment's members' probabilities on it}."""
    return {s: f"results/{experiment}/ood/{s}.npy" for s in OOD_SETS}


def ood_jsons():
    return {e: f"results/{e}/ood.json" for e in EXPERIMENTS} if OOD_SETS else {}


def selective_jsons():
    return {e: f"results/{e}/selective.json" for e in EXPERIMENTS}


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


def published(experiment=None):
    """report.published as JSON (of one experiment, or null): the report's numbers, shown beside ours."""
    if experiment is None:
        return to_json(SPEC.report.published)
    return to_json((SPEC.report.published or {}).get(experiment))


# ----------------------------------------------------------------------------- methods
# Extra members of a run besides its final model: its TTA predictions (tta.enabled and the
# experiment in tta.experiments), its kept snapshots (`epochN`) and its SWA average (`swa`),
# in that order, seed by seed. Each is predicted on val and test as its own job and file; on
# the corrupted and OOD sets one job per experiment and set (predict_shift_members,
# predict_ood_members) writes them all to <set>.members.npy, rows in this order.
NEVER = "(?!x)x"  # a wildcard constraint nothing matches


def kept_names(experiment):
    training = SPEC.experiments[experiment].training
    return [f"epoch{e}" for e in training.snapshot_epochs] + (["swa"] if training.swa.enabled else [])


def experiments_pattern(keep):
    """The experiments whose runs write members.pt (keep=True), or those that do not."""
    chosen = [e for e in EXPERIMENTS if SPEC.experiments[e].training.keeps_members == keep]
    return "|".join(chosen) or NEVER


def member_names(experiment):
    return (["tta"] if SPEC.tta.applies_to(experiment) else []) + kept_names(experiment)


def extra_members(experiment):
    """[(seed index, member name)] of every extra member, in row order."""
    return [(i, name) for i, _ in enumerate(seeds(experiment)) for name in member_names(experiment)]


def member_weights(experiment, seed, name):
    """The file an extra member's weights are in: the final model's (TTA) or members.pt."""
    return f"{run_dir(experiment, seed)}/{'model' if name == 'tta' else 'members'}.pt"


def extra_specs(experiment):
    """Every extra member as a MemberSpec (JSON-ready), in row order."""
    return [{"weights": member_weights(experiment, seeds(experiment)[i], name),
             "member": None if name == "tta" else name, "tta": name == "tta"}
            for i, name in extra_members(experiment)]


def extra_weights(experiment):
    """The files the extra members' weights are in, each once."""
    return sorted({m["weights"] for m in extra_specs(experiment)})


def extra_probs(experiment, split):
    """Each extra member's probabilities on a split (probs_val, probs_test), in row order."""
    return [f"{run_dir(experiment, seeds(experiment)[i])}/{name}/{split}.npy"
            for i, name in extra_members(experiment)]


def tta_params(names):
    """What TTA predictions depend on (the views), when `names` include TTA; else nothing."""
    return json.dumps(SPEC.tta.result, sort_keys=True) if "tta" in names else ""


def tta_spec():
    """The whole tta spec, for the jobs (a resource: their params hold only what they depend on)."""
    return to_json(SPEC.tta)


def methods_jsons():
    return {e: f"results/{e}/methods.json" for e in EXPERIMENTS}


def run_costs():
    """{experiment: what its runs' device-independent training cost depends on}."""
    return to_json({e: SPEC.experiments[e].training.cost for e in EXPERIMENTS})


def methods_inputs(wildcards):
    e = wildcards.experiment
    return {
        "data": DATA,
        "val": [f"{run_dir(e, s)}/probs_val.npy" for s in seeds(e)],
        "test": [f"{run_dir(e, s)}/probs_test.npy" for s in seeds(e)],
        "extra_val": extra_probs(e, "probs_val"),
        "extra_test": extra_probs(e, "probs_test"),
        "shift": [f for c in CORRUPTIONS for f in shift_files(e, c)],
        "sets": list(shift_sets().values()),
        "ood": [f for s in OOD_SETS for f in ood_files(e, s)],
    }


def shift_files(experiment, corruption):
    """The final models' probabilities on a corrupted set, then the extra members' (if any)."""
    members = [f"results/{experiment}/shift/{corruption}.members.npy"] if extra_members(experiment) else []
    return [f"results/{experiment}/shift/{corruption}.npy", *members]


def ood_files(experiment, name):
    members = [f"results/{experiment}/ood/{name}.members.npy"] if extra_members(experiment) else []
    return [f"results/{experiment}/ood/{name}.npy", *members]
