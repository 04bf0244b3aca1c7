"""GRPO-Guard (flowalign/algorithms/grpo_guard.py) and DGPO (flowalign/algorithms/dgpo.py,
flowalign/losses/dgpo.py): the math by hand and against independent computations, the config checks,
and two iterations of each quickstart config through ``flowalign.train``."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from flowalign.algorithms.dgpo import DGPO, dgpo_draws, group_major_order, num_candidate_steps
from flowalign.algorithms.grpo import GRPO
from flowalign.algorithms.grpo_guard import GRPOGuard, guard_log_ratio, step_weights
from flowalign.losses.ppo import step_weighted_ppo_clip_loss
from flowalign.config import ConfigError, load_config
from flowalign.losses import ppo_clip_loss
from flowalign.losses.dgpo import dgpo_clip_mask, dgpo_loss, flow_matching_error, group_preference_weights
from flowalign.samplers.steps import sde_step
from tests.conftest import REPO

GUARD = os.path.join(REPO, "configs", "grpo_guard", "quickstart.yaml")
DGPO_CONFIG = os.path.join(REPO, "configs", "dgpo", "quickstart.yaml")
RUN = {"train.iterations": 2, "data.prompts_per_iter": 2, "eval.samples_per_prompt": 1, "eval.every": 0,
       "logging.progress": False, "logging.tensorboard": False, "train.checkpoint_every": 0}


def _gauss_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """``[N]`` the Gaussian log-density averaged over the latent dims (the samplers' convention), by hand."""
    d = -((x - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return d.reshape(x.shape[0], -1).mean(dim=1)


# ------------------------------------------------------------------------------------------------
# GRPO-Guard: RatioNorm and the gradient reweighting
# ------------------------------------------------------------------------------------------------
def test_ratio_norm_by_hand():
    # one edge, D = 2: s = 0.5, mu_old = [0, 0], mu = [0.1, -0.2], eps = [1, -1] -> x_next = mu_old + s eps = [0.5, -0.5]
    # log r = (mean |x - mu_old|^2 - mean |x - mu|^2) / (2 s^2) = (0.25 - 0.125) / 0.5 = 0.25
    # bias = mean(dmu^2) / (2 s^2) = 0.025 / 0.5 = 0.05;  log r_hat = s (0.25 + 0.05) = 0.15 = mean(eps * dmu)
    mean_old, mean, x = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.1, -0.2]]), torch.tensor([[0.5, -0.5]])
    lp, lp_old = _gauss_log_prob(x, mean, 0.5), _gauss_log_prob(x, mean_old, 0.5)
    assert lp.item() - lp_old.item() == pytest.approx(0.25, abs=1e-6)
    std = torch.tensor([0.5])
    assert guard_log_ratio(lp, lp_old, mean, mean_old, std, ratio_norm=True).item() == pytest.approx(0.15, abs=1e-6)
    assert guard_log_ratio(lp, lp_old, mean, mean_old, std, ratio_norm=False).item() == pytest.approx(0.25, abs=1e-6)
    # the normalisation is the identity at s = 1 with mu = mu_old
    one = torch.ones(1)
    assert torch.equal(guard_log_ratio(lp, lp_old, mean_old, mean_old, one, ratio_norm=True), lp - lp_old)
    with pytest.raises(ValueError, match="ratio_norm"):
        guard_log_ratio(lp, lp_old, mean, None, std, ratio_norm=True)


def test_ratio_norm_of_the_flow_grpo_sampler_is_the_noise_projection():
    """With the sampler's own log-probs and means, RatioNorm is mean_d(eps * (mu - mu_old)), eps the rollout's noise."""
    g = torch.Generator().manual_seed(0)
    x, v_old = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    v = v_old + 0.1 * torch.randn(6, 2, 4, 4, generator=g)
    sigma, sigma_next = torch.full((6,), 0.7), torch.full((6,), 0.6)
    old = sde_step(v_old, sigma, sigma_next, x, kind="flow_grpo", noise_level=0.7, generator=g)
    new = sde_step(v, sigma, sigma_next, x, kind="flow_grpo", noise_level=0.7, prev_sample=old.prev_sample)
    eps = (old.prev_sample - old.mean) / old.std.view(-1, 1, 1, 1)
    want = (eps * (new.mean - old.mean)).reshape(6, -1).mean(dim=1)
    got = guard_log_ratio(new.log_prob, old.log_prob, new.mean, old.mean, new.std, ratio_norm=True)
    assert torch.allclose(got, want, atol=1e-5)


