"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al. 2025, arXiv:2509.16117).

GRPO's rollouts and group-relative advantages; the update needs no sampler log-probs. Each sampled
final is re-noised with the forward process at the rollout grid's times and trained with the
flow-matching loss of an implicit positive policy ``v⁺ = β·v_θ + (1 − β)·v_old`` (weight ``r``) and
an implicit negative policy ``v⁻ = (1 + β)·v_old − β·v_θ`` (weight ``1 − r``), ``r ∈ [0, 1]`` the
sample's optimality probability mapped from its clipped advantage
(:mod:`flowalign.losses.diffusion_nft`). ``v_old`` is a copy of the policy soft-updated once per
iteration, ``θ_old ← d·θ_old + (1 − d)·θ``.

It runs in the ``awm`` loop (:mod:`flowalign.recipes.awm`) through :meth:`DiffusionNFT.matching_update`.
The reference is NVlabs/DiffusionNFT @ 24af555, ``scripts/train_nft_sd3.py`` and ``config/nft.py``:

* times: every sample at each of the first ``int(num_steps · 0.99)`` times of the sampling grid, fresh
  noise each (lines 569, 853-868): ``time_sampling = discrete`` of the awm loop with one time per bin;
* β = 1 (``config.beta``; 0.1 for OCR), old-policy decay ``min(0.001·step, 0.5)`` (``decay_type = 1``;
  OCR: 2), ``adv_clip_max = 5``, velocity KL to the reference ``train.beta = 1e-4``, no guidance in the
  update (``guidance_scale = 1``).

Ours (docs/FIDELITY.md): the rollouts are sampled with the current policy, not the old one (the
reference samples with its "old" adapter, lines 640-660); with the default ``ramp`` decay the two
differ by at most one iteration's soft update. The rl / awm loops' shared rollout code has no hook
for sampling with another copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses.diffusion_nft import OLD_DECAYS, nft_loss, old_policy_decay, optimality_probability
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree


@dataclass
class DiffusionNFTConfig:
    beta: float = _f(1.0, "β of the implicit policies v+ = β v + (1 − β) v_old and v− = (1 + β) v_old − β v "
                          "(the reference's config.beta: 1, OCR 0.1).", gt=0)
    old_decay: str = _f("ramp", "Soft update of the old policy after each iteration, θ_old ← d θ_old + (1 − d) θ: none (d = 0) | "
                                "ramp (d = min(0.001 x optimizer steps, 0.5), the reference's decay_type 1) | delayed (d = 0 "
                                "before step 75, then min(0.0075 x (steps − 75), 0.999), decay_type 2, its OCR config).",
                        choices=OLD_DECAYS)
    timestep_fraction: float = _f(0.99, "Train each sample at the first int(sampling.num_steps x timestep_fraction) times of "
                                        "the rollout's sigma grid (the reference's train.timestep_fraction).", gt=0, le=1)
    train_timesteps: int | None = _f(None, "Training times per sample per iteration: null = all int(num_steps x "
                                           "timestep_fraction) grid times, once each (the reference); fewer = one per "
                                           "stratified bin of them (ours).", ge=1)


def num_train_times(num_steps: int, timestep_fraction: float, train_timesteps: int | None) -> int:
    """How many times each sample is trained at: ``train_timesteps`` or ``int(num_steps · fraction)`` (line 569)."""
    return train_timesteps if train_timesteps is not None else int(num_steps * timestep_fraction)


