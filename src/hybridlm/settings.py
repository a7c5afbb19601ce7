"""TOML files + `section.key=value` overrides -> validated dataclasses, with errors that name the fix."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

from hybridlm.errors import UserError


def load_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """Set `section.key=value` pairs in a nested dict; values parse as TOML, else as strings."""
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in doc.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
        *sections, leaf = key.strip().split(".")
        target = doc
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise UserError(f"override {item!r}: {section!r} is a value, not a section")
        target[leaf] = _parse_value(raw.strip())
    return doc


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def checked_kwargs(cls: type, values: dict, section: str, extra: dict[str, type] | None = None) -> dict:
    """`values` as keyword arguments for dataclass `cls`, rejecting unknown keys and wrong types."""
    hints = {f.name: get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)} | (extra or {})
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"unknown {section} key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(hints))}")
    return {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}


def build(cls: type, values: dict, section: str) -> Any:
    """Instantiate dataclass `cls` from `values` (validated by its __post_init__)."""
    return cls(**checked_kwargs(cls, values, section))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and (hint is bool or not isinstance(value, bool))):
        raise UserError(f"{name} must be {hint.__name__} (got {value!r})")
    return value
