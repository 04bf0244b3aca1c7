"""TempFlow-GRPO (He et al. 2025, arXiv:2508.04324, §3): trajectory branching on an ODE trunk.

Iteration ``i`` follows the deterministic ODE to step ``k = branch_steps[i % len]``, branches there
into ``group_size`` SDE children and finishes each by ODE: every leaf took ONE stochastic step, so
its final reward is that step's process reward, and only that edge is trained, with the leaf's
advantage in its group. Noise-aware policy weighting (§3.2) scales the iteration's loss by the
branch step's transition std relative to the schedule's mean.

Reference: Shredded-Pork/TempFlow-GRPO @ e66824e (``scripts/train_sd3_pr.py``,
``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_perstep.py``). Its loss is
``-2.25 · std_dev_t · A · ratio`` (train_sd3_pr.py, training loop) where ``std_dev_t`` is the transition
std ``std_t·√Δ`` that ``sd3_sde_with_logprob.py`` returns (its last ``return``, "the original paper's
case"); 2.25 is 1 / (mean transition std over the branch steps 0..T−2 of its SD3.5 schedule: 10 steps,
shift 3, noise level 0.7), so ``weight_norm: schedule`` (the default) reproduces it on any schedule.
Deliberate difference (docs/FIDELITY.md): the reference branches at EVERY step 0..T−2 in every
iteration (6 children each, O(T²) model evaluations per prompt); here one step per iteration, cycling
through ``branch_steps`` (O(T) per iteration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.estimators.tree import branch_step_edge_advantages
from flowalign.rollout import BranchSpec
from flowalign.samplers import sde_step
from flowalign.types import RolloutTree


@dataclass
class TempFlowGRPOConfig:
    branch_steps: list[int] = _f(factory=lambda: [0, 1, 2, 3, 4, 5], ge=0,
                                 help="Iteration i branches at branch_steps[i % len] into sampling.group_size SDE children "
                                      "from an ODE trunk, finished by ODE.")
    noise_aware: bool = _f(True, "Weight each iteration's loss by its branch step's std_t * sqrt(dt) (noise-aware policy weighting).")
    weight_norm: str = _f("schedule", "Normaliser of the noise-aware weight std_k*sqrt(dt_k): schedule = the mean over every "
                                      "branchable step 0..num_steps-2 (TempFlow-GRPO's constant 2.25 = 1/that mean for SD3.5, "
                                      "10 steps, noise 0.7); branch_steps = the mean over the configured branch_steps "
                                      "(flowalign's earlier form).", choices=("schedule", "branch_steps"))


@register_algorithm
class TempFlowGRPO(FlowAlgorithm):
    name = "tempflow_grpo"
    summary = "ODE trunk branching at one step per iteration, that step's process reward, noise-aware weights"
    paper = "He et al. 2025, TempFlow-GRPO, arXiv:2508.04324"
    advantage = "branch step"
    Config = TempFlowGRPOConfig
    config_file = "configs/tempflow_grpo/quickstart.yaml"
    shard_by = "prompt"  # a prompt's trunk and all its branch children on one rank (one trunk per prompt, not per rank)

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
        """The noise-aware weight (§3.2) of this tree's branch step ``k``: its transition std
        ``std_k·√Δ_k`` over the mean transition std of the normalisation set -- every step the
        reference branches at, 0..T−2 (``weight_norm: schedule``), or ``branch_steps``. The reference
        (TempFlow-GRPO @ e66824e, train_sd3_pr.py training loop) multiplies the loss by
        ``2.25 · std_dev_t``; 1/2.25 is that mean over steps 0..8 of its 10-step SD3.5 schedule."""
        s = self.cfg.sampling
        k = int(tree.step[tree.noise_std > 0][0])
        if self.opts.weight_norm == "schedule":
            norm_steps = list(range(max(s.num_steps - 1, 1)))  # the reference branches at timesteps[:-1]
        else:
            norm_steps = list(self.opts.branch_steps)
        stds = {t: self._transition_std(tree, t) for t in {k, *norm_steps}}
        mean = sum(stds[t] for t in norm_steps) / len(norm_steps)
        return stds[k] / mean if mean > 0 else 0.0

    def _transition_std(self, tree: RolloutTree, t: int) -> float:
        """``std_t·√Δ_t`` of step ``t`` of the tree's schedule at this run's noise level (the sampler's own
        formula, :func:`flowalign.samplers.sde_step`)."""
        sigma, sigma_next = tree.sigmas[t].reshape(1), tree.sigmas[t + 1].reshape(1)
        x = torch.zeros(1, 1, device=sigma.device)
        return float(sde_step(x, sigma, sigma_next, x, kind=self.cfg.sampling.sampler, noise_level=self.noise_level_schedule[t],
                              prev_sample=x).std.reshape(-1)[0])

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
