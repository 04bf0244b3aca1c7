"""AWM against its reference (scxue/advantage_weighted_matching @ be51372, scripts/train_sd3_awm.py,
config/dgx_awm.py): the time weightings, the ratio/clip form, the time schedules, the EMA-KL copy
and its decay, ``advantage_max``; each checked against an independent computation, and through
the real recipe on a tiny saved toy model (docs/FIDELITY.md)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from flowalign.losses.awm import awm_log_likelihood, awm_loss
from flowalign.recipes.awm import awm_times, ema_kl_decay


# ------------------------------------------------------------------------------------------------
# time weightings (compute_log_prob_awm, lines 238-251)
# ------------------------------------------------------------------------------------------------
def test_weightings_hand_values():
    fm = torch.tensor([0.25, 4.0])
    t = torch.tensor([0.5, 0.2])
    assert torch.allclose(awm_log_likelihood(fm, None, "uniform"), torch.tensor([-0.25, -4.0]))
    assert torch.allclose(awm_log_likelihood(fm, t, "t"), torch.tensor([-0.125, -0.8]))
    assert torch.allclose(awm_log_likelihood(fm, t, "t**2"), torch.tensor([-0.0625, -0.16]))
    # huber: t·(√(ℓ + 1e-10) − 1e-5): 0.5·(0.5 − 1e-5), 0.2·(2 − 1e-5)
    assert torch.allclose(awm_log_likelihood(fm, t, "huber"), torch.tensor([-0.5 * (0.5 - 1e-5), -0.2 * (2 - 1e-5)]), atol=1e-7)
    # ghuber p = 0.25: t·((ℓ + 1e-10)^¼ − (1e-10)^¼)/¼ with (1e-10)^¼ = 10^-2.5:
    # 0.5·(0.25^¼ − 10^-2.5)·4 = 2·(√½ − 10^-2.5), 0.2·(4^¼ − 10^-2.5)·4 = 0.8·(√2 − 10^-2.5)
    e = 10 ** -2.5
    assert torch.allclose(awm_log_likelihood(fm, t, "ghuber", 0.25), torch.tensor([-2 * (0.5 ** 0.5 - e), -0.8 * (2 ** 0.5 - e)]),
                          atol=1e-5)
    # p = 1 is the t weighting, p = 1/2 twice huber
    assert torch.allclose(awm_log_likelihood(fm, t, "ghuber", 1.0), awm_log_likelihood(fm, t, "t"), atol=1e-6)
    assert torch.allclose(awm_log_likelihood(fm, t, "ghuber", 0.5), 2 * awm_log_likelihood(fm, t, "huber"), atol=1e-5)


def test_ghuber_gradient_is_the_robust_weight():
    # d(-log p)/dℓ = t·(ℓ + 1e-10)^(p-1): large errors count less (closed form)
    fm = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    (-awm_log_likelihood(fm, t, "ghuber", 0.25)).sum().backward()
    expected = t * (fm.detach() + 1e-10) ** (0.25 - 1)
    assert torch.allclose(fm.grad.double(), expected, rtol=1e-5)


def test_weighting_errors():
    with pytest.raises(ValueError, match="needs sigma"):
        awm_log_likelihood(torch.ones(2), None, "ghuber")
    with pytest.raises(ValueError, match="weighting must be one of"):
        awm_log_likelihood(torch.ones(2), torch.ones(2), "elbo")
    with pytest.raises(ValueError, match="ghuber_power"):
        awm_log_likelihood(torch.ones(2), torch.ones(2), "ghuber", 0.0)


# ------------------------------------------------------------------------------------------------
# the ratio / clip form (lines 1305-1327) and the EMA KL (lines 1341-1350)
# ------------------------------------------------------------------------------------------------
def test_ratio_clip_hand_example():
    # 2 rows, 1 dim, uniform weighting: log p = -ℓ
    v = torch.tensor([[1.0], [2.0]], requires_grad=True)
    u = torch.zeros(2, 1)
    adv = torch.tensor([1.0, -1.0])
    old = torch.tensor([-1.0 - math.log(3.0), -4.0 - math.log(0.5)])  # r = exp(-ℓ - old) = [3, 0.5]
    loss, m = awm_loss(v, u, adv, clip_range=1.0, log_prob_old=old)
    # row 0: A=1, r=3 -> max(-3, -clip(3, 0, 2)) = -2; row 1: A=-1, r=0.5 -> max(0.5, 0.5) = 0.5
    assert loss.item() == pytest.approx((-2.0 + 0.5) / 2, abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(1.75, abs=1e-5)
    assert m["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # row 0 clipped: no gradient; row 1: d/dv [-A·exp(-v²-old)]/2 = -(-1)·0.5·(-2v)/2 = -v·0.5 = -1
    assert torch.allclose(v.grad, torch.tensor([[0.0], [-1.0]]), atol=1e-5)


def test_on_policy_ratio_has_the_weighted_gradient():
    # without log_prob_old the ratio is 1 in value and its gradient is A·∇w (the paper's objective)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 2, 3, generator=g, requires_grad=True)
    u, adv, t = torch.randn(6, 2, 3, generator=g), torch.randn(6, generator=g), torch.rand(6, generator=g)
    kw = dict(sigma=t, weighting="ghuber", ghuber_power=0.25)
    loss_r, m = awm_loss(v, u, adv, clip_range=1.0, **kw)
    (g_r,) = torch.autograd.grad(loss_r, v)
    loss_w, _ = awm_loss(v, u, adv, **kw)
    (g_w,) = torch.autograd.grad(loss_w, v)
    assert loss_r.item() == pytest.approx(-adv.mean().item(), abs=1e-6) and m["ratio_mean"].item() == 1.0
    assert torch.allclose(g_r, g_w, atol=1e-6)


def test_ema_kl_term_hand_example():
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.zeros(2, 2)
    ema = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # kl = mean [(1+4)/2, 0] = 1.25; ema_kl = mean [(0+4)/2, (0+4)/2] = 2; A = 0
    loss, m = awm_loss(v, v.clone(), torch.zeros(2), v_ref=ref, kl_beta=0.1, v_ema=ema, ema_kl_beta=1.0)
    assert m["kl"].item() == pytest.approx(1.25) and m["ema_kl"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.125 + 2.0)
    with pytest.raises(ValueError, match="v_ema"):
        awm_loss(v, v, torch.zeros(2), ema_kl_beta=1.0)


def test_ema_kl_decay_schedule():
    # kl_ema_decay_type linear: min(0.3, 0.001·global_step) (lines 1410-1413)
    assert [ema_kl_decay("linear", 0.3, 0.001, s) for s in (1, 150, 300, 5000)] == pytest.approx([0.001, 0.15, 0.3, 0.3])
    assert ema_kl_decay("constant", 0.3, 0.001, 1) == 0.3


# ------------------------------------------------------------------------------------------------
# time schedules (lines 1138-1207)
# ------------------------------------------------------------------------------------------------
def _grid(n: int, shift: float = 3.0) -> torch.Tensor:
    s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@pytest.mark.parametrize("kind, bins", [
    # 14 steps, fraction 0.9: int(12.6) = 12; linspace(1, 12, 7) -> 1, 2, 4, 6, 8, 10, 12 (truncated)
    ("discrete_wo_init", [{1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]),
    # linspace(0, 12, 7) -> 0, 2, ..., 12
    ("discrete", [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]),
])
def test_discrete_times_one_grid_step_per_bin(kind, bins):
    grid = _grid(14)
    times = awm_times(kind, 400, 6, torch.Generator().manual_seed(0), grid=grid, timestep_fraction=0.9)
    idx = (times[..., None] - grid).abs().argmin(-1)  # back to grid indices
    assert torch.allclose(grid[idx], times)
    for k, allowed in enumerate(bins):
        assert set(idx[:, k].tolist()) == allowed  # every index of the bin is drawn, no other


def test_uniform_and_logit_normal_times_are_stratified():
    n, count, shift = 300, 6, 3.0
    unshift = lambda t: t / (shift - (shift - 1) * t)  # noqa: E731  inverse of s·t/(1+(s-1)t)
    t = unshift(awm_times("uniform", n, count, torch.Generator().manual_seed(1), shift=shift).double())
    q = (t - 0.2) / 0.8 * count  # bin k holds U(0.2, 1)'s k-th sixth
    assert torch.equal(q.floor().long(), torch.arange(count).expand(n, count))
    t = unshift(awm_times("logit_normal", n, count, torch.Generator().manual_seed(2), shift=shift).double())
    z = torch.log(t / (1 - t))
    phi = torch.tensor([[0.5 * (1 + math.erf(float(x) / math.sqrt(2))) for x in row] for row in z])
    ok = (phi * count).floor().long() == torch.arange(count)
    # the clamp at 0.01 may move the lowest quantiles out of bin 0 only
    assert bool(ok[:, 1:].all()) and float(ok[:, 0].float().mean()) > 0.9


# ------------------------------------------------------------------------------------------------
# advantage_max (lines 1293-1299)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("advantage_max", [1.0, 0.5, None])
def test_advantage_max_rescales_the_clipped_advantages(tiny_config, tmp_path, advantage_max):
    from types import SimpleNamespace

    import numpy as np

    from flowalign.algorithms import get_algorithm
    from flowalign.algorithms.flow import ScoredRollout
    from flowalign.config import load_config

    cfg = load_config(_awm(tiny_config, tmp_path / "x", advantage_max=advantage_max))
    algo = get_algorithm("awm", recipes=("awm",))(cfg)
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.2, 0.4, 0.6, 0.8])  # two groups of 4; group 0 clips at +5
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scored = ScoredRollout(scores=scores, valid=torch.ones(8, dtype=torch.bool), components={}, weights={}, all_scores=scores,
                           all_groups=groups, all_valid=torch.ones(8, dtype=torch.bool), rank=0, world=1, gather=lambda t: t)
    tree = SimpleNamespace(leaf_edges=torch.arange(8)[:, None], num_edges=8, trainable=torch.ones(8, dtype=torch.bool))
    adv = algo.targets(tree, scored, None, 0).advantages
    # the reference: (r - group mean) / (np.std + 1e-4), clipped to ±adv_clip (5), then / adv_clip · advantage_max
    r = scores.numpy().astype(np.float64).reshape(2, 4)
    a = np.clip((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4), -5, 5).reshape(-1)
    expected = a / 5 * advantage_max if advantage_max is not None else a
    assert np.allclose(adv.numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# through the recipe
# ------------------------------------------------------------------------------------------------
def _run(cfg_dict: dict):
    from flowalign.config import load_config
    from flowalign.recipes.awm import AWMRecipe
    from flowalign.training.metrics import read_metrics

    recipe = AWMRecipe(load_config(cfg_dict))
    recipe.setup()
    try:
        recipe.train()
        kl_ema = {n: v.clone() for n, v in recipe.kl_ema.state_dict().items()} if recipe.kl_ema is not None else None
    finally:
        recipe.cleanup()
    records = [r for r in read_metrics(os.path.join(cfg_dict["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    return records, kl_ema


def _awm(tiny_config, out, **awm):
    cfg = {**tiny_config, "output_dir": str(out), "num_threads": 1}
    cfg["algorithm"] = {**cfg["algorithm"], "name": "awm", "awm": {"train_timesteps": 2, **awm}}
    cfg["eval"] = {**cfg["eval"], "samples_per_prompt": 1}
    cfg["logging"] = {**cfg["logging"], "tensorboard": False}
    return cfg


def test_recipe_ratio_and_ema_kl_resume(tiny_config, tmp_path):
    """The defaults (ratio clip 1, ghuber, discrete_wo_init times, EMA-KL; 2 times per sample for speed) through the loop; with two
    optimizer steps the second step's ratio departs from 1; the EMA-KL copy resumes exactly."""
    from flowalign.training.checkpoint import EMA_FILE

    awm = {"ema_kl_decay_type": "constant", "ema_kl_decay": 0.5}  # a decay that makes the copy lag visibly
    straight, ema_straight = _run(_awm(tiny_config, tmp_path / "straight", **awm))
    assert len(straight) == 2
    for r in straight:
        assert r["train/ratio_mean"] != 1.0 and r["train/ema_kl"] >= 0 and r["train/ema_kl_decay"] == 0.5
    assert straight[1]["train/ema_kl"] > 0  # the copy lags the policy after the first update

    # the EMA copy is checkpointed beside the weights and resumes exactly
    split_cfg = _awm(tiny_config, tmp_path / "split", **awm)
    _run({**split_cfg, "train": {**split_cfg["train"], "iterations": 1}})
    from safetensors.torch import load_file

    ckpts = os.path.join(split_cfg["output_dir"], "checkpoints")
    (step_dir,) = [d for d in os.listdir(ckpts) if d.startswith("step-")]
    assert all(n.startswith("awm_kl_ema/") for n in load_file(os.path.join(ckpts, step_dir, EMA_FILE)))
    resumed, ema_resumed = _run(split_cfg)
    for n in ema_straight:
        assert torch.allclose(ema_straight[n], ema_resumed[n], atol=1e-6), n



def test_recipe_single_step_is_on_policy(tiny_config, tmp_path):
    cfg = _awm(tiny_config, tmp_path / "one", ema_kl_beta=0.0, weighting="t", time_sampling="logit_normal", advantage_max=None)
    cfg["train"] = {**cfg["train"], "steps_per_iter": 1, "iterations": 1}
    (record,), kl_ema = _run(cfg)
    assert record["train/ratio_mean"] == 1.0 and record["train/clipfrac"] == 0.0 and kl_ema is None


def test_config_checks_name_the_key(tiny_config, tmp_path):
    from flowalign.config import ConfigError, load_config

    cfg = _awm(tiny_config, tmp_path / "x")
    with pytest.raises(ConfigError, match="^algorithm.awm.advantage_max"):
        load_config({**cfg, "algorithm": {**cfg["algorithm"], "adv_clip": 0.0}})
    with pytest.raises(ConfigError, match="^algorithm.awm.timestep_fraction"):
        load_config(_awm(tiny_config, tmp_path / "x", timestep_fraction=0.3))  # 3 steps: int(0.9) = 0 <= 1
    with pytest.raises(ConfigError, match="algorithm.awm.weighting"):
        load_config(_awm(tiny_config, tmp_path / "x", weighting="elbo"))