def test_ratio_norm_removes_the_left_shift_and_the_step_scale():
    """The plain log-ratio has mean -mean(dmu^2)/(2 s^2) < 0 and spread ~ 1/s; RatioNorm's is centred with a spread
    that does not depend on s (the paper's diagnosis, checked over 20000 noises at two noise scales)."""
    g = torch.Generator().manual_seed(1)
    dmu = torch.full((1, 8), 0.05)
    spreads = {}
    for s in (0.05, 0.2):
        eps = torch.randn(20000, 8, generator=g)
        x = s * eps  # mu_old = 0
        lp, lp_old = _gauss_log_prob(x, dmu.expand_as(x), s), _gauss_log_prob(x, torch.zeros_like(x), s)
        plain = guard_log_ratio(lp, lp_old, dmu.expand_as(x), torch.zeros_like(x), torch.full((20000,), s), ratio_norm=False)
        normed = guard_log_ratio(lp, lp_old, dmu.expand_as(x), torch.zeros_like(x), torch.full((20000,), s), ratio_norm=True)
        bias = 0.05**2 / (2 * s**2)
        assert plain.mean().item() == pytest.approx(-bias, abs=4 * plain.std().item() / math.sqrt(20000))
        assert abs(normed.mean().item()) < 4 * normed.std().item() / math.sqrt(20000)
        spreads[s] = (plain.std().item(), normed.std().item())
    assert spreads[0.05][0] == pytest.approx(4 * spreads[0.2][0], rel=0.05)  # plain: spread ~ 1/s
    assert spreads[0.05][1] == pytest.approx(spreads[0.2][1], rel=0.05)  # RatioNorm: the same at every step


def test_step_weighted_ppo_clip_loss_by_hand():
    # log r_hat = [0.15, -0.3], A = [1, -2], dt = [0.1, 0.25] -> delta = [10, 4], eps = 0.2
    # edge 0: r = e^0.15 = 1.16183 (inside the clip): l = -1.16183; edge 1: r = e^-0.3 = 0.74082 -> clip 0.8: l = max(1.48164, 1.6) = 1.6
    log_ratio, adv, dt = torch.tensor([0.15, -0.3]), torch.tensor([1.0, -2.0]), torch.tensor([0.1, 0.25])
    delta = step_weights(dt, "inverse_dt")
    assert torch.allclose(delta, torch.tensor([10.0, 4.0]))
    l0, l1 = -math.exp(0.15), 1.6
    loss, m = step_weighted_ppo_clip_loss(log_ratio, adv, delta, clip_range=0.2)
    assert loss.item() == pytest.approx((10 * l0 + 4 * l1) / 2, rel=1e-6)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    loss, m = step_weighted_ppo_clip_loss(log_ratio, adv, delta, clip_range=0.2, weights=torch.tensor([1.0, 3.0]),
                                kl=torch.tensor([0.5, 1.0]), kl_beta=0.1)
    policy = (1 * 10 * l0 + 3 * 4 * l1) / 4
    assert m["policy_loss"].item() == pytest.approx(policy, rel=1e-6)
    assert loss.item() == pytest.approx(policy + 0.1 * (0.5 + 3 * 1.0) / 4, rel=1e-6)  # the KL is not reweighted
    assert torch.equal(step_weights(dt, "none"), torch.ones(2))
    with pytest.raises(ValueError, match="grad_reweight"):
        step_weights(dt, "dt")


