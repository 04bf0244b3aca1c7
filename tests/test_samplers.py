"""Tests for flowalign.samplers: every step against an independent computation.

References used here: torch.distributions.Normal, diffusers' FlowMatchEulerDiscreteScheduler
(deterministic, and its ``stochastic_sampling`` mode, which is CPS at noise_level 1) and
DDIMScheduler, literal transcriptions of the Flow-GRPO / DanceGRPO reference formulas (a different
algebraic form than the library's), and closed-form marginals of Gaussian / point-mass data.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from flowalign.samplers import SDE_KINDS, StepOutput, ddim_step, gaussian_log_prob, ode_step, sde_step

LATENT = (4, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny tensor ops; on a shared 2-core machine intra-op threading makes
    each of them ~10x slower, so run single-threaded (and restore the setting afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fake_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth, non-linear stand-in for a model output (deterministic in x and sigma)."""
    return torch.tanh(x) * (1.5 - sigma) + 0.3 * torch.cos(3 * x) - 0.2 * sigma


# --------------------------------------------------------------------------------------------
# 1. gaussian_log_prob
# --------------------------------------------------------------------------------------------
def test_gaussian_log_prob_matches_torch_normal_mean_over_latent_dims():
    g = _gen(0)
    x, mean = torch.randn(5, *LATENT, generator=g), torch.randn(5, *LATENT, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.7])
    ref = Normal(mean, std.view(5, 1, 1, 1).expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref, rtol=1e-6, atol=1e-5)
    # A scalar std broadcasts to every sample.
    ref_scalar = Normal(mean, 0.3).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3), ref_scalar, rtol=1e-6, atol=1e-5)
    # 1-D latents: no reduction at all (mean over zero latent dims must not collapse the batch).
    torch.testing.assert_close(gaussian_log_prob(x[:, 0, 0, 0], mean[:, 0, 0, 0], std),
                               Normal(mean[:, 0, 0, 0], std).log_prob(x[:, 0, 0, 0]), rtol=1e-6, atol=1e-5)


def test_gaussian_log_prob_zero_std_is_zero_with_finite_gradient():
    g = _gen(1)
    x = torch.randn(3, *LATENT, generator=g)
    mean = torch.randn(3, *LATENT, generator=g, requires_grad=True)
    std = torch.tensor([0.0, 0.7, 0.0])
    lp = gaussian_log_prob(x, mean, std)
    assert lp[0] == 0 and lp[2] == 0 and lp[1] != 0
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all()
    assert (mean.grad[0] == 0).all() and (mean.grad[1] != 0).any()


# --------------------------------------------------------------------------------------------
# 2. ODE step vs diffusers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_step_matches_flow_match_euler_scheduler_over_full_schedule(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(28)
    sigmas = scheduler.sigmas
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 29
    x_ref = x_ours = torch.randn(3, *LATENT, generator=_gen(2))
    for i, t in enumerate(scheduler.timesteps):
        v_ref = _fake_velocity(x_ref, float(sigmas[i]))
        v_ours = _fake_velocity(x_ours, float(sigmas[i]))
        x_ref = scheduler.step(v_ref, t, x_ref).prev_sample
        # per-sample [B] sigma tensors on even steps, floats on odd ones
        if i % 2 == 0:
            s, sn = sigmas[i].expand(3), sigmas[i + 1].expand(3)
        else:
            s, sn = float(sigmas[i]), float(sigmas[i + 1])
        x_ours = ode_step(v_ours, s, sn, x_ours)
        assert x_ours.dtype == torch.float32
        assert (x_ours - x_ref).abs().max() <= 1e-6, f"step {i}"


# --------------------------------------------------------------------------------------------
# 3. noise_level 0 is the ODE step exactly; mixed batches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SDE_KINDS)
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.55, 0.41), (0.1, 0.0)])
def test_zero_noise_level_is_exactly_the_ode_step(kind, sigma, sigma_next):
    g = _gen(3)
    x, v = torch.randn(4, *LATENT, generator=g), torch.randn(4, *LATENT, generator=g)
    out = sde_step(v, sigma, sigma_next, x, kind=kind, noise_level=0.0, generator=_gen(4))
    ode = ode_step(v, sigma, sigma_next, x)
    assert torch.equal(out.prev_sample, ode) and torch.equal(out.mean, ode)
    assert torch.equal(out.log_prob, torch.zeros(4)) and torch.equal(out.std, torch.zeros(4))


