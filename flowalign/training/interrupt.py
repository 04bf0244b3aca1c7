"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM finish the current iteration, save a
checkpoint and end the run with :class:`~flowalign.errors.TrainingInterrupted`.

The first signal only sets a flag (and prints one line); the training loop reads it between
iterations through :meth:`StopSignal.requested`, which agrees across processes, so every rank stops
after the same iteration and the checkpoint is complete. A second Ctrl-C stops at once (Python's
``KeyboardInterrupt``), losing the work since the last checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch

from flowalign.errors import TrainingInterrupted

__all__ = ["StopSignal", "EXIT_CODES", "stopped_run"]

#: shell convention: 128 + signal number
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignal:
    """Context manager that turns SIGINT / SIGTERM into a stop request.

    >>> with StopSignal() as stop:
    ...     for step in range(n):
    ...         train_one_iteration()
    ...         if stop.requested(accelerator):
    ...             save_checkpoint(); raise TrainingInterrupted(...)

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[flowalign] {signal.Signals(signum).name}: finishing this iteration and saving a checkpoint "
              "(Ctrl-C again stops at once, losing it)", file=sys.stderr, flush=True)

    def requested(self, accelerator: Any = None) -> bool:
        """Whether any process got a stop signal (a collective call when several processes run)."""
        flag = torch.tensor([0 if self.signum is None else int(self.signum)])
        if accelerator is not None and accelerator.num_processes > 1:
            flag = accelerator.gather(flag.to(accelerator.device)).max().cpu().reshape(1)
        if int(flag) and self.signum is None:
            self.signum = int(flag)
        return bool(int(flag))

    @property
    def exit_code(self) -> int:
        """130 after SIGINT, 143 after SIGTERM."""
        return EXIT_CODES.get(signal.Signals(self.signum), 130) if self.signum is not None else 0


def stopped_run(step: int, iterations: int, output_dir: str, exit_code: int) -> TrainingInterrupted:
    """The error that ends a run stopped by a signal after its checkpoint at ``step`` was saved."""
    return TrainingInterrupted(f"stopped at iteration {step}/{iterations}; checkpoint saved in {output_dir}. "
                               "Run the same command again to continue.", exit_code)
