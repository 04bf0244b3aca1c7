"""Atomic checkpoints with exact resume.

Layout of one checkpoint, ``<run_dir>/checkpoints/step-000123/``::

    model.safetensors   trainable weights (always)
    optimizer.pt        optimizer state_dict (torch.save; optional)
    ema.safetensors     EMA shadow weights (optional)
    rng.pt              flowalign.training.rng.capture_rng_state() (torch.save; optional)
    state.json          {"format": 1, "step": int, "files": [...], "extra": {...}} -- written last

A checkpoint is written into a sibling temp folder ``.tmp-step-000123-<pid>``, every file is
fsync'ed, and the folder is then renamed into place with ``os.replace`` -- so a ``step-*`` folder
is either absent or complete. ``<run_dir>/checkpoints/latest`` (a text file holding the folder
name) is then rewritten through a temp file + ``os.replace``. A folder counts as *complete* when
its ``state.json`` parses and every file it lists exists; readers ignore everything else.

Only the main process should call :func:`save_checkpoint` (in a multi-process run, gather what
other ranks own -- e.g. their RNG states -- into ``rng_state`` / ``extra`` first).

``.pt`` files are loaded with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from flowalign.training.rng import capture_rng_state, restore_rng_state

__all__ = ["Checkpoint", "save_checkpoint", "latest_checkpoint", "load_checkpoint", "save_training_state",
           "resume_training_state"]

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng.pt"

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the checkpoint folder.
        step: the training step it was saved at.
        model_state: trainable weights, name -> tensor.
        optimizer_state: the optimizer's ``state_dict()``, or ``None`` if not saved.
        ema_state: EMA shadow weights, name -> tensor, or ``None``.
        rng_state: the saved RNG dict (see :mod:`flowalign.training.rng`), or ``None``.
        extra: JSON-able run state (data position, best eval, ...); ``{}`` if none was given.
    """

    path: str
    step: int
    model_state: dict[str, Tensor]
    optimizer_state: dict | None
    ema_state: dict[str, Tensor] | None
    rng_state: dict | None
    extra: dict


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: ``step-000123``."""
    return f"step-{step:06d}"


# --------------------------------------------------------------------------------------- write


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Persist a directory entry change (rename/create); a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensor_dict_for_safetensors(state: Any, arg: str) -> dict[str, Tensor]:
    """Detached, CPU, contiguous, cloned copies (safetensors rejects shared or strided storage)."""
    if not isinstance(state, dict):
        raise TypeError(f"{arg} must be a dict[str, Tensor], got {type(state).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"{arg} keys must be str, got {key!r} ({type(key).__name__})")
        if not isinstance(value, Tensor):
            raise TypeError(f"{arg}[{key!r}] must be a Tensor, got {type(value).__name__}")
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def _write_json_atomic(path: str, payload: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def save_checkpoint(
    run_dir: str,
    step: int,
    *,
    model_state: dict[str, Tensor],
    optimizer_state: dict | None = None,
    ema_state: dict[str, Tensor] | None = None,
    rng_state: dict | None = None,
    extra: dict | None = None,
    keep_last: int | None = 2,
) -> str:
    """Write ``run_dir/checkpoints/step-{step:06d}`` atomically and point ``latest`` at it.

    Args:
        run_dir: the run's folder (created if missing).
        step: non-negative training step.
        model_state: trainable weights, name -> tensor (saved as ``model.safetensors``).
        optimizer_state: ``optimizer.state_dict()`` (``optimizer.pt``).
        ema_state: EMA shadow weights (``ema.safetensors``).
        rng_state: :func:`flowalign.training.rng.capture_rng_state` output, or any dict of
            tensors / plain Python values (``rng.pt``).
        extra: JSON-serialisable run state (``state.json``); tuples come back as lists.
        keep_last: after writing, delete the oldest complete checkpoints so that at most this many
            remain (the one just written is never deleted); ``None`` keeps all.

    Returns:
        The final checkpoint folder path.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    model = _tensor_dict_for_safetensors(model_state, "model_state")
    if not model:
        raise ValueError("model_state is empty: a checkpoint needs at least one trainable tensor")
    ema = _tensor_dict_for_safetensors(ema_state, "ema_state") if ema_state is not None else None
    if optimizer_state is not None and not isinstance(optimizer_state, dict):
        raise TypeError(f"optimizer_state must be a dict (optimizer.state_dict()), got {type(optimizer_state).__name__}")
    if rng_state is not None and not isinstance(rng_state, dict):
        raise TypeError(f"rng_state must be a dict (capture_rng_state()), got {type(rng_state).__name__}")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    files = [MODEL_FILE]
    if optimizer_state is not None:
        files.append(OPTIMIZER_FILE)
    if ema is not None:
        files.append(EMA_FILE)
    if rng_state is not None:
        files.append(RNG_FILE)
    try:
        state_json = json.dumps(
            {"format": FORMAT_VERSION, "step": step, "files": files, "extra": extra}, indent=2, sort_keys=True
        )
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra must be JSON-serialisable: {err}") from err

    ckpt_root = os.path.join(run_dir, CHECKPOINTS_DIR)
    os.makedirs(ckpt_root, exist_ok=True)
    name = step_dir_name(step)
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    trash = os.path.join(ckpt_root, f".old-{name}-{os.getpid()}")
    for leftover in (tmp, trash):  # from an earlier failed attempt of this process
        if os.path.exists(leftover):
            shutil.rmtree(leftover)

    try:
        os.makedirs(tmp)
        save_file(model, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
        if optimizer_state is not None:
            torch.save(optimizer_state, os.path.join(tmp, OPTIMIZER_FILE))
        if ema is not None:
            save_file(ema, os.path.join(tmp, EMA_FILE), metadata={"format": "pt"})
        if rng_state is not None:
            torch.save(rng_state, os.path.join(tmp, RNG_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:  # last: completion marker
            fh.write(state_json)
        for fname in files + [STATE_FILE]:
            _fsync_file(os.path.join(tmp, fname))
        _fsync_dir(tmp)

        # A non-empty directory cannot be os.replace()d over, so an existing checkpoint of the same
        # step is first moved aside; readers fall back to the newest complete folder meanwhile.
        if os.path.exists(final):
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(trash) and not os.path.exists(final):
            try:  # put the previous checkpoint of this step back
                os.replace(trash, final)
            except OSError:
                pass
        raise
    if os.path.exists(trash):
        shutil.rmtree(trash, ignore_errors=True)

    _write_json_atomic(os.path.join(ckpt_root, LATEST_FILE), name + "\n")

    if keep_last is not None:
        _prune(ckpt_root, keep_last, keep=name)
    return final


def _prune(ckpt_root: str, keep_last: int, keep: str) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last``, never ``keep``."""
    complete = _complete_checkpoints(ckpt_root)
    for _, name in complete[: max(0, len(complete) - keep_last)]:
        if name != keep:
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------- read


def _read_state(folder: str) -> dict:
    """Parse and validate ``state.json`` of a checkpoint folder (errors name the file)."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {folder!r} is incomplete: missing {STATE_FILE} ({path})")
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {folder!r}: corrupt {STATE_FILE} ({path}): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {folder!r}: {STATE_FILE} must hold a JSON object ({path})")
    for key, typ in (("step", int), ("files", list), ("extra", dict)):
        if not isinstance(state.get(key), typ):
            raise ValueError(f"checkpoint {folder!r}: {STATE_FILE} key {key!r} missing or not {typ.__name__} ({path})")
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {folder!r}: unsupported {STATE_FILE} format {state.get('format')!r} "
            f"(this flowalign reads format {FORMAT_VERSION})"
        )
    if MODEL_FILE not in state["files"]:
        raise ValueError(f"checkpoint {folder!r}: {STATE_FILE} does not list {MODEL_FILE} ({path})")
    return state


def _is_complete(folder: str) -> bool:
    try:
        state = _read_state(folder)
    except (FileNotFoundError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(folder, f)) for f in state["files"])


