"""Advantage Weighted Matching (AWM): the pretraining flow-matching loss weighted by advantages.

Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models"
(arXiv:2509.25050). Instead of PPO on per-step likelihood ratios of a sampling SDE, AWM re-noises
each sampled final ``x0`` with the *forward* process at a fresh time ``σ`` and fresh noise ``ε``,

    x_σ = (1 − σ)·x0 + σ·ε,      target  u = ε − x0                     (rectified-flow path)

and minimises the pretraining (conditional flow-matching) loss, weighted per sample by the
sample's group-relative advantage ``A`` (the AWM objective of the paper, §3):

    L_AWM(θ) = E_{c, x0 ~ π_old(·|c), σ, ε} [ A(x0, c) · ‖v_θ(x_σ, σ, c) − (ε − x0)‖² ]

so samples better than their group mean are pulled closer (their matching error goes down) and
worse ones pushed away; with ``A ≡ 1`` it *is* the pretraining loss. The paper shows this is
the DDPO policy gradient with the score-matching (lower-variance) estimator in place of the
per-step likelihood. The optional regulariser toward a reference policy lives in velocity
space, ``β·‖v_θ(x_σ) − v_ref(x_σ)‖²`` (the "v-based" KL of the reference implementations: for
two Gaussian reverse kernels sharing a variance, their KL is proportional to the squared
distance of the means, i.e. of the velocities).

Like the samplers' log-prob convention, squared norms are *averaged* over latent dims.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowalign.guards import assert_finite

__all__ = ["awm_loss", "flow_matching_pair"]


def flow_matching_pair(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """The forward (re-noising) process of rectified flow and its velocity target.

    ``x_σ = (1 − σ)·x0 + σ·ε`` and ``u = ε − x0`` (the flow convention of docs/ARCHITECTURE.md, Liu et al.
    2023 / Lipman et al. 2023 with the linear path; AWM §3 trains on exactly this pair).

    Args:
        x0: ``[N, *D]`` clean samples (the sampled finals).
        noise: ``[N, *D]`` standard normal noise ``ε``.
        sigma: ``[N]`` times in ``[0, 1]`` (1 = pure noise).

    Returns:
        ``(x_sigma, target)``, both ``[N, *D]`` in ``x0``'s dtype.

    Raises:
        ValueError: shapes disagree or a ``sigma`` lies outside ``[0, 1]``.
    """
    if not all(isinstance(t, Tensor) for t in (x0, noise, sigma)):
        raise TypeError("flow_matching_pair: x0, noise and sigma must be torch.Tensors")
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"flow_matching_pair: x0 must be [N, ...] with N >= 1, got shape {tuple(x0.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"flow_matching_pair: noise has shape {tuple(noise.shape)}, expected x0's {tuple(x0.shape)}")
    if tuple(sigma.shape) != (x0.shape[0],):
        raise ValueError(f"flow_matching_pair: sigma must have shape [{x0.shape[0]}], got {tuple(sigma.shape)}")
    if not bool(((sigma >= 0) & (sigma <= 1)).all()):
        raise ValueError(f"flow_matching_pair: sigma must lie in [0, 1], got min {float(sigma.min())}, max {float(sigma.max())}")
    s = sigma.to(device=x0.device, dtype=x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def _per_sample_sq(a: Tensor, b: Tensor) -> Tensor:
    """``[N]`` mean over latent dims of ``(a − b)²`` in float32."""
    return (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).mean(dim=1)


def _weighted_mean(x: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return x.mean()
    return (weights * x).sum() / weights.sum()


def _check_values(target: Tensor, advantages: Tensor, weights: Tensor | None, v_ref: Tensor | None) -> None:
    """Finite inputs, and weights >= 0 with a positive sum (host syncs: the public boundary only)."""
    assert_finite(target, "target")
    assert_finite(advantages, "advantages")
    if weights is not None:
        assert_finite(weights, "weights")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError(f"awm_loss: weights must be >= 0 with a positive sum, got min {float(weights.min())}, "
                             f"sum {float(weights.sum())}")
    if v_ref is not None:
        assert_finite(v_ref, "v_ref")


def awm_loss(
    v_pred: Tensor,
    target: Tensor,
    advantages: Tensor,
    *,
    v_ref: Tensor | None = None,
    kl_beta: float = 0.0,
    weights: Tensor | None = None,
    check: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The AWM loss over ``N`` re-noised samples, plus an optional velocity-space KL.

    ``ℓ_i = mean_d (v_pred_i − target_i)²`` (the per-sample flow-matching error);
    ``policy = Σ w_i·A_i·ℓ_i / Σ w_i`` (plain mean without weights; AWM objective, §3);
    ``kl = Σ w_i·mean_d (v_pred_i − v_ref_i)² / Σ w_i``; ``loss = policy + kl_beta·kl``.
    With every ``A_i = 1`` and no KL this equals ``F.mse_loss(v_pred, target)``.

    ``target``, ``advantages``, ``v_ref`` and ``weights`` are data: they are detached. The math
    runs in float32 whatever the input dtype.

    Args:
        v_pred: ``[N, *D]`` the policy's velocity at ``x_σ`` (gradients flow through it).
        target: ``[N, *D]`` the flow-matching target ``ε − x0``.
        advantages: ``[N]`` per-sample advantages (group-relative, any sign).
        v_ref: optional ``[N, *D]`` the reference policy's velocity at the same ``x_σ``;
            required when ``kl_beta > 0``.
        kl_beta: β >= 0, weight of the velocity-space KL.
        weights: optional ``[N]`` non-negative per-sample weights with a positive sum.
        check: check the values (finite inputs and loss, weights): host syncs, for the public
            boundary. ``False`` (the recipe's hot path, whose inputs were checked once) checks
            shapes and arguments only and makes no host sync.

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss and 0-dim float32 tensors ``loss``, ``policy_loss``,
        ``kl`` (0.0 without ``v_ref``), ``fm_loss`` (unweighted mean of ``ℓ``: the plain
        pretraining loss on these samples), ``fm_loss_pos`` / ``fm_loss_neg`` (mean ``ℓ`` over
        samples with positive / negative advantage; 0.0 when there are none).

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: shapes disagree, ``kl_beta`` or ``weights`` are invalid, or ``kl_beta > 0``
            without ``v_ref``.
        FloatingPointError: an input or the loss is NaN/Inf (``check=True``).
    """
    named = {"v_pred": v_pred, "target": target, "advantages": advantages}
    if v_ref is not None:
        named["v_ref"] = v_ref
    if weights is not None:
        named["weights"] = weights
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"awm_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if v_pred.dim() < 1 or v_pred.shape[0] == 0:
        raise ValueError(f"awm_loss: v_pred must be [N, ...] with N >= 1, got shape {tuple(v_pred.shape)}")
    n = v_pred.shape[0]
    for name in ("target", "v_ref"):
        if name in named and named[name].shape != v_pred.shape:
            raise ValueError(f"awm_loss: {name} has shape {tuple(named[name].shape)}, expected v_pred's {tuple(v_pred.shape)}")
    for name in ("advantages", "weights"):
        if name in named and tuple(named[name].shape) != (n,):
            raise ValueError(f"awm_loss: {name} must have shape [{n}], got {tuple(named[name].shape)}")
    if isinstance(kl_beta, bool) or not isinstance(kl_beta, (int, float)) or not (math.isfinite(kl_beta) and kl_beta >= 0):
        raise ValueError(f"awm_loss: kl_beta must be a finite number >= 0, got {kl_beta!r}")
    if kl_beta > 0 and v_ref is None:
        raise ValueError(f"awm_loss: kl_beta={kl_beta} > 0 needs the reference velocity `v_ref`")

    device = v_pred.device
    tgt, adv = target.detach().to(device), advantages.detach().to(device=device, dtype=torch.float32)
    w = weights.detach().to(device=device, dtype=torch.float32) if weights is not None else None
    ref = v_ref.detach().to(device) if v_ref is not None else None
    if check:
        _check_values(tgt, adv, w, ref)

    fm = _per_sample_sq(v_pred, tgt)  # [N] ℓ_i
    policy_loss = _weighted_mean(adv * fm, w)
    loss = policy_loss
    kl_mean = None
    if ref is not None:
        kl_mean = _weighted_mean(_per_sample_sq(v_pred, ref), w)
        if kl_beta > 0:
            loss = loss + kl_beta * kl_mean
    if check:
        assert_finite(loss, "loss")

    with torch.no_grad():
        pos, neg = (adv > 0).float(), (adv < 0).float()
        zero = torch.zeros((), dtype=torch.float32, device=device)
        metrics = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "kl": kl_mean.detach() if kl_mean is not None else zero,
            "fm_loss": fm.mean(),
            "fm_loss_pos": (fm * pos).sum() / pos.sum().clamp_min(1.0),  # 0 without a positive advantage
            "fm_loss_neg": (fm * neg).sum() / neg.sum().clamp_min(1.0),
        }
    return loss, metrics
