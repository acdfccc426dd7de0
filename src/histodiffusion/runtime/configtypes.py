"""The machinery of the stage configs (config.py): `F(default, help)` fields, type checks and conversion of
values from flags and config files, JSON/TOML reading, and the fields' help and input marks. Knows no stage."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

from .errors import HistoError


def F(default: Any, help: str, **meta: Any):
    """A dataclass field with a default and its one-line help (lists/tuples are stored as tuples).
    `input=True`: the field names an artifact the stage reads (its hash goes into the stage's
    _COMPLETE.json; contract.py)."""
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"help": help, **meta})


def config_to_dict(cfg: Any) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(cls: type, name: str, value: Any, tp: Any = None) -> Any:
    """Check/convert one value to the field's declared type; raise HistoError naming the field."""
    tp = tp or _field_types(cls)[name]
    origin = typing.get_origin(tp)
    where = f"{cls.__name__}.{name}"
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise HistoError(f"config field {name} ({where}) must be a list, not {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(cls, name, v, args[0]) for v in value)
        if len(value) != len(args):
            raise HistoError(f"config field {name} ({where}) needs {len(args)} values, got {list(value)!r}")
        return tuple(coerce(cls, name, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise HistoError(f"config field {name} ({where}) must be true or false, not {value!r}")
    if tp in (int, float):  # a bool is refused although Python counts it as an int
        if not isinstance(value, bool):
            if isinstance(value, int) or isinstance(value, float) and (tp is float or value.is_integer()):
                return tp(value)
            if isinstance(value, str):
                try:
                    return tp(value)
                except ValueError:
                    pass
        raise HistoError(f"config field {name} ({where}) must be {'an integer' if tp is int else 'a number'}, "
                         f"not {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise HistoError(f"config field {name} ({where}) must be a string, not {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {where}")


def load_config_file(path: str | Path) -> dict:
    """Read a JSON or TOML config file (data only: nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise HistoError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:
        raise HistoError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None


def input_fields(cls: type) -> tuple[str, ...]:
    """The fields of a stage config that name the artifacts the stage reads (F(..., input=True))."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("input"))


def help_of(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
