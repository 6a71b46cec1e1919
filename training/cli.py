"""Dataclass-driven argparse: one flag per field, ``--config FILE.yaml`` as an alternative to flags.

Values are resolved as: dataclass default < YAML key < command-line flag. Every value, from
either source, goes through the same converter, so ``lr: 1e-4`` in YAML (a string to PyYAML)
and ``--lr 1e-4`` give the same float.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A configuration problem the user must fix; reported without a traceback, exit code 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X``, ``X | None`` and ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def convert(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """Convert a flag or YAML value to the field's type; raises ValueError with a short reason."""
    inner, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError("may not be empty")
    if typing.get_origin(inner) is list:
        items = value if isinstance(value, list) else str(value).split(",")
        out = [str(v).strip() for v in items if str(v).strip()]
        if not out:
            raise ValueError("expected a non-empty comma-separated list")
        return out
    if inner is bool:
        return _to_bool(value)
    if inner is int:
        number = float(value) if not isinstance(value, bool) else 0.5
        if not number.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        out = int(number)
    elif inner is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        out = float(value)
    else:
        out = str(value)
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {out!r}")
    return out


def _field_groups(cls: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """Fields grouped by the dataclass in the MRO that declares them (command's own first)."""
    seen: set[str] = set()
    groups = []
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        own = [f for f in dataclasses.fields(klass) if f.name in klass.__dict__.get("__annotations__", {})]
        own = [f for f in own if f.name not in seen]
        seen.update(f.name for f in own)
        if own:
            title = (klass.__doc__ or klass.__name__).strip().splitlines()[0].replace("``", "").rstrip(".")
            groups.append((title, own))
    return groups


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field (defaults suppressed so only given flags reach the namespace)."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file of options (keys = flag names); flags given here override it.")
    for title, fields in _field_groups(cls):
        group = parser.add_argument_group(title)
        for f in fields:
            inner, _ = _base_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(default) if isinstance(default, list) else default
            help_text = f"{f.metadata.get('help', '')} (default: {shown})"
            kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
            if inner is bool:
                group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
                continue
            metavar = f.name.upper() if not f.metadata.get("choices") else None
            group.add_argument(_flag(f.name), metavar=metavar, choices=f.metadata.get("choices"), **kwargs)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a ``--config`` file: a mapping of option names to values."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type, namespace: argparse.Namespace, command: str) -> Any:
    """Merge defaults, the ``--config`` YAML and the given flags into a ``cls`` instance."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = dict(vars(namespace))
    given.pop("command", None)
    yaml_path = given.pop("config", None)
    values: dict[str, Any] = {}
    if yaml_path:
        for key, value in load_yaml(yaml_path).items():
            if key == "command":
                if value != command:
                    raise UsageError(f"{yaml_path}: written for command {value!r}, not {command!r}")
                continue
            if key not in fields:
                raise UsageError(f"{yaml_path}: unknown option {key!r} (valid: {', '.join(sorted(fields))})")
            try:
                values[key] = convert(fields[key], hints[key], value)
            except ValueError as e:
                raise UsageError(f"{yaml_path}: {key}: {e}") from e
    for key, value in given.items():
        try:
            values[key] = convert(fields[key], hints[key], value)
        except ValueError as e:
            raise UsageError(f"{_flag(key)}: {e}") from e
    return cls(**values)


def explicit_fields(cfg: Any) -> dict[str, Any]:
    """The fields of ``cfg`` that differ from their defaults."""
    out = {}
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(cfg, f.name) != default:
            out[f.name] = getattr(cfg, f.name)
    return out


SECRETS = ("register_token",)  # never written to disk


def to_yaml(cfg: Any, command: str) -> str:
    """The resolved configuration as a YAML document that ``--config`` accepts back (secrets left out)."""
    import yaml

    body: dict[str, Any] = {"command": command}
    for _, fields in _field_groups(type(cfg)):
        body.update({f.name: getattr(cfg, f.name) for f in fields if f.name not in SECRETS})
    return yaml.safe_dump(body, sort_keys=False)
