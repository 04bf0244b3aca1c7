"""GRPO-Guard (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via
Regulated Clipping", arXiv:2510.22319, §3): Flow-GRPO whose PPO clip acts on a normalised ratio.

Why. With the Gaussian transition ``x_next = μ_old + s·ε`` of the rollout (``s`` the transition std,
``σ_t·√Δt``) and the current policy's mean ``μ = μ_old + Δμ``, the per-step log importance ratio is
(log-densities averaged over the ``D`` latent dims, as the samplers' are)

    log r = (‖x_next − μ_old‖² − ‖x_next − μ‖²) / (2 s² D) = ⟨ε, Δμ⟩ / s − ‖Δμ‖² / (2 s²)      (⟨·,·⟩, ‖·‖²: means over dims)

Its mean ``−‖Δμ‖²/(2 s²)`` is negative (the ratio drifts left of 1, so a positive-advantage edge
rarely reaches ``1 + ε`` and the clip stops acting on it) and its spread ``‖Δμ‖/s`` grows as ``s``
shrinks at the late, low-noise steps. The paper's two fixes:

* **RatioNorm**: ``log r̂ = s · (log r + ‖Δμ‖² / (2 s²)) = ⟨ε, Δμ⟩``: the second-order term that
  shifts the mean is added back and the step's noise scale removed, so every step's log-ratio is
  centred at 0 with a spread set by ``Δμ`` alone; PPO-clip then runs on ``r̂ = exp(log r̂)``.
* **Gradient reweighting**: each step's clipped policy term is multiplied by ``δ_t = 1/Δt``
  (``Δt = σ_t − σ_{t+1}``): ``Δμ`` of Flow-GRPO's SDE step is ``−Δt·(1 + a²/2)·Δv`` (``a`` the noise
  level), so ``∂ log r̂ / ∂v ∝ Δt`` and ``1/Δt`` equalises the steps' gradients.

The authors released no code (project page jingw193.github.io/GRPO-Guard). The formulas agree with
three public implementations: X-GenGroup/Flow-Factory @ a0b2bc5 ``src/flow_factory/trainers/grpo.py``
lines 501-504 (``GRPOGuardTrainer``: ratio ``exp((lp − lp_old)·s + mse/(2 s))``, the same quantity);
verl-omni's ``GRPOGuardLoss`` (docs ``algo/grpo_guard.md``: ``b_t``, ``ρ_t`` and the ``1/(√−dt)²``
factor); and Pref-GRPO's ``--rationorm`` (CodeGoat24/Pref-GRPO @ 3e787f6 ``fastvideo/train_flux.py``
lines 729-756), which is :func:`flowalign.losses.ppo.ratio_norm_log_ratio` here.

Ours (docs/FIDELITY.md): the KL term (``algorithm.kl_beta``) is not divided by ``Δt`` (as Pref-GRPO's
line 802; the paper trains without heavy KL); the reweighting is a loss weight ``1/Δt`` normalised as
``mean_w(l/Δt)`` over a micro-batch of edges (:func:`~flowalign.losses.ppo.step_weighted_ppo_clip_loss`);
``grad_reweight: none`` and ``ratio_norm: false`` each turn one fix off (the paper's ablations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowalign.algorithms.flow import FlowAlgorithm
from flowalign.algorithms.registry import register_algorithm
from flowalign.config_checks import _require, _require_gaussian_log_probs
from flowalign.config_fields import _f
from flowalign.losses.ppo import ratio_norm_log_ratio, step_weighted_ppo_clip_loss

__all__ = ["GRAD_REWEIGHTS", "GRPOGuard", "GRPOGuardConfig", "guard_log_ratio", "step_weights"]

#: per-step gradient weights δ_t: none (1) | inverse_dt (1 / Δt, the paper's)
GRAD_REWEIGHTS = ("none", "inverse_dt")


@dataclass
class GRPOGuardConfig:
    ratio_norm: bool = _f(True, "RatioNorm: PPO-clip on log r_hat = s (log r + mean((mu - mu_old)^2) / (2 s^2)), s the "
                                "transition std (GRPO-Guard §3; = <eps, mu - mu_old>: centred at 0 at every step). "
                                "false: the plain ratio exp(log p - log p_old).")
    grad_reweight: str = _f("inverse_dt", "Per-step weight delta_t of each edge's clipped policy term: inverse_dt = 1 / "
                                          "(sigma_t - sigma_t+1) (GRPO-Guard's gradient reweighting) | none = 1.",
                            choices=GRAD_REWEIGHTS)


def guard_log_ratio(log_prob: Tensor, log_prob_old: Tensor, mean: Tensor, mean_old: Tensor | None, std: Tensor,
                    *, ratio_norm: bool) -> Tensor:
    """``[N]`` the log importance ratio PPO-clip acts on.

    With ``ratio_norm``: RatioNorm, ``s·(lp − lp_old + mean_d (μ − μ_old)² / (2 s²))`` (GRPO-Guard §3;
    :func:`flowalign.losses.ppo.ratio_norm_log_ratio`); otherwise ``lp − lp_old`` (Flow-GRPO).

    Args:
        log_prob, log_prob_old: ``[N]`` Gaussian log-densities (mean over latent dims) of the stored
            transitions under the current and the sampling policy.
        mean, mean_old: ``[N, *latent]`` the two transition means (``mean_old`` needed with ``ratio_norm``).
        std: ``[N]`` transition std ``s > 0``.
    """
    if not ratio_norm:
        return log_prob.float() - log_prob_old.detach().float()
    if mean_old is None:
        raise ValueError("guard_log_ratio: algorithm.grpo_guard.ratio_norm needs the rollout's transition means "
                         "(FlowAlgorithm.keeps_means)")
    return ratio_norm_log_ratio(log_prob, log_prob_old, mean, mean_old, std)


def step_weights(delta: Tensor, kind: str) -> Tensor:
    """``[N]`` the per-edge gradient weights ``δ_t``: ``1/Δt`` (``inverse_dt``, GRPO-Guard's reweighting) or 1.

    Args:
        delta: ``[N]`` each edge's sigma step ``Δt = σ_t − σ_{t+1} > 0``.
        kind: one of :data:`GRAD_REWEIGHTS`.
    """
    if kind == "none":
        return torch.ones_like(delta, dtype=torch.float32)
    if kind == "inverse_dt":
        return 1.0 / delta.detach().float()
    raise ValueError(f"algorithm.grpo_guard.grad_reweight must be one of {' | '.join(GRAD_REWEIGHTS)}, got {kind!r}")


@register_algorithm
class GRPOGuard(FlowAlgorithm):
    name = "grpo_guard"
    summary = "Flow-GRPO with RatioNorm (mean-corrected, noise-scaled log-ratio) and 1/dt gradient reweighting"
    paper = "Wang et al. 2025, GRPO-Guard, arXiv:2510.22319"
    Config = GRPOGuardConfig
    config_file = "configs/grpo_guard/quickstart.yaml"

    @property
    def keeps_means(self) -> bool:
        """RatioNorm needs the rollout's transition means ``μ_old``."""
        return bool(self.opts.ratio_norm)

    def edge_loss(self, log_prob: Tensor, log_prob_old: Tensor, advantages: Tensor, *, weights: Tensor | None,
                  kl: Tensor | None, mean: Tensor, mean_old: Tensor | None, std: Tensor, delta: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`~flowalign.losses.ppo.step_weighted_ppo_clip_loss` on :func:`guard_log_ratio`; with both fixes
        off, GRPO's own loss."""
        o, a = self.opts, self.cfg.algorithm
        if not o.ratio_norm and o.grad_reweight == "none":
            return super().edge_loss(log_prob, log_prob_old, advantages, weights=weights, kl=kl, mean=mean,
                                     mean_old=mean_old, std=std, delta=delta)
        log_ratio = guard_log_ratio(log_prob, log_prob_old, mean, mean_old, std, ratio_norm=o.ratio_norm)
        return step_weighted_ppo_clip_loss(log_ratio, advantages, step_weights(delta, o.grad_reweight),
                                           clip_range=a.clip_range, weights=weights, kl=kl, kl_beta=a.kl_beta)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        o = cfg.algorithm.grpo_guard
        _require(isinstance(o.ratio_norm, bool), "algorithm.grpo_guard.ratio_norm",
                 f"must be true or false, got {o.ratio_norm!r}")
        if o.ratio_norm:
            _require_gaussian_log_probs(cfg, "algorithm.grpo_guard.ratio_norm")
