"""CJ-GRPO's loss as the authors' code computes it (issue 13, item 8 follow-up; docs/FIDELITY.md
"CJ-GRPO"): yjyddq/EOSER-ASS-RL @ 5affb4e, ``cj-grpo/cj_grpo_trainer_eoser_ass.py``

* ``_get_per_token_logps`` L560-594: per step ``i`` the log-softmax of the logits of the state before
  the step at the tokens of the state after it (checked against torch.distributions on a tiny model);
* ``compute_loss`` L109-138: per-token ratio, each step's token losses summed over the batch and
  divided by ``unmask_positions.sum()``, then divided by the number of steps (checked against a numpy
  transcription and a hand example);
* ``reversed_process`` L487: ``unmask_positions = mask_index & (x != mask_id)``, every committed
  position (the EOS fill included).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flowalign
from flowalign.algorithms.cj_grpo import CJGRPO, CJGRPOConfig
from flowalign.config import ConfigError, load_config
from flowalign.dllm.algorithms import CJTokenEstimator, RolloutBatch, cj_step_token_weights, policy_loss
from flowalign.dllm.logprob import trajectory_logprob, trajectory_token_logprob
from flowalign.dllm.sampling import SamplingSpec, generate
from tests.conftest import REPO
from tests.test_dllm_recipe import digit_credit, records, tiny_overrides

V, MASK, SUPPRESS = 7, 6, 5


def _tiny_model():
    torch.manual_seed(0)
    net = torch.nn.Embedding(V, V)
    pos = torch.randn(16, V)

    def logits_fn(ids, attn):  # depends on the whole state: the committed tokens change every logit
        h = net(ids)
        return h + h.mean(dim=1, keepdim=True) + pos[: ids.shape[1]]

    return logits_fn


def _decode(logits_fn, temperature):
    prompt = torch.tensor([[1, 2], [3, 4], [0, 2]])
    spec = SamplingSpec(gen_length=5, steps=2, temperature=temperature, step_schedule="ascending",
                        suppress_tokens=(SUPPRESS,))
    return generate(logits_fn, prompt, None, spec, mask_id=MASK, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------------
# per-token log-probs of the committed tokens (L560-594)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_token_logprobs_match_torch_distributions(T):
    logits_fn = _tiny_model()
    traj = _decode(logits_fn, 0.7)
    B, P, S, Lg = 3, 2, 2, 5
    with torch.no_grad():
        got = trajectory_token_logprob(logits_fn, traj, MASK, temperature=T)
    assert got.shape == (B, S, Lg)
    final = traj.sequences
    expected = torch.zeros(B, S, Lg)
    with torch.no_grad():
        for b in range(B):
            for s in range(S):
                # the state before step s, built by hand: tokens committed at earlier steps, the rest masked
                state = final[b].clone()
                for k in range(Lg):
                    if int(traj.commit_step[b, k]) >= s:
                        state[P + k] = MASK
                logits = logits_fn(state[None], None)[0, P:] / T
                logits[:, MASK] = -float("inf")  # never sampled: excluded from the policy
                logits[:, SUPPRESS] = -float("inf")
                dist = torch.distributions.Categorical(logits=logits)
                lp = dist.log_prob(final[b, P:])
                for k in range(Lg):
                    if int(traj.commit_step[b, k]) == s:
                        expected[b, s, k] = lp[k]
    assert torch.allclose(got, expected, atol=1e-5)
    # the per-token values sum to the per-step ones; at the rollout temperature they are the sampling policy's
    with torch.no_grad():
        assert torch.allclose(got.sum(-1), trajectory_logprob(logits_fn, traj, MASK, temperature=T), atol=1e-5)
    if T == 0.7:
        assert torch.allclose(got.sum(-1), traj.step_log_probs, atol=1e-5)
    else:  # temperature 1 on a temperature-0.7 rollout: not the sampling policy's log-probs
        assert not torch.allclose(got.sum(-1), traj.step_log_probs, atol=1e-3)
    # the ascending schedule of L = 5, S = 2: 1 then 4 tokens (L531-561)
    assert ((traj.commit_step == 0).sum(1) == 1).all() and ((traj.commit_step == 1).sum(1) == 4).all()


# ------------------------------------------------------------------------------------------------
# per-step token-count normalisation (L109-138)
# ------------------------------------------------------------------------------------------------
def test_step_token_weights_hand_example():
    # 2 rows, S = 2, Lg = 3; row 0 commits k=0 at step 0, k=1,2 at step 1; row 1 commits k=1 at step 0
    traj = SimpleNamespace(num_steps=2, commit_step=torch.tensor([[0, 1, 1], [1, 0, 1]]))
    w = cj_step_token_weights(traj).reshape(2, 2, 3)
    # step 0: 2 units in the batch -> 1/2 each; step 1: 4 units -> 1/4 each
    expected = torch.tensor([[[0.5, 0, 0], [0, 0.25, 0.25]], [[0, 0.5, 0], [0.25, 0, 0.25]]])
    assert torch.equal(w, expected)
    # with the tokens up to the first EOS only (row 0's k=2 is EOS fill): step 1 keeps 3 units -> 1/3
    trained = torch.tensor([[True, True, False], [True, True, True]])
    w = cj_step_token_weights(traj, trained).reshape(2, 2, 3)
    expected = torch.tensor([[[0.5, 0, 0], [0, 1 / 3, 0]], [[0, 0.5, 0], [1 / 3, 0, 1 / 3]]])
    assert torch.allclose(w, expected)


def _reference_loss(lp, old, ref, adv, unmask, eps, beta):
    """numpy transcription of compute_loss L109-138: per step i, the per-token clipped loss plus beta x
    k3, summed over the unmask positions of the batch, divided by their count and by the steps."""
    steps = lp.shape[1]
    loss = 0.0
    for i in range(steps):
        coef_1 = np.exp(lp[:, i] - old[:, i])
        coef_2 = np.clip(coef_1, 1 - eps, 1 + eps)
        per_token = -np.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None])
        per_token = per_token + beta * (np.exp(ref[:, i] - lp[:, i]) - (ref[:, i] - lp[:, i]) - 1)
        loss += (per_token * unmask[:, i]).sum() / unmask[:, i].sum() / steps
    return loss


@pytest.mark.parametrize("after_eos", [True, False])
def test_policy_loss_with_step_token_weights_is_the_reference_loss(after_eos):
    g = torch.Generator().manual_seed(0)
    N, S, Lg = 4, 3, 6
    commit = torch.stack([torch.tensor([0, 1, 1, 2, 2, 2])[torch.randperm(Lg, generator=g)] for _ in range(N)])
    committed = commit.unsqueeze(1) == torch.arange(S).view(1, S, 1)  # [N, S, Lg]
    old = torch.where(committed, -torch.rand(N, S, Lg, generator=g) * 2, torch.zeros(N, S, Lg))
    new = torch.where(committed, old + 0.6 * torch.randn(N, S, Lg, generator=g), torch.zeros(N, S, Lg))
    ref = torch.where(committed, old + 0.3 * torch.randn(N, S, Lg, generator=g), torch.zeros(N, S, Lg))
    adv = torch.tensor([1.0, -0.5, 0.25, -2.0])
    trained = torch.ones(N, Lg, dtype=torch.bool)
    trained[0, 4:] = False  # EOS fill of rows 0 and 2
    trained[2, 2:] = False
    unmask = committed & (True if after_eos else trained.unsqueeze(1))
    w = cj_step_token_weights(SimpleNamespace(num_steps=S, commit_step=commit), None if after_eos else trained)
    loss, _, _ = policy_loss(new.reshape(N, -1), old.reshape(N, -1), adv[:, None].expand(N, S * Lg), w,
                             clip_range=0.5, ref_log_prob=ref.reshape(N, -1), kl_beta=0.04)
    expected = _reference_loss(new.numpy(), old.numpy(), ref.numpy(), adv.numpy(), unmask.numpy(), 0.5, 0.04)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # not the per-step form (one ratio of the step's summed log-prob, every row and step weighing alike) ...
    r = np.exp(new.sum(-1).numpy() - old.sum(-1).numpy())  # [N, S]
    a = adv.numpy()[:, None]
    d = ref.sum(-1).numpy() - new.sum(-1).numpy()
    step_form = (-np.minimum(r * a, np.clip(r, 0.5, 1.5) * a) + 0.04 * (np.exp(d) - d - 1)).mean()
    assert abs(float(loss) - step_form) > 1e-3
    # ... nor a plain mean over every committed token of the batch
    flat, _, _ = policy_loss(new.reshape(N, -1), old.reshape(N, -1), adv[:, None].expand(N, S * Lg),
                             unmask.reshape(N, -1).float(), clip_range=0.5, ref_log_prob=ref.reshape(N, -1), kl_beta=0.04)
    assert abs(float(loss) - float(flat)) > 1e-3


def test_the_estimator_is_deterministic_and_on_policy():
    logits_fn = _tiny_model()
    traj = _decode(logits_fn, 1.0)
    P = traj.prompt_length
    batch = RolloutBatch(traj.sequences, traj.attention_mask, P, torch.ones_like(traj.sequences[:, P:], dtype=torch.bool), traj)
    est = CJTokenEstimator("trajectory", mask_id=MASK, temperature=traj.log_prob_temperature)
    assert est.unit == "step_token" and est.deterministic
    with torch.no_grad():
        a, b = est(logits_fn, batch, None), est(logits_fn, batch, None)
    assert a.shape == (3, 2 * 5) and torch.equal(a, b)  # the first inner step's ratio is exactly 1
    assert torch.allclose(a.reshape(3, 2, 5).sum(-1), traj.step_log_probs, atol=1e-5)
    with pytest.raises(ValueError, match="step_ratio"):
        CJTokenEstimator("one_step", mask_id=MASK)


# ------------------------------------------------------------------------------------------------
# defaults, errors, the recipe
# ------------------------------------------------------------------------------------------------
def test_defaults_are_the_reference_and_errors_name_their_key(monkeypatch):
    monkeypatch.chdir(REPO)
    c = CJGRPOConfig()
    assert (c.step_ratio, c.train_after_eos, c.logprob_temperature) == ("token", True, None)
    cfg = load_config("configs/dllm/cj_grpo_addition.yaml", [])
    assert cfg.algorithm.cj_grpo.step_ratio == "token" and cfg.sampling.temperature == 1.0  # the reference's
    for override, key in [("algorithm.cj_grpo.step_ratio=sequence", "algorithm.cj_grpo.step_ratio"),
                          ("algorithm.cj_grpo.logprob_temperature=0", "algorithm.cj_grpo.logprob_temperature"),
                          ("algorithm.loss_normalization=token", "algorithm.loss_normalization")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("configs/dllm/cj_grpo_addition.yaml", [override])
    # the step form keeps algorithm.loss_normalization
    load_config("configs/dllm/cj_grpo_addition.yaml", ["algorithm.cj_grpo.step_ratio=step", "algorithm.loss_normalization=token"])


def test_step_form_weights_follow_train_after_eos():
    traj = SimpleNamespace(num_steps=3, commit_step=torch.tensor([[0, 1, 2], [0, 1, 1]]))
    batch = SimpleNamespace(trajectory=traj, trained=torch.tensor([[True, False, False], [True, True, True]]))
    algo = CJGRPO.__new__(CJGRPO)
    algo.cfg = SimpleNamespace(algorithm=SimpleNamespace(loss_normalization="sequence"))
    est = SimpleNamespace(unit="step")
    algo.opts = CJGRPOConfig(step_ratio="step", train_after_eos=True)
    # row 0: steps 0, 1, 2 each commit a token -> 1/3 each; row 1: steps 0, 1 -> 1/2, step 2 idle
    assert torch.allclose(algo.unit_weights(est, batch, None), torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]]))
    algo.opts = CJGRPOConfig(step_ratio="step", train_after_eos=False)  # the former form: steps up to the first EOS
    assert torch.allclose(algo.unit_weights(est, batch, None), torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))


@pytest.mark.parametrize("extra, function, T", [
    ({}, "trajectory_token_logprob", 1.0),  # the reference form: per-token ratio, EOS fill trained, rollout T (1)
    ({"sampling.temperature": 0.7}, "trajectory_token_logprob", 0.7),  # null: the rollout temperature
    ({"sampling.temperature": 0.7, "algorithm.cj_grpo.logprob_temperature": 1.0}, "trajectory_token_logprob", 1.0),
    ({"algorithm.cj_grpo.step_ratio": "step", "algorithm.cj_grpo.train_after_eos": False}, "trajectory_logprob", 1.0),
])
def test_cj_grpo_forms_run_through_the_recipe_on_policy(extra, function, T, tmp_path, monkeypatch):
    from flowalign.dllm import logprob

    monkeypatch.chdir(REPO)
    calls = []
    original = getattr(logprob, function)

    def spy(*args, temperature=None, **kwargs):
        calls.append(temperature)
        return original(*args, temperature=temperature, **kwargs)

    monkeypatch.setattr(logprob, function, spy)
    torch.manual_seed(0)
    over = tiny_overrides(tmp_path, **{"algorithm.inner_steps": 2, **extra})
    summary = flowalign.train("configs/dllm/cj_grpo_addition.yaml", over, rewards=digit_credit)
    updated = [r for r in records(summary["output_dir"]) if "train/ratio_first_step_dev" in r]
    assert updated and all(r["train/ratio_first_step_dev"] < 1e-5 for r in updated)
    assert calls and all(t == T for t in calls)  # the update's log-probs, at the chosen temperature


def test_dataclass_fields_have_help():
    for f in dataclasses.fields(CJGRPOConfig):
        assert f.metadata["help"]
