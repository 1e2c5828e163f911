"""Turning YAML and `--section.key=value` overrides into typed dataclasses, collecting every
problem with the key, the value and a fix. Knows nothing about which sections exist."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Literal, cast

import yaml


def option(default: Any, help: str, key: str | None = None) -> Any:
    """A dataclass field with a one-line help text (shown by `pretrain train --help`). `key` is
    its name in YAML and overrides when that differs from the field's (a Python keyword such as
    `async`)."""
    metadata = {"help": help, **({"key": key} if key else {})}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def yaml_key(f: dataclasses.Field) -> str:
    """The name of field `f` in YAML and in overrides."""
    return f.metadata.get("key", f.name)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` and `1e6` as floats (YAML 1.2), not strings (YAML 1.1)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml_text(text: str) -> Any:
    """Parse YAML; every failure is a yaml.YAMLError (callers report those with the file or key)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except ValueError as exc:  # PyYAML lets through int()'s 4300-digit limit and dates such as 2024-13-45
        raise yaml.constructor.ConstructorError(
            None, None, f"a value read as a number or a date cannot be converted ({str(exc)[:100]}); quote it "
            "if it is meant as text", None) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise yaml.constructor.ConstructorError(
            None, None, "collections nested too deeply (hundreds of levels)", None) from None


# Values are quoted into messages shortened, so that a huge (or alias-expanded) value cannot flood
# the message or take minutes to print.
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 120
_short.maxlevel, _short.maxlist, _short.maxdict = 3, 8, 8


def show(value: Any) -> str:
    """`repr(value)`, shortened to about a line."""
    return _short.repr(value)


