"""Typed conversion of plain YAML values into dataclasses, and dotted `key=value` overrides.

Generic: it knows dataclasses, lists, dicts, `Literal` choices, scalars and numeric bounds
declared with `Annotated` (`alpha: Annotated[float, Between(0, 1)] = 0.9`), nothing about jobs.
Every error is a `RaykdError` that names the dotted path of the offending field and what is
allowed there, so the CLI can print it as one line.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from raykd.errors import RaykdError


@dataclasses.dataclass(frozen=True)
class Bound:
    """The range a number must lie in, declared on a field as `Annotated[float, Positive]`,
    `Annotated[int, AtLeast(1)]`, `Annotated[float, Between(0, 1)]`; `None` leaves that side
    open-ended. `note` is said after the bound (`must be >= 0 (0 turns it off)`)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False       # the bound itself excluded
    high_open: bool = False
    note: str = ""

    def holds(self, value) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def noting(self, note: str) -> Bound:
        return dataclasses.replace(self, note=note)

    def __str__(self) -> str:
        if self.high is None:
            if self.low == 0:
                return "positive" if self.low_open else ">= 0"
            return f"{'above' if self.low_open else 'at least'} {self.low}"
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {self.high}"
        return (f"in {'(' if self.low_open else '['}{self.low}, "
                f"{self.high}{')' if self.high_open else ']'}")

    def check(self, value, path: str):
        if value is not None and not self.holds(value):
            note = f" ({self.note})" if self.note else ""
            raise RaykdError(f"{path} must be {self}{note}, got {value}")
        return value


Positive = Bound(low=0, low_open=True)
NonNegative = Bound(low=0)


def AtLeast(low: float) -> Bound:   # capitalised: reads as a marker, like Positive
    return Bound(low=low)


def Between(low: float, high: float, high_open: bool = False) -> Bound:
    return Bound(low=low, high=high, high_open=high_open)


def choices(tp) -> tuple | None:
    """The allowed values of a `Literal[...]` type (None for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choice(value, allowed, path: str):
    if value not in allowed:
        raise RaykdError(f"{path}: unknown {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def convert(tp, value, path: str):
    """Convert a YAML value to the annotated type, or raise RaykdError naming `path`."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *marks = typing.get_args(tp)
        value = convert(inner, value, path)
        for mark in marks:
            if isinstance(mark, Bound):
                mark.check(value, path)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], value, path)
        # several kinds (`int | list[int]`): the first that takes the value; else the error of
        # the one the value's own kind (a list, a mapping, a scalar) was meant for
        errors = []
        for option in inner:
            try:
                return convert(option, value, path)
            except RaykdError as e:
                errors.append((option, e))
        container = {list: (list, tuple), dict: (dict,)}
        meant = [e for option, e in errors
                 if isinstance(value, container.get(typing.get_origin(option), ()))]
        raise (meant or [e for _, e in errors])[0]
    allowed = choices(tp)
    if allowed is not None:
        return check_choice(value, allowed, path)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RaykdError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RaykdError(f"{path}: expected a list, got {value!r}")
        return [convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RaykdError(f"{path}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        if item is Any:
            return {str(k): (v if v is not None else {}) for k, v in value.items()}
        return {str(k): convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    return _scalar(tp, value, path)


def _scalar(tp, value, path: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RaykdError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RaykdError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RaykdError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RaykdError(f"{path}: expected a string, got {value!r}")
    raise TypeError(f"unsupported field type {tp} at {path}")


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are RaykdErrors."""
    hints = typing.get_type_hints(cls, include_extras=True)   # keeps Annotated bounds
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    where = f"{path}." if path else ""
    if unknown:
        raise RaykdError(
            f"unknown key {where}{unknown[0]!s}; allowed under {path or 'the job'}: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in data]
    if required:
        raise RaykdError(f"{path or 'the job'}: missing {required[0]}")
    kwargs = {k: convert(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RaykdError(f"override {text!r} is not key=value (e.g. student.train.epochs=5)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RaykdError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        if raw.lstrip()[:1] in ("[", "{"):
            raise RaykdError(f"override {text!r}: unbalanced brackets in the value "
                             "(write lists as [a, b] and mappings as {k: v})") from None
        value = raw
    return key.split("."), value


def set_key(raw: dict, keys: list[str], value, what: str) -> dict:
    """Set the nested key `keys` of mapping `raw` to `value` (sections made as needed)."""
    node = raw
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise RaykdError(f"{what}: {k} is not a section")
        node = child
    node[keys[-1]] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted `key=value` in the nested mapping `raw` (values parsed as YAML)."""
    for text in overrides:
        keys, value = parse_override(text)
        set_key(raw, keys, value, f"override {text!r}")
    return raw
