"""Typed, validated config loading: YAML -> kw-only dataclasses, with ``key=value`` overrides.

One mechanism for every config in mdlora:

* unknown keys are errors that name the full dotted key (``model.hiden: unknown key``);
* values are checked against the dataclass annotations (``int``, ``float``, ``str``, ``bool``,
  ``list[...]``, ``dict[str, ...]``, ``Literal[...]``, ``X | None`` and nested dataclasses);
* ``__post_init__`` of each dataclass checks ranges and raises ``ValueError`` naming the field.

Every field carries a docstring under it; :func:`defaults_yaml` prints the defaults with those
docstrings as comments (``mdlora config show``).

Example::

    cfg = load_config(RunConfig, "run.yaml", overrides=["optim.dense_lr=5e-4"])
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints are accepted for floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp, f"{key}.<key>"): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _parent_defaults(factory: Callable[[], Any]) -> dict[str, Any]:
    """What a parent's ``default_factory`` sets differently from the section class's own
    defaults (``AdaptConfig.loop``: 10 epochs, patience 2); {} when it sets nothing else."""
    default = factory()
    if not dataclasses.is_dataclass(default):
        return {}
    try:
        plain = to_dict(type(default)())
    except TypeError:  # the class has required fields: keep every default the factory gives
        plain = {}
    return {k: v for k, v in to_dict(default).items() if k not in plain or plain[k] != v}


def _overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys put over it, nested mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys by dotted name.

    Args:
        cls: a dataclass type.
        data: mapping of field name to value (nested mappings for nested dataclasses). A nested
            mapping overrides the keys it names: the others keep the section's default as the
            parent declares it (``AdaptConfig``'s ``loop`` has 10 epochs, not ``LoopConfig``'s 1).
        prefix: dotted path of ``data`` inside the whole config, used in error messages.

    Returns:
        The constructed, validated instance.

    Raises:
        ConfigError: on an unknown key, a missing required key or a wrongly typed value.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dot = f"{prefix}." if prefix else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{dot}{unknown[0]}: unknown key (known keys of {prefix or 'the config'}: {sorted(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                value = _overlay(_parent_defaults(f.default_factory), value)
            kwargs[name] = _coerce(value, hints[name], f"{dot}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dot}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(prefix) else f"{dot}{msg}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides.

    Relative paths inside the file are left as written; callers resolve them against the
    config file's directory with :func:`resolve_path` where needed.
    """
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` and its dataclass bases.

    Attribute docstrings are not kept at run time, so they are read from the class source with
    ``ast``: a string statement right after an annotated assignment documents that field.

    Returns:
        ``{field name: cleaned docstring}`` for the documented fields (empty without source).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def defaults_yaml(cls: type, header: str = "") -> str:
    """The defaults of config dataclass ``cls`` as YAML, each field's docstring a comment above it.

    Section defaults come from the parent's ``default_factory`` (so an adapter run's ``loop``
    shows its own epochs); a field without a default is written ``null`` and marked required.
    With the required fields filled in, the text loads back into the defaults.

    Args:
        cls: a config dataclass (``RunConfig``, ``AdaptConfig``, ...).
        header: comment lines put first (without ``#``).

    Returns:
        The YAML text.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join(lines + _yaml_lines(cls, None, 0)) + "\n"


def _yaml_lines(cls: type, obj: Any, depth: int) -> list[str]:
    """Commented YAML lines of the fields of ``cls``, valued from ``obj`` (None: field defaults)."""
    hints, docs, pad, lines = typing.get_type_hints(cls), field_docs(cls), "  " * depth, []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value, tp = _value(f, obj), hints[f.name]
        section = dataclasses.is_dataclass(tp)
        doc = docs.get(f.name) or (_class_doc(tp) if section else "")
        if value is dataclasses.MISSING:
            doc = f"(required) {doc}"
        lines += [""] if depth == 0 else []
        lines += [f"{pad}# {line}".rstrip() for line in doc.splitlines()]
        if section:
            lines.append(f"{pad}{f.name}:")
            lines += _yaml_lines(tp, value if dataclasses.is_dataclass(value) else None, depth + 1)
        else:
            value = None if value is dataclasses.MISSING else value
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
            text = text.removesuffix("...\n").strip()  # a plain scalar ends its document with ...
            lines.append(f"{pad}{f.name}: {text}")
    return lines


def _value(f: dataclasses.Field, obj: Any) -> Any:
    """The value of field ``f`` on ``obj``, or its default (``dataclasses.MISSING``: none)."""
    if obj is not None:
        return getattr(obj, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _class_doc(cls: type) -> str:
    """First paragraph of ``cls``'s own docstring ('' for the signature dataclass makes up)."""
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc.split("\n\n")[0]
