"""The swappable ``_component_`` leaves of a config, resolved and checked against the signature of
what they name: the optimizer (:func:`build_optimizer`), reward / judge specs and the pipeline
adapter."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

from flowalign.config_checks import _did_you_mean, _first_line, _require, suggest
from flowalign.config_files import _looks_like_hub_id, _require_file
from flowalign.config_schema import OptimizerConfig
from flowalign.errors import ConfigError


#: keys of a reward / judge spec that flowalign consumes (not constructor arguments).
_RESERVED_SPEC_KEYS = ("_component_", "weight", "name")

#: the OptimizerConfig fields handed to the optimizer's constructor (when its signature takes them).
OPTIMIZER_FIELDS = ("lr", "weight_decay", "betas", "eps")


# ------------------------------------------------------------------------------------------------
# Components: optimizer, rewards, adapter
# ------------------------------------------------------------------------------------------------


def import_path(path: str, key: str) -> Any:
    """The object a ``package.module.Name`` or ``package.module:Name`` path names; a ValueError
    starting with ``key`` when it cannot be imported."""
    import importlib

    module_name, _, attr = str(path).replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{key}: cannot import {path!r}: {err}") from err


def _signature(obj: Any) -> tuple[tuple[str, ...], bool, tuple[str, ...]]:
    """``(keyword names, takes **kwargs, required names)`` of a callable (a class: its ``__init__``);
    a callable without a readable signature takes anything."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return (), True, ()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return (tuple(p.name for p in named), any(p.kind is p.VAR_KEYWORD for p in params),
            tuple(p.name for p in named if p.default is p.empty))


def _optimizer_hint(path: str) -> str:
    """``"; did you mean 'torch.optim.AdamW'?"`` or the optimizers of the module, for an import error."""
    import importlib

    import torch

    module_name, _, attr = str(path).replace(":", ".").rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError):
        module, module_name = torch.optim, "torch.optim"
    names = sorted(n for n, v in vars(module).items()
                   if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer)
    match = suggest(attr, names)
    if match is not None:
        return f"; did you mean '{module_name}.{match}'?"
    return f"; {module_name} has {', '.join(names)}" if names else ""


def resolve_optimizer_class(path: str, key: str = "train.optimizer._component_") -> type:
    """The ``torch.optim.Optimizer`` subclass ``path`` names (``torch.optim.AdamW`` or ``pkg.mod:Class``).

    Raises:
        ConfigError: naming ``key``: it cannot be imported (with a "did you mean"), or is no optimizer class.
    """
    import torch

    try:
        obj = import_path(path, key)
    except ValueError as err:
        raise ConfigError(f"{err}{_optimizer_hint(path)}") from None
    _require(isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer), key,
             f"{path!r} is not a torch.optim.Optimizer subclass (it is {obj!r})")
    return obj


def optimizer_kwargs(o: OptimizerConfig, optimizer_cls: type | None = None, key: str = "train.optimizer") -> dict[str, Any]:
    """The keyword arguments :func:`build_optimizer` gives the optimizer class (besides the parameters).

    ``lr``, ``weight_decay``, ``betas`` (as a tuple) and ``eps`` are included when the class's
    ``__init__`` takes them (or takes ``**kwargs``); a field the class does not take is left out
    when it has its default value and is an error otherwise. ``o.kwargs`` follows, each name
    checked against the signature.

    Args:
        o: the optimizer settings.
        optimizer_cls: the class (default: :func:`resolve_optimizer_class` of ``o._component_``).
        key: the config key of ``o``, for error messages.
    Raises:
        ConfigError: naming ``<key>.<field>`` or ``<key>.kwargs.<name>`` and the accepted names.
    """
    cls = optimizer_cls if optimizer_cls is not None else resolve_optimizer_class(o._component_, f"{key}._component_")
    names, any_keyword, _ = _signature(cls)
    accepted = [n for n in names if n not in ("self", "params")]
    label = o._component_ if optimizer_cls is None else f"{cls.__module__}.{cls.__qualname__}"
    defaults = OptimizerConfig()
    out: dict[str, Any] = {}
    for name in OPTIMIZER_FIELDS:
        value = getattr(o, name)
        if any_keyword or name in accepted:
            out[name] = tuple(value) if name == "betas" else value
        elif _differs(value, getattr(defaults, name)):
            raise ConfigError(f"{key}.{name}: {label} takes no {name!r} argument; leave {key}.{name} at its default "
                              f"({getattr(defaults, name)!r}) or pick an optimizer that takes it ({label} takes: {', '.join(accepted)})")
    for name, value in o.kwargs.items():
        _require(name not in OPTIMIZER_FIELDS, f"{key}.kwargs.{name}", f"set {key}.{name} instead")
        _require(any_keyword or name in accepted, f"{key}.kwargs.{name}",
                 f"{label} takes no argument {name!r}{_did_you_mean(name, accepted)}; it takes: {', '.join(accepted)}")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _differs(value: Any, default: Any) -> bool:
    return (list(value) if isinstance(value, (list, tuple)) else value) != (list(default) if isinstance(default, (list, tuple)) else default)


