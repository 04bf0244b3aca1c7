"""Reusable checks of config values, each error naming the offending key: "did you mean"
suggestions, the structure of loaded data against a schema, numeric ranges and finiteness, and
enumeration choices."""

from __future__ import annotations

import difflib
import functools
import math
import numbers
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Sequence, Union

from omegaconf import DictConfig, ListConfig

from flowalign.errors import ConfigError


#: metadata keys of a numeric field's bounds, and how each reads in a message.
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


# ------------------------------------------------------------------------------------------------
# Did you mean
# ------------------------------------------------------------------------------------------------


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()


#: names other trainers use for a key -> flowalign's name (for "did you mean").
_KEY_ALIASES = {"learning_rate": "lr", "epochs": "iterations", "num_iterations": "iterations", "batch_size": "micro_batch_size",
                "max_grad_norm": "grad_clip", "num_generations": "group_size", "beta": "kl_beta", "epsilon": "clip_range"}


def _drop_common_sections(word: str, candidate: str) -> tuple[str, str]:
    """``("sampling.noise_lvl", "sampling.noise_level")`` -> ``("noise_lvl", "noise_level")``: a
    shared section says nothing about how close two keys are."""
    a, b = word.split("."), candidate.split(".")
    while len(a) > 1 and len(b) > 1 and a[0] == b[0]:
        a, b = a[1:], b[1:]
    return ".".join(a), ".".join(b)


def suggest(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (case-insensitive), or ``None`` when none is close.

    Dotted keys are compared without their shared leading sections, and also by their last
    component alone, so ``noise_level`` or ``train.noise_level`` suggest ``sampling.noise_level``."""
    word = str(word)
    last = word.rsplit(".", 1)[-1]
    best, best_score = None, (cutoff, 0.0)
    for cand in candidates:
        full = _similarity(*_drop_common_sections(word, cand))
        cand_last = cand.rsplit(".", 1)[-1]
        tail = 0.0
        if "." in cand and len(last) > 1:
            tail = 0.95 if _KEY_ALIASES.get(last.lower()) == cand_last else _similarity(last, cand_last)
            tail = tail if tail >= max(cutoff, 0.75) else 0.0
        score = (max(full, tail), full)
        if score[0] >= cutoff and score > best_score:
            best, best_score = cand, score
    return best


def _did_you_mean(word: Any, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` or ``""``."""
    match = suggest(str(word), candidates)
    return f"; did you mean {match!r}?" if match is not None else ""


def _require_choice(value: Any, choices: Sequence[str], key: str, what: str = "value", why: str = "") -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``value`` is one of ``choices``."""
    if value in choices:
        return
    raise ConfigError(f"{key}: unknown {what} {value!r}{_did_you_mean(value, choices)}; choose from "
                      f"{' | '.join(map(str, choices))}" + (f" ({why})" if why else ""))


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config dataclass (cached: the schemas do not change)."""
    return typing.get_type_hints(cls)


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key path of a config dataclass, nested sections included (``train.optimizer.lr``)."""
    keys = []
    for name, tp in _type_hints(cls).items():
        keys.append(prefix + name)
        inner = _strip_optional(tp)
        if is_dataclass(inner):
            keys.extend(schema_keys(inner, f"{prefix}{name}."))
    return keys


#: keys of flowalign 0.1 that moved when algorithms became units (0.2) -> where they live now.
MOVED_KEYS = {
    "algorithm.advantage": "algorithm.name (advantage: group -> grpo, mix_grpo, pref_grpo or awm; branch -> branch_grpo; "
                           "tempflow -> tempflow_grpo; dense -> dense_grpo; vgpo -> vgpo)",
    "algorithm.loss": "algorithm.name (the loss is the algorithm's: awm trains 'awm', the others 'ppo_clip')",
    "algorithm.reward_normalization": "algorithm.name=multi_reward (decoupled normalisation; 'sum' is grpo)",
    **{f"algorithm.{k}": f"algorithm.branch_grpo.{k}" for k in (
        "fusion", "fusion_temperature", "prune", "prune_keep", "depth_prune_window", "depth_prune_stride")},
    "sampling.splits": "algorithm.branch_grpo.splits",
    "sampling.split_noise_level": "algorithm.branch_grpo.split_noise_level",
    "sampling.branch_steps": "algorithm.tempflow_grpo.branch_steps",
    "algorithm.noise_aware": "algorithm.tempflow_grpo.noise_aware",
    "sampling.window": "algorithm.mix_grpo (strategy, size, shift_every, ...; with algorithm.name=mix_grpo)",
    "algorithm.lookahead_steps": "algorithm.dense_grpo.lookahead_steps or algorithm.vgpo.lookahead_steps",
    **{f"algorithm.{k}": f"algorithm.dense_grpo.{k}" for k in ("calibrate_noise", "calibration_rate", "calibration_margin")},
    **{f"algorithm.{k}": f"algorithm.vgpo.{k}" for k in ("discount", "value_anchor", "anchor_steps")},
    "algorithm.hint_fraction": "algorithm.igpo.hint_fraction",
    "algorithm.hinted_rollouts": "algorithm.igpo.hinted_rollouts",
}


def moved_key(key: str) -> str | None:
    """Where a flowalign 0.1 key (or a key below it, ``sampling.window.size``) lives now, or ``None``."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new
    return None


def _unknown_key(key: str, schema: type, where: str = "") -> ConfigError:
    moved = moved_key(key)
    if moved is not None:
        return ConfigError(f"{key}: this key moved to {moved}: each algorithm's own settings now live under "
                           f"algorithm.<name> (`flowalign validate --explain` lists the keys){where}")
    hint = _did_you_mean(key, schema_keys(schema))
    return ConfigError(f"{key}: unknown key{hint}{where}; `flowalign validate --explain` lists the keys")


# ------------------------------------------------------------------------------------------------
# Structure of the loaded data against the schema (before OmegaConf sees it)
# ------------------------------------------------------------------------------------------------


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other types unchanged)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Any
    return tp


