"""Reading a plan file against its schema: the Plan's own dataclasses.

A value is read through `At`, which knows where in the file it is
(`parameters["fc1.weight"][1]`), and checked against its dataclass field's
annotation as it is read (`typed`): integers are integers and not booleans,
every number is finite and not negative (sizes, seconds, counts), mappings
have string keys, sections have every field without a default and no
unknown one. Every error is a PlanError naming the path, so a damaged plan
is refused with the place to look, before anything runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

__all__ = ["At", "PlanError", "typed"]

#: the largest integer a plan holds (byte counts, nanoseconds): int64
_INT_MAX = 2**63 - 1


class PlanError(ValueError):
    """A plan file that is malformed or does not match the model or mesh."""


class At:
    """A value of the plan file and its path in the file."""

    __slots__ = ("value", "path")

    def __init__(self, value: object, path: str = "") -> None:
        self.value, self.path = value, path

    def error(self, message: str) -> PlanError:
        return PlanError(f"{self.path or 'the plan'}: {message}")

    def field(self, name: str) -> At:
        """A section's field (`cost.total_s`); missing is an error."""
        d = self.mapping()
        if name not in d:
            raise self.error(f"'{name}' is missing")
        return At(d[name].value, self._join(name))

    def get(self, name: str, default: object) -> At:
        """An optional field, `default` when absent."""
        d = self.mapping()
        return At(d[name].value if name in d else default, self._join(name))

    def mapping(self, *, allowed: set[str] | None = None) -> dict[str, At]:
        """The entries of an object; with `allowed`, refuse other keys."""
        if not isinstance(self.value, Mapping):
            raise self.error(f"{_show(self.value)} is not an object")
        out = {}
        for k, v in self.value.items():
            if not isinstance(k, str):
                raise self.error(f"key {_show(k)} is not a string")
            out[k] = At(v, f"{self.path}[{json.dumps(k)}]" if allowed is None else self._join(k))
        unknown = sorted(set(out) - allowed) if allowed is not None else []
        if unknown:
            raise self.error(f"unknown key(s) {unknown}; expected {sorted(allowed)}")
        return out

    def sequence(self) -> list[At]:
        if not isinstance(self.value, (list, tuple)):
            raise self.error(f"{_show(self.value)} is not a list")
        return [At(v, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def _join(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


def typed(at: At, annotation: object) -> Any:
    """The value at `at`, checked against a type annotation (dataclasses,
    unions with None, Mapping[str, X], tuple[X, ...], int, float, str,
    bool, object); tuples come back as tuples, sections as their class."""
    v = at.value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is object or annotation is Any:
        return v
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"cannot read a plan field of type {annotation}")
        return typed(at, others[0])
    if dataclasses.is_dataclass(annotation):
        return read_section(annotation, at)
    if origin in (Mapping, dict):
        return {k: typed(item, args[1]) for k, item in at.mapping().items()}
    if origin is tuple:
        items = at.sequence()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(typed(item, args[0]) for item in items)
        if len(items) != len(args):
            raise at.error(f"has {len(items)} item(s); expected {len(args)}")
        return tuple(typed(item, a) for item, a in zip(items, args, strict=True))
    if annotation is bool:
        if type(v) is not bool:
            raise at.error(f"{_show(v)} is not true or false")
        return v
    if annotation is str:
        if not isinstance(v, str):
            raise at.error(f"{_show(v)} is not a string")
        return v
    if annotation is int:
        if type(v) is not int or not 0 <= v <= _INT_MAX:
            raise at.error(f"{_show(v)} is not a whole number from 0 to 2**63-1")
        return v
    if annotation is float:
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise at.error(f"{_show(v)} is not a finite non-negative number")
        return float(v)
    raise TypeError(f"cannot read a plan field of type {annotation}")


def read_section(cls: type, at: At) -> Any:
    """A dataclass from an object of the plan file: each field read by its
    annotation, a field without a default required, no unknown key."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    entries = at.mapping(allowed={f.name for f in fields})
    kwargs = {}
    for f in fields:
        if f.name in entries:
            kwargs[f.name] = typed(entries[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise at.error(f"'{f.name}' is missing")
    return cls(**kwargs)


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
