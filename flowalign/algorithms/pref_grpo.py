"""Pref-GRPO (Wang et al. 2025, arXiv:2508.20751, §3): GRPO whose reward is each sample's win rate
against the rest of its group under a pairwise preference judge, which resists reward hacking by
absolute-score inflation.

The win rates come from a groupwise reward (``pairwise_winrate``, :mod:`flowalign.rewards.groupwise`)
that sees the whole group; the advantages are GRPO's.
"""

from __future__ import annotations

from typing import Any

from flowalign.algorithms.flow import FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require

#: rewards that turn a pairwise judge into per-sample win rates within the group
WIN_RATE_REWARDS = ("pairwise_winrate",)


@register_algorithm
class PrefGRPO(FlowAlgorithm):
    name = "pref_grpo"
    summary = "rewards are win rates of a pairwise preference judge within the group, then GRPO"
    paper = "Wang et al. 2025, Pref-GRPO, arXiv:2508.20751"
    config_file = "configs/pref_grpo/quickstart.yaml"
    # the reference normalises with torch's unbiased std + 1e-8 (docs/FIDELITY.md, "Group std")
    std_estimator = "unbiased"
    std_eps = 1e-8

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        names = [spec.get("_component_") for spec in cfg.rewards if isinstance(spec, dict)]
        _require(any(n in WIN_RATE_REWARDS for n in names), "rewards",
                 f"pref_grpo trains on pairwise win rates: add a reward with _component_: {WIN_RATE_REWARDS[0]} "
                 f"(and a judge), got {names}")
