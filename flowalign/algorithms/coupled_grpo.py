"""Coupled-GRPO (DiffuCoder, Gong et al. 2025, arXiv:2506.20639, §4): diffu-GRPO with coupled
complementary masks -- each inner step scores every completion token exactly once over the two
forwards of a pair of complementary masks, which lowers the variance of the per-token estimate.
"""

from __future__ import annotations

from flowalign.algorithms.dllm import DLLMAlgorithm
from flowalign.algorithms.registry import register_algorithm


@register_algorithm
class CoupledGRPO(DLLMAlgorithm):
    name = "coupled_grpo"
    summary = "per-token log-probs from pairs of complementary masks (every token scored once per pair)"
    paper = "Gong et al. 2025, DiffuCoder, arXiv:2506.20639"
    config_file = "configs/dllm/coupled_grpo_addition.yaml"
    estimator = "coupled"
    inner_steps = 2