def _kind(value: Any) -> str:
    if isinstance(value, (Mapping, DictConfig)):
        return "a mapping"
    if isinstance(value, (list, tuple, ListConfig)):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def check_structure(value: Any, tp: Any, key: str, schema: type | None = None) -> None:
    """Check that plain data ``value`` has the shape of type ``tp``: a mapping for a config section
    (whose keys must be fields: unknown keys get a "did you mean" over ``schema``'s keys), a list
    for a list field, a mapping for a dict field, a single value for a scalar field.

    Raises:
        ConfigError: naming the key path of the first mismatch.
    """
    if tp is Any or value is None:
        return  # None: OmegaConf reports a None given to a non-optional field, naming the key
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, (Mapping, DictConfig)):
            raise ConfigError(f"{key}: must be a mapping of {tp.__name__} keys (see `flowalign validate --explain`), got {_kind(value)}")
        hints = _type_hints(tp)
        for name, item in value.items():
            if name not in hints:
                raise _unknown_key(_join(key, name), schema or tp)
            check_structure(item, hints[name], _join(key, name), schema)
    elif origin is list or tp is list:
        if not isinstance(value, (list, tuple, ListConfig)):
            raise ConfigError(f"{key}: must be a list, got {_kind(value)}")
        element = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        for i, item in enumerate(value):
            check_structure(item, element, f"{key}[{i}]", schema)
    elif origin is dict or tp is dict:
        if not isinstance(value, (Mapping, DictConfig)):
            raise ConfigError(f"{key}: must be a mapping, got {_kind(value)}")
        args = typing.get_args(tp)
        for name, item in value.items():
            check_structure(item, args[1] if args else Any, _join(key, name), schema)
    elif isinstance(value, (Mapping, DictConfig, list, tuple, ListConfig)):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{key}: must be a single {name} value, got {_kind(value)}")


# ------------------------------------------------------------------------------------------------
# Field checks (ranges, finiteness, enumerations)
# ------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _require_gaussian_log_probs(cfg: Any, key: str) -> None:
    """The ratio normalisation of Pref-GRPO / GRPO-Guard (``key``, when on) adds the Gaussian bias term
    ``‖μ − μ_old‖² / (2 s²)``, which CPS's constant-free Flow-GRPO log-prob does not have."""
    s = cfg.sampling
    _require(not (s.sampler == "cps" and s.cps_log_prob == "flow_grpo"), key,
             "needs Gaussian log-probs: it cannot be combined with sampling.cps_log_prob: flow_grpo "
             "(set one of them to false / exact)")


def _bound_text(value: float) -> str:
    if isinstance(value, int) and value > 2**20 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def range_text(meta: Mapping[str, Any]) -> str:
    """A field's bounds in words: ``"> 0"``, ``">= 1"``, ``"in [0, 1)"`` (``""`` when unbounded)."""
    low = next(((k, meta[k]) for k in ("ge", "gt") if k in meta), None)
    high = next(((k, meta[k]) for k in ("le", "lt") if k in meta), None)
    if low and high:
        return (f"in {'[' if low[0] == 'ge' else '('}{_bound_text(low[1])}, "
                f"{_bound_text(high[1])}{']' if high[0] == 'le' else ')'}")
    bound = low or high
    return f"{_BOUNDS[bound[0]]} {_bound_text(bound[1])}" if bound else ""


def _in_range(value: float, meta: Mapping[str, Any]) -> bool:
    return (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
            and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))


def check_numbers(value: Any, key: str, meta: Mapping[str, Any]) -> None:
    """Every number in ``value`` (a number, or nested lists / mappings of them) must be finite and
    within the bounds of ``meta`` (``ge``, ``gt``, ``le``, ``lt``; mappings: finiteness only).

    Raises:
        ConfigError: e.g. ``train.optimizer.lr: must be a finite number > 0, got inf``.
    """
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, numbers.Real):
        finite = math.isfinite(value)
        if finite and _in_range(value, meta):
            return
        bounds = range_text(meta)
        kind = "an integer" if isinstance(value, numbers.Integral) else "a finite number"
        why = f" ({meta['why']})" if meta.get("why") and finite else ""
        raise ConfigError(f"{key}: must be {kind}{' ' + bounds if bounds else ''}, got {value!r}{why}")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_numbers(item, f"{key}[{i}]", meta)
    elif isinstance(value, Mapping):
        for name, item in value.items():
            check_numbers(item, _join(key, name), {})


def check_fields(cfg: Any, prefix: str = "") -> None:
    """Check every field of a config dataclass, recursively, against its metadata: numbers finite
    and in range, strings among their ``choices`` (with a "did you mean"), and no NaN / infinity
    anywhere in free-form values (reward specs, adapter options, optimizer kwargs).

    Raises:
        ConfigError: naming the first offending key.
    """
    for f in fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        if is_dataclass(value):
            check_fields(value, key + ".")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value is not None:
            _require_choice(value, choices, key, why=f.metadata.get("why", ""))
        check_numbers(value, key, f.metadata)


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
