"""Learning-rate schedules selected by name, stepped once after every optimizer step.

Each named schedule is a multiplier ``m(step)`` of the optimizer's configured learning rate
(``lr = lr0 * m(step)``, wrapped in a ``torch.optim.lr_scheduler.LambdaLR``), where ``step`` counts
optimizer steps from 0 and ``W = warmup_steps``, ``T = total_steps``, ``r = min_lr_ratio``,
``p = min(1, (step - W) / max(1, T - W))``:

==========  ================================  =====================================================
name        after warmup (``step >= W``)      shape
==========  ================================  =====================================================
constant    ``1``                             flat at ``lr0``
cosine      ``r + (1-r)/2 * (1 + cos(pi p))`` half cosine from ``lr0`` down to ``r * lr0`` at ``T``
linear      ``r + (1-r) * (1 - p)``           straight line from ``lr0`` down to ``r * lr0`` at ``T``
==========  ================================  =====================================================

During warmup (``step < W``) every schedule is ``step / W``: 0 at the first step, as in
``transformers``; with ``W = 0`` the multiplier starts at exactly 1. After ``T`` the cosine and
linear schedules stay at ``r``.

Any other name is a class path (``torch.optim.lr_scheduler.StepLR`` or ``pkg.mod:Class``) of a
``torch.optim.lr_scheduler.LRScheduler`` subclass, built as ``cls(optimizer, **kwargs)``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flowalign.config_checks import _did_you_mean, _require, suggest
from flowalign.errors import ConfigError

__all__ = ["SCHEDULES", "constant_multiplier", "cosine_multiplier", "linear_multiplier", "build_lr_scheduler", "check_lr_scheduler"]


def _warmup(step: int, warmup_steps: int) -> float:
    # transformers.optimization: float(current_step) / float(max(1, num_warmup_steps)).
    return float(step) / float(max(1, warmup_steps))


def _progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """Fraction of the post-warmup steps done, clamped to [0, 1]."""
    return min(1.0, float(step - warmup_steps) / float(max(1, total_steps - warmup_steps)))


def constant_multiplier(step: int, *, warmup_steps: int) -> float:
    """Linear warmup to 1, then 1 (``transformers.get_constant_schedule_with_warmup``)."""
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def cosine_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then a half cosine from 1 to ``min_lr_ratio`` at ``total_steps``.

    ``transformers.get_cosine_schedule_with_warmup`` (``min_lr_ratio = 0``) and
    ``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=...)``; cosine annealing is
    Loshchilov & Hutter 2017 (SGDR), Eq. 5, with ``eta_min = min_lr_ratio * lr0`` and one period."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup_steps, total_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def linear_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then a straight line from 1 to ``min_lr_ratio`` at ``total_steps``
    (``transformers.get_linear_schedule_with_warmup`` when ``min_lr_ratio = 0``)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * max(0.0, 1.0 - _progress(step, warmup_steps, total_steps))


#: schedule name -> multiplier of the configured learning rate (see the module docstring).
SCHEDULES: dict[str, Callable[..., float]] = {"constant": constant_multiplier, "cosine": cosine_multiplier, "linear": linear_multiplier}


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _scheduler_class(name: str, key: str) -> type:
    """The ``LRScheduler`` subclass the class path ``name`` names; a ConfigError naming ``key`` otherwise."""
    from flowalign.config_components import import_path

    try:
        obj = import_path(name, key)
    except ValueError as err:
        attr = str(name).replace(":", ".").rpartition(".")[2]
        known = sorted(n for n, v in vars(torch.optim.lr_scheduler).items()
                       if isinstance(v, type) and issubclass(v, torch.optim.lr_scheduler.LRScheduler))
        match = suggest(attr, known)
        raise ConfigError(f"{err}" + (f"; did you mean 'torch.optim.lr_scheduler.{match}'?" if match else "")) from None
    _require(isinstance(obj, type) and issubclass(obj, torch.optim.lr_scheduler.LRScheduler), key,
             f"{name!r} is not a torch.optim.lr_scheduler.LRScheduler subclass (it is {obj!r})")
    _require(not issubclass(obj, torch.optim.lr_scheduler.ReduceLROnPlateau), key,
             f"{name!r} needs a metric at every step(); flowalign steps the schedule without one")
    return obj


def check_lr_scheduler(name: str, *, warmup_steps: int, min_lr_ratio: float, kwargs: Mapping[str, Any] | None,
                       total_steps: int, key: str = "train.lr_scheduler") -> None:
    """Check the settings :func:`build_lr_scheduler` takes, over ``total_steps`` optimizer steps.

    Raises:
        ConfigError: its message starts with the offending key: ``<key>._component_`` (unknown name,
            with a "did you mean"; a class path that does not import or is no ``LRScheduler``),
            ``<key>.warmup_steps`` (not an integer in ``[0, total_steps)``; nonzero for a class),
            ``<key>.min_lr_ratio`` (outside ``[0, 1]``; nonzero for ``constant`` or a class),
            ``<key>.kwargs`` (given to a named schedule) or ``<key>.kwargs.<name>`` (an argument the
            class does not take, or a required one missing).
    """
    kwargs = kwargs or {}
    _require(isinstance(name, str) and name != "", f"{key}._component_", f"must be a schedule name or class path, got {name!r}")
    if name not in SCHEDULES and not any(c in name for c in ".:"):
        raise ConfigError(f"{key}._component_: unknown schedule {name!r}{_did_you_mean(name, SCHEDULES)}; choose from "
                          f"{' | '.join(SCHEDULES)}, or a class path such as torch.optim.lr_scheduler.StepLR")
    if name in SCHEDULES:
        _require(_is_integer(warmup_steps) and 0 <= warmup_steps < total_steps, f"{key}.warmup_steps",
                 f"must be an integer in [0, {total_steps}) (the run has {total_steps} optimizer steps), got {warmup_steps!r}")
        _require(isinstance(min_lr_ratio, numbers.Real) and 0.0 <= min_lr_ratio <= 1.0, f"{key}.min_lr_ratio",
                 f"must be in [0, 1], got {min_lr_ratio!r}")
        _require(name != "constant" or min_lr_ratio == 0, f"{key}.min_lr_ratio",
                 "the constant schedule does not decay; leave it at 0 or choose cosine | linear")
        _require(not kwargs, f"{key}.kwargs", f"the {name!r} schedule takes no kwargs (got {', '.join(map(str, kwargs))}); "
                                              "use warmup_steps / min_lr_ratio, or a torch scheduler class path")
        return
    cls = _scheduler_class(name, f"{key}._component_")
    for field, value in (("warmup_steps", warmup_steps), ("min_lr_ratio", min_lr_ratio)):
        _require(value == 0, f"{key}.{field}", f"applies to constant | cosine | linear only; leave it at 0 for {name} "
                                               "(give the class its own arguments under kwargs)")
    params = list(inspect.signature(cls).parameters.values())[1:]  # the first one is the optimizer
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    for arg in kwargs:
        _require(any_keyword or arg in named, f"{key}.kwargs.{arg}",
                 f"{name} takes no argument {arg!r}{_did_you_mean(arg, named)}; it takes: {', '.join(named) or 'nothing'}")
        _require(arg != "last_epoch", f"{key}.kwargs.last_epoch", "is set from the checkpoint on resume; leave it out")
    for p in params:
        _require(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in kwargs,
                 f"{key}.kwargs.{p.name}", f"missing; {name} needs it")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, *, total_steps: int, warmup_steps: int = 0,
                       min_lr_ratio: float = 0.0, kwargs: Mapping[str, Any] | None = None,
                       key: str = "train.lr_scheduler") -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule ``name`` over ``optimizer`` for a run of ``total_steps`` optimizer steps.

    A name in :data:`SCHEDULES` gives a ``LambdaLR`` over a ``functools.partial`` of its
    multiplier (its ``state_dict`` round-trips; the schedule's settings come from the arguments,
    not the state). Any other name is a class path built as ``cls(optimizer, **kwargs)``.

    Raises:
        ConfigError (a ValueError): as :func:`check_lr_scheduler`, naming ``key``.
    """
    check_lr_scheduler(name, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, kwargs=kwargs, total_steps=total_steps, key=key)
    if name in SCHEDULES:
        fn = SCHEDULES[name]
        settings = {"warmup_steps": int(warmup_steps), "total_steps": int(total_steps), "min_lr_ratio": float(min_lr_ratio)}
        accepted = inspect.signature(fn).parameters
        return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(fn, **{k: v for k, v in settings.items() if k in accepted}))
    # an OmegaConf node -> plain containers (a ListConfig is no list, e.g. for MultiStepLR's milestones)
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else dict(kwargs or {})
    return _scheduler_class(name, f"{key}._component_")(optimizer, **kwargs)
