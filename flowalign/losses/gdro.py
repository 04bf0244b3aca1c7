"""GDRO: group-level direct reward optimization with an implicit reward (no sampler log-probs).

Wang et al. 2026, "GDRO: Group-level Reward Post-training Suitable for Diffusion Models" (arXiv:2601.02036,
CVPR 2026). No public code was found; the paper's full equations were not at hand, so this module follows its
published description (abstract and §3 summaries): a DPO-style *implicit reward* computed from the model's
prediction at an arbitrary diffusion time (which makes the method sampler-independent and usable offline),
aligned group-wise to the explicit rewards of the group, "grounded in cross-entropy alignment and the
Plackett-Luce ranking model". The exact forms below are ours where the paper's equations were unavailable
(docs/FIDELITY.md, "GDRO").

Implicit reward of a sample ``x0`` re-noised at time ``σ`` with noise ``ε`` (Diffusion-DPO, Wallace et al. 2024,
arXiv:2311.12908, Eq. 14, written for the rectified-flow velocity ``u = ε − x0`` as in flowalign.losses.awm):

    r̂_θ(x0) = −β · ( mean_d (v_θ(x_σ, σ) − u)² − mean_d (v_ref(x_σ, σ) − u)² )        (averaged over the times drawn)

i.e. ``β`` times the gain of the flow-matching log-likelihood over the reference, ``β log π_θ/π_ref`` up to
constants. Over a group ``i = 1..G`` of one prompt:

* ``cross_entropy`` (ours, the "cross-entropy alignment" reading): the optimum of the KL-regularised objective
  gives each member probability ``softmax(r)`` within its group, so the group distribution of the implicit
  rewards is fitted to that of the explicit ones:
  ``L = − Σ_i softmax(A / τ)_i · log softmax(r̂)_i``;
* ``plackett_luce`` (the Plackett-Luce ranking model, as in DPO's ranking generalisation, Rafailov et al. 2023,
  arXiv:2305.18290, Eq. 18): with ``σ`` the members sorted by explicit reward, best first,
  ``L = − Σ_{k=1}^{G−1} ( r̂_σ(k) − log Σ_{j ≥ k} exp r̂_σ(j) )``.

Squared norms are averaged over latent dims (the references' ``.mean(dim=1..)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GDRO_OBJECTIVES", "gdro_objective", "group_cross_entropy_loss", "implicit_reward", "plackett_luce_loss"]

#: the group objectives of algorithm.gdro.objective
GDRO_OBJECTIVES = ("cross_entropy", "plackett_luce")


def implicit_reward(v: Tensor, v_ref: Tensor, target: Tensor, beta: float) -> Tensor:
    """``[N]`` the implicit reward of each row, ``−β·(mean_d (v − u)² − mean_d (v_ref − u)²)`` (Diffusion-DPO
    Eq. 14 in velocity form; module docstring).

    Args:
        v: ``[N, *D]`` the trained model's velocity at the re-noised rows (with gradient).
        v_ref: ``[N, *D]`` the reference model's velocity at the same rows.
        target: ``[N, *D]`` the flow-matching target ``u = ε − x0``.
        beta: ``β > 0``, the scale of the implicit reward.

    Raises:
        ValueError: shapes disagree or ``beta`` is not positive.
    """
    if v.shape != v_ref.shape or v.shape != target.shape:
        raise ValueError(f"implicit_reward: v {tuple(v.shape)}, v_ref {tuple(v_ref.shape)} and target "
                         f"{tuple(target.shape)} must have one shape")
    if not beta > 0:
        raise ValueError(f"implicit_reward: beta must be > 0 (algorithm.gdro.beta), got {beta}")
    mse = (v.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    mse_ref = (v_ref.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return -beta * (mse - mse_ref.detach())


def _check_groups(implicit: Tensor, explicit: Tensor, name: str) -> None:
    if implicit.dim() != 2 or implicit.shape != explicit.shape or implicit.shape[1] < 2:
        raise ValueError(f"{name}: implicit and explicit rewards must both be [P, G] with G >= 2, got "
                         f"{tuple(implicit.shape)} and {tuple(explicit.shape)}")


def group_cross_entropy_loss(implicit: Tensor, explicit: Tensor, temperature: float = 1.0) -> Tensor:
    """0-dim ``mean_groups − Σ_i softmax(A/τ)_i · log softmax(r̂)_i`` (module docstring; ours).

    Args:
        implicit: ``[P, G]`` implicit rewards ``r̂`` of each group's members (with gradient).
        explicit: ``[P, G]`` explicit rewards (or group-relative advantages) ``A``; no gradient.
        temperature: ``τ > 0`` of the target distribution.
    """
    _check_groups(implicit, explicit, "group_cross_entropy_loss")
    if not temperature > 0:
        raise ValueError(f"group_cross_entropy_loss: temperature must be > 0 (algorithm.gdro.temperature), got {temperature}")
    target = torch.softmax(explicit.detach().float() / temperature, dim=1)
    return -(target * torch.log_softmax(implicit.float(), dim=1)).sum(dim=1).mean()


def plackett_luce_loss(implicit: Tensor, explicit: Tensor) -> Tensor:
    """0-dim ``mean_groups − Σ_{k<G} ( r̂_σ(k) − logsumexp_{j≥k} r̂_σ(j) )``, ``σ`` the members sorted by
    explicit reward, best first (DPO's Plackett-Luce objective, Rafailov et al. 2023, Eq. 18; ties keep
    the members' order: a stable sort, ours).

    Args:
        implicit: ``[P, G]`` implicit rewards (with gradient).
        explicit: ``[P, G]`` explicit rewards whose order ranks each group.
    """
    _check_groups(implicit, explicit, "plackett_luce_loss")
    order = torch.sort(explicit.detach().float(), dim=1, descending=True, stable=True).indices
    ranked = implicit.float().gather(1, order.to(implicit.device))
    # suffix log-sum-exp: tail[:, k] = log Σ_{j ≥ k} exp ranked[:, j]
    tail = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    return -(ranked - tail)[:, :-1].sum(dim=1).mean()


def gdro_objective(objective: str, implicit: Tensor, explicit: Tensor, temperature: float) -> Tensor:
    """The group loss ``objective`` (one of :data:`GDRO_OBJECTIVES`) of ``[P, G]`` rewards (0-dim; not checked
    here: the recipe's optimizer step refuses a non-finite loss in its single host sync)."""
    if objective == "cross_entropy":
        return group_cross_entropy_loss(implicit, explicit, temperature)
    if objective == "plackett_luce":
        return plackett_luce_loss(implicit, explicit)
    raise ValueError(f"gdro_objective: unknown objective {objective!r} (algorithm.gdro.objective); choose from {GDRO_OBJECTIVES}")
