"""DDPM (epsilon / v-prediction) <-> flow-matching conversions for the Stable Diffusion UNets.

SD 1.x / 2.x / XL are DDPM models (Ho et al. 2020, Eq. 4): ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``
with ``a = alpha_bar_t`` (``alphas_cumprod[t]``). flowalign's samplers use the flow convention
``x_f = (1 - sigma) x0 + sigma eps`` and the velocity ``v = eps - x0``. Dividing the DDPM latent by
``sqrt(a) + sqrt(1 - a)`` gives exactly a flow latent (the "DDPM is a rescaled flow" identity of
Karras et al. 2022, Eq. 4 / Lipman et al. 2023, Sec. 4.1; used by Flow-GRPO's discussion of DDIM):

    x_f = x_t / (sqrt(a) + sqrt(1 - a)),     sigma = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)),

and conversely ``a = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)``,
``x_t = x_f / sqrt((1 - sigma)^2 + sigma^2)``. ``x0`` and ``eps`` are the same in both spaces.

DDIM (eta = 0) is Euler in flow space (Song et al. 2021, Eq. 12 with sigma_t = 0):
``x_prev = sqrt(a') x0_hat + sqrt(1 - a') eps_hat``; dividing by ``sqrt(a') + sqrt(1 - a')`` gives
``x_f' = (1 - s') x0_hat + s' eps_hat``, while the Euler step from
``x_f = (1 - s) x0_hat + s eps_hat`` (true by the definition of ``x0_hat``) is
``x_f + (s' - s)(eps_hat - x0_hat) = (1 - s') x0_hat + s' eps_hat`` -- the same point. So sampling
the flow ODE with Euler on the DDIM schedule mapped to sigmas reproduces DDIM exactly.

Every function is pure; schedule arithmetic runs in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _bcast(t: Tensor, ndim: int) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` (``ndim`` dims)."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def flow_sigma(alpha_bar: Tensor) -> Tensor:
    """Flow sigma of a DDPM noise level: ``sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))``; any shape."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if bool(((a < 0) | (a > 1)).any()):
        raise ValueError(f"alpha_bar must lie in [0, 1], got {a.flatten()[:8].tolist()}")
    return torch.sqrt(1 - a) / (torch.sqrt(a) + torch.sqrt(1 - a))


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """Inverse of :func:`flow_sigma`: ``a = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)`` (float64)."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if bool(((s < 0) | (s > 1)).any()):
        raise ValueError(f"sigma must lie in [0, 1] (flow convention), got {s.flatten()[:8].tolist()}")
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def to_ddpm(x_f: Tensor, sigma: Tensor | float) -> Tensor:
    """Flow latent ``[B, ...]`` at ``sigma`` (float or ``[B]``) -> DDPM latent
    ``x_t = x_f / sqrt((1 - sigma)^2 + sigma^2)`` (= ``x_f (sqrt(a) + sqrt(1 - a))``)."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x_f.shape[0])
    scale = 1 / torch.sqrt((1 - s) ** 2 + s**2)
    return x_f * _bcast(scale, x_f.ndim).to(device=x_f.device, dtype=torch.float32)


def from_ddpm(x_t: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """DDPM latent ``[B, ...]`` at ``alpha_bar`` (float or ``[B]``) -> flow latent
    ``x_f = x_t / (sqrt(a) + sqrt(1 - a))`` at sigma = :func:`flow_sigma` (a)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1).expand(x_t.shape[0])
    scale = 1 / (torch.sqrt(a) + torch.sqrt(1 - a))
    return x_t * _bcast(scale, x_t.ndim).to(device=x_t.device, dtype=torch.float32)


def flow_velocity(model_output: Tensor, x_t: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """Flow velocity ``v = eps - x0`` from a DDPM UNet output.

    Args:
        model_output: ``[B, ...]`` the UNet output: ``eps`` (``"epsilon"``) or
            ``v_pred = sqrt(a) eps - sqrt(1 - a) x0`` (``"v_prediction"``, Salimans & Ho 2022, Eq. 9).
        x_t: ``[B, ...]`` the DDPM latent the UNet saw.
        alpha_bar: ``[B]`` the noise level ``a`` of ``x_t``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.

    ``epsilon``: ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)`` (DDPM Eq. 15; needs ``a > 0``).
    ``v_prediction``: ``eps = sqrt(a) v_pred + sqrt(1 - a) x_t``, ``x0 = sqrt(a) x_t - sqrt(1 - a) v_pred``.
    Returns ``[B, ...]`` in ``model_output``'s dtype (arithmetic in fp32).
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    s0 = _bcast(torch.sqrt(a), x_t.ndim).float()
    s1 = _bcast(torch.sqrt(1 - a), x_t.ndim).float()
    out, x = model_output.float(), x_t.float()
    if prediction_type == "epsilon":
        if bool((a <= 0).any()):
            raise ValueError("prediction_type='epsilon' cannot give x0 at alpha_bar = 0 (a zero-terminal-SNR schedule needs v_prediction)")
        eps, x0 = out, (x - s1 * out) / s0
    elif prediction_type == "v_prediction":
        eps, x0 = s0 * out + s1 * x, s0 * x - s1 * out
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    return (eps - x0).to(model_output.dtype)


