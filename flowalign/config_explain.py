"""The ``flowalign validate --explain`` table: one row per config key with its value, its default
and its documentation."""

from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from typing import Any, NamedTuple, Sequence

from flowalign.config_schema import RLConfig
from flowalign.errors import ConfigError


# ------------------------------------------------------------------------------------------------
# Documentation
# ------------------------------------------------------------------------------------------------


class ExplainRow(NamedTuple):
    """One key of ``flowalign validate --explain``; ``value`` is the effective value (the default
    when explaining a class), ``changed`` whether the loaded config set it to something else."""

    key: str
    value: str
    default: str
    doc: str
    changed: bool = False


def _default_of(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]


def explain(config: Any = RLConfig, prefix: str = "") -> list[ExplainRow]:
    """One :class:`ExplainRow` per key, recursively: for a config class its defaults (every
    algorithm's own node included); for a loaded config its effective values (a DLLMConfig's with
    its algorithm's defaults applied) beside them, and only its own algorithm's node."""
    if isinstance(config, type):
        return _explain_rows(config, None, None, prefix)
    effective = config
    if hasattr(config, "resolved"):
        try:
            effective = config.resolved()
        except ConfigError:
            pass
    return _explain_rows(type(config), config, effective, prefix)


def _explain_rows(cls: type, raw: Any, effective: Any, prefix: str) -> list[ExplainRow]:
    rows = []
    for f in fields(cls):
        key, default, doc = f"{prefix}{f.name}", _default_of(f), f.metadata.get("help", "")
        if is_dataclass(default):
            if prefix == "algorithm." and raw is not None and f.name != raw.name:
                continue  # another algorithm's own settings: not used by this config
            rows.append(ExplainRow(key, "", "", doc))
            rows.extend(_explain_rows(type(default), getattr(raw, f.name, None), getattr(effective, f.name, None), key + "."))
        elif raw is None:
            rows.append(ExplainRow(key, repr(default), repr(default), doc))
        else:
            value = getattr(raw, f.name)
            rows.append(ExplainRow(key, repr(getattr(effective, f.name, value)), repr(default), doc, value != default))
    return rows


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_explain(rows: Sequence[ExplainRow], width: int = 36) -> str:
    """``rows`` as a table ``key | value | default | doc``; ``*`` marks keys set to a non-default value."""
    kw = max(len(r.key) for r in rows)
    vw = min(width, max(len("value"), *(len(r.value) for r in rows)))
    dw = min(width, max(len("default"), *(len(r.default) for r in rows)))
    lines = [f"  {'key':<{kw}}  {'value':<{vw}}  {'default':<{dw}}  doc"]
    for r in rows:
        lines.append(f"{'*' if r.changed else ' '} {r.key:<{kw}}  {_clip(r.value, vw):<{vw}}  {_clip(r.default, dw):<{dw}}  {r.doc}")
    lines.append("(* = set to a value other than the default)")
    return "\n".join(lines)