@pytest.mark.parametrize("kind", SDE_KINDS)
def test_mixed_per_sample_noise_levels(kind):
    g = _gen(5)
    x, v = torch.randn(4, *LATENT, generator=g), torch.randn(4, *LATENT, generator=g)
    levels = torch.tensor([0.0, 0.8, 0.0, 0.5])
    out = sde_step(v, 0.7, 0.6, x, kind=kind, noise_level=levels, generator=_gen(6))
    ode = ode_step(v, 0.7, 0.6, x)
    for i in (0, 2):
        assert torch.equal(out.prev_sample[i], ode[i]) and out.log_prob[i] == 0 and out.std[i] == 0
    # Stochastic rows equal a scalar-noise call with the same generator seed (the noise is drawn for
    # the whole batch, so row i sees the same noise either way).
    for i in (1, 3):
        alone = sde_step(v, 0.7, 0.6, x, kind=kind, noise_level=float(levels[i]), generator=_gen(6))
        torch.testing.assert_close(out.prev_sample[i], alone.prev_sample[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.log_prob[i], alone.log_prob[i], rtol=0, atol=1e-6)
        assert out.std[i] > 0 and not torch.equal(out.prev_sample[i], ode[i])


# --------------------------------------------------------------------------------------------
# 4. recomputing a stored step gives ratio exactly 1
# --------------------------------------------------------------------------------------------
def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Conv2d(LATENT[0], LATENT[0], 3, padding=1)


@pytest.mark.parametrize("kind", [*SDE_KINDS, "ddim"])
def test_recomputed_log_prob_is_identical_and_ratio_is_one(kind):
    model = _tiny_model()
    x = torch.randn(6, *LATENT, generator=_gen(8))

    def step(prev_sample=None, generator=None):
        out = model(x)
        if kind == "ddim":
            return ddim_step(out, 0.3, 0.45, x, eta=1.0, generator=generator, prev_sample=prev_sample)
        return sde_step(out, 0.8, 0.7, x, kind=kind, noise_level=0.7, generator=generator, prev_sample=prev_sample)

    with torch.no_grad():  # rollout
        old = step(generator=_gen(9))
    new = step(prev_sample=old.prev_sample)  # training pass, with grad
    assert torch.equal(new.log_prob, old.log_prob)
    assert torch.equal(torch.exp(new.log_prob - old.log_prob), torch.ones(6))
    assert torch.equal(new.prev_sample, old.prev_sample) and torch.equal(new.mean, old.mean)
    new.log_prob.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
    # Changing the weights changes the log-prob (the ratio is not trivially 1).
    with torch.no_grad():
        model.weight.add_(0.05)
        assert not torch.equal(step(prev_sample=old.prev_sample).log_prob, old.log_prob)


# --------------------------------------------------------------------------------------------
# 5. DDIM vs diffusers DDIMScheduler
# --------------------------------------------------------------------------------------------
def _sd_ddim_scheduler(steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


def _alphas(scheduler: DDIMScheduler, t: int) -> tuple[float, float]:
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return float(scheduler.alphas_cumprod[t]), float(a_prev)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers_ddim_scheduler(eta):
    scheduler = _sd_ddim_scheduler(10)
    x_ref = x_ours = torch.randn(3, *LATENT, generator=_gen(10))
    for i, t in enumerate(scheduler.timesteps):
        eps_ref, eps_ours = 0.8 * torch.tanh(x_ref), 0.8 * torch.tanh(x_ours)
        noise = torch.randn(x_ref.shape, generator=_gen(100 + i))
        kwargs = {"variance_noise": noise} if eta > 0 else {}
        x_ref = scheduler.step(eps_ref, t, x_ref, eta=eta, **kwargs).prev_sample
        a_t, a_prev = _alphas(scheduler, int(t))
        out = ddim_step(eps_ours, a_t, a_prev, x_ours, eta=eta, generator=_gen(100 + i))
        x_ours = out.prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5, msg=f"step {i}")
        if eta == 0:
            assert torch.equal(out.std, torch.zeros(3)) and torch.equal(out.log_prob, torch.zeros(3))
            assert torch.equal(out.prev_sample, out.mean)
        else:
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # diffusers _get_variance
            torch.testing.assert_close(out.std, torch.full((3,), eta * math.sqrt(var)), rtol=1e-5, atol=1e-7)
            if out.std[0] > 0:
                ref_lp = Normal(out.mean, out.std.view(3, 1, 1, 1)).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
                torch.testing.assert_close(out.log_prob, ref_lp, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# 6. marginal preservation on analytic data
# --------------------------------------------------------------------------------------------
def _gaussian_velocity(x: torch.Tensor, sigma: float, s2: float) -> torch.Tensor:
    """Exact v(x_t) = E[eps - x0 | x_t] for x0 ~ N(0, s2): (sigma - (1-sigma) s2) / ((1-sigma)^2 s2 + sigma^2) x_t."""
    return (sigma - (1 - sigma) * s2) / ((1 - sigma) ** 2 * s2 + sigma**2) * x


def _integrate(kind: str, level: float, s2: float, n_steps: int = 100, n: int = 40_000, drop_correction: bool = False):
    g = _gen(11)
    sigmas = torch.linspace(1, 0, n_steps + 1).tolist()
    x = torch.randn(n, 1, generator=g)
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        v = _gaussian_velocity(x, s, s2)
        out = sde_step(v, s, sn, x, kind=kind, noise_level=level, generator=g)
        # Negative control: the same noise, but the score-correction term of the drift dropped.
        x = ode_step(v, s, sn, x) + (out.prev_sample - out.mean) if drop_correction else out.prev_sample
    return x


@pytest.mark.parametrize("kind,level", [("flow_grpo", 0.7), ("dance", 0.7)])
def test_sde_preserves_gaussian_data_marginal(kind, level):
    s2 = 0.25
    x = _integrate(kind, level, s2)
    # Tolerance: Euler discretisation (the deterministic ODE with 100 steps ends at ~0.243) plus
    # Monte-Carlo error (std of the variance estimate ~ s2 * sqrt(2/n) ~ 0.7%).
    assert abs(x.var().item() - s2) < 0.06 * s2, x.var().item()
    assert abs(x.mean().item()) < 0.02
    wrong = _integrate(kind, level, s2, drop_correction=True)
    assert abs(wrong.var().item() - s2) > 0.3 * s2, wrong.var().item()  # the test can tell


def test_cps_preserves_coefficients_for_exact_predictions():
    """With point-mass data x0 = m the predictions are exact (x0_hat = m, x1_hat = eps), so CPS must
    give x' ~ N((1 - sigma_next) m, sigma_next^2) exactly after every step, however large."""
    m, n = 1.5, 40_000
    g = _gen(12)
    sigmas = [1.0, 0.8, 0.5, 0.2, 0.05]
    x = torch.randn(n, 1, generator=g)
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        eps = (x - (1 - s) * m) / s
        v = eps - m
        out = sde_step(v, s, sn, x, kind="cps", noise_level=0.7, generator=g)
        # Negative control: keeping the full noise coefficient sn (not sqrt(sn^2 - std^2)) with the
        # same noise inflates the std by sqrt(1 + sin^2(0.7 pi/2)) ~ 1.37.
        wrong = (1 - sn) * m + sn * eps + (out.prev_sample - out.mean)
        assert abs(wrong.std().item() / sn - 1) > 0.2
        x = out.prev_sample
        assert abs(x.mean().item() - (1 - sn) * m) < 4 * sn / math.sqrt(n)
        assert abs(x.std().item() / sn - 1) < 0.03


def test_cps_on_gaussian_data_follows_the_linear_gaussian_recursion():
    """For x0 ~ N(0, s2) a CPS step is linear-Gaussian: x' = k x + std z with
    k = ((1-s')(1-s) s2 + s' cos(a pi/2) s) / V_s, V_s = (1-s)^2 s2 + s^2, so Var' = k^2 Var + std^2.
    (CPS's std does not shrink with the step size, so unlike the SDEs above it under-disperses
    non-degenerate data: here the final variance is ~0.17, not s2 = 0.25.)"""
    s2, a, n_steps = 0.25, 0.7, 100
    x = _integrate("cps", a, s2, n_steps=n_steps)
    var = 1.0
    sigmas = torch.linspace(1, 0, n_steps + 1).tolist()
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        v_s = (1 - s) ** 2 * s2 + s**2
        k = ((1 - sn) * (1 - s) * s2 + sn * math.cos(a * math.pi / 2) * s) / v_s
        var = k**2 * var + (sn * math.sin(a * math.pi / 2)) ** 2
    assert abs(x.var().item() / var - 1) < 0.03, (x.var().item(), var)


# --------------------------------------------------------------------------------------------
# 7. log-prob sanity and independent forms of each drift
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*SDE_KINDS, "ddim"])
def test_sampled_log_prob_averages_to_minus_entropy(kind):
    g = _gen(13)
    x, v = torch.randn(8, 16, 32, 32, generator=g), torch.randn(8, 16, 32, 32, generator=g)
    if kind == "ddim":
        out = ddim_step(v, 0.2, 0.3, x, eta=1.0, generator=g)
    else:
        out = sde_step(v, 0.6, 0.5, x, kind=kind, noise_level=0.9, generator=g)
    neg_entropy = -(0.5 + torch.log(out.std) + 0.5 * math.log(2 * math.pi))  # E[log N(x; mu, std^2)]
    # per-sample mean over 16k elements: std of the estimate ~ sqrt(0.5 / 16384) ~ 0.0055
    torch.testing.assert_close(out.log_prob, neg_entropy, rtol=0, atol=0.03)


