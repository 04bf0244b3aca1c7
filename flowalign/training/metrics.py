"""Run metrics: a JSON-lines file (always), TensorBoard (default) and wandb (optional).

``<run_dir>/metrics.jsonl`` holds one ``{"step": int, **metrics}`` object per :meth:`MetricsLogger.log`
call. It is the source of truth for plots and summaries (:func:`read_metrics`). A resumed run
truncates it to ``step <= resume_step`` first, and TensorBoard purges events after ``resume_step``,
so a resumed run's logs equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any

import torch

__all__ = ["MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"


def _parse_lines(path: str, text: str) -> list[dict]:
    """Parse JSON lines; a final line without its newline that fails to parse is a torn write
    (the process died mid-line) and is dropped. Any other bad line raises, naming file and line."""
    records = []
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail and i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {err}") from err
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise ValueError(f"{path}: line {i + 1} is not an object with an integer 'step'")
        records.append(rec)
    return records


def read_metrics(path: str) -> list[dict]:
    """Read a ``metrics.jsonl`` file (or a run folder holding one) into a list of records."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        return _parse_lines(path, fh.read())


def _to_scalar(key: str, value: Any) -> float | int | bool | str:
    """Numbers (Python, NumPy, 0-d / 1-element tensors) -> Python numbers; strings pass through."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} is a tensor with {value.numel()} elements; log a scalar")
        return value.item()
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key!r} must be a number, a scalar tensor or a string, got {type(value).__name__}")


class MetricsLogger:
    """Log scalar metrics to ``run_dir/metrics.jsonl``, TensorBoard and (optionally) wandb.

    Args:
        run_dir: the run's folder (created if missing).
        tensorboard: also write ``run_dir/tensorboard`` event files.
        wandb_project: a wandb project name to log to as well (needs ``pip install wandb``); the
            wandb run id is kept in ``run_dir/wandb_run_id.txt`` so a resumed run continues it.
        resume_step: when resuming, the checkpoint's step: records with a larger step are removed
            from ``metrics.jsonl`` (atomically) and TensorBoard purges its events after it.
            ``None`` appends to an existing file as is.
        enabled: ``False`` (non-main ranks) makes every method a no-op and touches no file.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._fh = None
        self._tb = None
        self._wandb_run = None
        if not enabled:
            return
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"resume_step must be a non-negative int or None, got {resume_step!r}")
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, TENSORBOARD_DIR), purge_step=purge)
        if wandb_project is not None:
            self._wandb_run = self._init_wandb(wandb_project, resume=resume_step is not None)

    def _truncate(self, resume_step: int) -> None:
        """Rewrite metrics.jsonl keeping records with ``step <= resume_step`` (temp file + os.replace)."""
        with open(self.path, encoding="utf-8") as fh:
            records = _parse_lines(self.path, fh.read())
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in records:
                if rec["step"] <= resume_step:
                    fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def _init_wandb(self, project: str, resume: bool):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                f"wandb_project={project!r} needs the wandb package: pip install 'flowalign[wandb]'"
            ) from err
        id_path = os.path.join(self.run_dir, WANDB_ID_FILE)
        run_id = None
        if resume and os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as fh:
                run_id = fh.read().strip() or None
        run = wandb.init(project=project, dir=self.run_dir, id=run_id, resume="allow" if run_id else None)
        with open(id_path, "w", encoding="utf-8") as fh:
            fh.write(str(run.id) + "\n")
        return run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` as one JSON line (flushed); numeric values also go
        to TensorBoard and wandb. Values: numbers, scalar tensors, or strings (JSON only)."""
        if not self.enabled:
            return
        if self._fh is None:
            raise RuntimeError(f"MetricsLogger for {self.run_dir!r} is closed")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict[str, number], got {type(metrics).__name__}")
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metric names must be str, got {key!r}")
            if key == "step":
                raise ValueError("'step' is reserved; pass it as the step argument, not as a metric")
            record[key] = _to_scalar(key, value)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        numeric = {k: float(v) for k, v in record.items() if k != "step" and not isinstance(v, str)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None and numeric:
            self._wandb_run.log(numeric, step=step)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_summary(output_dir: str, summary: dict[str, Any], outputs: str) -> None:
    """End of a run: ``summary.json`` (every entry but the printed ``"table"``), then the table and
    where the run's files are (``outputs`` lists them for the reader)."""
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "table"}, f, indent=2)
    print("\n" + summary["table"])
    print(f"\nrun directory: {output_dir}  ({outputs})")


def discard_stale_metrics(output_dir: str) -> None:
    """For a run that starts from scratch (nothing resumed): remove ``metrics.jsonl`` left by an
    earlier attempt in the same directory that never checkpointed, whose records are stale."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        os.remove(path)
