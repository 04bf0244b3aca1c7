"""Per-iteration schedules of the rollout: MixGRPO's sliding SDE window.

MixGRPO (Li et al. 2025, arXiv:2507.21802, §3.2 "sliding window") samples with the SDE -- and
trains -- only inside a window of ``w`` consecutive steps, ODE elsewhere, and moves the window
towards the clean end as training goes on. The reference implementation's strategies
(``sample_strategy`` in Tencent-Hunyuan/MixGRPO) are reproduced here:

* ``progressive``: the window starts at step 0 and moves by ``stride`` every ``shift_every``
  iterations (``iters_per_group``);
* ``decay``: like progressive, but the interval falls linearly with the window's start, from
  ``shift_every`` at step 0 to ``min_shift_every`` at the last position (later steps need less
  training);
* ``exp_decay``: interval ``shift_every · exp(−decay_rate · ReLU(start − decay_start))``, at least
  ``min_shift_every``;
* ``random``: a uniformly random start each iteration.

After the last position the window rolls back to step 0 (``roll_back``) or stays there.
"""

from __future__ import annotations

import math

import torch

WINDOW_STRATEGIES = ("none", "progressive", "random", "decay", "exp_decay")


def window_interval(start: int, *, strategy: str, last_start: int, shift_every: int, min_shift_every: int,
                    decay_rate: float = 0.5, decay_start: int = 0) -> int:
    """Iterations the window stays at ``start`` (MixGRPO's ``iters_per_group`` at that position)."""
    if strategy == "progressive":
        return shift_every
    if strategy == "decay":
        frac = start / last_start if last_start > 0 else 0.0
        return max(min_shift_every, round(shift_every - (shift_every - min_shift_every) * frac))
    if strategy == "exp_decay":
        return max(min_shift_every, round(shift_every * math.exp(-decay_rate * max(0, start - decay_start))))
    raise ValueError(f"window strategy {strategy!r} has no interval; use progressive | decay | exp_decay")


def mix_window(iteration: int, num_steps: int, *, strategy: str, size: int, shift_every: int = 25,
               min_shift_every: int = 5, stride: int = 1, decay_rate: float = 0.5, decay_start: int = 0,
               roll_back: bool = True, generator: torch.Generator | None = None) -> tuple[int, int]:
    """The ``[start, end)`` SDE window of training iteration ``iteration`` (0-based).

    Args:
        num_steps: ``T`` sampling steps; the window lies in ``[0, T)``.
        strategy: one of :data:`WINDOW_STRATEGIES` except ``"none"``.
        size: ``w`` steps per window (``1 <= w <= T``).
        generator: the random stream of ``strategy="random"`` (one draw per call).
    """
    if strategy not in WINDOW_STRATEGIES or strategy == "none":
        raise ValueError(f"unknown window strategy {strategy!r}; use one of {WINDOW_STRATEGIES[1:]}")
    if not 1 <= size <= num_steps:
        raise ValueError(f"window size must be in [1, num_steps={num_steps}], got {size}")
    if shift_every < 1 or min_shift_every < 1 or stride < 1:
        raise ValueError("window shift_every, min_shift_every and stride must be >= 1")
    last_start = num_steps - size
    if strategy == "random":
        start = int(torch.randint(0, last_start + 1, (1,), generator=generator))
        return start, start + size
    starts = list(range(0, last_start + 1, stride))
    intervals = [window_interval(s, strategy=strategy, last_start=last_start, shift_every=shift_every,
                                 min_shift_every=min_shift_every, decay_rate=decay_rate, decay_start=decay_start)
                 for s in starts]
    position = iteration % sum(intervals) if roll_back else iteration
    for start, interval in zip(starts, intervals):
        if position < interval:
            return start, start + size
        position -= interval
    return starts[-1], starts[-1] + size  # no roll-back: stay at the last position
