"""The dLLM algorithms (flowalign.algorithms, recipe dllm) and their pure pieces
(flowalign.dllm.algorithms), each against an independent computation: default resolution, unit weights/advantages, the k3 KL (exact enumeration),
the masked clipped loss (hint tokens get no gradient), MDPO step rewards (hand-computed), IGPO's
all-wrong test and hint lengths, and estimator draws shared by old and new log-probs (ratio 1)."""

from __future__ import annotations


import pytest
import torch

from flowalign.algorithms import ALGORITHMS, algorithm_names, get_algorithm
from flowalign.config import ConfigError, load_config
from flowalign.dllm.algorithms import (
    ESTIMATOR_UNITS,
    LogProbEstimator,
    RolloutBatch,
    all_wrong_groups,
    hint_lengths,
    k3_kl,
    mdpo_step_advantages,
    policy_loss,
    predicted_completions,
    select_draws,
    trained_token_mask,
    unit_advantages,
    unit_weights,
)
from flowalign.dllm.config import DLLMConfig
from flowalign.dllm.sampling import Trajectory
from flowalign.losses import ppo_clip_loss
from tests.conftest import REPO

MASK, EOS = 9, 8
DLLM_ALGORITHMS = sorted(algorithm_names(("dllm",)))


# ------------------------------------------------------------------------------------------------
# the algorithms' defaults
# ------------------------------------------------------------------------------------------------
def test_the_dllm_algorithms_are_registered():
    assert DLLM_ALGORITHMS == sorted(["diffu_grpo", "coupled_grpo", "gdpo", "mdpo", "cj_grpo", "igpo", "just_grpo", "co_grpo",
                                      "token_commitment"])


@pytest.mark.parametrize("name", DLLM_ALGORITHMS)
def test_every_dllm_algorithm_runs_in_the_dllm_recipe_and_its_config_file_loads(name, monkeypatch):
    cls = ALGORITHMS[name]
    assert cls.recipe == "dllm" and cls.summary and "arXiv:" in cls.paper
    assert cls.config_file == f"configs/dllm/{name}_addition.yaml"
    monkeypatch.chdir(REPO)
    cfg = load_config(cls.config_file)
    assert isinstance(cfg, DLLMConfig) and cfg.recipe == "dllm" and cfg.algorithm.name == name


@pytest.mark.parametrize("name", DLLM_ALGORITHMS)
def test_every_algorithm_resolves_and_validates(name):
    cfg = DLLMConfig()
    cfg.algorithm.name = name
    cfg.validate(check_files=False)
    r = cfg.resolved()
    algorithm = get_algorithm(name, recipes=("dllm",))
    assert r.algorithm.estimator == algorithm.estimator and r.algorithm.estimator in ESTIMATOR_UNITS
    assert r.algorithm.inner_steps == algorithm.inner_steps
    assert r.sampling.steps == algorithm.default_steps(cfg.sampling.gen_length)
    assert cfg.algorithm.estimator is None, "resolved() must not modify the config it was called on"


def test_algorithm_defaults_are_defaults_that_explicit_settings_override():
    cfg = DLLMConfig()
    cfg.algorithm.name = "cj_grpo"
    r = cfg.resolved()
    assert (r.sampling.step_schedule, r.sampling.eos_early_rejection, r.sampling.steps) == ("ascending", 0.99, 2)
    cfg.sampling.step_schedule, cfg.sampling.steps, cfg.sampling.eos_early_rejection = "uniform", 5, 0.0
    r = cfg.resolved()
    assert (r.sampling.step_schedule, r.sampling.eos_early_rejection, r.sampling.steps) == ("uniform", 0.0, 5)
    cfg = DLLMConfig()
    cfg.algorithm.name = "just_grpo"
    assert cfg.resolved().sampling.order == "ar" and cfg.resolved().algorithm.estimator == "trajectory"