def timesteps_from_sigmas(sigma: Tensor, sigma_table: Tensor) -> Tensor:
    """Continuous UNet timestep of each flow sigma.

    Args:
        sigma: ``[B]`` flow sigmas.
        sigma_table: ``[N]`` ascending, ``sigma_table[k]`` = flow sigma of training timestep ``k``.

    A sigma equal to a table entry maps to exactly that integer timestep (so predictions on the
    schedule of :class:`DDIMFlowSchedule` see the same timesteps as the diffusers pipeline);
    sigmas in between are linearly interpolated in sigma (the UNet's sinusoidal timestep embedding
    accepts fractional timesteps), e.g. for matching losses that draw sigma at random. Sigmas
    outside ``[sigma_table[0], sigma_table[-1]]`` raise ``ValueError``.
    """
    table = sigma_table.to(device=sigma.device, dtype=torch.float64)
    s = sigma.to(torch.float64).reshape(-1)
    bad = (s < table[0]) | (s > table[-1])
    if bool(bad.any()):
        raise ValueError(f"sigma={float(s[bad][0]):.6g} is outside the model's noise range "
                         f"[{float(table[0]):.6g}, {float(table[-1]):.6g}] (timesteps 0..{len(table) - 1})")
    hi = torch.searchsorted(table, s).clamp(1, len(table) - 1)
    lo = hi - 1
    w = (s - table[lo]) / (table[hi] - table[lo])
    return lo.to(torch.float64) + w


class DDIMFlowSchedule:
    """The DDIM schedule of a DDPM scheduler config, expressed as flow sigmas.

    Args:
        scheduler_config: the model's scheduler config (any diffusers DDPM-family scheduler:
            betas, ``steps_offset``, ``set_alpha_to_one``, ``prediction_type``,
            ``rescale_betas_zero_snr``); it is loaded as a ``DDIMScheduler``.
        timestep_spacing: ``"trailing"`` (default; first timestep is always ``N - 1``, as Lin et
            al. 2024 recommend), ``"leading"`` (diffusers' / DDPO's default; the first timestep
            depends on the step count) or ``"linspace"``; ``None`` keeps the config's value.

    ``sigmas(T)`` are the flow sigmas of ``DDIMScheduler.set_timesteps(T).timesteps`` followed by
    that of ``final_alpha_cumprod``; Euler on them equals ``DDIMScheduler.step(eta=0)`` exactly
    whenever consecutive timesteps differ by ``N // T`` (always for "leading"; for "trailing" when
    ``T`` divides ``N``). Otherwise diffusers' DDIM steps to ``t - N // T`` but evaluates the next
    step at another timestep; the sigmas here follow the timesteps actually evaluated (Song et al.'s
    DDIM on the sub-sequence tau, Sec. 4.2). The flow ODE never clips ``x0_hat``: it matches DDIM with
    ``clip_sample=False`` (SD's config; SDXL's Euler config leaves DDIM's default ``True``).
    """

    def __init__(self, scheduler_config: dict, timestep_spacing: str | None = "trailing"):
        from diffusers import DDIMScheduler

        overrides = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
        if overrides and timestep_spacing not in ("trailing", "leading", "linspace"):
            raise ValueError(f"timestep_spacing={timestep_spacing!r}; use 'trailing', 'leading', 'linspace' or None")
        self.scheduler = DDIMScheduler.from_config(dict(scheduler_config), **overrides)
        self.prediction_type: str = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type={self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        self.alphas_cumprod: Tensor = self.scheduler.alphas_cumprod.clone()  # [N] fp32, alpha_bar_t
        self.sigma_table: Tensor = flow_sigma(self.alphas_cumprod).float()  # [N] ascending in t
        self.final_sigma: float = float(flow_sigma(torch.as_tensor(float(self.scheduler.final_alpha_cumprod))).float())

    @property
    def spacing(self) -> str:
        return self.scheduler.config.timestep_spacing

    def timesteps(self, num_steps: int) -> Tensor:
        """``[T]`` long, the DDIM timesteps (descending) of ``set_timesteps(num_steps)``."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.timesteps.clone().long()

    def sigmas(self, num_steps: int) -> Tensor:
        """``[T + 1]`` fp32 descending flow sigmas: the timesteps' sigmas, then the final alpha's."""
        ts = self.timesteps(num_steps)
        return torch.cat([self.sigma_table[ts], torch.tensor([self.final_sigma], dtype=torch.float32)])

    def first_sigma_is_fixed(self) -> bool:
        """True when ``sigmas(T)[0]`` does not depend on ``T`` (every spacing but "leading")."""
        return self.spacing != "leading"

    def unet_timesteps(self, sigma: Tensor) -> Tensor:
        """``[B]`` float timesteps of flow sigmas (see :func:`timesteps_from_sigmas`)."""
        return timesteps_from_sigmas(sigma, self.sigma_table)
