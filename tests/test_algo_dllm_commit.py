"""The learned token-commitment policy (flowalign.dllm.unmasking_policy) and the two methods built on
it, ``token_commitment`` and ``co_grpo`` (flowalign.algorithms): the Plackett-Luce log-prob by hand
and against torch.distributions (sequential Categorical draws), the Gumbel-top-k draw's frequencies
against the exact probabilities, the features by hand, the greedy untrained policy reproducing
LLaDA's low-confidence decode exactly, the estimators (frozen / joint), config errors naming their
key, two iterations of each shipped config through ``flowalign.train`` (on-policy first step, frozen
dLLM untouched, the head trained and saved), and checkpoint/resume of the head's weights."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from torch.distributions import Categorical

import flowalign
from flowalign.algorithms.token_commitment import CommitmentEstimator
from flowalign.config import ConfigError, load_config
from flowalign.dllm.algorithms import RolloutBatch, trained_token_mask
from flowalign.dllm.logprob import trajectory_logprob
from flowalign.dllm.sampling import SamplingSpec, generate, restrict_logits
from flowalign.dllm.unmasking_policy import (
    CommitmentPolicy,
    UnmaskingPolicy,
    commitment_features,
    gumbel_top_k,
    plackett_luce_log_prob,
)
from tests.conftest import REPO
from tests.test_dllm_recipe import digit_credit, records, tiny_overrides

MASK, EOS, V = 9, 8, 10


def _rank(order: tuple[int, ...], L: int) -> torch.Tensor:
    r = torch.full((L,), -1, dtype=torch.long)
    for j, i in enumerate(order):
        r[i] = j
    return r


# ------------------------------------------------------------------------------------------------
# Plackett-Luce
# ------------------------------------------------------------------------------------------------
def test_plackett_luce_log_prob_by_hand():
    # exp(u) = 1, 2, 3 (position 3 not a candidate): P(2 then 1) = 3/6 * 2/3 = 1/3; P(0 then 2) = 1/6 * 3/5
    u = torch.tensor([[0.0, math.log(2.0), math.log(3.0), 5.0]])
    cand = torch.tensor([[True, True, True, False]])
    assert torch.allclose(plackett_luce_log_prob(u, cand, _rank((2, 1), 4)[None]), torch.tensor([math.log(1 / 3)]))
    assert torch.allclose(plackett_luce_log_prob(u, cand, _rank((0, 2), 4)[None]), torch.tensor([math.log(0.1)]))
    assert plackett_luce_log_prob(u, cand, _rank((), 4)[None]).item() == 0.0  # nothing drawn
    with pytest.raises(ValueError, match="not a candidate"):
        plackett_luce_log_prob(u, cand, _rank((3,), 4)[None], check=True)


def test_plackett_luce_gradient_is_finite_and_matches_autograd_of_the_explicit_product():
    # rows drawing 2, 1 and 0 positions; the gradient of the closed form equals that of the explicit product
    u = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, -0.5, 0.2], [0.1, 0.2, 0.3, 0.4]], requires_grad=True)
    cand = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, True, True]])
    rank = torch.stack([_rank((2, 0), 4), _rank((3,), 4), _rank((), 4)])
    plackett_luce_log_prob(u, cand, rank).sum().backward()
    v = u.detach().clone().requires_grad_(True)
    e = v.exp()
    explicit = (e[0, 2] / e[0, :3].sum()).log() + (e[0, 0] / (e[0, 0] + e[0, 1])).log() + (e[1, 3] / e[1].sum()).log()
    explicit.backward()
    assert torch.isfinite(u.grad).all() and torch.allclose(u.grad, v.grad, atol=1e-6)
    assert u.grad[2].abs().sum() == 0 and u.grad[0, 3] == 0  # nothing drawn; not a candidate


def test_plackett_luce_matches_sequential_categoricals_and_sums_to_one():
    torch.manual_seed(0)
    L, k = 5, 3
    u = torch.randn(L)
    cand = torch.tensor([True, False, True, True, True])
    total = 0.0
    for order in itertools.permutations([i for i in range(L) if cand[i]], k):
        # independent computation: draw without replacement as k Categoricals over what is left
        left, ref = cand.clone(), 0.0
        for i in order:
            ref += Categorical(logits=u.masked_fill(~left, -float("inf"))).log_prob(torch.tensor(i)).item()
            left[i] = False
        lp = plackett_luce_log_prob(u[None], cand[None], _rank(order, L)[None]).item()
        assert abs(lp - ref) < 1e-5, order
        total += math.exp(lp)
    assert abs(total - 1.0) < 1e-5


def test_gumbel_top_k_draws_plackett_luce_and_greedy_takes_the_top_scores():
    u = torch.tensor([0.0, math.log(2.0), math.log(3.0), 4.0])
    cand = torch.tensor([True, True, True, False])
    n = 40000
    rank = gumbel_top_k(u.expand(n, 4), cand.expand(n, 4), 2, torch.Generator().manual_seed(0))
    assert bool(((rank >= 0) <= cand).all()) and bool(((rank >= 0).sum(dim=1) == 2).all())
    for order in itertools.permutations(range(3), 2):
        hits = (rank == _rank(order, 4)).all(dim=1).float().mean().item()
        exact = math.exp(plackett_luce_log_prob(u[None], cand[None], _rank(order, 4)[None]).item())
        assert abs(hits - exact) < 4 * math.sqrt(exact * (1 - exact) / n) + 1e-3, (order, hits, exact)
    greedy = gumbel_top_k(u[None], cand[None], 2, None, greedy=True)
    assert greedy.tolist() == [[-1, 1, 0, -1]]
    with pytest.raises(ValueError, match="at least k=3"):
        gumbel_top_k(u[None], torch.tensor([[True, True, False, False]]), 3, None)


def test_commitment_features_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2])
    logits = torch.full((1, 2, 4), -float("inf"))
    logits[0, 0, :3] = p.log()
    logits[0, 1, :3] = torch.tensor([0.0, 0.0, 0.0])  # uniform over 3
    f = commitment_features(logits, step=1, num_steps=4)
    h = -(p * p.log()).sum().item()
    expected = torch.tensor([[[math.log(0.5), h, 0.2, 0.0, 0.25],
                              [math.log(1 / 3), math.log(3.0), 0.0, 0.5, 0.25]]])
    assert torch.allclose(f, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the decode with a commitment policy
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    """A deterministic toy 'model' (a random table of token logits shifted by the number of masks)
    and left-padded prompts."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g) * 2

    def logits_fn(ids, attention_mask):
        return table[ids] + 0.3 * (ids == MASK).sum(dim=1, keepdim=True)[..., None] * table[ids].flip(-1)

    prompts = torch.tensor([[1, 2, 3], [0, 4, 5], [2, 2, 1]])
    return logits_fn, prompts


