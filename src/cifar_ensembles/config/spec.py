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
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ..errors import UserError
from .convert import UnknownKey, from_data, spec, to_data

Dataset = Literal["cifar10", "cifar100", "fashion_mnist"]


# ------------------------------------------------------------------ types and bounds
def _unique(values):
    if values is not None and len(set(values)) != len(values):
        raise PydanticCustomError("unique", "values must not repeat")
    return values


def choice(*options):
    """A Literal whose values must match in type too: `true` is not 1, 2.0 is not 2."""
    def exact(value):
        if not any(type(value) is type(o) and value == o for o in options):
            raise PydanticCustomError("literal_error", "expected {expected}",
                                      {"expected": " | ".join(json.dumps(o) for o in options)})
        return value
    return Annotated[Literal[options], BeforeValidator(exact)]


PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # momentum, betas, decays, smoothing
Md5 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Unique = Field(json_schema_extra={"uniqueItems": True})
Seeds = Annotated[tuple[Seed, ...], Field(min_length=1), AfterValidator(_unique), Unique]
ExperimentName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")]
CorruptionName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


@dataclass(frozen=True)
class UnusedWhen:
    """Field metadata: the field cannot change what a model learns when `rule(section)` holds
    (`section`: the spec the field belongs to). A training field without it always decides
    the result: training reruns, and a checkpoint is dropped, when its value changes. A rule
    reads only its section's fields and properties (annotations are evaluated in the class's
    namespace, so module-level helpers are out of its reach)."""

    rule: Callable[[Any], bool]


# ------------------------------------------------------------------ what a model learns
@spec
class ModelSpec:
    name: Literal["resnet18_cifar", "resnet18"]
    pretrained: Annotated[bool, UnusedWhen(lambda m: m.name == "resnet18_cifar")]
    input_size: Annotated[int | None, Field(ge=8), UnusedWhen(lambda m: m.name == "resnet18_cifar")]
    width: Annotated[PositiveInt, UnusedWhen(lambda m: m.name != "resnet18_cifar")]


@spec
class OptimizerSpec:
    name: Literal["sgd", "adam", "sam", "asam"]
    lr: Annotated[float, Field(gt=0)]
    weight_decay: NonNegative
    momentum: Annotated[Fraction, UnusedWhen(lambda o: o.base_name != "sgd")]
    nesterov: Annotated[bool, UnusedWhen(lambda o: o.base_name != "sgd")]
    betas: Annotated[tuple[Fraction, Fraction], UnusedWhen(lambda o: o.base_name != "adam")]
    base: Annotated[Literal["sgd", "adam"], UnusedWhen(lambda o: o.name not in ("sam", "asam"))]
    rho: Annotated[NonNegative, UnusedWhen(lambda o: o.name not in ("sam", "asam"))]
    eta: Annotated[NonNegative, UnusedWhen(lambda o: o.name != "asam")]
    adaptive_params: Annotated[Literal["weights", "all"], UnusedWhen(lambda o: o.name != "asam")]

    @property
    def base_name(self) -> str:
        """The optimizer that takes the steps: `base` under SAM/ASAM, else `name` itself."""
        return self.base if self.name in ("sam", "asam") else self.name


@spec
class SchedulerSpec:
    name: Literal["cosine", "cosine_restarts", "step", "constant"]
    interval: Annotated[Literal["step", "epoch"], UnusedWhen(lambda s: s.name == "constant")]
    step_size: Annotated[PositiveInt, UnusedWhen(lambda s: s.name != "step")]
    gamma: Annotated[float, Field(gt=0, le=1), UnusedWhen(lambda s: s.name != "step")]
    min_lr: Annotated[NonNegative, UnusedWhen(lambda s: s.name not in ("cosine", "cosine_restarts"))]
    cycles: Annotated[PositiveInt, UnusedWhen(lambda s: s.name != "cosine_restarts")]
    warmup_epochs: Annotated[NonNegative, UnusedWhen(lambda s: s.name != "cosine")]
    warmup_start: Annotated[float, Field(gt=0, le=1),
                            UnusedWhen(lambda s: s.name != "cosine" or not s.warmup_epochs)]


