"""BranchGRPO (Li et al. 2025, arXiv:2509.06040, §3): shared-prefix trees instead of independent
samples. Each prompt starts from ``group_size / prod(k)`` noises; after each split step every node
spawns ``k`` SDE children, so early steps are sampled once for many leaves. Each edge is trained
with the advantage of the child it leads to: the child's value fused from its descendant leaves,
standardised among the nodes of its tree (one per initial noise, ``norm_scope``) at the same depth;
width and depth pruning drop gradient terms (never samples). Defaults follow the reference code,
Fredreic1849/BranchGRPO @ 19fbb9f (docs/FIDELITY.md).
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
from flowalign.estimators.tree import (DEPTH_PRUNE_MODES, FUSION_MODES, NORM_SCOPES, depth_prune, depthwise_advantages,
                                       edge_group_ids, edge_root_ids, fuse_node_rewards, width_prune)
from flowalign.types import RolloutTree


# Reference for the defaults below: Fredreic1849/BranchGRPO @ 19fbb9f, fastvideo/train_branchgrpo_flux.py
# (REF below); docs/FIDELITY.md "BranchGRPO fusion, normalisation and depth pruning".
@dataclass
class BranchGRPOConfig:
    splits: list[list[int]] = _f(
        factory=lambda: [[2, 2], [4, 2], [6, 2]], ge=0,
        help="Shared-prefix splits [[step, k], ...]: after step `step` every node spawns k SDE children. "
             "sampling.group_size counts leaves: each prompt starts from group_size / prod(k) noises.")
    split_noise_level: float | None = _f(None, "Noise level at split steps (BranchGRPO's split noise scale); null = sampling.noise_level.", gt=0)
    fusion: str = _f("mean", "Node value from descendant leaves: mean (the reference's default) | logprob_softmax (the "
                     "reference's --tree_prob_weighted: bottom-up, each node a softmax over its child edges' log-probs) | "
                     "path_logprob_softmax (flowalign's earlier form: one softmax over whole node-to-leaf path log-probs).",
                     choices=FUSION_MODES)
    fusion_temperature: float = _f(1.0, "fusion=*logprob_softmax: temperature of the softmax (the reference fixes 1).", gt=0)
    norm_scope: str = _f("root", "Depth-wise normalisation among the nodes of one depth of: root (each initial noise's "
                         "tree, as the reference) | group (all trees of a prompt on this rank, flowalign's earlier form).",
                         choices=NORM_SCOPES)
    std_floor: float = _f(1e-6, "A (tree, depth) whose node-value std is below this gets advantage 0 (the reference's "
                          "1e-6); 0 = only depths whose values all coincide.", ge=0)
    prune: str = _f("none", "Width pruning of trained edges: none | best_worst | fraction.", choices=("none", "best_worst", "fraction"))
    prune_keep: float = _f(0.5, "prune=fraction keeps this fraction per branch; prune=best_worst keeps this many best/worst paths.", gt=0)
    depth_prune_window: int = _f(0, "Sliding depth pruning: depths (steps) left untrained per iteration; 0 disables.", ge=0)
    depth_prune_mode: str = _f("slide_stop", "How the depth-pruning window moves: slide_stop (the reference: from "
                               "depth_prune_start toward shallower steps, one step every depth_prune_interval iterations, "
                               "then stays at depth_prune_stop) | wrap (flowalign's earlier form: depth_prune_stride steps "
                               "deeper per iteration from step 0, wrapping).", choices=DEPTH_PRUNE_MODES)
    depth_prune_start: int | None = _f(None, "First pruned step at iteration 0; null = num_steps - window (slide_stop, the "
                                       "deepest window) or 0 (wrap).", ge=0)
    depth_prune_stop: int | None = _f(None, "slide_stop: the shallowest first step the window slides to; null = the last "
                                      "split step - 1 (the reference's default stop depth, the last split's parent depth).", ge=0)
    depth_prune_interval: int = _f(1, "slide_stop: iterations per one-step move of the window (the reference's "
                                   "--depth_pruning_slide_interval).", ge=1)
    depth_prune_stride: int = _f(1, "wrap: steps the depth-pruning window moves per iteration.", ge=1)


def branch_targets(tree: RolloutTree, leaf_rewards: Tensor, opts: BranchGRPOConfig, adv_clip: float, iteration: int, *,
                   std_eps: float = 1e-4, unbiased: bool = False) -> EdgeTargets:
    """Fused node values (``opts.fusion``), depth-wise advantages (per ``opts.norm_scope``, zero below
    ``opts.std_floor``, clipped to ``adv_clip``; 0 = off), width pruning and depth pruning of the
    trained edges of one tree batch.

    Args:
        tree: the rollout trees of this rank.
        leaf_rewards: ``[L]`` float rewards of its leaves.
        std_eps, unbiased: the depth-wise normalisation's std (:func:`depthwise_advantages`).
    """
    values = fuse_node_rewards(tree, leaf_rewards, mode=opts.fusion, temperature=opts.fusion_temperature)
    group_id = edge_group_ids(tree)
    if opts.norm_scope == "root":
        # REF lines 1148-1180: each root's tree is normalised on its own (one root per initial noise).
        tree_id = edge_root_ids(tree, root_fanout=dict((s, k) for s, k in opts.splits).get(0, 1))
    else:
        tree_id = group_id
    advantages = depthwise_advantages(values, tree.step, tree_id, clip=adv_clip or None, eps=std_eps, unbiased=unbiased,
                                      std_floor=opts.std_floor)
    trainable = tree.trainable.clone()
    if opts.prune == "best_worst":
        trainable &= width_prune(tree, leaf_rewards, mode="best_worst", num_keep=max(1, int(opts.prune_keep)))
    elif opts.prune == "fraction":
        trainable &= width_prune(tree, mode="fraction", keep_fraction=opts.prune_keep, advantages=advantages, tree_id=group_id)
    if opts.depth_prune_window > 0:
        num_steps = len(tree.sigmas) - 1
        stop = opts.depth_prune_stop
        if stop is None:  # REF line 1282: stop depth max(split_points) is a child depth, i.e. step - 1
            stop = max(0, max((s for s, _ in opts.splits), default=0) - 1)
        trainable &= depth_prune(tree.step, iteration, opts.depth_prune_window, num_steps=num_steps,
                                 mode=opts.depth_prune_mode, stride=opts.depth_prune_stride, start=opts.depth_prune_start,
                                 stop=stop, interval=opts.depth_prune_interval, trainable=tree.trainable)
    return EdgeTargets(advantages=torch.where(trainable, advantages, torch.zeros_like(advantages)), trainable=trainable)


@register_algorithm
class BranchGRPO(FlowAlgorithm):
    name = "branch_grpo"
    summary = "shared-prefix trees, node values fused from leaves, depth-wise advantages, pruning"
    paper = "Li et al. 2025, BranchGRPO, arXiv:2509.06040"
    advantage = "branch (depth-wise)"
    Config = BranchGRPOConfig
    config_file = "configs/branch_grpo/quickstart.yaml"
    # a prompt's trees whole on one rank: node values, depth-wise normalisation (norm_scope prompt too) and
    # pruning see every root of the group, whatever the number of processes
    shard_by = "prompt"
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
        _require(s.group_size % leaves_per_root == 0, "sampling.group_size",
                 f"group_size={s.group_size} leaves per prompt is not a multiple of the {leaves_per_root} "
                 f"leaves each initial noise grows through {key}.splits")
        _require(b.depth_prune_window < s.num_steps, f"{key}.depth_prune_window", f"must be in [0, num_steps={s.num_steps})")
        last_start = s.num_steps - b.depth_prune_window
        if b.depth_prune_start is not None:
            _require(b.depth_prune_start <= last_start, f"{key}.depth_prune_start",
                     f"must be <= num_steps - depth_prune_window = {last_start} (the window must fit), got {b.depth_prune_start}")
        if b.depth_prune_stop is not None:
            _require(b.depth_prune_stop <= last_start, f"{key}.depth_prune_stop",
                     f"must be <= num_steps - depth_prune_window = {last_start}, got {b.depth_prune_stop}")
        if b.prune == "fraction":
            _require(b.prune_keep <= 1, f"{key}.prune_keep", f"prune=fraction keeps a fraction in (0, 1], got {b.prune_keep}")
