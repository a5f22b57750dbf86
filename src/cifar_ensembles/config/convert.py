"""Frozen dataclasses from JSON-like data and back, checked by pydantic, with one-line errors.

The types and bounds are the dataclasses' own annotations (`Annotated[float, Field(gt=0)]`);
pydantic checks them, and the config's JSON schema is generated from the same annotations
(`config.schema`). One mechanism serves the config, the files the workflow reads back and
the command line's arguments:
- Everything is checked in pydantic's strict JSON mode: every field present, no unknown key,
  no text where a number belongs, no `true` where an integer belongs, every number finite;
  lists become tuples where the annotation says so.
- Values JSON cannot carry (the tensors of model and checkpoint files) stand in as markers
  while the rest is checked, and are accepted only where the annotation is `Any`.
A problem raises `UserError` naming the dotted path of the field
(`experiments.a.optimizer.lr: expected a number greater than 0, got -1`), prefixed by `path`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from functools import cache
from typing import Any, TypeVar

from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError

from ..errors import UserError

T = TypeVar("T")

# Every spec and record: unknown keys are errors, numbers must be finite.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def spec(cls: type[T]) -> type[T]:
    """A frozen dataclass whose fields pydantic checks with `STRICT`."""
    cls.__pydantic_config__ = STRICT
    return dataclasses.dataclass(frozen=True)(cls)


def did_you_mean(word, choices) -> str:
    """"; did you mean 'x'?" for the choice closest to a misspelt `word`, else nothing."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class UnknownKey(UserError):
    """A key no field has; `check` turns keys of earlier releases into where they live now."""

    def __init__(self, path: str, key: str, allowed: list[str]):
        self.path, self.key, self.allowed = path, key, allowed
        super().__init__(f"{join(path, key)}: unknown key{did_you_mean(key, allowed)} "
                         f"(allowed: {', '.join(allowed)})")


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


@cache
def _adapter(tp) -> TypeAdapter:
    return TypeAdapter(tp)


def _type_at(tp, loc: tuple):
    """The annotation that `loc` (a pydantic error location) points to, below `tp`."""
    for part in loc:
        tp = _step(tp, part)
    return tp


def _field_names(tp, loc: tuple) -> list[str]:
    """The field names of the dataclass that `loc` points into."""
    tp = _type_at(tp, loc)
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []


def _options(tp) -> tuple:
    """The values a Literal annotation (possibly Annotated or Optional) allows."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return tuple(o for a in typing.get_args(tp) if a is not type(None) for o in _options(a))


def _hint(kind: str, value, options: tuple) -> str:
    """What the user most likely meant: a close choice, or a number YAML read as text."""
    if kind == "literal_error" and isinstance(value, str):
        return did_you_mean(value, options)
    if kind in ("float_type", "int_type") and isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", text):  # YAML 1.1 wants a dot: 1.0e-4
            return f" (YAML reads {text} as text; write {text.replace('e', '.0e').replace('E', '.0E')})"
        if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
            return " (a number in quotes is text; drop the quotes)"
    return ""


def _step(tp, part):
    """The type one location step below `tp` (a field, a list index or a dict key)."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        return _step(args[0], part)
    if dataclasses.is_dataclass(tp) and isinstance(part, str):
        return typing.get_type_hints(tp, include_extras=True).get(part, Any)
    if typing.get_origin(tp) in (list, tuple) and args:
        return args[0] if len(args) == 1 or args[-1] is Ellipsis else args[min(int(part), len(args) - 1)]
    if typing.get_origin(tp) is dict and len(args) == 2:
        return args[1]
    return Any


def _shown(value) -> str:
    if isinstance(value, str) and value.startswith(OPAQUE):
        return value.rsplit(":", 1)[-1]  # the type of a value JSON cannot carry
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        return repr(value)  # nan, inf: what YAML and Python call them, not JSON's NaN
    plain = isinstance(value, (str, int, float, bool, type(None)))
    return json.dumps(value) if plain else type(value).__name__


TYPE_WORDS = {  # pydantic's error type -> what the field expects
    "float_type": "a finite number", "float_parsing": "a finite number", "finite_number": "a finite number",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "text",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping",
    "dataclass_exact_type": "a mapping",
}
BOUNDS = {  # pydantic's error type -> (its context key, how a value misses it)
    "greater_than": ("gt", "is less than or equal to the minimum of"),
    "greater_than_equal": ("ge", "is less than the minimum of"),
    "less_than": ("lt", "is greater than or equal to the maximum of"),
    "less_than_equal": ("le", "is greater than the maximum of"),
}


