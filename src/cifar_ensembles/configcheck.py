"""Check the workflow's config before any job runs and describe the first problem in one line.

`validate_config` runs the JSON schema (Draft 2020-12, the schema's own dialect), picks the
most relevant error and names its field as a dotted path
(`experiments.single_asam.optimizer.lr: -1 is less than or equal to the minimum of 0`);
an unknown key is named itself, with the allowed keys and the closest one when it looks
misspelt, or where it moved to. Every number must be finite (YAML's .nan and .inf pass a
JSON schema). Then the config is resolved into its typed spec (`spec.resolve`) and what the
schema cannot express is checked on that: experiments named in `run_experiments` exist, the
cosine floor is below the learning rate of every experiment, ImageNet weights are asked for
only with the architecture they exist for, and the validation split fits the standard
archives. Light on purpose: Snakemake imports it at parse time (no torch).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable

from .errors import UserError
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
    if path == "config" and key in MOVED_FROM_TOP:
        return f"moved to {MOVED_FROM_TOP[key]} {SPEED_MOVED}"
    if path == "training" and key in MOVED:
        return f"moved to {MOVED[key]} {SPEED_MOVED}"
    if re.fullmatch(r"experiments\.[^.\[]+", path) and key in MOVED:  # the experiment's own runtime
        return f"moved to {path}.{MOVED[key]} {SPEED_MOVED}"
    if re.fullmatch(r"(training|experiments\.[^.\[]+)\.augment", path) and key == "device":
        return (f"replaced by {path}.mode (cpu: per_image, gpu: batched; "
                "a result setting: switching it retrains)")
    return None


def validate_config(config: dict, schema_path: str | os.PathLike) -> WorkflowSpec:
    """The config's resolved spec; UserError (one line, naming the field) when it is invalid."""
    import yaml
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        raise UserError(describe(error, schema))
    check_finite(config)
    spec = resolve(config)
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


# ------------------------------------------------------------------ schema errors
def dotted(path: Iterable) -> str:
    """`experiments.x.seeds[1]` from a jsonschema path; `config` for the root."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def _join(path: str, key: str) -> str:
    return key if path == "config" else f"{path}.{key}"


def _resolve(ref: str, root: dict) -> dict:
    """A local `#/$defs/...` reference; anything else resolves to an empty schema."""
    if not ref.startswith("#/"):
        return {}
    node = root
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def allowed_keys(schema: dict, root: dict, seen: frozenset = frozenset()) -> list[str]:
    """Property names a schema object evaluates: its `properties`, and those of its `$ref`s and
    `allOf`/`anyOf`/`oneOf` branches (what `unevaluatedProperties` accepts)."""
    keys = list(schema.get("properties", {}))
    subschemas = [_resolve(schema["$ref"], root)] if "$ref" in schema and schema["$ref"] not in seen else []
    for keyword in ("allOf", "anyOf", "oneOf"):
        subschemas += schema.get(keyword, [])
    for sub in subschemas:
        if isinstance(sub, dict):
            keys += [k for k in allowed_keys(sub, root, seen | {schema.get("$ref")}) if k not in keys]
    return keys


def _suggest(word: str, choices: Iterable) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe(error, schema: dict) -> str:
    """One line for a jsonschema ValidationError: the field's dotted path, then what is wrong."""
    path = dotted(error.absolute_path)
    keyword = error.validator
    if keyword in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
        allowed = allowed_keys(error.schema, schema)
        patterns = list(error.schema.get("patternProperties", {}))
        unknown = [k for k in error.instance
                   if k not in allowed and not any(re.search(p, str(k)) for p in patterns)]
        if unknown and allowed:
            key = unknown[0]
            where = moved(path, str(key))
            if where:
                return f"{_join(path, str(key))}: {where}"
            return (f"{_join(path, str(key))}: unknown key{_suggest(key, allowed)} "
                    f"(allowed: {', '.join(allowed)})")
    if keyword == "required":
        missing = re.match(r"'(.*)' is a required property", error.message)
        if missing:
            return f"{_join(path, missing.group(1))}: missing (required)"
    if "propertyNames" in error.relative_schema_path or "propertyNames" in error.schema_path:
        return f"{_join(path, str(error.instance))}: invalid name: {error.message}"
    message = error.message
    if keyword == "enum":
        message += _suggest(error.instance, error.validator_value)
    expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    if keyword == "type" and {"number", "integer"} & set(expected) and isinstance(error.instance, str):
        text = error.instance.strip()
        if re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", text):  # YAML 1.1 wants a dot: 1.0e-4
            message += f" (YAML reads {text} as text; write {text.replace('e', '.0e').replace('E', '.0E')})"
        elif re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
            message += " (a number in quotes is text; drop the quotes)"
    return f"{path}: {message}"


# --------------------------------------------------------------- semantic checks
def check_semantics(config: dict, spec: WorkflowSpec) -> None:
    """What the schema cannot express, on the resolved spec; names the key a value comes from."""
    for name in spec.run_experiments or ():
        if name not in spec.experiments:
            raise UserError(f"run_experiments: {name!r} is not an experiment in the config"
                            f"{_suggest(name, spec.experiments)} "
                            f"(experiments: {', '.join(spec.experiments)})")
    for name, experiment in spec.experiments.items():
        training = experiment.training
        if training.scheduler.name == "cosine" and training.scheduler.min_lr >= training.optimizer.lr:
            raise UserError(
                f"{origin(config, name, 'training', 'scheduler', 'min_lr')}: {training.scheduler.min_lr} "
                f"must be below the learning rate of experiment {name!r} "
                f"({origin(config, name, 'training', 'optimizer', 'lr')} = {training.optimizer.lr}) "
                "for the cosine schedule")
        model = training.model
        if model.pretrained and model.name not in PRETRAINED_MODELS:
            raise UserError(
                f"{origin(config, name, 'training', 'model', 'pretrained')}: ImageNet weights exist only for "
                f"{', '.join(PRETRAINED_MODELS)}, but experiment {name!r} uses "
                f"{origin(config, name, 'training', 'model', 'name')} = {model.name}; set pretrained: false")
    for name in spec.shift.run_corruptions or ():
        if name not in spec.shift.corruptions:
            raise UserError(f"shift.run_corruptions: {name!r} is not a corruption in the config"
                            f"{_suggest(name, spec.shift.corruptions)}")
    baseline = spec.shift.baseline
    if spec.selected_corruptions and baseline is not None and baseline not in spec.selected:
        raise UserError(f"shift.baseline: {baseline!r} is not among the experiments this run builds "
                        f"({', '.join(spec.selected)}); name one of them, or null for no corruption error")
    _check_split(spec)


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
