"""DGPO: Direct Group Preference Optimization (Luo et al. 2025, arXiv:2510.08425).

Group preference learning without a stochastic policy: the rollouts are deterministic (the ODE
sampler: every step's noise level is 0, whatever ``sampling.noise_level``), the rewards give GRPO's
group-relative advantages, and the update is a group-level DPO objective on the forward process
(:mod:`flowalign.losses.dgpo`): each sampled final is re-noised at a few times shared by the whole
iteration, with one noise per group and time, and the advantage-weighted flow-matching errors of the
policy against the reference's (base weights: LoRA disabled, or the frozen copy) enter a
Bradley-Terry preference of the group's positive over its negative samples.

It runs in the ``awm`` loop (:mod:`flowalign.recipes.awm`) through :meth:`DGPO.matching_update`.
The reference is Luo-Yihong/DGPO @ 01ceb4b, ``scripts/train_sd3_dgpo.py`` and ``config/dgpo.py``
(its GenEval / OCR SD3.5-M configs):

* times: ``num_train_timesteps = 4`` step indices drawn without replacement from the first
  ``trunc_steps + 1`` of the sampling grid, the same for every sample of the iteration (lines 1062-1064;
  ``trunc_steps = 6`` of 10 steps, GenEval 4): here ``train_timesteps`` of the first
  ``int(num_steps · timestep_fraction)`` steps (0.7 -> steps 0..6 of 10);
* noise shared within a group at each time (``use_shared_noise``, lines 1102-1106);
* ``beta_dpo = 100``, PPO-style clip of the error ratio against an EMA copy of the policy with decay
  ``min(0.3, 0.001·step)`` (``clip_range = 1e-2``, lines 1133-1144, 1176-1177), velocity KL to the
  reference ``train.beta = 0.02``, ``adv_clip_max = 5``, no guidance in the update (``train.cfg`` off);
* rollouts with noise level 0 (``sample.noise_level = 0``; the reference's DPM-Solver, here Euler).

Ours (docs/FIDELITY.md): the EMA copy is updated once per iteration (the reference: after every
optimizer step); the rollouts are sampled with the current policy (the reference samples with the
EMA copy after ``switch_ema_ref`` steps, lines 799-800: the shared rollout code has no hook for
sampling with another copy of the weights); whole groups are kept on one rank and in one micro-batch
(``shard_by = "prompt"``; the reference all-reduces the group sums across GPUs, line 185).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses.dgpo import dgpo_loss
from flowalign.rollout import BranchSpec
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree

__all__ = ["DGPO", "DGPOConfig", "dgpo_draws", "group_major_order", "num_candidate_steps"]


@dataclass
class DGPOConfig:
    beta_dpo: float = _f(100.0, "beta of the group preference s_g = beta / G sum_i A_i (l_i - l_ref,i) (the reference's "
                                "train.beta_dpo).", gt=0)
    clip_range: float | None = _f(1e-2, "epsilon of the PPO-style clip of r = exp(l_old - l) against the EMA copy of the "
                                        "policy (the reference's clip_range with clip_dsm, 1e-2 in its GenEval / OCR "
                                        "configs); null: no clip and no EMA-copy evaluation.", gt=0)
    train_timesteps: int = _f(4, "Training times per iteration, shared by every sample, drawn without replacement from "
                                 "the candidate steps (the reference's num_train_timesteps).", ge=1)
    timestep_fraction: float = _f(0.7, "Candidate steps: the first int(sampling.num_steps x timestep_fraction) of the "
                                       "rollout's sigma grid (the reference's trunc_steps + 1 = 7 of 10).", gt=0, le=1)
    old_decay_max: float = _f(0.3, "EMA copy decay min(old_decay_max, 0.001 x optimizer steps), updated once per iteration "
                                   "(the reference: min(0.3, 0.001 x step) after every step).", ge=0, lt=1)
    shared_noise: bool = _f(True, "One re-noising noise per group and time (the reference's use_shared_noise); false: one "
                                  "per sample.")


def num_candidate_steps(num_steps: int, timestep_fraction: float) -> int:
    """How many of the first grid steps the training times are drawn from: ``int(num_steps · fraction)``."""
    return int(num_steps * timestep_fraction)


def dgpo_draws(num_groups: int, latent_shape: tuple[int, ...], grid: torch.Tensor, generator: torch.Generator, *,
               count: int, candidates: int, shared_noise: bool, group_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random choices of one DGPO update, for every rank's groups, in a fixed order from ``generator``.

    Returns:
        ``(group_order [P] long, sigma [count] fp32, noise [P·G, count, *latent] fp32)``: the groups in the
        order the optimizer steps visit them; the shared training times ``grid[steps]``, ``steps`` drawn
        without replacement from ``0 .. candidates − 1`` (train_sd3_dgpo.py lines 52-74, 1063-1064); one
        noise per (group, time) repeated over the group's ``G`` samples (``shared_noise``, lines 76-108) or
        one per (sample, time), prompt-major.
    """
    if not 1 <= count <= candidates <= len(grid) - 1:
        raise ValueError(f"dgpo_draws: need 1 <= train_timesteps ({count}) <= candidate steps ({candidates}) <= "
                         f"num_steps ({len(grid) - 1})")
    group_order = torch.randperm(num_groups, generator=generator)
    steps = torch.randperm(candidates, generator=generator)[:count]
    sigma = grid.detach().float().cpu()[steps]
    rows = num_groups if shared_noise else num_groups * group_size
    noise = torch.randn((rows, count, *latent_shape), generator=generator)
    if shared_noise:
        noise = noise.repeat_interleave(group_size, dim=0)
    return group_order, sigma, noise


