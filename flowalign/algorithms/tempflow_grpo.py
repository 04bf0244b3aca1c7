"""TempFlow-GRPO (He et al. 2025, arXiv:2508.04324, §3): trajectory branching on an ODE trunk.

Iteration ``i`` follows the deterministic ODE to step ``k = branch_steps[i % len]``, branches there
into ``group_size`` SDE children and finishes each by ODE: every leaf took ONE stochastic step, so
its final reward is that step's process reward, and only that edge is trained, with the leaf's
advantage in its group. Noise-aware policy weighting (§3.2) scales the iteration's loss by the
branch step's transition std relative to the schedule's mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.estimators.tree import branch_step_edge_advantages, noise_aware_weights
from flowalign.rollout import BranchSpec
from flowalign.samplers import sde_step
from flowalign.types import RolloutTree


@dataclass
class TempFlowGRPOConfig:
    branch_steps: list[int] = _f(factory=lambda: [0, 1, 2, 3, 4, 5], ge=0,
                                 help="Iteration i branches at branch_steps[i % len] into sampling.group_size SDE children "
                                      "from an ODE trunk, finished by ODE.")
    noise_aware: bool = _f(True, "Weight each iteration's loss by its branch step's std_t * sqrt(dt) (noise-aware policy weighting).")


@register_algorithm
class TempFlowGRPO(FlowAlgorithm):
    name = "tempflow_grpo"
    summary = "ODE trunk branching at one step per iteration, that step's process reward, noise-aware weights"
    paper = "He et al. 2025, TempFlow-GRPO, arXiv:2508.04324"
    advantage = "branch step"
    Config = TempFlowGRPOConfig
    config_file = "configs/tempflow_grpo/quickstart.yaml"

    def rollout_spec(self, iteration: int, world: int) -> BranchSpec:
        s = self.cfg.sampling
        k = self.opts.branch_steps[iteration % len(self.opts.branch_steps)]
        noise = [self.noise_level_schedule[t] if t == k else 0.0 for t in range(s.num_steps)]
        return BranchSpec(s.num_steps, noise, samples_per_prompt=1, splits=((k, s.group_size // world),), sampler=s.sampler,
                          guidance_scale=s.guidance_scale, cps_log_prob=s.cps_log_prob)

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        rewards = self.require_all_scored(scored, "algorithm.name=tempflow_grpo")
        advantages = branch_step_edge_advantages(tree, rewards, clip=self.cfg.algorithm.adv_clip or None)
        scale = self.branch_step_weight(tree) if self.opts.noise_aware else 1.0
        return EdgeTargets(advantages=advantages, trainable=tree.trainable & (tree.noise_std > 0), loss_scale=scale)

    def branch_step_weight(self, tree: RolloutTree) -> float:
        """The noise-aware weight (§3.2) of this tree's branch step: its transition std
        ``std_k·√Δ_k`` relative to the mean over all branch steps, so the schedule's average weight is 1."""
        s = self.cfg.sampling
        stds = []
        for k in self.opts.branch_steps:
            sigma, sigma_next = tree.sigmas[k].reshape(1), tree.sigmas[k + 1].reshape(1)
            x = torch.zeros(1, 1, device=sigma.device)
            stds.append(float(sde_step(x, sigma, sigma_next, x, kind=s.sampler, noise_level=self.noise_level_schedule[k],
                                       prev_sample=x).std.reshape(-1)[0]))
        weights = noise_aware_weights(torch.tensor(stds))
        return float(weights[self.opts.branch_steps.index(int(tree.step[tree.noise_std > 0][0]))])

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # one branch edge per leaf

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        s, t = cfg.sampling, cfg.algorithm.tempflow_grpo
        _require(bool(t.branch_steps), "algorithm.tempflow_grpo.branch_steps", "needs at least one branch step")
        _require(all(k < s.num_steps for k in t.branch_steps), "algorithm.tempflow_grpo.branch_steps",
                 f"steps must be in [0, num_steps={s.num_steps})")
        _require(s.sde_window is None, "sampling.sde_window", "TempFlow branching cannot be combined with an SDE window")
