"""SAGE-GRPO (Zheng et al. 2026, "Manifold-Aware Exploration for Reinforcement Learning in Video Generation",
arXiv:2603.21872; authors' code Tencent-Hunyuan/SAGE-GRPO @ c868869): GRPO with exploration kept near the
pretrained model's data manifold, at two levels.

* **Micro level** (§3.2.1):
  - the manifold-aware SDE: ``sampling.sampler: sage`` (:mod:`flowalign.samplers.sage`; the variance of each
    step is the integral of Flow-GRPO's diffusion over the step, with the logarithmic curvature correction);
  - the gradient-norm equalizer: each step's policy loss is multiplied by ``median_t(g_t) / g_t``, with ``g_t``
    the step's ``|d log p / d v|`` per element, so no noise level dominates the update
    (:func:`log_prob_grad_norms`, :func:`equalizer_scales`).
* **Macro level** (§3.2.2), the dual trust region, active when ``algorithm.kl_beta > 0``:
  - a periodically moving anchor: a frozen copy of the policy, refreshed every
    ``algorithm.sage_grpo.anchor_every`` iterations; the recipe's KL on transition means is taken against it
    (:meth:`SageGRPO.reference_policy`), weighted ``anchor_weight``;
  - a stepwise KL ``E_old[log p_old - log p_theta]`` between the sampling and the current policy on the
    rollout's own transitions (:func:`stepwise_kl`), weighted ``step_kl_weight``.

  ``loss = PPO-clip + kl_beta * (anchor_weight * KL_anchor + step_kl_weight * KL_step)`` (authors'
  ``grpo_utils.train_one_step``: ``effective_kl = dual_kl_moving_weight * kl_loss + dual_kl_step_weight * kl_stepwise``).

What is ours (docs/FIDELITY.md, "SAGE-GRPO"): ``kl_beta`` is a constant (the authors adapt it with a controller
from 1e-7 up to 1e-5); the anchor is refreshed every N *iterations* (theirs: every N optimizer updates, checked
once per training step) and is a real copy (their ``ref_model = model`` aliases the live policy); the equalizer's
median is over the SDE steps of the rollout (theirs: over every step of the schedule, all SDE in their runs).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from flowalign.algorithms.flow import EdgeTargets, FlowAlgorithm, RolloutContext, ScoredRollout
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require
from flowalign.config_fields import _f
from flowalign.losses import ppo_clip_loss
from flowalign.samplers import sde_step
from flowalign.types import RolloutTree

__all__ = ["SageGRPO", "SageGRPOConfig", "equalizer_scales", "log_prob_grad_norms", "stepwise_kl"]


@dataclass
class SageGRPOConfig:
    equalize: bool = _f(True, "Gradient-norm equalizer: scale each step's policy loss by median_t(g_t) / g_t, g_t = "
                              "|d log p / d v| of the step (SAGE-GRPO use_grad_balancing, on by default).")
    anchor_every: int = _f(10, "Dual trust region (with algorithm.kl_beta > 0): refresh the KL anchor to the current "
                               "policy every N iterations (SAGE-GRPO update_ref_model_step 10).", ge=1)
    anchor_weight: float = _f(1.0, "Weight of the KL to the moving anchor inside kl_beta's term (SAGE-GRPO "
                                   "dual_kl_moving_weight 1.0).", ge=0)
    step_kl_weight: float = _f(0.1, "Weight of the stepwise KL E_old[log p_old - log p] between the sampling and the "
                                    "current policy inside kl_beta's term (SAGE-GRPO dual_kl_step_weight 0.1).", ge=0)


# ------------------------------------------------------------------------------------------------
# the gradient-norm equalizer (arXiv:2603.21872 §3.2.1)
# ------------------------------------------------------------------------------------------------
def log_prob_grad_norms(kind: str, sigmas: Tensor, noise_levels: Tensor) -> Tensor:
    """Per-step size of the log-prob's gradient w.r.t. the velocity, ``g_t = |d mean / d v| / std``.

    The transition is ``N(mean, std^2 I)``, so per element ``d log p / d v = (x' - mean) / std^2 * d mean / d v``
    with ``x' - mean = std * z``: its scale is ``|d mean / d v| / std`` (authors' ``compute_log_prob_grad_norms``,
    ``scheduling_flow_match_discrete.py``; for ``sage`` ``|dt - var (1 - sigma) / (2 sigma)| / sqrt(var)``).
    Every sampler's mean is affine in ``v`` with a scalar coefficient, so ``d mean / d v`` is exactly
    ``mean(x=0, v=1) - mean(x=0, v=0)`` of :func:`flowalign.samplers.sde_step` (the same code the rollout runs).

    Args:
        kind: the ``sampling.sampler``.
        sigmas: ``[T + 1]`` the schedule, descending.
        noise_levels: ``[T]`` each step's noise level (0 = an ODE step).

    Returns:
        ``[T]`` float32 ``g_t``; NaN where the step is deterministic (``std == 0``).
    """
    s, sn = sigmas[:-1].float().cpu(), sigmas[1:].float().cpu()
    a = noise_levels.float().cpu()
    zeros, ones = torch.zeros(len(s), 1), torch.ones(len(s), 1)
    at_one = sde_step(ones, s, sn, zeros, kind=kind, noise_level=a, prev_sample=zeros)
    at_zero = sde_step(zeros, s, sn, zeros, kind=kind, noise_level=a, prev_sample=zeros)
    jacobian = (at_one.mean - at_zero.mean).squeeze(1)  # d mean / d v, exact: the mean is affine in v
    std = at_one.std
    return torch.where(std > 0, jacobian.abs() / std.clamp_min(torch.finfo(torch.float32).tiny), torch.nan)


def equalizer_scales(grad_norms: Tensor) -> Tensor:
    """``median(g) / g_t`` over the stochastic steps (1 where ``g_t`` is NaN, a deterministic step).

    Authors' ``compute_grad_balancing_factors``: ``scales = median_norm / grad_norms`` with ``torch.median``
    (the lower of the two middle values for an even count), a non-positive or non-finite median replaced by 1.

    Args:
        grad_norms: ``[T]`` :func:`log_prob_grad_norms`.

    Returns:
        ``[T]`` float32 positive scales.
    """
    active = torch.isfinite(grad_norms) & (grad_norms > 0)
    if not bool(active.any()):
        return torch.ones_like(grad_norms)
    median = torch.median(grad_norms[active])
    return torch.where(active, median / grad_norms, torch.ones_like(grad_norms))


# ------------------------------------------------------------------------------------------------
# the dual trust region (arXiv:2603.21872 §3.2.2)
# ------------------------------------------------------------------------------------------------
def stepwise_kl(log_prob: Tensor, log_prob_old: Tensor, weights: Tensor | None = None) -> Tensor:
    """The stepwise KL ``KL(p_old || p_theta) ~= E_old[log p_old - log p_theta]`` on the rollout's transitions.

    The transitions were sampled from the old policy, so the mean of ``log p_old(x') - log p_theta(x')`` over them
    is the Monte-Carlo (k1) estimate of ``KL(p_old || p_theta)`` (authors' ``kl_stepwise = torch.mean(old_logp -
    new_log_probs)``). The log-probs are the samplers' per-element means, so this is the KL per latent element.

    Args:
        log_prob: ``[N]`` the current policy's log-probs (gradients flow).
        log_prob_old: ``[N]`` the sampling policy's (detached).
        weights: optional ``[N]`` edge weights (as ``ppo_clip_loss``: ``sum(w x) / sum(w)``).

    Returns:
        0-dim float32 estimate.
    """
    diff = log_prob_old.detach().float() - log_prob.float()
    if weights is None:
        return diff.mean()
    w = weights.detach().float()
    return (w * diff).sum() / w.sum()


@contextmanager
def _predict_through(adapter: Any, module: nn.Module, restore: nn.Module) -> Iterator[None]:
    """Route ``adapter.predict`` through ``module``, then back through ``restore``."""
    adapter.set_trainable_module(module)
    try:
        yield
    finally:
        adapter.set_trainable_module(restore)


@register_algorithm
class SageGRPO(FlowAlgorithm):
    name = "sage_grpo"
    summary = ("manifold-aware SDE (sampler sage), per-step gradient-norm equalizer, dual trust region "
               "(moving anchor KL + stepwise KL)")
    paper = "Zheng et al. 2026, SAGE-GRPO (Manifold-Aware Exploration for RL in Video Generation), arXiv:2603.21872"
    advantage = "group, x the step's gradient-norm equalizer"
    config_file = "configs/sage_grpo/quickstart.yaml"
    Config = SageGRPOConfig
    #: the authors' ``_normalize_group``: population std, ``(r - mean) / clamp(std, min=1e-6)`` (here ``std + 1e-6``)
    std_eps = 1e-6

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._anchor: nn.Module | None = None
        self._anchor_iteration: int | None = None
        self._iteration = 0

    # -- micro level: the equalizer ---------------------------------------------------------------
    def step_scales(self, sigmas: Tensor, iteration: int) -> Tensor:
        """``[T]`` the equalizer's per-step loss scales for this iteration's SDE steps (1 elsewhere)."""
        start, end = self.sde_window(iteration)
        levels = torch.tensor([lvl if start <= t < end else 0.0 for t, lvl in enumerate(self.noise_level_schedule)])
        return equalizer_scales(log_prob_grad_norms(self.cfg.sampling.sampler, sigmas, levels))

    def targets(self, tree: RolloutTree, scored: ScoredRollout, ctx: RolloutContext, iteration: int) -> EdgeTargets:
        """GRPO's per-edge advantages, each multiplied by its step's equalizer scale.

        PPO-clip's per-edge term ``max(-A r, -A clip(r))`` is positively homogeneous in ``A``, so scaling ``A`` by
        ``c > 0`` scales the edge's policy loss by ``c`` exactly: the authors' ``policy_loss_per * loss_scale``
        (after their advantage clamp, as ours: ``algorithm.adv_clip`` acts on the leaves first)."""
        self._iteration = iteration
        base = super().targets(tree, scored, ctx, iteration)
        if not self.opts.equalize:
            return base
        device = base.trainable.device  # the recipe indexes the advantages with `trainable` (on the model's device)
        per_edge = self.step_scales(tree.sigmas, iteration).to(device)[tree.step.to(device)]
        trained = per_edge[base.trainable].cpu()
        metrics = {**base.metrics, "train/equalizer_min": float(trained.min()) if len(trained) else 1.0,
                   "train/equalizer_max": float(trained.max()) if len(trained) else 1.0}
        return replace(base, advantages=base.advantages.to(device) * per_edge, metrics=metrics)

    # -- macro level: the dual trust region -------------------------------------------------------
    def anchor(self, recipe: Any) -> nn.Module:
        """The frozen anchor policy, (re)taken from ``recipe.module`` at the first use of iterations
        ``0, N, 2N, ...`` (``N = anchor_every``), before that iteration's first optimizer step."""
        due = self._iteration % self.opts.anchor_every == 0 and self._anchor_iteration != self._iteration
        if self._anchor is None:
            self._anchor = copy.deepcopy(recipe.module).requires_grad_(False).eval()
            for p in self._anchor.parameters():
                p.grad = None  # deepcopy copies gradients too
        elif due:
            self._anchor.load_state_dict(recipe.module.state_dict())
        else:
            return self._anchor
        self._anchor_iteration = self._iteration
        return self._anchor

    def reference_policy(self, recipe: Any) -> AbstractContextManager:
        """The recipe's KL term runs against the moving anchor instead of the frozen base."""
        return _predict_through(recipe.adapter, self.anchor(recipe), recipe.wrapped)

    def edge_loss(self, log_prob: Tensor, log_prob_old: Tensor, advantages: Tensor, *, weights: Tensor | None,
                  kl: Tensor | None, mean: Tensor, mean_old: Tensor | None, std: Tensor, delta: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """PPO-clip + ``kl_beta * (anchor_weight * KL_anchor + step_kl_weight * KL_step)``; ``kl`` is the
        recipe's per-edge KL to the anchor (``None`` when ``kl_beta`` is 0: plain PPO-clip)."""
        a, o = self.cfg.algorithm, self.opts
        loss, metrics = ppo_clip_loss(log_prob, log_prob_old, advantages, clip_range=a.clip_range, weights=weights,
                                      kl=kl, kl_beta=a.kl_beta * o.anchor_weight if kl is not None else 0.0, check=False)
        step_kl = stepwise_kl(log_prob, log_prob_old, weights)
        if kl is not None and o.step_kl_weight > 0:
            loss = loss + a.kl_beta * o.step_kl_weight * step_kl
        return loss, {**metrics, "loss": loss.detach(), "step_kl": step_kl.detach()}

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o, t = cfg.algorithm.sage_grpo, cfg.train
        if cfg.algorithm.kl_beta > 0:
            _require(not t.fsdp.enabled, "train.fsdp.enabled", "sage_grpo's moving anchor is a whole copy of the trained "
                     "module, not sharded with FSDP2: use DDP, or algorithm.kl_beta: 0 (no trust region)")
            _require(t.checkpoint_every % o.anchor_every == 0, "train.checkpoint_every",
                     f"must be a multiple of algorithm.sage_grpo.anchor_every={o.anchor_every} (the anchor is not "
                     f"checkpointed: a resume at a refresh iteration takes it exactly), got {t.checkpoint_every}")
