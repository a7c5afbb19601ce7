"""TOML files + `section.key=value` overrides -> validated dataclasses, with errors that name the fix."""

from __future__ import annotations

import ast
import importlib
import dataclasses
import inspect
import textwrap
import tomllib
from pathlib import Path
from collections.abc import Callable
from typing import Any, get_type_hints

from hybridlm.errors import UserError


def import_callable(spec: str, setting: str) -> Callable:
    """The function a `package.module:function` setting names (a reward function, a safety classifier),
    or a UserError naming the setting and what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{setting} {spec!r} must be module:function (e.g. mypkg.rewards:exact_match)")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{setting} {spec!r} cannot be imported ({type(exc).__name__}: {exc}); "
                        "put the module on the Python path") from None
    if not callable(function):
        raise UserError(f"{setting} {spec!r} is not callable")
    return function


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
            raise UserError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-4)")
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


def check_positive(section: str, **values: float) -> None:
    """Raise UserError naming the first `section.key` that is not > 0."""
    for name, value in values.items():
        if value <= 0:
            raise UserError(f"{section}.{name} must be > 0 (got {value})")


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


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (Python keeps none at run time,
    so they are read from the class's source), one line each."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for field_node, after in zip(body, body[1:]):
        if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field_node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_fields(cls: type) -> list[dict]:
    """[{key, type, default, doc}] for every field of dataclass `cls`, defaults as TOML would read them."""
    docs, hints = field_docs(cls), get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append({"key": f.name, "type": getattr(hints[f.name], "__name__", str(hints[f.name])),
                     "default": default, "doc": docs.get(f.name, "")})
    return rows


def toml_value(value: Any) -> str:
    """`value` written as TOML reads it (what an override or a config file would say)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)
