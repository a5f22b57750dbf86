"""The config model: shipped configs resolve to exactly what their files say, typed checks give
one-line errors, the result spec keeps what decides a result, and no default lives outside
config.yaml."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from conftest import ROOT, SCHEMA, TEST_CONFIGS, load_config, tiny_spec, training_spec

from cifar_ensembles.config.check import validate_config
from cifar_ensembles.config.convert import from_data, from_json, spec, to_data, to_json
from cifar_ensembles.config.schema import build_schema, schema_text
from cifar_ensembles.config.spec import (
    EXPERIMENT_OWN_KEYS,
    RuntimeSpec,
    TrainingSpec,
    UnusedWhen,
    deep_merge,
    resolve,
    result_spec,
    unused_rule,
)
from cifar_ensembles.errors import UserError

CONFIG_FILES = {
    "config.yaml": [],
    "presets/demo.yaml": [ROOT / "presets/demo.yaml"],
    "presets/from-scratch.yaml": [ROOT / "presets/from-scratch.yaml"],
    ".test/cifar10-tiny.yaml": [TEST_CONFIGS / "cifar10-tiny.yaml"],
    ".test/fashion-mnist-tiny.yaml": [TEST_CONFIGS / "fashion-mnist-tiny.yaml"],
}


def yaml_files(extra: list[Path]) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in [ROOT / "config.yaml", *extra]]


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_every_shipped_config_resolves_to_what_its_files_say(name):
    """Merge the YAML files by hand, then compare every experiment's resolved spec with it."""
    files = yaml_files(CONFIG_FILES[name])
    merged: dict = {}
    for f in files:
        merged = deep_merge(merged, f)
    spec = validate_config(load_config(*CONFIG_FILES[name]))
    assert set(spec.experiments) == set(merged["experiments"])
    for experiment, resolved in spec.experiments.items():
        own = merged["experiments"][experiment]
        overrides = {k: v for k, v in own.items() if k not in EXPERIMENT_OWN_KEYS}
        training = deep_merge(merged["training"], overrides)
        runtime = deep_merge(merged["runtime"], own.get("runtime") or {})
        assert to_data(resolved.training) == normalized(training)
        assert to_data(resolved.runtime) == normalized(runtime)
        assert list(resolved.seeds) == own["seeds"]
    for section in ("data", "ensemble", "pretrained_weights"):
        assert to_data(getattr(spec, section)) == normalized(merged[section])
    assert spec.dataset == merged["dataset"]
    assert spec.report.dpi == merged["report"]["dpi"]


