"""Fidelity of DenseGRPO's noise calibration under several processes and of MixGRPO's window
schedule defaults and trimmed-ratio advantages (issue 13, items 6, 7 and 11; docs/FIDELITY.md)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from flowalign.advantages import group_advantages
from flowalign.algorithms.dense_grpo import DenseGRPO
from flowalign.algorithms.flow import ScoredRollout
from flowalign.algorithms.mix_grpo import MixGRPOConfig, trimmed_group_advantages
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.estimators.dense import calibrate_noise, step_reward_gains
from flowalign.rollout.schedules import mix_window
from flowalign.training.metrics import read_metrics
from flowalign.types import RolloutTree
from tests.conftest import REPO

DENSE = os.path.join(REPO, "configs", "dense_grpo", "quickstart.yaml")
MIX = os.path.join(REPO, "configs", "mix_grpo", "quickstart.yaml")


# ------------------------------------------------------------------------------------------------
# DenseGRPO: the calibration and the advantages pool every rank's trajectories
# ------------------------------------------------------------------------------------------------
T = 3
# 8 trajectories x (T + 1) look-ahead rewards; rows 0-3 are rank 0's, rows 4-7 rank 1's; two prompts
# (groups 0 and 1), each split 2 + 2 over the ranks as the recipe splits a group.
TABLE = torch.tensor([
    [0.1, 0.3, 0.2, 0.9],
    [0.1, 0.0, 0.4, 0.5],
    [0.5, 0.6, 0.6, 0.7],
    [0.5, 0.4, 0.8, 0.6],
    [0.1, 0.2, 0.1, 0.3],
    [0.1, 0.5, 0.3, 0.2],
    [0.5, 0.7, 0.9, 1.0],
    [0.5, 0.9, 0.6, 0.8],
], dtype=torch.float64).float()
GROUPS = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])


def _flat_tree(leaves: int, steps: int, groups: torch.Tensor) -> RolloutTree:
    """A flat tree of ``leaves`` paths of ``steps`` edges (edge ``l * steps + t``: leaf l, step t)."""
    E = leaves * steps
    z = torch.zeros(E, 1)
    return RolloutTree(
        prompt_idx=groups.repeat_interleave(steps), parent=torch.tensor([-1 if e % steps == 0 else e - 1 for e in range(E)]),
        step=torch.arange(steps).repeat(leaves), x_t=z, x_next=z, log_prob_old=torch.zeros(E), noise_std=torch.ones(E),
        trainable=torch.ones(E, dtype=torch.bool), leaf_prompt_idx=groups.clone(), leaf_group=groups.clone(),
        leaf_edges=torch.arange(E).view(leaves, steps), leaf_latents=torch.zeros(leaves, 1), prompts=["a", "b"],
        sigmas=torch.linspace(1, 0, steps + 1), nfe=E,
    )


def _scored(rank: int, world: int, gather) -> ScoredRollout:
    n = len(GROUPS) // world
    return ScoredRollout(scores=TABLE[rank * n:(rank + 1) * n, -1], valid=torch.ones(n, dtype=torch.bool), components={},
                         weights={}, all_scores=TABLE[:, -1], all_groups=GROUPS, all_valid=torch.ones(len(GROUPS), dtype=torch.bool),
                         rank=rank, world=world, gather=gather)


def _dense(overrides: dict | None = None) -> DenseGRPO:
    cfg = load_config(DENSE, {"sampling.num_steps": T, "eval.num_steps": T, **(overrides or {})})
    return DenseGRPO(cfg)


def _expected_psi(table: np.ndarray, psi: float = 0.7, rate: float = 0.01, margin: float = 2.0) -> list[float]:
    """Algorithm 1 (DenseGRPO §4.2) by hand: count the signs of every trajectory's gains per step."""
    gains = table[:, 1:] - table[:, :-1]
    n_pos, n_neg = (gains > 0).sum(0), (gains < 0).sum(0)
    return [psi + rate if abs(p - n) < margin else psi - rate for p, n in zip(n_pos, n_neg)]


def _expected_advantages(table: np.ndarray, groups: np.ndarray, clip: float = 5.0) -> np.ndarray:
    """Eq. 10 by hand: per (group, step) (gain - mean) / (population std + 1e-4) over the whole group."""
    gains = table[:, 1:] - table[:, :-1]
    out = np.zeros_like(gains)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] = (gains[rows] - gains[rows].mean(0)) / (gains[rows].std(0) + 1e-4)
    return np.clip(out, -clip, clip)


