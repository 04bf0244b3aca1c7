"""The PPO-clip policy loss on per-edge likelihood ratios, with Flow-GRPO's KL on the means.

Flow-GRPO (Liu et al. 2025, arXiv:2505.05470, §4.1) trains every sampled transition (edge)
``x_t -> x_next`` of a rollout tree with the clipped surrogate of PPO (Schulman et al. 2017,
Eq. 7), the advantage of the edge standing in for ``Â_t``, and regularizes toward the reference
policy with the closed-form KL between the two Gaussian transition kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowalign.guards import assert_finite

__all__ = ["KL_FORMS", "kl_form_scale", "kl_on_means", "ppo_clip_loss", "ratio_norm_log_ratio"]

#: forms of the KL penalty on transition means (``algorithm.kl_form``)
KL_FORMS: tuple[str, ...] = ("exact", "flow_grpo")


def kl_on_means(mean: Tensor, mean_ref: Tensor, std: Tensor, *, scale: Tensor | float | None = None,
                check: bool = True) -> Tensor:
    """Per-edge KL between the policy's and the reference's Gaussian transition kernels.

    Both kernels are ``N(mean, std² I)`` with the same ``std``, so
    ``KL(N(μθ, s²I) || N(μref, s²I)) = ||μθ − μref||² / (2 s²)`` (the Gaussian KL with equal
    covariances). Like the log-prob convention of the samplers, the squared distance is averaged
    (not summed) over the latent dims, i.e. this is the KL *per dimension*, multiplied by
    ``scale`` when given.

    With ``std`` the transition std (``StepOutput.std``) and no ``scale`` this is the exact KL.
    It is **not** Flow-GRPO's penalty: ``train_sd3.py`` divides ``((μθ−μref)²).mean(dims)`` by
    ``2·std_dev_t²`` with ``std_dev_t`` the SDE's diffusion coefficient *before* the ``√Δt``
    factor of the transition std, i.e. Flow-GRPO's KL is the exact one times ``Δt``;
    :func:`kl_form_scale` gives that factor (``algorithm.kl_form: flow_grpo``; docs/FIDELITY.md).

    Args:
        mean: ``[N, *D]`` the policy's transition means (gradients flow through it).
        mean_ref: ``[N, *D]`` the reference policy's means (treated as a constant: detached).
        std: ``[N]`` (or a 0-dim scalar) per-edge std of the transition, > 0 (detached).
        scale: optional ``[N]`` (or scalar) per-edge factor on the KL (detached), e.g.
            :func:`kl_form_scale`; None = 1.
        check: refuse a ``std`` that is not positive and finite (a host sync); the trainer's
            hot path, whose edges are the rollout's SDE edges, passes ``False``.

    Returns:
        ``[N]`` float32 KL per edge.

    Raises:
        ValueError: shapes disagree, or a ``std`` is not positive and finite.
    """
    if not all(isinstance(t, Tensor) for t in (mean, mean_ref, std)):
        raise TypeError("kl_on_means: mean, mean_ref and std must be torch.Tensors")
    if mean.dim() < 1:
        raise ValueError(f"kl_on_means: mean must be at least 1-D [N, ...], got shape {tuple(mean.shape)}")
    if mean_ref.shape != mean.shape:
        raise ValueError(
            f"kl_on_means: mean_ref has shape {tuple(mean_ref.shape)}, expected mean's shape {tuple(mean.shape)}"
        )
    n = mean.shape[0]
    if not (std.dim() == 0 or tuple(std.shape) == (n,)):
        raise ValueError(f"kl_on_means: std must have shape [{n}] or be a scalar, got {tuple(std.shape)}")
    s = std.detach().to(device=mean.device, dtype=torch.float32)
    if check and (not bool(torch.isfinite(s).all()) or not bool((s > 0).all())):
        bad = s.reshape(-1)[~(torch.isfinite(s.reshape(-1)) & (s.reshape(-1) > 0))][:5].tolist()
        raise ValueError(
            f"kl_on_means: std must be positive and finite (deterministic ODE edges have no KL), got {bad}"
        )
    diff = mean.float() - mean_ref.detach().float()
    sq = diff.pow(2).reshape(n, -1).mean(dim=1)  # [N] mean over latent dims
    kl = sq / (2.0 * s.pow(2))
    if scale is not None:
        kl = kl * torch.as_tensor(scale).detach().to(device=mean.device, dtype=torch.float32)
    return kl


def kl_form_scale(form: str, kind: str, delta: Tensor) -> Tensor | None:
    """The factor :func:`kl_on_means` applies for ``algorithm.kl_form`` (None = 1: the exact KL).

    * ``"exact"``: the per-dimension Gaussian KL between the transition kernels (no factor).
    * ``"flow_grpo"``: Flow-GRPO's penalty. ``scripts/train_sd3.py`` (yifan123/flow_grpo @ ac4c86e,
      line 895) computes ``((mean − mean_ref)²).mean(dims) / (2 · std_dev_t²)``, where ``std_dev_t``
      is what ``sde_step_with_logprob`` returns (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``
      line 47: ``sqrt(sigma / (1 - sigma)) · noise_level``), the diffusion coefficient before the
      ``sqrt(-dt)`` of the transition std (lines 59 / 62). Dividing by ``std_t²`` instead of
      ``std_t² · Δt`` makes it the exact KL times ``Δt = sigma − sigma_next`` for the SDE kinds
      ``flow_grpo`` and ``dance``. For ``cps`` the std the reference returns is already the
      transition std (``sigma_next · sin(a π/2)``, no ``Δt``), so the two forms coincide.

    Args:
        form: one of :data:`KL_FORMS`.
        kind: the ``sde_step`` kind (``sampling.sampler``).
        delta: ``[N]`` ``sigma − sigma_next`` of each edge.
    """
    if form not in KL_FORMS:
        raise ValueError(f"kl_form must be one of {list(KL_FORMS)}, got {form!r}")
    if form == "exact" or kind in ("cps", "sage"):  # their reference std is already the transition std
        return None
    return delta.detach().float()


def ratio_norm_log_ratio(log_prob: Tensor, log_prob_old: Tensor, mean: Tensor, mean_old: Tensor,
                         std: Tensor) -> Tensor:
    """Pref-GRPO's normalised log-ratio ("rationorm"): ``s·(lp − lp_old + mean((μ − μ_old)²) / (2 s²))``.

    CodeGoat24/Pref-GRPO @ 3e787f6, ``fastvideo/train_flux.py`` lines 729-741: the bias
    ``mean((μ − μ_old)²) / (2 s²)`` (``ratio_mean_bias``) is added to the log-ratio, which is then
    multiplied by ``scale = sqrt(|dt|)·σ_t``, the transition std ``s`` (``noise_scale`` of
    ``fastvideo/grpo/steps.py`` line 46). For the Gaussian log-densities of the samplers this equals
    ``mean(ε ⊙ (μ − μ_old))`` with ``ε = (x_next − μ_old) / s`` the rollout's noise: the quadratic
    term that always lowers the ratio is removed and the step's noise scale no longer sets the
    ratio's spread. 0 exactly on-policy (``lp == lp_old``, ``μ == μ_old``). The reference also divides
    the step's policy loss by ``|dt|`` (line 756); the caller does that.

    Args:
        log_prob, log_prob_old: ``[N]`` Gaussian log-densities (mean over latent dims) of the new
            and the sampling policy.
        mean, mean_old: ``[N, *latent]`` the two transition means.
        std: ``[N]`` transition std ``s > 0`` (the same under both policies).

    Returns:
        ``[N]`` float32 normalised log-ratio (pass it as ``log_prob`` with ``log_prob_old = 0``).
    """
    n = log_prob.shape[0]
    s = std.detach().float().reshape(n)
    bias = (mean.float() - mean_old.detach().float()).pow(2).reshape(n, -1).mean(dim=1) / (2 * s**2)
    return (log_prob.float() - log_prob_old.detach().float() + bias) * s


def _weighted_mean(x: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return x.mean()
    return (weights * x).sum() / weights.sum()


def _check_arguments(named: dict[str, Tensor | None], clip_range: float, kl_beta: float) -> None:
    """Types, shapes and the scalar arguments of :func:`ppo_clip_loss`: host metadata only, no sync."""
    named = {name: t for name, t in named.items() if t is not None}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"ppo_clip_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    log_prob = named["log_prob"]
    if log_prob.dim() != 1 or log_prob.shape[0] == 0:
        raise ValueError(f"ppo_clip_loss: log_prob must be 1-D [N] with N >= 1, got shape {tuple(log_prob.shape)}")
    n = log_prob.shape[0]
    for name, t in named.items():
        if tuple(t.shape) != (n,):
            raise ValueError(f"ppo_clip_loss: {name} must have shape [{n}] like log_prob, got {tuple(t.shape)}")
    if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)) or not (
        math.isfinite(clip_range) and clip_range > 0
    ):
        raise ValueError(f"ppo_clip_loss: clip_range must be a positive finite number, got {clip_range!r}")
    if isinstance(kl_beta, bool) or not isinstance(kl_beta, (int, float)) or not (
        math.isfinite(kl_beta) and kl_beta >= 0
    ):
        raise ValueError(f"ppo_clip_loss: kl_beta must be a finite number >= 0, got {kl_beta!r}")
    if kl_beta > 0 and "kl" not in named:
        raise ValueError(f"ppo_clip_loss: kl_beta={kl_beta} > 0 needs the per-edge `kl` tensor")


def _check_values(lp_old: Tensor, adv: Tensor, w: Tensor | None, loss: Tensor) -> None:
    """The value checks of :func:`ppo_clip_loss` (each reads the device: a host sync), inputs first."""
    assert_finite(lp_old, "log_prob_old")
    assert_finite(adv, "advantages")
    if w is not None:
        assert_finite(w, "weights")
        if bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(
                f"ppo_clip_loss: weights must be >= 0 with a positive sum, got min {float(w.min())}, sum {float(w.sum())}"
            )
    assert_finite(loss, "loss")


def ppo_clip_loss(
    log_prob: Tensor,
    log_prob_old: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    weights: Tensor | None = None,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
    check: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO clipped surrogate loss over ``N`` edges, plus an optional KL penalty.

    ``ratio = exp(log_prob − log_prob_old)``;
    ``l_e = max(−A·ratio, −A·clamp(ratio, 1−ε, 1+ε))`` -- the negated PPO objective
    ``min(r·Â, clip(r, 1−ε, 1+ε)·Â)`` of Schulman et al. 2017, Eq. 7 (Flow-GRPO's per-step
    clipped term, §4.1); ``policy = Σ w·l / Σ w`` (plain mean without weights);
    ``loss = policy + kl_beta · Σ w·kl / Σ w`` (Flow-GRPO's β·D_KL).

    ``log_prob_old`` and ``advantages`` are data, not functions of the parameters: they are
    detached. The math runs in float32 whatever the input dtype.

    Args:
        log_prob: ``[N]`` log-density of each edge's ``x_next`` under the current policy.
        log_prob_old: ``[N]`` the same under the sampling policy.
        advantages: ``[N]`` per-edge advantages.
        clip_range: ε > 0.
        weights: optional ``[N]`` non-negative per-edge weights with a positive sum.
        kl: optional ``[N]`` per-edge KL (e.g. :func:`kl_on_means`); required when ``kl_beta > 0``.
        kl_beta: β >= 0.
        check: also check the *values* (finite inputs and loss, valid weights). Each value check
            reads the device, a host sync (:mod:`flowalign.training.host_syncs`); ``check=False``
            skips them all for the training hot path, where the call makes no host sync. Types,
            shapes and the scalar arguments are checked either way.

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss and 0-dim detached float32 tensors (on
        ``log_prob``'s device, never python floats: reading them is the caller's sync)
        ``loss``, ``policy_loss``, ``kl`` (weighted mean of ``kl``; 0 without it) and the
        unweighted diagnostics over all ``N`` edges, as Flow-GRPO logs them: ``clip_frac`` =
        mean(|ratio−1| > ε), ``approx_kl`` = ½·mean((log_prob − log_prob_old)²), ``ratio_mean``
        = mean(ratio), ``ratio_max_dev`` = max|ratio − 1| (0 on-policy: docs/ARCHITECTURE.md
        invariant 2).

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shapes disagree, ``clip_range``/``kl_beta`` are invalid, ``kl_beta > 0``
            without ``kl``, or (``check=True``) ``weights`` are negative or sum to 0.
        FloatingPointError: (``check=True``) an input or the loss is NaN/Inf
            (``assert_finite(loss, "loss")``).
    """
    _check_arguments(
        {"log_prob": log_prob, "log_prob_old": log_prob_old, "advantages": advantages, "weights": weights, "kl": kl},
        clip_range,
        kl_beta,
    )
    device = log_prob.device
    lp_old = log_prob_old.detach().to(device=device, dtype=torch.float32)
    adv = advantages.detach().to(device=device, dtype=torch.float32)
    w = None if weights is None else weights.detach().to(device=device, dtype=torch.float32)

    log_ratio = log_prob.float() - lp_old
    ratio = torch.exp(log_ratio)
    per_edge = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))  # [N]
    policy_loss = _weighted_mean(per_edge, w)
    kl_mean = None if kl is None else _weighted_mean(kl.to(device=device, dtype=torch.float32), w)
    loss = policy_loss + kl_beta * kl_mean if kl_beta > 0 else policy_loss
    if check:
        _check_values(lp_old, adv, w, loss)

    with torch.no_grad():
        dev = (ratio - 1.0).abs()
        metrics = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "kl": kl_mean.detach() if kl_mean is not None else torch.zeros((), dtype=torch.float32, device=device),
            "clip_frac": (dev > clip_range).float().mean(),
            "approx_kl": 0.5 * log_ratio.pow(2).mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": dev.max(),
        }
    return loss, metrics


