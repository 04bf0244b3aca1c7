"""Fidelity of MixGRPO's window geometry and linear-decay interpolation (issue 13, item 7 follow-up;
docs/FIDELITY.md): ``algorithm.mix_grpo.window_end`` and ``algorithm.mix_grpo.max_shift_every``.

The independent computation is :func:`_reference_windows`, a state machine written from
Tencent-Hunyuan/MixGRPO @ e5cdd6a ``fastvideo/utils/grpo_states.py`` (``update_iteration`` lines
85-133, ``get_current_timesteps`` line 148) as ``train_grpo_flux.py`` drives it (lines 916-947:
``max_timesteps = sampling_steps - 2``, the window read before each update), plus hand-worked lists.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from flowalign.algorithms.mix_grpo import MixGRPO, MixGRPOConfig
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.rollout.schedules import mix_window
from flowalign.training.metrics import read_metrics
from tests.conftest import REPO

MIX = os.path.join(REPO, "configs", "mix_grpo", "quickstart.yaml")


def _reference_windows(iterations: int, sampling_steps: int, group_size: int, strategy: str, iters_per_group: int = 25,
                       step: int = 1, max_iters: int = 10, min_iters: int = 1, k: float = 0.1, threshold: int = 13,
                       roll_back: bool = True) -> list[tuple[int, int]]:
    """The reference's trained steps of each iteration as ``(first, end)`` (``(cur, cur)`` when empty)."""
    max_timesteps = sampling_steps - 2
    cur, in_group, out = 0, 0, []
    for _ in range(iterations):
        steps = list(range(cur, min(cur + group_size, max_timesteps)))
        out.append((steps[0], steps[-1] + 1) if steps else (cur, cur))
        in_group += 1
        if strategy == "progressive":
            needed = iters_per_group
        elif strategy == "decay":
            p = cur / max_timesteps
            needed = max(min_iters, int(max_iters * (1 - p) + min_iters * p))
        else:  # exp_decay
            needed = np.ceil(iters_per_group * np.exp(-k * max(0, cur - threshold)))
        if in_group >= needed:
            in_group, cur = 0, cur + step
        if cur > max_timesteps:
            cur, in_group = (0, 0) if roll_back else (max_timesteps, in_group)
    return out


def _ours(iterations: int, num_steps: int, size: int, strategy: str, **kw) -> list[tuple[int, int]]:
    return [mix_window(i, num_steps, strategy=strategy, size=size, **kw) for i in range(iterations)]


def test_reference_geometry_hand_enumeration():
    # quickstart shape: T = 10, w = 4, 2 iterations per position. MixGRPO cuts the windows at
    # max_timesteps = T - 2 = 8: [0,4) [1,5) [2,6) [3,7) [4,8) [5,8) [6,8) [7,8), then the cursor
    # reaches 8 (empty window in the reference; skipped here) and rolls back.
    hand = [(0, 4)] * 2 + [(1, 5)] * 2 + [(2, 6)] * 2 + [(3, 7)] * 2 + [(4, 8)] * 2 + [(5, 8)] * 2 + [(6, 8)] * 2 \
        + [(7, 8)] * 2
    ours = _ours(20, 10, 4, "progressive", shift_every=2)
    assert ours == hand + [(0, 4)] * 2 + [(1, 5)] * 2
    ref = _reference_windows(20, 10, 4, "progressive", iters_per_group=2)
    assert ref[:16] == hand and ref[16:18] == [(8, 8)] * 2 and ref[18:] == [(0, 4)] * 2
    assert max(e for _, e in ours) == 8  # steps 8 and 9 are never trained
    # without roll_back the reference clips the cursor at 8 (empty); ours stays at the last window [7, 8)
    assert _ours(20, 10, 4, "progressive", shift_every=2, roll_back=False)[14:] == [(7, 8)] * 6
    # the former geometry, still offered: every window 4 steps, the last one [6, 10)
    assert _ours(16, 10, 4, "progressive", shift_every=2, window_end="full")[12:] == [(6, 10)] * 2 + [(0, 4)] * 2


def test_script_geometry_matches_the_reference_state_machine():
    # the MixGRPO script: 25 steps, group_size 4, iters_per_group 25, prog_overlap_step 1, roll_back
    n = 23 * 25  # every non-empty position (cursor 0..22); the reference's cursor 23 has no steps
    ours = _ours(n + 30, 25, 4, "progressive", shift_every=25)
    ref = _reference_windows(n + 30, 25, 4, "progressive")
    assert ours[:n] == ref[:n]
    assert ours[299] == (11, 15)  # the script's 300 iterations end at cursor 11, full windows throughout
    assert ours[500] == (20, 23) and ours[550] == (22, 23) and ours[n - 1] == (22, 23)
    assert ref[n] == (23, 23) and ours[n] == (0, 4)  # the empty position is skipped
    assert max(e for _, e in ours) == 23  # steps 23 and 24 are never trained
    # a stride whose cursor never lands on 23: identical over several roll-backs (0, 5, ..., 20; 25 > 23)
    assert _ours(300, 25, 4, "progressive", shift_every=3, stride=5) == \
        _reference_windows(300, 25, 4, "progressive", iters_per_group=3, step=5)
    # exp_decay (threshold 13, k 0.1, ceil): identical up to the empty position
    m = 14 * 25 + sum(math.ceil(25 * math.exp(-0.1 * (s - 13))) for s in range(14, 23))
    assert _ours(m, 25, 4, "exp_decay") == _reference_windows(m, 25, 4, "exp_decay")


