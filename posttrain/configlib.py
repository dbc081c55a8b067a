"""Typed, validated configuration from YAML with dotted command-line overrides.

Every component's config is a frozen dataclass whose fields carry a `doc` (see `field_doc`). `build(cls, data)`
turns a plain mapping into that dataclass, checking unknown keys, types, required values and each class's own
`check()`; every error names the file, the dotted key path, what was given and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid config."""


def field_doc(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation (shown by `posttrain config show --doc`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply `a.b.0.c=value` overrides (values parsed as YAML) to a copy of `data`."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _step_into(node, part, parts[: i + 1], source, create=True)
        _assign(node, parts[-1], value, key, source)
    return data


def _step_into(node: Any, part: str, trail: list[str], source: str, create: bool) -> Any:
    where = ".".join(trail)
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{source}: {where}: index {part!r} out of range (the list has {len(node)} items)")
        return node[int(part)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise ConfigError(f"{source}: {where}: cannot set a key inside a {type(node).__name__}")


def _assign(node: Any, part: str, value: Any, key: str, source: str) -> None:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{source}: {key}: index {part!r} out of range (the list has {len(node)} items)")
        node[int(part)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"{source}: {key}: cannot set a key inside a {type(node).__name__}")


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursively for mappings; lists and scalars are replaced."""
    out = dict(base)
    for k, v in (update or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type, data: Any, path: str = "", source: str = "recipe", partial: bool = False) -> Any:
    """Build dataclass `cls` from `data`, validating keys, types and `cls.check()`.

    With `partial`, only keys and types are checked (for defaults that later values complete) and the result is
    the converted mapping, not an instance.
    """
    return _convert(cls, data, path, source, partial)


def _fail(source: str, path: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {path or '(top level)'}: {msg}")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(tp: Any, value: Any, path: str, source: str, partial: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, path, source, partial)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, source, partial)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise _fail(source, path, f"got {_describe(value)}; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple):
        return _convert_sequence(tp, origin, value, path, source, partial)
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, path, f"expected a mapping, got {_describe(value)}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{path}.{k}", source, partial) for k, v in value.items()}
    return _convert_scalar(tp, value, path, source)


def _convert_union(tp: Any, value: Any, path: str, source: str, partial: bool) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _fail(source, path, "a value is required here, got null")
    real = [a for a in args if a is not type(None)]
    if len(real) == 1:  # Optional[X]: X's own error, with its full key path
        return _convert(real[0], value, path, source, partial)
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, path, source, partial)
        except ConfigError as e:
            errors.append(str(e).split(": ", 2)[-1])
    raise _fail(source, path, " / ".join(errors))


def _convert_sequence(tp: Any, origin: type, value: Any, path: str, source: str, partial: bool) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _fail(source, path, f"expected a list, got {_describe(value)}")
    args = typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _fail(source, path, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{path}.{i}", source, partial) for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_convert(item, v, f"{path}.{i}", source, partial) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(tp: Any, value: Any, path: str, source: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(source, path, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(source, path, f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail(source, path, f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(source, path, f"expected a string, got {_describe(value)}")
    raise _fail(source, path, f"unsupported config type {tp!r}")


def _convert_dataclass(cls: type, value: Any, path: str, source: str, partial: bool) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _fail(source, path, f"expected a mapping for {cls.__name__}, got {_describe(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise _fail(source, key, f"unknown key; allowed keys here: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], key, source, partial)
        elif partial:
            continue
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            doc = f.metadata.get("doc", "")
            raise _fail(source, key, "required value missing" + (f" ({doc})" if doc else ""))
    if partial:
        return kwargs
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            msg = str(e)
            field, _, detail = msg.partition(": ")
            if field in fields and detail:
                raise _fail(source, f"{path}.{field}" if path else field, detail) from None
            raise _fail(source, path, msg) from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass config back to plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def require(cond: bool, field: str, msg: str) -> None:
    """Raise the `field: msg` ValueError that `build` turns into a ConfigError with the full key path."""
    if not cond:
        raise ValueError(f"{field}: {msg}")
