"""Online Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908) on the forward process, pairs drawn online.

Each iteration samples a flat group per prompt; the group's preference pair (``algorithm.diffusion_dpo.
pair_source``, :class:`~flowalign.algorithms.d3po.PreferencePairs`: best vs worst reward, or the pairwise
judge's win rates) is re-noised with the forward process, both samples at the same times with the same
noise, and trained with the Diffusion-DPO loss (:func:`flowalign.losses.dpo.diffusion_dpo_loss`, Eq. 14):
the preferred sample's flow-matching error must fall relative to the frozen reference's more than the
dispreferred one's. No sampler log-probs are used, so it runs in the ``awm`` loop through
:meth:`DiffusionDPO.matching_update`.

Reference code: SalesforceAIResearch/DiffusionDPO @ 5233e75, ``train.py`` and ``launchers/sd15.sh``:

* the loss ``−log σ(−β/2 · [(e_w − e_ref,w) − (e_l − e_ref,l)])`` with ``e`` the per-sample mean squared
  error (lines 1121-1147), ``β = 5000`` (``--beta_dpo``), the reference ``ref_unet`` frozen at the start;
* one time and one noise per pair, shared by its two samples (lines 1044, 1053-1055), no guidance in the
  update (the conditional prediction).

Ours (docs/FIDELITY.md): the flow convention's velocity error ``v − (ε − x0)`` in place of the noise
error; the pairs are drawn online from the policy's own groups (the reference trains offline on
Pick-a-Pic); the times are the rollout's sigma grid, stratified into ``train_timesteps`` bins over its
first ``int(num_steps x timestep_fraction)`` steps (the reference draws ``t`` uniformly over its 1000
training timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowalign.algorithms.d3po import PAIR_SOURCES, PairTargets, PreferencePairs, check_pair_source
from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses.awm import flow_matching_pair
from flowalign.losses.dpo import diffusion_dpo_loss
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree

__all__ = ["DiffusionDPO", "DiffusionDPOConfig"]


@dataclass
class DiffusionDPOConfig:
    beta: float = _f(5000.0, "β of −log σ(−β/2 [(e_w − e_ref,w) − (e_l − e_ref,l)]) (the reference's --beta_dpo = 5000, "
                             "the paper's β·T).", gt=0)
    pair_source: str = _f("best_worst", "Each group's preference pair: best_worst = highest vs lowest reward | judge = highest "
                                        "vs lowest win rate of the pairwise judge (a pairwise_winrate reward, as pref_grpo). "
                                        "A tie gives no pair.", choices=PAIR_SOURCES)
    train_timesteps: int = _f(1, "Times per pair per iteration, each with its own noise shared by the pair's two samples, "
                                 "stratified over the grid steps (the reference: one uniform time per pair per step).", ge=1)
    timestep_fraction: float = _f(1.0, "The times are the rollout's sigma grid at steps 0 .. int(sampling.num_steps x "
                                       "timestep_fraction) − 1 (ours; the reference: all of its 1000 timesteps).", gt=0, le=1)


@register_algorithm
class DiffusionDPO(PreferencePairs, FlowAlgorithm):
    name = "diffusion_dpo"
    summary = "Diffusion-DPO on re-noised online pairs (a group's best vs worst): flow-matching errors vs the reference"
    paper = "Wallace et al. 2023, Diffusion-DPO, arXiv:2311.12908"
    recipe = "awm"
    advantage = "preference pair per group (best vs worst, or a pairwise judge)"
    loss = "diffusion_dpo"
    Config = DiffusionDPOConfig
    config_file = "configs/diffusion_dpo/quickstart.yaml"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o = cfg.algorithm.diffusion_dpo
        check_pair_source(cfg, cls.name)
        _require(cfg.algorithm.kl_beta == 0, "algorithm.kl_beta",
                 "diffusion_dpo's β (algorithm.diffusion_dpo.beta) is its KL strength to the reference; set algorithm.kl_beta: 0")
        last = int(cfg.sampling.num_steps * o.timestep_fraction)
        _require(o.train_timesteps <= last, "algorithm.diffusion_dpo.train_timesteps",
                 f"at most int(sampling.num_steps x timestep_fraction) = {last} (one per grid step)")
        units = cfg.data.prompts_per_iter // world_size * o.train_timesteps
        _require(units >= cfg.train.steps_per_iter, "train.steps_per_iter",
                 f"{cfg.train.steps_per_iter} optimizer steps but at most {units} (pair, time) units per rank per iteration "
                 "(one pair per prompt: prompts_per_iter / world_size x algorithm.diffusion_dpo.train_timesteps)")

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # the validation's count; check() holds the pairs' stricter one

    def matching_update(self, recipe: Any, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, iteration: int
                        ) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of :func:`diffusion_dpo_loss` over this rank's (pair, time)
        units, shuffled (``train.micro_batch_size`` counts units).

        Times and noises are drawn per leaf for every rank's leaves from one stream (as the awm loop's),
        and a pair uses its preferred leaf's: one time and noise for both samples (train.py lines 1053-1055)."""
        from flowalign.recipes.awm import awm_draws  # here: the recipes import the registry

        if not isinstance(targets, PairTargets):
            raise TypeError(f"diffusion_dpo's update needs the PairTargets of its own estimator, got {type(targets).__name__}")
        cfg, o, pairs = self.cfg, self.opts, targets.pairs
        units = len(pairs) * o.train_timesteps
        metrics = {"train/units": float(units)}
        if units < cfg.train.steps_per_iter:  # every group tied: nothing to prefer (ours: skip the update)
            return {**metrics, "train/skipped_update": 1.0}
        order, sigma, noise = awm_draws(tree.num_leaves * recipe.world, tuple(tree.leaf_latents.shape[1:]),
                                        stream_generator(cfg.seed, "diffusion_dpo", iteration, 0), kind="discrete",
                                        count=o.train_timesteps, grid=tree.sigmas, timestep_fraction=o.timestep_fraction)
        _, sigma, noise = recipe._local_draws(order, sigma, noise, len(tree.prompts))
        order = torch.randperm(units, generator=stream_generator(cfg.seed, "shuffle", iteration, recipe.rank))
        return {**metrics, **recipe._optimize(order, lambda mb: self._unit_loss(recipe, tree, cond, pairs, sigma, noise, mb),
                                              iteration)}

    def _unit_loss(self, recipe: Any, tree: RolloutTree, cond: Conditioning, pairs: Tensor, sigma: Tensor, noise: Tensor,
                   units: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of ``B`` (pair, time) units ``units [B]`` (unit ``u``: pair ``u // count`` at its preferred
        leaf's time ``u % count``; ``pairs [K, 2]``, ``sigma [L, count]``, ``noise [L, count, *D]``): ``2·B`` rows."""
        count = sigma.shape[1]
        k, j = units.cpu() // count, units.cpu() % count
        w, l = pairs[k, 0], pairs[k, 1]
        device = tree.leaf_latents.device
        s = sigma[w, j].to(device)  # [B], shared by the pair
        eps = noise[w, j].to(device)  # [B, *D], shared by the pair
        x0 = torch.cat([tree.leaf_latents[w.to(device)], tree.leaf_latents[l.to(device)]]).float()
        s2 = torch.cat([s, s])
        x_s, target = flow_matching_pair(x0, torch.cat([eps, eps]), s2)
        x_s = x_s.to(recipe.adapter.dtype)
        c = cond[torch.cat([tree.leaf_prompt_idx[w.to(device)], tree.leaf_prompt_idx[l.to(device)]])]
        with recipe.accelerator.autocast():
            v = recipe.adapter.predict(x_s, s2, c, 1.0)  # no guidance in the update: the conditional prediction
        with torch.no_grad(), recipe.adapter.disable_adapter(), recipe.accelerator.autocast():
            v_ref = recipe.adapter.predict(x_s, s2, c, 1.0)
        b = len(units)
        return diffusion_dpo_loss(v[:b], v[b:], v_ref[:b], v_ref[b:], target[:b], target[b:], beta=self.opts.beta, check=False)
