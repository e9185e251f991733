"""Nested dataclass configs from YAML files and dotted `--set key=value` overrides.

One configuration system for the whole project: every component has a small `kw_only` dataclass; a run's config is a
tree of them. This module turns a YAML mapping into that tree with strict checking (unknown keys and wrong types are
errors that name the key and the file), applies `a.b.c=value` overrides (values parsed as YAML, so `true`, `3`,
`1e-4`, `[1, 2]` and `null` mean what they look like), and writes the resolved tree back as YAML.

Validation of values lives in each dataclass's `__post_init__`; it runs again after overrides because the tree is
rebuilt from the merged mapping.

A section with moved keys declares them as `MOVED_KEYS: ClassVar[dict[str, str]]` (the moved key: its dotted
path within the section, e.g. `{"beam_size": "search.beam_size"}`). Files and overrides that use a moved key load:
the value is read at its path, with a logged warning naming both keys; a setting given under both keys is an error
naming both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key (and file)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {_type_name(tp)}")


def _moved_keys(cls: Any) -> Mapping[str, str]:
    return (getattr(cls, "MOVED_KEYS", None) or {}) if dataclasses.is_dataclass(cls) else {}


def _section_type(tp: Any) -> Any:
    """The dataclass inside an annotation (`X` or `Optional[X]`), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def _move_keys(cls: Any, data: Mapping[str, Any], prefix: str, warn: bool = True) -> Mapping[str, Any]:
    """`data` (a mapping for section `cls`) with its moved keys (`cls.MOVED_KEYS`) at their paths
    (logged when `warn`)."""
    moved = _moved_keys(cls)
    if not any(old in data for old in moved):
        return data
    out = dict(data)
    for old, new in moved.items():
        if old not in data:
            continue
        *parents, leaf = new.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"{prefix}{old} belongs in the section {prefix}{new}, but {prefix}{part} is "
                                  f"{child!r}, not a mapping")
            child = node[part] = dict(child)
            node = child
        if leaf in node:
            raise ConfigError(f"{prefix}{old} and {prefix}{new} are the same setting, given twice: keep "
                              f"{prefix}{new} only")
        node[leaf] = out.pop(old)
        if warn:
            log.warning("config key %s%s is now %s%s: read as that (rename it in the config)", prefix, old, prefix,
                        new)
    return out


def upgrade_keys(cls: type, data: Mapping[str, Any], prefix: str = "", *, warn: bool = True) -> dict[str, Any]:
    """A config mapping for `cls` with the moved keys of every section at their paths (see the module
    docstring; logged when `warn`); everything else as it is."""
    out = dict(_move_keys(cls, data, prefix, warn))
    hints = typing.get_type_hints(cls)
    for name, value in out.items():
        section = _section_type(hints.get(name))
        if section is not None and isinstance(value, Mapping):
            out[name] = upgrade_keys(section, value, f"{prefix}{name}.", warn=warn)
    return out


def same_config(cls: type, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two config mappings for `cls` say the same, moved keys read at their paths (e.g. a saved
    run's config against the one a script writes)."""
    return upgrade_keys(cls, a, warn=False) == upgrade_keys(cls, b, warn=False)


def upgrade_override(cls: type, item: str) -> str:
    """A dotted `--set key=value` override for `cls` with a moved key rewritten to its path (logged)."""
    path, _ = parse_override(item)
    new_path, tp = [], cls
    for i, part in enumerate(path):
        moved = _moved_keys(tp)
        parts = moved[part].split(".") if part in moved else [part]
        for p in parts:
            new_path.append(p)
            tp = _section_type(typing.get_type_hints(tp).get(p)) if tp is not None else None
        if tp is None:
            new_path.extend(path[i + 1:])
            break
    if new_path == path:
        return item
    old, new = ".".join(path), ".".join(new_path)
    log.warning("--set %s: the key is now %s: read as that (rename it in the command)", old, new)
    return new + item[item.index("="):]


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and bad types raise ConfigError. Moved keys of the
    section (`cls.MOVED_KEYS`) are read at their paths, with a warning."""
    data = _move_keys(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"{cls.__name__} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        where = prefix.rstrip(".") or cls.__name__
        message = str(e)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass tree to plain YAML-able Python values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set train.steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested mapping (copied); missing intermediate mappings are created."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    """Read `cls` from an optional YAML file plus dotted overrides; errors name the file. Moved keys (in the file or
    the overrides) are read at their paths, with a warning."""
    where = f"{path}: " if path is not None else ""
    data = load_yaml(path) if path is not None else {}
    try:
        data = upgrade_keys(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from e
    data = apply_overrides(data, [upgrade_override(cls, item) for item in overrides])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from e


def dump_yaml(obj: Any, path: str | os.PathLike) -> None:
    """Write a config tree atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(to_dict(obj), f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
