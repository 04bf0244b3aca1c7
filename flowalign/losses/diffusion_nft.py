"""DiffusionNFT: negative-aware fine-tuning on the forward process (no sampler log-probs).

Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv:2509.16117).
Reference code: NVlabs/DiffusionNFT @ 24af555, ``scripts/train_nft_sd3.py`` (cited by line below).

Each sampled final ``x0`` is re-noised with the forward process ``x_t = (1 − t)·x0 + t·ε`` and trained
with a flow-matching loss on two *implicit* policies built from the trained velocity ``v_θ`` and the
old (sampling) policy's ``v_old`` (paper Eq. 7; train_nft_sd3.py lines 934-937):

    v⁺ = β·v_θ + (1 − β)·v_old          (positive policy)
    v⁻ = (1 + β)·v_old − β·v_θ          (implicit negative policy)

weighted by the sample's optimality probability ``r ∈ [0, 1]`` (lines 909-929):

    r = clip(clip(A, ±c) / c / 2 + 1/2, 0, 1)        c = adv_clip_max

The reference measures both in x0 space with an adaptive (self-normalised) weight (lines 939-957):

    x̂0± = x_t − t·v±,   ℓ± = mean_d (x̂0± − x0)² / sg(max(mean_d |x̂0± − x0|, 1e-5))

    L = c · mean_rows [ r·ℓ⁺ / β + (1 − r)·ℓ⁻ / β ]  +  β_KL · mean_rows mean_d (v_θ − v_ref)²   (lines 959-970)

Squared norms are averaged over latent dims, as the reference's ``.mean(dim=1..)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowalign.guards import assert_finite

__all__ = ["adaptive_x0_loss", "nft_loss", "old_policy_decay", "optimality_probability", "OLD_DECAYS"]

#: the old policy's soft-update schedules (train_nft_sd3.py ``return_decay``, lines 169-189: decay_type 0 / 1 / 2)
OLD_DECAYS = ("none", "ramp", "delayed")
#: lower clip of the adaptive weight (train_nft_sd3.py lines 945, 953)
_WEIGHT_MIN = 1e-5


def optimality_probability(advantages: Tensor, adv_clip: float) -> Tensor:
    """``[N]`` ``r = clip(clip(A, ±c)/c/2 + 1/2, 0, 1)`` (train_nft_sd3.py lines 910-914, 928-929; adv_mode 'all').

    Args:
        advantages: ``[N]`` group-relative advantages.
        adv_clip: ``c > 0`` (the reference's ``train.adv_clip_max``, 5).
    """
    if not adv_clip > 0:
        raise ValueError(f"optimality_probability: adv_clip must be > 0 (algorithm.adv_clip), got {adv_clip}")
    a = advantages.float().clamp(-adv_clip, adv_clip)
    return (a / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


def adaptive_x0_loss(v: Tensor, x_t: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """``[N]`` the reference's adaptively weighted x0-space error of a velocity (train_nft_sd3.py lines 939-957).

    ``x̂0 = x_t − σ·v`` (the flow convention ``x_t = (1 − σ)·x0 + σ·ε``, ``v = ε − x0``);
    ``ℓ = mean_d (x̂0 − x0)² / sg(max(mean_d |x̂0 − x0|, 1e-5))`` (the weight in float64, no gradient).

    Args:
        v: ``[N, *D]`` velocity; x_t, x0: ``[N, *D]``; sigma: ``[N]`` times.
    """
    s = sigma.to(device=v.device, dtype=torch.float32).view(-1, *([1] * (v.dim() - 1)))
    err = x_t.float() - s * v.float() - x0.float()
    dims = tuple(range(1, v.dim()))
    with torch.no_grad():
        weight = err.double().abs().mean(dim=dims).clamp_min(_WEIGHT_MIN).float()
    return err.pow(2).mean(dim=dims) / weight


def nft_loss(v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, sigma: Tensor, r: Tensor, *, beta: float,
             adv_clip: float, v_ref: Tensor | None = None, kl_beta: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The DiffusionNFT loss of ``N`` re-noised rows (module docstring; train_nft_sd3.py lines 934-970).

    Args:
        v: ``[N, *D]`` the trained velocity ``v_θ(x_t, t, c)`` (with gradient).
        v_old: ``[N, *D]`` the old policy's velocity at the same inputs (detached here).
        x_t: ``[N, *D]`` the noised rows; x0: ``[N, *D]`` their finals; sigma: ``[N]`` their times.
        r: ``[N]`` optimality probabilities (:func:`optimality_probability`).
        beta: the implicit-policy mixing ``β > 0`` (the reference's ``config.beta``).
        adv_clip: ``c``, the loss scale of the reference (``policy_loss = ori_policy_loss · adv_clip_max``).
        v_ref: ``[N, *D]`` the reference policy's velocity, or ``None`` (no KL).
        kl_beta: weight of the velocity KL (the reference's ``train.beta``).

    Returns:
        ``(loss, metrics)``: a 0-dim loss; 0-dim detached metrics ``loss``, ``policy_loss``, ``positive_loss``,
        ``negative_loss``, ``old_deviate`` (mean squared ``v_θ − v_old``) and, with ``v_ref``, ``kl``.
    """
    if not beta > 0:
        raise ValueError(f"nft_loss: beta must be > 0 (algorithm.diffusion_nft.beta), got {beta}")
    if v.shape != v_old.shape or v.shape != x_t.shape or v.shape != x0.shape:
        raise ValueError(f"nft_loss: v {tuple(v.shape)}, v_old {tuple(v_old.shape)}, x_t {tuple(x_t.shape)} and "
                         f"x0 {tuple(x0.shape)} must have one shape")
    if tuple(r.shape) != (v.shape[0],) or tuple(sigma.shape) != (v.shape[0],):
        raise ValueError(f"nft_loss: r {tuple(r.shape)} and sigma {tuple(sigma.shape)} must be [{v.shape[0]}]")
    assert_finite(r, "r")
    vf, vo = v.float(), v_old.detach().float()
    v_pos = beta * vf + (1 - beta) * vo  # line 934
    v_neg = (1.0 + beta) * vo - beta * vf  # lines 935-937
    pos = adaptive_x0_loss(v_pos, x_t, x0, sigma)
    neg = adaptive_x0_loss(v_neg, x_t, x0, sigma)
    r = r.to(pos.device).float()
    policy = ((r * pos / beta + (1.0 - r) * neg / beta) * adv_clip).mean()  # lines 959-960
    dims = tuple(range(1, v.dim()))
    metrics = {"policy_loss": policy.detach(), "positive_loss": pos.mean().detach(), "negative_loss": neg.mean().detach(),
               "old_deviate": (vf - vo).pow(2).mean().detach()}
    loss = policy
    if v_ref is not None:
        kl = (vf - v_ref.detach().float()).pow(2).mean(dim=dims).mean()  # lines 966-970
        loss = loss + kl_beta * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def old_policy_decay(kind: str, optimizer_steps: int) -> float:
    """Decay ``d`` of the old policy's soft update ``θ_old ← d·θ_old + (1 − d)·θ`` after ``optimizer_steps``
    (train_nft_sd3.py ``return_decay``, lines 169-189; applied once per epoch, lines 1034-1039):

    * ``none`` (decay_type 0): 0, the old policy is the current one;
    * ``ramp`` (decay_type 1, the default of config/nft.py): ``min(0.001·steps, 0.5)``;
    * ``delayed`` (decay_type 2, the OCR config): 0 before step 75, then ``min(0.0075·(steps − 75), 0.999)``.
    """
    if kind == "none":
        return 0.0
    if kind == "ramp":
        return min(0.001 * optimizer_steps, 0.5)
    if kind == "delayed":
        return 0.0 if optimizer_steps < 75 else min(0.0075 * (optimizer_steps - 75), 0.999)
    raise ValueError(f"algorithm.diffusion_nft.old_decay must be one of {' | '.join(OLD_DECAYS)}, got {kind!r}")
