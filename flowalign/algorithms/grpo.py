"""GRPO for flow / diffusion models (Flow-GRPO, DanceGRPO): the defaults of :class:`FlowAlgorithm`.

A flat group of ``sampling.group_size`` SDE samples per prompt; each sample's advantage is its
reward minus the group mean over the group std (groups gathered across ranks), spread onto every
trained step of its trajectory and trained with PPO-clip on the per-step log-probs.
"""

from __future__ import annotations

from flowalign.algorithms.flow import FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm


@register_algorithm
class GRPO(FlowAlgorithm):
    name = "grpo"
    summary = "flat groups, group-relative advantages on every trained SDE step, PPO-clip"
    paper = "Liu et al. 2025, Flow-GRPO, arXiv:2505.05470; Xue et al. 2025, DanceGRPO, arXiv:2505.07818"
    config_file = "configs/quickstart.yaml"
