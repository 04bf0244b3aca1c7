"""Tests for flowalign.losses: the PPO-clip loss and the KL on transition means, against autograd on
hand-worked examples and torch.distributions."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowalign.losses import LOSSES, get_loss, kl_on_means, ppo_clip_loss

METRIC_KEYS = {"loss", "policy_loss", "kl", "clip_frac", "approx_kl", "ratio_mean", "ratio_max_dev"}


def _is_metric_tensor(v) -> bool:
    """The metrics of a loss are 0-dim detached float32 tensors, not python floats."""
    return isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad


# ----------------------------------------------------------------------------- kl_on_means
def test_kl_on_means_equals_gaussian_kl_per_dim():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64)
    mean_ref = mean + 0.3 * torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64)
    std = torch.rand(5, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    s = std.view(5, 1, 1, 1).expand_as(mean)
    ref = kl_divergence(Normal(mean, s), Normal(mean_ref, s)).mean(dim=(1, 2, 3))
    out = kl_on_means(mean, mean_ref, std)
    assert out.shape == (5,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    # Scalar std and 1-D means.
    out1 = kl_on_means(mean[:, 0, 0, 0], mean_ref[:, 0, 0, 0], torch.tensor(0.2))
    ref1 = kl_divergence(Normal(mean[:, 0, 0, 0], 0.2), Normal(mean_ref[:, 0, 0, 0], 0.2))
    torch.testing.assert_close(out1, ref1.float(), rtol=1e-5, atol=1e-6)


def test_kl_on_means_gradient_flows_through_mean_only():
    mean = torch.tensor([[1.0, 3.0]], requires_grad=True)
    mean_ref = torch.tensor([[0.0, 1.0]], requires_grad=True)
    std = torch.tensor([0.5])
    kl = kl_on_means(mean, mean_ref, std)
    # ((1)^2 + (2)^2) / 2 dims / (2 * 0.25) = 2.5 / 0.5 = 5
    torch.testing.assert_close(kl, torch.tensor([5.0]))
    kl.sum().backward()
    # d/dμ of mean_d (μ−μref)²/(2s²) = (μ−μref) / (D s²) = (1, 2) / (2 * 0.25)
    torch.testing.assert_close(mean.grad, torch.tensor([[2.0, 4.0]]))
    assert mean_ref.grad is None


def test_kl_on_means_bad_inputs():
    m = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="mean_ref"):
        kl_on_means(m, torch.zeros(3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="std"):
        kl_on_means(m, m, torch.ones(2))
    with pytest.raises(ValueError, match="std must be positive"):
        kl_on_means(m, m, torch.tensor([1.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- ppo_clip_loss
def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_minus_a_over_n():
    gen = torch.Generator().manual_seed(0)
    n = 7
    adv = torch.randn(n, generator=gen)
    lp_old = torch.randn(n, generator=gen) * 10
    lp = lp_old.clone().requires_grad_(True)
    loss, metrics = ppo_clip_loss(lp, lp_old, adv, clip_range=1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, -adv / n)
    assert float(metrics["ratio_max_dev"]) == 0.0
    assert float(metrics["ratio_mean"]) == 1.0
    assert float(metrics["clip_frac"]) == 0.0
    assert float(metrics["approx_kl"]) == 0.0
    assert float(metrics["kl"]) == 0.0
    assert set(metrics) == METRIC_KEYS and all(_is_metric_tensor(v) for v in metrics.values())


# Hand example, ε = 0.2, N = 6:
#   A    ratio  -A·r   -A·clip(r)  max    d loss/d log_prob · N  (= -A·r on the unclipped side, else 0)
#   +1   1.5    -1.5   -1.2        -1.2    0      (positive A, ratio above 1+ε: clipped)
#   +1   0.5    -0.5   -0.8        -0.5   -0.5    (positive A, ratio below 1−ε: NOT clipped)
#   -1   1.5    +1.5   +1.2        +1.5   +1.5    (negative A, ratio above 1+ε: NOT clipped)
#   -1   0.5    +0.5   +0.8        +0.8    0      (negative A, ratio below 1−ε: clipped)
#   +2   1.1    -2.2   -2.2        -2.2   -2.2    (inside the trust region)
#   -2   0.9    +1.8   +1.8        +1.8   +1.8
#   loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2 + 1.8) / 6 = 0.2 / 6
HAND_ADV = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -2.0])
HAND_RATIO = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1, 0.9], dtype=torch.float64)
HAND_TERMS = torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.2, 1.8])
HAND_GRAD_TIMES_N = torch.tensor([0.0, -0.5, 1.5, 0.0, -2.2, 1.8])


def _hand_inputs():
    lp_old = torch.tensor([-3.0, 0.5, 2.0, -1.0, 0.0, 4.0])
    lp = (lp_old.double() + torch.log(HAND_RATIO)).float().requires_grad_(True)
    return lp, lp_old


def test_clipping_hand_example_loss_gradient_and_metrics():
    lp, lp_old = _hand_inputs()
    loss, metrics = ppo_clip_loss(lp, lp_old, HAND_ADV, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.2 / 6), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, HAND_GRAD_TIMES_N / 6, atol=1e-6, rtol=0)
    # Clipping zeroes the gradient exactly, and only on the side that would push past the region.
    assert grad[0] == 0 and grad[3] == 0 and grad[1] != 0 and grad[2] != 0
    log_r = torch.log(HAND_RATIO)
    assert float(metrics["clip_frac"]) == pytest.approx(4 / 6)
    assert float(metrics["approx_kl"]) == pytest.approx(float(0.5 * (log_r**2).mean()), rel=1e-5)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["ratio_max_dev"]) == pytest.approx(0.5, abs=1e-6)
    assert float(metrics["loss"]) == float(metrics["policy_loss"]) == pytest.approx(0.2 / 6, abs=1e-6)
    assert float(metrics["kl"]) == 0.0


def test_loss_equals_negated_ppo_min_form():
    # PPO (Schulman et al. 2017, Eq. 7) written as min(r·A, clip(r)·A): the loss is its negated mean.
    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(50, generator=gen)
    lp_old = torch.randn(50, generator=gen)
    lp = (lp_old + 0.4 * torch.randn(50, generator=gen)).requires_grad_(True)
    loss, _ = ppo_clip_loss(lp, lp_old, adv, clip_range=0.15)
    lp2 = lp.detach().clone().requires_grad_(True)
    r = torch.exp(lp2 - lp_old)
    ref = -torch.min(r * adv, torch.clamp(r, 0.85, 1.15) * adv).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, lp)[0], torch.autograd.grad(ref, lp2)[0])


def test_weights():
    lp, lp_old = _hand_inputs()
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.5])
    loss, metrics = ppo_clip_loss(lp, lp_old, HAND_ADV, clip_range=0.2, weights=w)
    expected = float((w * HAND_TERMS).sum() / w.sum())  # (-1.2 + 3.0 + 0.4 + 2.7) / 5 = 0.98
    assert expected == pytest.approx(0.98)
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, w * HAND_GRAD_TIMES_N / w.sum(), atol=1e-6, rtol=0)
    assert grad[1] == 0 and grad[4] == 0  # zero-weight edges get no gradient
    # Diagnostics are over all edges, unweighted.
    assert float(metrics["clip_frac"]) == pytest.approx(4 / 6)
    # Uniform weights reproduce the plain mean.
    loss_u, _ = ppo_clip_loss(lp, lp_old, HAND_ADV, clip_range=0.2, weights=torch.full((6,), 3.0))
    torch.testing.assert_close(loss_u, torch.tensor(0.2 / 6), atol=1e-6, rtol=0)


def test_kl_beta():
    lp, lp_old = _hand_inputs()
    mean = torch.zeros(6, 2, requires_grad=True)
    mean_ref = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, -1.0], [0.0, 3.0], [0.5, 0.5]])
    std = torch.full((6,), 0.5)
    kl = kl_on_means(mean, mean_ref, std)  # per edge: mean_d(μref²) / 0.5 = (2, 4, 0, 2, 9, 0.5)
    torch.testing.assert_close(kl, torch.tensor([2.0, 4.0, 0.0, 2.0, 9.0, 0.5]))
    beta = 0.04
    loss, metrics = ppo_clip_loss(lp, lp_old, HAND_ADV, clip_range=0.2, kl=kl, kl_beta=beta)
    kl_mean = 17.5 / 6
    torch.testing.assert_close(loss, torch.tensor(0.2 / 6 + beta * kl_mean), atol=1e-6, rtol=0)
    assert float(metrics["kl"]) == pytest.approx(kl_mean)
    assert float(metrics["policy_loss"]) == pytest.approx(0.2 / 6, abs=1e-6)
    assert float(metrics["loss"]) == pytest.approx(0.2 / 6 + beta * kl_mean, abs=1e-6)
    loss.backward()
    # d(β·mean_e KL_e)/dμ = β/N · (μ − μref) / (D s²)
    torch.testing.assert_close(mean.grad, beta / 6 * (-mean_ref) / (2 * 0.25))
    # Weighted KL mean.
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.5])
    loss_w, metrics_w = ppo_clip_loss(lp, lp_old, HAND_ADV, clip_range=0.2, weights=w, kl=kl.detach(), kl_beta=beta)
    kl_w = (2.0 + 0.0 + 1.0 + 0.75) / 5
    torch.testing.assert_close(loss_w, torch.tensor(0.98 + beta * kl_w), atol=1e-6, rtol=0)
    assert float(metrics_w["kl"]) == pytest.approx(kl_w)
    # kl given with beta 0: reported, not added.
    loss0, metrics0 = ppo_clip_loss(lp, lp_old, HAND_ADV, clip_range=0.2, kl=kl.detach())
    torch.testing.assert_close(loss0, torch.tensor(0.2 / 6), atol=1e-6, rtol=0)
    assert float(metrics0["kl"]) == pytest.approx(kl_mean)


def test_old_log_prob_and_advantages_are_constants():
    lp_old = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.5], requires_grad=True)
    lp = torch.zeros(3, requires_grad=True)
    loss, _ = ppo_clip_loss(lp, lp_old, adv, clip_range=0.2)
    loss.backward()
    assert lp_old.grad is None and adv.grad is None and lp.grad is not None


def test_bf16_inputs_run_in_fp32():
    lp, lp_old = _hand_inputs()
    loss, _ = ppo_clip_loss(lp.detach().bfloat16(), lp_old.bfloat16(), HAND_ADV.bfloat16(), clip_range=0.2)
    assert loss.dtype == torch.float32


def test_non_finite_loss_raises():
    # Ratio overflows to inf on the unclipped side of a negative advantage -> +inf loss.
    with pytest.raises(FloatingPointError, match="^loss contains NaN/Inf"):
        ppo_clip_loss(torch.tensor([1000.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([-1.0, 1.0]), clip_range=0.2)
    # The same overflow with a positive advantage is clipped and stays finite.
    loss, metrics = ppo_clip_loss(torch.tensor([1000.0]), torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2) and math.isinf(float(metrics["ratio_max_dev"]))
    with pytest.raises(FloatingPointError, match="loss"):
        ppo_clip_loss(torch.tensor([float("nan")]), torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.2)
    with pytest.raises(FloatingPointError, match="advantages"):
        ppo_clip_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([float("nan")]), clip_range=0.2)
    with pytest.raises(FloatingPointError, match="loss"):
        ppo_clip_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), clip_range=0.2,
                      kl=torch.tensor([float("inf")]), kl_beta=0.1)


def test_bad_inputs_name_the_argument():
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(z, z, torch.zeros(3), clip_range=0.2)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(z, z, z, clip_range=0.0)
    with pytest.raises(ValueError, match="kl_beta"):
        ppo_clip_loss(z, z, z, clip_range=0.2, kl_beta=-1.0)
    with pytest.raises(ValueError, match="needs the per-edge `kl`"):
        ppo_clip_loss(z, z, z, clip_range=0.2, kl_beta=0.1)
    with pytest.raises(ValueError, match="weights"):
        ppo_clip_loss(z, z, z, clip_range=0.2, weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        ppo_clip_loss(z, z, z, clip_range=0.2, weights=torch.zeros(4))
    with pytest.raises(ValueError, match="kl must have shape"):
        ppo_clip_loss(z, z, z, clip_range=0.2, kl=torch.zeros(2), kl_beta=0.1)
    with pytest.raises(ValueError, match="log_prob"):
        ppo_clip_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), clip_range=0.2)


def _no_sync_inputs():
    gen = torch.Generator().manual_seed(11)
    lp_old = torch.randn(9, generator=gen)
    lp = (lp_old + 0.3 * torch.randn(9, generator=gen)).requires_grad_(True)
    adv = torch.randn(9, generator=gen)
    w = torch.rand(9, generator=gen)
    mean = torch.randn(9, 4, generator=gen, requires_grad=True)
    kl = kl_on_means(mean, mean.detach() + 0.1 * torch.randn(9, 4, generator=gen), torch.full((9,), 0.5))
    return lp, lp_old, adv, w, mean, kl


def test_check_false_makes_no_host_sync_and_matches_check_true_bit_for_bit():
    from flowalign.training.host_syncs import count_host_syncs

    lp, lp_old, adv, w, mean, kl = _no_sync_inputs()
    kwargs = dict(clip_range=0.2, weights=w, kl=kl, kl_beta=0.04)
    with count_host_syncs(include_cpu=True) as syncs:  # CPU tensors stand in for device tensors
        loss_fast, m_fast = ppo_clip_loss(lp, lp_old, adv, check=False, **kwargs)
    assert syncs.total == 0, syncs.summary()
    with count_host_syncs(include_cpu=True) as syncs_checked:
        loss, m = ppo_clip_loss(lp, lp_old, adv, **kwargs)
    assert syncs_checked.total > 0  # the value checks of the public default do read the values
    assert loss_fast.dtype == loss.dtype == torch.float32 and loss_fast.dim() == 0
    assert torch.equal(loss_fast, loss)
    assert set(m_fast) == set(m) == METRIC_KEYS
    assert all(_is_metric_tensor(v) for v in m_fast.values())
    for key in METRIC_KEYS:
        assert torch.equal(m_fast[key], m[key]), key
    g_fast = torch.autograd.grad(loss_fast, (lp, mean), retain_graph=True)  # kl's graph is shared
    g = torch.autograd.grad(loss, (lp, mean))
    assert all(torch.equal(a, b) for a, b in zip(g_fast, g))


def test_check_false_still_checks_arguments_but_not_values():
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(z, z, torch.zeros(3), clip_range=0.2, check=False)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(z, z, z, clip_range=0.0, check=False)
    with pytest.raises(ValueError, match="needs the per-edge `kl`"):
        ppo_clip_loss(z, z, z, clip_range=0.2, kl_beta=0.1, check=False)
    with pytest.raises(TypeError, match="weights"):
        ppo_clip_loss(z, z, z, clip_range=0.2, weights=[1.0] * 4, check=False)
    # Values are the caller's business: a NaN or bad weights go through to a non-finite loss.
    loss, metrics = ppo_clip_loss(
        torch.tensor([float("nan")]), torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.2, check=False
    )
    assert torch.isnan(loss) and torch.isnan(metrics["loss"])
    loss, _ = ppo_clip_loss(z, z, torch.ones(4), clip_range=0.2, weights=torch.zeros(4), check=False)
    assert torch.isnan(loss)


def test_registry():
    from flowalign.losses.awm import awm_loss

    assert LOSSES == {"ppo_clip": ppo_clip_loss, "awm": awm_loss}
    assert get_loss("ppo_clip") is ppo_clip_loss
    with pytest.raises(ValueError, match=r"unknown loss 'dpo'.*'awm'.*'ppo_clip'"):
        get_loss("dpo")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    lp, lp_old = _hand_inputs()
    lp_c = lp.detach().cuda().requires_grad_(True)
    loss_c, m_c = ppo_clip_loss(lp_c, lp_old.cuda(), HAND_ADV.cuda(), clip_range=0.2)
    assert loss_c.is_cuda
    loss, m = ppo_clip_loss(lp, lp_old, HAND_ADV, clip_range=0.2)
    torch.testing.assert_close(loss_c.cpu(), loss)
    torch.testing.assert_close(torch.autograd.grad(loss_c, lp_c)[0].cpu(), torch.autograd.grad(loss, lp)[0])
    assert all(v.is_cuda for v in m_c.values())
    # CUDA's reductions sum in another order (seen on an H200: 4.8e-8 on values ~0.03)
    assert {k: float(v) for k, v in m_c.items()} == pytest.approx({k: float(v) for k, v in m.items()}, rel=1e-5, abs=1e-7)
    mean = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(
        kl_on_means(mean.cuda(), (mean + 1).cuda(), torch.full((4,), 0.3).cuda()).cpu(),
        kl_on_means(mean, mean + 1, torch.full((4,), 0.3)),
    )


# --------------------------------------------------------------------------------------------
# algorithm.kl_form: exact vs Flow-GRPO's train_sd3.py form (docs/FIDELITY.md, "KL scale")
# --------------------------------------------------------------------------------------------
def test_kl_forms_differ_by_exactly_dt_and_flow_grpo_matches_the_reference_formula():
    from flowalign.losses import kl_form_scale
    from flowalign.samplers import sde_step

    torch.manual_seed(0)
    x, v, v_ref = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma, sigma_next, a = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.7, 0.4, 0.1]), 0.7
    new = sde_step(v, sigma, sigma_next, x, kind="flow_grpo", noise_level=a, generator=torch.Generator().manual_seed(1))
    ref = sde_step(v_ref, sigma, sigma_next, x, kind="flow_grpo", noise_level=a, prev_sample=new.prev_sample)
    dt = sigma - sigma_next
    exact = kl_on_means(new.mean, ref.mean, new.std, scale=kl_form_scale("exact", "flow_grpo", dt))
    flow = kl_on_means(new.mean, ref.mean, new.std, scale=kl_form_scale("flow_grpo", "flow_grpo", dt))
    torch.testing.assert_close(flow, exact * dt, rtol=1e-6, atol=0)
    # Independent transcription of the reference: std_dev_t = sqrt(sigma / (1 - sigma)) * a, with
    # sigmas[1] (here sigma_next of the first step) replacing sigma at sigma == 1 (sd3_sde_with_logprob.py
    # line 47), and kl = ((mean - mean_ref) ** 2).mean(dims) / (2 * std_dev_t ** 2) (train_sd3.py line 895).
    sigma_max = 0.7
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.tensor(sigma_max), sigma))) * a
    reference = ((new.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
    torch.testing.assert_close(flow, reference, rtol=1e-5, atol=0)
    # exact is the true per-dimension Gaussian KL between the transition kernels
    d = 2 * 4 * 4
    true_kl = torch.stack([kl_divergence(Normal(new.mean[i].flatten(), new.std[i]),
                                         Normal(ref.mean[i].flatten(), new.std[i])).sum() / d for i in range(3)])
    torch.testing.assert_close(exact, true_kl, rtol=1e-5, atol=0)


def test_kl_form_hand_example_and_cps_unscaled():
    from flowalign.losses import kl_form_scale

    mean, mean_ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])  # mean sq diff = (1 + 4) / 2 = 2.5
    std, dt = torch.tensor([0.5]), torch.tensor([0.1])  # exact = 2.5 / (2 * 0.25) = 5
    assert kl_on_means(mean, mean_ref, std).item() == pytest.approx(5.0)
    assert kl_on_means(mean, mean_ref, std, scale=kl_form_scale("flow_grpo", "dance", dt)).item() == pytest.approx(0.5)
    assert kl_form_scale("flow_grpo", "cps", dt) is None  # CPS's reference std is the transition std
    assert kl_form_scale("exact", "flow_grpo", dt) is None
    with pytest.raises(ValueError, match="kl_form"):
        kl_form_scale("bogus", "flow_grpo", dt)
