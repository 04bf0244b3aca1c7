"""SAGE-GRPO's manifold-aware SDE step (Zheng et al. 2026, "Manifold-Aware Exploration for Reinforcement
Learning in Video Generation", arXiv:2603.21872, §3.2.1 "micro level"; authors' code
Tencent-Hunyuan/SAGE-GRPO @ c868869, ``hyvideo/schedulers/scheduling_flow_match_discrete.py``,
``sde_step_with_logprob``, branch ``sde_type == "sage_grpo"``).

Flow convention of :mod:`flowalign.samplers.steps`: ``x_s = (1 - s) x0 + s eps``, velocity ``v = eps - x0``,
one step goes ``sigma -> sigma_next < sigma`` with ``delta = sigma - sigma_next``.

Derivation. Flow-GRPO's reverse-time SDE (Liu et al. 2025, Eq. 9) has the diffusion coefficient
``g(s)^2 = eta^2 s / (1 - s)`` and the drift ``v - g(s)^2 / 2 * score``, ``score(x, s) = -(x + (1 - s) v) / s``.
Flow-GRPO's Euler-Maruyama step injects the variance ``g(sigma)^2 * delta``: the integrand at the step's
noisy end, an over-estimate because ``s / (1 - s)`` grows with ``s`` (most at high noise). SAGE-GRPO
integrates the diffusion over the step instead:

    var = int_{sigma_next}^{sigma} eta^2 s / (1 - s) ds = eta^2 [log((1 - sigma_next) / (1 - sigma)) - delta]

(the "logarithmic curvature correction" ``log((1 - sigma_next) / (1 - sigma))``), and uses that variance in
the score correction of the mean as well:

    mean = x - delta * v + var / 2 * score(x, sigma) = x - delta * v - var / (2 sigma) * (x + (1 - sigma) v)

i.e. Flow-GRPO's mean with ``g(sigma)^2 delta`` replaced by ``var``. The transition is ``N(mean, var I)``.
At ``sigma = 1`` the log diverges; as the authors' code, ``sigma`` is clamped to ``1 - 3e-3`` inside the
log only (:data:`SIGMA_CLAMP`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SIGMA_CLAMP", "sage_mean", "sage_variance"]

#: the authors' clamp of ``sigma`` inside the log (``torch.clamp(sigma, max=1 - 3e-3)``)
SIGMA_CLAMP = 1.0 - 3e-3


def sage_variance(sigma: Tensor, sigma_next: Tensor, eta: Tensor) -> Tensor:
    """Exact integrated variance of one SAGE SDE step.

    ``var = eta^2 * (log((1 - sigma_next) / (1 - min(sigma, 1 - 3e-3))) - (sigma - sigma_next))``
    (arXiv:2603.21872 §3.2.1; authors' ``std_dev_t_sq``). Clamped at 0 from below: a step entirely
    inside ``(1 - 3e-3, 1]`` (where the clamp makes the integral negative) is deterministic.

    Args:
        sigma, sigma_next: ``[B]`` fp32, ``0 <= sigma_next < sigma <= 1``.
        eta: ``[B]`` fp32 noise level ``>= 0`` (``sampling.noise_level``).

    Returns:
        ``[B]`` fp32 transition variance ``>= 0``.
    """
    s_clamped = sigma.clamp(max=SIGMA_CLAMP)
    log_term = torch.log((1 - sigma_next) / (1 - s_clamped))  # logarithmic curvature correction
    return (eta**2 * (log_term - (sigma - sigma_next))).clamp_min(0)


def sage_mean(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, var: Tensor) -> Tensor:
    """Transition mean of one SAGE SDE step: ``x - delta v - var / (2 sigma) (x + (1 - sigma) v)``.

    The authors' ``prev_sample_mean = sample + dt * v + 0.5 * std_dev_t_sq * score_estimate`` with
    ``score_estimate = -(x - x0_hat (1 - sigma)) / sigma^2``, ``x0_hat = x - sigma v`` (``sde_solver=True``,
    which both their rollout and their update use), simplified.

    Args:
        x, v: ``[B, *latent]`` fp32 current latent and velocity.
        sigma, sigma_next: ``[B]`` fp32 (``sigma > 0``).
        var: ``[B]`` fp32 the step's variance (:func:`sage_variance`).

    Returns:
        ``[B, *latent]`` fp32 mean.
    """
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    s, d, w = sigma.reshape(shape), (sigma - sigma_next).reshape(shape), var.reshape(shape)
    return x - d * v - w / (2 * s) * (x + (1 - s) * v)
