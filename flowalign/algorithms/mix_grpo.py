"""MixGRPO (Li et al. 2025, arXiv:2507.21802): SDE sampling and training only inside a window
of steps that slides with training (ODE elsewhere), so each iteration trains a few steps cheaply.

The window schedules (progressive, random, decay, exp_decay) are
:func:`flowalign.rollout.schedules.mix_window`; the random one draws from the
``("window", iteration)`` stream, so a resumed run slides the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowalign.algorithms.flow import FlowAlgorithm, num_trained_steps
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require, _require_choice
from flowalign.config_fields import _f
from flowalign.rollout.schedules import WINDOW_STRATEGIES, mix_window
from flowalign.training.rng import stream_generator


@dataclass
class MixGRPOConfig:
    strategy: str = _f("progressive", "Window schedule: progressive | random | decay | exp_decay.")
    size: int = _f(4, "Window size in steps (MixGRPO's w).", ge=1)
    shift_every: int = _f(25, "Iterations per window position (MixGRPO iters_per_group; the maximum for decay schedules).", ge=1)
    min_shift_every: int = _f(5, "decay / exp_decay: iterations per position never drop below this.", ge=1)
    stride: int = _f(1, "Steps the window moves per shift.", ge=1)
    decay_rate: float = _f(0.5, "exp_decay: shift_every * exp(-decay_rate * max(0, start - decay_start)).", ge=0)
    decay_start: int = _f(0, "exp_decay: window start after which the interval starts to decay.", ge=0)
    roll_back: bool = _f(True, "After the last position, start again from step 0 (MixGRPO roll_back); false stays at the end.")


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
                          generator=stream_generator(self.cfg.seed, "window", iteration))

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return num_trained_steps(cfg.sampling, cfg.algorithm.mix_grpo.size), "edges"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        w, s = cfg.algorithm.mix_grpo, cfg.sampling
        _require_choice(w.strategy, [k for k in WINDOW_STRATEGIES if k != "none"], "algorithm.mix_grpo.strategy", "strategy")
        _require(s.sde_window is None, "sampling.sde_window", "mix_grpo's moving window replaces sampling.sde_window; remove it")
        _require(w.size <= s.num_steps, "algorithm.mix_grpo.size", f"must be in [1, num_steps={s.num_steps}]")
