"""Coupled-GRPO (DiffuCoder, Gong et al. 2025, arXiv:2506.20639, §4): diffu-GRPO with coupled
complementary masks -- each inner step scores every completion token exactly once over the two
forwards of a pair of complementary masks, which lowers the variance of the per-token estimate.

The defaults follow the authors' code (apple/ml-diffucoder @ f735e01, docs/FIDELITY.md):
``recipes/config_coupled_code.yaml`` ``num_iterations: 2``, ``epsilon: 0.5`` (no ``epsilon_high``:
symmetric), ``beta: 0.01``, ``scale_rewards: false``; ``src/open_r1/coupled_grpo.py`` L224 divides
the batch's token-loss sum by its token count and L545-567 uses the leave-one-out baseline
(``leave_one_out = True`` hard-coded): ``A_i = r_i - mean_{j != i} r_j``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowalign.advantages import group_advantages
from flowalign.algorithms.dllm import DLLMAlgorithm, DLLMRollouts, over_ranks
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_fields import _f


@dataclass
class CoupledGRPOConfig:
    leave_one_out: bool = _f(True, "Leave-one-out baseline A_i = r_i - mean of the group's other rewards = G/(G-1) (r_i - "
                             "mean) (DiffuCoder's coupled_grpo.py L545-567); false: the group mean. algorithm.std_mode "
                             "still divides by the std when not 'none'.")


def leave_one_out_scale(group_ids: Tensor) -> Tensor:
    """``[N]`` float32 ``n_g / (n_g - 1)`` of each row's group (``n_g`` its size; 0 for a group of one):
    ``r_i - (sum_g - r_i) / (n_g - 1) = n_g / (n_g - 1) * (r_i - mean_g)``."""
    ids = group_ids.long()
    _, inverse = torch.unique(ids, return_inverse=True)
    n = torch.bincount(inverse).float()[inverse]
    return torch.where(n > 1, n / (n - 1).clamp_min(1.0), torch.zeros_like(n))


@register_algorithm
class CoupledGRPO(DLLMAlgorithm):
    name = "coupled_grpo"
    summary = "per-token log-probs from pairs of complementary masks (every token scored once per pair)"
    paper = "Gong et al. 2025, DiffuCoder, arXiv:2506.20639"
    Config = CoupledGRPOConfig
    config_file = "configs/dllm/coupled_grpo_addition.yaml"
    estimator = "coupled"
    inner_steps = 2  # recipes/config_coupled_code.yaml num_iterations: 2
    clip_range = 0.5  # epsilon: 0.5
    kl_beta = 0.01  # beta: 0.01
    # DiffuCoder divides the batch's token-loss sum by its token count (src/open_r1/coupled_grpo.py L224 @ f735e01);
    # its clipping is symmetric (config epsilon 0.5, no epsilon_high): algorithm.clip_range_high stays null
    loss_normalization = "token"
    std_mode = "none"  # scale_rewards: false
    advantage = "group, leave-one-out baseline, no std"

    def advantages(self, recipe: Any, rollouts: DLLMRollouts) -> tuple[Tensor, dict[str, float]]:
        """GRPO's group-relative advantage (``algorithm.std_mode``), times ``G / (G - 1)`` with
        ``algorithm.coupled_grpo.leave_one_out`` (the reference's baseline, L557-559). With a std
        the reference divides by the unbiased std + 1e-4, ours by ``std_mode``'s."""
        a = self.cfg.algorithm
        adv = over_ranks(recipe, rollouts, rollouts.rewards, a.std_mode,
                         lambda r, g: group_advantages(r, g, std_mode=a.std_mode, clip=None))
        if self.opts.leave_one_out:
            adv = adv * leave_one_out_scale(rollouts.group_ids).to(adv.device)
        if a.adv_clip:
            adv = adv.clamp(-a.adv_clip, a.adv_clip)
        return adv, {}
