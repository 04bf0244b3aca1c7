"""Dense (per-step) advantage estimators: DenseGRPO and VGPO (pure tensor functions, no training loop).

DenseGRPO (Deng et al. 2026, "DenseGRPO: From Sparse to Dense Reward for Flow Matching Model
Alignment", arXiv:2601.20218, §3 "step-wise dense reward" and "reward-aware exploration space
calibration"):

* :func:`step_reward_gains` -- the dense reward of denoising step ``t`` is the step-wise reward
  gain ``ΔR_t = R_{t+1} - R_t``, where ``R_t`` is the reward of the clean image ``x̂0`` reached from
  the latent before step ``t`` by (deterministic) ODE denoising.
* :func:`dense_step_advantages` -- ``ΔR_t`` normalised within the prompt's group separately at
  every timestep (GRPO's group normalisation applied per step instead of once per trajectory).
* :func:`calibrate_noise` -- the reward-aware update of the per-timestep SDE noise level ``ψ(t)``:
  a timestep whose group of dense rewards has a balanced number of positive and negative gains has
  room for more exploration (``ψ(t)`` goes up); an unbalanced one (most samples lose reward, as
  when too much noise is injected) gets less noise (``ψ(t)`` goes down).

VGPO (Shao et al. 2025, "Anchoring Values in Temporal and Group Dimensions for Flow Matching Model
Alignment" -- "Value-Anchored Group Policy Optimization", arXiv:2512.12387, §3 "Temporal Cumulative
Reward Mechanism" and "Adaptive Dual Advantage Estimation"):

* :func:`process_rewards` -- dense process rewards from one-step ODE projections: the change of the
  projected value between consecutive steps, the last step closing on the terminal reward.
* :func:`discounted_returns` -- the discounted cumulative (reward-to-go) value of each step,
  ``G_t = Σ_{k >= t} γ^(k-t) r_k``.
* :func:`temporal_weights` -- per-step criticality weights (mean absolute process reward of the
  step over the batch), normalised to mean 1.
* :func:`vgpo_advantages` -- ``w_t * [(G_t - mean_g(G_t)) / (std_g(G_t) + eps) + α G_t]``: the
  group-relative term plus an absolute value anchor, so the signal does not vanish when a group's
  rewards collapse to the same value.

Statistics are accumulated in float64 (via :func:`flowalign.advantages.group_advantages` where a
group normalisation is needed) and returned in float32. A group/timestep with zero spread gets a
relative advantage of exactly 0, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowalign.advantages import group_advantages, joint_ids
from flowalign.guards import assert_finite

__all__ = [
    "calibrate_noise",
    "dense_step_advantages",
    "discounted_returns",
    "process_rewards",
    "step_reward_gains",
    "temporal_weights",
    "vgpo_advantages",
]


# -- input checks -----------------------------------------------------------------------------------
def _check_real(t: Tensor, name: str, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a real float or integer tensor, got dtype {t.dtype}")


def _check_group_ids(group_ids: Tensor, n: int) -> None:
    if not isinstance(group_ids, Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.dim() != 1 or group_ids.shape[0] != n:
        raise ValueError(f"group_ids must have shape [{n}] (one id per trajectory), got {tuple(group_ids.shape)}")
    if group_ids.dtype == torch.bool or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")


def _check_number(x: object, name: str, *, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    ok = ok and (x > lo if lo_open else x >= lo) and x <= hi
    if not ok:
        lo_b = "(" if lo_open else "["
        raise ValueError(f"{name} must be a finite number in {lo_b}{lo}, {hi}], got {x!r}")
    return float(x)


def _per_step_group_advantages(values: Tensor, group_ids: Tensor, eps: float, clip: float | None) -> Tensor:
    """Group-normalise every column of ``values [L, T]`` separately: ``[L, T]`` float32.

    Entry ``(i, t)`` is put in the composite group ``(group_ids[i], t)``, so one vectorised call of
    :func:`group_advantages` normalises each timestep within each prompt's group.
    """
    num_traj, num_steps = values.shape
    cell_group = group_ids.to(values.device)[:, None].expand(num_traj, num_steps).reshape(-1)  # [L*T]
    cell_step = torch.arange(num_steps, device=values.device)[None, :].expand(num_traj, num_steps).reshape(-1)
    adv = group_advantages(values.reshape(-1), joint_ids(cell_group, cell_step), std_mode="group", clip=clip, eps=eps)
    return adv.reshape(num_traj, num_steps)


# -- DenseGRPO --------------------------------------------------------------------------------------
def step_reward_gains(step_rewards: Tensor) -> Tensor:
    """Dense rewards ``ΔR_t = R_{t+1} - R_t`` (DenseGRPO §3, step-wise reward gain).

    Args:
        step_rewards: ``[L, T+1]``; column ``t`` is the reward of the ODE look-ahead ``x̂0`` from the
            latent *before* SDE step ``t`` (column 0: from the initial noise; column ``T``: the
            reward of the finished sample, where the look-ahead is the sample itself).

    Returns:
        ``[L, T]`` float32; entry ``t`` is the reward gained by step ``t``. Each row telescopes:
        ``ΣΔR_t = R_T - R_0``.
    """
    _check_real(step_rewards, "step_rewards", 2)
    if step_rewards.shape[1] < 2:
        raise ValueError(f"step_rewards must have shape [L, T+1] with T >= 1, got {tuple(step_rewards.shape)}")
    r = step_rewards.detach().to(torch.float64)
    assert_finite(r, "step_rewards")
    return (r[:, 1:] - r[:, :-1]).to(torch.float32)


def dense_step_advantages(
    step_rewards: Tensor,
    group_ids: Tensor,
    *,
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """DenseGRPO advantages: step-wise reward gains normalised per timestep within each group.

    ``A_{i,t} = (ΔR_{i,t} - mean_{j in g(i)} ΔR_{j,t}) / (std_{j in g(i)} ΔR_{j,t} + eps)``
    (DenseGRPO §3: the GRPO group normalisation, Shao et al. 2024 Eq. 3 / Flow-GRPO §4.1, applied to
    the dense reward of every timestep instead of the single terminal reward).

    Args:
        step_rewards: ``[L, T+1]`` look-ahead rewards (see :func:`step_reward_gains`).
        group_ids: ``[L]`` integer group (prompt) id per trajectory.
        eps: added to the std (>= 0).
        clip: optional bound ``|A| <= clip``.

    Returns:
        ``[L, T]`` float32; a (group, timestep) whose gains all coincide gets exactly 0.
    """
    gains = step_reward_gains(step_rewards)  # validates step_rewards
    _check_group_ids(group_ids, step_rewards.shape[0])
    return _per_step_group_advantages(gains.to(torch.float64), group_ids, eps, clip)


def calibrate_noise(
    psi: Tensor,
    step_advantages: Tensor,
    *,
    rate: float,
    bounds: tuple[float, float],
    tol: float = 0.25,
) -> Tensor:
    """One reward-aware calibration step of the per-timestep SDE noise level ``ψ(t)`` (DenseGRPO §3).

    For every timestep ``t`` count the trajectories whose dense reward (or its advantage -- only the
    sign is read) is positive, ``n+_t``, and negative, ``n-_t``. The timestep is *balanced* when
    ``|n+_t - n-_t| <= tol * (n+_t + n-_t)``; a balanced timestep's noise is raised, an unbalanced one's
    lowered, and the result is clamped to ``bounds``::

        ψ'(t) = clamp(ψ(t) + rate, lo, hi)   if balanced(t)
        ψ'(t) = clamp(ψ(t) - rate, lo, hi)   otherwise

    A timestep where every gain is exactly 0 (``n+ = n- = 0``: the samples do not differ at all)
    counts as balanced -- its exploration space is too small, so its noise goes up.

    The balance test's tolerance ``tol`` and the additive step are this library's parameterisation of
    the paper's increase-when-balanced / decrease-otherwise rule (the paper's exact thresholds were
    not available when this was written); ``tol=0`` demands exact balance.

    Args:
        psi: ``[T]`` current noise levels (e.g. the ``a``/``η`` of the SDE step per timestep).
        step_advantages: ``[L, T]`` dense rewards ``ΔR`` or the advantages of
            :func:`dense_step_advantages` for the same rollout (all groups pooled).
        rate: step size ``> 0`` added / subtracted.
        bounds: ``(lo, hi)`` with ``0 <= lo <= hi``.
        tol: balance tolerance in ``[0, 1]`` (0: exactly as many gains as losses).

    Returns:
        ``[T]`` new ``ψ`` (dtype of ``psi``; float32 for integer input).
    """
    _check_real(psi, "psi", 1)
    _check_real(step_advantages, "step_advantages", 2)
    if step_advantages.shape[1] != psi.shape[0]:
        raise ValueError(
            f"step_advantages must have shape [L, T={psi.shape[0]}] (T = len(psi)), got {tuple(step_advantages.shape)}"
        )
    rate = _check_number(rate, "rate", lo=0.0, lo_open=True)
    tol = _check_number(tol, "tol", lo=0.0, hi=1.0)
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise ValueError(f"bounds must be a (lo, hi) pair, got {bounds!r}")
    lo = _check_number(bounds[0], "bounds[0]", lo=0.0)
    hi = _check_number(bounds[1], "bounds[1]", lo=lo)
    assert_finite(psi, "psi")
    assert_finite(step_advantages, "step_advantages")

    a = step_advantages.detach()
    n_pos = (a > 0).sum(dim=0).to(torch.float64)  # [T]
    n_neg = (a < 0).sum(dim=0).to(torch.float64)  # [T]
    balanced = (n_pos - n_neg).abs() <= tol * (n_pos + n_neg)  # [T]; all-zero column -> True
    out_dtype = psi.dtype if psi.is_floating_point() else torch.float32
    delta = torch.where(balanced, rate, -rate).to(device=psi.device)
    return (psi.detach().to(torch.float64) + delta).clamp(lo, hi).to(out_dtype)


# -- VGPO -------------------------------------------------------------------------------------------
def process_rewards(step_values: Tensor, final_rewards: Tensor) -> Tensor:
    """Dense process rewards from one-step ODE projections (VGPO §3, Temporal Cumulative Reward).

    ``r_t = v_{t+1} - v_t`` for ``t < T-1`` and ``r_{T-1} = R - v_{T-1}``, where ``v_t`` is the reward of
    the one-step ODE projection ``x̂0 = x_t - σ_t v_θ(x_t)`` of the latent before step ``t`` and ``R``
    the terminal reward of the finished sample.

    Args:
        step_values: ``[L, T]`` projected values ``v_t``.
        final_rewards: ``[L]`` terminal rewards ``R``.

    Returns:
        ``[L, T]`` float32; each row sums to ``R - v_0``.
    """
    _check_real(step_values, "step_values", 2)
    _check_real(final_rewards, "final_rewards", 1)
    if final_rewards.shape[0] != step_values.shape[0]:
        raise ValueError(
            f"final_rewards must have shape [L={step_values.shape[0]}] (rows of step_values), "
            f"got {tuple(final_rewards.shape)}"
        )
    if step_values.shape[1] < 1:
        raise ValueError(f"step_values must have at least one step, got shape {tuple(step_values.shape)}")
    v = step_values.detach().to(torch.float64)
    big_r = final_rewards.detach().to(device=v.device, dtype=torch.float64)
    assert_finite(v, "step_values")
    assert_finite(big_r, "final_rewards")
    nxt = torch.cat([v[:, 1:], big_r[:, None]], dim=1)  # [L, T]: value after each step
    return (nxt - v).to(torch.float32)


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Discounted reward-to-go ``G_t = Σ_{k=t}^{T-1} γ^(k-t) r_k`` (VGPO §3; Sutton & Barto Eq. 3.8).

    Vectorised as ``G = r @ Dᵀ`` with the upper-triangular discount matrix ``D[t, k] = γ^(k-t)`` for
    ``k >= t`` (0 below the diagonal).

    Args:
        rewards: ``[L, T]`` per-step rewards.
        gamma: discount in ``[0, 1]``.

    Returns:
        ``[L, T]`` float32.
    """
    _check_real(rewards, "rewards", 2)
    gamma = _check_number(gamma, "gamma", lo=0.0, hi=1.0)
    r = rewards.detach().to(torch.float64)
    assert_finite(r, "rewards")
    num_steps = r.shape[1]
    idx = torch.arange(num_steps, device=r.device)
    lag = (idx[None, :] - idx[:, None]).to(torch.float64)  # [T, T]: k - t
    upper = lag >= 0
    # gamma ** lag with 0 ** 0 = 1 on the diagonal (torch.pow does that); masked below the diagonal.
    disc = torch.where(upper, torch.pow(torch.tensor(gamma, dtype=torch.float64), lag.clamp_min(0)),
                       torch.zeros_like(lag))
    return (r @ disc.T).to(torch.float32)


