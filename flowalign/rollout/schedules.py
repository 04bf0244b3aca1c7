"""Per-iteration schedules of the rollout: MixGRPO's sliding SDE window.

MixGRPO (Li et al. 2025, arXiv:2507.21802, §3.2 "sliding window") samples with the SDE -- and
trains -- only inside a window of ``w`` consecutive steps, ODE elsewhere, and moves the window
towards the clean end as training goes on. The reference implementation's strategies
(``sample_strategy`` in Tencent-Hunyuan/MixGRPO) are reproduced here:

* ``progressive``: the window starts at step 0 and moves by ``stride`` every ``shift_every``
  iterations (``iters_per_group``);
* ``decay``: like progressive, but the interval falls linearly with the window's start, from
  ``max_shift_every`` (MixGRPO's ``max_iters_per_group``, 10; ``None``: ``shift_every``) at step 0
  towards ``min_shift_every`` at the cursor's last position (later steps need less training);
* ``exp_decay``: interval ``shift_every · exp(−decay_rate · ReLU(start − decay_start))``, at least
  ``min_shift_every``;
* ``random``: a uniformly random start each iteration.

After the last position the window rolls back to step 0 (``roll_back``) or stays there.

Window geometry (``window_end``). The reference (Tencent-Hunyuan/MixGRPO @ ``e5cdd6a``) builds its
schedule with ``max_timesteps = sampling_steps - 2`` (``fastvideo/train_grpo_flux.py`` line 919)
and trains the steps ``range(cur, min(cur + group_size, max_timesteps))`` (``grpo_states.py``
line 148): with ``M = T - 2`` the cursor visits ``0, stride, ...`` while ``cur <= M`` (line 95:
it rolls back once ``cur > M``), the windows near the end shrink and the last two steps are never
trained. ``"reference"`` reproduces that, except the cursor position ``M`` itself, whose window
is empty: the reference then samples all-ODE, trains nothing and reads an unassigned ``ratio``
(``train_grpo_flux.py`` line 612, an UnboundLocalError on rank 0), so no reference run goes
past it; here the schedule skips it (rolls back, or without ``roll_back`` stays at the last
non-empty window). ``"full"`` (this module's former geometry) keeps every window ``size`` steps
long, the last one starting at ``T - size``.

Rounding of the decayed intervals (``rounding``): the reference (Tencent-Hunyuan/MixGRPO @
``e5cdd6a``, ``fastvideo/utils/grpo_states.py``) takes ``np.ceil`` of the exponential interval
(line 83) and ``int()`` -- truncation, i.e. floor for these positive values -- of the linear one
(line 66); ``"reference"`` does exactly that, ``"ceil"`` / ``"floor"`` / ``"round"`` apply one mode to
both (``"round"`` was this module's only mode before).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

WINDOW_STRATEGIES = ("none", "progressive", "random", "decay", "exp_decay")
INTERVAL_ROUNDING = ("reference", "ceil", "floor", "round")
WINDOW_ENDS = ("reference", "full")
# MixGRPO's --max_iters_per_group default (and script value): the linear decay's interval at step 0
# (train_grpo_flux.py lines 1360-1364 @ e5cdd6a: default 10; scripts/finetune/finetune_flux_grpo_MixGRPO.sh passes 10)
DECAY_MAX_SHIFT_EVERY = 10

# MixGRPO's GRPOTrainingStates defaults (Tencent-Hunyuan/MixGRPO @ e5cdd6a, fastvideo/utils/grpo_states.py
# lines 40-41: exp_decay_thre_timestep = 13, exp_decay_k = 0.1; train_grpo_flux.py never overrides them)
EXP_DECAY_RATE = 0.1
EXP_DECAY_START = 13


def _rounded(value: float | Fraction, strategy: str, rounding: str) -> int:
    if rounding == "reference":  # grpo_states.py line 83 (np.ceil, exp_decay) / line 66 (int(), decay)
        rounding = "ceil" if strategy == "exp_decay" else "floor"
    if rounding == "ceil":
        return math.ceil(value)
    if rounding == "floor":
        return math.floor(value)
    if rounding == "round":
        return round(value)
    raise ValueError(f"unknown window interval rounding {rounding!r}; use one of {INTERVAL_ROUNDING}")


def window_interval(start: int, *, strategy: str, last_start: int, shift_every: int, min_shift_every: int,
                    decay_rate: float = EXP_DECAY_RATE, decay_start: int = EXP_DECAY_START,
                    rounding: str = "reference") -> int:
    """Iterations the window stays at ``start`` (MixGRPO's ``iters_per_group`` at that position).

    ``decay``: ``shift_every · (1 − p) + min_shift_every · p`` with ``p = start / last_start``,
    ``last_start`` the cursor's last position (the reference's ``max_timesteps``; pass the linear
    decay's maximum -- MixGRPO's ``max_iters_per_group`` -- as ``shift_every``), rounded by ``rounding``.

    ``exp_decay``: ``shift_every · exp(−decay_rate · max(0, start − decay_start))`` (the reference's
    ``y(t) = iters_per_group · exp(−k · ReLU(t − threshold))``, grpo_states.py lines 71-83), rounded
    by ``rounding``, at least ``min_shift_every`` (the reference has no floor but its ceil, which is
    >= 1: ``min_shift_every = 1`` matches it).
    """
    if strategy == "progressive":
        return shift_every
    if strategy == "decay":
        # max · (1 − p) + min · p with p = start / last_start (grpo_states.py line 66), as an exact
        # fraction so that the floor / ceil of an integral value never falls on the wrong side of it
        value = Fraction(shift_every * (last_start - start) + min_shift_every * start, last_start) if last_start > 0 \
            else Fraction(shift_every)
        return max(min_shift_every, _rounded(value, strategy, rounding))
    if strategy == "exp_decay":
        value = shift_every * math.exp(-decay_rate * max(0, start - decay_start))
        return max(min_shift_every, _rounded(value, strategy, rounding))
    raise ValueError(f"window strategy {strategy!r} has no interval; use progressive | decay | exp_decay")


def window_cursor_end(num_steps: int, size: int, window_end: str = "reference") -> int:
    """The cursor's last position ``M`` (the reference's ``max_timesteps``): ``T − 2`` for
    ``"reference"`` (train_grpo_flux.py line 919), ``T − size`` for ``"full"``."""
    if window_end == "reference":
        return num_steps - 2
    if window_end == "full":
        return num_steps - size
    raise ValueError(f"unknown window_end {window_end!r}; use one of {WINDOW_ENDS}")


def window_positions(num_steps: int, *, size: int, stride: int = 1, window_end: str = "reference",
                     strategy: str = "progressive") -> list[tuple[int, int]]:
    """Every ``[start, end)`` window the schedule can use, in the order the cursor visits them.

    ``"reference"``: starts ``0, stride, ... < M`` with ``M = T − 2`` and ends ``min(start + size, M)``
    (grpo_states.py lines 95 and 148; the empty window at ``start = M`` is left out, see the module
    notes); for ``strategy="random"`` every start in ``[0, M − size]`` with ``size`` steps (line 102:
    ``rng.integers(0, max_timesteps − group_size + 1)``). ``"full"``: starts ``0, stride, ... <= T − size``
    (every start in that range for random), ``size`` steps each.
    """
    if not 1 <= size <= num_steps:
        raise ValueError(f"window size must be in [1, num_steps={num_steps}], got {size}")
    if stride < 1:
        raise ValueError("window stride must be >= 1")
    last = window_cursor_end(num_steps, size, window_end)
    if window_end == "reference" and last < 1:
        raise ValueError(f"window_end 'reference' trains steps [0, num_steps - 2) and needs num_steps >= 3, got {num_steps}")
    if strategy == "random":
        if window_end == "reference" and size > last:
            raise ValueError(f"random windows with window_end 'reference' need size <= num_steps - 2 = {last}, got {size}")
        return [(s, s + size) for s in range((last - size if window_end == "reference" else last) + 1)]
    if window_end == "full":
        return [(s, s + size) for s in range(0, last + 1, stride)]
    return [(s, min(s + size, last)) for s in range(0, last, stride)]


def mix_window(iteration: int, num_steps: int, *, strategy: str, size: int, shift_every: int = 25,
               min_shift_every: int = 1, stride: int = 1, decay_rate: float = EXP_DECAY_RATE,
               decay_start: int = EXP_DECAY_START, roll_back: bool = True, rounding: str = "reference",
               window_end: str = "reference", max_shift_every: int | None = DECAY_MAX_SHIFT_EVERY,
               generator: torch.Generator | None = None) -> tuple[int, int]:
    """The ``[start, end)`` SDE window of training iteration ``iteration`` (0-based).

    Args:
        num_steps: ``T`` sampling steps; the window lies in ``[0, T)``.
        strategy: one of :data:`WINDOW_STRATEGIES` except ``"none"``.
        size: ``w`` steps per window (``1 <= w <= T``); with ``window_end="reference"`` the windows
            near the end are shorter (:func:`window_positions`).
        shift_every: iterations per position (progressive; exp_decay's maximum).
        max_shift_every: the linear ``decay``'s interval at step 0 (MixGRPO's ``max_iters_per_group``,
            default 10); ``None`` uses ``shift_every``.
        rounding: how decayed intervals are rounded, one of :data:`INTERVAL_ROUNDING`.
        window_end: the window geometry, one of :data:`WINDOW_ENDS` (module notes).
        generator: the random stream of ``strategy="random"`` (one draw per call).
    """
    if strategy not in WINDOW_STRATEGIES or strategy == "none":
        raise ValueError(f"unknown window strategy {strategy!r}; use one of {WINDOW_STRATEGIES[1:]}")
    if shift_every < 1 or min_shift_every < 1 or stride < 1 or (max_shift_every is not None and max_shift_every < 1):
        raise ValueError("window shift_every, max_shift_every, min_shift_every and stride must be >= 1")
    if rounding not in INTERVAL_ROUNDING:
        raise ValueError(f"unknown window interval rounding {rounding!r}; use one of {INTERVAL_ROUNDING}")
    windows = window_positions(num_steps, size=size, stride=stride, window_end=window_end, strategy=strategy)
    if strategy == "random":
        return windows[int(torch.randint(0, len(windows), (1,), generator=generator))]
    # the decay's progress denominator is the cursor's last position (the reference's max_timesteps)
    last = window_cursor_end(num_steps, size, window_end)
    top = shift_every if strategy != "decay" or max_shift_every is None else max_shift_every
    intervals = [window_interval(s, strategy=strategy, last_start=last, shift_every=top, min_shift_every=min_shift_every,
                                 decay_rate=decay_rate, decay_start=decay_start, rounding=rounding)
                 for s, _ in windows]
    position = iteration % sum(intervals) if roll_back else iteration
    for window, interval in zip(windows, intervals):
        if position < interval:
            return window
        position -= interval
    return windows[-1]  # no roll-back: stay at the last position
