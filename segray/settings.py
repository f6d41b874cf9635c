"""The one way segray declares settings: typed fields, each with its default, its help and its
check written once.

Every config (training, bulk, Serve, evaluation, datasets) is a :class:`Settings`: a pydantic model
whose fields carry their default and description, whose choices are ``Literal`` types, and whose
errors are a :class:`~segray.errors.ConfigError` naming the field and the bad value. The CLI builds
its options from these fields (``segray.cli.options``), Serve's ``app_builder`` takes one as its
typed argument, and a run folder saves one as YAML to be repeated from.

Where settings come from, the first that gives a value wins: the command line, then a ``--config``
file, then the field's default.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segray.errors import ConfigError, SegrayError


def setting(default: Any = ..., help: str = "", *, flag: str | None = None, **kw: Any) -> Any:
    """A field with its default and its help; ``flag`` names its CLI option when the field name
    would make a poor one (``num_classes`` → ``--classes``), ``cli=False`` keeps it off the CLI."""
    extra: dict[str, Any] = {}
    if flag is not None:
        extra["flag"] = flag
    if kw.pop("cli", True) is False:
        extra["cli"] = False
    if "default_factory" in kw:
        return Field(description=help, json_schema_extra=extra or None, **kw)
    return Field(default, description=help, json_schema_extra=extra or None, **kw)


class Settings(BaseModel):
    """Base of every segray config: unknown fields refused, values checked on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    #: The error a bad value raises (a :class:`~segray.errors.SegrayError` subclass).
    error: ClassVar[type[SegrayError]] = ConfigError

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise self.error(describe(exc, type(self).__name__)) from None

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied and checked again."""
        return type(self)(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, e.g. for a run folder's ``config.yaml``."""
        return self.model_dump(mode="json")


def describe(exc: ValidationError, what: str) -> str:
    """One line per bad field: ``field: message (got value)``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        plain = not field or err["type"] == "missing" or isinstance(got, dict)
        lines.append(
            f"{field}: {message}; got {got!r}"
            if not plain
            else f"{field or what}: {message}"
            if field
            else message
        )
    return f"invalid {what}: " + "; ".join(lines)
