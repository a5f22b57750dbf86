"""The config model: the merged config resolved once into frozen, typed specs.

`config.yaml` is the one place where defaults live; files given with `--configfile` are
merged over it key by key, and `resolve` turns the result into a `WorkflowSpec`. Library
code takes these specs and never invents a default.

Two kinds of settings are kept apart, because the workflow reruns a job exactly when what
it computes could change:
- `TrainingSpec` (config `training:` and the experiment's own keys): what a model learns.
  Training jobs carry it in their params, and the checkpoint fingerprint hashes it.
- `RuntimeSpec` (config `runtime:` and `experiments.<name>.runtime:`): how fast it is
  computed, never what (beyond floating-point rounding). It reaches jobs as a Snakemake
  resource, which is not a rerun trigger, so changing it reruns nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UserError
from .typed import from_data, to_data

Dataset = Literal["cifar10", "cifar100", "fashion_mnist"]


# ------------------------------------------------------------------ what a model learns
@dataclass(frozen=True)
class ModelSpec:
    name: Literal["resnet18_cifar", "resnet18"]
    pretrained: bool
    input_size: int | None
    width: int


@dataclass(frozen=True)
class OptimizerSpec:
    name: Literal["sgd", "adam", "sam", "asam"]
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    betas: tuple[float, float]
    base: Literal["sgd", "adam"]
    rho: float
    eta: float
    adaptive_params: Literal["weights", "all"]


@dataclass(frozen=True)
class SchedulerSpec:
    name: Literal["cosine", "step", "constant"]
    interval: Literal["step", "epoch"]
    step_size: int
    gamma: float
    min_lr: float
    warmup_epochs: float
    warmup_start: float


@dataclass(frozen=True)
class LossSpec:
    name: Literal["asl", "cross_entropy"]
    gamma_pos: float
    gamma_neg: float
    eps: float
    label_smoothing: float


@dataclass(frozen=True)
class CutoutSpec:
    holes: int
    size: int
    p: float
    fill: float


@dataclass(frozen=True)
class AugmentSpec:
    name: Literal["albumentations", "torchvision", "none"]
    mode: Literal["per_image", "batched"]
    pad: int
    pad_mode: Literal["constant", "reflect"]
    flip: bool
    cutout: CutoutSpec
    normalize: Literal["dataset", "imagenet"]


@dataclass(frozen=True)
class EmaSpec:
    enabled: bool
    decay: float
    warmup_steps: int


@dataclass(frozen=True)
class TrainingSpec:
    precision: Literal["fp32", "bf16"]
    epochs: int
    batch_size: int
    model: ModelSpec
    optimizer: OptimizerSpec
    scheduler: SchedulerSpec
    loss: LossSpec
    augment: AugmentSpec
    ema: EmaSpec


def _keep(section, *names: str) -> dict:
    return {name: to_data(getattr(section, name)) for name in names}


def result_spec(spec: TrainingSpec) -> dict:
    """The values that decide what a model learns: the training spec less the fields its own
    choices leave unused (Adam's betas under SGD, ASL's gammas under cross-entropy, the EMA
    decay with EMA off, ...). Training jobs rerun, and checkpoints resume, by this alone, so
    changing a default that an experiment does not use retrains nothing."""
    opt, sched, loss, aug, ema, model = (spec.optimizer, spec.scheduler, spec.loss, spec.augment,
                                         spec.ema, spec.model)
    base = opt.base if opt.name in ("sam", "asam") else opt.name
    optimizer = _keep(opt, "name", "lr", "weight_decay",
                      *(("momentum", "nesterov") if base == "sgd" else ("betas",)))
    if opt.name in ("sam", "asam"):
        adaptive = ("eta", "adaptive_params") if opt.name == "asam" else ()
        optimizer.update(_keep(opt, "base", "rho", *adaptive))
    warmup = ("warmup_start",) if sched.warmup_epochs else ()
    scheduler = _keep(sched, "name", *{
        "constant": (),
        "step": ("interval", "step_size", "gamma"),
        "cosine": ("interval", "min_lr", "warmup_epochs", *warmup),
    }[sched.name])
    augment = _keep(aug, "name", "mode", "normalize")
    if aug.name != "none":
        augment.update(_keep(aug, "pad", "flip", *(("pad_mode",) if aug.pad else ())))
    if aug.name == "albumentations":
        augment.update(_keep(aug, "cutout"))
    return {
        "precision": spec.precision, "epochs": spec.epochs, "batch_size": spec.batch_size,
        "model": _keep(model, "name", *(("width",) if model.name == "resnet18_cifar"
                                         else ("pretrained", "input_size"))),
        "optimizer": optimizer, "scheduler": scheduler,
        "loss": _keep(loss, "name", *(("gamma_pos", "gamma_neg", "eps") if loss.name == "asl"
                                      else ("label_smoothing",))),
        "augment": augment,
        "ema": _keep(ema, "enabled", *(("decay", "warmup_steps") if ema.enabled else ())),
    }


# ------------------------------------------------------------------ how fast
@dataclass(frozen=True)
class LoaderSpec:
    num_workers: int | None
    pin_memory: bool
    persistent_workers: bool


@dataclass(frozen=True)
class RuntimeSpec:
    device: str
    compile: bool | Literal["reduce-overhead"]
    channels_last: bool
    cudnn_benchmark: bool
    jobs_per_gpu: Literal[1, 2, 4, 8]
    eval_batch_size: int
    predict_batch_size: int
    eval_every_epochs: int
    checkpoint_every_epochs: int
    checkpoint_every_minutes: float | None
    loader: LoaderSpec


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    seeds: tuple[int, ...]
    training: TrainingSpec
    runtime: RuntimeSpec


# ------------------------------------------------------------------ the other stages
@dataclass(frozen=True)
class SubsetSpec:
    train: int | None
    test: int | None


@dataclass(frozen=True)
class DataSpec:
    source: str | None
    url: str | None
    md5: str | None
    val_size: int
    split_seed: int
    subset: SubsetSpec


@dataclass(frozen=True)
class SourceSpec:
    """What the download stage depends on (a slice of DataSpec)."""

    source: str | None
    url: str | None
    md5: str | None


@dataclass(frozen=True)
class SplitSpec:
    """What the prepare stage depends on (a slice of DataSpec)."""

    val_size: int
    split_seed: int
    subset: SubsetSpec


@dataclass(frozen=True)
class WeightsSpec:
    url: str | None
    file: str | None


@dataclass(frozen=True)
class PredictSpec:
    """How the predict stage runs (from the experiment's runtime): never what it predicts."""

    device: str
    batch_size: int


@dataclass(frozen=True)
class EnsembleSpec:
    method: Literal["soft", "hard"]
    max_subsets: int
    subset_seed: int
    bootstrap: int
    bootstrap_seed: int
    ece_bins: int


CorruptionTransform = Literal["GaussNoise", "ShotNoise", "SaltAndPepper", "Defocus", "MotionBlur",
                              "GlassBlur", "ZoomBlur", "GaussianBlur", "RandomFog",
                              "PlasmaBrightnessContrast", "RandomSnow", "Spatter", "RandomBrightnessContrast",
                              "ColorJitter", "ImageCompression", "Downscale", "ElasticTransform"]


@dataclass(frozen=True)
class CorruptionSpec:
    transform: CorruptionTransform
    reference: str  # where the parameters come from
    severities: list[dict[str, Any]]  # albumentations keyword arguments of severity 1..5


@dataclass(frozen=True)
class ShiftSpec:
    run_corruptions: tuple[str, ...] | None
    source: str | None
    md5: str | None
    images: int | None
    seed: int
    baseline: str | None
    corruptions: dict[str, CorruptionSpec]


@dataclass(frozen=True)
class ShiftSetSpec:
    """What one corrupted set depends on (a slice of ShiftSpec): the shift stage's argument."""

    source: str | None
    md5: str | None
    images: int | None
    seed: int
    corruption: CorruptionSpec


@dataclass(frozen=True)
class PublishedSpec:
    note: str
    test_accuracy: float
    k: int


@dataclass(frozen=True)
class ReportSpec:
    dpi: int
    published: dict[str, PublishedSpec] | None


@dataclass(frozen=True)
class WorkflowSpec:
    dataset: Dataset
    data: DataSpec
    pretrained_weights: WeightsSpec
    run_experiments: tuple[str, ...] | None
    experiments: dict[str, ExperimentSpec]
    shift: ShiftSpec
    ensemble: EnsembleSpec
    report: ReportSpec

    @property
    def selected(self) -> list[str]:
        """The experiments this run builds: `run_experiments`, else all of them."""
        return list(self.run_experiments or self.experiments)

    @property
    def source(self) -> SourceSpec:
        return SourceSpec(self.data.source, self.data.url, self.data.md5)

    @property
    def split(self) -> SplitSpec:
        return SplitSpec(self.data.val_size, self.data.split_seed, self.data.subset)

    @property
    def selected_corruptions(self) -> list[str]:
        """The corruptions this run uses: `shift.run_corruptions`, else all of them."""
        run = self.shift.run_corruptions
        return list(self.shift.corruptions) if run is None else list(run)

    def shift_set(self, corruption: str) -> ShiftSetSpec:
        s = self.shift
        return ShiftSetSpec(s.source, s.md5, s.images, s.seed, s.corruptions[corruption])


# ------------------------------------------------------------------ resolution
EXPERIMENT_OWN_KEYS = ("seeds", "runtime")  # the rest of an experiment overrides `training`


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in, key by key (lists are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def experiment_sections(config: dict, name: str) -> tuple[dict, dict]:
    """(training, runtime) of one experiment: the defaults with its own overrides merged in."""
    own = config["experiments"][name] or {}
    training = deep_merge(config.get("training") or {},
                          {k: v for k, v in own.items() if k not in EXPERIMENT_OWN_KEYS})
    runtime = deep_merge(config.get("runtime") or {}, own.get("runtime") or {})
    return training, runtime


def origin(config: dict, experiment: str, section: str, *keys: str) -> str:
    """Dotted path of the value an experiment uses: its own override, or the section's default."""
    node = config["experiments"][experiment] or {}
    own = ("runtime", *keys) if section == "runtime" else keys
    for key in own:
        if not isinstance(node, dict) or key not in node:
            return ".".join((section, *keys))
        node = node[key]
    return ".".join(("experiments", experiment, *own))


def _section(tp, config: dict, experiment: str, section: str, merged: dict):
    """`merged` as `tp`; an error names the key the experiment takes the bad value from."""
    try:
        return from_data(tp, merged, "")
    except UserError as err:
        where, _, what = str(err).partition(": ")
        keys = [k for k in re.split(r"[.\[\]]+", where) if k]
        raise UserError(f"{origin(config, experiment, section, *keys)}: {what} "
                        f"(experiment {experiment!r})") from None


def resolve_experiment(config: dict, name: str) -> ExperimentSpec:
    training, runtime = experiment_sections(config, name)
    own = config["experiments"][name] or {}
    return ExperimentSpec(
        name=name,
        seeds=from_data(tuple[int, ...], own.get("seeds"), f"experiments.{name}.seeds"),
        training=_section(TrainingSpec, config, name, "training", training),
        runtime=_section(RuntimeSpec, config, name, "runtime", runtime),
    )


def resolve(config: dict) -> WorkflowSpec:
    """The whole workflow's spec from a merged config (config.yaml plus --configfile files)."""
    rest = {k: v for k, v in config.items() if k not in ("training", "runtime", "experiments")}
    spec = from_data(WorkflowSpec, {**rest, "experiments": {}})
    experiments = {name: resolve_experiment(config, name) for name in config["experiments"]}
    return dataclasses.replace(spec, experiments=experiments)


# ------------------------------------------------------------------ config files
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def load_config(*paths: str | os.PathLike, defaults: str | os.PathLike | None = None) -> dict:
    """config.yaml merged with `paths` in order, as Snakemake merges --configfile files."""
    import yaml

    merged: dict = {}
    for path in (defaults or DEFAULT_CONFIG, *paths):
        with open(path) as f:
            merged = deep_merge(merged, yaml.safe_load(f) or {})
    return merged
