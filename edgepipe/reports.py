"""Typed stage reports: dataclasses a stage fills, which become plain JSON in the manifest and
come back from it with `from_dict`. Readers use attributes, never string keys."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar

from edgepipe.errors import InputError

R = TypeVar("R", bound="Report")


def optional(default: Any = None) -> Any:
    """A field written to JSON only when it is set (keys a record did not always have)."""
    return dataclasses.field(default=default, metadata={"omit_if_none": True})


@dataclasses.dataclass
class Report:
    """Base of every stage report. Subclasses are dataclasses; nested reports and lists of them
    convert both ways. A record from an older run that lacks a field with a default loads."""

    stage: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any] | None) -> R:
        if not isinstance(data, dict):
            raise InputError(f"a {cls.stage or cls.__name__} record must be a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _typed(hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(f"the {cls.stage or cls.__name__} record has no '{f.name}': it was written "
                                 "by another edgepipe version; run the stage again")
        return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, Report):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(hint: Any, value: Any) -> Any:
    """`value` (plain JSON) as `hint` says: nested reports and lists of them are rebuilt."""
    if value is None:
        return None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), Any)
    if isinstance(hint, type) and issubclass(hint, Report):
        return hint.from_dict(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [_typed(item, v) for v in value]
    return value
