"""Frozen dataclasses from JSON-like data, checked field by field, with one-line errors.

One mechanism serves the config (`spec`), the files the workflow writes and reads back
(`formats`) and the stage arguments of the command line: every field must be present,
no unknown key is accepted, every value has the annotated type, and every number is
finite. A problem raises `UserError` naming the dotted path of the field
(`experiments.a.optimizer.lr: expected a finite number, got nan`), prefixed by `where`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from functools import cache
from typing import Any, Literal, TypeVar, Union

from .errors import UserError

T = TypeVar("T")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


@cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "text"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """The value does not have the type (the caller tries the next union member or reports)."""


def _scalar(tp, value, path: str):
    """None, bool, int (not bool), float (finite; ints accepted) or str."""
    ok = {type(None): value is None, bool: isinstance(value, bool), str: isinstance(value, str),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}[tp]
    if not ok:
        raise _Mismatch
    if tp is float:
        if not math.isfinite(value):
            raise UserError(f"{path}: expected a finite number, got {value}")
        return float(value)
    return value


def _sequence(origin, args, value, path: str):
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise UserError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(from_data(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [from_data(item, v, _join(path, i)) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _choice(origin, args, value, path: str):
    """A Literal (type-exact: True is not 1) or a union (the first member that fits)."""
    if origin is Literal:
        if any(type(value) is type(option) and value == option for option in args):
            return value
        raise _Mismatch
    for option in args:
        try:
            return _convert(option, value, path)
        except _Mismatch:
            continue
    raise _Mismatch


def _convert(tp, value, path: str):
    """`value` as an instance of `tp`; raises _Mismatch (wrong type) or UserError (a field inside)."""
    if tp is Any:
        return value
    if tp in (type(None), bool, int, float, str):
        return _scalar(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Literal, Union, types.UnionType):
        return _choice(origin, args, value, path)
    if origin in (list, tuple):
        return _sequence(origin, args, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key_type, value_type = args if args else (Any, Any)
        return {from_data(key_type, k, path): from_data(value_type, v, _join(path, str(k)))
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _dataclass(tp, value, path)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise TypeError(f"typed: unsupported annotation {tp!r}")


def _dataclass(cls, mapping: dict, path: str):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in mapping if k not in names]
    if unknown:
        raise UserError(f"{_join(path, str(unknown[0]))}: unknown key (allowed: {', '.join(names)})")
    hints = _hints(cls)
    values = {}
    for name in names:
        if name not in mapping:
            raise UserError(f"{_join(path, name)}: missing")
        values[name] = from_data(hints[name], mapping[name], _join(path, name))
    return cls(**values)


def from_data(tp: type[T], value, path: str = "") -> T:
    """`value` (parsed JSON/YAML) checked against the annotation `tp`; see the module docstring."""
    try:
        return _convert(tp, value, path)
    except _Mismatch:
        plain = isinstance(value, (str, int, float, bool, type(None)))
        shown = json.dumps(value) if plain else type(value).__name__
        raise UserError(f"{path or 'value'}: expected {_describe(tp)}, got {shown}") from None


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