def _edge_batch(n: int = 5):
    g = torch.Generator().manual_seed(2)
    mean_old = torch.randn(n, 2, 4, 4, generator=g)
    mean = (mean_old + 1e-3 * torch.randn(n, 2, 4, 4, generator=g)).requires_grad_(True)
    std, delta = torch.rand(n, generator=g) + 0.1, torch.rand(n, generator=g) * 0.2 + 0.05
    x = mean_old.detach() + std.view(-1, 1, 1, 1) * torch.randn(n, 2, 4, 4, generator=g)
    lp = -((x - mean) ** 2).reshape(n, -1).mean(1) / (2 * std**2)
    lp_old = -((x - mean_old) ** 2).reshape(n, -1).mean(1) / (2 * std**2)
    return dict(log_prob=lp, log_prob_old=lp_old, advantages=torch.randn(n, generator=g), weights=None, kl=None,
                mean=mean, mean_old=mean_old, std=std, delta=delta)


def test_with_both_fixes_off_the_loss_is_flat_grpos(monkeypatch):
    monkeypatch.chdir(REPO)
    off = load_config(GUARD, ["algorithm.grpo_guard.ratio_norm=false", "algorithm.grpo_guard.grad_reweight=none"])
    grpo = load_config(os.path.join(REPO, "configs", "quickstart.yaml"))
    assert off.algorithm.clip_range == grpo.algorithm.clip_range
    batch = _edge_batch()
    want, want_m = GRPO(grpo).edge_loss(**batch)
    got, got_m = GRPOGuard(off).edge_loss(**batch)
    assert torch.equal(got, want) and all(torch.equal(got_m[k], want_m[k]) for k in want_m)
    # the pure path with identity normalisation and unit step weights is PPO-clip itself
    b = batch
    log_ratio = guard_log_ratio(b["log_prob"], b["log_prob_old"], b["mean"], None, b["std"], ratio_norm=False)
    pure, _ = step_weighted_ppo_clip_loss(log_ratio, b["advantages"], step_weights(b["delta"], "none"), clip_range=0.2)
    ref, _ = ppo_clip_loss(b["log_prob"], b["log_prob_old"], b["advantages"], clip_range=0.2)
    assert pure.item() == pytest.approx(ref.item(), rel=1e-6)
    # with the fixes on, the loss is the hand-composed one, on-policy ratio exactly 1
    on = GRPOGuard(load_config(GUARD))
    assert on.keeps_means
    got, m = on.edge_loss(**batch)
    lr = (b["log_prob"] - b["log_prob_old"] + ((b["mean"] - b["mean_old"]) ** 2).reshape(5, -1).mean(1) / (2 * b["std"] ** 2)) * b["std"]
    want, _ = step_weighted_ppo_clip_loss(lr, b["advantages"], 1 / b["delta"], clip_range=on.cfg.algorithm.clip_range)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    on_policy = dict(batch, log_prob=b["log_prob_old"], mean=b["mean_old"])
    assert on.edge_loss(**on_policy)[1]["ratio_max_dev"].item() == 0.0


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.grpo_guard.grad_reweight=dt"], "algorithm.grpo_guard.grad_reweight"),
    (["sampling.sampler=cps", "sampling.cps_log_prob=flow_grpo"], "algorithm.grpo_guard.ratio_norm"),
])
def test_guard_config_errors_name_the_key(monkeypatch, overrides, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(GUARD, overrides)


# ------------------------------------------------------------------------------------------------
# DGPO: the group preference, its clip, the draws
# ------------------------------------------------------------------------------------------------
def test_group_preference_weights_by_hand():
    # beta 10, G = 2. group 0: A = [1, -1], l - l_ref = [-0.1, 0.2] -> s = 10/2 (-0.1 - 0.2) = -1.5
    # group 7: A = [2, 0], l - l_ref = [0.3, 0] -> s = 10/2 (0.6) = 3
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0])
    err, err_ref = torch.tensor([0.2, 0.5, 0.4, 0.1]), torch.tensor([0.3, 0.3, 0.1, 0.1])
    w = group_preference_weights(adv, err, err_ref, torch.tensor([0, 0, 7, 7]), beta_dpo=10.0, group_size=2)
    s0, s1 = 1 / (1 + math.exp(1.5)), 1 / (1 + math.exp(-3.0))
    assert w.tolist() == pytest.approx([s0, s0, s1, s1], rel=1e-6)


