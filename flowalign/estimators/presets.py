"""Edge-target presets: a scored rollout tree -> per-edge advantages, trained edges and weights.

The RL recipe selects one by ``algorithm.advantage`` (verl-style functions chosen by name). The
flat group estimator (``"group"``, :mod:`flowalign.advantages`) normalises over groups gathered
from every rank; the presets here work on the rank's *local* trees, because their statistics
(depth-wise, per-branch-step, per-timestep) need the tree structure, which lives on one rank. Each
preset is a composition of the pure estimators in :mod:`flowalign.estimators.tree` and
:mod:`flowalign.estimators.dense`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from flowalign.estimators.dense import dense_step_advantages, vgpo_advantages
from flowalign.estimators.tree import (
    branch_step_edge_advantages,
    depth_prune,
    depthwise_advantages,
    edge_group_ids,
    fuse_node_rewards,
    width_prune,
)
from flowalign.types import RolloutTree


@dataclass
class EdgeTargets:
    """What the update trains on one rollout tree.

    Attributes:
        advantages: ``[E]`` float32 advantage of every edge (0 where untrained).
        trainable: ``[E]`` bool, the edges that get a policy-gradient term (after pruning).
        weights: optional ``[E]`` non-negative loss weights (``ppo_clip_loss`` divides by their sum).
        loss_scale: a factor on the whole iteration's policy loss (TempFlow's noise-aware weight of
            the iteration's single branch step).
    """

    advantages: Tensor
    trainable: Tensor
    weights: Tensor | None = None
    loss_scale: float = 1.0


def branch_targets(tree: RolloutTree, leaf_rewards: Tensor, algorithm: Any, iteration: int) -> EdgeTargets:
    """BranchGRPO (Li et al. 2025, arXiv:2509.06040, §3): fused node values, depth-wise advantages,
    width pruning and sliding depth pruning of the trained edges.

    Each edge is trained with the advantage of the child node it leads to: the child's value is
    fused from its descendant leaves (``algorithm.fusion``), standardised among the nodes of the same
    group (prompt) at the same depth. Pruning removes gradient terms, never samples.
    """
    values = fuse_node_rewards(tree, leaf_rewards, mode=algorithm.fusion, temperature=algorithm.fusion_temperature)
    tree_id = edge_group_ids(tree)
    advantages = depthwise_advantages(values, tree.step, tree_id, clip=algorithm.adv_clip or None)
    trainable = tree.trainable.clone()
    if algorithm.prune == "best_worst":
        trainable &= width_prune(tree, leaf_rewards, mode="best_worst", num_keep=max(1, int(algorithm.prune_keep)))
    elif algorithm.prune == "fraction":
        trainable &= width_prune(tree, mode="fraction", keep_fraction=algorithm.prune_keep, advantages=advantages,
                                 tree_id=tree_id)
    if algorithm.depth_prune_window > 0:
        trainable &= depth_prune(tree.step, iteration, algorithm.depth_prune_window, num_steps=len(tree.sigmas) - 1,
                                 stride=algorithm.depth_prune_stride, trainable=tree.trainable)
    return EdgeTargets(advantages=torch.where(trainable, advantages, torch.zeros_like(advantages)), trainable=trainable)


def tempflow_targets(tree: RolloutTree, leaf_rewards: Tensor, algorithm: Any, iteration: int) -> EdgeTargets:
    """TempFlow-GRPO (He et al. 2025, arXiv:2508.04324, §3 "trajectory branching"): every leaf took
    ONE SDE step from the ODE trunk, so its final reward is that step's process reward; the SDE
    edge gets the leaf's advantage within its group (same prompt, same branch step)."""
    advantages = branch_step_edge_advantages(tree, leaf_rewards, clip=algorithm.adv_clip or None)
    return EdgeTargets(advantages=advantages, trainable=tree.trainable & (tree.noise_std > 0))


def lookahead_table(tree: RolloutTree, leaf_rewards: Tensor) -> Tensor:
    """``[L, T + 1]`` rewards along every leaf's path: column ``t < T`` is the reward of the ODE
    look-ahead from the latent before step ``t`` (``tree.node_values["lookahead"]``, indexed by the
    edge whose ``x_t`` it scored), column ``T`` the leaf's own reward. Needs a flat tree (every
    leaf path has one edge per step)."""
    if "lookahead" not in tree.node_values:
        raise ValueError("the tree has no node_values['lookahead']: the recipe must score ODE look-aheads first")
    values = tree.node_values["lookahead"].to(leaf_rewards.device)
    return torch.cat([values[tree.leaf_edges.to(values.device)], leaf_rewards[:, None].to(values.dtype)], dim=1)


def _leaf_steps_to_edges(tree: RolloutTree, per_step: Tensor) -> Tensor:
    """Scatter ``[L, T]`` per-(leaf, step) values onto the ``[E]`` edges of a flat tree."""
    out = torch.zeros(tree.num_edges, dtype=torch.float32, device=per_step.device)
    return out.index_put_((tree.leaf_edges.reshape(-1).to(per_step.device),), per_step.reshape(-1).float())


def dense_targets(tree: RolloutTree, leaf_rewards: Tensor, algorithm: Any, iteration: int) -> EdgeTargets:
    """DenseGRPO (Deng et al. 2026, arXiv:2601.20218, §4.1): each step is trained with its own reward
    gain ``ΔR_t`` (Eq. 7) between the ODE look-aheads before and after it (Eqs. 8-9), normalised
    per timestep within the prompt's group (Eq. 10)."""
    advantages = dense_step_advantages(lookahead_table(tree, leaf_rewards), tree.leaf_group, clip=algorithm.adv_clip or None)
    return EdgeTargets(advantages=_leaf_steps_to_edges(tree, advantages), trainable=tree.trainable.clone())


def vgpo_targets(tree: RolloutTree, leaf_rewards: Tensor, algorithm: Any, iteration: int) -> EdgeTargets:
    """VGPO (arXiv:2512.12387; Eqs. 9-13 as described in its ICLR 2026 reviews, see
    :func:`flowalign.estimators.dense.vgpo_advantages`): one-step projection values as instant
    rewards, discounted action values, temporal weights and a value-anchored group normalisation
    that keeps a signal when a group's rewards collapse."""
    table = lookahead_table(tree, leaf_rewards)
    advantages = vgpo_advantages(table[:, :-1], leaf_rewards, tree.leaf_group, gamma=algorithm.discount,
                                 alpha=algorithm.value_anchor, anchor_steps=algorithm.anchor_steps)
    if algorithm.adv_clip:
        advantages = advantages.clamp(-algorithm.adv_clip, algorithm.adv_clip)
    return EdgeTargets(advantages=_leaf_steps_to_edges(tree, advantages), trainable=tree.trainable.clone())


#: ``algorithm.advantage`` names handled on the local tree -> preset.
EDGE_ESTIMATORS: dict[str, Callable[[RolloutTree, Tensor, Any, int], EdgeTargets]] = {
    "branch": branch_targets,
    "tempflow": tempflow_targets,
    "dense": dense_targets,
    "vgpo": vgpo_targets,
}