def test_calibration_split_over_two_ranks_equals_the_whole_table():
    """Each rank holds half of every group; gathering the look-ahead tables (as accelerate's gather
    concatenates them in rank order) gives both ranks the schedule of the whole table."""
    halves = TABLE.view(2, 4, T + 1)
    gather = lambda t: torch.cat([halves[0], halves[1]])  # noqa: E731 -- what acc.gather returns on either rank
    expected_psi = _expected_psi(TABLE.double().numpy())
    expected_adv = _expected_advantages(TABLE.double().numpy(), GROUPS.numpy())
    for rank in (0, 1):
        algo = _dense()
        tree = _flat_tree(4, T, GROUPS[rank * 4:(rank + 1) * 4])
        targets = algo.table_targets(halves[rank], tree, _scored(rank, 2, gather), iteration=0)
        assert algo.noise_level_schedule == pytest.approx(expected_psi, abs=1e-6)
        assert [targets.metrics[f"rollout/noise_level_{t}"] for t in range(T)] == pytest.approx(expected_psi, abs=1e-6)
        np.testing.assert_allclose(targets.advantages[tree.leaf_edges].numpy(), expected_adv[rank * 4:(rank + 1) * 4], atol=1e-5)
    # the data are chosen so that a rank calibrating on its own half would disagree with the whole table
    local = [calibrate_noise(torch.full((T,), 0.7), step_reward_gains(halves[r])).tolist() for r in (0, 1)]
    assert local[0] != local[1] and local[0] != pytest.approx(expected_psi, abs=1e-6)


def test_one_process_is_unchanged():
    algo = _dense()
    tree = _flat_tree(8, T, GROUPS)
    targets = algo.table_targets(TABLE, tree, _scored(0, 1, lambda t: t), iteration=0)
    assert algo.noise_level_schedule == pytest.approx(_expected_psi(TABLE.double().numpy()), abs=1e-6)
    np.testing.assert_allclose(targets.advantages[tree.leaf_edges].numpy(),
                               _expected_advantages(TABLE.double().numpy(), GROUPS.numpy()), atol=1e-5)


def test_calibration_iterations_freezes_psi():
    algo = _dense({"algorithm.dense_grpo.calibration_iterations": 1})
    tree = _flat_tree(8, T, GROUPS)
    first = algo.table_targets(TABLE, tree, _scored(0, 1, lambda t: t), iteration=0).metrics
    second = algo.table_targets(TABLE, tree, _scored(0, 1, lambda t: t), iteration=1).metrics
    assert [first[f"rollout/noise_level_{t}"] for t in range(T)] == pytest.approx(_expected_psi(TABLE.double().numpy()))
    assert second == first  # frozen after the first iteration, still logged
    with pytest.raises(ConfigError, match="^algorithm.dense_grpo.calibration_iterations:"):
        load_config(DENSE, {"algorithm.dense_grpo.calibration_iterations": -1})


