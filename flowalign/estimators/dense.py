"""Dense (per-step) advantage estimators: DenseGRPO and VGPO (pure tensor functions, no training loop).

DenseGRPO -- Deng et al. 2026, "DenseGRPO: From Sparse to Dense Reward for Flow Matching Model
Alignment", arXiv:2601.20218v2 (ICLR 2026). Checked against the full paper text (§4.1 Eqs. 7-10,
§4.2 Algorithm 1 and Eq. 11, App. A). The paper counts timesteps down, ``t = T .. 1``; this module
indexes denoising steps forward, ``k = 0 .. T-1`` (step ``k`` is the paper's ``t = T - k``).

* :func:`step_reward_gains` -- Eq. 7: ``ΔR_t = R_{t-1} - R_t``, the reward gained by the step
  ``x_t -> x_{t-1}``, where (Eqs. 8-9) ``R_t = R(ODE_n(x_t), c)`` is the reward of the clean image
  reached from ``x_t`` by ``n`` deterministic ODE steps (the paper uses ``n = t``, i.e. all remaining
  steps; ``R_0 = R(x_0)`` is the sample's own reward).
* :func:`dense_step_advantages` -- Eq. 10: ``A_t^i = (ΔR_t^i - mean_G ΔR_t) / std_G ΔR_t``, the GRPO
  group normalisation (Eq. 2) applied to each timestep's dense reward.
* :func:`calibrate_noise` -- Algorithm 1: for every timestep, ``ψ(t) += ε2`` if
  ``|#{ΔR_t > 0} - #{ΔR_t < 0}| < ε1`` (balanced) else ``ψ(t) -= ε2``; the counts pool all sampled
  trajectories (under several processes the caller passes every rank's gains, gathered:
  ``flowalign.algorithms.dense_grpo.DenseGRPO.table_targets``); App. A uses ``ε1 = 2``, ``ε2 = 0.01``. Eq. 11: the SDE noise of Flow-GRPO's sampler
  (Eq. 6, ``σ_t = a sqrt(t / (1 - t))``) becomes ``σ_t = ψ(t)``. The paper runs the calibration
  before training and keeps ``ψ`` fixed while training (App. A); running it online is this
  library's option.

VGPO -- Shao et al. 2025, "Anchoring Values in Temporal and Group Dimensions for Flow Matching Model
Alignment" (Value-Anchored Group Policy Optimization), arXiv:2512.12387, §3.3 "Temporal Cumulative
Reward Mechanism" (TCRM, Eqs. 9-11) and "Adaptive Dual Advantage Estimation" (ADAE, Eqs. 12-13,
App. B Eqs. 15-19). **The paper's own text could not be retrieved here** (only its abstract and the
four public OpenReview reviews of the ICLR 2026 submission "Value-Anchored Group Policy Optimization
for Flow Models", which quote its equations' structure). What those sources establish, and what is
implemented:

* :func:`process_rewards` -- Eq. 9: the *instant reward* of step ``t`` is the reward of the one-step
  ODE projection of the latent the step produces, ``R_t = R(x̂_0)``,
  ``x̂_0 = x_{t-1} - σ_{t-1} v_θ(x_{t-1}, σ_{t-1})``; for the last step the projection is the sample
  itself, so its instant reward is the terminal reward. (A reward *value*, not a gain: the reviews
  discuss Eq. 11's weights for "non-negative" rewards.)
* :func:`discounted_returns` -- Eq. 10: ``Q_t = Σ_{k >= t} γ^(k-t) R_k`` along the sampled
  trajectory (the "Monte-Carlo" discounted action value).
* :func:`temporal_weights` -- Eq. 11: ``ω_t = Q_t / mean_t(Q_t)`` (the reviews: "divides by the mean
  over t of Q_t"); computed per trajectory here.
* :func:`vgpo_advantages` -- Eqs. 12-13 with App. B's setting ``α = k·std`` of the group's ``Q_t``:
  ``A_t^i = ω_t^i [ (Q_t^i - mean_G Q_t) / std_G Q_t + k Q_t^i ]`` -- the relative term plus an
  absolute value anchor that survives when ``std_G → 0`` (App. B's limit). App. A.2 enables the
  anchor only for the first 5 sampling steps (``anchor_steps``). The exact typography of Eq. 13 and
  the paper's ``γ``/``k`` values are not known here; the per-trajectory mean in Eq. 11 and the
  fallback for non-positive values are this library's reading.

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
    """Dense rewards: the step-wise reward gain (DenseGRPO §4.1, Eq. 7).

    In this module's forward order ``ΔR_k = R[k+1] - R[k]``; in the paper's countdown order that is
    Eq. 7, ``ΔR_t = R_{t-1} - R_t`` with ``t = T - k``, and ``R[k]`` is Eq. 9's latent reward
    ``R(ODE_n(x_t), c)`` (the paper uses ``n = t``: the full ODE look-ahead; ``n = 1`` performed worse
    than Flow-GRPO in its Fig. 6(c)).

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
    (DenseGRPO §4.1, Eq. 10: the GRPO group normalisation of Eq. 2 -- Shao et al. 2024 Eq. 3 /
    Flow-GRPO §4.1 -- applied to the dense reward of every timestep instead of the terminal reward).
    ``eps`` and ``clip`` follow Flow-GRPO's implementation (population std + 1e-4; optional clip).

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
    dense_rewards: Tensor,
    *,
    rate: float = 0.01,
    margin: float = 2.0,
    bounds: tuple[float, float] = (0.0, math.inf),
) -> Tensor:
    """One iteration of DenseGRPO's exploration-space calibration of ``ψ(t)`` (Algorithm 1, lines 9-15).

    For every timestep count the trajectories whose dense reward ``ΔR_t`` is positive, ``n+_t``, and
    negative, ``n-_t`` (all trajectories of the rollout pooled, whatever their prompt; with several
    processes, pass the gains of every rank, gathered, so that all ranks hold the same ψ). Then::

        ψ'(t) = ψ(t) + ε2   if |n+_t - n-_t| < ε1     (balanced: room for more exploration)
        ψ'(t) = ψ(t) - ε2   otherwise                 (imbalanced: too much noise)

    with ``ε1 = margin`` and ``ε2 = rate`` (App. A: ``ε1 = 2``, ``ε2 = 0.01``), and the result is
    clamped to ``bounds`` -- a safeguard of this library (the paper has no clamp; ``ψ(t)`` is the SDE
    noise std ``σ_t`` of Eq. 11, so it must stay ``>= 0``). A timestep where no gain is non-zero
    (``n+ = n- = 0``) is balanced, so its noise goes up.

    The signs must be those of the dense rewards ``ΔR`` themselves (:func:`step_reward_gains`), not of
    the group-normalised advantages: Fig. 3(a)'s imbalance is "nearly all samples perform worse than
    the default" (``ΔR < 0``), which centring within groups would hide.

    Args:
        psi: ``[T]`` current per-step noise levels, in this module's forward step order.
        dense_rewards: ``[L, T]`` dense rewards ``ΔR`` of a rollout (:func:`step_reward_gains`).
        rate: ``ε2 > 0``, the step added / subtracted.
        margin: ``ε1 > 0``, balance threshold on ``|n+ - n-|`` (strict ``<``, as in Algorithm 1).
        bounds: ``(lo, hi)`` with ``0 <= lo <= hi`` (``hi`` may be ``inf``).

    Returns:
        ``[T]`` new ``ψ`` (dtype of ``psi``; float32 for integer input).
    """
    _check_real(psi, "psi", 1)
    _check_real(dense_rewards, "dense_rewards", 2)
    if dense_rewards.shape[1] != psi.shape[0]:
        raise ValueError(
            f"dense_rewards must have shape [L, T={psi.shape[0]}] (T = len(psi)), got {tuple(dense_rewards.shape)}"
        )
    rate = _check_number(rate, "rate", lo=0.0, lo_open=True)
    margin = _check_number(margin, "margin", lo=0.0, lo_open=True)
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise ValueError(f"bounds must be a (lo, hi) pair, got {bounds!r}")
    lo = _check_number(bounds[0], "bounds[0]", lo=0.0)
    if not (isinstance(bounds[1], (int, float)) and not isinstance(bounds[1], bool) and bounds[1] >= lo):
        raise ValueError(f"bounds[1] must be a number >= bounds[0] = {lo}, got {bounds[1]!r}")
    hi = float(bounds[1])
    assert_finite(psi, "psi")
    assert_finite(dense_rewards, "dense_rewards")

    d = dense_rewards.detach()
    n_pos = (d > 0).sum(dim=0).to(torch.float64)  # [T]
    n_neg = (d < 0).sum(dim=0).to(torch.float64)  # [T]
    balanced = (n_pos - n_neg).abs() < margin  # [T]; Algorithm 1 line 10
    out_dtype = psi.dtype if psi.is_floating_point() else torch.float32
    step = torch.tensor(rate, dtype=torch.float64, device=balanced.device)
    delta = torch.where(balanced, step, -step).to(device=psi.device)  # lines 11 / 13
    return (psi.detach().to(torch.float64) + delta).clamp(lo, hi).to(out_dtype)