def group_major_order(group_order: torch.Tensor, leaf_group: torch.Tensor) -> torch.Tensor:
    """``[L]`` this rank's leaf ids, group after group in ``group_order`` (groups absent here skipped),
    each group's leaves in their rollout order, so that chunks of whole groups stay together."""
    leaf_group = leaf_group.cpu()
    return torch.cat([(leaf_group == g).nonzero().squeeze(1) for g in group_order.tolist()
                      if bool((leaf_group == g).any())])


@register_algorithm
class DGPO(FlowAlgorithm):
    name = "dgpo"
    summary = "ODE rollouts; group-level DPO of positive vs negative samples on re-noised finals vs the reference"
    paper = "Luo et al. 2025, DGPO, arXiv:2510.08425"
    recipe = "awm"
    loss = "dgpo"
    policy_copy = True
    deterministic_rollouts = True  # rollout_spec sets every noise level to 0
    needs_reference = True  # the preference compares the policy's errors with the base model's, whatever kl_beta
    shard_by = "prompt"  # the group preference sums over a whole group: every group on one rank
    Config = DGPOConfig
    config_file = "configs/dgpo/quickstart.yaml"

    def rollout_spec(self, iteration: int, world: int) -> BranchSpec:
        """GRPO's flat groups, every step deterministic (noise level 0: the ODE step; no trainable edge)."""
        spec = super().rollout_spec(iteration, world)
        return replace(spec, noise_levels=(0.0,) * spec.num_steps, train_subset=None)

    def targets(self, tree: RolloutTree, scored: Any, ctx: Any, iteration: int) -> EdgeTargets:
        """GRPO's advantages; ``trainable`` marks each leaf's last edge, the one unit the update trains per
        sample (the ODE rollout has no SDE edge), so the loop's ``trained_edges`` / ``advantage_abs_mean``
        count samples."""
        targets = super().targets(tree, scored, ctx, iteration)
        trainable = torch.zeros_like(targets.trainable)
        trainable[tree.leaf_edges[:, -1].long().to(trainable.device)] = True
        return replace(targets, trainable=trainable)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o = cfg.algorithm.dgpo
        s, t = cfg.sampling, cfg.train
        candidates = num_candidate_steps(s.num_steps, o.timestep_fraction)
        _require(1 <= o.train_timesteps <= candidates, "algorithm.dgpo.train_timesteps",
                 f"must be in [1, int(sampling.num_steps x timestep_fraction) = {candidates}] (drawn without replacement)")
        _require(t.micro_batch_size % s.group_size == 0, "train.micro_batch_size",
                 f"dgpo needs whole groups in a micro-batch: a multiple of sampling.group_size ({s.group_size})")
        local_prompts = cfg.data.prompts_per_iter // max(world_size, 1)
        _require(local_prompts % t.steps_per_iter == 0, "train.steps_per_iter",
                 f"dgpo splits each rank's {local_prompts} whole groups evenly over the optimizer steps: "
                 "data.prompts_per_iter / processes must be a multiple of train.steps_per_iter")
        _require(not s.init_same_noise, "sampling.init_same_noise",
                 "dgpo samples deterministically: a group with one initial noise would be one sample repeated")

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # each sampled final once per iteration (at the shared training times)

    def matching_update(self, recipe: Any, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, iteration: int
                        ) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of :func:`dgpo_loss` over this rank's groups, then the EMA
        copy's update (train_sd3_dgpo.py lines 1046-1177)."""
        from flowalign.recipes.awm import ema_kl_decay, leaf_advantages_from_edges  # here: the recipes import the registry

        cfg, o = self.cfg, self.opts
        adv = leaf_advantages_from_edges(targets.advantages, tree.leaf_edges)
        group_size = cfg.sampling.group_size
        num_groups = len(tree.prompts) * recipe.world  # global: drawn for every rank from one stream
        group_order, sigma, noise = dgpo_draws(
            num_groups, tuple(tree.leaf_latents.shape[1:]), tree.sigmas, stream_generator(cfg.seed, "dgpo", iteration, 0),
            count=o.train_timesteps, candidates=num_candidate_steps(cfg.sampling.num_steps, o.timestep_fraction),
            shared_noise=o.shared_noise, group_size=group_size)
        leaf_group = tree.leaf_group.cpu()
        noise = noise[leaf_group * group_size + self._member(leaf_group)]  # this rank's leaves' rows of the global draw
        sigma = sigma.expand(tree.num_leaves, -1)
        order = group_major_order(group_order, leaf_group)
        metrics = recipe._optimize(order, lambda mb: self._micro_loss(recipe, tree, cond, adv, sigma, noise, mb), iteration)
        steps = (iteration + 1) * cfg.train.steps_per_iter
        decay = ema_kl_decay("linear", o.old_decay_max, 0.001, steps)
        recipe.kl_ema.update(recipe.module, step=steps, decay=decay)
        metrics["train/old_decay"] = decay
        return metrics

    @staticmethod
    def _member(leaf_group: torch.Tensor) -> torch.Tensor:
        """``[L]`` each leaf's position within its group (leaves of a group are consecutive, prompt-major)."""
        if bool((leaf_group[1:] < leaf_group[:-1]).any()):
            raise ValueError("dgpo: the rollout's leaves are not prompt-major (RolloutTree.leaf_group must be sorted)")
        first = torch.searchsorted(leaf_group, leaf_group)
        return torch.arange(len(leaf_group)) - first

    def _micro_loss(self, recipe: Any, tree: RolloutTree, cond: Conditioning, adv: torch.Tensor, sigma: torch.Tensor,
                    noise: torch.Tensor, mb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a micro-batch of leaves ``mb [B]`` (whole groups), each at the ``count`` shared times."""
        acc, count, o = recipe.accelerator, sigma.shape[1], self.opts
        x_s, target, s, prompts = recipe._rows(tree, sigma, noise, mb)
        c = cond[prompts]
        v_old = None
        if o.clip_range is not None:  # the copy first: swapping weights in place after v's graph would break its backward
            with torch.no_grad(), recipe.kl_ema.swapped_into(recipe.module), acc.autocast():
                v_old = recipe.adapter.predict(x_s, s, c, 1.0)
        with acc.autocast():
            v = recipe.adapter.predict(x_s, s, c, 1.0)
        with torch.no_grad(), recipe.adapter.disable_adapter(), acc.autocast():
            v_ref = recipe.adapter.predict(x_s, s, c, 1.0)
        # a group's rows at one time form one preference: id = group x count + time (rows are leaf-major)
        group = tree.leaf_group[mb].cpu().repeat_interleave(count) * count + torch.arange(count).repeat(len(mb))
        return dgpo_loss(v, target, v_ref, adv[mb].repeat_interleave(count).to(v.device), group.to(v.device),
                         beta_dpo=o.beta_dpo, group_size=self.cfg.sampling.group_size, v_old=v_old,
                         clip_range=o.clip_range, kl_beta=self.cfg.algorithm.kl_beta)