def normalized(value):
    """YAML values as the specs hold them: ints in float fields compare equal, tuples as lists."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalized(v) for v in value]
    return value


def test_training_and_runtime_share_no_key():
    config = load_config()
    assert not set(config["training"]) & set(config["runtime"])
    assert {f.name for f in dataclasses.fields(TrainingSpec)} == set(config["training"])
    assert {f.name for f in dataclasses.fields(RuntimeSpec)} == set(config["runtime"])


def test_the_demo_preset_resolves_its_experiment_overrides():
    spec = resolve(load_config(ROOT / "presets/demo.yaml"))
    sam = spec.experiments["single_asam"].training
    assert sam.optimizer.name == "sam" and sam.optimizer.rho == 0.05 and sam.optimizer.lr == 0.05
    assert sam.optimizer.eta == 0.01  # config.yaml's default, not the library's
    assert sam.model.width == 8 and sam.precision == "bf16"
    assert spec.experiments["single_asam"].runtime.device == "cpu"


# ------------------------------------------------------------------ typed checks
def test_missing_unknown_and_mistyped_fields_are_named():
    good = to_data(tiny_spec())
    with pytest.raises(UserError, match=r"^t\.optimizer\.lr: missing$"):
        from_data(TrainingSpec, deep_merge(good, {"optimizer": {}}) | {
            "optimizer": {k: v for k, v in good["optimizer"].items() if k != "lr"}}, "t")
    with pytest.raises(UserError, match=r"^t\.loss\.gama: unknown key; did you mean 'gamma_pos'\? "):
        from_data(TrainingSpec, deep_merge(good, {"loss": {"gama": 1}}), "t")
    with pytest.raises(UserError, match=r"^t\.epochs: expected an integer, got \"3\" \(a number in quotes"):
        from_data(TrainingSpec, deep_merge(good, {"epochs": "3"}), "t")
    with pytest.raises(UserError, match=r"^t\.ema\.enabled: expected true or false, got 1$"):
        from_data(TrainingSpec, deep_merge(good, {"ema": {"enabled": 1}}), "t")
    with pytest.raises(UserError, match=r"^t\.optimizer\.betas: expected 2 values, got 3$"):
        from_data(TrainingSpec, deep_merge(good, {"optimizer": {"betas": [0.9, 0.99, 0.999]}}), "t")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(UserError, match=r"optimizer\.lr: expected a finite number"):
        from_data(TrainingSpec, deep_merge(to_data(tiny_spec()), {"optimizer": {"lr": value}}), "t")
    with pytest.raises(UserError, match=r"--spec\.optimizer\.lr: expected a finite number"):
        from_json(TrainingSpec, to_json(tiny_spec()).replace('"lr":0.05', '"lr":NaN'), "--spec")


def test_literals_are_type_exact():
    """`jobs_per_gpu: true` is not 1, and `compile: 1` is not true."""
    runtime = to_data(from_data(RuntimeSpec, load_config()["runtime"]))
    with pytest.raises(UserError, match="jobs_per_gpu"):
        from_data(RuntimeSpec, {**runtime, "jobs_per_gpu": True})
    with pytest.raises(UserError, match="compile"):
        from_data(RuntimeSpec, {**runtime, "compile": 1})
    assert from_data(RuntimeSpec, {**runtime, "compile": "reduce-overhead"}).compile == "reduce-overhead"


def test_json_round_trip_is_exact():
    spec = training_spec(optimizer={"name": "asam", "lr": 0.1})
    assert from_json(TrainingSpec, to_json(spec)) == spec
    assert to_json(spec) == to_json(from_json(TrainingSpec, to_json(spec)))


# ------------------------------------------------------------------ the result spec
def leaf_paths(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from leaf_paths(value, (*prefix, key))
    else:
        yield prefix


def changed(value):
    if value is None:  # model.input_size
        return 64
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if isinstance(value, int) else value * 0.5 + 0.001
    if isinstance(value, list):
        return [v * 0.5 for v in value]
    return value + "x"


def with_leaf(data: dict, path: tuple, value) -> dict:
    if len(path) == 1:
        return {**data, path[0]: value}
    return {**data, path[0]: with_leaf(data[path[0]], path[1:], value)}


CHOICES = {
    "sgd-ce": dict(optimizer={"name": "sgd"}, loss={"name": "cross_entropy"},
                   scheduler={"name": "constant"}),
    "adam-asl-step": dict(optimizer={"name": "adam"}, scheduler={"name": "step"}, augment={"name": "none"}),
    "asam-cosine-ema": dict(optimizer={"name": "asam", "base": "sgd"}, ema={"enabled": True},
                            scheduler={"name": "cosine", "warmup_epochs": 1},
                            augment={"name": "albumentations"}),
    "sam-adam": dict(optimizer={"name": "sam", "base": "adam"}, augment={"name": "torchvision", "pad": 0}),
    "imagenet-resnet": dict(model={"name": "resnet18", "pretrained": True, "input_size": 64}),
    "restarts-cycle-ends": dict(scheduler={"name": "cosine_restarts", "cycles": 2},
                                snapshots={"keep": "cycle_ends"}),
    "last-epochs-swa": dict(snapshots={"keep": "last_epochs"}, swa={"enabled": True, "lr": None}),
    "swa-lr": dict(swa={"enabled": True, "lr": 0.01}),
}


def training_leaves(tp=TrainingSpec, prefix=()):
    """Every leaf field of the training spec (result_spec recurses into every section, those
    with a rule of their own too)."""
    hints = typing.get_type_hints(tp)
    for field in dataclasses.fields(tp):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from training_leaves(hints[field.name], (*prefix, field.name))
        else:
            yield (*prefix, field.name)


def declared_unused(spec, path) -> bool:
    """Whether a rule beside some field on `path` says the leaf cannot change the result."""
    section = spec
    for name in path:
        rule = unused_rule(type(section), name)
        if rule is not None and rule(section):
            return True
        section = getattr(section, name)
    return False


def test_every_training_field_decides_the_result_unless_its_rule_says_unused():
    """Walk every leaf field of the training spec under every choice: changing it changes the
    result spec exactly when no rule beside a field on its path says it is unused (before or
    after the change: a switch such as swa.enabled turns its own section on), and every leaf
    decides the result under at least one choice (a rule that always holds is a bug)."""
    leaves = list(training_leaves())
    assert ("optimizer", "betas") in leaves and ("augment", "cutout", "holes") in leaves and len(leaves) > 30
    new = {("scheduler", "cycles"), ("snapshots", "last_epochs"), ("swa", "enabled"), ("swa", "lr")}
    assert new <= set(leaves)
    deciding = set()
    for choice, overrides in CHOICES.items():
        spec = tiny_spec(**overrides)
        base, key = to_data(spec), result_spec(spec)
        for path in leaves:
            value = base
            for part in path:
                value = value[part]
            if isinstance(value, str):
                deciding.add(path) if not declared_unused(spec, path) else None
                continue  # names choose the branch; the choices above cover them
            other_spec = from_data(TrainingSpec, with_leaf(base, path, changed(value)))
            used = not (declared_unused(spec, path) and declared_unused(other_spec, path))
            assert (result_spec(other_spec) != key) == used, f"{'.'.join(path)} under {choice}"
            deciding |= {path} if used else set()
    assert deciding == set(leaves), f"never decide the result: {sorted(set(leaves) - deciding)}"


def test_default_result_specs_have_no_trace_of_snapshots_or_swa():
    """With snapshots and SWA off and no cosine_restarts, both default experiments' result specs
    are what they were before these fields existed: runs and checkpoints from then stay valid."""
    spec = validate_config(load_config())
    for name in ("single_asam", "ensemble_adam"):
        result = result_spec(spec.experiments[name].training)
        keys = {key for path in leaf_paths(result) for key in path}
        assert not keys & {"snapshots", "swa", "cycles", "last_epochs", "start_epoch", "anneal_epochs"}, name
        assert set(result) == {f.name for f in dataclasses.fields(TrainingSpec)} - {"snapshots", "swa"}, name


def test_a_field_without_a_rule_decides_the_result():
    """A field added later without a rule is part of the result spec: it reruns training."""
    @spec
    class Later:
        lr: float
        new_knob: int
        unused: Annotated[int, UnusedWhen(lambda s: s.new_knob == 0)]

    assert result_spec(Later(lr=0.1, new_knob=3, unused=1)) == {"lr": 0.1, "new_knob": 3, "unused": 1}
    assert result_spec(Later(lr=0.1, new_knob=0, unused=1)) == {"lr": 0.1, "new_knob": 0}


def test_result_spec_keeps_the_branch_names():
    assert result_spec(tiny_spec(optimizer={"name": "sam"}))["optimizer"]["name"] == "sam"
    assert "betas" not in result_spec(tiny_spec(optimizer={"name": "sgd"}))["optimizer"]
    sam_adam = result_spec(tiny_spec(optimizer={"name": "sam", "base": "adam"}))
    assert sam_adam["optimizer"]["betas"] == [0.9, 0.999]


# ------------------------------------------------------------------ one place for defaults
def config_keys() -> set[str]:
    config = load_config()
    keys = set()
    for section in ("data", "training", "runtime", "ensemble", "report", "pretrained_weights"):
        keys |= {path[-1] for path in leaf_paths(config[section])}
        keys |= {k for k in config[section]}
    return keys - {"name"}  # `name` is everywhere (experiment names, argparse) and never defaulted


def test_no_library_function_defaults_a_config_key():
    """grep, made exact: no parameter named like a config key has a default value, and no
    `.get("<config key>", default)` exists in the package."""
    keys = config_keys()
    found = []
    for path in sorted((ROOT / "src" / "cifar_ensembles").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = [*args.posonlyargs, *args.args]
                defaulted = positional[len(positional) - len(args.defaults):]
                defaulted += [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                for arg in defaulted:
                    default = _default_of(args, arg)
                    is_none = isinstance(default, ast.Constant) and default.value is None
                    if arg.arg in keys and not is_none:
                        found.append(f"{path.name}:{node.lineno} {node.name}({arg.arg}=...)")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys):
                found.append(f"{path.name}:{node.lineno} .get({node.args[0].value!r}, ...)")
    assert not found, "config defaults outside config.yaml: " + "; ".join(found)


def _default_of(args: ast.arguments, arg: ast.arg):
    positional = [*args.posonlyargs, *args.args]
    if arg in positional:
        return args.defaults[positional.index(arg) - (len(positional) - len(args.defaults))]
    return args.kw_defaults[args.kwonlyargs.index(arg)]


def test_the_schema_has_no_defaults():
    assert "default:" not in SCHEMA.read_text()


def test_the_schema_file_is_generated_from_the_specs():
    """workflow/schemas/config.schema.yaml is what the specs' annotations generate today."""
    assert SCHEMA.read_text() == schema_text(), (
        "stale schema: python -m cifar_ensembles.config.schema > workflow/schemas/config.schema.yaml")


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_the_generated_schema_accepts_the_shipped_configs(name):
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(build_schema())
    assert [e.message for e in validator.iter_errors(load_config(*CONFIG_FILES[name]))] == []