# -- VGPO -------------------------------------------------------------------------------------------
def process_rewards(step_values: Tensor, final_rewards: Tensor) -> Tensor:
    """VGPO instant rewards (TCRM, Eq. 9): the projected value of the latent each step produces.

    ``r_t = v_{t+1}`` for ``t < T-1`` and ``r_{T-1} = R``, where ``v_t`` is the reward of the one-step
    ODE projection ``x̂0 = x_t - σ_t v_θ(x_t, σ_t)`` of the latent *before* step ``t`` and ``R`` the
    terminal reward (the last step's output is the sample itself, whose projection is exact). Column 0
    of ``step_values`` (the projection of the initial noise) is the outcome of no action and is not
    read; it is accepted so that the same ``[L, T]`` look-ahead table serves both estimators.

    Args:
        step_values: ``[L, T]`` projected values ``v_t`` (column ``t``: latent before step ``t``).
        final_rewards: ``[L]`` terminal rewards ``R``.

    Returns:
        ``[L, T]`` float32 instant rewards.
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
    return torch.cat([v[:, 1:], big_r[:, None]], dim=1).to(torch.float32)  # value after each step


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Discounted action values ``Q_t = Σ_{k=t}^{T-1} γ^(k-t) r_k`` (VGPO Eq. 10; Sutton & Barto Eq. 3.8).

    Vectorised as ``Q = r @ Dᵀ`` with the upper-triangular discount matrix ``D[t, k] = γ^(k-t)`` for
    ``k >= t`` (0 below the diagonal).

    Args:
        rewards: ``[L, T]`` per-step (instant) rewards.
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


def temporal_weights(returns: Tensor) -> Tensor:
    """VGPO timestep weights ``ω_t = Q_t / mean_t(Q_t)`` (Eq. 11), per trajectory.

    A step whose action value is above the trajectory's average over steps weighs more than 1. The
    ratio is a weight only for non-negative values with a positive mean (the setting the paper's
    rewards are in); a trajectory with a negative ``Q_t`` or a mean ``<= 0`` gets ``ω = 1`` at every
    step (this library's fallback, so a weight never flips an advantage's sign).

    Args:
        returns: ``[L, T]`` action values ``Q`` (:func:`discounted_returns`).

    Returns:
        ``[L, T]`` float32, non-negative, each row with mean 1.
    """
    _check_real(returns, "returns", 2)
    q = returns.detach().to(torch.float64)
    assert_finite(q, "returns")
    if q.shape[1] == 0:
        return q.to(torch.float32)
    mean = q.mean(dim=1, keepdim=True)  # [L, 1]
    ok = (q >= 0).all(dim=1, keepdim=True) & (mean > 0)  # [L, 1]
    w = torch.where(ok, q / torch.where(ok, mean, torch.ones_like(mean)), torch.ones_like(q))
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
    anchor_steps: int | None = None,
) -> Tensor:
    """VGPO per-step advantages (ADAE, Eqs. 12-13 with App. B's ``α = k·std``).

    With ``r = process_rewards(step_values, final_rewards)`` (Eq. 9), ``Q = discounted_returns(r, gamma)``
    (Eq. 10) and ``ω = temporal_weights(Q)`` (Eq. 11)::

        A_{i,t} = ω_{i,t} * [ (Q_{i,t} - mean_{j in g(i)} Q_{j,t}) / (std_{j in g(i)} Q_{j,t} + eps)
                              + k * m_t * Q_{i,t} ]

    with ``k = alpha`` and ``m_t = 1`` for the first ``anchor_steps`` steps, 0 after (App. A.2 enables
    the anchor for the first 5 of 10 sampling steps; ``None`` = every step). The relative term is the
    GRPO group normalisation per timestep (Shao et al. 2024 Eq. 3). Writing the absolute term of
    Eq. 13 as ``α Q / std`` with ``α = k·std`` (App. B Eq. 15) cancels the std, so it is implemented in
    that cancelled form: when every member of a group reaches the same value (``std = 0``) the
    relative term is exactly 0 and the advantage is ``ω k Q`` -- App. B's non-vanishing limit -- where
    the uncancelled form with ``eps > 0`` would lose the signal.

    Args:
        step_values: ``[L, T]`` one-step projection values ``v_t`` (see :func:`process_rewards`).
        final_rewards: ``[L]`` terminal rewards.
        group_ids: ``[L]`` integer group (prompt) ids.
        gamma: discount in ``[0, 1]``.
        alpha: anchor coefficient ``k >= 0`` (0: plain per-step group normalisation).
        eps: added to the std (>= 0).
        use_temporal_weights: if False, ``ω = 1``.
        anchor_steps: number of leading steps that get the absolute anchor (``None``: all).

    Returns:
        ``[L, T]`` float32.
    """
    r = process_rewards(step_values, final_rewards)  # validates shapes / finiteness
    _check_group_ids(group_ids, step_values.shape[0])
    alpha = _check_number(alpha, "alpha", lo=0.0)
    eps = _check_number(eps, "eps", lo=0.0)
    num_steps = r.shape[1]
    if anchor_steps is not None and (
        not isinstance(anchor_steps, int) or isinstance(anchor_steps, bool) or anchor_steps < 0
    ):
        raise ValueError(f"anchor_steps must be None or an int >= 0, got {anchor_steps!r}")
    q = discounted_returns(r, gamma).to(torch.float64)  # [L, T]; validates gamma
    relative = _per_step_group_advantages(q, group_ids, eps, None).to(torch.float64)
    mask = torch.ones(num_steps, dtype=torch.float64, device=q.device)
    if anchor_steps is not None:
        mask[anchor_steps:] = 0.0
    w = temporal_weights(q).to(torch.float64) if use_temporal_weights else torch.ones_like(q)
    adv = w * (relative + alpha * mask[None, :] * q)
    return adv.to(torch.float32)
