"""Typed run configuration: YAML (OmegaConf) -> dataclasses, with ``key.sub=value`` overrides.

Every field carries its documentation in ``metadata["help"]`` (``flowalign validate --explain``
prints them) and, for numbers and enumerations, its admissible range or values
(``metadata["ge" | "gt" | "le" | "lt" | "choices"]``). Loading fails *before any model loads* on
unknown keys (with a "did you mean"), wrong types, values out of range or not finite, unknown
enumeration values, missing / unreadable / non-UTF-8 files, an ``output_dir`` that cannot be
created, components that cannot be imported, constructor keywords a component does not take, and
impossible batch arithmetic; every error names the offending key (or file).

Swappable leaves are named with ``_component_``: the pipeline adapter (``model._component_``),
each reward (``rewards[i]._component_``) and the optimizer (``train.optimizer._component_``, a
``torch.optim.Optimizer`` subclass built by :func:`build_optimizer`).

Relative paths (prompt files, model folders, reward ``path`` arguments, the config file itself) are
looked up in the current directory first, then in the flowalign project root (:func:`resolve_path`).

This module loads a config (:func:`load_config`: YAML file, dict or dataclass, plus overrides)
and re-exports the config API; each part has its own module:

- :mod:`flowalign.config_schema`: the dataclasses, the field helper ``_f``, :data:`RECIPES` and :data:`SCHEMAS`;
- :mod:`flowalign.config_checks`: "did you mean", structure, range and choice checks;
- :mod:`flowalign.config_files`: path resolution, text and prompt files, ``output_dir`` and ``train.resume``;
- :mod:`flowalign.config_components`: the optimizer, reward / judge specs and the adapter;
- :mod:`flowalign.config_validation`: the semantic checks (:func:`validate_config`, :func:`validate_common`);
- :mod:`flowalign.config_explain`: the ``flowalign validate --explain`` table.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowalign.config_checks import (
    _did_you_mean,
    _first_line,
    _kind,
    _strip_optional,
    _type_hints,
    _unknown_key,
    check_fields,
    check_numbers,
    check_structure,
    range_text,
    schema_keys,
    suggest,
)
from flowalign.config_components import (
    _signature,
    build_optimizer,
    check_component_spec,
    import_path,
    optimizer_kwargs,
    resolve_optimizer_class,
)
from flowalign.config_explain import ExplainRow, explain, format_explain
from flowalign.config_files import (
    _searched,
    check_output_dir,
    check_resume,
    project_root,
    read_prompt_records,
    read_prompts,
    read_text_file,
    resolve_path,
)
from flowalign.config_schema import (
    RECIPES,
    SCHEMAS,
    AlgorithmBase,
    AlgorithmConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LRSchedulerConfig,
    ModelConfig,
    OptimizerConfig,
    RLConfig,
    SamplingConfig,
    TrainConfig,
    num_trained_steps,
)
from flowalign.config_validation import validate_common, validate_config
from flowalign.errors import ConfigError

__all__ = [
    "RECIPES", "SCHEMAS", "ConfigError", "ModelConfig", "DataConfig", "SamplingConfig",
    "AlgorithmBase", "AlgorithmConfig", "LRSchedulerConfig", "OptimizerConfig", "TrainConfig", "EvalConfig", "LoggingConfig", "RLConfig",
    "ExplainRow", "build_optimizer", "check_component_spec", "check_fields", "check_numbers", "check_output_dir",
    "check_resume", "check_structure", "config_schema", "explain", "format_explain", "import_path", "load_config",
    "num_trained_steps", "optimizer_kwargs", "parse_overrides", "project_root", "range_text", "read_prompt_records",
    "read_prompts", "read_text_file", "resolve_optimizer_class", "resolve_path", "resolve_path_fields", "schema_keys",
    "suggest", "to_yaml", "validate_common", "validate_config",
]


#: module -> the other names this module defined before the split, still importable from here.
_MOVED: dict[str, tuple[str, ...]] = {
    "flowalign.config_checks": (
        "_BOUNDS", "_similarity", "_KEY_ALIASES", "_drop_common_sections", "_require_choice", "_join",
        "_require", "_bound_text", "_in_range",
    ),
    "flowalign.config_files": ("_decode_utf8", "_require_file", "_looks_like_hub_id"),
    "flowalign.config_schema": ("AUTO_THREADS_HELP", "DEVICES", "DTYPES", "STD_MODES", "_f"),
    "flowalign.config_components": (
        "OPTIMIZER_FIELDS", "_RESERVED_SPEC_KEYS", "_signature", "_optimizer_hint", "_differs",
        "_resolve_reward", "_check_call_arguments", "_resolve_adapter",
    ),
    "flowalign.config_explain": ("_default_of", "_explain_rows", "_clip"),
}
_MOVED_FROM = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _MOVED_FROM:
        return getattr(importlib.import_module(_MOVED_FROM[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED_FROM])


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _type_at(schema: type, parts: Sequence[str]) -> Any:
    """The declared type at a dotted override key (``Any`` inside free-form lists / dicts)."""
    tp: Any = schema
    for part in parts:
        tp = _strip_optional(tp)
        origin = typing.get_origin(tp)
        if is_dataclass(tp):
            tp = _type_hints(tp).get(part, Any)
        elif origin in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return Any
    return tp


def _display_key(dotted: str) -> str:
    """``rewards.0.weight`` -> ``rewards[0].weight`` (the form validation errors use)."""
    parts = dotted.split(".")
    return parts[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts[1:])


def _omegaconf_error(err: OmegaConfBaseException, source: str, key: str | None = None) -> ConfigError:
    """A ConfigError naming the key OmegaConf reports (``key`` when OmegaConf names none or only an index)."""
    full_key = str(getattr(err, "full_key", None) or "")
    if key is not None and (not full_key or full_key.isdigit()):
        full_key = key + (f"[{full_key}]" if full_key else "")
    msg = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"{full_key or '?'}: {msg} (in {source})")


class _OverrideLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-4`` as a float (as OmegaConf's loader does)."""


_OverrideLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[1,2]"]`` -> ``[("a.b", 1), ("c", [1, 2])]`` (values parsed as YAML)."""
    if isinstance(overrides, (str, bytes)):
        overrides = [overrides]
    parsed = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parsed.append((key, _yaml_value(value)))
    return parsed


def _yaml_value(text: str) -> Any:
    """Parse an override value as YAML (``2`` -> int, ``1e-4`` -> float, ``[1,2]`` -> list);
    unparsable text and YAML-only types (dates) stay the string given."""
    if text == "":
        return ""
    try:
        value = yaml.load(text, Loader=_OverrideLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text
    return value if _plain_yaml(value) else text


def _plain_yaml(value: Any) -> bool:
    """True when ``value`` holds only the types a config stores (no dates, bytes, sets)."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain_yaml(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_yaml(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _load_yaml_file(source: str | os.PathLike) -> tuple[DictConfig, str]:
    """The YAML mapping of a config file (relative names found by :func:`resolve_path`) and its path."""
    given = os.fspath(source)
    path = resolve_path(given)
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {given!r}{_searched(given)}")
    text = read_text_file(path, path)
    try:
        top = yaml.load(text, Loader=_OverrideLoader)  # noqa: S506 - a SafeLoader subclass
        loaded = OmegaConf.load(io.StringIO(text)) if isinstance(top, dict) or top is None else top
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or _first_line(err)
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None and (mark is None or start.line != mark.line):
            context += f" that starts at line {start.line + 1}"
        raise ConfigError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None
    except (OSError, ValueError, TypeError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: cannot load: {_first_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, list) else f"a single value ({text.strip()[:40]!r})"
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys (e.g. `train: {{iterations: 10}}`), got {kind}")
    return loaded, path


def _load_source(source: Any) -> tuple[Any, str, bool]:
    """``(OmegaConf container, where, needs_structure_check)`` of a dataclass, dict or YAML path."""
    if is_dataclass(source) and not isinstance(source, type):
        return OmegaConf.structured(source), type(source).__name__, False
    if isinstance(source, (Mapping, DictConfig)):
        try:
            return OmegaConf.create(source if isinstance(source, DictConfig) else dict(source)), "dict", True
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, "dict") from None
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"config: expected a YAML path, a dict or a config dataclass, got {type(source).__name__}")
    loaded, where = _load_yaml_file(source)
    return loaded, where, True


def _is_component_node(tp: Any) -> bool:
    """A typed ``_component_`` node that takes free keyword arguments (``train.optimizer``,
    ``train.lr_scheduler``): a dataclass with ``_component_`` and ``kwargs`` fields."""
    return is_dataclass(tp) and {"_component_", "kwargs"} <= set(_type_hints(tp))


def _takes_keyword(component: Any, name: str) -> bool:
    """Whether the class a component path names takes keyword ``name`` (False when it cannot be imported)."""
    try:
        names, any_keyword, _ = _signature(import_path(str(component), "_component_"))
    except ValueError:
        return False
    return any_keyword or name in names


def _fold_component_kwargs(data: Any, tp: Any) -> None:
    """In loaded data, move the keys of a component node that are not its fields, but keyword
    arguments of the class it names, into its ``kwargs``: ``{_component_: torch.optim.SGD, lr: 0.1,
    momentum: 0.9}`` is built as ``SGD(params, lr=0.1, momentum=0.9)``. Other unknown keys stay, to
    be reported as unknown keys (with a "did you mean")."""
    tp = _strip_optional(tp)
    if not is_dataclass(tp) or not isinstance(data, (Mapping, DictConfig)):
        return
    hints = _type_hints(tp)
    if _is_component_node(tp):
        component = data.get("_component_", getattr(tp(), "_component_"))
        extra = [k for k in data if k not in hints and _takes_keyword(component, str(k))]
        if extra:
            kwargs = dict(data.get("kwargs") or {})
            for k in extra:
                kwargs[k] = data.pop(k)
            data["kwargs"] = kwargs
        return
    for name in list(data.keys()):
        if name in hints:  # the child node, not its resolved value: interpolations are reported later, by key
            _fold_component_kwargs(data._get_node(name) if isinstance(data, DictConfig) else data[name], hints[name])


def _component_kwarg_key(merged: DictConfig, schema: type, key: str) -> str:
    """``train.optimizer.momentum`` -> ``train.optimizer.kwargs.momentum``: an override of a keyword
    argument of the class a component node names (as set so far); other keys unchanged."""
    parent, _, last = key.rpartition(".")
    node_type = _strip_optional(_type_at(schema, parent.split("."))) if parent else None
    if node_type is None or not _is_component_node(node_type) or last in _type_hints(node_type):
        return key
    component = OmegaConf.select(merged, f"{parent}._component_", default=None)
    return f"{parent}.kwargs.{last}" if component is not None and _takes_keyword(component, last) else key


def _apply_override(merged: DictConfig, schema: type, key: str, value: Any) -> None:
    """Apply one ``key=value`` override to ``merged``, checking the key and the value's shape first."""
    key = _component_kwarg_key(merged, schema, key)
    shown = _display_key(key)
    if not _key_exists(merged, key):
        raise _missing_key(merged, key, schema, f" (override {key}={value!r})")
    check_structure(value, _type_at(schema, key.split(".")), shown, schema)
    try:
        OmegaConf.update(merged, key, value, merge=True)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, f"override {key}={value!r}", shown) from None


