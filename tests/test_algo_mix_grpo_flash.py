"""MixGRPO-Flash: DPM-Solver++(2M) against diffusers and a hand-worked step, the compressed tail schedule
against the reference's formula, the rollout (window edges bit-identical to MixGRPO's, tail as diffusers'
solver, exact NFEs) and the quickstart config for two iterations through ``flowalign.train``."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from flowalign.config import ConfigError, load_config
from flowalign.pipelines.base import shift_sigmas
from flowalign.rollout import BranchSpec, rollout
from flowalign.samplers.dpm_solver import dpm_solver_pp_2m_step, flash_tail_grid, tail_steps
from flowalign.training.metrics import read_metrics
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "mix_grpo_flash", "quickstart.yaml")


# -- the solver -------------------------------------------------------------------------------------
def test_dpm_solver_pp_2m_step_hand_worked():
    """sigma 0.8 -> 0.5 -> 0.2 in log-SNR: lambda = log(0.2/0.8), log(1), log(0.8/0.2), so h = h_0 = log 4,
    r_0 = 1; e^{-h} = 1/4 and alpha_next (e^{-h} - 1) = 0.8 * (-3/4) = -0.6:
    x' = (0.2/0.5) x + 0.6 x0 + 0.3 (x0 - x0_prev)."""
    x, x0, x0_prev = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[0.5]])
    out = dpm_solver_pp_2m_step(x, x0, x0_prev, torch.tensor(0.8), torch.tensor(0.5), torch.tensor(0.2))
    assert out.item() == pytest.approx(0.4 * 1.0 + 0.6 * 2.0 + 0.3 * 1.5, abs=1e-6)  # 2.05
    with pytest.raises(ValueError, match="0 < sigma_next"):  # into sigma 0 is first order (the caller's Euler)
        dpm_solver_pp_2m_step(x, x0, x0_prev, torch.tensor(0.8), torch.tensor(0.5), torch.tensor(0.0))


def _velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth nonlinear stand-in for a model's velocity ``[B, D]``."""
    return torch.sin(3 * x) * (0.5 + sigma) - x * sigma**2


def _diffusers_integrate(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The independent computation: diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint,
    flow prediction; first step first order, last step first order into sigma 0) on the given sigmas."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
                                        algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero",
                                        lower_order_final=True, euler_at_final=False)
    sched.set_timesteps(len(sigmas) - 1)
    sched.sigmas = sigmas.clone().float()
    sched.timesteps = sigmas[:-1] * 1000
    for i, t in enumerate(sched.timesteps):
        x = sched.step(_velocity(x, float(sigmas[i])), t, x).prev_sample
    return x


def test_dpm_solver_pp_2m_matches_diffusers_scheduler():
    sigmas = shift_sigmas(torch.linspace(1, 0, 8), 3.0)[1:]  # 0.9..0: no sigma = 1 (lambda = -inf)
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    x, x0_prev = x0.clone(), None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        v = _velocity(x, float(s))
        data = x - s * v
        x = x + (sn - s) * v if (i == 0 or sn == 0) else dpm_solver_pp_2m_step(x, data, x0_prev, sigmas[i - 1], s, sn)
        x0_prev = data
    torch.testing.assert_close(x, _diffusers_integrate(x0.clone(), sigmas), rtol=1e-5, atol=1e-5)


# -- the compressed schedule ------------------------------------------------------------------------
def _reference_post_sigmas(num_steps: int, last: int, ratio: float, shift: float) -> torch.Tensor:
    """Transcribed from MixGRPO @ e5cdd6a, fastvideo/utils/sampling_utils.py l. 44-50 (+ ours: n >= 2)."""
    sigma_schedule = shift_sigmas(torch.linspace(1, 0, num_steps + 1), shift)
    n = max(int(max((num_steps - last) * ratio, 1)), 2)
    post_t = torch.linspace(1, 0, num_steps + 1)[last + 1].item()
    post = shift_sigmas(torch.linspace(post_t, 0, n), shift)
    return torch.cat([sigma_schedule[: last + 1], post])


