"""Check the workflow's config before any job runs and describe the first problem in one line.

`validate_config` runs the JSON schema (Draft 2020-12, the schema's own dialect), picks the
most relevant error and names its field as a dotted path
(`experiments.single_asam.optimizer.lr: -1 is less than or equal to the minimum of 0`);
an unknown key is named itself, with the allowed keys and the closest one when it looks
misspelt. Then it checks what the schema cannot express: experiments named in
`run_experiments` exist, the cosine floor is below the learning rate of every resolved
experiment (defaults merged with the experiment's overrides), ImageNet weights are asked
for only with the architecture they exist for, and the validation split fits the standard
archives. Light on purpose: Snakemake imports it at parse time (no torch).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable

from .errors import UserError

# Images in the standard archives (torchvision's MD5 enforces them when data.md5 is null).
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000}
TEST_IMAGES = {"cifar10": 10_000, "cifar100": 10_000, "fashion_mnist": 10_000}
PRETRAINED_MODELS = ("resnet18",)  # architectures with ImageNet weights


def validate_config(config: dict, schema_path: str | os.PathLike) -> None:
    """Raise UserError (one line, naming the field) unless `config` is valid; None otherwise."""
    import yaml
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        raise UserError(describe(error, schema))
    check_semantics(config)


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
def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in, key by key (lists are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolved_experiment(config: dict, name: str) -> dict:
    """The experiment's full training config: `training` plus its overrides, without seeds."""
    overrides = {k: v for k, v in config["experiments"][name].items() if k != "seeds"}
    return deep_merge(config.get("training") or {}, overrides)


def _origin(config: dict, name: str, *keys: str) -> str:
    """Dotted path of the value an experiment uses: its own override, or the training default."""
    node = config["experiments"][name]
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return "training." + ".".join(keys)
        node = node[key]
    return f"experiments.{name}." + ".".join(keys)


def check_semantics(config: dict) -> None:
    """What the schema cannot express; assumes the config passed the schema."""
    experiments = config["experiments"]
    for name in config.get("run_experiments") or []:
        if name not in experiments:
            raise UserError(f"run_experiments: {name!r} is not an experiment in the config"
                            f"{_suggest(name, experiments)} (experiments: {', '.join(experiments)})")
    for name in experiments:
        spec = resolved_experiment(config, name)
        scheduler, optimizer = spec.get("scheduler") or {}, spec.get("optimizer") or {}
        if scheduler.get("name") == "cosine" and "lr" in optimizer:
            floor = scheduler.get("min_lr", 0.0)
            if floor >= optimizer["lr"]:
                raise UserError(
                    f"{_origin(config, name, 'scheduler', 'min_lr')}: {floor} must be below the "
                    f"learning rate of experiment {name!r} ({_origin(config, name, 'optimizer', 'lr')} = "
                    f"{optimizer['lr']}) for the cosine schedule")
        model = spec.get("model") or {}
        if model.get("pretrained") and model.get("name") not in PRETRAINED_MODELS:
            raise UserError(
                f"{_origin(config, name, 'model', 'pretrained')}: ImageNet weights exist only for "
                f"{', '.join(PRETRAINED_MODELS)}, but experiment {name!r} uses "
                f"{_origin(config, name, 'model', 'name')} = {model.get('name')}; set pretrained: false")
    _check_split(config)


def _check_split(config: dict) -> None:
    """The validation split and subsets against the standard archive's size (when md5 enforces it)."""
    data, dataset = config.get("data") or {}, config.get("dataset")
    if data.get("md5") or dataset not in TRAIN_IMAGES:
        return  # another archive: prepare checks the sizes against the real data
    n_train, n_test = TRAIN_IMAGES[dataset], TEST_IMAGES[dataset]
    val_size = data["val_size"]
    if val_size >= n_train:
        raise UserError(f"data.val_size: {val_size} must be smaller than the {dataset} training set "
                        f"({n_train} images)")
    subset = data.get("subset") or {}
    if subset.get("train") is not None and subset["train"] > n_train - val_size:
        raise UserError(f"data.subset.train: {subset['train']} is more than the {n_train - val_size} "
                        f"{dataset} training images left after the validation split")
    if subset.get("test") is not None and subset["test"] > n_test:
        raise UserError(f"data.subset.test: {subset['test']} is more than the {n_test} {dataset} test images")
