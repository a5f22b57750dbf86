"""The config file's JSON schema, generated from the specs' annotations (one source of truth).

`workflow/schemas/config.schema.yaml` is this module's output, for editors and readers
(`python -m cifar_ensembles.config.schema > workflow/schemas/config.schema.yaml`); a test
fails when the file is stale. The config itself is checked by `check.validate_config`
through the same annotations, so the two cannot disagree.

The file's shape differs from `WorkflowSpec` in one place: `training` and `runtime` hold
every key, and each experiment overrides any subset of them (a "partial" copy of their
schemas, with nothing required), next to its own `seeds`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import yaml
from pydantic import TypeAdapter

from .spec import ExperimentName, RuntimeSpec, Seeds, TrainingSpec, WorkflowSpec

HEADER = ("# Generated from src/cifar_ensembles/config/spec.py by\n"
          "#   python -m cifar_ensembles.config.schema > workflow/schemas/config.schema.yaml\n"
          "# Do not edit: change the specs' annotations instead (a test compares the two).\n")


@dataclasses.dataclass(frozen=True)
class _ConfigFile:
    """The file as written: the workflow's sections, and training/runtime as defaults."""

    training: TrainingSpec
    runtime: RuntimeSpec
    workflow: WorkflowSpec
    seeds: Seeds
    experiment_name: ExperimentName


def _partial(node, renames: dict[str, str]):
    """A copy of a schema node in which no object requires anything and `$ref`s point to the
    partial copies (`renames`)."""
    if isinstance(node, dict):
        out = {k: _partial(v, renames) for k, v in node.items() if k != "required"}
        if "$ref" in out:
            name = out["$ref"].rsplit("/", 1)[-1]
            out["$ref"] = f"#/$defs/{renames.get(name, name)}"
        return out
    if isinstance(node, list):
        return [_partial(v, renames) for v in node]
    return node


def _strip_titles(node):
    if isinstance(node, dict):
        return {k: _strip_titles(v) for k, v in node.items()
                if not (k == "title" and isinstance(v, str))}
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def build_schema() -> dict:
    generated = _strip_titles(TypeAdapter(_ConfigFile).json_schema(ref_template="#/$defs/{model}"))
    defs, props = generated["$defs"], generated["properties"]
    workflow = defs.pop("WorkflowSpec")
    defs.pop("ExperimentSpec", None)
    sections = ("TrainingSpec", "RuntimeSpec")
    reachable = _reachable(defs, sections)
    renames = {name: f"Partial{name}" for name in reachable}
    for name in reachable:
        defs[renames[name]] = _partial(defs[name], renames)
    experiment = {
        "type": "object",
        "description": "seeds, and any keys of `training` this experiment changes; `runtime` any of its keys",
        "required": ["seeds"],
        "properties": {"seeds": props["seeds"], "runtime": {"$ref": "#/$defs/PartialRuntimeSpec"},
                       **defs["PartialTrainingSpec"]["properties"]},
        "additionalProperties": False,
    }
    top = {k: v for k, v in workflow["properties"].items() if k != "experiments"}
    top["training"] = {"$ref": "#/$defs/TrainingSpec"}
    top["runtime"] = {"$ref": "#/$defs/RuntimeSpec"}
    top["experiments"] = {"type": "object", "minProperties": 1, "propertyNames": props["experiment_name"],
                          "additionalProperties": experiment}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "cifar-ensembles configuration (config.yaml documents every key)",
        "type": "object",
        "additionalProperties": False,
        "required": [k for k in workflow["required"] if k != "experiments"] + ["training", "runtime",
                                                                               "experiments"],
        "properties": top,
        "$defs": dict(sorted(defs.items())),
    }


def _reachable(defs: dict, roots) -> list[str]:
    """Names of the $defs that `roots` refer to, directly or through others, roots included."""
    seen, todo = [], list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        todo += [ref.rsplit("/", 1)[-1] for ref in _refs(defs[name])]
    return sorted(seen)


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def schema_text() -> str:
    return HEADER + yaml.safe_dump(copy.deepcopy(build_schema()), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(schema_text())