def load_config(
    source: str | os.PathLike | dict | Any,
    overrides: Sequence[str] | dict[str, Any] = (),
    *,
    check_files: bool = True,
    world_size: int = 1,
) -> Any:
    """Load a YAML file (or dict / config dataclass), apply overrides, type-check and validate.

    The ``recipe`` key (in the source or an override) picks the schema: :class:`RLConfig` for the
    image/video recipes, or the class :data:`SCHEMAS` names (``recipe: dllm`` -> ``DLLMConfig``).
    Path fields (and reward ``path`` arguments) go through :func:`resolve_path`, as does a
    relative config file name; ``output_dir`` stays relative to the current directory.

    Args:
        source: path to a YAML file, a nested dict, or a config dataclass instance.
        overrides: ``["train.iterations=2", ...]`` or ``{"train.iterations": 2}``.
        check_files: verify referenced files, folders and components (the ``validate`` command
            and ``train`` do).
        world_size: number of processes, for the batch arithmetic checks.
    Raises:
        ConfigError: naming the offending key or file.
    """
    loaded, where, check_shape = _load_source(source)
    items = list(overrides.items()) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    recipe = dict(items).get("recipe", loaded.get("recipe")) or _recipe_of(dict(items).get("algorithm.name", _algorithm_name(loaded)))
    if not isinstance(recipe, str):
        raise ConfigError(f"recipe: must be a recipe name, one of {' | '.join(RECIPES)}; got {_kind(recipe)}")
    known = [*RECIPES, *(s for s in SCHEMAS if s not in RECIPES)]
    if recipe not in known:
        raise ConfigError(f"recipe: unknown recipe {recipe!r}{_did_you_mean(recipe, known)}; choose from {' | '.join(known)}")
    schema = config_schema(recipe)
    _fold_component_kwargs(loaded, schema)
    if check_shape:
        check_structure(OmegaConf.to_container(loaded, resolve=False), schema, "", schema)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), loaded)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, where) from None
    merged.recipe = recipe  # left out, it follows algorithm.name
    for key, value in items:
        _apply_override(merged, schema, str(key), value)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, where) from None
    resolve_path_fields(cfg)
    if isinstance(cfg, RLConfig):
        validate_config(cfg, check_files=check_files, world_size=world_size)
    else:
        cfg.validate(check_files=check_files, world_size=world_size)
    return cfg


