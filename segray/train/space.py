"""The search space of ``segray tune``: training settings mapped to distributions, from a YAML
file (``learning_rate: {loguniform: [1.0e-4, 1.0e-2]}``) or ``--space KEY=DIST:ARGS`` flags,
each setting checked against :class:`~segray.train.config.TrainConfig`'s fields."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from segray.errors import ConfigError
from segray.io import storage
from segray.train.config import TrainConfig

#: Distributions a setting may be drawn from, and how many arguments each takes.
DISTRIBUTIONS = {"choice": None, "grid": None, "uniform": 2, "loguniform": 2, "randint": 2}
#: Settings a trial may not change: they say where and what, not how to train.
FIXED = ("data", "out", "resume", "resume_from", "tracking_uri", "layout", "num_classes", "stac")


def parse_space(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune search space from ``{setting: {distribution: arguments}}``, each setting checked
    against TrainConfig's fields and each distribution against :data:`DISTRIBUTIONS`; a plain
    value is a constant."""
    from ray import tune

    makers: dict[str, Callable[..., Any]] = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
    }
    space: dict[str, Any] = {}
    for key, spec in doc.items():
        name = str(key).replace("-", "_")
        if name not in TrainConfig.model_fields or name in FIXED:
            raise ConfigError(f"search space: {key!r} is not a training setting a trial may set")
        if not isinstance(spec, dict):
            space[name] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                f"search space: {key}: give one of {', '.join(DISTRIBUTIONS)} with its "
                f"arguments, e.g. {{choice: [a, b]}}; got {spec!r}"
            )
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space: {key}: {kind} takes a list; got {args!r}")
        arity = DISTRIBUTIONS[kind]
        if arity is not None and len(args) != arity:
            raise ConfigError(f"search space: {key}: {kind} takes [low, high]; got {args!r}")
        space[name] = makers[kind](args) if arity is None else makers[kind](*args)
    return space


def space_from_flags(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=DIST:ARGS`` flags as a space document: ``learning_rate=loguniform:1e-4:1e-2``,
    ``loss=choice:ce+dice,focal+dice``; values read as YAML."""
    doc: dict[str, Any] = {}
    for item in items:
        key, sep, rest = item.partition("=")
        kind, colon, args = rest.partition(":")
        if not sep or not colon or kind not in DISTRIBUTIONS:
            raise ConfigError(
                f"--space {item!r}: give KEY=DIST:ARGS with DIST one of "
                f"{', '.join(DISTRIBUTIONS)}, e.g. learning_rate=loguniform:1e-4:1e-2"
            )
        sep_args = args.split(",") if kind in ("choice", "grid") else args.split(":")
        doc[key.strip()] = {kind: [_value(a) for a in sep_args]}
    return doc


def _value(text: str) -> Any:
    """A flag's value: a number where it reads as one (``1e-4`` too, which YAML 1.1 leaves a
    string), else YAML (``true``, ``[1, 2]``, text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def load_space(where: str | None, flags: Sequence[str] = ()) -> dict[str, Any]:
    """The search space document of ``--space-file`` ``where`` and ``--space`` flags (flags
    win)."""
    doc: dict[str, Any] = {}
    if where:
        try:
            loaded = yaml.safe_load(storage.read_text(where))
        except (storage.StorageError, OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{where}: cannot read the search space: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: expected a mapping of setting: distribution")
        doc.update(loaded)
    doc.update(space_from_flags(flags))
    if not doc:
        raise ConfigError("give a search space: --space-file FILE or --space KEY=DIST:ARGS")
    return doc
