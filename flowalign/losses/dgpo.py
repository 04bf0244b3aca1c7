"""DGPO: Direct Group Preference Optimization on the forward process (no sampler log-probs).

Luo et al. 2025, "Reinforcing Diffusion Models by Direct Group Preference Optimization" (arXiv:2510.08425).
Reference code: Luo-Yihong/DGPO @ 01ceb4b, ``scripts/train_sd3_dgpo.py`` (cited by line below).

A group of ``G`` samples of one prompt is split by the sign of its advantages into a positive and a
negative subgroup, each sample weighted by ``|A_i|``; the group-level Bradley-Terry preference of the
positive over the negative subgroup, with Diffusion-DPO's implicit reward (the flow-matching error of
the policy against a reference's, ``Δ_i = ℓ_θ(x_i) − ℓ_ref(x_i)``, ``ℓ = mean_d (v − (ε − x0))²`` at
one re-noising ``x_t = (1 − t)·x0 + t·ε``), gives the per-group loss

    s_g = β/G · Σ_{i∈g} A_i · Δ_i          L_g = −log σ(−s_g) = softplus(s_g)

(``Σ A_i Δ_i = Σ_{A>0} |A|Δ − Σ_{A<0} |A|Δ``: a lower error than the reference on the positive
subgroup and a higher one on the negative lowers the loss). Its gradient is
``σ(s_g)·β/G·Σ A_i ∇ℓ_θ(x_i)``; the reference trains the surrogate with that gradient up to a constant
(lines 162-191, ``compute_group_dgpo_loss_allreduce``):

    L = mean_rows [ sg(σ(s_g)) · A_i · ℓ_θ(x_i) ]          (= G/(β·N) · Σ_g L_g in gradient)

Rows are (sample, time) pairs; ``s_g`` sums over a group's rows at one time, which share the
re-noising noise (lines 1102-1106, ``use_shared_noise``). PPO-style clipping (lines 1133-1144,
``clip_dsm``): with ``r_i = exp(ℓ_old(x_i) − ℓ_θ(x_i))`` (``ℓ_old`` under a slowly updated EMA copy of
the policy), a row with ``A > 0`` and ``r > 1 + ε`` or ``A ≤ 0`` and ``r < 1 − ε`` keeps its value but
gets no gradient. A velocity KL to the reference, ``β_KL · mean_rows mean_d (v_θ − v_ref)²`` (line 1151),
is added.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dgpo_clip_mask", "dgpo_loss", "flow_matching_error", "group_preference_weights"]


def flow_matching_error(v: Tensor, target: Tensor) -> Tensor:
    """``[N]`` ``ℓ = mean_d (v − target)²`` per row (the reference's ``dsm_loss``, line 1132)."""
    return (v.float() - target.float()).pow(2).reshape(v.shape[0], -1).mean(dim=1)


def group_preference_weights(advantages: Tensor, error: Tensor, error_ref: Tensor, group: Tensor, *, beta_dpo: float,
                             group_size: int) -> Tensor:
    """``[N]`` detached ``σ(s_g)`` of each row's group, ``s_g = β/G · Σ_{i∈g} A_i (ℓ_i − ℓ_ref,i)`` (lines 175-189).

    Args:
        advantages: ``[N]`` clipped group-relative advantages ``A_i``.
        error, error_ref: ``[N]`` flow-matching errors of the policy and the reference (detached here).
        group: ``[N]`` long, the group of each row (one id per prompt and training time).
        beta_dpo: ``β > 0`` (the reference's ``train.beta_dpo``, 100).
        group_size: ``G``, the divisor (the reference's ``sample.num_image_per_prompt``).
    """
    term = advantages.detach().float() * beta_dpo * (error.detach().float() - error_ref.detach().float()) / group_size
    _, inverse = torch.unique(group, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=term.dtype, device=term.device)
    sums.scatter_add_(0, inverse.to(term.device), term)
    return torch.sigmoid(sums)[inverse.to(term.device)]


def dgpo_clip_mask(advantages: Tensor, error: Tensor, error_old: Tensor, clip_range: float) -> Tensor:
    """``[N]`` bool, the rows whose error gets no gradient (lines 1136-1142): ``r = exp(ℓ_old − ℓ)``,
    ``A > 0`` and ``r > 1 + ε``, or ``A ≤ 0`` and ``r < 1 − ε``."""
    ratio = torch.exp(error_old.detach().float() - error.detach().float())
    return torch.where(advantages > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)


def dgpo_loss(v: Tensor, target: Tensor, v_ref: Tensor, advantages: Tensor, group: Tensor, *, beta_dpo: float,
              group_size: int, v_old: Tensor | None = None, clip_range: float | None = None, kl_beta: float = 0.0
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The DGPO loss of ``N`` re-noised rows (module docstring; train_sd3_dgpo.py lines 1120-1158).

    Args:
        v: ``[N, *D]`` the policy's velocity at ``x_t`` (with gradient); target: ``[N, *D]`` ``ε − x0``.
        v_ref: ``[N, *D]`` the reference policy's velocity (base weights; detached).
        advantages: ``[N]`` each row's sample's clipped advantage; group: ``[N]`` long group ids.
        beta_dpo, group_size: see :func:`group_preference_weights`.
        v_old: ``[N, *D]`` the EMA copy's velocity, needed with ``clip_range``.
        clip_range: ``ε`` of the PPO-style clip, or ``None`` (no clipping).
        kl_beta: weight of the velocity KL to the reference (the reference's ``train.beta``).

    Returns:
        ``(loss, metrics)``: a 0-dim loss; 0-dim detached ``loss``, ``policy_loss``, ``fm_error`` (mean ``ℓ``),
        ``fm_error_ref``, ``group_weight`` (mean ``σ(s_g)``), ``clip_frac`` and ``kl``.
    """
    if not beta_dpo > 0 or group_size < 1:
        raise ValueError(f"dgpo_loss: beta_dpo must be > 0 and group_size >= 1 (algorithm.dgpo), got {beta_dpo}, {group_size}")
    n = v.shape[0]
    if target.shape != v.shape or v_ref.shape != v.shape or (v_old is not None and v_old.shape != v.shape):
        raise ValueError(f"dgpo_loss: v {tuple(v.shape)}, target {tuple(target.shape)}, v_ref {tuple(v_ref.shape)} "
                         f"and v_old must have one shape")
    if tuple(advantages.shape) != (n,) or tuple(group.shape) != (n,):
        raise ValueError(f"dgpo_loss: advantages {tuple(advantages.shape)} and group {tuple(group.shape)} must be [{n}]")
    adv = advantages.detach().to(v.device).float()
    error = flow_matching_error(v, target)
    with torch.no_grad():
        error_ref = flow_matching_error(v_ref, target)
    clipped = torch.zeros(n, dtype=torch.bool, device=v.device)
    if clip_range is not None:
        if v_old is None:
            raise ValueError("dgpo_loss: clip_range needs v_old, the EMA copy's velocity (algorithm.dgpo.clip_range)")
        with torch.no_grad():
            clipped = dgpo_clip_mask(adv, error, flow_matching_error(v_old, target), clip_range)
        error = torch.where(clipped, error.detach(), error)
    weight = group_preference_weights(adv, error, error_ref, group.to(v.device), beta_dpo=beta_dpo, group_size=group_size)
    policy = (weight * adv * error).mean()  # line 191
    kl = (v.float() - v_ref.detach().float()).pow(2).reshape(n, -1).mean(dim=1).mean()  # line 1151
    loss = policy + kl_beta * kl if kl_beta > 0 else policy
    metrics = {"loss": loss.detach(), "policy_loss": policy.detach(), "fm_error": error.detach().mean(),
               "fm_error_ref": error_ref.mean(), "group_weight": weight.mean(), "clip_frac": clipped.float().mean(),
               "kl": kl.detach()}
    return loss, metrics

