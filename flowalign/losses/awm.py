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

The reference implementation (scxue/advantage_weighted_matching @ be51372,
``advantage_weighted_matching/scripts/train_sd3_awm.py``) trains a PPO-style objective over this
loss: it calls ``-w(σ, ℓ)`` the sample's flow-matching log-likelihood (``compute_log_prob_awm``,
lines 210-252; ``w`` the time weighting: ``uniform``, ``t``, ``t**2``, ``huber``, ``ghuber``),
takes the ratio ``r = exp(log p − log p_old)`` against the value before the update and minimises
``max(−A·r, −A·clip(r, 1 − ε, 1 + ε))`` (lines 1305-1327, ``loss_type='exp_first'``, ε = 1). At
``r = 1`` its gradient is ``A·∇w(σ, ℓ)``: the advantage-weighted matching gradient above.
:func:`awm_loss` computes either form (``clip_range=None``: the weighted form).

Like the samplers' log-prob convention, squared norms are *averaged* over latent dims.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowalign.guards import assert_finite

__all__ = ["WEIGHTINGS", "awm_log_likelihood", "awm_loss", "flow_matching_pair"]

#: the time weightings of the reference's ``compute_log_prob_awm`` (train_sd3_awm.py lines 240-251)
WEIGHTINGS = ("uniform", "t", "t**2", "huber", "ghuber")
#: the constant the reference adds under the root of ``huber`` / ``ghuber`` (train_sd3_awm.py lines 247, 249)
_ROOT_EPS = 1e-10


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