@spec
class LossSpec:
    name: Literal["asl", "cross_entropy"]
    gamma_pos: Annotated[NonNegative, UnusedWhen(lambda loss: loss.name != "asl")]
    gamma_neg: Annotated[NonNegative, UnusedWhen(lambda loss: loss.name != "asl")]
    eps: Annotated[Fraction, UnusedWhen(lambda loss: loss.name != "asl")]
    label_smoothing: Annotated[Fraction, UnusedWhen(lambda loss: loss.name != "cross_entropy")]


@spec
class CutoutSpec:
    holes: Count
    size: Count
    p: Probability
    fill: Annotated[float, Field(ge=0, le=255)]


@spec
class AugmentSpec:
    name: Literal["albumentations", "torchvision", "none"]
    mode: Literal["per_image", "batched"]
    pad: Annotated[Count, UnusedWhen(lambda a: a.name == "none")]
    pad_mode: Annotated[Literal["constant", "reflect"], UnusedWhen(lambda a: a.name == "none" or not a.pad)]
    flip: Annotated[bool, UnusedWhen(lambda a: a.name == "none")]
    cutout: Annotated[CutoutSpec, UnusedWhen(lambda a: a.name != "albumentations")]
    normalize: Literal["dataset", "imagenet"]


@spec
class EmaSpec:
    enabled: bool
    decay: Annotated[Fraction, UnusedWhen(lambda e: not e.enabled)]
    warmup_steps: Annotated[Count, UnusedWhen(lambda e: not e.enabled)]


@spec
class SnapshotSpec:
    keep: Literal["none", "cycle_ends", "last_epochs"]
    last_epochs: Annotated[int, Field(ge=2), UnusedWhen(lambda s: s.keep != "last_epochs")]


@spec
class SwaSpec:
    enabled: bool
    start_epoch: PositiveInt
    lr: Annotated[float | None, Field(gt=0)]
    anneal_epochs: Annotated[PositiveInt, UnusedWhen(lambda s: s.lr is None)]


@spec
class TrainingSpec:
    precision: Literal["fp32", "bf16"]
    epochs: PositiveInt
    batch_size: PositiveInt
    model: ModelSpec
    optimizer: OptimizerSpec
    scheduler: SchedulerSpec
    loss: LossSpec
    augment: AugmentSpec
    ema: EmaSpec
    # Off, they leave the result spec whole, so runs trained before they existed stay valid.
    snapshots: Annotated[SnapshotSpec, UnusedWhen(lambda t: t.snapshots.keep == "none")]
    swa: Annotated[SwaSpec, UnusedWhen(lambda t: not t.swa.enabled)]

    @property
    def snapshot_epochs(self) -> tuple[int, ...]:
        """The epochs (1-based) whose weights a run keeps besides its final model: the ends of
        the cosine cycles but the last, or the last epochs but the last (the final model ends
        both)."""
        if self.snapshots.keep == "cycle_ends":
            length = self.epochs // self.scheduler.cycles
            return tuple(range(length, self.epochs, length)) if length else ()
        if self.snapshots.keep == "last_epochs":
            return tuple(range(max(self.epochs - self.snapshots.last_epochs + 1, 1), self.epochs))
        return ()

    @property
    def keeps_members(self) -> bool:
        """Whether a run writes members.pt: it keeps snapshots or an SWA average."""
        return bool(self.snapshot_epochs) or self.swa.enabled

    @property
    def cost(self) -> RunCostSpec:
        return RunCostSpec(self.epochs, self.batch_size, 2 if self.optimizer.name in ("sam", "asam") else 1)


