"""Single denoising steps with Gaussian transition log-probabilities (docs/ARCHITECTURE.md, "Samplers").

Flow convention (see :mod:`flowalign.pipelines.base`): ``x_t = (1 - sigma) x0 + sigma eps`` and the
model output is the velocity ``v = eps - x0``; sigma descends from 1 (noise) to 0 (data) and a step
goes ``sigma -> sigma_next`` with ``delta = sigma - sigma_next > 0``.

Every function here is pure: it takes the model output, the current latent and the schedule values,
draws noise from an explicit ``generator`` (or takes the sampled ``prev_sample`` to re-score it) and
returns fp32 tensors. ``sigma``, ``sigma_next``, ``noise_level``, ``alpha_prod_t``,
``alpha_prod_t_prev`` and ``eta`` are Python floats or ``[B]`` tensors (one value per sample,
broadcast over the latent dims).

Log-probabilities are the Gaussian log-density of the transition **averaged** (not summed) over the
non-batch dims, the convention of the reference implementations (Flow-GRPO
``sde_step_with_logprob``, DanceGRPO ``flux_step``, DDPO ``ddim_step_with_logprob``). The mean keeps
the policy ratio ``exp(log_prob - log_prob_old)`` in a usable range for large latents; note it is
the per-element log-density, i.e. ``sum / numel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flowalign.samplers.sage import sage_mean, sage_variance

__all__ = ["CPS_LOG_PROBS", "SDE_KINDS", "StepOutput", "cps_flow_grpo_log_prob", "gaussian_log_prob", "ode_step", "sde_step",
           "ddim_step"]

SDE_KINDS = ("flow_grpo", "dance", "cps", "sage")
#: forms of the CPS transition log-prob (``sampling.cps_log_prob``)
CPS_LOG_PROBS = ("exact", "flow_grpo")

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """The result of one stochastic step for a batch of ``B`` latents.

    Attributes:
        prev_sample: ``[B, *latent]`` fp32, the sampled (or given) next latent.
        log_prob: ``[B]`` fp32, Gaussian log-density of ``prev_sample`` under the transition, MEAN
            over the non-batch dims; 0 where the transition is deterministic.
        mean: ``[B, *latent]`` fp32, the transition mean (the ODE result where deterministic).
        std: ``[B]`` fp32, the transition std (0 where deterministic).
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _check_latent(name: str, tensor: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension [B, ...], got a 0-d tensor")
    if like is not None and tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the sample's shape {tuple(like.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def _per_sample(name: str, value: float | Tensor, batch: int, device: torch.device, check: bool = True) -> Tensor:
    """A float or ``[B]`` (or one-element) tensor as a ``[B]`` fp32 tensor on ``device`` (``check``:
    refuse non-finite values, a host sync for a tensor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    if not isinstance(value, Tensor):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return torch.full((batch,), float(value), dtype=torch.float32, device=device)
    t = value.to(device=device, dtype=torch.float32)
    if t.numel() == 1:
        t = t.reshape(()).expand(batch)
    elif t.shape != (batch,):
        raise ValueError(f"{name} must be a float or a [B={batch}] tensor, got shape {tuple(t.shape)}")
    if check and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {_show(t)}")
    return t.contiguous()


def _show(t: Tensor) -> str:
    values = t.flatten().tolist()
    return str(values[:8])[:-1] + ", ...]" if len(values) > 8 else str(values)


def _first_bad(mask: Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def _require(ok: Tensor, message: str, *values: tuple[str, Tensor]) -> None:
    """Raise ``ValueError(message + the offending per-sample values)`` where ``ok`` is False."""
    if bool(ok.all()):
        return
    i = _first_bad(~ok)
    got = ", ".join(f"{name}={float(v[i]):.6g}" for name, v in values)
    raise ValueError(f"{message}; got {got} at batch index {i}")


def _bcast(t: Tensor, ndim: int) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dims, to broadcast over the latent dims."""
    return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def _draw_noise(sample: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard-normal fp32 noise shaped like ``sample``, drawn on the generator's device and then
    moved, so a CPU generator gives the same noise whatever device the latents live on."""
    device = generator.device if generator is not None else sample.device
    return torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32).to(sample.device)


def _flow_schedule(
    sample: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, strict: bool, check: bool = True
) -> tuple[Tensor, Tensor]:
    """``[B]`` fp32 ``sigma`` and ``sigma_next``, validated (``sigma_next < sigma`` if ``strict``)
    unless ``check`` is False."""
    b, dev = sample.shape[0], sample.device
    s = _per_sample("sigma", sigma, b, dev, check)
    sn = _per_sample("sigma_next", sigma_next, b, dev, check)
    if not check:
        return s, sn
    _require((s >= 0) & (s <= 1), "sigma must lie in [0, 1] (flow convention, 1 = noise)", ("sigma", s))
    _require((sn >= 0) & (sn <= 1), "sigma_next must lie in [0, 1] (flow convention, 1 = noise)", ("sigma_next", sn))
    if strict:
        _require(sn < s, "sigma_next must be < sigma (sigma descends from 1 to 0, delta = sigma - sigma_next > 0)",
                 ("sigma_next", sn), ("sigma", s))
    else:
        _require(sn <= s, "sigma_next must be <= sigma (sigma descends from 1 to 0)", ("sigma_next", sn), ("sigma", s))
    return s, sn


# --------------------------------------------------------------------------------------------
# log-density
# --------------------------------------------------------------------------------------------
def gaussian_log_prob(x: Tensor, mean: Tensor, std: float | Tensor, *, check: bool = True) -> Tensor:
    """Per-sample Gaussian log-density, averaged over the non-batch dims.

    ``log N(x; mean, std^2) = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)`` per element
    (computed in fp32), then the MEAN over every dim but the first -- the convention of Flow-GRPO /
    DanceGRPO / DDPO, i.e. the per-element log-density, not the joint one (which is ``numel`` times
    larger). Where ``std == 0`` (a deterministic transition) the result is 0, with a finite gradient.

    Args:
        x: ``[B, *latent]`` the point at which to evaluate the density.
        mean: ``[B, *latent]`` the Gaussian mean.
        std: ``[B]`` tensor or scalar, one isotropic std per sample (>= 0).
        check: refuse a negative or non-finite ``std`` (a host sync for a tensor).

    Returns:
        ``[B]`` fp32 log-probabilities.
    """
    _check_latent("x", x)
    _check_latent("mean", mean, like=x)
    b = x.shape[0]
    s = _per_sample("std", std, b, x.device, check)
    if check:
        _require(s >= 0, "std must be >= 0", ("std", s))
    positive = s > 0
    # Use std = 1 where std == 0 so the unused branch of torch.where stays finite (no NaN gradient).
    s_safe = _bcast(torch.where(positive, s, torch.ones_like(s)), x.ndim)
    diff = x.float() - mean.float()
    elementwise = -(diff**2) / (2 * s_safe**2) - torch.log(s_safe) - _HALF_LOG_2PI
    per_sample = elementwise.reshape(b, -1).mean(dim=1)
    return torch.where(positive, per_sample, torch.zeros_like(per_sample))


def cps_flow_grpo_log_prob(x: Tensor, mean: Tensor) -> Tensor:
    """Flow-GRPO's CPS "log-prob": ``-mean((x - mean)^2)`` over the non-batch dims (fp32, ``[B]``).

    The reference's ``sde_type == "cps"`` branch (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``;
    IamCreateAI/FlowCPS @ b402c7a, line 67, ``# remove all constants``) drops ``-log std - log sqrt(2 pi)``
    and the ``1 / (2 std^2)`` factor of the Gaussian log-density, so its policy ratios are the exact
    ones raised to the power ``2 std^2``. Not a density: only differences of it (ratios) are used.
    """
    _check_latent("x", x)
    _check_latent("mean", mean, like=x)
    return -(x.float() - mean.float()).pow(2).reshape(x.shape[0], -1).mean(dim=1)


# --------------------------------------------------------------------------------------------
# flow-matching steps
# --------------------------------------------------------------------------------------------
def ode_step(model_output: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, sample: Tensor) -> Tensor:
    """Euler step of the probability-flow ODE ``dx/dsigma = v`` (rectified flow, Liu et al. 2023;
    as diffusers ``FlowMatchEulerDiscreteScheduler.step``): ``x' = x + (sigma_next - sigma) v``.

    Args:
        model_output: ``[B, *latent]`` velocity ``v = eps - x0``.
        sigma, sigma_next: floats or ``[B]``, with ``0 <= sigma_next <= sigma <= 1``.
        sample: ``[B, *latent]`` the current latent ``x_t``.

    Returns:
        ``[B, *latent]`` fp32 next latent.
    """
    _check_latent("sample", sample)
    _check_latent("model_output", model_output, like=sample)
    s, sn = _flow_schedule(sample, sigma, sigma_next, strict=False)
    return _euler(sample.float(), model_output.float(), s, sn)


def _euler(x: Tensor, v: Tensor, s: Tensor, sn: Tensor) -> Tensor:
    """``x + (sigma_next - sigma) v`` with ``[B]`` fp32 sigmas (as diffusers, which stores sigmas in fp32)."""
    return x + _bcast(sn - s, x.ndim) * v


def _sde_mean_std(kind: str, x: Tensor, v: Tensor, s: Tensor, sn: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Transition mean ``[B, *latent]`` and std ``[B]`` of one SDE step (all fp32)."""
    nd = x.ndim
    delta = s - sn  # [B], > 0
    if kind in ("flow_grpo", "dance"):
        if kind == "flow_grpo":
            # Flow-GRPO (Liu et al. 2025, Eq. 9): sigma_t = a * sqrt(t / (1 - t)). At t = 1 the
            # reference code divides by 1 - sigmas[1] instead, i.e. by 1 - sigma_next here.
            denom = 1 - torch.where(s == 1, sn, s)
            std_t = a * torch.sqrt(s / denom)
        else:
            # DanceGRPO (Xue et al. 2025, flux_step with sde_solver): constant diffusion eta.
            std_t = a
        # Reverse-time SDE with the marginals of the flow (Flow-GRPO Eq. 9):
        #   dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw, stepped by Euler-Maruyama;
        # the bracket is v - sigma_t^2/2 * score with score = -(x + (1 - t) v) / t.
        sb, std_tb, db = _bcast(s, nd), _bcast(std_t, nd), _bcast(delta, nd)
        mean = x - db * (v + std_tb**2 / (2 * sb) * (x + (1 - sb) * v))
        std = std_t * torch.sqrt(delta)
    elif kind == "cps":
        # Coefficients-Preserving Sampling (Wang & Yu 2025, arXiv:2509.05952; Flow-GRPO's
        # sde_type="cps"): DDIM-style, keeps the coefficients of x0 and of the (unit) noise at
        # sigma_next exactly: x' = (1 - s') x0_hat + sqrt(s'^2 - std^2) x1_hat + std z.
        std = sn * torch.sin(a * (math.pi / 2))
        sb, snb = _bcast(s, nd), _bcast(sn, nd)
        x0_hat = x - sb * v
        x1_hat = x + (1 - sb) * v
        # clamp: sn^2 - std^2 = (sn cos(a pi/2))^2 >= 0, but may round to -ulp at a = 1.
        noise_coef = torch.sqrt((sn**2 - std**2).clamp_min(0))
        mean = (1 - snb) * x0_hat + _bcast(noise_coef, nd) * x1_hat
    elif kind == "sage":
        # SAGE-GRPO (Zheng et al. 2026, arXiv:2603.21872 §3.2.1): the diffusion integrated over the step
        # (logarithmic curvature correction) instead of Euler's g(sigma)^2 delta; flowalign.samplers.sage.
        var = sage_variance(s, sn, a)
        mean, std = sage_mean(x, v, s, sn, var), torch.sqrt(var)
    else:  # pragma: no cover - checked by the caller
        raise AssertionError(kind)
    return mean, std


def sde_step(
    model_output: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sample: Tensor,
    *,
    kind: str,
    noise_level: float | Tensor,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    cps_log_prob: str = "exact",
    check: bool = True,
) -> StepOutput:
    """One stochastic step of a flow-matching model and the log-density of its result.

    Kinds (``a`` = ``noise_level``, ``delta = sigma - sigma_next``):

    * ``"flow_grpo"`` (Flow-GRPO, Liu et al. 2025, Eq. 9 / ``sde_step_with_logprob``):
      ``std_t = a sqrt(sigma / (1 - sigma))`` (at ``sigma = 1`` the denominator uses ``sigma_next``),
      ``mean = x - delta [v + std_t^2 / (2 sigma) (x + (1 - sigma) v)]``, transition std
      ``std_t sqrt(delta)``.
    * ``"dance"`` (DanceGRPO, Xue et al. 2025): the same drift with constant ``std_t = a``.
    * ``"cps"`` (Coefficients-Preserving Sampling, Wang & Yu 2025): ``std = sigma_next sin(a pi/2)``,
      ``x0_hat = x - sigma v``, ``x1_hat = x + (1 - sigma) v``,
      ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat``. Needs ``a <= 1``.
    * ``"sage"`` (SAGE-GRPO, Zheng et al. 2026, arXiv:2603.21872 §3.2.1; :mod:`flowalign.samplers.sage`):
      variance ``a^2 [log((1 - sigma_next) / (1 - sigma)) - delta]`` (the integral of Flow-GRPO's ``g^2``
      over the step), ``mean = x - delta v - var / (2 sigma) (x + (1 - sigma) v)``.

    Where ``noise_level == 0`` (per sample) the step is exactly :func:`ode_step` (same tensor
    values), with ``log_prob = 0`` and ``std = 0``.

    Noise: when ``prev_sample`` is None, ``[B, *latent]`` standard-normal fp32 noise is drawn from
    ``generator`` on the generator's device (then moved), always -- also for deterministic samples --
    so the random stream does not depend on which samples are deterministic. When ``prev_sample``
    is given nothing is drawn (``generator`` is unused): the step only scores it, which is how the
    trainer recomputes log-probs (same weights => identical log-prob => ratio exactly 1). The
    log-density is taken at ``prev_sample.detach()`` (as the reference implementations), so its
    gradient flows through ``mean`` only.

    Args:
        model_output: ``[B, *latent]`` velocity ``v = eps - x0``.
        sigma, sigma_next: floats or ``[B]``, ``0 <= sigma_next < sigma <= 1``.
        sample: ``[B, *latent]`` the current latent ``x_t``.
        kind: one of :data:`SDE_KINDS`.
        noise_level: float or ``[B]``, ``>= 0`` (``a`` for flow_grpo / cps, ``eta`` for dance).
        generator: source of the noise; None uses the global RNG.
        prev_sample: ``[B, *latent]`` a previously sampled next latent to score instead of sampling.
        noise: ``[B, *latent]`` standard-normal noise to sample with instead of drawing it from
            ``generator`` (the rollout engine draws a whole group's noise on every rank and keeps
            its rows, :class:`flowalign.rollout.spec.Shard`).
        cps_log_prob: ``kind="cps"`` only: ``"exact"`` (the Gaussian log-density) or ``"flow_grpo"``
            (:func:`cps_flow_grpo_log_prob`, Flow-GRPO's constant-free form; 0 where the step is
            deterministic). Rollout and update must use the same form (ratio exactly 1 on-policy).
        check: check the values of ``sigma``, ``sigma_next`` and ``noise_level`` (each check reads
            the device: a host sync). The trainer, which rescores transitions the rollout sampled
            (and checked) with the same schedule, passes ``False``; shapes and kinds are checked
            either way.

    Returns:
        :class:`StepOutput` with fp32 ``prev_sample``, ``log_prob [B]``, ``mean``, ``std [B]``.
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind={kind!r}; valid kinds are {', '.join(map(repr, SDE_KINDS))}")
    if cps_log_prob not in CPS_LOG_PROBS:
        raise ValueError(f"unknown cps_log_prob={cps_log_prob!r}; valid forms are {', '.join(map(repr, CPS_LOG_PROBS))}")
    _check_latent("sample", sample)
    _check_latent("model_output", model_output, like=sample)
    if prev_sample is not None:
        _check_latent("prev_sample", prev_sample, like=sample)
    s, sn = _flow_schedule(sample, sigma, sigma_next, strict=True, check=check)
    a = _per_sample("noise_level", noise_level, sample.shape[0], sample.device, check)
    if check:
        _require(a >= 0, "noise_level must be >= 0", ("noise_level", a))
    if check and kind == "cps":
        _require(a <= 1, "noise_level must be <= 1 for kind='cps' (std = sigma_next * sin(noise_level * pi / 2))",
                 ("noise_level", a))

    x, v = sample.float(), model_output.float()
    mean, std = _sde_mean_std(kind, x, v, s, sn, a)
    ode = _euler(x, v, s, sn)
    # noise_level 0 => std is exactly 0 for every kind; make the mean (hence the sample) the ODE
    # step bit-for-bit, which the algebraically equal SDE means are not in floating point.
    mean = torch.where(_bcast(a == 0, x.ndim), ode, mean)

    if prev_sample is None:
        if noise is None:
            noise = _draw_noise(x, generator)
        else:
            _check_latent("noise", noise, like=sample)
            noise = noise.to(device=x.device, dtype=torch.float32)
        prev = mean + _bcast(std, x.ndim) * noise  # == ode exactly where deterministic (std 0)
    else:
        prev = prev_sample.float()
    if kind == "cps" and cps_log_prob == "flow_grpo":
        log_prob = torch.where(std > 0, cps_flow_grpo_log_prob(prev.detach(), mean), torch.zeros_like(std))
    else:
        log_prob = gaussian_log_prob(prev.detach(), mean, std, check=check)
    return StepOutput(prev_sample=prev, log_prob=log_prob, mean=mean, std=std)


# --------------------------------------------------------------------------------------------
# DDIM (epsilon-prediction UNets)
# --------------------------------------------------------------------------------------------
def ddim_step(
    model_output: Tensor,
    alpha_prod_t: float | Tensor,
    alpha_prod_t_prev: float | Tensor,
    sample: Tensor,
    *,
    eta: float | Tensor,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """DDIM step with stochasticity ``eta`` and its log-density (Song et al. 2021, Eq. 12 and 16;
    in the form of DDPO's ``ddim_step_with_logprob``, Black et al. 2023).

    ``x0_hat = (x - sqrt(1 - a_t) eps) / sqrt(a_t)``,
    ``sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)``,
    ``mean = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps``, ``x' = mean + sigma_t z``.
    ``eta = 0`` is deterministic DDIM (log_prob 0, std 0), ``eta = 1`` the DDPM posterior.
    No clipping of ``x0_hat`` (diffusers ``clip_sample=False``). Noise and ``prev_sample`` are handled
    as in :func:`sde_step`.

    Args:
        model_output: ``[B, *latent]`` predicted noise ``eps``.
        alpha_prod_t, alpha_prod_t_prev: floats or ``[B]``, the cumulative alpha products at the
            current and the next (less noisy) timestep, ``0 < alpha_prod_t <= alpha_prod_t_prev <= 1``
            and ``alpha_prod_t < 1``.
        sample: ``[B, *latent]`` the current latent ``x_t``.
        eta: float or ``[B]`` in ``[0, 1]``.
        generator: source of the noise; None uses the global RNG.
        prev_sample: ``[B, *latent]`` a previously sampled next latent to score instead of sampling.

    Returns:
        :class:`StepOutput` with fp32 ``prev_sample``, ``log_prob [B]``, ``mean``, ``std [B]``.
    """
    _check_latent("sample", sample)
    _check_latent("model_output", model_output, like=sample)
    if prev_sample is not None:
        _check_latent("prev_sample", prev_sample, like=sample)
    b, dev, nd = sample.shape[0], sample.device, sample.ndim
    at = _per_sample("alpha_prod_t", alpha_prod_t, b, dev)
    ap = _per_sample("alpha_prod_t_prev", alpha_prod_t_prev, b, dev)
    e = _per_sample("eta", eta, b, dev)
    _require((at > 0) & (at < 1), "alpha_prod_t must lie in (0, 1)", ("alpha_prod_t", at))
    _require((ap > 0) & (ap <= 1), "alpha_prod_t_prev must lie in (0, 1]", ("alpha_prod_t_prev", ap))
    _require(ap >= at, "alpha_prod_t_prev must be >= alpha_prod_t (the step goes towards less noise)",
             ("alpha_prod_t_prev", ap), ("alpha_prod_t", at))
    _require((e >= 0) & (e <= 1), "eta must lie in [0, 1]", ("eta", e))

    x, eps = sample.float(), model_output.float()
    beta_t = 1 - at
    # DDIM Eq. 12, "predicted x0".
    x0_hat = (x - _bcast(torch.sqrt(beta_t), nd) * eps) / _bcast(torch.sqrt(at), nd)
    # DDIM Eq. 16: sigma_t(eta).
    variance = (1 - ap) / beta_t * (1 - at / ap)
    std = e * torch.sqrt(variance)
    # "direction pointing to x_t"; 1 - a_prev - sigma_t^2 >= 0 for eta <= 1 (clamp rounding only).
    direction = _bcast(torch.sqrt((1 - ap - std**2).clamp_min(0)), nd) * eps
    mean = _bcast(torch.sqrt(ap), nd) * x0_hat + direction

    if prev_sample is None:
        noise = _draw_noise(x, generator)
        prev = mean + _bcast(std, nd) * noise  # == mean exactly where eta = 0 (std 0)
    else:
        prev = prev_sample.float()
    log_prob = gaussian_log_prob(prev.detach(), mean, std)
    return StepOutput(prev_sample=prev, log_prob=log_prob, mean=mean, std=std)