def _problem(kind: str, value, ctx: dict, options: tuple, msg: str) -> str:
    """What is wrong with `value`, in the words of the rest of the project's errors."""
    if kind in TYPE_WORDS:
        return f"expected {TYPE_WORDS[kind]}, got {_shown(value)}{_hint(kind, value, options)}"
    if kind in BOUNDS:
        key, words = BOUNDS[kind]
        return f"{value!r} {words} {ctx[key]!r}"
    if kind == "literal_error":
        return f"{value!r} is not one of {list(options)!r}{_hint(kind, value, options)}"
    if kind == "string_pattern_mismatch":
        return f"{value!r} does not match {ctx['pattern']!r}"
    if kind == "unique":
        return f"{value!r} has non-unique elements"
    if kind in ("too_long", "too_short") and isinstance(value, (list, tuple)):
        if ctx.get("min_length") == ctx.get("max_length") or kind == "too_long" and "min_length" not in ctx:
            return f"expected {ctx.get('max_length', ctx.get('min_length'))} values, got {len(value)}"
        bound = f"at least {ctx['min_length']}" if kind == "too_short" else f"at most {ctx['max_length']}"
        return f"expected {bound} value(s), got {len(value)}"
    if kind == "string_too_short":
        return f"expected non-empty text, got {_shown(value)}"
    return f"{msg[:1].lower()}{msg[1:]}, got {_shown(value)}"


def _message(tp, error: dict, path: str) -> UserError:
    loc = tuple(error["loc"])
    where = path_of(path, loc) or "value"
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return UnknownKey(path_of(path, loc[:-1]), str(loc[-1]), _field_names(tp, loc[:-1]))
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return UserError(f"{where}: missing")
    options = _options(_type_at(tp, loc)) if kind == "literal_error" else ()
    problem = _problem(kind, error.get("input"), error.get("ctx") or {}, options, error["msg"])
    return UserError(f"{where}: {problem}")


def path_of(path: str, loc: tuple) -> str:
    for part in loc:
        path = join(path, part)
    return path


OPAQUE = "\x00opaque:"  # stands in for a value JSON cannot carry (a tensor) while checking


def _to_json_like(value, opaque: list):
    """`value` with every leaf JSON cannot carry (tensors, arrays, dates) replaced by a marker
    that indexes `opaque`: the rest is then checked as strictly as any JSON."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json_like(v, opaque) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json_like(v, opaque) for k, v in value.items()}
    opaque.append(value)
    return f"{OPAQUE}{len(opaque) - 1}:{type(value).__name__}"


def _restore(obj, opaque: list):
    """The checked object with the markers replaced by the values they stand for (only fields
    typed `Any` can still hold one)."""
    if isinstance(obj, str) and obj.startswith(OPAQUE):
        return opaque[int(obj[len(OPAQUE):].split(":", 1)[0])]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            restored = _restore(value, opaque)
            if restored is not value:
                object.__setattr__(obj, f.name, restored)  # frozen: set once, before anyone sees it
        return obj
    if isinstance(obj, dict):
        return {k: _restore(v, opaque) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_restore(v, opaque) for v in obj)
    return obj


def from_data(tp: type[T], value, path: str = "") -> T:
    """`value` (parsed JSON/YAML, or a torch file's dict) checked against `tp`; the first
    problem raises UserError naming its field (see the module docstring). Values JSON cannot
    carry (tensors) pass only where the annotation is `Any`."""
    try:
        adapter = _adapter(tp)
    except PydanticUserError as err:  # a type pydantic cannot check: a programming error
        raise TypeError(f"convert: unsupported annotation {tp!r}: {err}") from None
    opaque: list = []
    text = json.dumps(_to_json_like(value, opaque), allow_nan=True)
    try:
        checked = adapter.validate_json(text, strict=True)
    except ValidationError as err:
        raise _message(tp, err.errors(include_url=False)[0], path) from None
    return _restore(checked, opaque) if opaque else checked


def to_data(obj) -> Any:
    """Plain JSON-like data (dicts, lists, numbers, text) of a dataclass instance."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj


def to_json(obj) -> str:
    """Compact, key-sorted JSON of a dataclass: the same spec always gives the same text."""
    return json.dumps(to_data(obj), sort_keys=True, separators=(",", ":"))


def from_json(tp: type[T], text: str, path: str = "") -> T:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path or 'value'}: not valid JSON ({err})") from None
    return from_data(tp, value, path)