@pytest.mark.parametrize("edit, where", [
    (lambda c: c["training"]["optimizer"].update(lr=-1), ["training", "optimizer", "lr"]),
    (lambda c: c["experiments"]["single_asam"]["optimizer"].update(lrr=1),
     ["experiments", "single_asam", "optimizer"]),
    (lambda c: c["runtime"].update(jobs_per_gpu=3), ["runtime", "jobs_per_gpu"]),
    (lambda c: c["ensemble"].update(ece_bins=1), ["ensemble", "ece_bins"]),
    (lambda c: c["experiments"]["ensemble_adam"].update(seeds=[0, 0]),
     ["experiments", "ensemble_adam", "seeds"]),
])
def test_the_generated_schema_and_the_specs_refuse_the_same_values(edit, where):
    from jsonschema import Draft202012Validator

    config = load_config()
    edit(config)
    errors = list(Draft202012Validator(build_schema()).iter_errors(config))
    assert errors and list(errors[0].absolute_path)[:len(where)] == where
    with pytest.raises(UserError, match="^" + r"\.".join(where)):
        validate_config(config)


def test_the_cli_has_no_defaults_for_config_values():
    from cifar_ensembles.cli import build_parser

    parser = build_parser()
    keys = config_keys() | {"spec", "runtime", "dpi", "ece_bins", "published", "threads"}
    defaults = []
    for action in parser._subparsers._group_actions[0].choices.values():
        stack = [action]
        while stack:
            sub = stack.pop()
            for a in sub._actions:
                if getattr(a, "choices", None) and isinstance(a.choices, dict):
                    stack.extend(a.choices.values())
                elif a.dest in keys and a.default is not None:
                    defaults.append(f"{sub.prog} --{a.dest}")
    assert not defaults, defaults


