"""diffu-GRPO (d1, Zhao et al. 2025, arXiv:2504.12216, §3.2, Eqs. 4-5): the one-step per-token
estimator -- the completion fully masked, each prompt token masked with probability ``p_mask`` --
in the token-level GRPO objective; ``mu`` inner updates per batch of rollouts, each with a fresh
prompt mask (shared by its old and new log-probs). Every hook is :class:`DLLMAlgorithm`'s default;
the defaults (mu 12, beta 0.04, epsilon 0.5, token-mean loss, ``r - mean`` advantages) are d1's.
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
    # d1's shipped defaults (dllm-reasoning/d1 @ 837888f, diffu-grpo/slurm_scripts/train.yaml):
    # num_iterations 12 (gsm_base.sbatch / math; countdown_base / sudoku_base.sbatch pass 8), beta 0.04, epsilon 0.5
    inner_steps = 12
    clip_range = 0.5
    kl_beta = 0.04
    # d1 divides the batch's token-loss sum by its token count (diffu_grpo_trainer.py L121 @ 837888f)
    loss_normalization = "token"
    # d1's advantage is r - group mean, never divided by the std (diffu_grpo_trainer.py L533-539)
    std_mode = "none"
    advantage = "group, mean-centred (no std)"
