"""Click options made from a config's fields, so each setting's default, help and choices are
written once, in the config (see :mod:`segray.settings`).

A field ``batch_size: int = setting(16, "…")`` becomes ``--batch-size INTEGER [default: 16]``;
``Literal`` choices become ``click.Choice``; a ``bool`` defaulting to False a flag; tuples are
comma-separated (``--bands 1,2,3``); a dict is a repeated ``KEY=VALUE`` option (JSON values).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union, get_args, get_origin

import click
from pydantic.fields import FieldInfo

from segray.settings import Settings


class CommaList(click.ParamType):
    """``1,2,3`` → a tuple of ``item`` values (int, float or str)."""

    name = "list"

    def __init__(self, item: type) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple | list):
            return tuple(value)
        try:
            return tuple(self.item(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"expected comma-separated {self.item.__name__} values, got {value!r}")


class KeyValue(click.ParamType):
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON, else kept as text."""

    name = "key=value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        key, sep, text = str(value).partition("=")
        if not sep or not key:
            self.fail(f"expected KEY=VALUE, got {value!r}")
        try:
            return key, json.loads(text)
        except ValueError:
            return key, text


def _bare(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)``: the annotation without ``None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def flag_name(name: str, info: FieldInfo) -> str:
    """The option's flag: the field's own ``flag``, else ``--field-name``."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def on_cli(info: FieldInfo) -> bool:
    """False for fields marked ``cli=False`` (test switches, nested configs, secrets)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("cli", True) is not False


def option_for(name: str, info: FieldInfo, required: bool | None = None) -> Callable:
    """The click option of one config field."""
    kind, _ = _bare(info.annotation)
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    kw: dict[str, Any] = {"help": info.description or None, "show_default": default is not None}
    flag = flag_name(name, info)
    if get_origin(kind) is Literal:
        by_text = {str(v): v for v in get_args(kind)}  # click gives text; Literal[3, 4] wants ints
        kw["type"] = click.Choice(list(by_text))
        kw["callback"] = lambda ctx, param, value: by_text.get(value, value)
        default = None if default is None else str(default)
    elif kind is bool:
        if default:
            flag = f"{flag}/--no-{flag[2:]}"
        else:
            kw.update(is_flag=True, show_default=False)
    elif get_origin(kind) is tuple:
        kw["type"] = CommaList(get_args(kind)[0])
        default = ",".join(map(str, default)) if default else None
    elif get_origin(kind) is dict or kind is dict:
        kw.update(type=KeyValue(), multiple=True, show_default=False)
        default = ()
    elif kind in (int, float, str):
        kw["type"] = kind
    kw["required"] = info.is_required() if required is None else required
    if not kw["required"]:
        kw["default"] = default
    return click.option(flag, name, **kw)


def config_options(
    config: type[Settings], *, skip: Iterable[str] = (), optional: Iterable[str] = ()
) -> Callable:
    """A decorator adding an option for every CLI field of ``config`` (in field order).

    ``optional`` fields are not required on the command line even without a default (a
    ``--config`` file may give them).
    """
    skip, optional = set(skip), set(optional)

    def decorate(func: Callable) -> Callable:
        fields = [
            (name, info)
            for name, info in config.model_fields.items()
            if name not in skip and on_cli(info)
        ]
        for name, info in reversed(fields):
            func = option_for(name, info, False if name in optional else None)(func)
        return func

    return decorate


def from_options(
    config: type[Settings], values: dict[str, Any], base: dict[str, Any] | None = None
) -> Any:
    """A ``config`` from command-line ``values`` over ``base`` (a ``--config`` file's settings):
    an option counts only when the user gave it (see :func:`given`)."""
    merged = dict(base or {})
    for name, value in values.items():
        if name not in config.model_fields:
            continue
        kind, optional = _bare(config.model_fields[name].annotation)
        if value is None and not optional:  # not given (an empty tuple's option has no default)
            continue
        if get_origin(kind) is dict or kind is dict:  # repeated KEY=VALUE pairs
            value = {**merged.get(name, {}), **dict(value)}
        merged[name] = value
    return config(**merged)


def given(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``values`` the user set on the command line or through the environment."""
    from click.core import ParameterSource

    keep = {ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT}
    return {k: v for k, v in values.items() if ctx.get_parameter_source(k) in keep}
