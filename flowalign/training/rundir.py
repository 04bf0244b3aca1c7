"""Run directories: what a training run owns on disk, and when ``train`` may continue one.

A training run writes everything into ``output_dir`` (checkpoints, ``metrics.jsonl``, pictures,
``best/``, ``final/``) and records the settings it trains with in ``run.json``. Before any model
loads, :func:`check_run_dir` decides what ``train`` does with a directory that already holds a run:

* no checkpoint in it (new, or an attempt killed before its first checkpoint): start afresh;
* checkpoints, same settings: continue from the newest intact checkpoint, also past the old
  ``train.iterations`` when it was raised; a run already at ``train.iterations`` is *finished*:
  nothing is trained and its ``summary.json`` is reported as it is;
* checkpoints, any training-relevant setting changed: refused with :class:`RunDirError` naming each
  changed key, and how to go on (``output_dir=...`` for a new run, ``train.resume=never`` to start
  this one over).

``train.resume=never`` on a directory holding a run removes that run's files first
(:func:`clear_run_dir`, only the names flowalign writes) so that nothing of the old run mixes into
the new one. Evaluation and sampling never read or write a run directory.

A setting is *training-relevant* unless it is listed in :data:`CONTINUABLE_KEYS`: how long to
train, how often to checkpoint and evaluate, logging, threads and the directory's own path change
neither what is trained nor what the reported numbers mean. Python objects given to
``flowalign.train`` (rewards, judges) count by their qualified name.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from omegaconf import OmegaConf

from flowalign.errors import CheckpointError, RunDirError
from flowalign.training.checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointWarning,
    check_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    none_intact_message,
    remove_run_checkpoints,
)

__all__ = ["RUN_FILE", "CONTINUABLE_KEYS", "RunStatus", "run_settings", "changed_settings", "check_run_dir",
           "record_run", "clear_run_dir", "fresh_output_dir", "write_folder_atomically"]

RUN_FILE = "run.json"

#: Settings that may differ between a run and its continuation (a key, or a prefix of keys).
CONTINUABLE_KEYS = ("output_dir", "num_threads", "logging", "train.iterations", "train.checkpoint_every",
                    "train.keep_checkpoints", "train.resume", "train.time_budget_s", "eval.every")

#: Files and folders a training run writes into its directory (what train.resume=never removes).
RUN_OUTPUTS = (CHECKPOINTS_DIR, RUN_FILE, "config.yaml", "metrics.jsonl", "summary.json", "tensorboard",
               "wandb_run_id.txt", "best", "final", "lora", "eval_before_media.pt", "before_after.png",
               "before_after.gif", "before_after.mp4", "reward_curve.png", "accuracy_curve.png")


@dataclass(frozen=True)
class RunStatus:
    """What ``train`` will do with its ``output_dir``.

    Attributes:
        action: ``"start"`` (nothing to continue), ``"continue"`` (from ``checkpoint``) or
            ``"finished"`` (the newest checkpoint is at ``train.iterations``: nothing to train).
        checkpoint: the checkpoint folder that will be resumed, if any.
        step: its step (0 when starting).
    """

    action: str
    checkpoint: str | None = None
    step: int = 0


def _continuable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in CONTINUABLE_KEYS)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept whole (one value per key)."""
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _describe(obj: Any) -> Any:
    """A JSON-able identity of a Python reward / judge given to ``flowalign.train``."""
    if isinstance(obj, Mapping):
        return {str(k): _describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_describe(v) for v in obj]
    kind = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"python:{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"


