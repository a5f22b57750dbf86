"""Check the workflow's config before any job runs and describe the first problem in one line.

`validate_config` resolves the merged config into its typed spec (`spec.resolve`): the
specs' own annotations say every field's type and bounds, and their first violation is named
as a dotted path (`experiments.single_asam.optimizer.lr: expected a number greater than 0,
got -1`); an unknown key is named itself, with the allowed keys and the closest one when it
looks misspelt, or where it moved to. Every number must be finite, also where the specs
accept any value (a corruption's parameters). Then what a field's annotation cannot express
is checked on the spec: experiments named in `run_experiments` exist, the cosine floor is
below the learning rate of every experiment, ImageNet weights are asked for only with the
architecture they exist for, and the validation split fits the standard archives. Light on
purpose: Snakemake imports it at parse time (no torch).
"""

from __future__ import annotations

import math
import re

from ..errors import UserError
from .convert import UnknownKey, did_you_mean
from .spec import WorkflowSpec, origin, resolve

# Images in the standard archives (torchvision's MD5 enforces them when data.md5 is null).
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000}
TEST_IMAGES = {"cifar10": 10_000, "cifar100": 10_000, "fashion_mnist": 10_000}
PRETRAINED_MODELS = ("resnet18",)  # architectures with ImageNet weights
# Keys of earlier releases and where they live now (speed settings moved to `runtime`), by
# where they were: `training` or an experiment, the top level, `augment`.
MOVED = {
    "device": "runtime.device", "compile": "runtime.compile", "channels_last": "runtime.channels_last",
    "cudnn_benchmark": "runtime.cudnn_benchmark", "jobs_per_gpu": "runtime.jobs_per_gpu",
    "eval_batch_size": "runtime.eval_batch_size", "loader": "runtime.loader",
}
MOVED_FROM_TOP = {"predict": "runtime.predict_batch_size and runtime.device"}
SPEED_MOVED = "(speed settings rerun nothing there)"


def moved(path: str, key: str) -> str | None:
    """Where an old key at `path` lives now, or None when it was never a key there."""
    if path == "" and key in MOVED_FROM_TOP:
        return f"moved to {MOVED_FROM_TOP[key]} {SPEED_MOVED}"
    if path == "training" and key in MOVED:
        return f"moved to {MOVED[key]} {SPEED_MOVED}"
    if re.fullmatch(r"experiments\.[^.\[]+", path) and key in MOVED:  # the experiment's own runtime
        return f"moved to {path}.{MOVED[key]} {SPEED_MOVED}"
    if re.fullmatch(r"(training|experiments\.[^.\[]+)\.augment", path) and key == "device":
        return (f"replaced by {path}.mode (cpu: per_image, gpu: batched; "
                "a result setting: switching it retrains)")
    return None


def validate_config(config: dict) -> WorkflowSpec:
    """The config's resolved spec; UserError (one line, naming the field) when it is invalid."""
    if not isinstance(config, dict):
        raise UserError(f"config: expected a mapping of sections, got {type(config).__name__}")
    check_finite(config)
    try:
        spec = resolve(config)
    except UnknownKey as err:
        where = moved(err.path, err.key)
        if where:
            raise UserError(f"{_join(err.path, err.key)}: {where}") from None
        raise
    check_semantics(config, spec)
    return spec


