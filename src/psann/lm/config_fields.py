"""Validated config dataclasses: each field's metadata (help, choices, range, where it applies),
the coercion of YAML/TOML/command-line values to the declared type, and the checks that run on
construction, naming the key in any error."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError, did_you_mean


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, min_exclusive: bool = False, factory: Any = None,
         only: dict[str, tuple] | None = None, only_label: str | None = None, sets: dict | None = None):
    """A field with its metadata. only={key: values}: the field applies only where `key` (of its own
    section, or given to `misplaced`) has one of `values`; set elsewhere it is an error, naming
    `only_label` (default: "key 'value'"). sets={value: {key: v}}: this value sets those keys."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "only": only or {}, "only_label": only_label, "sets": sets or {}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Validated:
    """Coerces and checks every field after construction, naming the key in any error."""

    section: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.section}.{f.name}"
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            _check_range(value, f.metadata, key)
            object.__setattr__(self, f.name, value)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for f, name in self.misplaced(**values):
            allowed = f.metadata["only"][name]
            what = f.metadata["only_label"] or f"{name} {' or '.join(map(repr, allowed))}"
            raise ConfigError(f"'{self.section}.{f.name}' only applies to {what} ({name} is {values[name]!r}); "
                              f"remove it or set {self.section}.{name}={allowed[0]}.")
        for f in dataclasses.fields(self):
            if f.metadata["sets"]:  # e.g. objective diffusion sets causal false: a denoiser sees the whole sequence
                for key, value in f.metadata["sets"].get(values[f.name], {}).items():
                    object.__setattr__(self, key, value)
        self.check()

    def check(self) -> None:
        """Cross-field checks; overridden per section."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    def changed(self, keys: typing.Iterable[str]) -> list[str]:
        """The keys among `keys` set to something other than their default (options that must not
        be given where they do not apply)."""
        defaults = self.defaults()
        return [k for k in keys if getattr(self, k) != defaults[k]]

    def misplaced(self, **context: Any) -> list[tuple[dataclasses.Field, str]]:
        """(field, key) of each field set away from its default although its `only` metadata says it
        does not apply at context[key] (e.g. a wave_* key when base is not waveresnet)."""
        return [(f, key) for f in dataclasses.fields(self) for key, values in f.metadata["only"].items()
                if key in context and context[key] not in values and self.changed([f.name])]

    @classmethod
    def check_keys(cls, keys: typing.Iterable[str]) -> None:
        """Unknown keys are errors that suggest the closest valid one."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in keys:
            if key not in names:
                raise ConfigError(f"unknown key '{cls.section}.{key}'.{did_you_mean(key, names)} "
                                  f"Valid keys of '{cls.section}': {', '.join(names)}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise ConfigError(f"section '{cls.section}' must be a mapping of keys to values, got {type(values).__name__}.")
        cls.check_keys(values)
        return cls(**values)


def plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"'{key}' may not be empty.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"'{key}' must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                parsed = float(value.replace("_", ""))
            except ValueError:
                parsed = math.nan
            if parsed.is_integer():
                return int(parsed)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 3e-4 as a string; accept it
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"'{key}' must be a number, got {value!r}.")
        return _finite(number, key)
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {value!r}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{key}' must have {len(args)} items, got {len(value)}.")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}.")
        for name, item in value.items():
            if isinstance(item, float):
                _finite(item, f"{key}.{name}")
        return dict(value)
    raise ConfigError(f"'{key}': unsupported type {_type_name(tp)}")  # pragma: no cover - a bug in this file


def _finite(number: float, key: str) -> float:
    """nan and inf pass every range check (nan compares false), so they are refused by name."""
    if not math.isfinite(number):
        raise ConfigError(f"'{key}' must be a finite number, got {number}.")
    return number


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"'{key}' must be one of {', '.join(map(str, choices))}; got {value!r}."
                          f"{did_you_mean(str(value), map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"'{key}' must be {op} {lo}, got {value}.")
        if hi is not None and value > hi:
            raise ConfigError(f"'{key}' must be <= {hi}, got {value}.")
