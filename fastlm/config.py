"""Command lines and config files generated from dataclasses (defaults live only in the dataclass).

* :func:`add_dataclass_args` adds one ``--field-name`` flag per dataclass field (help from the field's
  ``metadata["help"]``, choices from ``metadata["choices"]``); bools become ``--flag/--no-flag``,
  ``Optional[...]`` fields accept ``none``, ``list[str]`` fields take one or more values, a field
  without a default is a required flag, and fields whose ``metadata["exclusive"]`` names the same
  group are mutually exclusive. Flags default to ``argparse.SUPPRESS``, so the parsed namespace
  holds only what the user typed; :func:`dataclass_from_args` builds the dataclass from it.
* :func:`load_config_file` reads a ``.toml`` or ``.json`` file of ``key = value`` pairs (flat, or in
  tables named after the dataclass groups, e.g. ``[model]`` / ``[train]``; dashes or underscores).
* :func:`merge_values` checks names and types (one-line :class:`ConfigFileError`) and layers
  defaults < config file < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

from fastlm.errors import ConfigFileError
from fastlm.training.settings import flag_name

__all__ = [
    "ConfigFileError",
    "add_dataclass_args",
    "dataclass_from_args",
    "load_config_file",
    "merge_values",
    "coerce",
    "field_types",
    "flag_name",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error: ...`` line (exit 2), no usage dump: the CLIs'
    convention for bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


_NONE_WORDS = ("none", "null")


def field_types(cls) -> dict:
    """Resolved type hints of a dataclass (works with ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is Union or isinstance(tp, types.UnionType):  # Optional[X] or X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_list(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    if _is_list(base):
        name = "list of strings"
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base, str(base))
    return name + (" or none" if optional else "")


def _parse_cli(tp, name: str):
    """argparse ``type=`` callable for a field type."""
    base, optional = _unwrap_optional(tp)

    def parse(text: str):
        if optional and text.strip().lower() in _NONE_WORDS:
            return None
        try:
            if base is int:
                return int(text)
            if base is float:
                val = float(text)
                return val
            return text
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag_name(name)} expects {_type_name(tp)}, got {text!r}") from None

    parse.__name__ = {int: "int", float: "float"}.get(base, "str")
    return parse


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls,
    *,
    title: Optional[str] = None,
    exclude=(),
    defaults_override: Optional[dict] = None,
) -> list[str]:
    """Add a flag per field of dataclass ``cls``; returns the field names added."""
    group = parser.add_argument_group(title or cls.__name__)
    exclusive: dict = {}  # metadata["exclusive"] -> its mutually exclusive group
    hints = field_types(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp = hints[f.name]
        base, optional = _unwrap_optional(tp)
        required = False
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default, required = None, not (defaults_override and f.name in defaults_override)
        if defaults_override and f.name in defaults_override:
            default = defaults_override[f.name]
        text = f.metadata.get("help", "")
        shown = "none" if default is None else (" ".join(default) if isinstance(default, list) else default)
        if not required and not (default in (None, []) and ("default" in text or "empty" in text)):  # help says it
            text = f"{text} (default: {shown})" if text else f"(default: {shown})"
        text = text.replace("%", "%%")
        kwargs: dict = {"default": argparse.SUPPRESS, "help": text, "dest": f.name, "required": required}
        if base is bool:  # --flag / --no-flag (an Optional[bool] left out stays None)
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(base):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = f.name.upper()
        else:
            kwargs["type"] = _parse_cli(tp, f.name)
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
            if "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"])
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        name = f.metadata.get("exclusive")
        if name is not None and name not in exclusive:
            exclusive[name] = group.add_mutually_exclusive_group()
        (group if name is None else exclusive[name]).add_argument(flag_name(f.name), **kwargs)
        added.append(f.name)
    return added


def dataclass_from_args(cls, values: dict):
    """An instance of dataclass ``cls`` from parsed flags (``vars(namespace)``: only what the user
    typed, see :func:`add_dataclass_args`); its other fields keep their defaults."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def load_config_file(path) -> dict:
    """Read a ``.toml`` or ``.json`` config file into a dict (ConfigFileError on any problem)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigFileError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"config file {path} is not UTF-8 (byte offset {e.start})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigFileError(f"config file {path}: bad JSON ({e.msg} at line {e.lineno})") from None
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ConfigFileError(
                    "reading .toml configs on Python 3.10 needs 'pip install tomli' (or use a .json config)"
                ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigFileError(f"config file {path}: bad TOML ({e})") from None
    else:
        raise ConfigFileError(f"config file {path} must end in .toml or .json")
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a table/object of settings")
    return data


def coerce(tp, value, name: str, where: str = "config"):
    """Check/convert a config-file value to a field type (ints for floats are fine, bools are not ints)."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigFileError(f"{where}: {name} must be {_type_name(tp)}, got none")
    bad = ConfigFileError(f"{where}: {name} must be {_type_name(tp)}, got {value!r}")
    if _is_list(base):
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def merge_values(groups: dict, file_data: Optional[dict], cli: dict, *, where: str = "config") -> tuple[dict, set]:
    """Layer dataclass defaults < config file < command line.

    ``groups``: ``{"model": GPTConfig, "train": TrainConfig}``; field names must be unique across
    groups (excluded names may be passed in ``cli`` only). ``file_data``: flat keys and/or tables
    named after the groups. ``cli``: ``{field: value}`` the user typed. Returns
    ``({group: {field: value}}, explicitly set field names)``; unknown keys and wrong types raise
    :class:`ConfigFileError`.
    """
    owner = {}
    types = {}
    for gname, cls in groups.items():
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            owner.setdefault(f.name, gname)
            types.setdefault(f.name, hints[f.name])
    flat: dict = {}
    for key, val in (file_data or {}).items():
        k = key.replace("-", "_")
        if k in groups and isinstance(val, dict):
            for sub, v in val.items():
                s = sub.replace("-", "_")
                if s not in owner or owner[s] != k:
                    raise ConfigFileError(f"{where}: unknown key {sub!r} in [{key}]")
                flat[s] = v
        elif k in owner:
            flat[k] = val
        else:
            raise ConfigFileError(f"{where}: unknown key {key!r}")
    out: dict = {g: {} for g in groups}
    for k, v in flat.items():
        out[owner[k]][k] = coerce(types[k], v, k, where)
    for k, v in cli.items():
        if k in owner:
            out[owner[k]][k] = v
    return out, set(flat) | set(cli)
