"""Multi-reward GRPO with decoupled normalisation (GDPO, Liu et al. 2026, arXiv:2601.05242).

Each reward is normalised within its group on its own, then the weighted sum is renormalised
(:func:`flowalign.estimators.preference.decoupled_normalization`): a reward with a large scale or
spread no longer drowns the others. With a single reward it is GRPO.

Reference: NVlabs/GDPO @ b080e63, ``trl-GDPO/trl-0.18.0-gdpo/trl/trainer/grpo_trainer.py`` l. 1221-1248.
Both of its normalisations divide by ``torch.std`` (unbiased, ddof 1) + 1e-4, so this algorithm's
``algorithm.std_estimator`` / ``algorithm.std_eps`` default to ``unbiased`` / 1e-4 (the verl version,
``verl-GDPO/verl/trainer/ppo/ray_trainer.py`` l. 175-199, uses ddof 1 + 1e-6, then ``masked_whiten``).
Differences (docs/FIDELITY.md): the advantages are clamped to ``±algorithm.adv_clip`` (GDPO does not
clip; set ``adv_clip: 0`` for its form) and a sample missing a reward is an error, not a 0 (GDPO's
``nan_to_num``).
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
    # GDPO (trl) grpo_trainer.py l. 1233 / 1246: `.std()` (ddof 1) and `+ 1e-4` in both stages.
    std_estimator = "unbiased"
    std_eps = 1e-4

    def leaf_advantages(self, scored: ScoredRollout) -> Tensor:
        if len(scored.weights) < 2:
            return super().leaf_advantages(scored)
        if not bool(scored.all_valid.all()):
            raise FloatingPointError("multi_reward needs every sample scored by every reward")
        a = self.cfg.algorithm
        parts = {name: scored.gather(scored.components[name]) for name in scored.weights}
        unbiased, eps = self.group_std()
        adv = decoupled_normalization(parts, scored.weights, scored.all_groups, std_mode=a.std_mode, renormalize=True,
                                      eps=eps, unbiased=unbiased)
        # GDPO has no advantage clip; ours keeps Flow-GRPO's ±adv_clip (0 disables it).
        return adv.clamp(-a.adv_clip, a.adv_clip) if a.adv_clip else adv

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        _require(len(cfg.rewards) >= 2, "rewards", f"multi_reward normalises several rewards apart: list at least 2, got {len(cfg.rewards)}")
