"""JustGRPO (Ni et al. 2026, The Flexibility Trap, arXiv:2601.15165): decode left to right
(``sampling.order: ar``, one token per step), so each step's log-prob is the exact per-token
log-prob of an autoregressive policy: plain GRPO on the trajectory.
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
    sampling = {"order": "ar"}

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        require_trajectory_estimator(cfg)
        order = cfg.sampling.order
        _require(order == "ar", "sampling.order", f"just_grpo generates left to right: order must be 'ar', got {order!r}")
