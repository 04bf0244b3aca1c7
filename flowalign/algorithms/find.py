"""FIND: fine-tuning the initial noise distribution with policy optimization (Chen et al. 2024, ACM MM,
arXiv:2407.19453).

The generator stays frozen; what is trained is a prompt-conditioned Gaussian policy over the initial noise
``z_T ~ N(μ_θ(c), σ_θ(c)²)`` (:class:`flowalign.losses.find.NoisePolicy`, attached to the trained module so
that the loops' optimizer, EMA and checkpoints / resume carry it). Each iteration draws ``group_size`` noises
per prompt from the policy, generates with the deterministic sampler (the rollout's ODE: every noise level 0),
scores the images, and takes ``train.steps_per_iter`` optimizer steps of the ratio-clipped policy gradient on
the exact Gaussian log-density of the drawn noises (:func:`flowalign.losses.find.gaussian_log_prob` with
:func:`flowalign.losses.ppo_clip_loss`), plus the regression of the reward-prediction head (dynamic reward
calibration). Evaluation draws its fixed noises through the policy (``μ + σ·ε``), so before training it is the
base model's evaluation exactly. It runs in the ``awm`` loop through :meth:`FIND.matching_update`.

Ours (docs/FIDELITY.md, "FIND"; no public training code, the paper's equations not at hand): the network
(an MLP on pooled text features, zero-initialised heads, clamped log-std), the clip range 0.2 (PPO's), the
calibration's baseline ``A = r − φ(c)`` with ``φ`` regressed in the same optimizer steps as the policy (the
paper updates ``φ`` first), and ``baseline: group`` (GRPO's group-relative advantage) as an alternative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowalign.advantages import edge_advantages
from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses import ppo_clip_loss
from flowalign.losses.find import NoisePolicy, gaussian_log_prob, prompt_features, reparameterize, value_loss
from flowalign.rollout import BranchSpec
from flowalign.training.rng import stream_generator
from flowalign.types import Conditioning, RolloutTree

__all__ = ["FIND", "FINDConfig", "NOISE_POLICY"]

#: the noise policy's name in the trained module (checkpoint keys ``find_noise_policy.*``)
NOISE_POLICY = "find_noise_policy"
#: where the advantage's baseline comes from
BASELINES = ("calibration", "group")


@dataclass
class FINDConfig:
    hidden: int = _f(64, "Width of the noise policy's hidden layer (an MLP on the pooled prompt features; ours).", ge=1)
    log_std_min: float = _f(-2.0, "Lower clamp of the policy's log-std (ours).", lt=0)
    log_std_max: float = _f(1.0, "Upper clamp of the policy's log-std (ours).", gt=0)
    clip_range: float = _f(0.2, "Ratio clip epsilon of the policy loss on the noise's log-density (the paper's ratio clipping; "
                                "PPO's 0.2, ours: the paper's value was not at hand).", gt=0)
    baseline: str = _f("calibration", "Advantage baseline: calibration = r - phi(c), phi the policy's reward-prediction head "
                                      "regressed on the rewards (the paper's dynamic reward calibration) | group = GRPO's "
                                      "group-relative advantage (algorithm.std_mode etc.; ours).", choices=BASELINES)
    value_coef: float = _f(1.0, "Weight of the reward-prediction regression mean (phi(c) - r)^2 in the loss (baseline calibration).",
                           ge=0)


@register_algorithm
class FIND(FlowAlgorithm):
    name = "find"
    summary = "frozen generator; a prompt-conditioned Gaussian over the initial noise trained by ratio-clipped policy gradient"
    paper = "Chen et al. 2024, FIND: Fine-tuning Initial Noise Distribution with Policy Optimization, arXiv:2407.19453"
    recipe = "awm"
    loss = "find"
    shapes_initial_noise = True
    deterministic_rollouts = True  # rollout_spec samples with the ODE
    Config = FINDConfig
    config_file = "configs/find/quickstart.yaml"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        #: the noise policy (set by prepare_module, part of the trained module)
        self.noise_policy: NoisePolicy | None = None

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o = cfg.algorithm.find
        _require(cfg.model.lora_rank == 0, "model.lora_rank", "FIND trains no generator weight (the generator is frozen): set 0")
        _require(cfg.algorithm.kl_beta == 0, "algorithm.kl_beta", "FIND's generator is frozen, a KL to it is 0: set 0")
        _require(not cfg.train.fsdp.enabled, "train.fsdp.enabled", "FIND's trained noise policy is small: run it replicated")
        _require(not cfg.sampling.init_same_noise, "sampling.init_same_noise", "FIND draws each sample's own initial noise")
        _require(o.log_std_min < o.log_std_max, "algorithm.find.log_std_min", "must be below algorithm.find.log_std_max")

    @classmethod
    def trained_units(cls, cfg: Any) -> tuple[int, str]:
        return 1, "samples"  # each drawn initial noise once per optimizer pass

    # ------------------------------------------------------------------------------------------
    # the policy: module, initial noise, rollout
    # ------------------------------------------------------------------------------------------
    def prepare_module(self, module: torch.nn.Module, adapter: Any) -> None:
        """Freeze the generator and attach the noise policy (on the adapter's device, float32).

        Raises:
            NotImplementedError: several processes: the policy runs outside the data-parallel wrapper's
                forward, so its gradients would not be averaged over ranks.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise NotImplementedError("algorithm.name: find runs in one process (its noise policy is called outside the "
                                      "data-parallel wrapper, whose gradient averaging it would miss); launch it without "
                                      "accelerate / torchrun")
        o = self.opts
        module.requires_grad_(False)
        features = prompt_features(adapter.encode([""]))
        self.noise_policy = NoisePolicy(features.shape[1], tuple(adapter.latent_shape), hidden=o.hidden,
                                        log_std_min=o.log_std_min, log_std_max=o.log_std_max).to(adapter.device)
        module.add_module(NOISE_POLICY, self.noise_policy)

    def initial_latents(self, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``z_T = μ(c) + σ(c)·ε`` for each sample (no gradient: the update recomputes the density)."""
        with torch.no_grad():
            mean, log_std, _ = self.noise_policy(prompt_features(cond).to(noise.device))
        return reparameterize(noise.float(), mean, log_std).to(noise.dtype)

    def rollout_spec(self, iteration: int, world: int) -> BranchSpec:
        """Flat groups generated with the deterministic sampler (every noise level 0); the trained action is
        the initial noise, not a step."""
        s = self.cfg.sampling
        return BranchSpec(s.num_steps, [0.0] * s.num_steps, samples_per_prompt=s.group_size // world, splits=(),
                          sampler=s.sampler, train_steps=(), guidance_scale=s.guidance_scale, cps_log_prob=s.cps_log_prob,
                          final_sample=s.final_sample)

    # ------------------------------------------------------------------------------------------
    # advantages and update
    # ------------------------------------------------------------------------------------------
    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        """Each leaf's advantage on its first edge (the one leaving the drawn noise, marked trained):
        ``r − φ(c)`` (calibration) or group-relative (group)."""
        if self.opts.baseline == "group":
            leaf_adv = scored.local(self.leaf_advantages(scored))
        else:
            rewards = self.require_all_scored(scored, "algorithm.find.baseline: calibration")
            with torch.no_grad():
                _, _, predicted = self.noise_policy(prompt_features(ctx.cond[tree.leaf_prompt_idx]))
            leaf_adv = rewards.float() - predicted.float().cpu()
        first = tree.leaf_edges[:, 0].long().cpu()
        trainable = torch.zeros(tree.num_edges, dtype=torch.bool)
        trainable[first] = True
        return EdgeTargets(edge_advantages(leaf_adv, tree.leaf_edges.cpu(), tree.num_edges), trainable)

    def matching_update(self, recipe: Any, tree: RolloutTree, cond: Conditioning, targets: EdgeTargets, iteration: int
                        ) -> dict[str, float]:
        """``train.steps_per_iter`` optimizer steps of the ratio-clipped loss over this rank's drawn noises
        (shuffled), the first micro-batch checked on-policy (ratio exactly 1)."""
        from flowalign.recipes.awm import leaf_advantages_from_edges  # here: the recipes import the registry

        cfg = self.cfg
        device = tree.x_t.device
        adv = leaf_advantages_from_edges(targets.advantages, tree.leaf_edges).to(device)
        z = tree.x_t[tree.leaf_edges[:, 0].long()].float()  # [L, *latent] the drawn initial noises
        features = prompt_features(cond[tree.leaf_prompt_idx]).to(device)
        order = torch.randperm(tree.num_leaves, generator=stream_generator(cfg.seed, "find", iteration, recipe.rank)).to(device)
        old, rewards = self._before_update(z, features, adv, order)
        return recipe._optimize(order, lambda mb: self._micro_loss(z, features, adv, old, rewards, mb), iteration,
                                check_first=recipe._check_on_policy)

    @torch.no_grad()
    def _before_update(self, z: torch.Tensor, features: torch.Tensor, adv: torch.Tensor, order: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([L] log π_old(z), [L] rewards)`` before any step, computed in the micro-batches the update will
        use (so the first micro-batch's ratio is exactly 1); the rewards are ``A + φ_old(c)`` (calibration)."""
        t = self.cfg.train
        old, predicted = torch.empty(len(z), device=z.device), torch.zeros(len(z), device=z.device)
        for chunk in order.tensor_split(t.steps_per_iter):
            for mb in chunk.split(t.micro_batch_size):
                mean, log_std, value = self.noise_policy(features[mb])
                old[mb] = gaussian_log_prob(z[mb], mean, log_std)
                predicted[mb] = value.float()
        return old, adv + predicted

    def _micro_loss(self, z: torch.Tensor, features: torch.Tensor, adv: torch.Tensor, old: torch.Tensor,
                    rewards: torch.Tensor, mb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO-clip on ``log π_θ(z|c)`` of a micro-batch of drawn noises ``mb [B]`` (+ the calibration regression)."""
        o = self.opts
        mean, log_std, value = self.noise_policy(features[mb])
        log_prob = gaussian_log_prob(z[mb], mean, log_std)
        loss, metrics = ppo_clip_loss(log_prob, old[mb], adv[mb], clip_range=o.clip_range, check=False)
        if o.baseline == "calibration":
            fit = value_loss(value, rewards[mb])
            loss = loss + o.value_coef * fit
            metrics = {**metrics, "loss": loss.detach(), "value_loss": fit.detach()}
        metrics["noise_mean_abs"] = mean.detach().abs().mean()
        metrics["noise_log_std"] = log_std.detach().mean()
        return loss, metrics
