"""Run a bench's independent runs side by side in worker processes (``--jobs``), each on its own threads.

A run's budget is its own training seconds, so runs in parallel stay comparable as long as every worker
gets the same number of cores: choose ``jobs x threads`` at most the machine's cores.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import torch


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_jobs(fn: Callable[..., Any], jobs: dict[str, tuple], workers: int, threads: int) -> dict[str, Any]:
    """``{name: fn(*args)}`` for every ``name: args`` of ``jobs``, in order: in this process when
    ``workers <= 1``, else in ``workers`` fresh (spawned) processes of ``threads`` threads each.
    ``fn`` must be a module-level function of an importable module or of the running script."""
    if workers <= 1:
        return {name: fn(*args) for name, args in jobs.items()}
    cores = os.cpu_count() or 1
    if workers * threads > cores:
        print(f"[bench] warning: {workers} jobs x {threads} threads > {cores} cores: runs compete for cores "
              "and their training seconds are not comparable", flush=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(threads,)) as pool:
        futures = {name: pool.submit(fn, *args) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}
