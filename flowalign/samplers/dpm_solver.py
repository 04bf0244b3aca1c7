"""DPM-Solver++(2M) for flow matching, and MixGRPO-Flash's compressed ODE tail.

Flow-matching convention: ``x_sigma = (1 - sigma) x0 + sigma eps``, so DPM-Solver's
``alpha = 1 - sigma``, its noise scale is ``sigma`` and the log-SNR is ``lambda = log((1 - sigma) / sigma)``
(Tencent-Hunyuan/MixGRPO @ e5cdd6a, fastvideo/utils/sampling_utils.py l. 641-644 ``_sigma_to_alpha_sigma_t``;
diffusers ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas``). The data prediction of a velocity ``v``
at ``sigma`` is ``x0 = x - sigma v`` (sampling_utils.py l. 387-396 ``convert_model_output``; diffusers'
``flow_prediction``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ODE_SOLVERS", "dpm_solver_pp_2m_step", "flash_tail_grid", "tail_steps"]

#: the ODE solvers of the rollout's steps after its last SDE step (``BranchSpec.ode_solver``)
ODE_SOLVERS = ("euler", "dpm_solver++_2m")


def _lambda(sigma: Tensor) -> Tensor:
    """Flow log-SNR ``lambda = log(alpha) - log(sigma)`` with ``alpha = 1 - sigma`` (sampling_utils.py l. 420-423)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def dpm_solver_pp_2m_step(sample: Tensor, x0: Tensor, x0_prev: Tensor, sigma_prev: Tensor, sigma: Tensor,
                          sigma_next: Tensor) -> Tensor:
    """One deterministic second-order multistep DPM-Solver++ step (midpoint form), ``sigma -> sigma_next``.

    Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095, Algorithm 2 (multistep 2M), as MixGRPO-Flash runs it
    (Tencent-Hunyuan/MixGRPO @ e5cdd6a, fastvideo/utils/sampling_utils.py l. 449-525,
    ``multistep_dpm_solver_second_order_update``, ``dpmsolver++`` / ``midpoint``, ``sde_solver=False``) and as
    diffusers ``DPMSolverMultistepScheduler.multistep_dpm_solver_second_order_update``::

        h = lambda_next - lambda,  h_0 = lambda - lambda_prev,  r_0 = h_0 / h
        D0 = x0,  D1 = (x0 - x0_prev) / r_0
        x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D0 - 0.5 alpha_next (e^{-h} - 1) D1

    Needs ``0 < sigma_next < sigma < sigma_prev <= 1``; with ``sigma_prev = 1`` (``lambda = -inf``) ``r_0 = inf``
    and ``D1 = 0``: the first-order step, as in the reference and diffusers. The final step into ``sigma_next = 0``
    is first order (Euler, which DPM-Solver++(1) equals on flow sigmas), as the reference's ``lower_order_final``.

    Args:
        sample: ``[B, *latent]`` ``x`` at ``sigma``.
        x0: ``[B, *latent]`` data prediction at ``sigma`` (``x - sigma v``).
        x0_prev: ``[B, *latent]`` data prediction of the previous step, at ``sigma_prev``.
        sigma_prev, sigma, sigma_next: 0-d or ``[B]`` fp32 sigmas.

    Returns:
        ``[B, *latent]`` fp32 ``x`` at ``sigma_next``.
    """
    shape = (-1,) + (1,) * (sample.ndim - 1)
    s_prev, s, s_next = (torch.as_tensor(v, dtype=torch.float32, device=sample.device).reshape(-1)
                         for v in (sigma_prev, sigma, sigma_next))
    if not bool(((0 < s_next) & (s_next < s) & (s < s_prev) & (s_prev <= 1)).all()):
        raise ValueError(f"dpm_solver_pp_2m_step needs 0 < sigma_next < sigma < sigma_prev <= 1, got "
                         f"{s_next.tolist()}, {s.tolist()}, {s_prev.tolist()}")
    h = _lambda(s_next) - _lambda(s)
    r0 = (_lambda(s) - _lambda(s_prev)) / h
    d0 = x0.float()
    d1 = (x0.float() - x0_prev.float()) / r0.reshape(shape)
    coef = ((1 - s_next) * torch.expm1(-h)).reshape(shape)  # alpha_next (e^{-h} - 1)
    return (s_next / s).reshape(shape) * sample.float() - coef * d0 - 0.5 * coef * d1


def flash_tail_grid(num_steps: int, last_sde: int, compress_ratio: float) -> tuple[tuple[int, int], ...]:
    """MixGRPO-Flash's schedule with the steps after the SDE window compressed, as ``(K, i)`` points
    (sigma ``adapter.sigmas(K)[i]``; ``BranchSpec.schedule``).

    Reference (Tencent-Hunyuan/MixGRPO @ e5cdd6a, fastvideo/utils/sampling_utils.py l. 31-50,
    ``dpm_apply_strategy == "post"``): with ``T`` steps on ``t_i = 1 - i / T`` (sigma = shift(t)) and ``l`` the
    last SDE step, ``n = int(max((T - l) * ratio, 1))`` times ``linspace(t_{l+1}, 0, n)`` replace the schedule's
    points from ``l + 1`` on: the ``T - l - 1`` steps after the window become ``n - 1``.

    Those times are exactly the points ``(l + 1)(n - 1) + k (T - l - 1)``, ``k = 0..n-1``, of the uniform grid
    of ``K = T (n - 1)`` steps; so the tail is ``adapter.sigmas(K)`` there for any adapter whose schedule is a
    fixed map of ``linspace(1, 0, K + 1)`` (the reference's ``sd3_time_shift``, Flux's resolution shift) -- no
    shift parameter needed (ours). Points ``0..l+1`` stay ``adapter.sigmas(T)``'s own (bit-identical window).

    Ours: ``n >= 2`` (the reference's ``n = 1`` -- ``(T - l) ratio < 2`` -- leaves a one-point tail and the
    sample stops at ``sigma_{l+1} > 0``); a window ending at the last step (``l = T - 1``) changes nothing.

    Args:
        num_steps: ``T`` steps of the uncompressed schedule.
        last_sde: ``l``, the window's last step, in ``[0, T)``.
        compress_ratio: the reference's ``dpm_post_compress_ratio`` in ``(0, 1]``.

    Returns:
        ``l + n + 1`` points ``(K, i)`` (``l + n`` steps; ``T + 1`` points ``(T, i)`` when nothing is compressed).
    """
    if not 0 <= last_sde < num_steps:
        raise ValueError(f"last_sde must be in [0, num_steps={num_steps}), got {last_sde}")
    if not 0 < compress_ratio <= 1:
        raise ValueError(f"compress_ratio must be in (0, 1], got {compress_ratio}")
    tail = num_steps - last_sde - 1
    if tail == 0:
        return tuple((num_steps, i) for i in range(num_steps + 1))
    n = max(int(max((num_steps - last_sde) * compress_ratio, 1)), 2)  # sampling_utils.py l. 44; ours: n >= 2
    grid = num_steps * (n - 1)
    head = tuple((num_steps, i) for i in range(last_sde + 2))
    return head + tuple((grid, (last_sde + 1) * (n - 1) + k * tail) for k in range(1, n))


def tail_steps(num_steps: int, last_sde: int, compress_ratio: float) -> int:
    """Number of ODE steps after the window's last step ``l``: ``len(flash_tail_grid(...)) - l - 2``."""
    return len(flash_tail_grid(num_steps, last_sde, compress_ratio)) - last_sde - 2

