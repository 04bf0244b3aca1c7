"""Fidelity of multi_reward (GDPO) and tempflow_grpo (TempFlow-GRPO) to their reference code (issue 13).

* multi_reward: NVlabs/GDPO @ b080e63, trl-GDPO/trl-0.18.0-gdpo/trl/trainer/grpo_trainer.py l. 1221-1248
  (two stages, each ``(x - mean) / (torch.std(x) + 1e-4)``, torch.std unbiased).
* tempflow_grpo: Shredded-Pork/TempFlow-GRPO @ e66824e, scripts/train_sd3_pr.py (loss ``-2.25 * std_dev_t * A * r``)
  and flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (``std_dev_t * sqrt(-dt)`` returned, noise level 0.7).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowalign.config import ConfigError, load_config
from flowalign.estimators.preference import decoupled_normalization
from tests.conftest import REPO


# ---------------------------------------------------------------------------------------------
# multi_reward (GDPO)
# ---------------------------------------------------------------------------------------------
def _gdpo_numpy(parts: list[np.ndarray], weights: list[float], group_size: int) -> np.ndarray:
    """GDPO's two stages (trl grpo_trainer.py l. 1230-1248), written with numpy: per reward,
    (r - group mean) / (group std, ddof 1, + 1e-4); weighted sum; (x - mean) / (std, ddof 1, + 1e-4)."""
    pre = np.zeros(len(parts[0]))
    for r, w in zip(parts, weights):
        g = r.reshape(-1, group_size)
        mean = np.repeat(g.mean(axis=1), group_size)
        std = np.repeat(g.std(axis=1, ddof=1), group_size)
        pre += w * (r - mean) / (std + 1e-4)
    return (pre - pre.mean()) / (pre.std(ddof=1) + 1e-4)


def test_multi_reward_hand_example_matches_gdpo():
    """One group of 4, r1 = [1, 0, 0, 0], r2 = [0, 0, 1, 1], weights 1, 1 (index (c)7).

    By hand: r1 -> (r1 - 0.25) / (0.5 + 1e-4) = [1.4997, -0.4999 x3]; r2 -> [-0.8659, -0.8659, 0.8659, 0.8659];
    sum [0.6338, -1.3658, 0.3660, 0.3660], unbiased std 0.9194 -> [0.6894, -1.4856, 0.3981, 0.3981].
    The population std (the earlier default) gave [0.7961, -1.7154, 0.4597, 0.4597]."""
    r1, r2 = np.array([1.0, 0, 0, 0]), np.array([0.0, 0, 1, 1])
    ref = _gdpo_numpy([r1, r2], [1.0, 1.0], 4)
    np.testing.assert_allclose(ref, [0.6894, -1.4856, 0.3981, 0.3981], atol=1e-4)
    rewards = {"a": torch.tensor(r1), "b": torch.tensor(r2)}
    groups = torch.zeros(4, dtype=torch.long)
    ours = decoupled_normalization(rewards, None, groups, renormalize=True, unbiased=True, eps=1e-4)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)
    old = decoupled_normalization(rewards, None, groups, renormalize=True, unbiased=False, eps=1e-4)
    np.testing.assert_allclose(old.numpy(), [0.7961, -1.7154, 0.4597, 0.4597], atol=1e-4)


def test_multi_reward_random_batches_match_gdpo():
    rng = np.random.default_rng(0)
    for G, n_groups, w in [(4, 3, [1.0, 0.2]), (8, 2, [0.5, 2.0, 1.0])]:
        parts = [rng.normal(size=G * n_groups) * s for s in (1.0, 5.0, 0.1)[:len(w)]]
        groups = torch.arange(n_groups).repeat_interleave(G)
        ours = decoupled_normalization({f"r{i}": torch.tensor(p) for i, p in enumerate(parts)},
                                       {f"r{i}": x for i, x in enumerate(w)}, groups, renormalize=True, unbiased=True)
        np.testing.assert_allclose(ours.numpy(), _gdpo_numpy(parts, w, G), rtol=1e-5, atol=1e-5)


def _recipe(name: str, tmp_path, overrides: dict):
    from flowalign.recipes.rl import RLRecipe

    cfg = load_config(f"configs/{name}/quickstart.yaml", {"output_dir": str(tmp_path / name), "logging.progress": False, **overrides})
    recipe = RLRecipe(cfg)
    recipe.setup()
    return recipe


def test_multi_reward_recipe_defaults_to_gdpo_form(tmp_path, monkeypatch):
    """Real rollout, real rewards of the quickstart config (digit classifier + JPEG, weights 1 / 0.2), scored by the
    recipe, advantages by the algorithm with its defaults (adv_clip 0: GDPO does not clip) against the numpy transcription;
    ``algorithm.std_estimator: population`` still gives the earlier form."""
    from flowalign.rollout import rollout

    monkeypatch.chdir(REPO)
    recipe = _recipe("multi_reward", tmp_path, {"algorithm.adv_clip": 0.0, "sampling.num_steps": 3})
    try:
        assert recipe.algorithm.group_std() == (True, 1e-4)
        prompts = ["the digit one", "the digit seven"]
        spec = recipe.algorithm.rollout_spec(0, recipe.world)
        tree = rollout(recipe.adapter, recipe.adapter.encode(prompts), spec, prompts=prompts,
                       generator=torch.Generator().manual_seed(0))
        scored, _ = recipe._score_leaves(tree, prompts, [{"prompt": p} for p in prompts])
        names = list(scored.weights)
        assert len(names) == 2
        order = torch.argsort(scored.all_groups, stable=True)
        G = int((scored.all_groups == scored.all_groups[0]).sum())
        parts = [scored.components[n].double().numpy()[order.numpy()] for n in names]
        ref = _gdpo_numpy(parts, [scored.weights[n] for n in names], G)
        ours = recipe.algorithm.leaf_advantages(scored)[order]
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=1e-5)
        recipe.cfg.algorithm.std_estimator = "population"
        pop = recipe.algorithm.leaf_advantages(scored)[order]
        assert not torch.allclose(pop, ours, atol=1e-4)  # population std: the earlier (non-reference) form
    finally:
        recipe.cleanup()


# ---------------------------------------------------------------------------------------------
# tempflow_grpo (TempFlow-GRPO)
# ---------------------------------------------------------------------------------------------
def _reference_transition_stds(sigmas: np.ndarray, noise_level: float = 0.7) -> np.ndarray:
    """sd3_sde_with_logprob.py @ e66824e: std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigmas[1], sigma))) * 0.7,
    returned times sqrt(-dt), dt = sigma_prev - sigma; one value per step 0..T-1."""
    sig, nxt = sigmas[:-1], sigmas[1:]
    std_t = np.sqrt(sig / (1 - np.where(sig == 1, sigmas[1], sig))) * noise_level
    return std_t * np.sqrt(sig - nxt)


def _sd35_sigmas() -> np.ndarray:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5-M's scheduler config
    scheduler.set_timesteps(10)  # dgx.py *_sd3_pr: sample.num_steps = 10
    return scheduler.sigmas.double().numpy()


def test_reference_constant_is_the_schedule_mean():
    """2.25 in train_sd3_pr.py is 1 / mean transition std over the branch steps 0..8 of the 10-step SD3.5 schedule."""
    stds = _reference_transition_stds(_sd35_sigmas())
    assert 1.0 / stds[:9].mean() == pytest.approx(2.25, abs=5e-3)
    assert 1.0 / stds[:6].mean() != pytest.approx(2.25, abs=0.1)  # the earlier normaliser (branch_steps 0..5): 1.89


def _tempflow(weight_norm: str | None = None):
    from flowalign.algorithms.tempflow_grpo import TempFlowGRPO

    over = {"sampling.num_steps": 10}
    if weight_norm is not None:
        over["algorithm.tempflow_grpo.weight_norm"] = weight_norm
    return TempFlowGRPO(load_config("configs/tempflow_grpo/quickstart.yaml", over))


def _fake_tree(sigmas: np.ndarray, k: int) -> SimpleNamespace:
    T = len(sigmas) - 1
    std = torch.zeros(T, dtype=torch.float32)
    std[k] = 0.5
    return SimpleNamespace(sigmas=torch.tensor(sigmas, dtype=torch.float32), step=torch.arange(T), noise_std=std)


def test_noise_aware_weight_matches_reference_constant(monkeypatch):
    """Hand values on the SD3.5 schedule: default weight_norm (schedule) = 2.25 * std_k as in the reference
    (step 0: 1.575); weight_norm: branch_steps = std_k / mean over branch_steps 0..5 (step 0: 1.325)."""
    monkeypatch.chdir(REPO)
    sigmas = _sd35_sigmas()
    stds = _reference_transition_stds(sigmas)
    algo, old = _tempflow(), _tempflow("branch_steps")
    assert algo.opts.weight_norm == "schedule"
    got = [algo.branch_step_weight(_fake_tree(sigmas, k)) for k in range(9)]
    np.testing.assert_allclose(got, 2.25 * stds[:9], rtol=2e-3)  # 2.25 is the reference's rounding of 2.252
    assert got[0] == pytest.approx(1.575, abs=2e-3)
    got_old = [old.branch_step_weight(_fake_tree(sigmas, k)) for k in range(6)]
    np.testing.assert_allclose(got_old, stds[:6] / stds[:6].mean(), rtol=1e-5)
    assert got_old[0] == pytest.approx(1.325, abs=2e-3)


def test_weight_norm_bad_value_names_the_key(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="weight_norm"):
        _tempflow("mean")


def test_tempflow_recipe_weight_uses_the_schedule_mean(tmp_path, monkeypatch):
    """Through the recipe: real rollouts of the quickstart config (toy schedule, noise 0.7); each iteration's weight is
    its step's transition std over the mean over steps 0..8 (numpy transcription of the reference's std)."""
    from flowalign.rollout import rollout

    monkeypatch.chdir(REPO)
    recipe = _recipe("tempflow_grpo", tmp_path, {})
    try:
        stds = _reference_transition_stds(recipe.adapter.sigmas(10).double().numpy())
        for it in (0, 3):
            spec = recipe.algorithm.rollout_spec(it, recipe.world)
            tree = rollout(recipe.adapter, recipe.adapter.encode(["the digit one"]), spec, prompts=["the digit one"],
                           generator=torch.Generator().manual_seed(it), decode=False)
            k = recipe.algorithm.opts.branch_steps[it]
            assert recipe.algorithm.branch_step_weight(tree) == pytest.approx(stds[k] / stds[:9].mean(), rel=1e-4)
    finally:
        recipe.cleanup()