def step_weighted_ppo_clip_loss(log_ratio: Tensor, advantages: Tensor, step_weight: Tensor, *, clip_range: float,
                      weights: Tensor | None = None, kl: Tensor | None = None, kl_beta: float = 0.0
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip with a per-step weight, ``mean_w(δ·l) + kl_beta·mean_w(kl)``, over ``N`` edges: GRPO-Guard's
    gradient reweighting (``δ = 1/Δt``, arXiv:2510.22319 §3) and Pref-GRPO's rationorm update (CodeGoat24/Pref-GRPO
    @ 3e787f6, ``fastvideo/train_flux.py`` lines 756, 802: the clipped term divided by Δσ, the KL not).

    ``l = max(−A·r̂, −A·clip(r̂, 1 ± ε))`` is PPO-clip (Schulman et al. 2017, Eq. 7) on
    ``r̂ = exp(log_ratio)``; ``δ`` the per-step weight ; ``mean_w`` the mean
    weighted by ``weights`` (plain mean without). The KL is not reweighted (Pref-GRPO's; ours for GRPO-Guard).

    Args:
        log_ratio: ``[N]`` (e.g. :func:`ratio_norm_log_ratio`); advantages: ``[N]``; step_weight: ``[N]`` ``δ > 0``.
        clip_range: ``ε > 0``; weights: optional ``[N]`` loss weights; kl: ``[N]`` per-edge KL when
            ``kl_beta > 0``.

    Returns:
        ``(loss, metrics)``: ``ppo_clip_loss``'s metrics of the ratio ``r̂`` (``ratio_mean``,
        ``clip_frac``, ``ratio_max_dev``, ...), with ``policy_loss``, ``kl`` and ``loss`` of this loss.
    """
    base = weights.detach().float() if weights is not None else torch.ones_like(log_ratio, dtype=torch.float32)
    w = base * step_weight.to(base.device).float()
    # ppo_clip_loss returns sum(w l) / sum(w); x sum(w) / sum(base) makes it sum(base δ l) / sum(base) = mean_base(δ l)
    policy, metrics = ppo_clip_loss(log_ratio, torch.zeros_like(log_ratio), advantages, clip_range=clip_range,
                                    weights=w, check=False)
    policy = policy * (w.sum() / base.sum())
    loss = policy
    if kl_beta > 0:
        if kl is None:
            raise ValueError(f"step_weighted_ppo_clip_loss: kl_beta={kl_beta} > 0 needs the per-edge `kl`")
        kl_mean = (base * kl.float()).sum() / base.sum()
        loss = loss + kl_beta * kl_mean
        metrics["kl"] = kl_mean.detach()
    metrics["policy_loss"] = policy.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics
