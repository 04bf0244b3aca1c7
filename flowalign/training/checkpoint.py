"""Atomic, hash-checked checkpoints with exact resume.

Layout of ``<run_dir>/checkpoints/``::

    step-000123/            one checkpoint (see below)
    step-000124/
    latest                  text file naming the folder to resume from ("step-000124")

and of one checkpoint folder::

    model.safetensors   trainable weights (always)
    optimizer.pt        optimizer state_dict (torch.save; optional)
    ema.safetensors     EMA shadow weights (optional)
    rng.pt              flowalign.training.rng.capture_rng_state() (torch.save; optional)
    state.json          {"format": 2, "step": int, "files": [...], "sha256": {file: hex},
                         "bytes": {file: size}, "extra": {...}} -- written last

A **sharded** checkpoint (``train.fsdp.state_dict: sharded``, :func:`save_sharded_training_state`)
holds, instead of ``model.safetensors`` / ``optimizer.pt`` / ``ema.safetensors``, the per-process
shards that ``torch.distributed.checkpoint`` (DCP) wrote::

    shards/__0_0.distcp  shards/__1_0.distcp ...   each process's own model, optimizer and EMA shards
    shards/.metadata    DCP's index (global shapes, which chunk lies where)
    rng.pt              the main process's RNG state, as above
    state.json          format 3: as above (every shard file hashed) plus "sharded":
                        {"world_size": W, "parts": ["ema", "model", "optimizer"]}

It is written by every process into the same temp folder (named by the main process), hashed by
every process (each reads back a share of the files), completed and renamed by the main process
alone, so it is absent or complete like any other. Only a sharded run reads it back
(:func:`resume_training_state`), with any number of processes: DCP cuts the saved chunks into the
current run's shards.

**Writing.** A checkpoint is written into a sibling temp folder ``.tmp-step-000123-<pid>``. Every
file goes through one Python file object that hashes (sha256) what it writes and keeps the
``OSError`` of a failed write: ``torch.save`` streams into it; a safetensors file is serialised in
memory first (one extra copy of those weights while it is written). On a full disk torch's and
safetensors' own file writers raise a ``RuntimeError`` / ``SafetensorError`` that no longer carries
the ``errno``. Each file is fsync'ed; ``state.json``, which records every file's sha256 and size, is
written last and marks the folder complete. The folder is then renamed into place with
``os.replace`` -- a ``step-*`` folder is absent or complete -- and ``latest`` is rewritten through a
temp file (``latest.tmp-<pid>``) + ``os.replace``. A failed write raises
:class:`~flowalign.errors.CheckpointError` naming the cause (disk full, with the free space left;
no permission; any other ``OSError`` with its path) and leaves every earlier checkpoint as it was.

**Checking.** A folder is *intact* when its ``state.json`` parses, names its own step and lists
files that all exist with the recorded size and sha256. Format-1 checkpoints (flowalign before
hashes) record neither: they are accepted when their files exist (complete but unverifiable).
Checking reads every file once, before any tensor is loaded, so a single flipped bit in tensor
data (which safetensors would load without complaint) is caught.

**Recovering.** :func:`latest_checkpoint` and :func:`resume_training_state` (``resume="auto"``) try
the folder ``latest`` names, then every ``step-*`` folder from the newest down; each damaged one is
named in a :class:`CheckpointWarning` (folder, file, cause) and skipped. When ``step-*`` folders
exist but none is intact, :func:`resume_training_state` raises ``CheckpointError`` naming each one
and why -- a run never silently starts from scratch -- and deletes nothing. A checkpoint named
explicitly (``resume=<folder>``) that fails its check raises ``CheckpointError`` too.
:func:`list_checkpoints` reports every folder's state; :func:`remove_run_checkpoints` removes a
run's checkpoints (``train.resume=never`` on an existing run).

**Stale temp files.** A process killed while saving leaves ``.tmp-step-*-<pid>`` (an unfinished
checkpoint), ``.old-step-*-<pid>`` (an earlier checkpoint of the same step, moved aside for the
rename) or ``latest.tmp-<pid>``. They are cleaned up at the start of :func:`save_checkpoint` and in
:func:`resume_training_state` when ``<pid>`` is not a live process on this machine (checked with
``os.kill(pid, 0)``) or is the current process (which saves one checkpoint at a time, so its own
leftovers are from an earlier failed attempt). An ``.old-step-N-*`` folder is put back as
``step-N`` when that folder is missing (the kill fell between the two renames), else removed.
Where liveness cannot be checked (Windows) only the current process's leftovers are removed. On a
filesystem shared between machines, a pid is checked on this machine only: flowalign saves from the
main process alone and never while another process resumes the same run.

Only the main process should call :func:`save_checkpoint` (in a multi-process run, gather what
other ranks own -- e.g. their RNG states -- into ``rng_state`` / ``extra`` first);
:func:`save_sharded_training_state` and, for a sharded module, :func:`resume_training_state` are
collectives that every process calls. When resuming a sharded module, the processes check the
candidate folders together (each hashes a share of the files) and all pick the same one.

``.pt`` files are loaded with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from flowalign.errors import CheckpointError
from flowalign.training.rng import capture_rng_state, restore_rng_state

__all__ = ["Checkpoint", "CheckpointStatus", "CheckpointWarning", "save_checkpoint", "latest_checkpoint",
           "load_checkpoint", "check_checkpoint", "list_checkpoints", "remove_stale_temp_files",
           "remove_run_checkpoints", "none_intact_message", "save_training_state", "resume_training_state",
           "TrainingStates", "training_states", "write_training_state", "save_sharded_training_state"]

FORMAT_VERSION = 2
#: the format of a sharded (per-process, torch.distributed.checkpoint) checkpoint
SHARDED_FORMAT = 3
READABLE_FORMATS = (1, 2, SHARDED_FORMAT)
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng.pt"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, EMA_FILE, RNG_FILE)
SHARDS_DIR = "shards"
SHARDS_METADATA = f"{SHARDS_DIR}/.metadata"

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_TEMP_DIR = re.compile(r"^\.(tmp|old)-(step-\d{6,})-(\d+)$")
_TEMP_LATEST = re.compile(r"^" + re.escape(LATEST_FILE) + r"\.tmp-(\d+)$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SHARD_FILE = re.compile(r"^" + SHARDS_DIR + r"/(?!\.\.?$)[^/\\]+$")
_READ_CHUNK = 8 << 20
#: the last line of a traceback: ``ValueError: ...``
_RAISED = re.compile(r"^[\w.]*(Error|Exception|Warning): ")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped while looking for one to resume from."""


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


@dataclass(frozen=True)
class CheckpointStatus:
    """What a check found in one checkpoint folder.

    Attributes:
        path: the folder.
        step: its step (from the ``step-*`` name, else from ``state.json``); ``None`` if unknown.
        intact: whether it can be resumed from.
        problem: why not (names the file and the cause); ``None`` when intact.
        verified: whether every file's sha256 was checked (``False`` for format-1 checkpoints,
            which record no hashes, and for checks asked not to read the files).
    """

    path: str
    step: int | None
    intact: bool
    problem: str | None = None
    verified: bool = False


class _Damaged(Exception):
    """A checkpoint folder fails its check; the message says which file and why."""


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: ``step-000123``."""
    return f"step-{step:06d}"


# --------------------------------------------------------------------------------------- write


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


def _write_chunk(fh: BinaryIO, data: bytes | memoryview) -> None:
    """The one place checkpoint bytes reach the disk (a plain write: errors are the OS's own)."""
    fh.write(data)


class _HashingWriter:
    """A write-only file object that hashes what it writes and keeps the first ``OSError``.

    ``torch.save`` turns an error of its file object into a ``RuntimeError`` that no longer says
    why; :func:`_write_file` re-raises the kept ``OSError`` instead.
    """

    def __init__(self, fh: BinaryIO, path: str):
        self._fh, self._path = fh, path
        self._sha = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        try:
            _write_chunk(self._fh, view)
        except OSError as err:
            if err.filename is None:
                err.filename = self._path
            self.error = err
            raise
        self._sha.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._fh.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _write_file(path: str, produce: Callable[[_HashingWriter], Any]) -> tuple[str, int]:
    """Create ``path``, let ``produce`` write into it, fsync it; returns ``(sha256 hex, size)``.

    Raises:
        OSError: the write failed (the error of the OS, with ``filename`` set).
    """
    with open(path, "wb") as fh:
        sink = _HashingWriter(fh, path)
        try:
            produce(sink)
        except Exception as err:
            if sink.error is not None and err is not sink.error:
                raise sink.error from err
            raise
        fh.flush()
        os.fsync(fh.fileno())
    return sink.hexdigest(), sink.size


def _torch_writer(obj: Any) -> Callable[[_HashingWriter], None]:
    """Stream ``obj`` through ``torch.save`` into the file (no second copy in memory)."""
    return lambda sink: torch.save(obj, sink)


def _safetensors_writer(tensors: dict[str, Tensor]) -> Callable[[_HashingWriter], None]:
    """Serialise ``tensors`` to safetensors bytes in memory, then write them."""
    return lambda sink: sink.write(safetensors_bytes(tensors, metadata={"format": "pt"}))


def _bytes_writer(data: bytes) -> Callable[[_HashingWriter], None]:
    return lambda sink: sink.write(data)


def _state_json(step: int, files: list[str], digests: dict[str, tuple[str, int]], extra: dict,
                sharded: dict | None = None) -> str:
    """The ``state.json`` text (``digests``: file -> (sha256, size)); with ``sharded`` (``{"world_size":
    W, "parts": [...]}``) that of a sharded checkpoint (:data:`SHARDED_FORMAT`).

    Raises:
        TypeError: ``extra`` is not JSON-serialisable.
    """
    state = {"format": FORMAT_VERSION if sharded is None else SHARDED_FORMAT, "step": step, "files": files, "extra": extra,
             "sha256": {f: digests[f][0] for f in files if f in digests},
             "bytes": {f: digests[f][1] for f in files if f in digests}}
    if sharded is not None:
        state["sharded"] = sharded
    try:
        return json.dumps(state, indent=2, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra must be JSON-serialisable: {err}") from err


def _mount_point(path: str) -> str:
    """The mount point holding ``path`` (the nearest existing ancestor's)."""
    path = os.path.realpath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    while not os.path.ismount(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _free_space(path: str) -> str:
    """``"1,234,567 bytes free on /mnt"`` for the filesystem holding ``path``."""
    mount = _mount_point(path)
    try:
        return f"{shutil.disk_usage(mount).free:,} bytes free on {mount}"
    except OSError:
        return f"free space on {mount} unknown"


def _write_error(err: OSError, what: str, near: str) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a failure to write ``what`` (a folder near ``near``)."""
    path = err.filename if err.filename is not None else near
    if err.errno == errno.ENOSPC:
        return CheckpointError(f"disk full while writing {what} ({_free_space(near)}); free some space, "
                               "keep fewer checkpoints (train.keep_checkpoints) or set output_dir on another disk")
    if getattr(errno, "EDQUOT", None) is not None and err.errno == errno.EDQUOT:
        return CheckpointError(f"disk quota exceeded while writing {what} ({path}); free some space or set "
                               "output_dir on another disk")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "read-only file system" if err.errno == errno.EROFS else (err.strerror or "permission denied")
        return CheckpointError(f"no permission to write {path} ({cause}) while saving {what}; make the folder "
                               "writable or set output_dir to one that is")
    reason = err.strerror or str(err) or type(err).__name__
    return CheckpointError(f"cannot write {what}: {path}: {reason}")


def _discard_attempt(tmp: str, final: str, trash: str) -> None:
    """Undo a failed save: drop the temp folder, put a moved-aside checkpoint of the step back."""
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(trash) and not os.path.exists(final):
        try:
            os.replace(trash, final)
        except OSError:
            pass


def _move_into_place(tmp: str, final: str, trash: str, ckpt_root: str) -> None:
    """Rename the completed temp folder ``tmp`` to ``final``. A non-empty directory cannot be
    ``os.replace()``d over, so an existing checkpoint of the same step is first moved aside to
    ``trash``; readers fall back to the newest complete folder meanwhile."""
    if os.path.exists(final):
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)


def _point_latest(ckpt_root: str, name: str, final: str, keep_last: int | None) -> None:
    """After ``final`` (folder ``name``) is in place: point ``latest`` at it, prune to ``keep_last``.

    Raises:
        CheckpointError: ``latest`` could not be written (the checkpoint itself is complete).
    """
    try:
        _write_latest(ckpt_root, name)
    except OSError as err:
        raise _write_error(err, f"{os.path.join(ckpt_root, LATEST_FILE)} (checkpoint {final} itself is complete)",
                           ckpt_root) from err
    if keep_last is not None:
        _prune(ckpt_root, keep_last, keep=name)


def _write_latest(ckpt_root: str, name: str) -> None:
    """Point ``latest`` at ``name`` through ``latest.tmp-<pid>`` + ``os.replace``."""
    path = os.path.join(ckpt_root, LATEST_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_file(tmp, _bytes_writer((name + "\n").encode()))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(ckpt_root)


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

    Stale temp folders of killed writers are cleaned up first (see the module docstring).

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

    Raises:
        TypeError, ValueError: bad arguments (nothing is written).
        CheckpointError: the disk is full, a permission is missing or another ``OSError`` stopped
            the write; earlier checkpoints are left as they were.
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
    parts: list[tuple[str, Callable[[_HashingWriter], Any]]] = [(MODEL_FILE, _safetensors_writer(model))]
    if optimizer_state is not None:
        parts.append((OPTIMIZER_FILE, _torch_writer(optimizer_state)))
    if ema is not None:
        parts.append((EMA_FILE, _safetensors_writer(ema)))
    if rng_state is not None:
        parts.append((RNG_FILE, _torch_writer(rng_state)))
    files = [fname for fname, _ in parts]
    _state_json(step, files, {}, extra)  # fail on a bad ``extra`` before writing anything

    ckpt_root = os.path.join(run_dir, CHECKPOINTS_DIR)
    name = step_dir_name(step)
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    trash = os.path.join(ckpt_root, f".old-{name}-{os.getpid()}")
    what = f"checkpoint {final}"
    try:
        os.makedirs(ckpt_root, exist_ok=True)
        remove_stale_temp_files(ckpt_root)
        os.makedirs(tmp)
        digests = {fname: _write_file(os.path.join(tmp, fname), produce) for fname, produce in parts}
        # last: the completion marker, holding every file's hash
        _write_file(os.path.join(tmp, STATE_FILE), _bytes_writer(_state_json(step, files, digests, extra).encode()))
        _fsync_dir(tmp)
        _move_into_place(tmp, final, trash, ckpt_root)
    except OSError as err:
        _discard_attempt(tmp, final, trash)
        raise _write_error(err, what, ckpt_root) from err
    except BaseException:
        _discard_attempt(tmp, final, trash)
        raise
    shutil.rmtree(trash, ignore_errors=True)
    _point_latest(ckpt_root, name, final, keep_last)
    return final


def _prune(ckpt_root: str, keep_last: int, keep: str) -> None:
    """Delete the oldest complete checkpoints beyond ``keep_last``, never ``keep``.

    Completeness is checked without hashing (sizes only), so pruning stays cheap; damaged folders
    are never deleted here (they are named on resume and left for the user to inspect).
    """
    complete = [s for s in _statuses(ckpt_root, verify=False) if s.intact]
    for status in complete[: max(0, len(complete) - keep_last)]:
        if os.path.basename(status.path) != keep:
            shutil.rmtree(status.path, ignore_errors=True)


# ----------------------------------------------------------------------------------- temp files


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this machine (``True`` where that cannot be told)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except (OverflowError, OSError):
        return False
    return True


def _is_stale(pid: int) -> bool:
    """A temp file of ``pid`` is stale when ``pid`` is this process (one save at a time) or dead."""
    return pid == os.getpid() or not _pid_alive(pid)


def _stale_temp_entries(ckpt_root: str) -> list[str]:
    """Names in ``ckpt_root`` left by a killed (or this process's failed) checkpoint write."""
    if not os.path.isdir(ckpt_root):
        return []
    stale = []
    for name in sorted(os.listdir(ckpt_root)):
        m = _TEMP_DIR.match(name) or _TEMP_LATEST.match(name)
        if m and _is_stale(int(m.groups()[-1])):
            stale.append(name)
    return stale


def remove_stale_temp_files(ckpt_root: str) -> list[str]:
    """Clean up what killed writers left in ``ckpt_root`` (a run's ``checkpoints`` folder).

    Removes stale ``.tmp-step-*-<pid>`` folders and ``latest.tmp-<pid>`` files; a stale
    ``.old-step-N-<pid>`` folder is renamed back to ``step-N`` when that is missing, else removed.
    Failures to remove are ignored (the entries are never read as checkpoints).

    Returns:
        the names that were removed or put back.
    """
    done = []
    for name in _stale_temp_entries(ckpt_root):
        path = os.path.join(ckpt_root, name)
        m = _TEMP_DIR.match(name)
        try:
            if m and m.group(1) == "old" and not os.path.exists(os.path.join(ckpt_root, m.group(2))):
                os.replace(path, os.path.join(ckpt_root, m.group(2)))
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue
        done.append(name)
    return done


def remove_run_checkpoints(run_dir: str) -> list[str]:
    """Remove the checkpoints of the run in ``run_dir`` (``train.resume=never`` on an existing run).

    Deletes every entry flowalign writes in ``run_dir/checkpoints`` (``step-*`` folders, ``latest``,
    temp files), then the folder itself when nothing else is left in it (a folder that is a
    symlink, or holds files of the user, stays).

    Returns:
        the names removed from ``run_dir/checkpoints`` (empty if it did not exist).

    Raises:
        CheckpointError: an entry could not be removed (names it and why).
    """
    ckpt_root = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_root):
        return []
    removed = []
    for name in sorted(os.listdir(ckpt_root)):
        if not (_STEP_DIR.match(name) or _TEMP_DIR.match(name) or _TEMP_LATEST.match(name) or name == LATEST_FILE):
            continue
        path = os.path.join(ckpt_root, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError as err:
            raise CheckpointError(f"cannot remove old checkpoint {path}: {err.strerror or err}; remove it by hand "
                                  "or set output_dir to a new folder") from err
        removed.append(name)
    if not os.path.islink(ckpt_root) and not os.listdir(ckpt_root):
        try:
            os.rmdir(ckpt_root)
        except OSError:  # something was written into it meanwhile: keep it
            pass
    return removed


# ---------------------------------------------------------------------------------------- check


def _read_state(folder: str) -> dict:
    """Parse and validate ``state.json`` of a checkpoint folder.

    Raises:
        _Damaged: it is missing, unreadable, not a checkpoint state of a readable format.
    """
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise _Damaged(f"missing {STATE_FILE} (the checkpoint was never completed)")
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except OSError as err:
        raise _Damaged(f"cannot read {STATE_FILE}: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Damaged(f"corrupt {STATE_FILE}: {err}") from err
    if not isinstance(state, dict):
        raise _Damaged(f"corrupt {STATE_FILE}: not a JSON object")
    if state.get("format") not in READABLE_FORMATS:
        raise _Damaged(f"{STATE_FILE} has unsupported format {state.get('format')!r} (this flowalign reads "
                       f"formats {', '.join(map(str, READABLE_FORMATS))}; a newer flowalign wrote it?)")
    for key, typ in (("step", int), ("files", list), ("extra", dict)):
        if not isinstance(state.get(key), typ) or isinstance(state.get(key), bool):
            raise _Damaged(f"corrupt {STATE_FILE}: key {key!r} missing or not {typ.__name__}")
    sharded = state["format"] == SHARDED_FORMAT
    unknown = [f for f in state["files"] if not _known_file(f, sharded)]
    if unknown:
        raise _Damaged(f"corrupt {STATE_FILE}: unknown files {unknown}")
    required = SHARDS_METADATA if sharded else MODEL_FILE
    if required not in state["files"]:
        raise _Damaged(f"{STATE_FILE} does not list {required}")
    if state["format"] >= 2:
        _check_recorded_digests(state)
    if sharded:
        info = state.get("sharded")
        world = info.get("world_size") if isinstance(info, dict) else None
        parts = info.get("parts") if isinstance(info, dict) else None
        if (not isinstance(world, int) or isinstance(world, bool) or world < 1 or not isinstance(parts, list)
                or not {"model", "optimizer"} <= set(parts) <= {"model", "optimizer", "ema"}):
            raise _Damaged(f"corrupt {STATE_FILE}: 'sharded' must hold a world_size >= 1 and the parts saved")
    return state


def _known_file(fname: Any, sharded: bool) -> bool:
    """Whether ``state.json`` may list ``fname``: a shard file or ``rng.pt`` in a sharded checkpoint,
    one of :data:`CHECKPOINT_FILES` in any other."""
    if not isinstance(fname, str):
        return False
    if sharded:
        return fname == RNG_FILE or bool(_SHARD_FILE.match(fname))
    return fname in CHECKPOINT_FILES


def _check_recorded_digests(state: dict) -> None:
    """A format-2 ``state.json`` records a sha256 and a size for every file it lists."""
    hashes, sizes = state.get("sha256"), state.get("bytes")
    if not isinstance(hashes, dict) or not isinstance(sizes, dict):
        raise _Damaged(f"corrupt {STATE_FILE}: 'sha256' or 'bytes' missing")
    for fname in state["files"]:
        if not isinstance(hashes.get(fname), str) or not _SHA256_HEX.match(hashes[fname]):
            raise _Damaged(f"corrupt {STATE_FILE}: no valid sha256 for {fname}")
        if not isinstance(sizes.get(fname), int) or isinstance(sizes[fname], bool) or sizes[fname] < 0:
            raise _Damaged(f"corrupt {STATE_FILE}: no valid size for {fname}")


def _sha256_of(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _check_file(folder: str, fname: str, state: dict, verify: bool) -> None:
    """Raise :class:`_Damaged` if ``fname`` is missing, of the wrong size or (``verify``) hash."""
    path = os.path.join(folder, fname)
    if not os.path.isfile(path):
        raise _Damaged(f"missing {fname}")
    if state["format"] < 2:
        return
    expected, size = state["bytes"][fname], os.path.getsize(path)
    if size < expected:
        raise _Damaged(f"{fname} is truncated ({size:,} of {expected:,} bytes)")
    if size != expected:
        raise _Damaged(f"{fname} has {size:,} bytes where {expected:,} were written")
    if verify:
        try:
            actual = _sha256_of(path)
        except OSError as err:
            raise _Damaged(f"cannot read {fname}: {err.strerror or err}") from err
        if actual != state["sha256"][fname]:
            raise _Damaged(f"{fname} fails its sha256 check (its content changed after it was written: "
                           "a disk, memory or copy error)")


def _checked_state(folder: str, verify: bool = True) -> dict:
    """The ``state.json`` of ``folder`` after checking the folder (see :func:`check_checkpoint`)."""
    if not os.path.isdir(folder):
        raise _Damaged("not a folder" if os.path.exists(folder) else "does not exist")
    state = _read_state(folder)
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(folder)))
    if m and int(m.group(1)) != state["step"]:
        raise _Damaged(f"{STATE_FILE} says step {state['step']}, not that of the folder name")
    for fname in state["files"]:
        _check_file(folder, fname, state, verify)
    return state


def check_checkpoint(path: str, *, verify: bool = True) -> CheckpointStatus:
    """Check one checkpoint folder without loading it.

    Args:
        path: a checkpoint folder.
        verify: also compare every file's sha256 with the one recorded (reads each file once);
            ``False`` checks only that ``state.json`` is sound and the files exist with their sizes.
    """
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    step = int(m.group(1)) if m else None
    try:
        state = _checked_state(path, verify)
    except _Damaged as err:
        return CheckpointStatus(path, step, False, str(err))
    return CheckpointStatus(path, state["step"], True, None, verified=verify and state["format"] >= 2)


def _step_folders(ckpt_root: str) -> list[tuple[int, str]]:
    """``(step, name)`` of every ``step-*`` folder in ``ckpt_root``, ascending by step."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(ckpt_root, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def _statuses(ckpt_root: str, verify: bool) -> list[CheckpointStatus]:
    return [check_checkpoint(os.path.join(ckpt_root, name), verify=verify) for _, name in _step_folders(ckpt_root)]


def list_checkpoints(run_dir: str, *, verify: bool = True) -> list[CheckpointStatus]:
    """The state of every ``step-*`` checkpoint folder of the run in ``run_dir``, ascending by step.

    Args:
        run_dir: the run's folder (holding ``checkpoints/``); a run without one has none.
        verify: check every file's sha256 (reads them all); ``False`` checks structure and sizes.
    """
    return _statuses(os.path.join(run_dir, CHECKPOINTS_DIR), verify)


def _candidates(ckpt_root: str) -> list[str]:
    """Folders to resume from, in order: the one ``latest`` names, then all from the newest down."""
    names = [name for _, name in reversed(_step_folders(ckpt_root))]
    try:
        with open(os.path.join(ckpt_root, LATEST_FILE), encoding="utf-8") as fh:
            pointer = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        pointer = ""
    if pointer in names:
        names.remove(pointer)
        names.insert(0, pointer)
    return [os.path.join(ckpt_root, name) for name in names]


def _warn_damaged(folder: str, problem: str) -> None:
    warnings.warn(f"skipping damaged checkpoint {folder}: {problem}", CheckpointWarning, stacklevel=3)


def latest_checkpoint(run_dir: str) -> str | None:
    """Path of the intact checkpoint to resume from, or ``None`` if ``run_dir`` has none.

    Tries the folder ``run_dir/checkpoints/latest`` names, then every ``step-*`` folder from the
    highest step down, and returns the first that passes :func:`check_checkpoint` (sha256 included);
    each damaged one is named in a :class:`CheckpointWarning`. Temp folders (``.tmp-*``, ``.old-*``)
    are ignored. Reads only.
    """
    for folder in _candidates(os.path.join(run_dir, CHECKPOINTS_DIR)):
        status = check_checkpoint(folder)
        if status.intact:
            return folder
        _warn_damaged(folder, status.problem or "")
    return None


# ----------------------------------------------------------------------------------------- load


def _load_safetensors(folder: str, fname: str, map_location: str) -> dict[str, Tensor]:
    path = os.path.join(folder, fname)
    try:
        return load_file(path, device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _Damaged(f"corrupt {fname}: {err}") from err


def _load_torch(folder: str, fname: str, map_location: str) -> Any:
    path = os.path.join(folder, fname)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise _Damaged(f"corrupt or unsafe {fname}: {err}") from err


def _load(path: str, device: str, verify: bool) -> Checkpoint:
    """Check ``path`` (hashes first, when ``verify``) then load it; raises :class:`_Damaged`, or
    :class:`CheckpointError` for a sharded checkpoint (intact, but not readable as whole tensors)."""
    state = _checked_state(path, verify)
    if state["format"] == SHARDED_FORMAT:
        raise CheckpointError(_sharded_only_message(path, state))
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


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint folder written by :func:`save_checkpoint`.

    Args:
        path: the ``step-*`` folder (e.g. from :func:`latest_checkpoint`).
        map_location: device for every tensor.
        verify: compare every file's sha256 with ``state.json`` before loading any tensor
            (format-1 checkpoints record none; their files are only checked to exist).

    Raises:
        CheckpointError: the folder is missing or fails its check, or a file cannot be loaded
            (the message names the folder, the file and the cause).
    """
    try:
        return _load(path, str(map_location), verify)
    except _Damaged as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err


# ------------------------------------------------------------------------------ training state


@dataclass(frozen=True)
class TrainingStates:
    """What a training checkpoint holds besides the recipe's ``extra``: the trainable weights
    (name -> tensor), the optimizer's ``state_dict`` and the EMA shadow (or ``None``)."""

    model: dict[str, Tensor]
    optimizer: dict
    ema: dict[str, Tensor] | None


def training_states(module: torch.nn.Module, optimizer: Any, ema: Any = None, *, keep: bool = True) -> TrainingStates | None:
    """The trainable weights of ``module`` (frozen ones come back from the pretrained model), the
    optimizer state and the EMA shadow (if any), whole.

    With a module sharded by FSDP (:mod:`flowalign.training.fsdp`) this is a collective: every rank
    calls it, the shards are gathered and only ``keep`` (the main rank) holds the result (``None``
    elsewhere); the optimizer state is then keyed by parameter name
    (``torch.distributed.checkpoint.state_dict``), so such a checkpoint resumes a sharded run."""
    from flowalign.training.fsdp import gathered_state, is_sharded

    ema_state = ema.state_dict() if ema is not None else None
    if not is_sharded(module):
        return TrainingStates({n: p.detach() for n, p in module.named_parameters() if p.requires_grad},
                              optimizer.state_dict(), ema_state) if keep else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model = gathered_state({n: p.detach() for n, p in module.named_parameters() if p.requires_grad}, keep)
    optim = get_optimizer_state_dict(module, _inner(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_state = gathered_state(ema_state, keep) if ema_state is not None else None
    return TrainingStates(model, optim, ema_state) if keep else None


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def save_training_state(run_dir: str, step: int, module: torch.nn.Module, optimizer: Any, *, ema: Any = None,
                        extra: dict | None = None, keep_last: int | None = 2) -> str:
    """Atomically checkpoint a run at ``step``, for any recipe: the trainable weights of ``module``
    (frozen ones come back from the pretrained model), the optimizer, the EMA shadow (if any), the
    global RNG state and the recipe's ``extra`` (JSON). :func:`resume_training_state` reads it back.
    One process; a module sharded over several goes through :func:`training_states` on every rank
    and :func:`write_training_state` on the main one.

    Returns:
        the checkpoint folder.

    Raises:
        CheckpointError: the checkpoint could not be written (see :func:`save_checkpoint`).
    """
    return write_training_state(run_dir, step, training_states(module, optimizer, ema), extra=extra, keep_last=keep_last)


def write_training_state(run_dir: str, step: int, states: TrainingStates, *, extra: dict | None = None,
                         keep_last: int | None = 2) -> str:
    """Atomically checkpoint a run at ``step``: ``states`` (:func:`training_states`, whole tensors),
    the global RNG state and the recipe's ``extra`` (JSON). :func:`resume_training_state` reads it back.

    Returns:
        the checkpoint folder.

    Raises:
        CheckpointError: the checkpoint could not be written (see :func:`save_checkpoint`).
    """
    return save_checkpoint(
        run_dir, step,
        model_state=states.model,
        optimizer_state=states.optimizer,
        ema_state=states.ema,
        rng_state=capture_rng_state(),
        extra=extra,
        keep_last=keep_last,
    )


def _load_states(ckpt: Checkpoint, module: torch.nn.Module, optimizer: Any, ema: Any) -> None:
    """Load a checkpoint's weights, optimizer and EMA states; into a sharded module each rank keeps
    its shard of the whole tensors it read."""
    from flowalign.training.fsdp import distribute_like, is_sharded

    if not is_sharded(module):
        module.load_state_dict(ckpt.model_state, strict=False)
        optimizer.load_state_dict(ckpt.optimizer_state)
        if ema is not None and ckpt.ema_state is not None:
            ema.load_state_dict(ckpt.ema_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, ckpt.model_state, options=options)
    set_optimizer_state_dict(module, _inner(optimizer), ckpt.optimizer_state, options=options)
    if ema is not None and ckpt.ema_state is not None:
        shadow = ema.state_dict()
        ema.load_state_dict({n: distribute_like(v, shadow[n]) if n in shadow else v for n, v in ckpt.ema_state.items()})


# ------------------------------------------------------------------- sharded training state (DCP)


def _sharded_state(module: torch.nn.Module, optimizer: Any, ema: Any) -> dict[str, Any]:
    """What a sharded checkpoint holds, as this rank's shards (DTensors, nothing gathered):
    ``{"model": trainable weights, "optimizer": state keyed by parameter name, "ema": shadow}``
    (``torch.distributed.checkpoint.state_dict.get_state_dict``; frozen weights are left out, they
    come back from the pretrained model; ``"ema"`` only when ``ema`` is given). The same dict read
    from a fresh run is what :func:`torch.distributed.checkpoint.load` fills in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(module, _inner(optimizer), options=StateDictOptions(ignore_frozen_params=True))
    state: dict[str, Any] = {"model": model, "optimizer": optim}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def _agree(produce: Callable[[], Any], what: str, near: str) -> list[Any]:
    """Run ``produce`` on every rank and gather what each returned (a collective). If it raised on
    any rank, every rank raises the same :class:`CheckpointError`, naming the first failure and
    its rank, so that no rank waits for one that gave up.

    Args:
        what: what was being written (``"checkpoint <folder>"``), for the message.
        near: a folder on the filesystem written to (for the free space of a full disk).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint import CheckpointException

    result, problem = None, None
    try:
        result = produce()
    except CheckpointError as err:
        problem = str(err)
    except OSError as err:
        problem = str(_write_error(err, what, near))
    except (Exception, CheckpointException) as err:  # DCP's (a BaseException: every rank's errors), a bad extra, ...
        problem = f"cannot write {what}: {type(err).__name__}: {_first_cause(err)}"
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (problem, result))
    failed = [(rank, p) for rank, (p, _) in enumerate(gathered) if p is not None]
    if failed:
        rank, first = failed[0]
        raise CheckpointError(first if len(gathered) == 1 else f"{first} (process {rank})")
    return [r for _, r in gathered]


def _begin_sharded(ckpt_root: str, name: str, step: int, extra: dict) -> str:
    """Main rank: check ``extra``, clean up stale temp files, create the temp folder; returns it."""
    _state_json(step, [], {}, extra)  # fail on a bad ``extra`` before anything is written
    os.makedirs(ckpt_root, exist_ok=True)
    remove_stale_temp_files(ckpt_root)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    return tmp


def _write_shards(state: dict[str, Any], folder: str) -> None:
    """Every rank: write this rank's shards of ``state`` into ``folder`` (``torch.distributed.checkpoint.save``,
    a collective; the main rank also writes DCP's ``.metadata``; every file is fsync'ed)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    dcp_save(state, storage_writer=FileSystemWriter(folder, sync_files=True))


def _first_cause(err: BaseException) -> str:
    """The line that says what went wrong: for DCP's ``CheckpointException`` (every failed rank's
    traceback in one message) the last line of the first traceback (``ValueError: Size mismatch ...``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    causes = [line for line in lines if _RAISED.match(line)]
    return (causes[0] if causes else lines[-1])[:500]


def _shard_files(tmp: str) -> list[str]:
    """Main rank: the files DCP wrote under ``tmp/shards`` (``shards/<name>``), sorted."""
    folder = os.path.join(tmp, SHARDS_DIR)
    _fsync_dir(folder)
    return sorted(f"{SHARDS_DIR}/{n}" for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))


def _digest(path: str) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a file, read back from the disk."""
    return _sha256_of(path), os.path.getsize(path)


def _complete_sharded(tmp: str, final: str, trash: str, ckpt_root: str, step: int, files: list[str],
                      digests: dict[str, tuple[str, int]], extra: dict, sharded: dict, keep_last: int | None) -> None:
    """Main rank: write ``rng.pt`` and ``state.json`` (listing every rank's files with their hashes)
    into ``tmp``, rename it to ``final``, point ``latest`` at it and prune."""
    digests = {**digests, RNG_FILE: _write_file(os.path.join(tmp, RNG_FILE), _torch_writer(capture_rng_state()))}
    files = [*files, RNG_FILE]
    _write_file(os.path.join(tmp, STATE_FILE), _bytes_writer(_state_json(step, files, digests, extra, sharded).encode()))
    _fsync_dir(tmp)
    _move_into_place(tmp, final, trash, ckpt_root)
    shutil.rmtree(trash, ignore_errors=True)
    _point_latest(ckpt_root, os.path.basename(final), final, keep_last)


def save_sharded_training_state(run_dir: str, step: int, module: torch.nn.Module, optimizer: Any, *, ema: Any = None,
                                extra: dict | None = None, keep_last: int | None = 2) -> str:
    """Atomically checkpoint a sharded run at ``step`` with every process writing its own shards
    (``torch.distributed.checkpoint.save``; a collective: every rank calls it). Nothing is gathered:
    no rank holds more than its shards of the trainable weights, optimizer state and EMA shadow.

    The main rank names a temp folder ``.tmp-step-*-<its pid>``; every rank writes its shards into
    ``<temp>/shards/``; the files are hashed (each rank reads back a share of them); the main rank
    writes ``rng.pt`` and ``state.json`` (format 3: every file's sha256 and size, the world size)
    and renames the folder into place, as :func:`save_checkpoint` does. A failure on any rank raises
    the same :class:`~flowalign.errors.CheckpointError` on every rank and leaves earlier
    checkpoints as they were.

    Args:
        module: the sharded module (:func:`flowalign.training.fsdp.shard_module`).
        optimizer: its optimizer (accelerate's wrapper or a torch optimizer).
        ema: an object with ``state_dict`` / ``load_state_dict`` of (sharded) shadow weights, or ``None``.
        extra: the recipe's JSON run state; only the main rank's is written (others may pass ``None``).
        keep_last: as in :func:`save_checkpoint`.

    Returns:
        the checkpoint folder (on every rank).
    """
    import torch.distributed as dist

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    ckpt_root = os.path.join(run_dir, CHECKPOINTS_DIR)
    name = step_dir_name(step)
    final = os.path.join(ckpt_root, name)
    what = f"checkpoint {final}"
    state = _sharded_state(module, optimizer, ema)
    tmp = _agree(lambda: _begin_sharded(ckpt_root, name, step, extra or {}) if main else None, what, ckpt_root)[0]
    trash = os.path.join(ckpt_root, ".old-" + os.path.basename(tmp)[len(".tmp-"):])  # .old-step-*-<main's pid>
    try:
        _agree(lambda: _write_shards(state, os.path.join(tmp, SHARDS_DIR)), what, ckpt_root)
        files = _agree(lambda: _shard_files(tmp) if main else None, what, ckpt_root)[0]
        shares = _agree(lambda: {f: _digest(os.path.join(tmp, f)) for f in files[rank::world]}, what, ckpt_root)
        digests = {f: d for share in shares for f, d in share.items()}
        sharded = {"world_size": world, "parts": sorted(state)}
        _agree(lambda: _complete_sharded(tmp, final, trash, ckpt_root, step, files, digests, extra or {}, sharded, keep_last)
               if main else None, what, ckpt_root)
    except BaseException:
        if main:
            _discard_attempt(tmp, final, trash)
        raise
    return final


def _sharded_only_message(path: str, state: dict) -> str:
    """Why a sharded checkpoint cannot be read as whole tensors (by one unsharded process)."""
    return (f"checkpoint {path} holds the shards of {state['sharded']['world_size']} process(es) (train.fsdp.state_dict="
            "sharded): resume it with train.fsdp.enabled=true (any number of processes), or turn it into one file with "
            f"torch.distributed.checkpoint.format_utils.dcp_to_torch_save('{os.path.join(path, SHARDS_DIR)}', 'state.pt')")


def _load_sharded_states(path: str, state: dict, module: torch.nn.Module, optimizer: Any, ema: Any) -> None:
    """Read a sharded checkpoint into this rank's shards of ``module``, the optimizer and the EMA
    (``torch.distributed.checkpoint.load``, a collective; with another number of processes than
    wrote it, DCP cuts the saved chunks into the current shards).

    Raises:
        CheckpointError: the shards do not fit the model (another model, LoRA rank, ...).
    """
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    target = _sharded_state(module, optimizer, ema if "ema" in state["sharded"]["parts"] else None)
    try:
        dcp_load(target, storage_reader=FileSystemReader(os.path.join(path, SHARDS_DIR)))
    except (Exception, CheckpointException) as err:  # DCP's holds every rank's errors (a missing key, a shape mismatch)
        raise CheckpointError(f"checkpoint {path!r} does not match the model ({_first_cause(err)}); set train.resume=never "
                              "or use another output_dir") from err
    set_state_dict(module, _inner(optimizer), model_state_dict=target["model"], optim_state_dict=target["optimizer"],
                   options=StateDictOptions(strict=False))
    if "ema" in target:
        ema.load_state_dict(target["ema"])


def _collective_problem(folder: str) -> str | None:
    """Check ``folder`` together with every other rank (a collective): each checks ``state.json``
    and the sizes and hashes a share of the files. Returns the first problem any rank found (the
    same on every rank), or ``None`` when the folder is intact."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    problem = None
    try:
        state = _checked_state(folder, verify=False)
        for fname in state["files"][rank::world]:
            _check_file(folder, fname, state, verify=True)
    except _Damaged as err:
        problem = str(err)
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def _broadcast(value: Any) -> Any:
    """The main rank's ``value`` on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _resume_sharded_module(resume: str, ckpt_root: str, module: torch.nn.Module, optimizer: Any,
                           ema: Any) -> Checkpoint | None:
    """:func:`resume_training_state` for a module sharded over the processes (a collective): the
    ranks agree on the folder (checked together), then read it -- a sharded checkpoint with DCP,
    a full one whole on every rank, each keeping its shard."""
    if resume == "auto":
        failures: list[tuple[str, str]] = []
        for folder in _broadcast(_candidates(ckpt_root)):
            problem = _collective_problem(folder)
            if problem is None:
                break
            _warn_damaged(folder, problem)
            failures.append((folder, problem))
        else:
            if failures:
                raise CheckpointError(none_intact_message(ckpt_root, failures))
            return None
    else:
        folder = resume
        problem = _collective_problem(folder)
        if problem is not None:
            raise CheckpointError(f"cannot resume from {resume} (train.resume): {problem}; pass train.resume=auto "
                                  "for the newest intact checkpoint, or name another one")
    try:
        state = _checked_state(folder, verify=False)
        if state["format"] != SHARDED_FORMAT:
            ckpt = _load(folder, "cpu", verify=False)
            _check_matches(ckpt, module)
            _load_states(ckpt, module, optimizer, ema)
            return ckpt
        rng = _load_torch(folder, RNG_FILE, "cpu") if RNG_FILE in state["files"] else None
    except _Damaged as err:
        raise CheckpointError(f"checkpoint {folder}: {err}") from err
    _load_sharded_states(folder, state, module, optimizer, ema)
    return Checkpoint(path=folder, step=state["step"], model_state={}, optimizer_state=None, ema_state=None,
                      rng_state=rng, extra=state["extra"])


def _check_matches(ckpt: Checkpoint, module: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` when ``ckpt`` lacks a trainable parameter of ``module``."""
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in ckpt.model_state]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.path!r} does not match the model (missing {missing[:3]}...); "
                              "set train.resume=never or use another output_dir")


def none_intact_message(ckpt_root: str, failures: list[tuple[str, str]]) -> str:
    """The refusal for a checkpoints folder whose ``(folder, problem)`` checkpoints are all damaged."""
    found = "; ".join(f"{os.path.basename(folder)}: {problem}" for folder, problem in failures)
    return (f"{ckpt_root} holds {len(failures)} checkpoint folder(s) but none is intact ({found}); nothing was "
            "deleted. Pass train.resume=never to start afresh (the old checkpoints are then removed), "
            "train.resume=<checkpoint folder> to name one, or output_dir=<new folder> for a new run")


def _load_newest_intact(ckpt_root: str) -> Checkpoint | None:
    """Load the first intact checkpoint of :func:`_candidates`, warning about each damaged one.

    Raises:
        CheckpointError: there are ``step-*`` folders but none is intact (each is named).
    """
    failures: list[tuple[str, str]] = []
    for folder in _candidates(ckpt_root):
        try:
            return _load(folder, "cpu", verify=True)
        except _Damaged as err:
            _warn_damaged(folder, str(err))
            failures.append((folder, str(err)))
    if failures:
        raise CheckpointError(none_intact_message(ckpt_root, failures))
    return None


def resume_training_state(resume: str, run_dir: str, module: torch.nn.Module, optimizer: Any,
                          ema: Any = None) -> Checkpoint | None:
    """Restore a run from the checkpoint that ``train.resume`` names, for any recipe (with a module
    sharded by FSDP a collective: every rank calls it; see :func:`_resume_sharded_module`).

    ``resume`` is ``"never"``, ``"auto"`` (the newest intact checkpoint in ``run_dir``: damaged
    ones are named in a :class:`CheckpointWarning` and skipped) or a checkpoint folder. Stale temp
    files in ``run_dir/checkpoints`` are cleaned up first (not for ``"never"``). Loads the
    trainable weights into ``module`` (non-strict: frozen weights come from the pretrained model),
    the optimizer state, the EMA shadow (when both exist) and the global RNG state. Returns the
    checkpoint, whose ``extra`` the recipe reads, or ``None`` (``"never"``, or ``"auto"`` on a run
    without checkpoint folders). A sharded checkpoint (format 3) is read straight into the shards:
    its ``model_state`` comes back empty and ``optimizer_state`` / ``ema_state`` ``None``.

    Raises:
        CheckpointError: ``"auto"`` finds ``step-*`` folders but none is intact (each is named with
            its cause; nothing is deleted), or the folder named by ``resume`` fails its check, or the
            checkpoint lacks a trainable parameter of ``module`` (another model), or it is a sharded
            checkpoint and ``module`` is not sharded.
    """
    from flowalign.training.fsdp import is_sharded

    if resume == "never":
        return None
    ckpt_root = os.path.join(run_dir, CHECKPOINTS_DIR)
    remove_stale_temp_files(ckpt_root)
    if is_sharded(module):
        ckpt = _resume_sharded_module(resume, ckpt_root, module, optimizer, ema)
        if ckpt is not None and ckpt.rng_state is not None:
            restore_rng_state(ckpt.rng_state)
        return ckpt
    if resume == "auto":
        ckpt = _load_newest_intact(ckpt_root)
        if ckpt is None:
            return None
    else:
        try:
            ckpt = _load(resume, "cpu", verify=True)
        except _Damaged as err:
            raise CheckpointError(f"cannot resume from {resume} (train.resume): {err}; pass train.resume=auto "
                                  "for the newest intact checkpoint, or name another one") from err
    _check_matches(ckpt, module)
    _load_states(ckpt, module, optimizer, ema)
    if ckpt.rng_state is not None:
        restore_rng_state(ckpt.rng_state)
    return ckpt
