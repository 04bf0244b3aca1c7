"""The config field helper :func:`_f`: a dataclass field whose ``metadata`` carries its one-line
documentation (``flowalign validate --explain``) and its checks (bounds, choices, path). Every
config dataclass uses it, the algorithm modules' own config nodes included (which is why it lives
apart from the schema: :mod:`flowalign.config_schema` imports the algorithms)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Sequence


def _f(default: Any = None, help: str = "", factory: Any = None, *,  # noqa: A002
       ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
       choices: Sequence[str] | None = None, path: bool = False, why: str = "") -> Any:
    """A dataclass field with its documentation and checks in ``metadata``.

    Args:
        default / factory: the default value, or a zero-argument factory of it.
        help: one line of documentation (``flowalign validate --explain``).
        ge, gt, le, lt: bounds of a numeric field (applied to every number of a list field).
        choices: the admissible values of a string field (``None`` stays admissible for an optional one).
        path: a file or folder path, resolved by :func:`resolve_path` when the config is loaded.
        why: appended to the range error, e.g. ``"group-relative advantages need several samples"``.
    """
    meta: dict[str, Any] = {"help": help}
    meta.update({k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None})
    if choices is not None:
        meta["choices"] = tuple(choices)
    if path:
        meta["path"] = True
    if why:
        meta["why"] = why
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