def awm_log_likelihood(fm_error: Tensor, sigma: Tensor | None, weighting: str = "uniform",
                       ghuber_power: float = 0.25) -> Tensor:
    """The reference's flow-matching log-likelihood ``log p = −w(σ, ℓ)`` of per-row matching errors.

    ``ℓ = mean_d (v − (ε − x0))²`` (``fm_error``) and, as in ``compute_log_prob_awm``
    (scxue/advantage_weighted_matching @ be51372, scripts/train_sd3_awm.py lines 238-251):

    * ``uniform``: ``w = ℓ``;  ``t``: ``w = σ·ℓ``;  ``t**2``: ``w = σ²·ℓ``;
    * ``huber``: ``w = σ·(√(ℓ + 1e-10) − 1e-5)``  (1e-5 = √1e-10, so ``w(ℓ=0) = 0``);
    * ``ghuber`` (power p): ``w = σ·((ℓ + 1e-10)^p − (1e-10)^p) / p``; p = 1 is ``t``, p = 1/2
      twice ``huber``; a small p flattens the loss of badly matched samples (robust, as Huber).

    Args:
        fm_error: ``[N]`` per-row matching errors ``ℓ >= 0``.
        sigma: ``[N]`` the rows' times (unused by ``uniform``; required otherwise).
        weighting: one of :data:`WEIGHTINGS`.
        ghuber_power: p of ``ghuber``, > 0.

    Returns:
        ``[N]`` float32 ``log p`` (<= 0).

    Raises:
        ValueError: an unknown weighting, a missing / misshapen ``sigma``, or ``ghuber_power <= 0``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"awm weighting must be one of {' | '.join(WEIGHTINGS)}, got {weighting!r}")
    fm = fm_error.float()
    if weighting == "uniform":
        return -fm
    if sigma is None or tuple(sigma.shape) != tuple(fm.shape):
        raise ValueError(f"awm weighting {weighting!r} needs sigma of shape {tuple(fm.shape)}, got "
                         f"{None if sigma is None else tuple(sigma.shape)}")
    t = sigma.detach().to(device=fm.device, dtype=torch.float32)
    if weighting == "t":
        return -fm * t
    if weighting == "t**2":
        return -fm * t * t
    if weighting == "huber":
        return -(torch.sqrt(fm + _ROOT_EPS) - math.sqrt(_ROOT_EPS)) * t
    p = ghuber_power
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
        raise ValueError(f"awm ghuber_power must be a finite number > 0, got {p!r}")
    return -((fm + _ROOT_EPS).pow(p) - _ROOT_EPS ** p) * t / p


def awm_loss(
    v_pred: Tensor,
    target: Tensor,
    advantages: Tensor,
    *,
    sigma: Tensor | None = None,
    weighting: str = "uniform",
    ghuber_power: float = 0.25,
    clip_range: float | None = None,
    log_prob_old: Tensor | None = None,
    v_ref: Tensor | None = None,
    kl_beta: float = 0.0,
    v_ema: Tensor | None = None,
    ema_kl_beta: float = 0.0,
    weights: Tensor | None = None,
    check: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The AWM loss over ``N`` re-noised rows, plus optional velocity-space KLs.

    ``ℓ_i = mean_d (v_pred_i − target_i)²`` (the per-row flow-matching error) and
    ``log p_i = −w(σ_i, ℓ_i)`` (:func:`awm_log_likelihood`). The policy term is

    * ``clip_range=None`` (weighted form, the paper's AWM objective §3):
      ``policy = Σ w_i·A_i·(−log p_i) / Σ w_i`` -- with ``uniform`` weighting ``Σ w_i·A_i·ℓ_i / Σ w_i``;
    * ``clip_range=ε`` (the reference's PPO form, train_sd3_awm.py lines 1305-1327):
      ``r_i = exp(log p_i − log p_old_i)``, ``policy = Σ w_i·max(−A_i·r_i, −A_i·clip(r_i, 1−ε, 1+ε)) / Σ w_i``;
      ``log_prob_old`` defaults to ``log p`` detached (the reference's on-policy pass, lines
      1282-1284: ``r ≡ 1`` in value, gradient ``A·∇w``).

    ``kl = Σ w_i·mean_d (v_pred_i − v_ref_i)² / Σ w_i`` and ``ema_kl`` the same against ``v_ema``
    (the reference's ``kl_weight`` / ``kl_ema_weight='Uniform'``, lines 1336-1350);
    ``loss = policy + kl_beta·kl + ema_kl_beta·ema_kl``. With every ``A_i = 1``, the weighted form,
    ``uniform`` weighting and no KL this equals ``F.mse_loss(v_pred, target)``.

    ``target``, ``advantages``, ``sigma``, ``log_prob_old``, ``v_ref``, ``v_ema`` and ``weights``
    are data: they are detached. The math runs in float32 whatever the input dtype.

    Args:
        v_pred: ``[N, *D]`` the policy's velocity at ``x_σ`` (gradients flow through it).
        target: ``[N, *D]`` the flow-matching target ``ε − x0``.
        advantages: ``[N]`` per-row advantages (group-relative, any sign).
        sigma: ``[N]`` the rows' times; required by every weighting but ``uniform``.
        weighting: the time weighting, one of :data:`WEIGHTINGS`.
        ghuber_power: p of the ``ghuber`` weighting.
        clip_range: ε > 0 of the ratio form, or ``None`` for the weighted form.
        log_prob_old: optional ``[N]`` ``log p`` before the update, same rows and draws (ratio form only).
        v_ref: optional ``[N, *D]`` the reference policy's velocity at the same ``x_σ``;
            required when ``kl_beta > 0``.
        kl_beta: β >= 0, weight of the velocity-space KL to the reference.
        v_ema: optional ``[N, *D]`` the EMA copy's velocity at the same ``x_σ``; required when
            ``ema_kl_beta > 0``.
        ema_kl_beta: >= 0, weight of the velocity-space KL to the EMA copy.
        weights: optional ``[N]`` non-negative per-row weights with a positive sum.
        check: check the values (finite inputs and loss, weights): host syncs, for the public
            boundary. ``False`` (the recipe's hot path, whose inputs were checked once) checks
            shapes and arguments only and makes no host sync.

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss and 0-dim float32 tensors ``loss``, ``policy_loss``,
        ``kl`` / ``ema_kl`` (0.0 without ``v_ref`` / ``v_ema``), ``fm_loss`` (unweighted mean of
        ``ℓ``: the plain pretraining loss on these rows), ``fm_loss_pos`` / ``fm_loss_neg`` (mean
        ``ℓ`` over rows with positive / negative advantage; 0.0 when there are none),
        ``ratio_mean`` and ``clipfrac`` (fraction of rows with ``|r − 1| > ε``; 1.0 / 0.0 in the
        weighted form).

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: shapes disagree, ``kl_beta``, ``ema_kl_beta``, ``clip_range``, ``weighting`` or
            ``weights`` are invalid, a KL weight is positive without its velocity, or
            ``log_prob_old`` is given without ``clip_range``.
        FloatingPointError: an input or the loss is NaN/Inf (``check=True``).
    """
    named = {"v_pred": v_pred, "target": target, "advantages": advantages}
    for name, t in (("sigma", sigma), ("log_prob_old", log_prob_old), ("v_ref", v_ref), ("v_ema", v_ema), ("weights", weights)):
        if t is not None:
            named[name] = t
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"awm_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if v_pred.dim() < 1 or v_pred.shape[0] == 0:
        raise ValueError(f"awm_loss: v_pred must be [N, ...] with N >= 1, got shape {tuple(v_pred.shape)}")
    n = v_pred.shape[0]
    for name in ("target", "v_ref", "v_ema"):
        if name in named and named[name].shape != v_pred.shape:
            raise ValueError(f"awm_loss: {name} has shape {tuple(named[name].shape)}, expected v_pred's {tuple(v_pred.shape)}")
    for name in ("advantages", "sigma", "log_prob_old", "weights"):
        if name in named and tuple(named[name].shape) != (n,):
            raise ValueError(f"awm_loss: {name} must have shape [{n}], got {tuple(named[name].shape)}")
    for name, beta in (("kl_beta", kl_beta), ("ema_kl_beta", ema_kl_beta)):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"awm_loss: {name} must be a finite number >= 0, got {beta!r}")
    if kl_beta > 0 and v_ref is None:
        raise ValueError(f"awm_loss: kl_beta={kl_beta} > 0 needs the reference velocity `v_ref`")
    if ema_kl_beta > 0 and v_ema is None:
        raise ValueError(f"awm_loss: ema_kl_beta={ema_kl_beta} > 0 needs the EMA copy's velocity `v_ema`")
    if clip_range is not None and (isinstance(clip_range, bool) or not isinstance(clip_range, (int, float))
                                   or not (math.isfinite(clip_range) and clip_range > 0)):
        raise ValueError(f"awm_loss: clip_range must be a finite number > 0 or None, got {clip_range!r}")
    if log_prob_old is not None and clip_range is None:
        raise ValueError("awm_loss: log_prob_old is only used by the ratio form; pass clip_range")

    device = v_pred.device
    tgt, adv = target.detach().to(device), advantages.detach().to(device=device, dtype=torch.float32)
    w = weights.detach().to(device=device, dtype=torch.float32) if weights is not None else None
    ref = v_ref.detach().to(device) if v_ref is not None else None
    ema = v_ema.detach().to(device) if v_ema is not None else None
    old = log_prob_old.detach().to(device=device, dtype=torch.float32) if log_prob_old is not None else None
    if check:
        _check_values(tgt, adv, w, ref)
        for name, t in (("v_ema", ema), ("log_prob_old", old), ("sigma", sigma)):
            if t is not None:
                assert_finite(t, name)

    fm = _per_sample_sq(v_pred, tgt)  # [N] ℓ_i
    log_p = awm_log_likelihood(fm, sigma, weighting, ghuber_power)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    if clip_range is None:
        policy_loss = _weighted_mean(adv * -log_p, w)
        ratio = torch.ones_like(log_p)
        clipped = torch.zeros_like(log_p)
    else:  # train_sd3_awm.py lines 1306-1327: exp_first ratio, PPO-clip pessimistic bound
        ratio = torch.exp(log_p - (old if old is not None else log_p.detach()))
        unclipped_loss = -adv * ratio
        clipped_loss = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        policy_loss = _weighted_mean(torch.maximum(unclipped_loss, clipped_loss), w)
        clipped = ((ratio.detach() - 1.0).abs() > clip_range).float()
    loss = policy_loss
    kl_mean = ema_kl_mean = None
    if ref is not None:
        kl_mean = _weighted_mean(_per_sample_sq(v_pred, ref), w)
        if kl_beta > 0:
            loss = loss + kl_beta * kl_mean
    if ema is not None:
        ema_kl_mean = _weighted_mean(_per_sample_sq(v_pred, ema), w)
        if ema_kl_beta > 0:
            loss = loss + ema_kl_beta * ema_kl_mean
    if check:
        assert_finite(loss, "loss")

    with torch.no_grad():
        pos, neg = (adv > 0).float(), (adv < 0).float()
        metrics = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "kl": kl_mean.detach() if kl_mean is not None else zero,
            "ema_kl": ema_kl_mean.detach() if ema_kl_mean is not None else zero,
            "fm_loss": fm.mean(),
            "fm_loss_pos": (fm * pos).sum() / pos.sum().clamp_min(1.0),  # 0 without a positive advantage
            "fm_loss_neg": (fm * neg).sum() / neg.sum().clamp_min(1.0),
            "ratio_mean": ratio.detach().mean(),
            "clipfrac": clipped.mean(),
        }
    return loss, metrics
