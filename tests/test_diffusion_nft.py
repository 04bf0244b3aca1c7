"""DiffusionNFT (flowalign/algorithms/diffusion_nft.py, flowalign/losses/diffusion_nft.py): the math by hand,
its config checks, and two iterations of the quickstart config through ``flowalign.train``."""

from __future__ import annotations

import math
import os

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.losses.diffusion_nft import adaptive_x0_loss, nft_loss, old_policy_decay, optimality_probability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/diffusion_nft/quickstart.yaml"


def test_optimality_probability_by_hand():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 7.0])
    r = optimality_probability(a, 5.0)  # clip(A, ±5) / 5 / 2 + 1/2
    assert torch.allclose(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="algorithm.adv_clip"):
        optimality_probability(a, 0.0)


def test_nft_loss_by_hand():
    # one row, D = 2: beta 0.5, v = [1, 0], v_old = [0, 2], x_t = [1, 1], x0 = [0, 0], t = 0.5, r = 0.75, c = 5
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    v_old, x_t, x0 = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)
    t, r = torch.tensor([0.5]), torch.tensor([0.75])
    # v+ = [0.5, 1] -> x0+ = [0.75, 0.5]: mean sq 0.40625 / mean abs 0.625 = 0.65
    # v- = 1.5 [0, 2] - 0.5 [1, 0] = [-0.5, 3] -> x0- = [1.25, -0.5]: 0.90625 / 0.875 = 1.0357142857
    pos, neg = 0.65, 0.90625 / 0.875
    policy = 5 * (0.75 * pos / 0.5 + 0.25 * neg / 0.5)
    kl = 0.5  # mean((v - 0)^2) over D
    loss, m = nft_loss(v, v_old, x_t, x0, t, r, beta=0.5, adv_clip=5.0, v_ref=torch.zeros(1, 2), kl_beta=0.1)
    assert math.isclose(loss.item(), policy + 0.1 * kl, rel_tol=1e-6)
    assert math.isclose(m["policy_loss"].item(), policy, rel_tol=1e-6)
    assert math.isclose(m["positive_loss"].item(), pos, rel_tol=1e-6)
    assert math.isclose(m["negative_loss"].item(), neg, rel_tol=1e-6)
    assert math.isclose(m["old_deviate"].item(), (1 + 4) / 2, rel_tol=1e-6)
    # gradient by hand (the adaptive weights are constants): d/dv of c/beta [r |x0+|^2/(D w+) + (1-r) |x0-|^2/(D w-)]
    # x0+ = x_t - t (beta v + (1-beta) v_old): d x0+/dv = -t beta; x0- = x_t - t ((1+beta) v_old - beta v): +t beta
    e_pos, e_neg = torch.tensor([0.75, 0.5]), torch.tensor([1.25, -0.5])
    grad = 5 / 0.5 * (0.75 * 2 * e_pos * (-0.25) / (2 * 0.625) + 0.25 * 2 * e_neg * 0.25 / (2 * 0.875))
    grad = grad + 0.1 * 2 * torch.tensor([1.0, 0.0]) / 2
    loss.backward()
    assert torch.allclose(v.grad[0], grad, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_nft_gradient_at_the_old_policy_is_advantage_weighted_matching(beta):
    """At v = v_old, v+ = v- = v_old and the gradient is c (2r - 1) grad l(v): advantage-weighted flow
    matching, whatever beta (paper §3.2)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v_old = torch.randn(3, 4, 2, 2, generator=g)
    r = torch.tensor([0.0, 0.3, 1.0])
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, r, beta=beta, adv_clip=5.0)[0].backward()
    u = v_old.clone().requires_grad_(True)
    (5.0 * (2 * r - 1) * adaptive_x0_loss(u, x_t, x0, t)).mean().backward()
    assert torch.allclose(v.grad, u.grad, atol=1e-5)


def test_old_policy_decay_schedules():
    assert old_policy_decay("none", 500) == 0.0
    assert [old_policy_decay("ramp", s) for s in (0, 100, 499, 10_000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    assert [old_policy_decay("delayed", s) for s in (74, 75, 175, 10_000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])
    with pytest.raises(ValueError, match="algorithm.diffusion_nft.old_decay"):
        old_policy_decay("cosine", 1)


def test_default_times_are_each_grid_time_once():
    """int(N x 0.99) stratified bins of width one: every sample gets grid steps 0 .. int(N x 0.99) - 1 once each
    (the reference's timesteps[:num_train_timesteps])."""
    from flowalign.algorithms.diffusion_nft import num_train_times
    from flowalign.recipes.awm import awm_times

    grid = torch.linspace(1.0, 0.0, 11)
    count = num_train_times(10, 0.99, None)
    assert count == 9
    times = awm_times("discrete", 5, count, torch.Generator().manual_seed(1), grid=grid, timestep_fraction=0.99)
    assert torch.equal(times, grid[:9].expand(5, 9))


@pytest.mark.parametrize("overrides, key", [
    (["algorithm.adv_clip=0"], "algorithm.adv_clip"),
    (["algorithm.diffusion_nft.train_timesteps=5"], "algorithm.diffusion_nft.train_timesteps"),
    (["algorithm.diffusion_nft.old_decay=cosine"], "algorithm.diffusion_nft.old_decay"),
])
def test_config_errors_name_the_key(monkeypatch, overrides, key):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(CONFIG, overrides)


@pytest.mark.slow
def test_quickstart_runs_two_iterations(tmp_path, monkeypatch):
    import flowalign
    from flowalign.training.metrics import read_metrics

    monkeypatch.chdir(REPO)
    overrides = {"train.iterations": 2, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / "nft"),
                 "eval.samples_per_prompt": 1, "eval.every": 0, "logging.progress": False, "logging.tensorboard": False,
                 "train.checkpoint_every": 0}
    summary = flowalign.train(CONFIG, overrides)
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/policy_loss", "train/kl", "train/grad_norm"))
        assert r["rollout/nfe"] == 2 * 8 * 5  # no extra rollout evaluation
    # the old policy's decay min(0.001 x optimizer steps, 0.5) after 2 and 4 steps
    assert [r["train/old_decay"] for r in records] == pytest.approx([0.002, 0.004])
    # the old copy lags the policy: in the second iteration v_theta and v_old differ from the first micro-batch on
    assert records[1]["train/old_deviate"] > 0


def test_old_policy_copy_is_soft_updated_once_per_iteration(tmp_path, monkeypatch):
    """After one iteration (2 optimizer steps) the old copy is 0.002·θ_before + 0.998·θ_after (decay_type 1)."""
    from flowalign.recipes.awm import AWMRecipe

    monkeypatch.chdir(REPO)
    cfg = load_config(CONFIG, {"data.prompts_per_iter": 1, "output_dir": str(tmp_path / "nft"), "eval.every": 0,
                               "logging.progress": False, "logging.tensorboard": False, "train.checkpoint_every": 0})
    recipe = AWMRecipe(cfg)
    recipe.setup()
    try:
        before = {n: p.detach().clone() for n, p in recipe.module.named_parameters() if p.requires_grad}
        metrics = recipe.train_iteration(0)
        after = {n: p.detach().clone() for n, p in recipe.module.named_parameters() if p.requires_grad}
        shadow = recipe.kl_ema.state_dict()
    finally:
        recipe.cleanup()
    assert metrics["train/old_decay"] == pytest.approx(0.002)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved, "the update changed no parameter"
    for n in before:
        assert torch.allclose(shadow[n], 0.002 * before[n] + 0.998 * after[n], atol=1e-6), n