def test_unknown_algorithm_is_a_config_error_naming_the_key():
    cfg = DLLMConfig()
    cfg.algorithm.name = "ppo_for_dllm"
    with pytest.raises(ConfigError, match=r"^algorithm\.name: unknown algorithm 'ppo_for_dllm'"):
        cfg.validate(check_files=False)
    with pytest.raises(ConfigError, match="choose from"):
        get_algorithm("nope", recipes=("dllm",))


# ------------------------------------------------------------------------------------------------
# units
# ------------------------------------------------------------------------------------------------
def test_trained_token_mask_stops_after_first_eos_and_skips_fixed_tokens():
    comp = torch.tensor([[1, 2, EOS, EOS, EOS], [1, 2, 3, 4, EOS], [EOS, 5, EOS, 6, 7]])
    fixed = torch.zeros(3, 5, dtype=torch.bool)
    fixed[1, :2] = True
    got = trained_token_mask(comp, EOS, fixed)
    want = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, want)


def _trajectory(commit_step: list[list[int]], completion: list[list[int]], prompt: list[list[int]], num_steps: int) -> Trajectory:
    seq = torch.cat([torch.tensor(prompt), torch.tensor(completion)], dim=1)
    return Trajectory(sequences=seq, attention_mask=torch.ones_like(seq), prompt_length=len(prompt[0]),
                      commit_step=torch.tensor(commit_step), step_log_probs=torch.zeros(len(prompt), num_steps),
                      num_steps=num_steps)


def test_unit_weights_by_hand():
    trained = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    tok = unit_weights("token", trained)
    assert torch.allclose(tok, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0], [0, 1 / 3, 1 / 3, 1 / 3]]))
    seq = unit_weights("sequence", trained)
    assert torch.equal(seq, torch.ones(2, 1))
    # row 0 commits its trained tokens at steps 0, 0, 2 (step 1 only commits the untrained tail);
    # row 1 commits its untrained hint at step 0
    traj = _trajectory([[0, 0, 2, 1], [0, 1, 2, 2]], [[1, 2, 3, EOS], [4, 5, 6, 7]], [[1], [1]], 3)
    step = unit_weights("step", trained, traj)
    assert torch.allclose(step, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="trajectory"):
        unit_weights("step", trained)
    with pytest.raises(ValueError, match="unknown unit"):
        unit_weights("word", trained)


def test_unit_advantages_broadcast_or_pass_through():
    adv = torch.tensor([1.0, -2.0])
    assert torch.equal(unit_advantages(adv, (2, 3)), torch.tensor([[1.0] * 3, [-2.0] * 3]))
    per_step = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(unit_advantages(per_step, (2, 3)), per_step)
    with pytest.raises(ValueError, match="expected"):
        unit_advantages(per_step, (2, 4))


# ------------------------------------------------------------------------------------------------
# loss pieces
# ------------------------------------------------------------------------------------------------
def test_k3_kl_expectation_is_the_exact_kl_by_enumeration():
    p = torch.distributions.Categorical(logits=torch.tensor([0.3, -1.0, 2.0, 0.1]))
    q = torch.distributions.Categorical(logits=torch.tensor([1.0, 0.5, -0.5, 0.0]))
    xs = torch.arange(4)
    expectation = (p.probs * k3_kl(p.log_prob(xs), q.log_prob(xs))).sum()
    assert torch.allclose(expectation, torch.distributions.kl_divergence(p, q), atol=1e-6)
    assert bool((k3_kl(p.log_prob(xs), q.log_prob(xs)) >= 0).all())