def test_dgpo_loss_by_hand_and_its_gradient_is_the_group_dpo_objective():
    """Value: mean(sigma(s_g) A l); gradient: that of G/(beta N) sum_g softplus(s_g), s_g = beta/G sum A (l - l_ref),
    computed independently with autograd through s_g."""
    g = torch.Generator().manual_seed(3)
    n, groups = 6, torch.tensor([0, 0, 0, 4, 4, 4])
    target, v_ref = torch.randn(n, 3, 2, generator=g), torch.randn(n, 3, 2, generator=g)
    v = torch.randn(n, 3, 2, generator=g).requires_grad_(True)
    adv = torch.tensor([1.2, -0.4, -0.8, 0.5, 0.5, -1.0])
    loss, m = dgpo_loss(v, target, v_ref, adv, groups, beta_dpo=3.0, group_size=3)
    err = ((v.detach() - target) ** 2).reshape(n, -1).mean(1)
    err_ref = ((v_ref - target) ** 2).reshape(n, -1).mean(1)
    s = torch.stack([3.0 / 3 * (adv[groups == k] * (err - err_ref)[groups == k]).sum() for k in (0, 4)])
    w = torch.sigmoid(s).repeat_interleave(3)
    assert loss.item() == pytest.approx((w * adv * err).mean().item(), rel=1e-6)
    assert m["group_weight"].item() == pytest.approx(w.mean().item(), rel=1e-6)
    loss.backward()
    v2 = v.detach().clone().requires_grad_(True)
    e2 = ((v2 - target) ** 2).reshape(n, -1).mean(1)
    s2 = torch.stack([1.0 * (adv[groups == k] * (e2 - err_ref)[groups == k]).sum() for k in (0, 4)])
    (3 / (3.0 * n) * F.softplus(s2).sum()).backward()
    assert torch.allclose(v.grad, v2.grad, atol=1e-6)


def test_dgpo_clip_by_hand_stops_the_gradient_of_clipped_rows():
    # r = exp(l_old - l): A > 0 clipped above 1 + eps, A <= 0 below 1 - eps (eps = 0.1)
    err = torch.tensor([0.0, 0.0, 0.0, 0.0])
    err_old = torch.tensor([0.2, 0.05, -0.2, -0.05])  # r = 1.221, 1.051, 0.819, 0.951
    adv = torch.tensor([1.0, 1.0, -1.0, 0.0])
    assert dgpo_clip_mask(adv, err, err_old, 0.1).tolist() == [True, False, True, False]
    target = torch.zeros(4, 1)
    v = torch.tensor([[0.1], [0.2], [0.3], [0.4]], requires_grad=True)
    v_old = torch.sqrt(torch.tensor([[0.01 + 0.2], [0.04 + 0.05], [0.09 - 0.2 + 0.5], [0.16]]))  # l_old by row
    with torch.no_grad():
        clipped = dgpo_clip_mask(adv, flow_matching_error(v, target), flow_matching_error(v_old, target), 0.1)
    loss, m = dgpo_loss(v, target, torch.zeros(4, 1), adv, torch.tensor([0, 0, 1, 1]), beta_dpo=1.0, group_size=2,
                        v_old=v_old, clip_range=0.1)
    loss.backward()
    assert m["clip_frac"].item() == pytest.approx(clipped.float().mean().item())
    assert clipped.any() and bool((v.grad[clipped] == 0).all()) and bool((v.grad[~clipped & (adv != 0)] != 0).all())
    with pytest.raises(ValueError, match="v_old"):
        dgpo_loss(v, target, torch.zeros(4, 1), adv, torch.tensor([0, 0, 1, 1]), beta_dpo=1.0, group_size=2, clip_range=0.1)


