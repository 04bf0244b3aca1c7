"""DenseGRPO (Deng et al. 2026, arXiv:2601.20218, §4): a dense reward per denoising step.

Before each step the latent is carried to a clean image by the ODE and scored (Eqs. 8-9); each
step is trained with its own reward gain ``ΔR_t`` (Eq. 7) between the look-aheads before and after
it, normalised per timestep within the prompt's group (Eq. 10). Optionally (Alg. 1) each step's
noise level ψ(t) is calibrated from the gains' balance every iteration.

A prompt's group spans ranks (each rank samples ``group_size / world`` of it), so the look-ahead
tables of every rank are gathered first: Eq. 10's group statistics and Algorithm 1's counts pool
all of the iteration's trajectories (the paper counts "all sampled trajectories"), and every rank
computes the same ψ(t) from the same gathered table. With one process nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout, lookahead_values
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_fields import _f
from flowalign.estimators.dense import calibrate_noise, dense_step_advantages, step_reward_gains
from flowalign.types import RolloutTree


@dataclass
class DenseGRPOConfig:
    lookahead_steps: int = _f(0, "ODE steps from a node to its clean image (0 = all remaining steps, the paper's).", ge=0)
    calibrate_noise: bool = _f(False, "Reward-aware calibration of each step's noise level psi(t) (Alg. 1), updated online every "
                                      "iteration and logged (the paper calibrates before training, then fixes it).")
    calibration_rate: float = _f(0.01, "psi(t) step per iteration (DenseGRPO's epsilon_2).", gt=0)
    calibration_margin: float = _f(2.0, "|#gains>0 - #gains<0| below this counts as balanced -> raise psi(t) (epsilon_1).", gt=0)
    calibration_iterations: int = _f(0, "Calibrate psi(t) during the first N iterations only, then keep it fixed (the paper "
                                        "calibrates, then trains with a fixed psi; its N is not given); 0 = every iteration.", ge=0)


def lookahead_table(lookahead: Tensor, tree: RolloutTree, leaf_rewards: Tensor) -> Tensor:
    """``[L, T + 1]`` rewards along every leaf's path: column ``t < T`` is ``lookahead`` of the leaf's
    edge at step ``t`` (the reward of the ODE look-ahead from that edge's ``x_t``), column ``T`` the
    leaf's own reward. Needs a flat tree (every leaf path has one edge per step).

    Args:
        lookahead: ``[E]`` float look-ahead reward per edge (:func:`lookahead_values`).
        leaf_rewards: ``[L]`` float.
    """
    if lookahead.dim() != 1 or lookahead.shape[0] != tree.num_edges:
        raise ValueError(f"lookahead must be [E={tree.num_edges}] (one value per edge), got {tuple(lookahead.shape)}")
    values = lookahead.to(leaf_rewards.device)
    return torch.cat([values[tree.leaf_edges.to(values.device)], leaf_rewards[:, None].to(values.dtype)], dim=1)


def leaf_steps_to_edges(tree: RolloutTree, per_step: Tensor) -> Tensor:
    """Scatter ``[L, T]`` per-(leaf, step) values onto the ``[E]`` edges of a flat tree."""
    out = torch.zeros(tree.num_edges, dtype=torch.float32, device=per_step.device)
    return out.index_put_((tree.leaf_edges.reshape(-1).to(per_step.device),), per_step.reshape(-1).float())


def scored_lookahead_table(tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, steps: int,
                           name: str) -> tuple[Tensor, Tensor, int]:
    """Score the ODE look-ahead (``steps`` ODE steps; 0 = to the end) from every node of a flat
    tree: ``(table [L, T + 1], leaf rewards [L], model evaluations spent)``. Every leaf must be
    scored (``name`` is the algorithm that needs it, for the error)."""
    rewards = FlowAlgorithm.require_all_scored(scored, f"algorithm.name={name}")
    lookahead, nfe = lookahead_values(tree, ctx, steps)
    return lookahead_table(lookahead, tree, rewards), rewards, nfe


def dense_targets(table: Tensor, tree: RolloutTree, adv_clip: float, scored: ScoredRollout | None = None) -> EdgeTargets:
    """Each step's reward gain (Eq. 7) from the look-ahead table, normalised per timestep within the
    group (Eq. 10, clipped to ``adv_clip``; 0 = off), on this rank's tree's edges.

    Args:
        table: ``[L, T + 1]`` this rank's table, or with ``scored`` the ``[world * L, T + 1]`` table
            gathered from every rank in rank order (``scored.gather``), normalised over
            ``scored.all_groups`` -- the whole group, whichever rank sampled its members.
    """
    groups = tree.leaf_group if scored is None else scored.all_groups
    advantages = dense_step_advantages(table, groups, clip=adv_clip or None)  # [rows, T]
    if scored is not None:
        advantages = advantages.view(scored.world, -1, advantages.shape[1])[scored.rank]  # this rank's leaves
    return EdgeTargets(advantages=leaf_steps_to_edges(tree, advantages), trainable=tree.trainable.clone())


@register_algorithm
class DenseGRPO(FlowAlgorithm):
    name = "dense_grpo"
    summary = "per-step reward gains from ODE look-aheads, per-timestep advantages, noise calibration"
    paper = "Deng et al. 2026, DenseGRPO, arXiv:2601.20218"
    advantage = "dense (step gains)"
    Config = DenseGRPOConfig
    keeps_velocities = True
    config_file = "configs/dense_grpo/quickstart.yaml"

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        table, _, nfe = scored_lookahead_table(tree, scored, ctx, self.opts.lookahead_steps, self.name)
        targets = self.table_targets(table, tree, scored, iteration)
        targets.nfe = nfe
        return targets

    def table_targets(self, table: Tensor, tree: RolloutTree, scored: ScoredRollout, iteration: int) -> EdgeTargets:
        """The targets from this rank's look-ahead ``table`` ``[L, T + 1]``: every rank's table is
        gathered (``scored.gather``, the recipe's ``accelerator.gather``), the advantages normalised over
        the whole groups and ψ(t) calibrated on all trajectories, the same on every rank."""
        all_table = scored.gather(table)  # [world * L, T + 1], rank order (all_groups' order)
        targets = dense_targets(all_table, tree, self.cfg.algorithm.adv_clip, scored)
        if self.opts.calibrate_noise:  # ψ(t) of the NEXT rollouts; this iteration's update uses the rollout's levels
            n = self.opts.calibration_iterations
            if n == 0 or iteration < n:
                self.calibrate(all_table)
            targets.metrics = {f"rollout/noise_level_{t}": a for t, a in enumerate(self.noise_level_schedule)}
        return targets

    def calibrate(self, table: Tensor) -> dict[str, float]:
        """Reward-aware exploration calibration (Algorithm 1) of the per-step noise level from a
        look-ahead table of ALL the iteration's trajectories (every rank's, :meth:`table_targets`). ψ(t)
        is our per-step noise level ``a_t``: the SDE std is ``a_t·√(σ/(1−σ))`` (Flow-GRPO) instead of
        Eq. 11's ``σ_t = ψ(t)``, the same per-step degree of freedom (our choice)."""
        psi = calibrate_noise(torch.tensor(self.noise_level_schedule), step_reward_gains(table), rate=self.opts.calibration_rate,
                              margin=self.opts.calibration_margin, bounds=(1e-3, math.inf))
        self.noise_level_schedule = [float(a) for a in psi]
        return {f"rollout/noise_level_{t}": a for t, a in enumerate(self.noise_level_schedule)}

