"""VGPO (arXiv:2512.12387; Eqs. 9-13 as described in its ICLR 2026 reviews, see
:func:`flowalign.estimators.dense.vgpo_advantages`): one-step projection values as instant
rewards, discounted action values, temporal weights, and a value-anchored group normalisation that
keeps a signal when a group's rewards collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from flowalign.algorithms.dense_grpo import leaf_steps_to_edges, scored_lookahead_table
from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_fields import _f
from flowalign.estimators.dense import vgpo_advantages
from flowalign.types import RolloutTree


@dataclass
class VGPOConfig:
    lookahead_steps: int = _f(1, "ODE steps from a node to its clean image (1 = VGPO's one-step projection; 0 = all remaining).", ge=0)
    discount: float = _f(0.9, "Discount gamma of the action values Q_t (our choice: the OpenReview reviews do not give it, and it is not checked against the arXiv method section; docs/FIDELITY.md).", ge=0, le=1)
    value_anchor: float = _f(0.5, "k in alpha = k * std, the absolute-value anchor that survives collapsed groups (form from the reviews; the value of k is our choice).", ge=0)
    anchor_steps: int | None = _f(None, "The anchor applies to the first N steps only (the reviews: VGPO uses 5 of 10); null = all.", ge=0)


def vgpo_targets(table: Tensor, tree: RolloutTree, leaf_rewards: Tensor, opts: VGPOConfig, adv_clip: float,
                 scored: ScoredRollout | None = None) -> EdgeTargets:
    """VGPO's value-anchored advantages from the look-ahead table (the projections are the instant
    rewards), clipped to ``adv_clip`` (0 = off), on this rank's tree's edges.

    Args:
        table, leaf_rewards: ``[L, T + 1]`` / ``[L]`` this rank's, or with ``scored`` the
            ``[world * L, ...]`` ones gathered from every rank in rank order (``scored.gather``),
            normalised over ``scored.all_groups`` -- the whole group, whichever rank sampled its
            members (a group spans ranks), so every rank computes the same statistics.
    """
    groups = tree.leaf_group if scored is None else scored.all_groups
    advantages = vgpo_advantages(table[:, :-1], leaf_rewards, groups, gamma=opts.discount,
                                 alpha=opts.value_anchor, anchor_steps=opts.anchor_steps)
    if scored is not None:
        advantages = advantages.view(scored.world, -1, advantages.shape[1])[scored.rank]  # this rank's leaves
    if adv_clip:
        advantages = advantages.clamp(-adv_clip, adv_clip)
    return EdgeTargets(advantages=leaf_steps_to_edges(tree, advantages), trainable=tree.trainable.clone())


@register_algorithm
class VGPO(FlowAlgorithm):
    name = "vgpo"
    summary = "one-step projections as process values, discounted action values, value-anchored advantages"
    paper = "VGPO 2025, arXiv:2512.12387"
    advantage = "value-anchored"
    Config = VGPOConfig
    keeps_velocities = True
    config_file = "configs/vgpo/quickstart.yaml"

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        table, _, nfe = scored_lookahead_table(tree, scored, ctx, self.opts.lookahead_steps, self.name)
        # the whole groups (every rank's members): the same statistics on every rank, as with one process
        targets = vgpo_targets(scored.gather(table), tree, scored.all_scores, self.opts, self.cfg.algorithm.adv_clip, scored)
        targets.nfe = nfe
        return targets

