"""Multi-reward GRPO with decoupled normalisation (GDPO, Liu et al. 2026, arXiv:2601.05242).

Each reward is normalised within its group on its own, then the weighted sum is renormalised
(:func:`flowalign.estimators.preference.decoupled_normalization`): a reward with a large scale or
spread no longer drowns the others. With a single reward it is GRPO.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from flowalign.algorithms.flow import FlowAlgorithm, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.estimators.preference import decoupled_normalization


@register_algorithm
class MultiReward(FlowAlgorithm):
    name = "multi_reward"
    summary = "several rewards, each normalised within its group before the weighted sum"
    paper = "Liu et al. 2026, GDPO (group reward-decoupled normalisation), arXiv:2601.05242"
    advantage = "decoupled"
    config_file = "configs/multi_reward/quickstart.yaml"

    def leaf_advantages(self, scored: ScoredRollout) -> Tensor:
        if len(scored.weights) < 2:
            return super().leaf_advantages(scored)
        if not bool(scored.all_valid.all()):
            raise FloatingPointError("multi_reward needs every sample scored by every reward")
        a = self.cfg.algorithm
        parts = {name: scored.gather(scored.components[name]) for name in scored.weights}
        adv = decoupled_normalization(parts, scored.weights, scored.all_groups, std_mode=a.std_mode, renormalize=True)
        return adv.clamp(-a.adv_clip, a.adv_clip) if a.adv_clip else adv

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        _require(len(cfg.rewards) >= 2, "rewards", f"multi_reward normalises several rewards apart: list at least 2, got {len(cfg.rewards)}")