def test_values_json_cannot_carry_pass_only_where_the_annotation_is_any():
    """A model file's tensors sit beside typed fields: the tensors pass through untouched, and
    the typed fields are checked as strictly as in a JSON file (no text for numbers or flags)."""
    import torch

    from cifar_ensembles.files.training_run import ModelRecord

    weights = {"w": torch.ones(2)}
    good = {"model": to_data(tiny_spec().model), "num_classes": 10, "in_channels": 3,
            "mean": [0.5] * 3, "std": [0.25] * 3, "ema": False, "state_dict": weights}
    record = from_data(ModelRecord, good)
    assert record.state_dict["w"] is weights["w"] and record.mean == (0.5, 0.5, 0.5)
    for field, bad, expected in (("num_classes", "10", 'num_classes: expected an integer, got "10"'),
                                 ("ema", "yes", 'ema: expected true or false, got "yes"'),
                                 ("mean", ["0.5"] * 3, 'mean[0]: expected a finite number, got "0.5"'),
                                 ("num_classes", torch.tensor(10),
                                  "num_classes: expected an integer, got Tensor"),
                                 ("num_classes", 0, "num_classes: 0 is less than the minimum of 2"),
                                 ("std", [0.25, 0.0, 0.25],
                                  "std[1]: 0.0 is less than or equal to the minimum of 0")):
        with pytest.raises(UserError, match="^" + re.escape(expected)):
            from_data(ModelRecord, {**good, field: bad})