@pytest.mark.parametrize("num_steps,last,ratio", [(25, 3, 0.4), (25, 10, 0.2), (10, 3, 0.6), (10, 7, 0.4), (16, 0, 0.5)])
def test_flash_tail_grid_is_the_reference_schedule(num_steps, last, ratio):
    points = flash_tail_grid(num_steps, last, ratio)
    ours = torch.stack([shift_sigmas(torch.linspace(1, 0, k + 1), 3.0)[i] for k, i in points])
    ref = _reference_post_sigmas(num_steps, last, ratio, 3.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert points[: last + 2] == tuple((num_steps, i) for i in range(last + 2))  # the window's sigmas untouched


def test_tail_step_counts():
    assert tail_steps(25, 3, 0.4) == 7    # int(22 * 0.4) = 8 points: 21 steps -> 7 (paper's Flash, window [0, 4))
    assert tail_steps(25, 3, 0.2) == 3    # int(22 * 0.2) = 4 points (Flash*)
    assert tail_steps(10, 3, 0.6) == 3    # the quickstart's first window: 6 steps -> 3
    assert tail_steps(10, 7, 0.4) == 1    # reference n = 1 would end at sigma_8 > 0; ours keeps one step
    assert tail_steps(10, 9, 0.4) == 0    # window at the end: nothing to compress
    assert flash_tail_grid(10, 9, 0.4) == tuple((10, i) for i in range(11))


# -- the rollout --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def algo():
    from flowalign.algorithms import get_algorithm

    cfg = load_config(CONFIG, {"num_threads": 1})
    return get_algorithm("mix_grpo_flash")(cfg)


def test_rollout_spec_nfe_per_window(algo):
    """The spec of each window: l + n steps (NFE per sample), the window's noise and trained steps MixGRPO's."""
    from flowalign.algorithms.mix_grpo import MixGRPO

    got = {}
    for it in range(0, 80, 10):  # shift_every 10: windows [0,4) [1,5) [2,6) [3,7) [4,8) [5,8) [6,8) [7,8)
        spec, ref = algo.rollout_spec(it, 1), MixGRPO.rollout_spec(algo, it, 1)  # MixGRPO's spec of the same window
        got[algo.sde_window(it)] = spec.expected_nfe(1) // spec.samples_per_prompt
        assert spec.noise_levels == ref.noise_levels[: spec.num_steps] and spec.train_steps == ref.train_steps
        assert spec.ode_solver == "dpm_solver++_2m" and ref.expected_nfe(1) // ref.samples_per_prompt == 10
    # window [s, e): l = e - 1, l + max(int((10 - l) * 0.6), 2) steps
    assert got == {(0, 4): 7, (1, 5): 7, (2, 6): 8, (3, 7): 8, (4, 8): 9, (5, 8): 9, (6, 8): 9, (7, 8): 9}


def test_rollout_window_exact_and_tail_is_dpm_solver(toy):
    """Window edges (x_t, x_next, log-probs) bit-identical to the uncompressed MixGRPO rollout; the tail equals
    diffusers' DPM-Solver++(2M) from the window's end, with the window's last x0 prediction as history."""
    adapter, cond = toy
    T, window = 10, range(0, 4)
    levels = [0.7 if t in window else 0.0 for t in range(T)]
    full = BranchSpec(T, levels, samples_per_prompt=3, train_steps=tuple(window))
    schedule = flash_tail_grid(T, 3, 0.6)
    flash = dataclasses.replace(full, num_steps=len(schedule) - 1, noise_levels=levels[: len(schedule) - 1],
                                schedule=schedule, ode_solver="dpm_solver++_2m")
    kw = dict(prompts=["a", "b"], decode=False, keep_velocities=True)
    a = rollout(adapter, cond, full, generator=torch.Generator().manual_seed(1), **kw)
    b = rollout(adapter, cond, flash, generator=torch.Generator().manual_seed(1), **kw)
    assert (a.nfe, b.nfe) == (2 * 3 * 10, 2 * 3 * 7) == (full.expected_nfe(2), flash.expected_nfe(2))
    w = a.step < 4
    assert torch.equal(a.step[w], b.step[b.step < 4])
    for name in ("x_t", "x_next", "log_prob_old", "noise_std", "trainable"):
        assert torch.equal(getattr(a, name)[w], getattr(b, name)[b.step < 4]), name
    assert torch.equal(b.trainable, b.step < 4) and bool((b.log_prob_old[b.step >= 4] == 0).all())
    # the tail, recomputed: history x0 of step 3, then 2M steps, the last one Euler into sigma 0
    sig = b.sigmas
    torch.testing.assert_close(sig, torch.stack([adapter.sigmas(k)[i] for k, i in schedule]))
    x, x0_prev = b.x_t[b.step == 4], (a.x_t[a.step == 3] - sig[3] * a.velocity[a.step == 3])
    for t in range(4, len(schedule) - 1):
        prompt_cond = cond[b.prompt_idx[b.step == t]]
        v = adapter.predict(x, sig[t].expand(len(x)), prompt_cond).float()
        data = x - sig[t] * v
        x = x + (sig[t + 1] - sig[t]) * v if sig[t + 1] == 0 else dpm_solver_pp_2m_step(x, data, x0_prev, sig[t - 1],
                                                                                         sig[t], sig[t + 1])
        x0_prev = data
    torch.testing.assert_close(b.leaf_latents, x, rtol=1e-5, atol=1e-5)


def test_all_ode_flash_rollout_equals_diffusers(toy):
    """No SDE step: every step after step 0 is DPM-Solver++(2M) -- diffusers' scheduler end to end."""
    adapter, cond = toy
    from diffusers import DPMSolverMultistepScheduler

    # step 0 Euler; step 1's history is at sigma 1 (lambda = -inf, r_0 = inf, D1 = 0: first order, as diffusers)
    spec = BranchSpec(12, [0.0] * 12, samples_per_prompt=2, ode_solver="dpm_solver++_2m")
    tree = rollout(adapter, cond, spec, prompts=["a", "b"], generator=torch.Generator().manual_seed(0), decode=False)
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
                                        algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero")
    sched.set_timesteps(12)
    sched.sigmas, sched.timesteps = tree.sigmas.clone(), tree.sigmas[:-1] * 1000
    x = tree.x_t[tree.step == 0]
    c = cond[tree.prompt_idx[tree.step == 0]]
    for i, t in enumerate(sched.timesteps):
        v = adapter.predict(x, tree.sigmas[i].expand(len(x)), c).float()
        x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(tree.leaf_latents, x, rtol=1e-5, atol=1e-5)


def test_checks_name_the_key():
    with pytest.raises(ConfigError, match="algorithm.mix_grpo_flash.strategy"):
        load_config(CONFIG, {"algorithm.mix_grpo_flash.strategy": "random"})
    with pytest.raises(ConfigError, match="algorithm.mix_grpo_flash.compress_ratio"):
        load_config(CONFIG, {"algorithm.mix_grpo_flash.compress_ratio": 0.0})
    with pytest.raises(ConfigError, match="algorithm.mix_grpo_flash.solver"):
        load_config(CONFIG, {"algorithm.mix_grpo_flash.solver": "heun"})


# -- two iterations through flowalign.train --------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_runs_two_iterations(tmp_path, monkeypatch):
    import flowalign

    monkeypatch.chdir(REPO)
    overrides = {"train.iterations": 2, "data.prompts_per_iter": 2, "output_dir": str(tmp_path / "flash"),
                 "eval.samples_per_prompt": 1, "eval.every": 0, "logging.progress": False, "logging.tensorboard": False,
                 "train.checkpoint_every": 0}
    summary = flowalign.train(CONFIG, overrides)
    records = [r for r in read_metrics(os.path.join(summary["output_dir"], "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2 and summary["after"]["eval/reward"] >= 0
    for r in records:
        assert r["train/ratio_first_step_dev"] < 1e-5  # the window's log-probs rescored exactly (on-policy)
        assert all(math.isfinite(r[k]) for k in ("train/loss", "train/grad_norm", "train/reward_mean"))
    # window [0,4) both iterations: 2 prompts x 8 samples x (4 window + 3 tail) steps (MixGRPO: x 10 = 160);
    # 16 samples x 4 trained edges
    assert [r["rollout/nfe"] for r in records] == [112.0, 112.0]
    assert [r["rollout/trained_edges"] for r in records] == [64.0, 64.0]