@register_algorithm
class DiffusionNFT(FlowAlgorithm):
    name = "diffusion_nft"
    summary = "flow matching of implicit positive / negative policies on the sampled finals, weighted by r(A); no log-probs"
    paper = "Zheng et al. 2025, DiffusionNFT, arXiv:2509.16117"
    recipe = "awm"
    loss = "diffusion_nft"
    policy_copy = True
    Config = DiffusionNFTConfig
    config_file = "configs/diffusion_nft/quickstart.yaml"

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o = cfg.algorithm.diffusion_nft
        _require(cfg.algorithm.adv_clip > 0, "algorithm.adv_clip",
                 "diffusion_nft maps advantages to r = clip(A, ±adv_clip) / adv_clip / 2 + 1/2, so it must be > 0")
        last = int(cfg.sampling.num_steps * o.timestep_fraction)
        _require(last >= 1, "algorithm.diffusion_nft.timestep_fraction",
                 f"int(sampling.num_steps x timestep_fraction) = {last}: no training time; raise it or sampling.num_steps")
        _require(o.train_timesteps is None or o.train_timesteps <= last, "algorithm.diffusion_nft.train_timesteps",
                 f"at most int(sampling.num_steps x timestep_fraction) = {last} (one per grid time)")

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # each sampled final once per iteration (at its training times)

    def matching_update(self, recipe: Any, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, iteration: int
                        ) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of :func:`nft_loss` over this rank's finals, then the old
        policy's soft update (train_nft_sd3.py lines 806-1039)."""
        from flowalign.recipes.awm import awm_draws, leaf_advantages_from_edges  # here: the recipes import the registry

        cfg, o = self.cfg, self.opts
        r = optimality_probability(leaf_advantages_from_edges(targets.advantages, tree.leaf_edges), cfg.algorithm.adv_clip)
        count = num_train_times(cfg.sampling.num_steps, o.timestep_fraction, o.train_timesteps)
        # the grid times, stratified (one per bin = every time once with the default count); fresh noise each
        order, sigma, noise = awm_draws(tree.num_leaves * recipe.world, tuple(tree.leaf_latents.shape[1:]),
                                        stream_generator(cfg.seed, "diffusion_nft", iteration, 0), kind="discrete",
                                        count=count, grid=tree.sigmas, timestep_fraction=o.timestep_fraction)
        order, sigma, noise = recipe._local_draws(order, sigma, noise, len(tree.prompts))
        metrics = recipe._optimize(order, lambda mb: self._micro_loss(recipe, tree, cond, r, sigma, noise, mb), iteration)
        steps = (iteration + 1) * cfg.train.steps_per_iter
        decay = old_policy_decay(o.old_decay, steps)
        recipe.kl_ema.update(recipe.module, step=steps, decay=decay)  # once per iteration (lines 1034-1039)
        metrics["train/old_decay"] = decay
        return metrics

    def _micro_loss(self, recipe: Any, tree: RolloutTree, cond: Conditioning, r: torch.Tensor, sigma: torch.Tensor,
                    noise: torch.Tensor, mb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a micro-batch of leaves ``mb [B]``, each at its ``count`` times (``B·count`` rows)."""
        acc, count = recipe.accelerator, sigma.shape[1]
        x_s, _, s, prompts = recipe._rows(tree, sigma, noise, mb)
        c = cond[prompts]
        # the old policy first: swapping weights in place after v's graph is built would break its backward
        with torch.no_grad(), recipe.kl_ema.swapped_into(recipe.module), acc.autocast():
            v_old = recipe.adapter.predict(x_s, s, c, 1.0)
        with acc.autocast():
            v = recipe.adapter.predict(x_s, s, c, 1.0)
        v_ref = None
        if self.cfg.algorithm.kl_beta > 0:
            with torch.no_grad(), recipe.adapter.disable_adapter(), acc.autocast():
                v_ref = recipe.adapter.predict(x_s, s, c, 1.0)
        x0 = tree.leaf_latents[mb].float().repeat_interleave(count, dim=0).to(v.device)
        return nft_loss(v, v_old, x_s, x0, s, r[mb].repeat_interleave(count).to(v.device), beta=self.opts.beta,
                        adv_clip=self.cfg.algorithm.adv_clip, v_ref=v_ref, kl_beta=self.cfg.algorithm.kl_beta)
