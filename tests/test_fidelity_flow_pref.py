"""Issue 13, item 11: Pref-GRPO's ratio normalisation (``algorithm.pref_grpo.ratio_norm``).

Reference: CodeGoat24/Pref-GRPO @ 3e787f6, fastvideo/train_flux.py lines 729-756 (and
fastvideo/grpo/steps.py line 46 for ``noise_scale``), switched on by scripts/_common_finetune.sh line 31.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import flowalign
from flowalign.losses.ppo import ratio_norm_log_ratio
from flowalign.samplers import sde_step
from flowalign.training.metrics import read_metrics


class MeanBrightnessJudge:
    """A pairwise judge for the tiny runs: the brighter image wins (Bradley-Terry on the mean)."""

    name = "brightness"
    modality = "image"

    def compare(self, media_a, media_b, prompts):
        return torch.sigmoid((media_a.float().mean(dim=(1, 2, 3)) - media_b.float().mean(dim=(1, 2, 3))) * 50)


def _gauss_mean_log_prob(x, mean, std):
    """Per-element Gaussian log-density averaged over the latent dims (torch.distributions)."""
    return torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x).flatten(1).mean(1)


def test_ratio_norm_matches_the_reference_form_and_its_closed_form():
    g = torch.Generator().manual_seed(0)
    n = 5
    mean_old = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    mean_new = mean_old + 0.05 * torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    std = torch.tensor([0.3, 0.1, 0.05, 0.2, 0.7], dtype=torch.float64)
    eps = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    x_next = mean_old + std.view(-1, 1, 1, 1) * eps
    lp_old, lp_new = _gauss_mean_log_prob(x_next, mean_old, std), _gauss_mean_log_prob(x_next, mean_new, std)
    # Pref-GRPO train_flux.py lines 734-741, transcribed per sample (batch 1 there):
    # ratio_mean_bias = mean((mu - mu_old)^2) / (2 scale^2), scale = sqrt(|dt|) * (noise_scale / sqrt(|dt|)) = s,
    # log ratio = (lp - lp_old + ratio_mean_bias) * scale
    reference = torch.stack([
        (lp_new[i] - lp_old[i] + ((mean_new[i] - mean_old[i]) ** 2).mean() / (2 * std[i] ** 2)) * std[i] for i in range(n)
    ])
    got = ratio_norm_log_ratio(lp_new, lp_old, mean_new, mean_old, std)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-7)
    # closed form for Gaussian kernels: mean(eps * (mu - mu_old)), the noise projected on the mean shift
    closed = (eps * (mean_new - mean_old)).flatten(1).mean(1)
    torch.testing.assert_close(got.double(), closed, rtol=1e-4, atol=1e-6)
    # the quadratic term is gone: a shift orthogonal to the noise gives log-ratio 0, not < 0
    same = ratio_norm_log_ratio(lp_old, lp_old, mean_old, mean_old, std)
    assert torch.equal(same, torch.zeros(n))


def test_ratio_norm_with_the_samplers_log_probs():
    """With the flow_grpo sampler's own log-probs (not a Gaussian built here) the normalised log-ratio is
    mean(eps * (mu_new - mu_old)) with eps the rollout's noise (Pref-GRPO's noise_scale is the step's std)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 4, 4, generator=g)
    v_old, v_new = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    old = sde_step(v_old, 0.8, 0.6, x, kind="flow_grpo", noise_level=0.7, generator=g)
    new = sde_step(v_new, 0.8, 0.6, x, kind="flow_grpo", noise_level=0.7, prev_sample=old.prev_sample)
    eps = (old.prev_sample - old.mean) / old.std.view(-1, 1, 1, 1)
    got = ratio_norm_log_ratio(new.log_prob, old.log_prob, new.mean, old.mean, new.std)
    torch.testing.assert_close(got, (eps * (new.mean - old.mean)).flatten(1).mean(1), rtol=1e-3, atol=1e-5)


def _pref_config(tiny_config, ratio_norm):
    tiny_config["rewards"] = [{"_component_": "pairwise_winrate",
                               "judge": {"_component_": "tests.test_fidelity_flow_pref:MeanBrightnessJudge"}}]
    tiny_config["algorithm"] = {"name": "pref_grpo", "clip_range": 0.2, "pref_grpo": {"ratio_norm": ratio_norm}}
    tiny_config["train"]["iterations"] = 1
    tiny_config["train"]["steps_per_iter"] = 1
    return tiny_config


def test_ratio_norm_runs_on_policy_through_the_rl_recipe(tiny_config, monkeypatch):
    """ratio_norm reaches the update of the rl recipe: the rollout keeps its means, every micro-batch goes
    through PrefGRPO.edge_loss and ratio_norm_log_ratio, and the first micro-batch's ratio is exactly 1 (on-policy)."""
    import flowalign.algorithms.pref_grpo as pref_grpo

    calls = []

    def spy(*args, **kwargs):
        out = ratio_norm_log_ratio(*args, **kwargs)
        calls.append(out.detach())
        return out

    monkeypatch.setattr(pref_grpo, "ratio_norm_log_ratio", spy)
    cfg = _pref_config(tiny_config, True)
    flowalign.train(cfg)
    rec = [r for r in read_metrics(os.path.join(cfg["output_dir"], "metrics.jsonl")) if "train/policy_loss" in r]
    assert calls and rec and rec[0]["train/ratio_first_step_dev"] <= 1e-6
    assert torch.equal(calls[0], torch.zeros_like(calls[0]))  # before any weight change: log-ratio exactly 0
    assert all(math.isfinite(r["train/loss"]) for r in rec)


def test_ratio_norm_key_errors(tiny_config):
    from flowalign.config import ConfigError

    cfg = _pref_config(tiny_config, "bogus")
    with pytest.raises(ConfigError, match="algorithm.pref_grpo.ratio_norm"):
        flowalign.load_config(cfg)
    cfg = _pref_config(tiny_config, True)
    cfg["sampling"].update(sampler="cps", cps_log_prob="flow_grpo")
    with pytest.raises(ConfigError, match="algorithm.pref_grpo.ratio_norm"):
        flowalign.load_config(cfg)


def test_pref_grpo_defaults_to_the_reference_and_grpo_is_untouched(tiny_config):
    from flowalign.algorithms.pref_grpo import PrefGRPOConfig

    assert PrefGRPOConfig().ratio_norm is True  # Pref-GRPO's scripts/_common_finetune.sh line 31: --rationorm
    from flowalign.algorithms.registry import ALGORITHMS

    cfg = flowalign.load_config(tiny_config)  # plain grpo: the recipe's update never normalises the ratio
    assert cfg.algorithm.name == "grpo" and ALGORITHMS["grpo"](cfg).keeps_means is False
