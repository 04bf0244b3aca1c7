"""Issue 13: the dLLM presets' defaults against their references (d1, DiffuCoder, JustGRPO).

Independent computations: numpy transcriptions of the references' advantage and loss formulas
(d1 ``diffu_grpo_trainer.py`` L533-539, DiffuCoder ``coupled_grpo.py`` L557-559, JustGRPO
``grpo.py`` L262-303) on hand-made inputs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import flowalign
from flowalign.algorithms import get_algorithm
from flowalign.algorithms.dllm import DLLMRollouts
from flowalign.config import ConfigError, load_config
from flowalign.dllm.algorithms import policy_loss, unit_weights
from flowalign.dllm.config import DLLMConfig
from tests.conftest import REPO
from tests.test_dllm_recipe import digit_credit, records, tiny_overrides


def resolved(name: str, **algo) -> DLLMConfig:
    cfg = DLLMConfig()
    cfg.algorithm.name = name
    for k, v in algo.items():
        setattr(cfg.algorithm, k, v)
    return cfg.resolved()


def rollouts(rewards, group_ids) -> DLLMRollouts:
    n = len(rewards)
    return DLLMRollouts(prompt_ids=None, prompt_mask=None, trajectory=None, sequences=None,
                        rewards=torch.tensor(rewards, dtype=torch.float32), fixed=torch.zeros(n, 5, dtype=torch.bool),
                        group_ids=torch.tensor(group_ids), examples=[None] * n)


@pytest.mark.parametrize("name, expected", [
    # d1 train.yaml: num_iterations 12, epsilon 0.5, beta 0.04; r - mean; token-mean loss
    ("diffu_grpo", (12, 0.5, 0.04, "none", "token")),
    # DiffuCoder config_coupled_code.yaml: num_iterations 2, epsilon 0.5, beta 0.01, scale_rewards false
    ("coupled_grpo", (2, 0.5, 0.01, "none", "token")),
    # JustGRPO: one update, eps 0.2, no KL, (r - mean) / std, window normalisation
    ("just_grpo", (1, 0.2, 0.0, "group", "window")),
])
def test_preset_defaults_are_the_references(name, expected):
    a = resolved(name).algorithm
    assert (a.inner_steps, a.clip_range, a.kl_beta, a.std_mode, a.loss_normalization) == expected


def test_explicit_values_override_the_preset_defaults():
    a = resolved("diffu_grpo", std_mode="group", inner_steps=3, loss_normalization="sequence").algorithm
    assert (a.std_mode, a.inner_steps, a.loss_normalization) == ("group", 3, "sequence")
    assert resolved("gdpo").algorithm.std_mode == "group"  # the base default is unchanged


def test_d1_advantages_are_mean_centred_without_std():
    r = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.2, 0.2])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # d1 L533-539: rewards - group mean (the std is computed but only logged)
    ref = r - np.array([r[g == k].mean() for k in g])
    algo = get_algorithm("diffu_grpo", recipes=("dllm",))(resolved("diffu_grpo"))
    adv, _ = algo.advantages(None, rollouts(r.tolist(), g.tolist()))
    np.testing.assert_allclose(adv.numpy(), ref, rtol=0, atol=1e-6)


def test_diffucoder_leave_one_out_advantages_match_a_numpy_transcription():
    r = np.array([2.5, 0.0, 0.5, 2.0, 0.0, 1.0, 1.0])
    g = np.array([3, 3, 3, 3, 7, 7, 7])  # group sizes 4 and 3
    # coupled_grpo.py L557-559: baseline = (group sum - r_i) / (G - 1); advantage r_i - baseline
    ref = np.array([r[i] - (r[g == g[i]].sum() - r[i]) / ((g == g[i]).sum() - 1) for i in range(len(r))])
    algo = get_algorithm("coupled_grpo", recipes=("dllm",))(resolved("coupled_grpo"))
    adv, _ = algo.advantages(None, rollouts(r.tolist(), g.tolist()))
    np.testing.assert_allclose(adv.numpy(), ref, rtol=0, atol=1e-6)
    # leave_one_out: false is the plain group mean
    cfg = resolved("coupled_grpo")
    cfg.algorithm.coupled_grpo.leave_one_out = False
    adv2, _ = get_algorithm("coupled_grpo", recipes=("dllm",))(cfg).advantages(None, rollouts(r.tolist(), g.tolist()))
    np.testing.assert_allclose(adv2.numpy(), r - np.array([r[g == k].mean() for k in g]), rtol=0, atol=1e-6)


class _Traj:
    num_steps = 4
    commit_step = torch.tensor([[0, 1, 2, 3]] * 3)


def test_window_normalisation_is_justgrpo_constant_scale():
    """Lg = 4 AR steps, 3 rollouts: row 0 ends at its 2nd token (EOS fill after), row 1 has a zero
    advantage, row 2 runs the whole window. JustGRPO: sum over every window position of
    -min(r A, clip(r) A), times 1 / (gen_length x valid_samples)."""
    Lg = 4
    trained = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    adv = np.array([2.0, 0.0, -1.0])
    logp_old = np.log(np.array([[0.5, 0.4, 0.9, 0.9], [0.3, 0.3, 0.3, 0.3], [0.6, 0.2, 0.5, 0.7]]))
    logp = logp_old + np.array([[0.1, -0.3, 0.4, 0.0], [0.2, 0.2, 0.2, 0.2], [-0.05, 0.3, -0.4, 0.1]])
    ratio = np.exp(logp - logp_old)
    per = -np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    valid = (adv != 0).sum()
    ref = per.sum() / (Lg * valid)

    algo = get_algorithm("just_grpo", recipes=("dllm",))(resolved("just_grpo"))
    w = unit_weights("step", trained, _Traj(), "window")
    assert torch.equal(w, torch.ones(3, 4))  # EOS fill included
    a_units = torch.tensor(adv, dtype=torch.float32)[:, None].expand(3, 4)
    w = algo.loss_weights(w, a_units)
    loss, _, _ = policy_loss(torch.tensor(logp, dtype=torch.float32), torch.tensor(logp_old, dtype=torch.float32),
                             a_units, w, clip_range=0.2, check=False)
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    # the sequence form (our previous just_grpo) stops at the EOS and averages per row: a different number
    ws = unit_weights("step", trained, _Traj(), "sequence") * torch.tensor([[1.0], [0.0], [1.0]])
    loss_seq, _, _ = policy_loss(torch.tensor(logp, dtype=torch.float32), torch.tensor(logp_old, dtype=torch.float32),
                                 a_units, ws, clip_range=0.2, check=False)
    assert abs(loss_seq.item() - ref) > 1e-3


def test_window_normalisation_of_token_and_sequence_units():
    trained = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(unit_weights("token", trained, None, "window"), torch.ones(2, 3))
    assert torch.equal(unit_weights("sequence", trained, None, "window"), torch.ones(2, 1))


def test_bad_loss_normalization_names_its_key(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="algorithm.loss_normalization"):
        load_config("configs/dllm/just_grpo_addition.yaml", {"algorithm.loss_normalization": "windows"}).validate(check_files=False)
    with pytest.raises(ConfigError, match="algorithm.std_mode"):
        load_config("configs/dllm/coupled_grpo_addition.yaml", {"algorithm.std_mode": "nope"}).validate(check_files=False)


@pytest.mark.parametrize("name", ["just_grpo", "coupled_grpo"])
def test_presets_run_through_the_recipe_on_policy(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    summary = flowalign.train(f"configs/dllm/{name}_addition.yaml", tiny_overrides(tmp_path), rewards=digit_credit)
    updated = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert updated and all(r["train/ratio_first_step_dev"] < 1e-5 for r in updated)
    cfg = load_config(os.path.join(summary["output_dir"], "config.yaml")).resolved()
    assert cfg.algorithm.loss_normalization == {"just_grpo": "window", "coupled_grpo": "token"}[name]