def parse_overrides(args: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Split `--a.b=value` arguments into (dotted key, YAML-parsed value) pairs and problems."""
    overrides, problems = [], []
    for arg in args:
        match = re.fullmatch(r"--([A-Za-z_][\w.]*)=(.*)", arg, flags=re.S)
        if not match:
            problems.append(
                f"cannot read the argument {arg!r}: overrides are written --section.key=value, "
                "e.g. --train.max_steps=100"
            )
            continue
        key, text = match.groups()
        try:
            overrides.append((key, load_yaml_text(text) if text != "" else None))
        except yaml.reader.ReaderError as exc:  # a control character or lone surrogate: quoting does not help
            problems.append(f"--{key}: the value {show(text)} holds the character #x{exc.character:04x}, which "
                            "YAML does not allow; remove it")
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc)
            fix = "" if "quote it" in problem else "; quote it"
            problems.append(f"--{key}: the value {show(text)} is not valid YAML ({problem}){fix}")
    return overrides, problems


def apply_override(data: dict, dotted_key: str, value: Any) -> str | None:
    """Set `data[a][b] = value` for key `a.b`; return a problem if a parent is not a mapping."""
    *parents, last = dotted_key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            parent_key = ".".join(parents[: depth + 1])
            return f"--{dotted_key}: {parent_key} is not a section, so it has no key {last!r}"
        node = child
    node[last] = value
    return None


def did_you_mean(word: str, candidates: typing.Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, checking every value against its field's type.

    Problems are appended to `problems`; on any problem the field keeps its default so that
    checking can go on and report everything at once."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'the config'} must be a mapping of keys to values, got {show(data)}")
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            section = f"section {prefix!r}" if prefix else "the top level"
            problems.append(
                f"unknown key {where!r} in {section}{did_you_mean(str(key), fields)} "
                f"(known keys: {', '.join(fields)})"
            )
    values = {}
    for name, spec in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            before = len(problems)
            converted = convert(data[name], hints[spec.name], key, problems)
            if len(problems) == before:
                values[spec.name] = converted
        elif spec.default is MISSING and spec.default_factory is MISSING:
            problems.append(f"{key} is required")
    try:
        return cls(**values)
    except TypeError:
        return None  # a required field was missing; already reported


def convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against type `tp`, converting where the intent is unambiguous
    (an int for a float field, a whole float such as 1e6 for an int field)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if tagged_members(tp):
            return _build_tagged(tagged_members(tp), value, key, problems)
        return convert(value, inner[0], key, problems)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key, problems)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):  # True == 1, but not a zero_stage
            return value
        choices = ", ".join(repr(a) for a in args)
        hint = did_you_mean(value, map(str, args)) if isinstance(value, str) else ""
        problems.append(f"{key}={show(value)} is not one of {choices}{hint}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}={show(value)} must be a list, e.g. {key}='[...]'")
            return None
        return [convert(item, args[0], f"{key}[{i}]", problems) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}={show(value)} must be a mapping, e.g. {key}='{{a: 1}}'")
            return None
        for k in value:
            if args[0] is not Any and not isinstance(k, args[0]):
                problems.append(f"{key}: the key {show(k)} is a {type(k).__name__}, not a string; quote it: "
                                f"'{k}'")
        return {k: convert(v, args[1], f"{key}.{k}", problems) for k, v in value.items()}
    return _convert_scalar(value, tp, key, problems)


def tagged_members(tp: Any) -> dict[str, type]:
    """For a union of dataclasses that each have a `name` field (a tagged union, such as the model
    families of the `model:` section): name -> dataclass, the default member first. Else {}."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return {}
    members = typing.get_args(tp)
    if not all(dataclasses.is_dataclass(m) and "name" in {f.name for f in dataclasses.fields(m)} for m in members):
        return {}
    return {cast(str, next(f.default for f in dataclasses.fields(m) if f.name == "name")): m for m in members}


def _build_tagged(members: dict[str, type], data: Any, key: str, problems: list[str]) -> Any:
    """The member of a tagged union that `data`'s `name` picks (the first when it has none), built
    with that member's keys: a key of another member is an unknown key here."""
    if not isinstance(data, dict) or "name" not in data:
        return build(next(iter(members.values())), data, key, problems)
    name = data["name"]
    if not isinstance(name, str) or name not in members:
        hint = did_you_mean(name, members) if isinstance(name, str) else ""
        problems.append(f"{key}.name={show(name)} is not one of {', '.join(map(repr, members))}{hint}")
        return None
    own = {yaml_key(f) for f in dataclasses.fields(members[name])}
    foreign = {k: other for k in data if k not in own
               for other, member in members.items() if k in {yaml_key(f) for f in dataclasses.fields(member)}}
    for k, other in foreign.items():
        problems.append(f"{key}.{k} is a key of {key}.name={other}, not of {key}.name={name}; remove it, or "
                        f"set {key}.name={other}")
    return build(members[name], {k: v for k, v in data.items() if k not in foreign}, key, problems)


def _convert_scalar(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 1e308:
                problems.append(f"{key}={show(value)} is too large for a float; use a number below 1e308")
                return None
            if not math.isfinite(value):  # no option means anything with NaN or infinity
                problems.append(f"{key}={value!r} must be a finite number (where an option can be turned "
                                "off, its help says which value does it)")
                return None
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has unsupported type {tp!r}")
    examples = {bool: "true or false", int: "a whole number such as 8", float: "a number such as 3e-4",
                str: "a string (quote numbers: '123')"}
    problems.append(f"{key}={show(value)} has the wrong type: expected {examples[tp]}, got {type(value).__name__}")
    return None


def type_name(tp: Any) -> str:
    """Readable type for help output: `int`, `float | None`, `'cosine' | 'wsd'`, `list[Source]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def to_dict(obj: Any) -> Any:
    """A dataclass tree (or a list of them) as plain dicts and lists, for YAML output."""
    if isinstance(obj, list):
        return [to_dict(item) for item in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj):  # a field marked `implied` goes without saying (llama's model.name)
        return {yaml_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("implied")}
    return copy.deepcopy(obj)


def reference(root: type) -> str:
    """Every key of dataclass `root`, nested sections included, with its type, default and help text."""
    lines = []

    def walk(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{yaml_key(f)}"
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                lines.append(f"\n  [{key}] {f.metadata.get('help', '')}")
                walk(tp, key + ".")
                continue
            if tagged_members(tp):
                walk_tagged(tagged_members(tp), key, f.metadata.get("help", ""))
                continue
            if f.name in skip:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  --{key}={_inline_yaml(to_dict(default))}  ({type_name(tp)})  {f.metadata.get('help', '')}")

    def walk_tagged(members: dict[str, type], key: str, help: str) -> None:
        """The section's `name` once, then each member's keys, the default member's first."""
        (default, first), *others = members.items()
        name_help = next(f.metadata.get("help", "") for f in dataclasses.fields(first) if f.name == "name")
        lines.append(f"\n  [{key}] {help}")
        lines.append(f"  --{key}.name={default}  ({' | '.join(map(repr, members))})  {name_help}")
        walk(first, key + ".", skip=("name",))
        for name, member in others:
            summary = " ".join((member.__doc__ or "").split("\n\n")[0].split())
            lines.append(f"\n  [{key}] with {key}.name={name}: {summary}")
            walk(member, key + ".", skip=("name",))

    walk(root, "")
    return "\n".join(lines)


def _inline_yaml(value: object) -> str:
    """`value` as one line of YAML, the form an override takes (`[{name: a, ...}]`, `3.0e-04`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
