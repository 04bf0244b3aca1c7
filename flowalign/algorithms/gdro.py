"""GDRO: group-level direct reward optimization (Wang et al. 2026, arXiv:2601.02036, CVPR 2026).

The sampled finals of a group are re-noised with the forward process (any time: no sampler log-probs,
hence sampler-independent), each member gets a DPO-style implicit reward from the policy's and the
reference's flow-matching errors there, and the group's implicit rewards are fitted to its explicit ones
with a cross-entropy (``objective: cross_entropy``) or Plackett-Luce ranking (``plackett_luce``) loss
(:mod:`flowalign.losses.gdro`). It runs in the ``awm`` loop (:mod:`flowalign.recipes.awm`) through
:meth:`GDRO.matching_update`.

The reference model is the policy as it was when training started: the ``awm`` loop's policy copy
(``policy_copy``), never updated, checkpointed with the run (works for LoRA and full fine-tuning alike).

Ours (docs/FIDELITY.md, "GDRO"; no public code, equations not at hand): the exact implicit reward
(Diffusion-DPO's in velocity form), the cross-entropy target ``softmax(A/τ)`` over the group-relative
advantages, one time and noise per group shared by its members (as Diffusion-DPO shares them within a
pair), stratified over the rollout's sigma grid; and the data: the paper trains offline on a fixed
set of sampled groups, this loop samples fresh groups from the current policy every iteration (the
update itself is the same, whichever policy sampled the data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses.awm import flow_matching_pair
from flowalign.losses.gdro import GDRO_OBJECTIVES, gdro_objective, implicit_reward
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree

__all__ = ["GDRO", "GDROConfig", "group_leaves"]


@dataclass
class GDROConfig:
    objective: str = _f("cross_entropy", "Group loss on the implicit rewards: cross_entropy = -sum_i softmax(A/temperature)_i "
                                         "log softmax(r_hat)_i over each group | plackett_luce = the Plackett-Luce likelihood of the "
                                         "group's ranking by reward (flowalign/losses/gdro.py).", choices=GDRO_OBJECTIVES)
    beta: float = _f(10.0, "beta of the implicit reward r_hat = -beta (mse(v, u) - mse(v_ref, u)), mse averaged over latent "
                           "dims (ours: chosen on the digits quickstart, where 100 diverges; Diffusion-DPO's SD runs use 2500 "
                           "= its beta_dpo 5000 x 1/2 at a far lower learning rate).", gt=0)
    temperature: float = _f(1.0, "objective cross_entropy: tau of the target distribution softmax(A / tau) over the group's "
                                 "group-relative advantages A.", gt=0)
    train_timesteps: int = _f(1, "Re-noising times per group per iteration (shared by the group's members, fresh noise each), "
                                 "the implicit reward averaged over them.", ge=1)
    timestep_fraction: float = _f(0.99, "The times are drawn stratified from steps 0 .. int(sampling.num_steps x timestep_fraction) "
                                        "of the rollout's sigma grid (time_sampling discrete of the awm loop).", gt=0, le=1)


def group_leaves(leaf_prompt_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[P, G]`` the leaf ids of each local prompt's group, in leaf order.

    Args:
        leaf_prompt_idx: ``[L]`` each leaf's prompt (``RolloutTree.leaf_prompt_idx``).
        group_size: ``G``, the members every prompt must have.

    Raises:
        ValueError: a prompt has another number of leaves than ``group_size``.
    """
    counts = torch.bincount(leaf_prompt_idx.long().cpu())
    if bool((counts != group_size).any()):
        raise ValueError(f"GDRO needs every prompt's whole group on one rank: leaves per prompt {counts.tolist()}, "
                         f"expected {group_size} each")
    return torch.sort(leaf_prompt_idx.long().cpu(), stable=True).indices.view(-1, group_size)