def check_finite(value, path: str = "config") -> None:
    """Every number in `value` is finite; the first one that is not is named."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{path}: {value} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, _join(path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_finite(item, f"{path}[{i}]")


def _join(path: str, key: str) -> str:
    return key if path in ("config", "") else f"{path}.{key}"


# --------------------------------------------------------------- semantic checks
def check_semantics(config: dict, spec: WorkflowSpec) -> None:
    """What the schema cannot express, on the resolved spec; names the key a value comes from."""
    for name in spec.run_experiments or ():
        if name not in spec.experiments:
            raise UserError(f"run_experiments: {name!r} is not an experiment in the config"
                            f"{did_you_mean(name, spec.experiments)} "
                            f"(experiments: {', '.join(spec.experiments)})")
    for name, experiment in spec.experiments.items():
        training = experiment.training
        if (training.scheduler.name in ("cosine", "cosine_restarts")
                and training.scheduler.min_lr >= training.optimizer.lr):
            raise UserError(
                f"{origin(config, name, 'training', 'scheduler', 'min_lr')}: {training.scheduler.min_lr} "
                f"must be below the learning rate of experiment {name!r} "
                f"({origin(config, name, 'training', 'optimizer', 'lr')} = {training.optimizer.lr}) "
                "for the cosine schedule")
        _check_members(config, name, training)
        model = training.model
        if model.pretrained and model.name not in PRETRAINED_MODELS:
            raise UserError(
                f"{origin(config, name, 'training', 'model', 'pretrained')}: ImageNet weights exist only for "
                f"{', '.join(PRETRAINED_MODELS)}, but experiment {name!r} uses "
                f"{origin(config, name, 'training', 'model', 'name')} = {model.name}; set pretrained: false")
    for name in spec.shift.run_corruptions or ():
        if name not in spec.shift.corruptions:
            raise UserError(f"shift.run_corruptions: {name!r} is not a corruption in the config"
                            f"{did_you_mean(name, spec.shift.corruptions)}")
    baseline = spec.shift.baseline
    if spec.selected_corruptions and baseline is not None and baseline not in spec.selected:
        raise UserError(f"shift.baseline: {baseline!r} is not among the experiments this run builds "
                        f"({', '.join(spec.selected)}); name one of them, or null for no corruption error")
    for name in spec.tta.experiments or ():
        if name not in spec.experiments:
            raise UserError(f"tta.experiments: {name!r} is not an experiment in the config"
                            f"{did_you_mean(name, spec.experiments)} "
                            f"(experiments: {', '.join(spec.experiments)})")
    _check_ood(spec)
    _check_split(spec)


def _check_members(config: dict, name: str, training) -> None:
    """Restarts divide the epochs; snapshots and SWA fall within them."""
    def where(*keys):
        return origin(config, name, "training", *keys)

    epochs, scheduler = training.epochs, training.scheduler
    if scheduler.name == "cosine_restarts" and epochs % scheduler.cycles:
        raise UserError(f"{where('scheduler', 'cycles')}: {scheduler.cycles} cycles do not divide the "
                        f"{epochs} epochs of experiment {name!r} ({where('epochs')}) into equal cycles")
    keep = training.snapshots.keep
    if keep == "cycle_ends" and (scheduler.name != "cosine_restarts" or scheduler.cycles < 2):
        raise UserError(f"{where('snapshots', 'keep')}: cycle_ends needs {where('scheduler', 'name')}: "
                        f"cosine_restarts with 2 or more cycles (experiment {name!r} has "
                        f"{scheduler.name}" + (f" with {scheduler.cycles} cycle)" if scheduler.name ==
                                                "cosine_restarts" else ")"))
    if keep == "last_epochs" and training.snapshots.last_epochs > epochs:
        raise UserError(f"{where('snapshots', 'last_epochs')}: {training.snapshots.last_epochs} is more "
                        f"than the {epochs} epochs of experiment {name!r}")
    if training.swa.enabled and training.swa.start_epoch > epochs:
        raise UserError(f"{where('swa', 'start_epoch')}: {training.swa.start_epoch} is after the last "
                        f"epoch of experiment {name!r} ({epochs})")


FILE_KINDS = ("svhn", "cifar100")  # OOD sets read from a file (downloaded or local)


def _check_ood(spec: WorkflowSpec) -> None:
    """Run sets exist; a set's keys fit its kind (files have a source or URL, noise a sigma)."""
    for name in spec.ood.run_sets or ():
        if name not in spec.ood.sets:
            raise UserError(f"ood.run_sets: {name!r} is not a set in ood.sets"
                            f"{did_you_mean(name, spec.ood.sets)} (sets: {', '.join(spec.ood.sets)})")
    for name in spec.selected_ood_sets:
        if spec.ood.sets[name].kind == spec.dataset:
            raise UserError(f"ood.run_sets: {name!r} is a {spec.dataset} set, the in-distribution dataset "
                            f"itself: its images are not out of distribution; leave it out of ood.run_sets")
    for name, s in spec.ood.sets.items():
        where = f"ood.sets.{name}"
        if s.kind not in FILE_KINDS:
            for key in ("source", "url", "md5"):
                if getattr(s, key) is not None:
                    raise UserError(f"{where}.{key}: a {s.kind} set is generated, not read from a file; "
                                    "set it to null")
        if (s.kind == "smooth_noise") != (s.sigma is not None):
            problem = ("required for smooth_noise (the blur in pixels)" if s.kind == "smooth_noise"
                       else f"applies to smooth_noise only, not {s.kind}; set it to null")
            raise UserError(f"{where}.sigma: {problem}")
        if s.kind == "svhn" and spec.ood.images is not None and spec.ood.images > 26_032:
            raise UserError(f"ood.images: {spec.ood.images} is more than SVHN's 26,032 test images")


def _check_split(spec: WorkflowSpec) -> None:
    """The validation split and subsets against the standard archive's size (when md5 enforces it)."""
    data, dataset = spec.data, spec.dataset
    if data.md5:
        return  # another archive: prepare checks the sizes against the real data
    n_train, n_test = TRAIN_IMAGES[dataset], TEST_IMAGES[dataset]
    if data.val_size >= n_train:
        raise UserError(f"data.val_size: {data.val_size} must be smaller than the {dataset} training set "
                        f"({n_train} images)")
    subset = data.subset
    if subset.train is not None and subset.train > n_train - data.val_size:
        raise UserError(f"data.subset.train: {subset.train} is more than the {n_train - data.val_size} "
                        f"{dataset} training images left after the validation split")
    if subset.test is not None and subset.test > n_test:
        raise UserError(f"data.subset.test: {subset.test} is more than the {n_test} {dataset} test images")