@pytest.mark.slow  # two dense iterations with full look-aheads (~10 s here)
def test_calibration_iterations_through_the_recipe(tmp_path, monkeypatch):
    """The recipe's path (rollout, look-aheads, gather, calibration): with calibration_iterations 1
    ψ moves by ε2 = 0.01 after the first iteration and stays there after the second."""
    import flowalign

    monkeypatch.chdir(REPO)
    overrides = {"train.iterations": 2, "data.prompts_per_iter": 1, "output_dir": str(tmp_path / "dense"), "eval.samples_per_prompt": 1,
                 "eval.every": 0, "logging.progress": False, "logging.tensorboard": False, "train.checkpoint_every": 0,
                 "sampling.num_steps": 3, "eval.num_steps": 3, "algorithm.dense_grpo.calibration_iterations": 1}
    summary = flowalign.train(DENSE, overrides)
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    levels = [[r[f"rollout/noise_level_{t}"] for t in range(3)] for r in records]
    assert len(levels) == 2 and levels[1] == levels[0]
    assert all(abs(abs(a - 0.7) - 0.01) < 1e-6 for a in levels[0])


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def gather(t: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        algo = _dense()
        n = len(GROUPS) // world
        tree = _flat_tree(n, T, GROUPS[rank * n:(rank + 1) * n])
        targets = algo.table_targets(TABLE[rank * n:(rank + 1) * n], tree, _scored(rank, world, gather), iteration=0)
        torch.save({"psi": algo.noise_level_schedule, "adv": targets.advantages[tree.leaf_edges]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~20 s on the loaded 2-core machine: two spawned interpreters import flowalign
def test_two_gloo_processes_hold_the_same_schedule(tmp_path):
    """Two real processes (gloo, torch.distributed.all_gather as the recipe's accelerate gather):
    both end with the whole table's ψ(t) and with the whole group's advantages."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    expected_adv = _expected_advantages(TABLE.double().numpy(), GROUPS.numpy())
    for rank, res in enumerate(results):
        assert res["psi"] == pytest.approx(_expected_psi(TABLE.double().numpy()), abs=1e-6)
        np.testing.assert_allclose(res["adv"].numpy(), expected_adv[rank * 4:(rank + 1) * 4], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# MixGRPO: the window schedule's defaults
# ------------------------------------------------------------------------------------------------
def _reference_starts(iterations: int, max_timesteps: int, strategy: str, iters_per_group: int, min_iters: int = 1,
                      max_iters: int | None = None, k: float = 0.1, threshold: int = 13, step: int = 1) -> list[int]:
    """MixGRPO's GRPOTrainingStates (grpo_states.py @ e5cdd6a) as a hand-written state machine:
    the window start of each iteration, then ``update_iteration`` with prog_overlap and roll_back."""
    cur, in_group, starts = 0, 0, []
    max_iters = iters_per_group if max_iters is None else max_iters
    for _ in range(iterations):
        starts.append(cur)
        in_group += 1
        if strategy == "exp_decay":
            needed = np.ceil(iters_per_group * np.exp(-k * max(0, cur - threshold)))
        else:  # decay
            p = cur / max_timesteps
            needed = max(min_iters, int(max_iters * (1 - p) + min_iters * p))
        if in_group >= needed:
            in_group, cur = 0, cur + step
        if cur > max_timesteps:
            cur, in_group = 0, 0
    return starts


def test_exp_decay_defaults_follow_mixgrpo():
    cfg = MixGRPOConfig()
    assert (cfg.decay_rate, cfg.decay_start, cfg.min_shift_every, cfg.interval_rounding) == (0.1, 13, 1, "reference")
    # 20 steps, window 4, geometry "full" (starts 0..16 = the transcription's max_timesteps 16; the
    # reference geometry, max_timesteps = T - 2, is tests/test_fidelity_mix_window.py's); positions 14-16
    # decay: ceil(25 e^-0.1) = 23, ceil(25 e^-0.2) = 21, ceil(25 e^-0.3) = 19
    n = 2 * (14 * 25 + 23 + 21 + 19) + 7  # two full cycles and a bit
    ours = [mix_window(i, 20, strategy="exp_decay", size=4, shift_every=25, window_end="full")[0] for i in range(n)]
    assert ours == _reference_starts(n, 16, "exp_decay", 25)
    assert ours.count(14) == 2 * 23 and ours.count(15) == 2 * 21 and ours.count(16) == 2 * 19
    # the former defaults (k 0.5, threshold 0, round, min 5) moved on after 25, 15, 9, 6, 5, ... iterations
    old = [mix_window(i, 20, strategy="exp_decay", size=4, shift_every=25, min_shift_every=5, decay_rate=0.5, decay_start=0,
                      rounding="round", window_end="full")[0] for i in range(60)]
    assert old[:60] != ours[:60] and old.count(1) == round(25 * math.exp(-0.5))


def test_decay_floor_follows_mixgrpo():
    # linear decay 10 -> 1 over starts 0..7 with the reference's int(): 10, 8, 7, 6, 4, 3, 2, 1 (geometry
    # "full": the window at start 7 = max_timesteps is [7, 9) here, empty in the reference)
    n = 3 * 60
    ours = [mix_window(i, 9, strategy="decay", size=2, shift_every=10, min_shift_every=1, window_end="full")[0]
            for i in range(n)]
    assert ours == _reference_starts(n, 7, "decay", 10, min_iters=1, max_iters=10)
    assert [ours[:41].count(s) for s in range(8)] == [10, 8, 7, 6, 4, 3, 2, 1]


def test_interval_rounding_key_is_checked():
    with pytest.raises(ConfigError, match="^algorithm.mix_grpo.interval_rounding:"):
        load_config(MIX, {"algorithm.mix_grpo.interval_rounding": "nearest"})
    with pytest.raises(ValueError, match="rounding"):
        mix_window(0, 4, strategy="exp_decay", size=1, rounding="nearest")


# ------------------------------------------------------------------------------------------------
# MixGRPO: trimmed-ratio advantages
# ------------------------------------------------------------------------------------------------
def _np_trimmed(rewards: np.ndarray, groups: np.ndarray, ratio: float, clip: float | None = None) -> np.ndarray:
    """train_grpo_flux.py lines 466-477 @ e5cdd6a in numpy: drop the lowest int(n * ratio) (at most
    n - 1) of the group, mean and std(ddof=1) + 1e-8 of the rest, applied to every member."""
    out = np.zeros_like(rewards)
    for g in np.unique(groups):
        r = rewards[groups == g]
        kept = np.sort(r)[min(int(len(r) * ratio), len(r) - 1):]
        std = kept.std(ddof=1) if len(kept) > 1 else 0.0
        out[groups == g] = (r - kept.mean()) / (std + 1e-8)
    return out if clip is None else np.clip(out, -clip, clip)


def test_trimmed_advantages_hand_example():
    # group [3, 1, 10, 2], ratio 0.25: drop 1 -> kept [2, 3, 10], mean 5, std sqrt((9 + 4 + 25) / 2) = sqrt(19)
    adv = trimmed_group_advantages(torch.tensor([3.0, 1.0, 10.0, 2.0]), torch.zeros(4, dtype=torch.long), trimmed_ratio=0.25)
    s = math.sqrt(19)
    assert adv.tolist() == pytest.approx([-2 / s, -4 / s, 5 / s, -3 / s], rel=1e-6)
    # ratio 0.9 keeps one member (trim capped at n - 1): its advantage is 0, the others are clipped
    adv = trimmed_group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4, dtype=torch.long), trimmed_ratio=0.9, clip=5.0)
    assert adv.tolist() == [-5.0, -5.0, -5.0, 0.0]


def test_trimmed_advantages_match_the_reference_form_and_zero_is_plain_grpo():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=gen, dtype=torch.float64)
    groups = torch.tensor([2, 0, 1] * 8)
    for ratio in (0.1, 0.25, 0.5):
        got = trimmed_group_advantages(rewards, groups, trimmed_ratio=ratio, clip=5.0)
        np.testing.assert_allclose(got.numpy(), _np_trimmed(rewards.numpy(), groups.numpy(), ratio, clip=5.0), rtol=1e-5, atol=1e-6)
    plain = group_advantages(rewards, groups, eps=1e-8, unbiased=True)
    torch.testing.assert_close(trimmed_group_advantages(rewards, groups, trimmed_ratio=0.0), plain)
    assert MixGRPOConfig().trimmed_ratio == 0.0  # MixGRPO's --trimmed_ratio default (train_grpo_flux.py line 1298)
    with pytest.raises(ConfigError, match="^algorithm.mix_grpo.trimmed_ratio:"):
        load_config(MIX, {"algorithm.mix_grpo.trimmed_ratio": 1.0})
    with pytest.raises(ConfigError, match="^algorithm.mix_grpo.trimmed_ratio:"):
        load_config(MIX, {"algorithm.mix_grpo.trimmed_ratio": 0.25, "algorithm.std_mode": "global"})


def test_trimmed_ratio_through_the_recipe(tmp_path, monkeypatch):
    """A one-iteration mix_grpo run with trimmed_ratio 0.25: the trained edges' mean |advantage| is
    the reference formula's on the rewards the recipe scored (every leaf trains 4 window edges)."""
    import flowalign

    monkeypatch.chdir(REPO)
    calls = []

    def reward(media, prompts, metadata=None):
        scores = media.mean(dim=(1, 2, 3)).float()
        calls.append((scores.clone(), [m["group"] for m in metadata]))
        return scores

    overrides = {"train.iterations": 1, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / "mix"), "eval.samples_per_prompt": 1,
                 "eval.every": 0, "logging.progress": False, "logging.tensorboard": False, "train.checkpoint_every": 0,
                 "algorithm.mix_grpo.trimmed_ratio": 0.25}
    summary = flowalign.train(MIX, overrides, rewards=reward)
    record = next(r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r)
    scores, groups = next((s, g) for s, g in calls if len(g) == 16 and len(set(g)) == 2)
    expected = np.abs(_np_trimmed(scores.double().numpy(), np.array(groups), 0.25, clip=5.0)).mean()
    plain = np.abs(_np_trimmed(scores.double().numpy(), np.array(groups), 0.0, clip=5.0)).mean()
    assert record["train/advantage_abs_mean"] == pytest.approx(expected, rel=1e-4)
    assert abs(expected - plain) > 1e-3  # the option changed the advantages
