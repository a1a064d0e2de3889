"""The schema builder: typed configs (``config.py``'s dataclasses) from plain data, as YAML, ``--set
section.field=value`` overrides, command-line flags and API keyword arguments give it. Every error names
where the bad value came from and the dotted field: ``cfg.yaml: training.epochs: expected a number, got
'x'``, ``--set: lora.rank: expected an integer, got 'big'``."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import SECTIONS, FinetuneConfig
from .errors import LoratuneError


@dataclass
class Origin:
    """Where each setting came from: a file by default, a flag or an argument for overridden fields."""

    default: str | None = None
    fields: dict[str, str] = field(default_factory=dict)  # dotted field (or section) -> label

    def label(self, dotted: str) -> str | None:
        parts = re.sub(r"\[\d+\]", "", dotted).split(".")  # a list's item comes from where the list came from
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.fields:
                return self.fields[".".join(parts[:n])]
        return self.default

    def at(self, dotted: str) -> str:
        """``"cfg.yaml: training.epochs"``, ``"--set: lora.rank"``, ``"--seed"`` or just the field."""
        label = self.label(dotted)
        if label and label.lstrip("-").replace("-", "_") == dotted:  # --seed, workers=: the label is the field
            return label
        return f"{label}: {dotted}" if label else dotted


# ---------------------------------------------------------------------------------------------
# Values


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        item = typing.get_args(tp)[0]
        name = _type_name(item)
        return f"a list of {name.removeprefix('a ').removeprefix('an ')}s" if item in (int, str) else f"a list of {name}"
    if origin is dict:
        key, value = typing.get_args(tp)
        if value is Any or typing.get_origin(value) is not None:  # where a value inside is wrong, its own error names it
            return "a mapping"
        return f"a mapping of {' to '.join(_type_name(a).removeprefix('a ').removeprefix('an ') + 's' for a in (key, value))}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " or ".join(repr(m.value) for m in tp)
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            dict: "a mapping", list: "a list"}.get(tp, str(tp))


class BadValue(ValueError):
    """A value inside a mapping or a list that is not of its type: where (``.key``, ``[3]``), its type, the value."""

    def __init__(self, path: str, tp: Any, value: Any):
        super().__init__(path)
        self.path, self.tp, self.value = path, tp, value


def _inside(path: str, tp: Any, value: Any, convert) -> Any:
    """``convert()``, a value at ``path`` within its container: a failure names that value, not the container."""
    try:
        return convert()
    except BadValue as exc:
        raise BadValue(path + exc.path, exc.tp, exc.value) from None
    except ValueError:
        raise BadValue(path, tp, value) from None


def coerce(value: Any, tp: Any) -> Any:
    """Return value as type tp, or raise ValueError (``BadValue`` naming the value inside a mapping or a
    list). Ints are accepted where floats are; a float is never infinite or NaN; a whole float is accepted
    where an int is; in a union, a value keeps its own type where the union has it (``int | float``)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if any(value == m.value and type(value) is type(m.value) for m in tp):
            return tp(value)
        raise ValueError
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ValueError
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp))
    if tp in (dict, list) or origin in (dict, list):
        return _coerce_container(value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError from None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise TypeError(f"unsupported config type {tp}")


def _coerce_union(value: Any, args: tuple) -> Any:
    if value is None and type(None) in args:
        return None
    args = [a for a in args if a is not type(None)]
    if not isinstance(value, str):  # a number keeps its own type (int | float); a string is read in order ("2e-4")
        args.sort(key=lambda a: a is not type(value))
    inside = None  # a container of the right kind with a wrong value inside says more than "expected A or B"
    for arg in args:
        try:
            return coerce(value, arg)
        except BadValue as exc:
            inside = inside or exc
        except ValueError:
            pass
    raise inside or ValueError()


def _coerce_container(value: Any, tp: Any) -> Any:
    """A mapping or a list, and each value inside it as its type (``dict[str, float]``, ``list[str]``)."""
    kind = typing.get_origin(tp) or tp
    if not isinstance(value, dict if kind is dict else list if tp is list else list | tuple):
        raise ValueError
    if tp is kind:  # a plain dict or list: anything inside
        return value
    if kind is dict:
        key_type, value_type = typing.get_args(tp)
        return {_inside(f".{k}", key_type, k, lambda k=k: coerce(k, key_type)):
                _inside(f".{k}", value_type, v, lambda v=v: coerce(v, value_type)) for k, v in value.items()}
    item_type = typing.get_args(tp)[0]
    return [_inside(f"[{i}]", item_type, v, lambda v=v: coerce(v, item_type)) for i, v in enumerate(value)]


def unknown_field_message(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{name}'{hint}"


def build(cls: type, data: Any, origin: Origin, prefix: str = "", require: Iterable[str] = ()) -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types field by field. A field without a
    default must be given, and so must those in ``require`` (a record read back has its ``state``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LoratuneError(f"{origin.at(prefix.rstrip('.') or 'config')}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [name for name, f in fields.items() if name in require or (
        f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)]
    missing = next((name for name in required if name not in data), None)
    if missing is not None:
        raise LoratuneError(f"{origin.at(prefix.rstrip('.')) if prefix else origin.default or 'config'}: missing '{missing}'")
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise LoratuneError(f"{origin.at(prefix.rstrip('.') or 'config')}: {unknown_field_message(str(key), fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, origin, f"{dotted}.")
            continue
        try:
            kwargs[key] = coerce(value, tp)
        except BadValue as exc:  # a value inside a mapping or a list, named by where it is
            raise LoratuneError(f"{origin.at(dotted + exc.path)}: expected {_type_name(exc.tp)}, got {exc.value!r}") from None
        except ValueError:
            raise LoratuneError(f"{origin.at(dotted)}: expected {_type_name(tp)}, got {value!r}") from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Overrides: --set, command-line flags, API keyword arguments


def _check_path(cls: type, dotted: str, label: str) -> None:
    """``dotted`` names a field (or a section) of ``cls``; a misspelt one gets the closest name."""
    obj_cls, parts = cls, dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj_cls)}
        if part not in names:
            known = [".".join([*parts[:i], n]) for n in names]
            raise LoratuneError(f"{label}: {unknown_field_message('.'.join(parts[:i + 1]), known)}")
        tp = typing.get_type_hints(obj_cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise LoratuneError(f"{label}: {'.'.join(parts[:i + 1])} has no fields")
            obj_cls = tp


def override(data: dict, cls: type, dotted: str, value: Any, label: str, origin: Origin) -> None:
    """Set ``dotted`` in the plain settings ``data`` (to be built as ``cls``), remembering ``label`` as
    where the value came from. A section given as a mapping sets each of its fields."""
    _check_path(cls, dotted, label)
    target = get_field_type(cls, dotted)
    if dataclasses.is_dataclass(target) and isinstance(value, dict):
        for key, inner in value.items():
            override(data, cls, f"{dotted}.{key}", inner, label, origin)
        return
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    origin.fields[dotted] = label


def get_field_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp



Override = tuple[str, Any, str]  # (dotted field, value, where it came from: "--set", "--trials", ...)


def section_fields() -> dict[str, list[str]]:
    """The training config's field names per section: ``{"lora": ["rank", ...], ...}``."""
    return {s: [f.name for f in dataclasses.fields(getattr(FinetuneConfig(), s))] for s in SECTIONS}