def _algorithm_name(loaded: Any) -> Any:
    """``algorithm.name`` of the loaded data, or ``None``."""
    algorithm = loaded.get("algorithm") if OmegaConf.is_dict(loaded) else None
    return algorithm.get("name") if OmegaConf.is_dict(algorithm) else None


def _recipe_of(algorithm_name: Any) -> str:
    """The recipe loop an algorithm runs in (a config may leave ``recipe`` out); ``rl`` by default."""
    from flowalign.algorithms import ALGORITHMS

    return ALGORITHMS[algorithm_name].recipe if isinstance(algorithm_name, str) and algorithm_name in ALGORITHMS else "rl"


def resolve_path_fields(cfg: Any) -> None:
    """Apply :func:`resolve_path` in place to every field marked ``path`` and to the ``path`` /
    ``*_path`` arguments of reward and judge specs (nested specs included)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            resolve_path_fields(value)
        elif f.metadata.get("path") and isinstance(value, str):
            setattr(cfg, f.name, resolve_path(value))
        elif f.name in ("rewards", "judges") and isinstance(value, list):
            for spec in value:
                _resolve_spec_paths(spec)


def _resolve_spec_paths(spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    for name, value in spec.items():
        if isinstance(value, str) and (name == "path" or name.endswith("_path")):
            spec[name] = resolve_path(value)
        elif isinstance(value, dict):
            _resolve_spec_paths(value)


def config_schema(recipe: str) -> type:
    """The config dataclass of a recipe: :class:`RLConfig` unless :data:`SCHEMAS` names another."""
    if recipe not in SCHEMAS:
        return RLConfig  # an unknown recipe name is reported by validate_config, naming the key
    return import_path(SCHEMAS[recipe], "recipe")


def _missing_key(conf: Any, key: str, schema: type, where: str) -> ConfigError:
    """The error for an override ``key`` that names nothing: an index past the end of a list, a
    key below a single value, or an unknown key (with a "did you mean")."""
    parts = key.split(".")
    node = conf
    for depth, part in enumerate(parts):
        parent = _display_key(".".join(parts[:depth])) if depth else ""
        if OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                return ConfigError(f"{_display_key('.'.join(parts[:depth + 1]))}: {parent} is a list of {len(node)} "
                                   f"entries: use an index 0..{len(node) - 1} or set the whole list{where}")
            node = node[int(part)]
        elif OmegaConf.is_dict(node) and part in node:
            node = node[part]
        elif OmegaConf.is_dict(node) or depth == 0:
            break
        else:
            return ConfigError(f"{_display_key(key)}: {parent} is a single value, not a section{where}")
    return _unknown_key(_display_key(key), schema, where)


def _key_exists(conf: Any, key: str) -> bool:
    node = conf
    for part in key.split("."):
        if OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                return False
            node = node[int(part)]
        elif OmegaConf.is_dict(node):
            # free-form dicts (reward specs) accept new keys; structured ones do not
            if part not in node and OmegaConf.get_type(node) is not dict:
                return False
            if part not in node:
                return True
            node = node[part]
        else:
            return False
    return True


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (saved beside every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
