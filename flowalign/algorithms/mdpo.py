"""MDPO (He et al. 2025, arXiv:2508.13148, §3): denoising as a Markov decision process. The exact
per-step log-probs of the sampled trajectory are trained, each step with its own advantage: the
reward of the greedy clean prediction after that step, normalised within its (prompt group, step)
cell (:func:`flowalign.dllm.algorithms.mdpo_step_advantages`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from flowalign.algorithms.dllm import DLLMAlgorithm, DLLMRollouts, require_trajectory_estimator
from flowalign.algorithms.registry import register_algorithm
from flowalign.dllm.algorithms import mdpo_step_advantages, predicted_completions


@register_algorithm
class MDPO(DLLMAlgorithm):
    name = "mdpo"
    summary = "exact per-step trajectory log-probs, advantages per step from the intermediate predictions' rewards"
    paper = "He et al. 2025, MDPO, arXiv:2508.13148"
    config_file = "configs/dllm/mdpo_addition.yaml"
    estimator = "trajectory"
    inner_steps = 1
    advantage = "group per denoising step, from the intermediate predictions' rewards"

    def advantages(self, recipe: Any, rollouts: DLLMRollouts) -> tuple[Tensor, dict[str, float]]:
        """``[N, S]`` per-step advantages: the task reward of the greedy prediction ``x0_hat`` after
        each of the ``S`` denoising steps (``[N, S, Lg]``, one model forward per intermediate state),
        group-relative within each (prompt group, step) cell. Logs the mean reward of the first
        step's prediction (``train/step_reward_first``)."""
        a = self.cfg.algorithm
        predicted = predicted_completions(recipe.logits_fn, rollouts.trajectory, recipe.mask_id)  # [N, S, Lg]
        N, S, Lg = predicted.shape
        examples = [ex for ex in rollouts.examples for _ in range(S)]
        step_rewards = recipe.score(predicted.reshape(N * S, Lg), examples).reshape(N, S)
        advantages = mdpo_step_advantages(step_rewards, rollouts.group_ids, std_mode=a.std_mode, clip=a.adv_clip or None)
        return advantages, {"train/step_reward_first": recipe.mean(step_rewards[:, 0])}

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        require_trajectory_estimator(cfg)
