"""YAML + dotted command-line overrides -> :class:`RunConfig`, with errors that name the field."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from care_megatron.config.schema import RunConfig

# Scientific notation as people type it (1e-3, 1E5, 3e+2, 2.5e-4). PyYAML follows YAML 1.1, whose
# float pattern needs a dot and a signed exponent, so it reads ``1e-3`` as the string "1e-3".
_SCIENTIFIC = r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+"
# Any plain decimal number (typed fields also accept numbers that reached them as strings, e.g. quoted).
_DECIMAL = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?")


class ConfigYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves scientific notation without a dot or exponent sign to a
    float (YAML 1.2's reading), in config files and in command-line override values alike."""


ConfigYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_SCIENTIFIC})$"),
                                       list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text the way config files and override values are read (see :class:`ConfigYamlLoader`)."""
    return yaml.load(text, Loader=ConfigYamlLoader)


def _number_from_text(value: str) -> int | float | None:
    """The number a string spells (``"1e-3"``, ``" 7 "``), int when it has no dot or exponent; else None."""
    text = value.strip()
    if not _DECIMAL.fullmatch(text):
        return None
    if re.fullmatch(r"[-+]?[0-9][0-9_]*", text):
        return int(text)
    return float(text)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML / CLI value to a field's declared type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], name) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config field '{name}': expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config field '{name}': expected true/false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):  # e.g. a quoted "1e-3" in a YAML file
        number = _number_from_text(value)
        value = value if number is None else number
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"config field '{name}': expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config field '{name}': expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            value = str(value)
        return value
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"config field '{prefix}{sorted(unknown)[0]}': unknown field; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        ann = hints[f.name]
        if dataclasses.is_dataclass(ann):
            sub = data[f.name] or {}
            if not isinstance(sub, dict):
                raise ValueError(f"config field '{prefix}{f.name}': expected a mapping")
            kwargs[f.name] = _build(ann, sub, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], ann, prefix + f.name)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"config field '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=5", "algorithm.name=grpo"]`` -> nested dict (values parsed as YAML scalars)."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), load_yaml(raw) if raw != "" else "")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "care" else v
        if k == "care" and isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = {**base[k], **v}
    return out


BASE_KEY = "base"
"""Top-level key of a config file naming the file(s) it extends (paths relative to that file)."""


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The sections of YAML file ``path``, with its ``base:`` files (one path or a list) merged under it.

    Bases are merged in order, each with its own bases first, then the file's own sections on top,
    so a per-method recipe can be a few lines over a per-model base. A cycle is an error naming the files.
    """
    path = Path(path).resolve()
    if path in _chain:
        raise ValueError(f"config file {path}: 'base' includes form a cycle: {' -> '.join(map(str, (*_chain, path)))}")
    data = load_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping of sections")
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"config file {path}: '{BASE_KEY}' must be a path or a list of paths")
    merged: dict = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ValueError(f"config file {path}: base {base!r} not found (looked for {base_path})")
        merged = _merge(merged, read_config_file(base_path, (*_chain, path)))
    return _merge(merged, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML, with its ``base:`` files; None = all defaults), apply dotted ``overrides``,
    validate, return."""
    data: dict = {}
    if path is not None:
        data = read_config_file(path)
    data = _merge(data, parse_overrides(overrides or []))
    return _build(RunConfig, data, "")


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