def build_optimizer(o: OptimizerConfig, params: Any, key: str = "train.optimizer") -> Any:
    """The optimizer ``o`` describes, over ``params``: ``cls(params, **optimizer_kwargs(o, cls))``."""
    cls = resolve_optimizer_class(o._component_, f"{key}._component_")
    return cls(params, **optimizer_kwargs(o, cls, key))


def _resolve_reward(name: str, key: str) -> Any:
    """The reward class / factory ``name`` resolves to; a ConfigError naming ``key`` otherwise."""
    from flowalign.rewards.registry import BUILTIN_REWARDS, resolve_reward_class

    try:
        return resolve_reward_class(name)
    except ValueError as err:
        match = suggest(name, BUILTIN_REWARDS) if not any(c in name for c in ".:") else None
        hint = f"did you mean {match!r}? " if match else ""
        raise ConfigError(f"{key}: {hint}{_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - an import of user code may fail in any way; report it by key
        raise ConfigError(f"{key}: importing reward {name!r} failed: {type(err).__name__}: {_first_line(err)}") from None


def _check_call_arguments(obj: Any, kwargs: Mapping[str, Any], key: str, label: str) -> None:
    """``kwargs`` must be keyword arguments ``obj`` takes, and (for a class) cover its required ones."""
    names, any_keyword, required = _signature(obj)
    names = tuple(n for n in names if n != "self")
    if not any_keyword:
        for name in kwargs:
            _require(name in names, f"{key}.{name}", f"{label} takes no argument {name!r}{_did_you_mean(name, names)}; "
                                                     f"it takes: {', '.join(names) or 'no arguments'}")
    if isinstance(obj, type):
        missing = [n for n in required if n not in kwargs and n != "self"]
        if missing:
            raise ConfigError(f"{key}.{missing[0]}: missing; {label} needs {', '.join(map(repr, missing))}")
        for name in required:
            _require(kwargs.get(name, "") is not None, f"{key}.{name}", f"must not be null: {label} needs a value")


def check_component_spec(spec: Any, key: str, *, resolve: bool) -> None:
    """Check one reward / judge spec ``{_component_: name, weight: w, name: n, **kwargs}``.

    Always: a mapping, a non-empty ``_component_`` string, a finite ``weight``, a string ``name``.
    With ``resolve``: the component imports; its constructor takes every other key and gets its
    required ones; nested specs (``judge: {_component_: ...}``, ``reward: name``) resolve too;
    a local ``path`` exists.

    Raises:
        ConfigError: naming e.g. ``rewards[0].bogus_kw`` and the accepted names.
    """
    _require(isinstance(spec, Mapping), key, "must be a mapping {_component_: reward name or 'module:Class', weight: number, ...}")
    component = spec.get("_component_")
    _require(isinstance(component, str) and bool(component.strip()), f"{key}._component_",
             f"needs a reward name (`flowalign ls rewards`) or 'package.module:Class', got {component!r}")
    if "weight" in spec:
        w = spec["weight"]
        _require(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w), f"{key}.weight",
                 f"must be a finite number, got {w!r}")
    if "name" in spec:
        _require(isinstance(spec["name"], str) and bool(spec["name"]), f"{key}.name", f"must be a non-empty string, got {spec['name']!r}")
    if not resolve:
        return
    obj = _resolve_reward(component, f"{key}._component_")
    kwargs = {k: v for k, v in spec.items() if k not in _RESERVED_SPEC_KEYS}
    _check_call_arguments(obj, kwargs, key, f"reward {component!r}")
    for name, value in kwargs.items():
        if isinstance(value, Mapping) and "_component_" in value:
            check_component_spec(value, f"{key}.{name}", resolve=True)
        elif isinstance(value, str) and name in ("reward", "judge"):
            _resolve_reward(value, f"{key}.{name}")
    if isinstance(spec.get("path"), str) and not _looks_like_hub_id(spec["path"]):
        _require_file(spec["path"], f"{key}.path")


def _resolve_adapter(name: str, key: str = "model._component_") -> Any:
    from flowalign.pipelines import ADAPTERS, load_adapter_class

    try:
        return load_adapter_class(name)
    except Exception as err:  # noqa: BLE001 - an import of user code may fail in any way; report it by key
        hint = _did_you_mean(name, ADAPTERS) if not any(c in name for c in ".:") else ""
        raise ConfigError(f"{key}: {_first_line(err)}{hint}") from None
