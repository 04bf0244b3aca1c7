"""diffu-GRPO (d1, Zhao et al. 2025, arXiv:2504.12216, §3.2, Eqs. 4-5): the one-step per-token
estimator -- the completion fully masked, each prompt token masked with probability ``p_mask`` --
in the token-level GRPO objective; ``mu`` inner updates per batch of rollouts, each with a fresh
prompt mask (shared by its old and new log-probs). Every hook is :class:`DLLMAlgorithm`'s default.
"""

from __future__ import annotations

from flowalign.algorithms.dllm import DLLMAlgorithm
from flowalign.algorithms.registry import register_algorithm


@register_algorithm
class DiffuGRPO(DLLMAlgorithm):
    name = "diffu_grpo"
    summary = "one-step per-token log-probs with random prompt masking, token-level clipped ratio, mu inner steps"
    paper = "Zhao et al. 2025, d1, arXiv:2504.12216"
    config_file = "configs/dllm/diffu_grpo_addition.yaml"
    estimator = "one_step"
    inner_steps = 4
