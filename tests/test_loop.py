"""LOOP (leave-one-out PPO, arXiv:2503.00897): the leave-one-out advantage against hand-worked values
and an independent per-sample implementation, the algorithm's PPO objective on hand-worked numbers,
and its config checks (tests/test_algorithms.py runs its quickstart config for two iterations)."""

from __future__ import annotations

import os

import pytest
import torch

from flowalign.advantages import leave_one_out_advantages
from flowalign.algorithms.flow import ScoredRollout
from flowalign.algorithms.loop import LOOP
from flowalign.config import ConfigError, load_config
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "loop", "quickstart.yaml")


def _scored(all_scores: torch.Tensor, all_groups: torch.Tensor, all_valid: torch.Tensor, world: int) -> ScoredRollout:
    """A gathered rollout of ``world`` ranks (rank 0's view) for :meth:`LOOP.leaf_advantages`."""
    local = all_scores.shape[0] // world
    return ScoredRollout(scores=all_scores[:local], valid=all_valid[:local], components={}, weights={"r": 1.0},
                         all_scores=all_scores, all_groups=all_groups, all_valid=all_valid, rank=0, world=world,
                         gather=lambda t: t)


def test_leave_one_out_advantages_hand_example():
    # group 0: rewards 1, 2, 3, 6 -> baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    # group 1: two equal rewards -> 0; group 2: one valid of two -> no baseline -> 0
    # group 3: 1, (invalid NaN), 4, 7 -> k = 3: 1 - 11/2, 0, 4 - 8/2, 7 - 5/2
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 9.0, float("nan"), 1.0, float("nan"), 4.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 5, 5, 7, 7, 9, 9, 9, 9])
    valid = ~torch.isnan(rewards)
    adv = leave_one_out_advantages(rewards, groups, valid=valid)
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0.0, 0.0, 0.0, 0.0, 1 - 5.5, 0.0, 4 - 4.0, 7 - 2.5]
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_leave_one_out_matches_a_per_sample_loop_and_the_scaled_group_mean():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 6, (40,), generator=g)
    groups[:6] = torch.arange(6)  # every group has at least one member
    adv = leave_one_out_advantages(rewards, groups)
    for i in range(40):
        mates = [j for j in range(40) if groups[j] == groups[i] and j != i]
        want = 0.0 if not mates else float(rewards[i]) - sum(float(rewards[j]) for j in mates) / len(mates)
        assert float(adv[i]) == pytest.approx(want, abs=1e-6)
        k = len(mates) + 1
        if k > 1:  # RLOO identity: A_i = k / (k - 1) * (r_i - mean_g)
            mean = float(rewards[groups == groups[i]].mean())
            assert float(adv[i]) == pytest.approx(k / (k - 1) * (float(rewards[i]) - mean), abs=1e-6)


def test_leave_one_out_errors_name_the_argument():
    with pytest.raises(FloatingPointError, match="rewards"):
        leave_one_out_advantages(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0]))
    with pytest.raises(TypeError, match="valid"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), valid=torch.tensor([1, 1]))


@pytest.fixture(scope="module")
def loop_cfg():
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return load_config(CONFIG)
    finally:
        os.chdir(cwd)


def test_loop_leaf_advantages_span_ranks_and_obey_adv_clip(loop_cfg, monkeypatch):
    # one group of 4 split over 2 ranks (2 leaves each): 0, 1 on rank 0; 1, 2 on rank 1
    scores, groups, valid = torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([3, 3, 3, 3]), torch.ones(4, dtype=torch.bool)
    algo = LOOP(loop_cfg)
    adv = algo.leaf_advantages(_scored(scores, groups, valid, world=2))
    assert adv.tolist() == pytest.approx([0 - 4 / 3, 1 - 3 / 3, 1 - 3 / 3, 2 - 2 / 3], abs=1e-6)  # not std-divided
    monkeypatch.setattr(loop_cfg.algorithm, "adv_clip", 1.0)
    clipped = LOOP(loop_cfg).leaf_advantages(_scored(scores, groups, valid, world=2))
    assert clipped.tolist() == pytest.approx([-1.0, 0.0, 0.0, 1.0], abs=1e-6)


def test_loop_objective_hand_example(loop_cfg, monkeypatch):
    """-min(ρA, clip(ρ, 1-ε, 1+ε)A), averaged over edges (arXiv:2503.00897 §4 with Schulman et al. Eq. 7)."""
    monkeypatch.setattr(loop_cfg.algorithm, "clip_range", 0.2)
    algo = LOOP(loop_cfg)
    adv = torch.tensor([-8 / 3, 4.0, 4.0])
    ratio = torch.tensor([1.5, 1.5, 0.9])
    log_prob = torch.log(ratio).requires_grad_(True)
    zeros = torch.zeros(3)
    loss, _ = algo.edge_loss(log_prob, zeros, adv, weights=None, kl=None, mean=zeros[:, None], mean_old=None,
                             std=torch.ones(3), delta=torch.ones(3))
    # edge 0: A<0, ρ=1.5 -> min(-4, -3.2) = -4 (unclipped); edge 1: A>0, ρ=1.5 -> min(6, 4.8) = 4.8 (clipped);
    # edge 2: A>0, ρ=0.9 inside [0.8, 1.2] -> 3.6
    assert float(loss.detach()) == pytest.approx(-(-4.0 + 4.8 + 3.6) / 3, abs=1e-5)
    loss.backward()
    # d/dlogρ of -ρA/3 where unclipped: -ρA/3; the clipped edge has no gradient
    assert log_prob.grad.tolist() == pytest.approx([1.5 * 8 / 9, 0.0, -0.9 * 4 / 3], abs=1e-5)


@pytest.mark.parametrize("key, value", [("sampling.group_size", 1), ("algorithm.std_mode", "none"),
                                        ("algorithm.std_estimator", "unbiased"), ("algorithm.std_eps", 1e-3)])
def test_loop_config_errors_name_the_key(key, value, monkeypatch):
    """k >= 2 (the shared group_size check); LOOP refuses the std-normalisation keys it would ignore."""
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        load_config(CONFIG, {key: value})