@spec
class RunCostSpec:
    """What a run's device-independent training cost depends on (a slice of TrainingSpec)."""

    epochs: PositiveInt
    batch_size: PositiveInt
    passes_per_step: choice(1, 2)  # SAM/ASAM's ascent step is a second forward-backward pass

    def train_passes(self, train_images: int) -> int:
        """Forward-backward passes over images of one run: epochs x full batches x batch size (an
        epoch drops its last partial batch) x passes per step."""
        return self.epochs * (train_images // self.batch_size) * self.batch_size * self.passes_per_step


def unused_rule(section_type, field: str) -> Callable[[Any], bool] | None:
    """The field's UnusedWhen rule, or None when the field always decides the result."""
    hint = get_type_hints(section_type, include_extras=True)[field]
    rules = [m.rule for m in getattr(hint, "__metadata__", ()) if isinstance(m, UnusedWhen)]
    return rules[0] if rules else None


def result_spec(section) -> dict:
    """The values that decide what a model learns: every field of the training spec, less
    those whose `UnusedWhen` rule holds (Adam's betas under SGD, ASL's gammas under
    cross-entropy, the EMA decay with EMA off, ...). Training jobs rerun, and checkpoints
    resume, by this alone, so changing a value an experiment does not use retrains nothing."""
    out = {}
    for field in dataclasses.fields(section):
        rule = unused_rule(type(section), field.name)
        if rule is not None and rule(section):
            continue
        value = getattr(section, field.name)
        out[field.name] = result_spec(value) if dataclasses.is_dataclass(value) else to_data(value)
    return out


# ------------------------------------------------------------------ how fast
@spec
class LoaderSpec:
    num_workers: Annotated[int | None, Field(ge=0)]
    pin_memory: bool
    persistent_workers: bool


@spec
class RuntimeSpec:
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")]
    compile: choice(False, True, "reduce-overhead")
    channels_last: bool
    cudnn_benchmark: bool
    jobs_per_gpu: choice(1, 2, 4, 8)
    eval_batch_size: PositiveInt
    predict_batch_size: PositiveInt
    eval_every_epochs: PositiveInt
    checkpoint_every_epochs: PositiveInt
    checkpoint_every_minutes: Annotated[float | None, Field(gt=0)]
    loader: LoaderSpec


@spec
class ExperimentSpec:
    name: ExperimentName
    seeds: Seeds
    training: TrainingSpec
    runtime: RuntimeSpec


# ------------------------------------------------------------------ the other stages
@spec
class SubsetSpec:
    train: Annotated[int | None, Field(ge=1)]
    test: Annotated[int | None, Field(ge=1)]


@spec
class DataSpec:
    source: str | None
    url: str | None
    md5: Md5 | None
    own_dataset: bool
    val_size: PositiveInt
    split_seed: Seed
    subset: SubsetSpec


@spec
class SourceSpec:
    """What the download stage depends on (a slice of DataSpec)."""

    source: str | None
    url: str | None
    md5: Md5 | None
    own_dataset: bool


@spec
class SplitSpec:
    """What the prepare stage depends on (a slice of DataSpec)."""

    val_size: PositiveInt
    split_seed: Seed
    subset: SubsetSpec


@spec
class WeightsSpec:
    url: str | None
    file: str | None


@spec
class PredictSpec:
    """How the predict stage runs (from the experiment's runtime): never what it predicts."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")]
    batch_size: PositiveInt


@spec
class MemberSpec:
    """One extra member of a run for the predict jobs: its weights (a model.pt, or `member` of a
    members.pt: `swa`, `epochN`) and whether it is predicted with test-time augmentation."""

    weights: Annotated[str, Field(min_length=1)]
    member: Annotated[str, Field(pattern=r"^(swa|epoch[0-9]+)$")] | None
    tta: bool


Resamples = Annotated[int, Field(ge=10)]
EceBins = Annotated[int, Field(ge=2, le=100)]


@spec
class EnsembleSpec:
    method: Literal["soft", "hard"]
    max_subsets: PositiveInt
    subset_seed: Seed
    bootstrap: Resamples
    bootstrap_seed: Seed
    ece_bins: EceBins

    @property
    def scoring(self) -> ScoringSpec:
        return ScoringSpec(self.bootstrap, self.bootstrap_seed, self.ece_bins)


@spec
class ScoringSpec:
    """What the methods stage's scores depend on (a slice of EnsembleSpec): the intervals and ECE."""

    bootstrap: Resamples
    bootstrap_seed: Seed
    ece_bins: EceBins


CorruptionTransform = Literal["GaussNoise", "ShotNoise", "SaltAndPepper", "Defocus", "MotionBlur",
                              "GlassBlur", "ZoomBlur", "GaussianBlur", "RandomFog",
                              "PlasmaBrightnessContrast", "RandomSnow", "Spatter", "RandomBrightnessContrast",
                              "ColorJitter", "ImageCompression", "Downscale", "ElasticTransform"]


@spec
class CorruptionSpec:
    transform: CorruptionTransform
    reference: Annotated[str, Field(min_length=1)]  # where the parameters come from
    # albumentations keyword arguments of severity 1..5
    severities: Annotated[list[dict[str, Any]], Field(min_length=5, max_length=5)]


@spec
class ShiftSpec:
    run_corruptions: Annotated[tuple[str, ...] | None, AfterValidator(_unique), Unique]
    source: str | None
    md5: Md5 | None
    images: Annotated[int | None, Field(ge=1)]
    seed: Seed
    baseline: str | None
    corruptions: dict[CorruptionName, CorruptionSpec]


@spec
class ShiftSetSpec:
    """What one corrupted set depends on (a slice of ShiftSpec): the shift stage's argument."""

    source: str | None
    md5: Md5 | None
    images: Annotated[int | None, Field(ge=1)]
    seed: Seed
    corruption: CorruptionSpec


OodSetName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
OodKind = Literal["svhn", "cifar100", "digits", "uniform_noise", "smooth_noise"]


@spec
class OodSourceSpec:
    """One named OOD set of `ood.sets`: where its images come from."""

    kind: OodKind
    source: str | None  # a local file or folder instead of downloading (svhn, cifar100)
    url: str | None  # null: torchvision's address (svhn, cifar100)
    md5: Md5 | None  # null: torchvision's MD5 (svhn, cifar100)
    sigma: Annotated[float | None, Field(gt=0)]  # smooth_noise: Gaussian blur in pixels


@spec
class OodSpec:
    run_sets: Annotated[tuple[str, ...] | None, AfterValidator(_unique), Unique]
    images: Annotated[int | None, Field(ge=1)]
    seed: Seed
    sets: dict[OodSetName, OodSourceSpec]


@spec
class OodSetSpec:
    """What one prepared OOD set depends on (a slice of OodSpec): the ood-set job's argument."""

    images: Annotated[int | None, Field(ge=1)]
    seed: Seed
    set: OodSourceSpec


@spec
class TtaSpec:
    """Test-time augmentation: what the TTA predictions of the final models average over, and
    of which experiments' final models."""

    enabled: bool
    views: Literal["flip", "flip_translate"]
    translate: Annotated[int, Field(ge=1, le=8)]
    experiments: Annotated[tuple[str, ...] | None, AfterValidator(_unique), Unique]  # null: every one

    @property
    def view_count(self) -> int:
        """Forward passes per image (transforms.tta.tta_views lists them)."""
        return 1 if not self.enabled else 2 if self.views == "flip" else 6

    def applies_to(self, experiment: str) -> bool:
        return self.enabled and (self.experiments is None or experiment in self.experiments)

    @property
    def result(self) -> dict:
        """What a TTA prediction depends on: the views (and their shift)."""
        shift = {"translate": self.translate} if self.views == "flip_translate" else {}
        return {"views": self.views, **shift}


Severity = Annotated[int, Field(ge=1, le=5)]
Coverage = Annotated[float, Field(gt=0, le=1)]


def coverage_key(coverage: float) -> str:
    """How selective.json names a coverage (0.9 -> "0.9"): coverages must differ in it."""
    return f"{coverage:g}"


def _unique_keys(values):
    if len({coverage_key(v) for v in values}) != len(values):
        raise PydanticCustomError("unique", "values must not repeat (to 6 significant digits)")
    return values


@spec
class SelectiveSpec:
    severities: Annotated[tuple[Severity, ...], AfterValidator(_unique), Unique]
    coverages: Annotated[tuple[Coverage, ...], Field(min_length=1), AfterValidator(_unique_keys), Unique]


@spec
class PublishedSpec:
    note: str
    test_accuracy: Probability
    k: PositiveInt


@spec
class ReportSpec:
    dpi: Annotated[int, Field(ge=30, le=600)]
    published: dict[str, PublishedSpec] | None


@spec
class WorkflowSpec:
    dataset: Dataset
    data: DataSpec
    pretrained_weights: WeightsSpec
    run_experiments: Annotated[tuple[str, ...] | None, Field(min_length=1), AfterValidator(_unique), Unique]
    experiments: dict[ExperimentName, ExperimentSpec]
    shift: ShiftSpec
    ood: OodSpec
    selective: SelectiveSpec
    tta: TtaSpec
    ensemble: EnsembleSpec
    report: ReportSpec

    @property
    def selected(self) -> list[str]:
        """The experiments this run builds: `run_experiments`, else all of them."""
        return list(self.run_experiments or self.experiments)

    @property
    def source(self) -> SourceSpec:
        return SourceSpec(self.data.source, self.data.url, self.data.md5, self.data.own_dataset)

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

    @property
    def selected_ood_sets(self) -> list[str]:
        """The OOD sets this run uses: `ood.run_sets`, else all of them."""
        run = self.ood.run_sets
        return list(self.ood.sets) if run is None else list(run)

    def ood_set(self, name: str) -> OodSetSpec:
        return OodSetSpec(self.ood.images, self.ood.seed, self.ood.sets[name])


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
    except UnknownKey as err:
        where = origin(config, experiment, section, *_keys(err.path), err.key)
        raise UnknownKey(where.rpartition(".")[0], err.key, err.allowed) from None
    except UserError as err:
        where, _, what = str(err).partition(": ")
        raise UserError(f"{origin(config, experiment, section, *_keys(where))}: {what} "
                        f"(experiment {experiment!r})") from None


def _keys(dotted: str) -> list[str]:
    return [k for k in re.split(r"[.\[\]]+", dotted) if k]


def resolve_experiment(config: dict, name: str) -> ExperimentSpec:
    try:
        from_data(ExperimentName, name)
    except UserError as err:
        raise UserError(f"experiments.{name}: invalid name: {str(err).partition(': ')[2]}") from None
    own = config["experiments"][name]
    if own is not None and not isinstance(own, dict):
        raise UserError(f"experiments.{name}: expected a mapping (seeds, and what it changes), "
                        f"got {type(own).__name__}")
    if "seeds" not in (own or {}):
        raise UserError(f"experiments.{name}.seeds: missing (required)")
    training, runtime = experiment_sections(config, name)
    return ExperimentSpec(
        name=name,
        seeds=from_data(Seeds, (own or {}).get("seeds"), f"experiments.{name}.seeds"),
        training=_section(TrainingSpec, config, name, "training", training),
        runtime=_section(RuntimeSpec, config, name, "runtime", runtime),
    )


SECTIONS = ("training", "runtime", "experiments")  # resolved per experiment, not as one field


def resolve(config: dict) -> WorkflowSpec:
    """The whole workflow's spec from a merged config (config.yaml plus --configfile files)."""
    rest = {k: v for k, v in config.items() if k not in SECTIONS}
    # The defaults are whole sections: checked as they stand, then with each experiment's overrides.
    from_data(TrainingSpec, config.get("training"), "training")
    from_data(RuntimeSpec, config.get("runtime"), "runtime")
    try:
        workflow = from_data(WorkflowSpec, {**rest, "experiments": {}})
    except UnknownKey as err:
        if err.path:
            raise
        allowed = [k for k in err.allowed if k != "experiments"]
        raise UnknownKey("", err.key, [*allowed, *SECTIONS]) from None
    experiments = config.get("experiments")
    if not isinstance(experiments, dict) or not experiments:
        raise UserError("experiments: expected a mapping that names at least one experiment")
    return dataclasses.replace(workflow, experiments={name: resolve_experiment(config, name)
                                                     for name in experiments})


# ------------------------------------------------------------------ config files
def load_config(defaults: str | os.PathLike, *paths: str | os.PathLike) -> dict:
    """`defaults` (the workflow's config.yaml) merged with `paths` in order, as Snakemake merges
    --configfile files. The package ships no config of its own: the caller names it."""
    import yaml

    merged: dict = {}
    for path in (defaults, *paths):
        with open(path) as f:
            merged = deep_merge(merged, yaml.safe_load(f) or {})
    return merged
