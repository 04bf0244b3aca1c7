"""BranchGRPO (Li et al. 2025, arXiv:2509.06040, §3): shared-prefix trees instead of independent
samples. Each prompt starts from ``group_size / prod(k)`` noises; after each split step every node
spawns ``k`` SDE children, so early steps are sampled once for many leaves. Each edge is trained
with the advantage of the child it leads to: the child's value fused from its descendant leaves,
standardised among the group's nodes at the same depth; width and depth pruning drop gradient terms
(never samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.estimators.tree import depth_prune, depthwise_advantages, edge_group_ids, fuse_node_rewards, width_prune
from flowalign.types import RolloutTree


@dataclass
class BranchGRPOConfig:
    splits: list[list[int]] = _f(
        factory=lambda: [[2, 2], [4, 2], [6, 2]], ge=0,
        help="Shared-prefix splits [[step, k], ...]: after step `step` every node spawns k SDE children. "
             "sampling.group_size counts leaves: each prompt starts from group_size / prod(k) noises.")
    split_noise_level: float | None = _f(None, "Noise level at split steps (BranchGRPO's split noise scale); null = sampling.noise_level.", gt=0)
    fusion: str = _f("mean", "Node value from descendant leaves: mean | logprob_softmax (path-probability weighted).",
                     choices=("mean", "logprob_softmax"))
    fusion_temperature: float = _f(1.0, "fusion=logprob_softmax: temperature of the softmax.", gt=0)
    prune: str = _f("none", "Width pruning of trained edges: none | best_worst | fraction.", choices=("none", "best_worst", "fraction"))
    prune_keep: float = _f(0.5, "prune=fraction keeps this fraction per branch; prune=best_worst keeps this many best/worst paths.", gt=0)
    depth_prune_window: int = _f(0, "Sliding depth pruning: depths left untrained per iteration; 0 disables.", ge=0)
    depth_prune_stride: int = _f(1, "Steps the depth-pruning window moves per iteration.", ge=1)


def branch_targets(tree: RolloutTree, leaf_rewards: Tensor, opts: BranchGRPOConfig, adv_clip: float, iteration: int, *,
                   std_eps: float = 1e-4, unbiased: bool = False) -> EdgeTargets:
    """Fused node values (``opts.fusion``), depth-wise advantages (clipped to ``adv_clip``; 0 = off),
    width pruning and sliding depth pruning of the trained edges of one tree batch.

    Args:
        tree: the rollout trees of this rank.
        leaf_rewards: ``[L]`` float rewards of its leaves.
        std_eps, unbiased: the depth-wise normalisation's std (:func:`depthwise_advantages`).
    """
    values = fuse_node_rewards(tree, leaf_rewards, mode=opts.fusion, temperature=opts.fusion_temperature)
    tree_id = edge_group_ids(tree)
    advantages = depthwise_advantages(values, tree.step, tree_id, clip=adv_clip or None, eps=std_eps, unbiased=unbiased)
    trainable = tree.trainable.clone()
    if opts.prune == "best_worst":
        trainable &= width_prune(tree, leaf_rewards, mode="best_worst", num_keep=max(1, int(opts.prune_keep)))
    elif opts.prune == "fraction":
        trainable &= width_prune(tree, mode="fraction", keep_fraction=opts.prune_keep, advantages=advantages, tree_id=tree_id)
    if opts.depth_prune_window > 0:
        trainable &= depth_prune(tree.step, iteration, opts.depth_prune_window, num_steps=len(tree.sigmas) - 1,
                                 stride=opts.depth_prune_stride, trainable=tree.trainable)
    return EdgeTargets(advantages=torch.where(trainable, advantages, torch.zeros_like(advantages)), trainable=trainable)


@register_algorithm
class BranchGRPO(FlowAlgorithm):
    name = "branch_grpo"
    summary = "shared-prefix trees, node values fused from leaves, depth-wise advantages, pruning"
    paper = "Li et al. 2025, BranchGRPO, arXiv:2509.06040"
    advantage = "branch (depth-wise)"
    Config = BranchGRPOConfig
    config_file = "configs/branch_grpo/quickstart.yaml"
    # the reference normalises with torch's unbiased std + 1e-8 (docs/FIDELITY.md, "Group std")
    std_estimator = "unbiased"
    std_eps = 1e-8

    def splits(self) -> tuple[tuple[int, int], ...]:
        return tuple((step, k) for step, k in self.opts.splits)

    def split_noise_level(self, step: int) -> float:
        level = self.opts.split_noise_level
        return level if level is not None else self.noise_level_schedule[step]

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        rewards = self.require_all_scored(scored, "algorithm.name=branch_grpo")
        unbiased, eps = self.group_std()
        return branch_targets(tree, rewards, self.opts, self.cfg.algorithm.adv_clip, iteration, std_eps=eps, unbiased=unbiased)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        s, b = cfg.sampling, cfg.algorithm.branch_grpo
        key = "algorithm.branch_grpo"
        for i, pair in enumerate(b.splits):
            _require(len(pair) == 2 and 0 <= pair[0] < s.num_steps and pair[1] >= 1, f"{key}.splits[{i}]",
                     f"must be [step, k] with 0 <= step < num_steps={s.num_steps} and k >= 1, got {pair}")
            if s.sde_window is not None:
                _require(s.sde_window[0] <= pair[0] < s.sde_window[1], f"{key}.splits[{i}]",
                         f"split step {pair[0]} lies outside sampling.sde_window {s.sde_window} (a split needs an SDE step)")
        _require(len({p[0] for p in b.splits}) == len(b.splits), f"{key}.splits", "lists a step more than once")
        leaves_per_root = math.prod(k for _, k in b.splits)
        per_rank = s.group_size // world_size
        _require(per_rank % leaves_per_root == 0, "sampling.group_size",
                 f"{per_rank} leaves per prompt per rank (group_size / processes) is not a multiple of the {leaves_per_root} "
                 f"leaves each initial noise grows through {key}.splits")
        _require(b.depth_prune_window < s.num_steps, f"{key}.depth_prune_window", f"must be in [0, num_steps={s.num_steps})")
        if b.prune == "fraction":
            _require(b.prune_keep <= 1, f"{key}.prune_keep", f"prune=fraction keeps a fraction in (0, 1], got {b.prune_keep}")