def _complete_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """``(step, folder name)`` of every complete ``step-*`` folder, ascending by step."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _STEP_DIR.match(name)
        if m and _is_complete(os.path.join(ckpt_root, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    """Path of the checkpoint to resume from, or ``None`` if ``run_dir`` has none.

    Reads ``run_dir/checkpoints/latest``; if it is missing, malformed or names an incomplete
    folder, falls back to the complete ``step-*`` folder with the highest step. Temp folders
    (``.tmp-*``, ``.old-*``) are ignored.
    """
    ckpt_root = os.path.join(run_dir, CHECKPOINTS_DIR)
    latest = os.path.join(ckpt_root, LATEST_FILE)
    try:
        with open(latest, encoding="utf-8") as fh:
            name = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and _is_complete(os.path.join(ckpt_root, name)):
        return os.path.join(ckpt_root, name)
    complete = _complete_checkpoints(ckpt_root)
    return os.path.join(ckpt_root, complete[-1][1]) if complete else None


def _load_safetensors(folder: str, fname: str, map_location: str) -> dict[str, Tensor]:
    path = os.path.join(folder, fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {folder!r}: missing {fname} ({path})")
    try:
        return load_file(path, device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"checkpoint {folder!r}: corrupt {fname} ({path}): {err}") from err


def _load_torch(folder: str, fname: str, map_location: str) -> Any:
    path = os.path.join(folder, fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {folder!r}: missing {fname} ({path})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise ValueError(f"checkpoint {folder!r}: corrupt or unsafe {fname} ({path}): {err}") from err


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder written by :func:`save_checkpoint`.

    Args:
        path: the ``step-*`` folder (e.g. from :func:`latest_checkpoint`).
        map_location: device for every tensor.

    Raises:
        FileNotFoundError: the folder or a file listed in its ``state.json`` is missing.
        ValueError: a file is corrupt (the message names it).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    device = str(map_location)
    state = _read_state(path)
    files = set(state["files"])
    return Checkpoint(
        path=path,
        step=state["step"],
        model_state=_load_safetensors(path, MODEL_FILE, device),
        optimizer_state=_load_torch(path, OPTIMIZER_FILE, device) if OPTIMIZER_FILE in files else None,
        ema_state=_load_safetensors(path, EMA_FILE, device) if EMA_FILE in files else None,
        rng_state=_load_torch(path, RNG_FILE, "cpu") if RNG_FILE in files else None,
        extra=state["extra"],
    )


def save_training_state(run_dir: str, step: int, module: torch.nn.Module, optimizer: Any, *, ema: Any = None,
                        extra: dict | None = None, keep_last: int | None = 2) -> str:
    """Atomically checkpoint a run at ``step``, for any recipe: the trainable weights of ``module``
    (frozen ones come back from the pretrained model), the optimizer, the EMA shadow (if any), the
    global RNG state and the recipe's ``extra`` (JSON). :func:`resume_training_state` reads it back.

    Returns:
        the checkpoint folder.
    """
    return save_checkpoint(
        run_dir, step,
        model_state={n: p.detach() for n, p in module.named_parameters() if p.requires_grad},
        optimizer_state=optimizer.state_dict(),
        ema_state=ema.state_dict() if ema is not None else None,
        rng_state=capture_rng_state(),
        extra=extra,
        keep_last=keep_last,
    )


def resume_training_state(resume: str, run_dir: str, module: torch.nn.Module, optimizer: Any,
                          ema: Any = None) -> Checkpoint | None:
    """Restore a run from the checkpoint that ``train.resume`` names, for any recipe.

    ``resume`` is ``"never"``, ``"auto"`` (the newest complete checkpoint in ``run_dir``, if any) or
    a checkpoint folder. Loads the trainable weights into ``module`` (non-strict: frozen weights
    come from the pretrained model), the optimizer state, the EMA shadow (when both exist) and the
    global RNG state. Returns the checkpoint, whose ``extra`` the recipe reads, or None.

    Raises:
        ValueError: the checkpoint lacks a trainable parameter of ``module`` (another model).
    """
    if resume == "never":
        return None
    path = latest_checkpoint(run_dir) if resume == "auto" else resume
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in ckpt.model_state]
    if missing:
        raise ValueError(f"checkpoint {path!r} does not match the model (missing {missing[:3]}...); "
                         "set train.resume=never or use another output_dir")
    module.load_state_dict(ckpt.model_state, strict=False)
    optimizer.load_state_dict(ckpt.optimizer_state)
    if ema is not None and ckpt.ema_state is not None:
        ema.load_state_dict(ckpt.ema_state)
    if ckpt.rng_state is not None:
        restore_rng_state(ckpt.rng_state)
    return ckpt
