"""Training support: atomic checkpoints, run directories, stop signals, RNG capture, EMA, metrics
logging, run pictures and the end-of-run summary.

Names are loaded on first use so ``import flowalign.training`` stays light (matplotlib and
TensorBoard are only imported by the functions that need them).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "resume_training_state": "checkpoint",
    "list_checkpoints": "checkpoint",
    "check_checkpoint": "checkpoint",
    "CheckpointStatus": "checkpoint",
    "CheckpointWarning": "checkpoint",
    "save_training_state": "checkpoint",
    "capture_rng_state": "rng",
    "restore_rng_state": "rng",
    "EMA": "ema",
    "MetricsLogger": "metrics",
    "read_metrics": "metrics",
    "save_image_grid": "plots",
    "save_reward_curve": "plots",
    "format_table": "plots",
    "before_after_table": "plots",
    "write_summary": "metrics",
    "record_run": "rundir",
    "check_run_dir": "rundir",
    "StopSignal": "interrupt",
    "configure_threads": "accel",
    "discard_stale_metrics": "metrics",
    "end_accelerator": "accel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