def test_dgpo_draws_share_times_and_group_noise():
    grid = torch.linspace(1, 0, 11)
    order, sigma, noise = dgpo_draws(3, (2, 2), grid, torch.Generator().manual_seed(0), count=4,
                                     candidates=num_candidate_steps(10, 0.7), shared_noise=True, group_size=4)
    assert num_candidate_steps(10, 0.7) == 7 and sorted(order.tolist()) == [0, 1, 2]
    steps = [int(torch.nonzero(torch.isclose(grid, s)).item()) for s in sigma]
    assert len(set(steps)) == 4 and all(0 <= k < 7 for k in steps)
    assert noise.shape == (12, 4, 2, 2)
    for p in range(3):  # one noise per group and time
        assert all(torch.equal(noise[4 * p], noise[4 * p + j]) for j in range(4))
    assert not torch.equal(noise[0, 0], noise[0, 1]) and not torch.equal(noise[0], noise[4])
    _, _, own = dgpo_draws(3, (2, 2), grid, torch.Generator().manual_seed(0), count=4, candidates=7,
                           shared_noise=False, group_size=4)
    assert not torch.equal(own[0], own[1])
    assert group_major_order(torch.tensor([2, 0, 1]), torch.tensor([0, 0, 2, 2])).tolist() == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="train_timesteps"):
        dgpo_draws(3, (2,), grid, torch.Generator(), count=8, candidates=7, shared_noise=True, group_size=4)


def test_dgpo_rollout_is_deterministic_and_keeps_its_reference_without_kl(tmp_path, monkeypatch):
    from flowalign.recipes.awm import AWMRecipe

    monkeypatch.chdir(REPO)
    spec = DGPO(load_config(DGPO_CONFIG)).rollout_spec(0, 1)
    assert spec.noise_levels == (0.0,) * 10 and spec.samples_per_prompt == 8
    # full fine-tuning with kl_beta 0: the frozen base copy the preference compares against is still kept
    cfg = load_config(DGPO_CONFIG, {**RUN, "algorithm.kl_beta": 0.0, "output_dir": str(tmp_path / "ref")})
    recipe = AWMRecipe(cfg)
    recipe.setup()
    try:
        assert recipe.adapter.reference_copy is not None and recipe.kl_ema is not None
    finally:
        recipe.cleanup()


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.dgpo.train_timesteps=8"], "algorithm.dgpo.train_timesteps"),
    (["train.micro_batch_size=12"], "train.micro_batch_size"),
    (["data.prompts_per_iter=3", "train.steps_per_iter=2"], "train.steps_per_iter"),
])
def test_dgpo_config_errors_name_the_key(monkeypatch, overrides, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(DGPO_CONFIG, overrides)


# ------------------------------------------------------------------------------------------------
# two iterations of each quickstart config
# ------------------------------------------------------------------------------------------------
def _train(config: str, tmp_path, name: str):
    import flowalign
    from flowalign.training.metrics import read_metrics

    summary = flowalign.train(config, {**RUN, "output_dir": str(tmp_path / name)})
    return summary, [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]


@pytest.mark.slow
def test_grpo_guard_quickstart_runs_two_iterations_on_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    summary, records = _train(GUARD, tmp_path, "guard")
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert r["train/ratio_first_step_dev"] < 1e-5  # RatioNorm is 0 exactly on-policy
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/grad_norm", "train/ratio_mean"))
        assert r["rollout/trained_edges"] == 2 * 8 * 6 and r["rollout/nfe"] == 2 * 8 * 10


@pytest.mark.slow
def test_dgpo_quickstart_runs_two_iterations(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    summary, records = _train(DGPO_CONFIG, tmp_path, "dgpo")
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/policy_loss", "train/kl", "train/grad_norm",
                                                  "train/advantage_abs_mean"))
        assert r["rollout/nfe"] == 2 * 8 * 10 and r["rollout/trained_edges"] == 2 * 8  # ODE rollout; one unit per sample
        assert 0 < r["train/group_weight"] < 1 and 0 <= r["train/clip_frac"] <= 1
    assert [r["train/old_decay"] for r in records] == pytest.approx([0.001, 0.002])  # min(0.3, 0.001 x steps), 1 step / it