def test_greedy_untrained_policy_is_llada_low_confidence_decoding(toy):
    logits_fn, prompts = toy
    spec = SamplingSpec(gen_length=6, steps=4, block_length=3, temperature=0.0)  # k = 2, 1 per block
    plain = generate(logits_fn, prompts, None, spec, mask_id=MASK)
    learned = generate(logits_fn, prompts, None, spec, mask_id=MASK, commit_policy=CommitmentPolicy(UnmaskingPolicy(), greedy=True))
    assert plain.commit_records is None
    assert torch.equal(plain.sequences, learned.sequences) and torch.equal(plain.commit_step, learned.commit_step)
    assert torch.equal(plain.step_log_probs, learned.step_log_probs)


def test_sampled_decode_records_the_exact_commitment_log_probs(toy):
    logits_fn, prompts = toy
    spec = SamplingSpec(gen_length=6, steps=4, block_length=3, temperature=1.0)  # k = 2, 1 per block
    head = UnmaskingPolicy(hidden=8, confidence_scale=1.0)
    torch.nn.init.normal_(head.mlp[2].weight)  # a policy that is not the confidence rule
    traj = generate(logits_fn, prompts, None, spec, mask_id=MASK, generator=torch.Generator().manual_seed(1),
                    commit_policy=CommitmentPolicy(head))
    rec = traj.commit_records
    B, S, Lg = 3, 4, 6
    assert rec["features"].shape == (B, S, Lg, 5) and rec["rank"].shape == rec["candidates"].shape == (B, S, Lg)
    for s in range(S):  # the drawn positions are the ones committed at s, inside the step's block, k of them
        assert torch.equal(rec["rank"][:, s] >= 0, traj.commit_step == s)
        block = torch.arange(Lg) // 3 == s // 2
        assert torch.equal(rec["candidates"][:, s], (traj.commit_step >= s) & block)
    # independent recomputation: the features from the states' logits, then sequential Categoricals
    lp = head.trajectory_log_prob(rec)
    for b in range(B):
        for s in range(S):
            state = traj.state_at(s, MASK)[b:b + 1]
            logits = restrict_logits(logits_fn(state, None)[:, 3:].float(), MASK)
            u = head(commitment_features(logits, s, S))[0]
            left, ref = rec["candidates"][b, s].clone(), 0.0
            for i in rec["rank"][b, s].argsort()[-int((rec["rank"][b, s] >= 0).sum()):].tolist():
                ref += Categorical(logits=u.masked_fill(~left, -float("inf"))).log_prob(torch.tensor(i)).item()
                left[i] = False
            assert abs(lp[b, s].item() - ref) < 1e-4, (b, s)
    sub = traj.select(torch.tensor([2, 0]))
    assert torch.equal(sub.commit_records["rank"], rec["rank"][[2, 0]])