@register_algorithm
class GDRO(FlowAlgorithm):
    name = "gdro"
    summary = "group-wise fit of DPO-style implicit rewards (flow matching vs the reference) to the group's rewards; no log-probs"
    paper = "Wang et al. 2026, GDRO: Group-level Reward Post-training Suitable for Diffusion Models, arXiv:2601.02036"
    recipe = "awm"
    loss = "gdro"
    policy_copy = True  # the frozen reference: the awm loop's copy of the policy, never updated here
    shard_by = "prompt"  # a group's loss needs all its members on one rank
    Config = GDROConfig
    config_file = "configs/gdro/quickstart.yaml"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o, t, s = cfg.algorithm.gdro, cfg.train, cfg.sampling
        _require(s.group_size >= 2, "sampling.group_size", f"GDRO compares the members of a group: needs >= 2, got {s.group_size}")
        _require(t.micro_batch_size % s.group_size == 0, "train.micro_batch_size",
                 f"GDRO's loss is per group: {t.micro_batch_size} must be a multiple of sampling.group_size ({s.group_size})")
        local = cfg.data.prompts_per_iter // max(1, world_size)
        _require(local % t.steps_per_iter == 0, "train.steps_per_iter",
                 f"GDRO splits whole groups over the optimizer steps: the {local} prompt(s) per rank per iteration "
                 f"(data.prompts_per_iter / processes) must be divisible by {t.steps_per_iter}")
        _require(int(s.num_steps * o.timestep_fraction) >= 1, "algorithm.gdro.timestep_fraction",
                 f"int(sampling.num_steps x timestep_fraction) = {int(s.num_steps * o.timestep_fraction)}: no training time")

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # each sampled final once per iteration (at its group's times)

    def matching_update(self, recipe: Any, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, iteration: int
                        ) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of the GDRO loss over this rank's groups (shuffled, whole)."""
        from flowalign.recipes.awm import awm_times, leaf_advantages_from_edges  # here: the recipes import the registry

        cfg, o = self.cfg, self.opts
        G = cfg.sampling.group_size
        adv = leaf_advantages_from_edges(targets.advantages, tree.leaf_edges)
        groups = group_leaves(tree.leaf_prompt_idx, G)  # [P, G] local leaf ids
        P = groups.shape[0]
        # drawn for every rank's groups from one stream (a one-process run's draws), this rank's kept
        gen = stream_generator(cfg.seed, "gdro", iteration, 0)
        order = torch.randperm(P * recipe.world, generator=gen)
        sigma = awm_times("discrete", P * recipe.world, o.train_timesteps, gen, grid=tree.sigmas,
                          timestep_fraction=o.timestep_fraction)
        noise = torch.randn((P * recipe.world, o.train_timesteps, *tree.leaf_latents.shape[1:]), generator=gen)
        mine = recipe.shard.local_rows(torch.arange(P * recipe.world), P)  # global ids of this rank's groups
        local_id = torch.full((P * recipe.world,), -1, dtype=torch.long)
        local_id[mine] = torch.arange(P)
        visited = local_id[order]
        visited = visited[visited >= 0]
        sigma, noise = sigma[mine], noise[mine]
        items = groups[visited].reshape(-1).to(tree.leaf_prompt_idx.device)  # leaf ids, whole groups in order
        return recipe._optimize(items, lambda mb: self._micro_loss(recipe, tree, cond, adv, sigma, noise, mb), iteration)

    def _micro_loss(self, recipe: Any, tree: RolloutTree, cond: Conditioning, adv: torch.Tensor, sigma: torch.Tensor,
                    noise: torch.Tensor, mb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a micro-batch of whole groups ``mb [B]`` (leaf ids, ``B = k·G``), each leaf at its
        group's ``count`` times: ``B·count`` rows."""
        acc, o, G = recipe.accelerator, self.opts, self.cfg.sampling.group_size
        count = sigma.shape[1]
        prompt = tree.leaf_prompt_idx[mb].cpu()  # the local prompt = the group's row of sigma / noise
        x0 = tree.leaf_latents[mb].float().repeat_interleave(count, dim=0)
        s = sigma[prompt].reshape(-1).to(x0.device)
        eps = noise[prompt].reshape(-1, *noise.shape[2:]).to(x0.device)
        x_s, u = flow_matching_pair(x0, eps, s)
        x_s = x_s.to(recipe.adapter.dtype)
        c = cond[tree.leaf_prompt_idx[mb].repeat_interleave(count)]
        # the reference first: swapping weights in place after v's graph is built would break its backward
        with torch.no_grad(), recipe.kl_ema.swapped_into(recipe.module), acc.autocast():
            v_ref = recipe.adapter.predict(x_s, s, c, 1.0)
        with acc.autocast():
            v = recipe.adapter.predict(x_s, s, c, 1.0)
        r_hat = implicit_reward(v, v_ref, u, o.beta).view(len(mb), count).mean(dim=1).view(-1, G)  # [B/G, G]
        explicit = adv[mb.cpu()].view(-1, G).to(r_hat.device)
        policy = gdro_objective(o.objective, r_hat, explicit, o.temperature)
        kl = (v.float() - v_ref.float()).pow(2).flatten(1).mean(dim=1).mean()  # velocity KL to the reference (as AWM's)
        loss = policy + self.cfg.algorithm.kl_beta * kl
        best = explicit.argmax(dim=1, keepdim=True)
        accuracy = (r_hat.detach().argmax(dim=1, keepdim=True) == best).float().mean()
        return loss, {"loss": loss.detach(), "policy_loss": policy.detach(), "kl": kl.detach(),
                      "implicit_reward_std": r_hat.detach().std(dim=1).mean(), "best_is_top_implicit": accuracy}
