"""The files and folders a config names: relative paths resolved against the project root, UTF-8
text and prompt files read with errors naming their key, and the checks of ``output_dir`` and
``train.resume``."""

from __future__ import annotations

import os
from typing import Any

from flowalign.config_checks import _did_you_mean, _require
from flowalign.errors import ConfigError


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------


def project_root() -> str | None:
    """The flowalign project folder (the parent of the ``flowalign`` package directory) when it
    holds ``configs/`` -- true for the editable install the README describes -- else ``None``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isdir(os.path.join(root, "configs")) else None


def resolve_path(path: str) -> str:
    """Where a relative ``path`` of a config points.

    An absolute path, or a relative one that exists relative to the current directory, is returned
    as is (``~`` expanded). Otherwise, when it exists relative to :func:`project_root`, that
    absolute path is returned, so ``configs/quickstart.yaml`` and its ``assets/...`` files work
    from any directory. Anything else (a hub id, a missing file) is returned unchanged.
    """
    if not isinstance(path, str) or not path:
        return path
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded) or os.path.exists(expanded):
        return expanded
    root = project_root()
    if root is not None and os.path.exists(os.path.join(root, expanded)):
        return os.path.join(root, expanded)
    return path


def _searched(path: str) -> str:
    """Where :func:`resolve_path` looked for a missing relative ``path``, for error messages."""
    if os.path.isabs(os.path.expanduser(path)):
        return ""
    root = project_root()
    places = f"the current directory {os.getcwd()!r}" + (f" and the flowalign project root {root!r}" if root else "")
    return f" (looked in {places})"


# ------------------------------------------------------------------------------------------------
# Text and prompt files
# ------------------------------------------------------------------------------------------------


def _decode_utf8(data: bytes, path: str, label: str) -> str:
    """``data`` decoded as UTF-8 (a leading BOM dropped), or a ConfigError naming the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(f"{label}: {path!r} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} "
                          f"(line {line}, column {column}) ({err.reason}); save it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_text_file(path: str, label: str) -> str:
    """The UTF-8 text of the regular file ``path``.

    Raises:
        ConfigError: starting with ``label`` (a key, or the file itself) when the file is missing,
            is a directory or another non-regular file, cannot be read, or is not UTF-8.
    """
    if not os.path.exists(path):
        raise ConfigError(f"{label}: file not found: {path!r}{_searched(path)}")
    if os.path.isdir(path):
        raise ConfigError(f"{label}: {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise ConfigError(f"{label}: {path!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"{label}: cannot read {path!r}: {err.strerror or err}") from None
    return _decode_utf8(data, path, label)


def _require_file(path: str, key: str) -> None:
    """``path`` must exist (a file or a folder); the error says where relative paths were looked up."""
    _require(isinstance(path, str) and os.path.exists(path), key, f"file or folder not found: {path!r}{_searched(str(path))}")


def _looks_like_hub_id(path: str) -> bool:
    return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def read_prompt_records(path: str, key: str = "prompts") -> list[dict[str, Any]]:
    """Prompt records of a prompt file, each ``{"prompt": str, **metadata}``.

    ``.txt``: one prompt per non-empty line (``#`` starts a comment line). ``.jsonl``: one JSON
    object per line with a ``"prompt"`` string; the other keys are the prompt's metadata, handed to
    rewards that need it (e.g. GenEval's ``{"tag": ..., "include": [...]}``). The file must be a
    regular UTF-8 file with at least one prompt. Errors name ``key`` and the file (and line).
    """
    import json

    records = []
    for number, line in enumerate(read_text_file(path, key).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not path.endswith(".jsonl"):
            records.append({"prompt": line.strip()})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {path}:{number} is not valid JSON ({err.msg})") from None
        _require(isinstance(record, dict) and isinstance(record.get("prompt"), str), key,
                 f"{path}:{number} needs a \"prompt\" string")
        records.append(record)
    _require(len(records) > 0, key, f"{path!r} contains no prompts")
    return records


def read_prompts(path: str, key: str = "prompts") -> list[str]:
    """The prompt strings of a prompt file (see :func:`read_prompt_records`)."""
    return [r["prompt"] for r in read_prompt_records(path, key)]


# ------------------------------------------------------------------------------------------------
# Output folder and resume
# ------------------------------------------------------------------------------------------------


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """``path`` must be a folder flowalign can create (or write into).

    The nearest existing ancestor must be a writable folder -- no component of the path may be an
    existing file -- on a writable file system; a temporary folder is created and removed there
    (pseudo file systems such as ``/proc`` refuse it even to root, which ``os.access`` misses).

    Raises:
        ConfigError: naming ``key``, the path and the reason.
    """
    target = os.path.abspath(os.path.expanduser(path))
    probe = target
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    what = f"{path!r}" if probe == target else f"{path!r} ({probe!r} exists)"
    _require(os.path.exists(probe), key, f"cannot create {what}: it is a broken symbolic link")
    _require(os.path.isdir(probe), key, f"cannot create {what}: {probe!r} is a file, not a folder")
    _require(os.access(probe, os.W_OK | os.X_OK), key, f"cannot create {what}: {probe!r} is not writable")
    if hasattr(os, "statvfs"):
        _require(not os.statvfs(probe).f_flag & getattr(os, "ST_RDONLY", 1), key,
                 f"cannot create {what}: {probe!r} is on a read-only file system")
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".flowalign-write-test-", dir=probe))
    except OSError as err:
        raise ConfigError(f"{key}: cannot create {what}: making a folder in {probe!r} fails ({err.strerror or err})") from None


def check_resume(resume: str, key: str = "train.resume", *, check_files: bool = True) -> None:
    """``auto``, ``never``, or (checked when ``check_files``) an existing checkpoint folder."""
    if resume in ("auto", "never") or not check_files:
        return
    from flowalign.training.checkpoint import STATE_FILE

    hint = _did_you_mean(resume, ("auto", "never"))
    _require(os.path.isdir(resume), key,
             f"must be auto | never | an existing checkpoint folder (<run>/checkpoints/step-*), got {resume!r}{hint}")
    _require(os.path.isfile(os.path.join(resume, STATE_FILE)), key,
             f"{resume!r} is not a checkpoint folder (it has no {STATE_FILE}); give a <run>/checkpoints/step-* folder, auto or never")
