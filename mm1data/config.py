"""Run configs: frozen dataclasses loaded from YAML with dotted `--set` overrides; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

MAX_YAML_BYTES = 4 << 20  # a run config, filter chain or manifest larger than this is refused before parsing
MAX_YAML_DEPTH = 100  # nesting levels (the composer recurses: deeper input would end in a slow RecursionError)
MAX_YAML_EXPANDED = 8 << 20  # ... and one whose aliases expand past this many characters + nodes (billion laughs)
MAX_MESSAGE = 4000  # characters of a ConfigError message (values in it are shortened first, this is the backstop)


class ConfigError(ValueError):
    """A bad config: an unknown key, a wrong type or a missing file. The message names the key.

    The message is bounded: a value from a hostile file must not make the error itself huge."""

    def __init__(self, message: str = "") -> None:
        message = str(message)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 40] + f"... ({len(message) - MAX_MESSAGE + 40:,} characters cut)"
        super().__init__(message)


class BadValue(ConfigError):
    """A config field outside its allowed range; from_dict names it by its full dotted key (`download.timeout_s`)."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} must be {allowed}, got {short(value)}")

    def __reduce__(self) -> tuple:  # picklable (a Ray task may raise it) although __init__ takes three arguments
        return BadValue, (self.key, self.value, self.allowed)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def short(value: Any, limit: int = 200) -> str:
    """A bounded repr for error messages: reprlib looks at a few items of each level, so a huge or deeply shared
    value (a YAML alias tree) costs O(limit) to describe, not its expanded size."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 300) -> str:
    """A message from elsewhere (a parser error quoting its input) on one line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check(
    cfg: Any,
    key: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
    optional: bool = False,
) -> None:
    """Raise BadValue unless cfg.<key> is in range: a finite number (NaN and inf are refused) with the given
    bounds, or one of `choices`; None passes when `optional`. Called from a config's __post_init__."""
    value = getattr(cfg, key)
    if value is None and optional:
        return
    if choices is not None:
        if value not in choices:
            raise BadValue(key, value, "one of " + ", ".join(map(str, choices)))
        return
    parts = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else ""]
    parts.append(f"<= {le:g}" if le is not None else "")
    field = getattr(cfg, "__dataclass_fields__", {}).get(key)
    integer = field is not None and "int" in str(field.type) and "float" not in str(field.type)
    noun = "an integer " if integer else "a finite number "
    allowed = noun + " and ".join(p for p in parts if p) + (" (or null)" if optional else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge) and (le is None or value <= le)
    if not ok:
        raise BadValue(key, value, allowed)


def check_pool(cfg: Any, key: str) -> None:
    """Raise BadValue unless cfg.<key> is an actor pool's size: a count >= 1, or [min, max] with 1 <= min <= max."""
    value = getattr(cfg, key)
    if not isinstance(value, tuple):
        return check(cfg, key, ge=1)
    if not (len(value) == 2 and all(type(v) is int for v in value) and 1 <= value[0] <= value[1]):
        raise BadValue(key, list(value), "an integer >= 1 or [min, max] with integers 1 <= min <= max")


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand past MAX_YAML_EXPANDED (a "billion laughs":
    a few KB of nested aliases that any walk of the result, a copy, a fingerprint or an error message, would
    expand to gigabytes) or that refers to itself."""

    _depth = 0

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expansion(node)
        return node

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Expanded size of a composed YAML graph (aliases are shared nodes): scalar characters + one per node,
    memoised per node so the walk itself is linear in the document."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        k = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[k] = 1 + len(node.value)
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if done:
            on_path.discard(k)
            size[k] = 1 + sum(size[id(c)] for c in children)
            if size[k] > MAX_YAML_EXPANDED:
                raise yaml.YAMLError(f"aliases expand to more than {MAX_YAML_EXPANDED:,} characters")
            continue
        if k in size:
            continue
        if k in on_path:
            raise yaml.YAMLError("an alias refers to a node that contains it (a recursive structure)")
        on_path.add(k)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def load_yaml(text: str | bytes, where: str) -> Any:
    """The one safe YAML parse of the project: plain data only (no Python tags), at most MAX_YAML_BYTES, with
    bounded alias expansion. Any problem is a ConfigError naming `where` (a file, or `--set KEY`)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} bytes of YAML, more than the {MAX_YAML_BYTES:,} allowed")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {clip(e, 600)}") from None
    except (ValueError, RecursionError, OverflowError) as e:  # a 5,000-digit integer, nesting deeper than the stack
        raise ConfigError(f"{where}: invalid YAML: {type(e).__name__}: {clip(e)}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=VALUE` -> ("a.b", yaml-parsed VALUE), as `--set` takes it."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {short(item)}")
    key, value = item.split("=", 1)
    key = key.strip()
    return key, load_yaml(value, f"--set {short(key, 100)}") if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sub-dicts); validation happens in from_dict."""
    for key, value in overrides:
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return raw


def from_dict(cls: type[T], raw: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a dict; nested dataclasses recurse; unknown keys raise ConfigError."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in raw if k not in names), key=str)  # a YAML key may be a number or null
    if unknown:
        raise ConfigError(f"unknown config key {short(where + str(unknown[0]))} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], f"{where}{f.name}")
    try:
        return cls(**kwargs)
    except BadValue as e:  # the field's full dotted key: download.timeout_s, not timeout_s
        raise ConfigError(f"config key {where + e.key!r} must be {e.allowed}, got {short(e.value)}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {e}") from e


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {short(value)}")
        return from_dict(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {short(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {short(value)}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {short(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and (type(value) is tp):
        return value
    raise ConfigError(f"config key {key!r} expects {getattr(tp, '__name__', tp)}, got {short(value)}")


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready structure of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def read_yaml_any(path: str | Path) -> Any:
    """Parse a YAML file (local or s3://) with load_yaml: size-capped before it is read whole."""
    from mm1data import storage

    path = str(path)
    try:
        if storage.is_s3(path):
            data = storage.read_range(path, 0, MAX_YAML_BYTES + 1)
        else:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            with open(path, "rb") as f:
                data = f.read(MAX_YAML_BYTES + 1)
    except ConfigError:
        raise
    except Exception as e:  # NoSuchKey, permissions, a directory
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {clip(e)}") from e
    return load_yaml(data, path)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (a run config or a manifest), local or s3://."""
    data = read_yaml_any(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """The one way YAML becomes a config: file, then `--set KEY=VALUE` overrides, then validation."""
    raw = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(raw, [parse_override(o) for o in overrides]))