def test_policy_loss_is_ppo_clip_on_the_weighted_units_and_hint_tokens_get_no_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(3, 4)
    adv = unit_advantages(torch.tensor([1.0, -0.5, 2.0]), (3, 4))
    fixed = torch.zeros(3, 4, dtype=torch.bool)
    fixed[0, :2] = True  # IGPO hint tokens of row 0
    weights = unit_weights("token", trained_token_mask(torch.ones(3, 4, dtype=torch.long), EOS, fixed))
    loss, metrics, wsum = policy_loss(logp, old, adv, weights, clip_range=0.2)
    loss.backward()
    assert torch.equal(logp.grad[fixed], torch.zeros(2)), "hint tokens must get no gradient"
    sel = weights > 0
    ref, _ = ppo_clip_loss(logp.detach()[sel], old[sel], adv[sel], clip_range=0.2, weights=weights[sel])
    assert torch.allclose(loss, ref) and float(wsum) == pytest.approx(3.0)
    # by hand for one unit: the clipped surrogate max(-A r, -A clip(r))
    lp = logp.detach().clone().requires_grad_(True)
    r = torch.exp(lp - old)
    per = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    by_hand = (per * weights).sum() / weights.sum()
    by_hand.backward()
    assert torch.allclose(loss, by_hand) and torch.allclose(logp.grad, lp.grad)
    assert int((logp.grad != 0).sum()) > 0
    r = r.detach()
    assert float(metrics["ratio_max_dev"]) == pytest.approx(float((r[sel] - 1).abs().max()), rel=1e-5)


def test_policy_loss_on_given_units_is_the_same_and_makes_no_host_sync():
    """The training loop finds the trained units once and calls policy_loss with check=False on the
    hot path: the loss, the gradient, the metrics (0-dim tensors) and the weight sum match the
    default call, and the call reads nothing back from the device."""
    from flowalign.training.host_syncs import count_host_syncs

    torch.manual_seed(1)
    logp = torch.randn(3, 4, requires_grad=True)
    old, ref = logp.detach() + 0.3 * torch.randn(3, 4), logp.detach() + 0.1 * torch.randn(3, 4)
    adv = unit_advantages(torch.tensor([1.0, -0.5, 2.0]), (3, 4))
    fixed = torch.zeros(3, 4, dtype=torch.bool)
    fixed[0, :2] = True
    weights = unit_weights("token", trained_token_mask(torch.ones(3, 4, dtype=torch.long), EOS, fixed))
    want, want_m, want_w = policy_loss(logp, old, adv, weights, clip_range=0.2, ref_log_prob=ref, kl_beta=0.1)
    units = (weights > 0).reshape(-1).nonzero().squeeze(1)
    with count_host_syncs(include_cpu=True) as syncs:
        got, got_m, got_w = policy_loss(logp, old, adv, weights, clip_range=0.2, ref_log_prob=ref, kl_beta=0.1,
                                        units=units, check=False)
    assert syncs.total == 0, dict(syncs.by_kind)
    assert torch.equal(got, want) and torch.equal(got_w, want_w)
    assert all(torch.equal(got_m[k], want_m[k]) for k in want_m)
    with pytest.raises(ValueError, match="no unit has a positive weight"):
        policy_loss(logp, old, adv, torch.zeros(3, 4), clip_range=0.2)