def _flat_settings(container: Any) -> dict[str, Any]:
    """A config container flattened to dotted keys (JSON values), plus ``num_processes`` from
    ``WORLD_SIZE``: ranks draw their own random streams, so the process count is a setting too."""
    flat = _flatten(json.loads(json.dumps(container, default=str)))
    flat["num_processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    return flat


def run_settings(cfg: Any, python_objects: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The training-relevant settings of a run: the resolved config flattened to dotted keys plus
    ``num_processes``, less :data:`CONTINUABLE_KEYS`, with each Python object that replaces a config
    entry (``rewards``, ``eval.judges``) recorded by its qualified name in place of that entry."""
    flat = _flat_settings(OmegaConf.to_container(OmegaConf.structured(cfg)))
    for name, obj in (python_objects or {}).items():
        if obj is not None:
            flat = {k: v for k, v in flat.items() if k != name and not k.startswith(name + ".")}
            flat[name] = _describe(obj)
    return {k: v for k, v in sorted(flat.items()) if not _continuable(k)}


def changed_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every training-relevant key that differs
    (a key missing on one side shows as ``"<unset>"``)."""
    unset = "<unset>"
    keys = sorted(k for k in set(recorded) | set(current) if not _continuable(k))
    return [(k, recorded.get(k, unset), current.get(k, unset)) for k in keys if recorded.get(k, unset) != current.get(k, unset)]


def _recorded_settings(output_dir: str) -> dict[str, Any] | None:
    """The settings ``run.json`` holds, or (runs older than run.json) those of ``config.yaml``."""
    run_file = os.path.join(output_dir, RUN_FILE)
    if os.path.isfile(run_file):
        try:
            with open(run_file, encoding="utf-8") as fh:
                return json.load(fh)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunDirError(f"{run_file}: unreadable run record ({err}); pass output_dir=<new folder> for a new run "
                              "or train.resume=never to start this one over") from err
    config_file = os.path.join(output_dir, "config.yaml")
    if os.path.isfile(config_file):
        flat = _flat_settings(OmegaConf.to_container(OmegaConf.load(config_file)))  # num_processes: taken as unchanged
        return {k: v for k, v in flat.items() if not _continuable(k)}
    return None


def check_run_dir(cfg: Any, python_objects: Mapping[str, Any] | None = None) -> RunStatus:
    """Decide, before any model loads, whether ``train`` starts, continues or finds a finished run
    in ``cfg.output_dir`` (see the module docstring). Reads only; :func:`clear_run_dir` and
    :func:`record_run` write.

    Raises:
        RunDirError: the directory holds a run with other training-relevant settings (each changed
            key is named), or one already past ``train.iterations``.
        CheckpointError: it holds checkpoints but none is intact.
    """
    out, resume = cfg.output_dir, cfg.train.resume
    if resume == "never" or not list_checkpoints(out, verify=False):
        return RunStatus("start")
    if resume != "auto":  # an explicit checkpoint folder: the user chose what to continue
        return RunStatus("continue", resume, check_checkpoint(resume, verify=False).step)
    with warnings.catch_warnings():  # the recipe names each damaged checkpoint when it resumes
        warnings.simplefilter("ignore", CheckpointWarning)
        checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        damaged = [(c.path, c.problem or "") for c in list_checkpoints(out)]
        raise CheckpointError(none_intact_message(os.path.join(out, CHECKPOINTS_DIR), damaged))
    step = check_checkpoint(checkpoint, verify=False).step
    recorded = _recorded_settings(out)
    how = (f"pass output_dir=<new folder> for a new run, or train.resume=never to discard the run in {out} "
           "and start it over")
    if recorded is not None:
        changes = changed_settings(recorded, run_settings(cfg, python_objects))
        if changes:
            lines = "\n".join(f"  {k}: {old!r} in the run -> {new!r} now" for k, old, new in changes)
            raise RunDirError(f"{out} holds a run (checkpoint at iteration {step}) trained with other settings; "
                              f"continuing it would mix two runs. Changed:\n{lines}\nTo continue it, drop these "
                              f"changes (or, if they train the same thing, e.g. the same reward served another way, "
                              f"name the checkpoint: train.resume={checkpoint}); otherwise {how}.")
    if step > cfg.train.iterations:
        raise RunDirError(f"{out} holds a run already at iteration {step}, past train.iterations={cfg.train.iterations}; "
                          f"raise train.iterations to continue it, or {how}.")
    return RunStatus("finished" if step == cfg.train.iterations else "continue", checkpoint, step)


def record_run(output_dir: str, cfg: Any, config_yaml: str, python_objects: Mapping[str, Any] | None = None) -> None:
    """Create the run directory and write ``config.yaml`` (the resolved config) and ``run.json``
    (its training-relevant settings, which :func:`check_run_dir` compares against)."""
    from flowalign import __version__

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml)
    record = {"flowalign": __version__, "written": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": run_settings(cfg, python_objects)}
    tmp = os.path.join(output_dir, f".{RUN_FILE}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, os.path.join(output_dir, RUN_FILE))


def clear_run_dir(output_dir: str) -> list[str]:
    """Remove the files of a previous run from ``output_dir`` (only the names in :data:`RUN_OUTPUTS`,
    never anything else a user keeps there). Returns the names removed."""
    removed = [CHECKPOINTS_DIR] if remove_run_checkpoints(output_dir) else []
    for name in RUN_OUTPUTS[1:]:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def fresh_output_dir(output_dir: str) -> str:
    """``output_dir`` when it holds no run, else the first of ``output_dir-2``, ``-3``, ... that holds
    none: what the Python API writes to when no ``output_dir`` is given, so that a script never
    continues (or overwrites) another run by accident."""

    def holds_run(path: str) -> bool:
        return os.path.isdir(path) and any(os.path.lexists(os.path.join(path, n)) for n in RUN_OUTPUTS)

    candidate, n = output_dir.rstrip("/\\") or output_dir, 1
    base = candidate
    while holds_run(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def write_folder_atomically(path: str, write: Callable[[str], Any]) -> str:
    """Write a folder (``best/``, ``final/``, ``lora/``) so that a kill leaves the old one or the new
    one, never a mix: ``write(tmp)`` fills a sibling temp folder, which then replaces ``path``."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp, old = os.path.join(parent, f".{name}.tmp-{os.getpid()}"), os.path.join(parent, f".{name}.old-{os.getpid()}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(tmp)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