def test_estimator_frozen_is_the_commitment_and_joint_adds_the_tokens(toy):
    logits_fn, prompts = toy
    spec = SamplingSpec(gen_length=6, steps=6, temperature=1.0)
    head = UnmaskingPolicy(hidden=8)
    traj = generate(logits_fn, prompts, None, spec, mask_id=MASK, generator=torch.Generator().manual_seed(2),
                    commit_policy=CommitmentPolicy(head))
    batch = RolloutBatch(traj.sequences, traj.attention_mask, 3, trained_token_mask(traj.completion_ids, EOS), traj)
    calls = []

    def counting(ids, am):
        calls.append(ids.shape[0])
        return logits_fn(ids, am)

    frozen = CommitmentEstimator("trajectory", policy=head, include_tokens=False, mask_id=MASK)(counting, batch, None)
    assert not calls and torch.allclose(frozen, head.trajectory_log_prob(traj.commit_records))
    joint = CommitmentEstimator("trajectory", policy=head, include_tokens=True, mask_id=MASK)(counting, batch, None)
    assert torch.allclose(joint, frozen + trajectory_logprob(logits_fn, traj, MASK, temperature=1.0), atol=1e-5)
    assert torch.allclose(trajectory_logprob(logits_fn, traj, MASK, temperature=1.0), traj.step_log_probs, atol=1e-5)
    with pytest.raises(ValueError, match="must be 'trajectory'"):
        CommitmentEstimator("one_step", policy=head, include_tokens=False, mask_id=MASK)


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["token_commitment", "co_grpo"])
@pytest.mark.parametrize("override,key", [
    ({"sampling.order": "ar", "sampling.steps": 5}, "sampling.order"),
    ({"algorithm.kl_beta": 0.1}, "algorithm.kl_beta"),
    ({"algorithm.estimator": "one_step"}, "algorithm.estimator"),
    ({"sampling.eos_early_rejection": 0.5}, "sampling.eos_early_rejection"),
])
def test_bad_settings_name_their_key(name, override, key, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config(f"configs/dllm/{name}_addition.yaml", override).validate(check_files=False)


# ------------------------------------------------------------------------------------------------
# runs through flowalign.train
# ------------------------------------------------------------------------------------------------
def _head_state(run_dir: str) -> dict[str, torch.Tensor]:
    return UnmaskingPolicy.load(os.path.join(run_dir, "final")).state_dict()


@pytest.mark.parametrize("name,extra,frozen", [
    ("token_commitment", {}, True),
    ("token_commitment", {"algorithm.token_commitment.train_model": True}, False),
    ("co_grpo", {}, False),
])
def test_two_iterations_train_the_head_and_keep_a_frozen_model(name, extra, frozen, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(REPO)
    summary = flowalign.train(f"configs/dllm/{name}_addition.yaml", tiny_overrides(tmp_path, **extra), rewards=digit_credit)
    run = summary["output_dir"]
    updated = [r for r in records(run) if "train/ratio_first_step_dev" in r]
    assert len(updated) == 2
    for r in updated:
        assert r["train/ratio_first_step_dev"] < 1e-5 and math.isfinite(r["train/loss"])
    init = UnmaskingPolicy().state_dict()
    head = _head_state(run)
    assert not torch.equal(head["confidence_scale"], init["confidence_scale"]) or \
        not torch.equal(head["mlp.2.weight"], init["mlp.2.weight"]), "the head did not train"
    pretrained = load_file(os.path.join(tiny_overrides(tmp_path)["model.pretrained"], "model.safetensors"))
    final = load_file(os.path.join(run, "final", "model.safetensors"))
    same = all(torch.equal(pretrained[k], final[k]) for k in pretrained)
    assert same == frozen, "the dLLM must stay frozen exactly when it is not trained"
    if frozen:  # the update never runs the frozen model: 2 x 4 rollouts x 5 decoding steps
        assert all(r["cost/sequence_forwards"] == 2 * 4 * 5 for r in updated)


def test_resume_restores_the_head_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = "configs/dllm/co_grpo_addition.yaml"
    flowalign.train(cfg, tiny_overrides(tmp_path / "a", **{"train.iterations": 3}), rewards=digit_credit)
    first = tiny_overrides(tmp_path / "b", **{"train.iterations": 2, "train.resume": "auto"})
    flowalign.train(cfg, first, rewards=digit_credit)
    flowalign.train(cfg, {**first, "train.iterations": 3}, rewards=digit_credit)
    a, b = _head_state(str(tmp_path / "a" / "run")), _head_state(str(tmp_path / "b" / "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "train/reward_mean"
    ra = [r[key] for r in records(str(tmp_path / "a" / "run")) if key in r]
    rb = [r[key] for r in records(str(tmp_path / "b" / "run")) if key in r]
    assert ra == rb and len(ra) == 3
