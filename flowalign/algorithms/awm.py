"""Advantage Weighted Matching (AWM, Xue et al. 2025, arXiv:2509.25050).

GRPO's rollouts and group-relative advantages, but the update is the pretraining flow-matching
loss on each sampled final, weighted by its advantage (the ``awm`` recipe,
:mod:`flowalign.recipes.awm`). No log-probs are used, so the sampler is free.
"""

from __future__ import annotations

from typing import Any

from flowalign.algorithms.flow import FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm


@register_algorithm
class AWM(FlowAlgorithm):
    name = "awm"
    summary = "advantage-weighted flow matching on the sampled finals (no log-probs), velocity KL"
    paper = "Xue et al. 2025, Advantage Weighted Matching, arXiv:2509.25050"
    recipe = "awm"
    loss = "awm"
    config_file = "configs/awm/quickstart.yaml"

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # each sampled final once per iteration
