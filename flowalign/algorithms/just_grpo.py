"""JustGRPO (Ni et al. 2026, The Flexibility Trap, arXiv:2601.15165): decode left to right
(``sampling.order: ar``, one token per step), so each step's log-prob is the exact per-token
log-prob of an autoregressive policy: plain GRPO on the trajectory.

Reference (duterscmy/JustGRPO @ 1dfe9fa): ``grpo.py`` ``logprob_loss`` (L234-310) sums the clipped
loss of every one of the ``gen_length`` window positions (EOS fill included) with the constant scale
``1 / (gen_length x valid_samples)``, ``valid_samples`` the rollouts with a nonzero advantage
(``train_gsm8k.justgrpo.py`` L177-179): ``algorithm.loss_normalization: window``. One update per
batch (its ratio is ``exp(logp - sg(logp))``, L292-297), epsilon 0.2, advantages ``(r - mean) /
(std + 1e-4)`` per group (``compute_group_advantages``, L337-340; unbiased std there, population
std here).
"""

from __future__ import annotations

from typing import Any

from flowalign.algorithms.dllm import DLLMAlgorithm, require_trajectory_estimator
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require


@register_algorithm
class JustGRPO(DLLMAlgorithm):
    name = "just_grpo"
    summary = "left-to-right decoding so per-token log-probs are exact: plain GRPO"
    paper = "Ni et al. 2026, The Flexibility Trap (JustGRPO), arXiv:2601.15165"
    config_file = "configs/dllm/just_grpo_addition.yaml"
    estimator = "trajectory"
    inner_steps = 1
    loss_normalization = "window"  # grpo.py L267: scale = 1 / gen_length / valid_samples over all window positions
    sampling = {"order": "ar"}

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        require_trajectory_estimator(cfg)
        order = cfg.sampling.order
        _require(order == "ar", "sampling.order", f"just_grpo generates left to right: order must be 'ar', got {order!r}")
