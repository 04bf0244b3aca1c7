"""CJ-GRPO (Yang et al. 2025, arXiv:2509.23924, §3.2): optimise the rollout's own trajectory (no
skipped steps: the exact per-step log-probs), decoded with EOS early rejection (the paper's
``gamma_min = 0.4``, i.e. ``sampling.eos_early_rejection = 0.6``) and an ascending step size, so
that few steps suffice (``ceil(log2(gen_length + 1))``).
"""

from __future__ import annotations

from typing import Any

from flowalign.algorithms.dllm import DLLMAlgorithm, require_trajectory_estimator
from flowalign.algorithms.registry import register_algorithm


@register_algorithm
class CJGRPO(DLLMAlgorithm):
    name = "cj_grpo"
    summary = "exact per-step trajectory log-probs of few ascending-size steps with EOS early rejection"
    paper = "Yang et al. 2025, CJ-GRPO, arXiv:2509.23924"
    config_file = "configs/dllm/cj_grpo_addition.yaml"
    estimator = "trajectory"
    inner_steps = 1
    sampling = {"step_schedule": "ascending", "eos_early_rejection": 0.6}
    steps_rule = "log2"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        require_trajectory_estimator(cfg)
