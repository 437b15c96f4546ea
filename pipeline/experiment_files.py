"""Experiments by name, from files, with `--set` overrides: every value type-checked against its field.

    load_experiment("quickstart")                                  experiments/quickstart.py, its EXPERIMENT
    load_experiment("mine.yaml")                                   a partial config, optionally `extends: <name>`
    load_experiment("smoke", ["train.lr=3e-4", "diffusion.prediction=x0", "data.prepare.codec.kind=pixel"])

Override paths follow the nesting of `ExperimentConfig` (pipeline/config.py); values are parsed as YAML (numbers,
booleans, lists, null). All overrides of one call are applied together, so fields that must change together
(`diffusion.learn_sigma=false diffusion.loss=mse`) can. A path that has moved is refused with its new name.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig

# Fields that moved when the experiment began to nest its owners' configs: old path -> new path.
MOVED = {
    "train.prediction": "diffusion.prediction",
    "train.learn_sigma": "diffusion.learn_sigma",
    "train.loss": "diffusion.loss",
    "train.noise_schedule": "diffusion.schedule",
    "grid.class_dropout_prob": "model.class_dropout_prob",
    "grid.grad_checkpointing": "model.grad_checkpointing",
    "data.resolution": "data.prepare.resolution",
    "data.codec": "data.prepare.codec.kind",
    "data.vae": "data.prepare.codec.vae",
    "data.space_to_depth": "data.prepare.codec.space_to_depth",
    "data.samples_per_shard": "data.prepare.samples_per_shard",
    "data.toy_classes": "data.toy.num_classes",
    "data.toy_per_class": "data.toy.per_class",
    "data.toy_style": "data.toy.style",
    "data.toy_seed": "data.toy.seed",
}
# Fields replaced by another with other values: old path -> what to set instead.
REPLACED = {
    "fid.during_training": "fid.schedule: 'spare' (was true: actors beside the trials), 'after' (was false), or "
    "'between' (each trial scores its milestones in its own slot when it has trained)",
}


def available_experiments() -> list[str]:
    folder = Path(__file__).resolve().parents[1] / "experiments"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load_experiment(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """An experiment by name (experiments/<name>.py) or file path, with `section.field=value` overrides applied."""
    if Path(name_or_path).suffix in (".json", ".yaml", ".yml"):
        config = _from_file(Path(name_or_path))
    elif name_or_path in available_experiments():
        config = importlib.import_module(f"experiments.{name_or_path}").EXPERIMENT
    else:
        raise ConfigError(
            f"unknown experiment {name_or_path!r}: give one of {', '.join(available_experiments())} "
            f"or a .json/.yaml file"
        )
    config = apply_overrides(config, overrides)
    variants(config)  # every variant and axis value checked now, before any stage starts
    return config


def _from_file(path: Path) -> ExperimentConfig:
    import yaml

    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse experiment file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping of sections, got {type(raw).__name__}")
    base_name = raw.pop("extends", None)
    base = load_experiment(base_name) if base_name else ExperimentConfig(name=path.stem)
    return merge(base, raw, where=str(path))


def apply_overrides(config: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `section.field=value` strings (values parsed as YAML) to any config dataclass, all at once."""
    import yaml

    settings: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value (e.g. train.lr=3e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse {text!r}: {exc}") from exc
        if isinstance(value, str) and _looks_numeric(text):
            value = float(text)  # YAML reads "3e-4" as a string
        settings.append((key, value))
    return merge(config, nest(settings, where="--set"), where="--set") if settings else config


def nest(settings: Iterable[tuple[str, Any]], where: str) -> dict[str, Any]:
    """[('train.lr', 1e-3), ('model.mlp', 'swiglu')] -> {'train': {'lr': 1e-3}, 'model': {'mlp': 'swiglu'}}, in
    order (a later value of a path replaces an earlier one): what `merge` takes, the inverse of config.flatten."""
    nested: dict[str, Any] = {}
    for path, value in settings:
        cursor = nested
        *parents, last = path.split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
            if not isinstance(cursor, dict):
                raise ConfigError(f"{where}: {path} sets a field inside {part}, which is set to {cursor!r}: set one")
        cursor[last] = value
    return nested


def merge(config: Any, values: dict[str, Any], where: str, path: str = "") -> Any:
    """A copy of dataclass `config` with `values` (a nested dict) applied, type-checked field by field and validated
    by the dataclasses themselves (their `__post_init__`)."""
    known = {f.name: f for f in fields(config)}
    changes = {}
    for key, value in values.items():
        name = f"{path}{key}"
        if key not in known:
            if name in REPLACED:
                raise ConfigError(f"{where}: {name} is gone; set {REPLACED[name]}")
            if name in MOVED:
                raise ConfigError(f"{where}: {name} is now {MOVED[name]}: set {MOVED[name]}={value!r} instead")
            raise ConfigError(f"{where}: unknown field {name!r} ({type(config).__name__} has: {', '.join(known)})")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a mapping of fields, got {value!r}")
            changes[key] = merge(current, value, where, f"{name}.")
        else:
            hint = typing.get_type_hints(type(config))[key]
            changes[key] = _coerce(value, hint, f"{where}: {name}")
    try:
        return replace(config, **changes)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        section = path.rstrip(".") or "the experiment"
        raise ConfigError(f"{where}: {section}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a field's type hint, turning lists into tuples and ints into floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where}: expected {len(item_types)} values, got {len(value)}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, item_types))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool) and hint is not bool):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Design axes and variants: the experiment each trial trains
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of the grid's variants x axes: the fields it sets and the experiment they give."""

    label: str  # "" for an experiment without variants or axes; else e.g. "modern" or "mlp=swiglu+objective=flow"
    settings: dict[str, Any]  # config path -> value, of the variant and the axes together
    experiment: ExperimentConfig  # the base experiment with `settings` applied (and no axes or variants of its own)


def variants(experiment: ExperimentConfig) -> list[Variant]:
    """Every combination of the grid's variants and axis values, in declaration order, each checked as a whole
    experiment (a combination that cannot work is refused here, before any trial starts)."""
    grid = experiment.grid
    if not grid.axes and not grid.variants:
        return [Variant("", {}, experiment)]
    base = replace(experiment, grid=replace(grid, axes={}, variants={}))
    named = list(grid.variants.items()) or [("", {})]
    leaves = [path.rsplit(".", 1)[-1] for path in grid.axes]
    short = {path: leaf if leaves.count(leaf) == 1 else path for path, leaf in zip(grid.axes, leaves)}
    out = []
    for name, fixed in named:
        for values in itertools.product(*grid.axes.values()):
            chosen = dict(zip(grid.axes, values))
            parts = [name] * bool(name) + [f"{short[path]}={_label_value(v)}" for path, v in chosen.items()]
            label = "+".join(parts)
            settings = {**fixed, **chosen}
            where = f"grid variant {label!r}"
            out.append(Variant(label, settings, merge(base, nest(settings.items(), where), where=where)))
    return out


def _label_value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
