"""MixGRPO (Li et al. 2025, arXiv:2507.21802): SDE sampling and training only inside a window
of steps that slides with training (ODE elsewhere), so each iteration trains a few steps cheaply.

The window schedules (progressive, random, decay, exp_decay) are
:func:`flowalign.rollout.schedules.mix_window`; the random one draws from the
``("window", iteration)`` stream, so a resumed run slides the same way.

Reference: Tencent-Hunyuan/MixGRPO @ ``e5cdd6a`` (``fastvideo/train_grpo_flux.py``,
``fastvideo/utils/grpo_states.py``). Its ``trimmed_ratio`` (train_grpo_flux.py lines 466-477, and
439-449 per reward) is offered as ``trimmed_ratio``: :func:`trimmed_group_advantages`. Its window
geometry (``max_timesteps = sampling_steps − 2``, windows cut at it: train_grpo_flux.py line 919,
grpo_states.py line 148) is ``window_end: reference``; the linear decay's start value
(``--max_iters_per_group`` 10) is ``max_shift_every``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowalign.algorithms.flow import FlowAlgorithm, ScoredRollout, num_trained_steps
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require, _require_choice
from flowalign.config_fields import _f
from flowalign.guards import assert_finite
from flowalign.rollout.schedules import (DECAY_MAX_SHIFT_EVERY, EXP_DECAY_RATE, EXP_DECAY_START, INTERVAL_ROUNDING, WINDOW_ENDS,
                                        WINDOW_STRATEGIES, mix_window, window_positions)
from flowalign.training.rng import stream_generator


@dataclass
class MixGRPOConfig:
    strategy: str = _f("progressive", "Window schedule: progressive | random | decay | exp_decay.")
    size: int = _f(4, "Window size in steps (MixGRPO's w).", ge=1)
    shift_every: int = _f(25, "Iterations per window position (MixGRPO iters_per_group; exp_decay's maximum).", ge=1)
    max_shift_every: int | None = _f(DECAY_MAX_SHIFT_EVERY, "decay: iterations at the first position, falling linearly to "
                                     "min_shift_every (MixGRPO --max_iters_per_group, default 10); null = shift_every.", ge=1)
    min_shift_every: int = _f(1, "decay / exp_decay: iterations per position never drop below this (MixGRPO "
                                 "min_iters_per_group, default 1).", ge=1)
    stride: int = _f(1, "Steps the window moves per shift (MixGRPO --prog_overlap_step 1 with --prog_overlap, as its "
                        "script; stride = size is its non-overlapping mode).", ge=1)
    decay_rate: float = _f(EXP_DECAY_RATE, "exp_decay: shift_every * exp(-decay_rate * max(0, start - decay_start)) "
                                           "(MixGRPO exp_decay_k, default 0.1).", ge=0)
    decay_start: int = _f(EXP_DECAY_START, "exp_decay: window start after which the interval starts to decay (MixGRPO "
                                           "exp_decay_thre_timestep, default 13).", ge=0)
    interval_rounding: str = _f("reference", "decay / exp_decay interval rounding: reference (MixGRPO's: ceil for exp_decay, "
                                             "floor for decay) | ceil | floor | round.", choices=INTERVAL_ROUNDING)
    window_end: str = _f("reference", "Window geometry: reference (MixGRPO's: windows cut at num_steps - 2, shorter near "
                                      "the end, the last two steps never trained) | full (every window `size` steps, the "
                                      "last one ending at num_steps).", choices=WINDOW_ENDS)
    roll_back: bool = _f(True, "After the last position, start again from step 0 (MixGRPO --roll_back: off by default "
                               "in train_grpo_flux.py, set by its MixGRPO script); false stays at the end.")
    trimmed_ratio: float = _f(0.0, "Group mean / std from the group without its lowest floor(G * ratio) rewards "
                                   "(MixGRPO --trimmed_ratio, default 0 = off); needs std_mode group.", ge=0, lt=1)


def trimmed_group_advantages(rewards: Tensor, group_ids: Tensor, *, trimmed_ratio: float, eps: float = 1e-8,
                             unbiased: bool = True, clip: float | None = None, valid: Tensor | None = None) -> Tensor:
    """MixGRPO's trimmed group advantages: ``A_i = (r_i - mean(K_g)) / (std(K_g) + eps)``.

    ``K_g`` is group ``g``'s rewards sorted ascending without the lowest ``k = min(floor(n · ratio),
    n − 1)`` of them (``n`` the group's valid members). Every member -- the trimmed ones too -- is
    normalised by the statistics of ``K_g``. Transcribed from the reference's formula
    (Tencent-Hunyuan/MixGRPO @ e5cdd6a, fastvideo/train_grpo_flux.py lines 466-477: ``torch.sort``,
    ``trim_size = min(int(len * trimmed_ratio), len - 1)``, ``sorted[trim_size:]``, ``.mean()``,
    ``.std() + 1e-8`` -- torch's unbiased std; ``args.trimmed_ratio`` defaults to 0.0, line 1298).
    ``trimmed_ratio = 0`` is the plain group normalisation.

    Where the reference gets NaN (one member kept and the unbiased std of one value), the kept
    spread is taken as 0 here (:func:`flowalign.advantages.group_advantages`'s convention), so the
    trimmed members get ``(r − mean) / eps`` (then ``clip``). Invalid members (``valid`` False) are
    left out of every statistic and get 0.

    Args:
        rewards: ``[N]`` float rewards; group_ids: ``[N]`` integer group ids.
        trimmed_ratio: in ``[0, 1)``.
        eps, unbiased: the std's constant and estimator (MixGRPO: 1e-8, unbiased).
        clip: optional bound ``|A| <= clip`` (MixGRPO's ``adv_clip_max``, applied in its loss, line 567).

    Returns:
        ``[N]`` float32.
    """
    if not (isinstance(trimmed_ratio, (int, float)) and not isinstance(trimmed_ratio, bool) and 0 <= trimmed_ratio < 1):
        raise ValueError(f"trimmed_ratio must be a number in [0, 1), got {trimmed_ratio!r}")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    r = rewards.detach().to(torch.float64).masked_fill(~valid, 0.0)
    assert_finite(r, "rewards")
    out = torch.zeros_like(r)
    for g in torch.unique(group_ids).tolist():
        members = ((group_ids == g) & valid).nonzero().squeeze(1)
        n = members.numel()
        if n == 0:
            continue
        kept = torch.sort(r[members]).values[min(math.floor(n * trimmed_ratio), n - 1):]
        mean = kept.mean()
        ddof = 1 if unbiased else 0
        std = ((kept - mean).pow(2).sum() / max(kept.numel() - ddof, 1)).sqrt()
        out[members] = (r[members] - mean) / (std + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out.to(torch.float32)


@register_algorithm
class MixGRPO(FlowAlgorithm):
    name = "mix_grpo"
    summary = "SDE and training only inside a window of steps that slides with training, ODE elsewhere"
    paper = "Li et al. 2025, MixGRPO, arXiv:2507.21802"
    Config = MixGRPOConfig
    config_file = "configs/mix_grpo/quickstart.yaml"
    # the reference normalises with torch's unbiased std + 1e-8 (docs/FIDELITY.md, "Group std")
    std_estimator = "unbiased"
    std_eps = 1e-8

    def sde_window(self, iteration: int) -> tuple[int, int]:
        w = self.opts
        return mix_window(iteration, self.cfg.sampling.num_steps, strategy=w.strategy, size=w.size,
                          shift_every=w.shift_every, min_shift_every=w.min_shift_every, stride=w.stride,
                          decay_rate=w.decay_rate, decay_start=w.decay_start, roll_back=w.roll_back,
                          rounding=w.interval_rounding, window_end=w.window_end, max_shift_every=w.max_shift_every,
                          generator=stream_generator(self.cfg.seed, "window", iteration))

    def leaf_advantages(self, scored: ScoredRollout) -> Tensor:
        """Group advantages over every rank's leaves; with ``trimmed_ratio > 0`` MixGRPO's trimmed
        statistics (:func:`trimmed_group_advantages`)."""
        if self.opts.trimmed_ratio == 0:
            return super().leaf_advantages(scored)
        unbiased, eps = self.group_std()
        return trimmed_group_advantages(scored.all_scores, scored.all_groups, trimmed_ratio=self.opts.trimmed_ratio, eps=eps,
                                        unbiased=unbiased, clip=self.cfg.algorithm.adv_clip or None, valid=scored.all_valid)

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        """Trained steps per sample of the shortest window the schedule visits (with
        ``window_end: reference`` the windows near the end hold fewer than ``size`` steps); each
        iteration's own count is :func:`num_trained_steps` of its window (``rollout_spec``)."""
        w, s = cls.options(cfg), cfg.sampling
        shortest = min(end - start for start, end in window_positions(s.num_steps, size=w.size, stride=w.stride,
                                                                      window_end=w.window_end, strategy=w.strategy))
        return num_trained_steps(s, shortest), "edges"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        w, s = cls.options(cfg), cfg.sampling
        _require_choice(w.strategy, [k for k in WINDOW_STRATEGIES if k != "none"], f"algorithm.{cls.name}.strategy", "strategy")
        _require(s.sde_window is None, "sampling.sde_window", "mix_grpo's moving window replaces sampling.sde_window; remove it")
        _require(w.size <= s.num_steps, f"algorithm.{cls.name}.size", f"must be in [1, num_steps={s.num_steps}]")
        _require_choice(w.interval_rounding, INTERVAL_ROUNDING, f"algorithm.{cls.name}.interval_rounding", "rounding")
        _require_choice(w.window_end, WINDOW_ENDS, f"algorithm.{cls.name}.window_end", "window end")
        if w.window_end == "reference":
            _require(s.num_steps >= 3, f"algorithm.{cls.name}.window_end",
                     f"'reference' trains steps [0, num_steps - 2) and needs sampling.num_steps >= 3, got {s.num_steps}")
            _require(w.strategy != "random" or w.size <= s.num_steps - 2, f"algorithm.{cls.name}.size",
                     f"random windows with window_end 'reference' need size <= num_steps - 2 = {s.num_steps - 2}")
        _require(w.trimmed_ratio == 0 or cfg.algorithm.std_mode == "group", f"algorithm.{cls.name}.trimmed_ratio",
                 f"trims each prompt's group (MixGRPO's use_group); needs algorithm.std_mode=group, got {cfg.algorithm.std_mode!r}")