# ------------------------------------------------------------------------------------------------
# MDPO
# ------------------------------------------------------------------------------------------------
def test_mdpo_step_rewards_and_advantages_match_a_hand_computed_example():
    # Vocabulary: digits 0..7, EOS=8, MASK=9. An analytic model: at every masked completion position
    # it prefers digit (3 + number of masked completion positions) % 8, so the greedy prediction
    # depends on how far the decode has progressed.
    def logits_fn(ids, attention_mask):
        n_masked = (ids[:, 1:] == MASK).sum(dim=1)  # prompt length 1
        logits = torch.zeros(ids.shape[0], ids.shape[1], 10)
        best = (3 + n_masked) % 8
        logits[torch.arange(ids.shape[0]), :, best] = 5.0
        logits[:, :, MASK] = 100.0  # the mask token must never be predicted
        return logits

    # two rollouts of one prompt, completion length 3, 3 steps (one token per step)
    traj = _trajectory(commit_step=[[0, 1, 2], [2, 0, 1]], completion=[[5, 4, 3], [1, 5, 4]], prompt=[[0], [0]], num_steps=3)
    pred = predicted_completions(logits_fn, traj, MASK)
    # after step 0 two positions are masked -> fill with (3+2)%8 = 5; after step 1 one -> 4; last = final
    want = torch.tensor([[[5, 5, 5], [5, 4, 4], [5, 4, 3]],
                         [[5, 5, 5], [4, 5, 4], [1, 5, 4]]])
    assert torch.equal(pred, want)
    # reward: fraction of positions equal to the target "543"
    target = torch.tensor([5, 4, 3])
    step_rewards = (pred == target).float().mean(dim=-1)  # [2, 3]
    assert torch.allclose(step_rewards, torch.tensor([[1 / 3, 2 / 3, 1.0], [1 / 3, 0.0, 0.0]]))
    adv = mdpo_step_advantages(step_rewards, torch.tensor([0, 0]), std_mode="group")
    # per (group, step) cell with two members: +-1 (population std = half the gap), 0 when equal
    eps = 1e-4
    want_adv = torch.tensor([[0.0, (1 / 3) / (1 / 3 + eps), 0.5 / (0.5 + eps)],
                             [0.0, -(1 / 3) / (1 / 3 + eps), -0.5 / (0.5 + eps)]])
    assert torch.allclose(adv, want_adv, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# IGPO
# ------------------------------------------------------------------------------------------------
def test_all_wrong_groups_and_hint_lengths():
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5, 0.2])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert all_wrong_groups(rewards, groups, threshold=1.0).tolist() == [True, False, True]
    assert all_wrong_groups(rewards, groups, threshold=0.5).tolist() == [True, False, False]
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([10, 4, 1, 0, 50])
    h = hint_lengths(lengths, (0.2, 0.6), gen_length=12, generator=g)
    u = 0.2 + 0.4 * torch.rand(5, generator=torch.Generator().manual_seed(0))
    want = torch.round(u * lengths.float()).long().clamp(min=1)
    want = torch.minimum(want, torch.minimum(lengths, torch.tensor(11)))
    want[3] = 0
    assert torch.equal(h, want)
    assert bool((h[lengths > 0] >= 1).all()) and bool((h <= 11).all())


# ------------------------------------------------------------------------------------------------
# estimators: shared draws give ratio exactly 1
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["one_step", "coupled", "elbo_double_mc", "elbo_semi_deterministic"])
def test_estimator_draws_are_reused_exactly(name):
    torch.manual_seed(0)
    table = torch.randn(12, 10)

    def logits_fn(ids, attention_mask):
        return table[ids] + 0.1 * (ids == MASK).sum(dim=1, keepdim=True)[..., None]

    seq = torch.tensor([[1, 2, 3, 4, EOS, EOS], [2, 2, 1, 0, 3, EOS]])
    batch = RolloutBatch(seq, torch.ones_like(seq), 2, trained_token_mask(seq[:, 2:], EOS))
    est = LogProbEstimator(name, mask_id=MASK, p_mask_prompt=0.5, num_mc=2)
    draws = est.draw(batch, torch.Generator().manual_seed(3))
    a, b = est(logits_fn, batch, draws), est(logits_fn, batch, draws)
    assert torch.equal(a, b)
    assert a.shape == ((2, 4) if ESTIMATOR_UNITS[name] == "token" else (2, 1))
    # row selection of the draws matches evaluating the full batch
    idx = torch.tensor([1])
    assert torch.allclose(est(logits_fn, batch.select(idx), select_draws(draws, idx)), a[idx])
    if ESTIMATOR_UNITS[name] == "sequence":
        from flowalign.dllm.logprob import masked_logprob

        per_token = masked_logprob(logits_fn, seq, torch.ones_like(seq), 2, MASK, draws)
        assert torch.allclose(a[:, 0], (per_token * batch.trained).sum(dim=1))