def temporal_weights(process: Tensor) -> Tensor:
    """Per-step criticality weights ``w_t = T m_t / Σ_k m_k`` with ``m_t = mean_i |r_{i,t}|`` (VGPO §3).

    Steps where the projected value moves most (structure formation) weigh more than steps that
    barely change it (late refinement). Mean weight is 1; if no step changes anything
    (``Σ m = 0``) every weight is 1.

    Args:
        process: ``[L, T]`` process rewards (:func:`process_rewards`).

    Returns:
        ``[T]`` float32, non-negative, mean 1.
    """
    _check_real(process, "process", 2)
    p = process.detach().to(torch.float64)
    assert_finite(p, "process")
    num_steps = p.shape[1]
    if p.shape[0] == 0:
        return torch.ones(num_steps, dtype=torch.float32, device=p.device)
    m = p.abs().mean(dim=0)  # [T]
    total = m.sum()
    w = torch.where(total > 0, num_steps * m / total.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(m))
    return w.to(torch.float32)


def vgpo_advantages(
    step_values: Tensor,
    final_rewards: Tensor,
    group_ids: Tensor,
    *,
    gamma: float = 1.0,
    alpha: float = 0.1,
    eps: float = 1e-4,
    use_temporal_weights: bool = True,
) -> Tensor:
    """VGPO per-step advantages: value-anchored group normalisation with temporal weights.

    With ``r = process_rewards(step_values, final_rewards)``, ``G = discounted_returns(r, gamma)`` and
    ``w = temporal_weights(r)`` (VGPO §3)::

        A_{i,t} = w_t * [ (G_{i,t} - mean_{j in g(i)} G_{j,t}) / (std_{j in g(i)} G_{j,t} + eps)
                          + alpha * G_{i,t} ]

    The first term is the GRPO group normalisation per timestep (Shao et al. 2024 Eq. 3); the second
    is VGPO's absolute value anchor ("Adaptive Dual Advantage Estimation"): when every member of a
    group reaches the same reward the relative term is 0, but the absolute cumulative value still
    tells the policy whether the step raised or lowered the projected reward.

    Args:
        step_values: ``[L, T]`` one-step ODE projection values ``v_t``.
        final_rewards: ``[L]`` terminal rewards.
        group_ids: ``[L]`` integer group (prompt) ids.
        gamma: discount in ``[0, 1]`` (1: ``G_t = R - v_t``, the reward still to be gained).
        alpha: weight ``>= 0`` of the absolute anchor (0: plain per-step group normalisation).
        eps: added to the std (>= 0).
        use_temporal_weights: if False, ``w_t = 1``.

    Returns:
        ``[L, T]`` float32.
    """
    r = process_rewards(step_values, final_rewards)  # validates shapes / finiteness
    _check_group_ids(group_ids, step_values.shape[0])
    alpha = _check_number(alpha, "alpha", lo=0.0)
    eps = _check_number(eps, "eps", lo=0.0)
    ret = discounted_returns(r, gamma).to(torch.float64)  # [L, T]; validates gamma
    relative = _per_step_group_advantages(ret, group_ids, eps, None).to(torch.float64)
    w = temporal_weights(r).to(torch.float64) if use_temporal_weights else torch.ones(r.shape[1], dtype=torch.float64)
    adv = w.to(ret.device)[None, :] * (relative + alpha * ret)
    return adv.to(torch.float32)