def test_flow_grpo_and_dance_means_match_the_score_form():
    """DanceGRPO's form: score = -(x - (1-sigma) x0_hat) / sigma^2, mean = x - delta (v - std_t^2/2 score)."""
    g = _gen(14)
    x, v = torch.randn(4, *LATENT, generator=g), torch.randn(4, *LATENT, generator=g)
    for s, sn in [(0.9, 0.85), (0.5, 0.3), (0.2, 0.0)]:
        x0_hat = x - s * v
        score = -(x - (1 - s) * x0_hat) / s**2
        for kind, std_t in [("flow_grpo", 0.7 * math.sqrt(s / (1 - s))), ("dance", 0.7)]:
            out = sde_step(v, s, sn, x, kind=kind, noise_level=0.7, generator=g)
            torch.testing.assert_close(out.mean, x - (s - sn) * (v - 0.5 * std_t**2 * score), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.std, torch.full((4,), std_t * math.sqrt(s - sn)), rtol=1e-6, atol=1e-7)


def test_flow_grpo_matches_reference_formula_over_shifted_schedule():
    """Literal transcription of Flow-GRPO's sde_step_with_logprob (dt = sigma_prev - sigma < 0,
    sigma_max = sigmas[1] guards sigma == 1)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sig = scheduler.sigmas
    g = _gen(15)
    x = torch.randn(2, *LATENT, generator=g)
    for i in range(10):
        sigma, sigma_prev, sigma_max = sig[i], sig[i + 1], sig[1]
        v = _fake_velocity(x, float(sigma))
        dt = sigma_prev - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * 0.7
        ref_mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        out = sde_step(v, sigma, sigma_prev, x, kind="flow_grpo", noise_level=0.7, generator=g)
        torch.testing.assert_close(out.mean, ref_mean, rtol=1e-5, atol=1e-5)
        ref_std = std_dev_t * torch.sqrt(-dt)
        torch.testing.assert_close(out.std, ref_std.expand(2), rtol=1e-5, atol=1e-7)
        ref_lp = (-((out.prev_sample - ref_mean) ** 2) / (2 * ref_std**2) - torch.log(ref_std)
                  - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob, ref_lp, rtol=1e-5, atol=1e-4)
        x = out.prev_sample


def test_cps_matches_diffusers_stochastic_sampling_at_noise_level_one_and_cosine_form():
    """diffusers' FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) re-noises the predicted
    x0: x' = (1 - s') x0_hat + s' z, which is CPS with noise_level 1."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0, stochastic_sampling=True)
    scheduler.set_timesteps(8)
    sig = scheduler.sigmas
    x_ref = x_ours = torch.randn(2, *LATENT, generator=_gen(16))
    for i, t in enumerate(scheduler.timesteps):
        v_ref, v_ours = _fake_velocity(x_ref, float(sig[i])), _fake_velocity(x_ours, float(sig[i]))
        x_ref = scheduler.step(v_ref, t, x_ref, generator=_gen(200 + i)).prev_sample
        out = sde_step(v_ours, sig[i], sig[i + 1], x_ours, kind="cps", noise_level=1.0, generator=_gen(200 + i))
        x_ours = out.prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)
    # Intermediate noise level: sqrt(s'^2 - std^2) = s' cos(a pi/2).
    g = _gen(17)
    x, v = torch.randn(3, *LATENT, generator=g), torch.randn(3, *LATENT, generator=g)
    out = sde_step(v, 0.6, 0.45, x, kind="cps", noise_level=0.4, generator=g)
    ref_mean = 0.55 * (x - 0.6 * v) + 0.45 * math.cos(0.2 * math.pi) * (x + 0.4 * v)
    torch.testing.assert_close(out.mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.std, torch.full((3,), 0.45 * math.sin(0.2 * math.pi)), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# dtypes, reproducibility, devices
# --------------------------------------------------------------------------------------------
def test_low_precision_inputs_compute_in_fp32_and_generator_is_reproducible():
    g = _gen(18)
    x, v = torch.randn(2, *LATENT, generator=g), torch.randn(2, *LATENT, generator=g)
    kw = dict(kind="flow_grpo", noise_level=0.7)
    a = sde_step(v.bfloat16(), 0.5, 0.4, x.bfloat16(), **kw, generator=_gen(19))
    b = sde_step(v.bfloat16().float(), 0.5, 0.4, x.bfloat16().float(), **kw, generator=_gen(19))
    assert isinstance(a, StepOutput)
    for name in ("prev_sample", "log_prob", "mean", "std"):
        assert getattr(a, name).dtype == torch.float32
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = sde_step(v, 0.5, 0.4, x, **kw, generator=_gen(20))
    assert torch.equal(c.prev_sample, sde_step(v, 0.5, 0.4, x, **kw, generator=_gen(20)).prev_sample)
    assert not torch.equal(c.prev_sample, sde_step(v, 0.5, 0.4, x, **kw, generator=_gen(21)).prev_sample)
    assert ode_step(v.half(), 0.5, 0.4, x.half()).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_samples_on_gpu():
    g = _gen(22)
    x, v = torch.randn(2, *LATENT, generator=g), torch.randn(2, *LATENT, generator=g)
    for kind in SDE_KINDS:
        cpu = sde_step(v, 0.5, 0.4, x, kind=kind, noise_level=0.7, generator=_gen(23))
        gpu = sde_step(v.cuda(), 0.5, 0.4, x.cuda(), kind=kind, noise_level=0.7, generator=_gen(23))
        assert gpu.prev_sample.device.type == "cuda"
        torch.testing.assert_close(gpu.prev_sample.cpu(), cpu.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpu.log_prob.cpu(), cpu.log_prob, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_clear_errors_name_the_offending_argument():
    x = torch.randn(2, *LATENT)
    with pytest.raises(ValueError, match=r"kind='ddpm'.*'flow_grpo', 'dance', 'cps'"):
        sde_step(x, 0.5, 0.4, x, kind="ddpm", noise_level=0.7)
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        sde_step(x, 0.5, 0.4, x, kind="flow_grpo", noise_level=torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="noise_level must be <= 1 for kind='cps'"):
        sde_step(x, 0.5, 0.4, x, kind="cps", noise_level=1.2)
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        sde_step(x, 0.4, 0.5, x, kind="dance", noise_level=0.3)
    with pytest.raises(ValueError, match="sigma_next must be <= sigma.*batch index 1"):
        ode_step(x, torch.tensor([0.5, 0.3]), 0.4, x)
    with pytest.raises(ValueError, match="sigma must lie in"):
        ode_step(x, 1.5, 0.4, x)
    with pytest.raises(ValueError, match=r"model_output has shape \(2, 4, 8, 7\)"):
        ode_step(x[..., :7], 0.5, 0.4, x)
    with pytest.raises(ValueError, match="prev_sample has shape"):
        sde_step(x, 0.5, 0.4, x, kind="cps", noise_level=0.5, prev_sample=x[:1])
    with pytest.raises(ValueError, match=r"sigma must be a float or a \[B=2\] tensor"):
        ode_step(x, torch.tensor([0.5, 0.5, 0.5]), 0.4, x)
    with pytest.raises(ValueError, match="mean has shape"):
        gaussian_log_prob(x, x[:1], 1.0)
    with pytest.raises(ValueError, match=r"std must be a float or a \[B=2\] tensor"):
        gaussian_log_prob(x, x, torch.ones(3))
    with pytest.raises(ValueError, match="std must be >= 0"):
        gaussian_log_prob(x, x, -1.0)
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        ddim_step(x, 0.3, 0.4, x, eta=1.5)
    with pytest.raises(ValueError, match="alpha_prod_t_prev must be >= alpha_prod_t"):
        ddim_step(x, 0.5, 0.4, x, eta=0.0)
    with pytest.raises(ValueError, match="noise_level must be finite"):
        sde_step(x, 0.5, 0.4, x, kind="dance", noise_level=float("nan"))


# --------------------------------------------------------------------------------------------
# sampling.cps_log_prob: Flow-GRPO's constant-free CPS log-prob (docs/FIDELITY.md, "CPS log-prob")
# --------------------------------------------------------------------------------------------
def test_cps_flow_grpo_log_prob_matches_the_reference_form():
    from flowalign.samplers import cps_flow_grpo_log_prob

    torch.manual_seed(3)
    x, v = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    sigma, sigma_next, a = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.8, 0.5, 0.2, 0.0]), 0.6
    exact = sde_step(v, sigma, sigma_next, x, kind="cps", noise_level=a, generator=torch.Generator().manual_seed(0))
    ref_form = sde_step(v, sigma, sigma_next, x, kind="cps", noise_level=a, generator=torch.Generator().manual_seed(0),
                        cps_log_prob="flow_grpo")
    # same sample, mean and std: only the log-prob changes
    assert torch.equal(exact.prev_sample, ref_form.prev_sample) and torch.equal(exact.mean, ref_form.mean)
    # independent transcription of the reference's cps branch: std_dev_t = sigma_prev sin(a pi / 2),
    # mean = (x - s v)(1 - s') + (x + (1 - s) v) sqrt(s'^2 - std^2), log_prob = -mean((x' - mean)^2)
    s, sp = sigma.view(-1, 1, 1, 1), sigma_next.view(-1, 1, 1, 1)
    std_dev_t = sp * math.sin(a * math.pi / 2)
    mean = (x - s * v) * (1 - sp) + (x + v * (1 - s)) * torch.sqrt(sp**2 - std_dev_t**2)
    expected = -((ref_form.prev_sample - mean) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ref_form.log_prob[:3], expected[:3], rtol=1e-5, atol=1e-6)
    assert ref_form.log_prob[3].item() == 0.0  # CPS into sigma_next = 0 is deterministic
    direct = cps_flow_grpo_log_prob(ref_form.prev_sample, ref_form.mean)
    torch.testing.assert_close(direct, -((ref_form.prev_sample - ref_form.mean) ** 2).mean(dim=(1, 2, 3)))
    # the two forms: exact = flow_grpo / (2 std^2) - log std - log sqrt(2 pi)
    st = exact.std[:3]
    torch.testing.assert_close(exact.log_prob[:3],
                               ref_form.log_prob[:3] / (2 * st**2) - torch.log(st) - 0.5 * math.log(2 * math.pi),
                               rtol=1e-5, atol=1e-5)
    # rescoring the stored sample with the same form gives the same log-prob (ratio 1)
    again = sde_step(v, sigma, sigma_next, x, kind="cps", noise_level=a, prev_sample=ref_form.prev_sample,
                     cps_log_prob="flow_grpo")
    assert torch.equal(again.log_prob, ref_form.log_prob)
    # other kinds ignore the option
    fg = sde_step(v, sigma, sigma_next, x, kind="flow_grpo", noise_level=a, prev_sample=x, cps_log_prob="flow_grpo")
    fg_exact = sde_step(v, sigma, sigma_next, x, kind="flow_grpo", noise_level=a, prev_sample=x)
    assert torch.equal(fg.log_prob, fg_exact.log_prob)
    with pytest.raises(ValueError, match="cps_log_prob"):
        sde_step(v, sigma, sigma_next, x, kind="cps", noise_level=a, cps_log_prob="bogus")
