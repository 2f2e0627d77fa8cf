"""Typed loading: parsed YAML/JSON values checked against, and converted to, dataclass annotations.

``load(annotation, value)`` walks nested dataclasses, ``X | None``, ``dict[str, X]``, ``list[X]``,
``tuple[X, ...]``, ``Any`` and the scalars int, float, str and bool. A value that does not fit raises
a ``LoadError`` saying where it is (``path``) and what is wrong with it; the caller words it for its
readers (the config as ``config error in train.steps: ...``, the database manifest naming its file and
how to rebuild). Errors a dataclass raises itself (its ``__post_init__`` checks) pass through as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

AS_IS: Mapping[str, Any] = types.MappingProxyType({"typed.as_is": True})
"""Field metadata (``field(..., metadata=AS_IS)``): ``load`` passes the field's value through unchecked,
for a field whose dataclass checks (and normalises) the value itself."""


def where(path: tuple[str, ...], items: bool = True) -> str:
    """A path as text: ``splits[train][0].shard``; with ``items=False`` only the field names
    (``model.cca_layers`` for an element of that list). Empty at the top."""
    text = ""
    for part in path:
        if part.startswith("["):
            text += part if items else ""
        else:
            text += f".{part}" if text else part
    return text


class LoadError(Exception):
    """A value that does not fit its annotation. ``path`` leads to it from the top: field names and
    ``[key]`` / ``[index]`` items, e.g. ``("splits", "[train]", "[0]", "shard")``."""

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.path = path

    def where(self, items: bool = True) -> str:
        """The path as text (see ``where``)."""
        return where(self.path, items)


class WrongType(LoadError):
    """A value of the wrong type; ``expected`` is one of ``an integer``, ``a number``, ``a string``,
    ``true or false``, ``a list``, ``a mapping``."""

    def __init__(self, path: tuple[str, ...], value: Any, expected: str) -> None:
        super().__init__(path, f"{where(path) or 'the value'} should be {expected}, not {value!r}")
        self.value = value
        self.expected = expected


class UnknownKeys(LoadError):
    """A mapping with keys its dataclass does not have: ``unknown`` (sorted, each with the mapping's
    path in front, ``train.stpes``) and the ``known`` field names (sorted)."""

    def __init__(self, path: tuple[str, ...], unknown: list[str], known: list[str]) -> None:
        super().__init__(path, f"unknown key(s) {unknown}; known keys: {known}")
        self.unknown = unknown
        self.known = known


class MissingKey(LoadError):
    """A mapping that lacks a field without a default; ``path`` ends with the field's name."""

    def __init__(self, path: tuple[str, ...]) -> None:
        super().__init__(path, f"missing key {where(path)}")


_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def load(
    annotation: Any,
    value: Any,
    *,
    convert_numbers: bool = False,
    allow_null: bool = False,
    path: tuple[str, ...] = (),
) -> Any:
    """``value`` checked against ``annotation`` and built into it (dataclasses from mappings, tuples
    from lists); LoadError naming where when it does not fit.

    ``convert_numbers`` (for YAML): an int field takes a whole float (``2.0`` -> 2), a float field an int
    (converted) or a numeric string (YAML 1.1 reads ``1e-3`` as one); without it numbers stay as read.
    ``allow_null``: ``X | None`` takes None; without it None stands only for an absent key, so a null
    is refused. A mapping must hold every field without a default and no other key."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and allow_null and type(None) in args:
            return None
        errors: list[LoadError] = []
        for arg in args:
            if arg is not type(None):
                try:
                    return load(arg, value, convert_numbers=convert_numbers, allow_null=allow_null, path=path)
                except LoadError as exc:
                    errors.append(exc)
        raise errors[0]

    def inner(item: Any, item_value: Any, part: str) -> Any:
        return load(
            item, item_value, convert_numbers=convert_numbers, allow_null=allow_null, path=(*path, part)
        )

    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise WrongType(path, value, "a mapping")
        hints, fields = _fields(annotation)
        unknown = sorted(set(value) - set(fields))
        if unknown:
            prefix = f"{where(path)}." if path else ""
            raise UnknownKeys(path, [f"{prefix}{key}" for key in unknown], sorted(fields))
        kwargs = {}
        for name, field in fields.items():
            if name not in value:
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    raise MissingKey((*path, name))
            elif field.metadata.get("typed.as_is"):
                kwargs[name] = value[name]
            else:
                kwargs[name] = inner(hints[name], value[name], name)
        return annotation(**kwargs)
    if origin is dict:
        if not isinstance(value, dict):
            raise WrongType(path, value, "a mapping")
        return {k: inner(args[1], v, f"[{k}]") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise WrongType(path, value, "a list")
        return [inner(args[0], v, f"[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise WrongType(path, value, "a list")
        return tuple(inner(args[0], v, f"[{i}]") for i, v in enumerate(value))
    return _scalar(annotation, value, convert_numbers, path)


def _scalar(annotation: Any, value: Any, convert_numbers: bool, path: tuple[str, ...]) -> Any:
    if annotation not in _SCALARS:
        raise TypeError(f"typed.load cannot load {annotation!r} (at {where(path) or 'the top'})")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    if annotation is int and number:
        if isinstance(value, int):
            return value
        if convert_numbers and value.is_integer():
            return int(value)
    if annotation is float:
        if number:
            return float(value) if convert_numbers else value  # as read: JSON written back is the same
        if convert_numbers and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    raise WrongType(path, value, _SCALARS[annotation])


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """A dataclass's resolved annotations and its fields by name (computed once per class)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