def test_decay_interpolates_from_max_iters_per_group_over_max_timesteps():
    # T = 10, w = 4, reference defaults (max_iters_per_group 10, min 1, denominator max_timesteps 8):
    # int(10 (1 - s/8) + s/8) = int(10 - 9 s / 8) = int(10, 8.875, 7.75, 6.625, 5.5, 4.375, 3.25, 2.125)
    hand = [10, 8, 7, 6, 5, 4, 3, 2]
    ours = _ours(2 * sum(hand) + 3, 10, 4, "decay", shift_every=25)
    assert [ours[:sum(hand)].count(w) for w in [(0, 4), (1, 5), (2, 6), (3, 7), (4, 8), (5, 8), (6, 8), (7, 8)]] == hand
    ref = _reference_windows(sum(hand), 10, 4, "decay", max_iters=10, min_iters=1)
    assert ours[:sum(hand)] == ref and ours[sum(hand)] == (0, 4)
    # the former interpolation, still offered: from shift_every (25) to 1 over the last full start 6:
    # int(25 - 4 s) = 25, 21, 17, 13, 9, 5, 1
    old = _ours(91, 10, 4, "decay", shift_every=25, max_shift_every=None, window_end="full")
    assert [old.count((s, s + 4)) for s in range(7)] == [25, 21, 17, 13, 9, 5, 1]


def test_config_defaults_and_keys():
    cfg = MixGRPOConfig()
    # MixGRPO: max_timesteps = sampling_steps - 2, --max_iters_per_group 10, --roll_back set by its script
    assert (cfg.window_end, cfg.max_shift_every, cfg.roll_back) == ("reference", 10, True)
    for overrides, key in [({"algorithm.mix_grpo.window_end": "sideways"}, "algorithm.mix_grpo.window_end"),
                           ({"algorithm.mix_grpo.max_shift_every": 0}, "algorithm.mix_grpo.max_shift_every"),
                           ({"sampling.num_steps": 2, "algorithm.mix_grpo.size": 2}, "algorithm.mix_grpo.window_end"),
                           ({"algorithm.mix_grpo.strategy": "random", "algorithm.mix_grpo.size": 9}, "algorithm.mix_grpo.size")]:
        with pytest.raises(ConfigError, match=f"^{key}:"):
            load_config(MIX, overrides)
    load_config(MIX, {"algorithm.mix_grpo.strategy": "random", "algorithm.mix_grpo.size": 9, "algorithm.mix_grpo.window_end": "full"})
    with pytest.raises(ValueError, match="window_end"):
        mix_window(0, 10, strategy="progressive", size=4, window_end="sideways")


def test_trained_units_and_rollout_spec_follow_the_shrinking_windows():
    cfg = load_config(MIX)
    assert MixGRPO.trained_units(cfg) == (1, "edges")  # the last window [7, 8) trains one step
    for overrides, units in [({"algorithm.mix_grpo.window_end": "full"}, 4), ({"algorithm.mix_grpo.stride": 4}, 4),
                             ({"algorithm.mix_grpo.stride": 3}, 2), ({"algorithm.mix_grpo.strategy": "random"}, 4)]:
        assert MixGRPO.trained_units(load_config(MIX, overrides))[0] == units, overrides  # stride 3: [0,4) [3,7) [6,8)
    # the steps_per_iter check uses the shortest window: 1 prompt x 2 samples x 1 step < 3 optimizer steps
    small = {"data.prompts_per_iter": 1, "sampling.group_size": 2, "train.steps_per_iter": 3}
    with pytest.raises(ConfigError, match="^train.steps_per_iter:"):
        load_config(MIX, small)
    load_config(MIX, {**small, "algorithm.mix_grpo.window_end": "full"})  # 1 x 2 x 4 = 8
    algo = MixGRPO(cfg)
    spec = algo.rollout_spec(75, 1)  # shift_every 10: iteration 75 is at cursor 7, window [7, 8)
    assert spec.train_steps == (7,) and [t for t in range(10) if spec.noise_levels[t] > 0] == [7]
    spec = algo.rollout_spec(55, 1)  # cursor 5, window [5, 8)
    assert spec.train_steps == (5, 6, 7) and [t for t in range(10) if spec.noise_levels[t] > 0] == [5, 6, 7]


def test_shrinking_windows_through_the_recipe(tmp_path, monkeypatch):
    """Four iterations on 5 sampling steps, one per position: the reference geometry's windows are
    [0,3) [1,3) [2,3) (cut at 5 - 2 = 3; size 4), then back to [0,3); 16 samples train 48, 32, 16,
    48 edges, while every sample still costs 5 evaluations."""
    import flowalign

    monkeypatch.chdir(REPO)
    overrides = {"train.iterations": 4, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / "mix"),
                 "eval.samples_per_prompt": 1, "eval.every": 0, "logging.progress": False, "logging.tensorboard": False,
                 "train.checkpoint_every": 0, "sampling.num_steps": 5, "algorithm.mix_grpo.shift_every": 1}
    summary = flowalign.train(MIX, overrides)
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert [r["rollout/trained_edges"] for r in records] == [48.0, 32.0, 16.0, 48.0]
    assert [r["rollout/nfe"] for r in records] == [80.0] * 4
    assert all(math.isfinite(r["train/loss"]) for r in records)
