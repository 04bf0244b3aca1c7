"""Process-wide settings of a run: torch's CPU threads, and releasing accelerate's process-global
state at the end of a run."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator


def end_accelerator(accelerator: Accelerator) -> None:
    """End ``accelerator``'s trackers and release accelerate's process-global state.

    accelerate keeps mixed-precision and gradient-accumulation settings in singletons; resetting
    them lets a second run in the same process (a notebook, a sweep, a benchmark) choose other
    settings. The process group (``PartialState``) is kept for the next run of the process
    (``accelerator.end_training()`` would destroy it); ``flowalign train`` ends it before exit.
    """
    from accelerate.state import AcceleratorState, GradientState

    for tracker in accelerator.trackers:
        tracker.finish()
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def configure_threads(num_threads: int) -> int:
    """Set torch's intra-op CPU threads for this process and return the number set.

    ``num_threads > 0`` is taken as given. ``0`` (automatic) never oversubscribes the machine by
    itself: the cores this process may run on (its CPU affinity) divided among this machine's
    training processes (``LOCAL_WORLD_SIZE``), at least 1. It does not look at other jobs' load, so
    a run's numerics (which can depend on the thread count) do not change with the machine's
    load; next to other busy jobs set ``num_threads`` lower. Oversubscribed OpenMP threads spin on
    cores another job holds: on 2 cores with one busy process, a BranchGRPO quickstart iteration
    took 4.0 s with 2 threads and 1.1 s with 1, which is why the quickstart configs use 1.
    """
    if num_threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(num_threads)
    return num_threads
